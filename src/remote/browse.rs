//! `iot-remote browse`: placeholder.
use super::Device;

/// Serves the device's web origin on `listen`.
pub async fn run(
    _device: &Device,
    _user: &str,
    _password: &str,
    _listen: std::net::SocketAddr,
    _origin: &str,
) -> Result<(), String> {
    Err("not yet".into())
}
