//! The README's configuration table and the code's key list agree.

#[test]
fn readme_documents_every_key_and_only_those() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(k, _)| k.to_string())
        .collect();
    let known: std::collections::BTreeSet<String> = iot_agent::config::layers::known_keys()
        .into_iter()
        .collect();
    assert_eq!(
        documented, known,
        "README configuration table vs config keys"
    );
}
