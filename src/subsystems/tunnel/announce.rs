//! `tunnel.announce`: the agent announces itself on the local network by
//! DNS-SD over mDNS (the maintained `mdns-sd` crate), so `iot-relay
//! discover` finds it (G-SDK's device search): the instance is the device
//! id, the port that of `tunnel.listen` (0: the agent dials its relay and
//! cannot be dialed), and TXT records say the device id, TLS and mode.

use crate::config::TunnelConfig;
use mdns_sd::{ServiceDaemon, ServiceInfo};
use std::net::IpAddr;

/// The DNS-SD service type, announced by the agent and browsed by the
/// relay.
pub const SERVICE_TYPE: &str = "_iot-agent._tcp.local.";

/// The TXT keys.
pub const TXT_DEVICE: &str = "device";
/// TXT key: whether the agent speaks TLS.
pub const TXT_TLS: &str = "tls";
/// TXT key: the connection mode.
pub const TXT_MODE: &str = "mode";

/// A running announcement; dropping it withdraws it (a goodbye packet).
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Announcer {
    /// Announces the agent's `tunnel.listen` as `device`.
    pub fn start(c: &TunnelConfig, device: &str) -> anyhow::Result<Announcer> {
        let (ip, port) = match c.listen.rsplit_once(':') {
            Some((host, port)) => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let ip: Option<IpAddr> =
                    host.parse().ok().filter(|ip: &IpAddr| !ip.is_unspecified());
                (ip, port.parse::<u16>().unwrap_or(0))
            }
            None => (None, 0),
        };
        let mode = if c.listen.is_empty() {
            "device-dials"
        } else {
            "relay-dials"
        };
        let tls = if c.tls { "yes" } else { "no" };
        let props = [(TXT_DEVICE, device), (TXT_TLS, tls), (TXT_MODE, mode)];
        let ips: Vec<IpAddr> = ip.into_iter().collect();
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            device,
            &format!("{device}.local."),
            &ips[..],
            port,
            &props[..],
        )?;
        if ips.is_empty() {
            // Every address of every interface, kept up to date.
            info = info.enable_addr_auto();
        }
        let fullname = info.get_fullname().to_string();
        let daemon = ServiceDaemon::new()?;
        daemon.register(info)?;
        tracing::info!(
            device,
            port,
            mode,
            "tunnel announced on the local network (mDNS)"
        );
        Ok(Announcer { daemon, fullname })
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}
