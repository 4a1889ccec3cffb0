//! The README's configuration table and the code's key list agree.

#[test]
fn readme_documents_every_key_and_only_those() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // The table under the header `| key | default | meaning |`, to its end.
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| key | default | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
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

#[test]
fn readme_documents_every_relay_key_and_only_those() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| relay key | default | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(k, _)| k.to_string())
        .collect();
    let known: std::collections::BTreeSet<String> =
        iot_agent::relay::config::known_keys().into_iter().collect();
    assert_eq!(documented, known, "README relay table vs relay config keys");
}
