//! The identity service's enrollment answer, exactly as it is on the wire.
//!
//! No struct here keeps unknown fields: the organization's private key that
//! older servers send under the JSON key `"-"` is dropped while parsing, so
//! it can never be written to disk or logged.

use serde::{Deserialize, Deserializer, Serialize};

/// Enrollment status values.
pub const STATUS_WAITING: i64 = 1;
/// Enrolled: the answer carries the credentials.
pub const STATUS_ENROLLED: i64 = 2;
/// Disabled by the operator.
pub const STATUS_DISABLED: i64 = 3;

/// The whole answer of `POST /v1/device/enroll`.
#[derive(Debug, Clone, Deserialize)]
pub struct EnrollResponse {
    /// An error code; empty on success.
    #[serde(default)]
    pub code: String,
    /// An error message; empty on success.
    #[serde(default)]
    pub message: String,
    /// The enrollment, on success.
    #[serde(default)]
    pub enrollment: Option<Enrollment>,
}

/// The enrollment, as stored in `.secret`.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Enrollment {
    /// The enrollment id (the device's id at the DMS).
    pub id: String,
    /// One of the `STATUS_*` values.
    pub status: i64,
    /// Opaque data the operator attached to the device.
    #[serde(rename = "deviceData", default)]
    pub device_data: String,
    /// The device as the service knows it.
    pub device: Device,
    /// The MQTT credentials.
    pub credentials: WireCredentials,
    /// The organization the device belongs to.
    pub organization: Organization,
}

// The credentials are secret: Debug shows only what identifies them.
impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("device", &self.device)
            .field("organization", &self.organization.id)
            .finish_non_exhaustive()
    }
}

/// The device's identity: its serial assertion's headers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Device {
    /// The brand account id.
    #[serde(default)]
    pub brand: String,
    /// The model name.
    #[serde(default)]
    pub model: String,
    /// The serial number.
    #[serde(default)]
    pub serial: String,
    /// The store id, if any.
    #[serde(default)]
    pub store: String,
    /// The device's public key, as the serial assertion's `device-key`.
    #[serde(rename = "deviceKey", default)]
    pub device_key: String,
}

/// Base64 of PEM, as sent.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct WireCredentials {
    /// The device's MQTT client key.
    #[serde(rename = "privateKey")]
    pub private_key: String,
    /// The device's MQTT client certificate.
    pub certificate: String,
    /// The broker's host.
    #[serde(rename = "mqttUrl")]
    pub mqtt_url: String,
    /// A string on the wire (`"8883"`); numbers are accepted too.
    #[serde(rename = "mqttPort", deserialize_with = "string_or_number")]
    pub mqtt_port: String,
}

/// The organization an enrollment belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Organization {
    /// The organization's id.
    pub id: String,
    /// The organization's name.
    #[serde(default)]
    pub name: String,
    /// Base64 of the PEM certificate that signs the broker's chain.
    pub rootcert: String,
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "mqttPort must be a string or number, not {other}"
        ))),
    }
}
