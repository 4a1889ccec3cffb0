//! `asyncapi/asyncapi.yaml` and the code agree: every subject the code
//! serves or publishes (`services::mirror::endpoints::all`, the one list)
//! has a channel with that address, and every channel address is one the
//! code serves or publishes. (Whether the document is valid AsyncAPI is
//! checked by `scripts/asyncapi-validate` with the AsyncAPI parser.)

use iot_agent::services::mirror::endpoints;
use iot_agent::services::mirror::envelope::AgentError;
use std::collections::BTreeSet;

fn document() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/asyncapi/asyncapi.yaml"
    ))
    .unwrap()
}

/// The `address:` of every channel: lines indented four spaces inside the
/// top-level `channels:` block (the document's layout; a channel written
/// otherwise would be missed here and fail the comparison).
fn channel_addresses(doc: &str) -> BTreeSet<String> {
    let mut in_channels = false;
    let mut out = BTreeSet::new();
    for line in doc.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            in_channels = line.trim_end() == "channels:";
            continue;
        }
        if let Some(addr) = in_channels
            .then(|| line.strip_prefix("    address: "))
            .flatten()
        {
            let addr = addr.trim().trim_matches(|c| c == '\'' || c == '"');
            if addr != "null" {
                out.insert(addr.to_string());
            }
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_subjects_the_code_uses() {
    let documented = channel_addresses(&document());
    let code: BTreeSet<String> = endpoints::all()
        .into_iter()
        .map(|e| e.address)
        .chain(iot_agent::services::per_serial::documented_addresses())
        .chain(iot_agent::subsystems::export::documented_addresses())
        .chain(iot_agent::subsystems::changes::watchdog::documented_addresses())
        .chain(iot_agent::services::dms::documented_addresses())
        .chain(iot_agent::services::terminal::documented_addresses())
        .chain(iot_agent::services::browser::documented_addresses())
        .chain(iot_agent::relay::status_nats::documented_addresses())
        .chain(iot_agent::relay::cluster::documented_addresses())
        .collect();
    let missing: Vec<_> = code.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not documented: {missing:?}; documented but not served: {extra:?}"
    );
}

#[test]
fn the_document_names_every_agent_error_kind() {
    let doc = document();
    for kind in iot_agent::services::terminal::protocol::ErrorKind::ALL {
        assert!(
            doc.contains(&format!("        - {}\n", kind.as_str())),
            "{} is not in TerminalErrorKind's enum",
            kind.as_str()
        );
    }
    for kind in iot_agent::services::browser::protocol::ErrorKind::ALL {
        assert!(
            doc.contains(&format!("        - {}\n", kind.as_str())),
            "{} is not in BrowserErrorKind's enum",
            kind.as_str()
        );
    }
    for kind in AgentError::KINDS {
        assert!(
            doc.contains(&format!("        - {kind}\n")),
            "{kind} is not in AgentErrorKind's enum"
        );
    }
}

#[test]
fn the_address_scan_sees_channels_only() {
    let doc = "channels:\n  a:\n    address: x.y\n  b:\n    address: null\noperations:\n  o:\n    address: not.a.channel\n";
    assert_eq!(channel_addresses(doc), BTreeSet::from(["x.y".to_string()]));
}
