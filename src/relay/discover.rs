//! `iot-relay discover`: the agents on the local network that answer a
//! DNS-SD browse for `_iot-agent._tcp` over mDNS (agents with
//! `tunnel.announce=true`), with device id, address, port and TLS, as
//! G-SDK's device search lists them. Read from the TXT records the agent
//! announces; a relay-dials agent's address and port can be registered
//! as they are (`POST /api/v2/agents`).

use crate::subsystems::tunnel::announce::{SERVICE_TYPE, TXT_DEVICE, TXT_MODE, TXT_TLS};
use mdns_sd::{ServiceDaemon, ServiceEvent};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One answering agent at one address.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Found {
    /// The device's id (TXT `device`).
    pub device_id: String,
    /// `host:port` to dial.
    pub address: String,
    /// Its `tunnel.listen` port; 0: it dials its relay.
    pub port: u16,
    /// Whether the agent speaks TLS (TXT `tls`).
    pub tls: bool,
    /// The agent's connection mode (TXT `mode`).
    pub mode: String,
}

/// Browses for `wait` and returns what answered, by device and address.
/// IPv4 addresses only.
pub fn discover(wait: Duration) -> anyhow::Result<Vec<Found>> {
    let mdns = ServiceDaemon::new()?;
    let rx = mdns.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + wait;
    let mut found = BTreeMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = rx.recv_timeout(left) else {
            break;
        };
        let ServiceEvent::ServiceResolved(info) = event else {
            continue;
        };
        let txt = |k: &str| info.get_property_val_str(k).unwrap_or_default().to_string();
        let device_id = match txt(TXT_DEVICE) {
            d if d.is_empty() => info
                .get_fullname()
                .trim_end_matches(SERVICE_TYPE)
                .trim_end_matches('.')
                .to_string(),
            d => d,
        };
        for ip in info.get_addresses_v4() {
            let f = Found {
                device_id: device_id.clone(),
                address: ip.to_string(),
                port: info.get_port(),
                tls: txt(TXT_TLS) != "no",
                mode: txt(TXT_MODE),
            };
            found.insert((f.device_id.clone(), f.address.clone()), f);
        }
    }
    let _ = mdns.stop_browse(SERVICE_TYPE);
    let _ = mdns.shutdown();
    Ok(found.into_values().collect())
}

/// The subcommand: a table (or JSON) of [`discover`]'s answer.
pub fn command(wait: Duration, json: bool) -> anyhow::Result<()> {
    let found = discover(wait)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    let mut rows = vec![["DEVICE", "ADDRESS", "PORT", "TLS", "MODE"]
        .map(String::from)
        .to_vec()];
    for f in &found {
        rows.push(vec![
            f.device_id.clone(),
            f.address.clone(),
            f.port.to_string(),
            if f.tls { "yes" } else { "no" }.into(),
            f.mode.clone(),
        ]);
    }
    print!("{}", super::cli::table(&rows));
    if found.is_empty() {
        eprintln!(
            "no agent answered within {} (agents announce with tunnel.announce=true)",
            humantime::format_duration(wait)
        );
    }
    Ok(())
}
