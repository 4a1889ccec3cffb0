//! Enrollment with the IoT Identity service and the credential store.
//!
//! At start the agent uses stored credentials when they check out;
//! otherwise it reads the model and serial assertions from snapd, enrolls,
//! stores the answer and hands the credentials to the MQTT side through a
//! watch channel. Every state that makes it wait is explicit
//! ([`EnrollState`]), logged once when it begins, with what to do about it.

pub mod credentials;
pub mod enroller;
pub mod service;
pub mod store;
pub mod wire;

pub use credentials::Credentials;
pub use enroller::{enroll_once, CredentialsRx, Enroller};
pub use service::IdentityService;
pub use store::{Store, Stored};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where enrollment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum EnrollState {
    /// Enrolled and credentials stored.
    Enrolled {
        /// The enrollment id the service gave.
        device_id: String,
    },
    /// snapd has no serial assertion: the device is not registered yet.
    NoSerial,
    /// snapd did not answer.
    SnapdUnreachable {
        /// What the snapd client said.
        detail: String,
    },
    /// The identity service did not answer.
    ServiceUnreachable {
        /// The service's URL.
        url: String,
        /// What the HTTP client said.
        detail: String,
    },
    /// Known to the service, waiting for approval (status 1).
    Waiting,
    /// Disabled in the service (status 3).
    Disabled,
    /// The service refused the device (HTTP 400 / a non-empty `code`).
    Refused {
        /// The service's error code.
        code: String,
        /// The service's message.
        message: String,
    },
    /// The answer was not a usable enrollment.
    BadAnswer {
        /// What was wrong with it.
        detail: String,
    },
    /// Enrolled, but the credentials could not be written.
    StoreFailed {
        /// What the store said.
        detail: String,
    },
}

impl EnrollState {
    /// Permanent answers will not change by asking soon: back off to the cap.
    pub fn is_permanent(&self) -> bool {
        matches!(self, EnrollState::Disabled | EnrollState::Refused { .. })
    }

    /// A short name for logs and `status`.
    pub fn name(&self) -> &'static str {
        match self {
            EnrollState::Enrolled { .. } => "enrolled",
            EnrollState::NoSerial => "no-serial",
            EnrollState::SnapdUnreachable { .. } => "snapd-unreachable",
            EnrollState::ServiceUnreachable { .. } => "service-unreachable",
            EnrollState::Waiting => "waiting",
            EnrollState::Disabled => "disabled",
            EnrollState::Refused { .. } => "refused",
            EnrollState::BadAnswer { .. } => "bad-answer",
            EnrollState::StoreFailed { .. } => "store-failed",
        }
    }
}

impl fmt::Display for EnrollState {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            EnrollState::Enrolled { device_id } => write!(f, "enrolled as device {device_id}"),
            EnrollState::NoSerial => f.write_str(
                "the device has no serial assertion yet, so it cannot enroll; it gets one when \
                 snapd registers it with the brand's serial vault (check `snap model --serial`, \
                 the network, and the model's serial-authority); waiting",
            ),
            EnrollState::SnapdUnreachable { detail } => {
                write!(
                    f,
                    "cannot read the model and serial assertions from snapd: {detail}"
                )
            }
            EnrollState::ServiceUnreachable { url, detail } => write!(
                f,
                "the identity service at {url} is unreachable: {detail}; check `url` \
                 (snap set iot-agent url=...) and the network; retrying"
            ),
            EnrollState::Waiting => f.write_str(
                "the identity service knows the device but has not approved it yet (status \
                 waiting); approve it in the identity service; retrying",
            ),
            EnrollState::Disabled => f.write_str(
                "the identity service has disabled this device (status disabled); enable it \
                 there; retrying rarely",
            ),
            EnrollState::Refused { code, message } => write!(
                f,
                "the identity service refused the device ({}{message}); register the device \
                 (brand, model, serial) in the identity service; retrying rarely",
                if code.is_empty() {
                    String::new()
                } else {
                    format!("{code}: ")
                }
            ),
            EnrollState::BadAnswer { detail } => write!(
                f,
                "the identity service answered with something unusable: {detail}; retrying"
            ),
            EnrollState::StoreFailed { detail } => write!(
                f,
                "enrolled, but the credentials cannot be stored: {detail}; check dirs.data \
                 and free space; retrying"
            ),
        }
    }
}
