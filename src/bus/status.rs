//! The DMS connection state, shared with whoever reports it (the
//! `iot.agent.mqtt.connection.status` subject, `iot-agent status`).

use serde::{Deserialize, Serialize};

/// The reference agent's shape: `{"connected":bool,"errorInfo":{"message":".."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub connected: bool,
    #[serde(rename = "errorInfo")]
    pub error_info: ErrorInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorInfo {
    pub message: String,
}

impl ConnectionStatus {
    pub fn connected() -> Self {
        ConnectionStatus {
            connected: true,
            error_info: ErrorInfo::default(),
        }
    }
    pub fn disconnected(why: &str) -> Self {
        ConnectionStatus {
            connected: false,
            error_info: ErrorInfo {
                message: why.to_string(),
            },
        }
    }
}

impl Default for ConnectionStatus {
    fn default() -> Self {
        Self::disconnected("the DMS connection is not established (the device is not enrolled yet)")
    }
}
