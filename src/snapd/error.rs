//! snapd client errors: transport failures, malformed answers, and snapd's
//! own error envelopes with their `kind`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// snapd's error kinds the agent acts on; anything else is kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// `snap-not-installed`.
    SnapNotInstalled,
    /// `snap-not-found`.
    SnapNotFound,
    /// `snap-already-installed`.
    SnapAlreadyInstalled,
    /// Another change is in progress for the snap: retryable (409).
    SnapChangeConflict,
    /// `option-not-found`.
    OptionNotFound,
    /// `assertion-not-found`.
    AssertionNotFound,
    /// `insufficient-disk-space`.
    InsufficientDiskSpace,
    /// `network-timeout`.
    NetworkTimeout,
    /// `dns-failure`.
    DnsFailure,
    /// `login-required`.
    LoginRequired,
    /// `app-not-found`.
    AppNotFound,
    /// Any other kind, verbatim.
    Other(String),
}

impl ErrorKind {
    /// The kind as snapd spells it.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorKind::SnapNotInstalled => "snap-not-installed",
            ErrorKind::SnapNotFound => "snap-not-found",
            ErrorKind::SnapAlreadyInstalled => "snap-already-installed",
            ErrorKind::SnapChangeConflict => "snap-change-conflict",
            ErrorKind::OptionNotFound => "option-not-found",
            ErrorKind::AssertionNotFound => "assertion-not-found",
            ErrorKind::InsufficientDiskSpace => "insufficient-disk-space",
            ErrorKind::NetworkTimeout => "network-timeout",
            ErrorKind::DnsFailure => "dns-failure",
            ErrorKind::LoginRequired => "login-required",
            ErrorKind::AppNotFound => "app-not-found",
            ErrorKind::Other(s) => s,
        }
    }
}

impl From<&str> for ErrorKind {
    fn from(s: &str) -> Self {
        match s {
            "snap-not-installed" => ErrorKind::SnapNotInstalled,
            "snap-not-found" => ErrorKind::SnapNotFound,
            "snap-already-installed" => ErrorKind::SnapAlreadyInstalled,
            "snap-change-conflict" => ErrorKind::SnapChangeConflict,
            "option-not-found" => ErrorKind::OptionNotFound,
            "assertion-not-found" => ErrorKind::AssertionNotFound,
            "insufficient-disk-space" => ErrorKind::InsufficientDiskSpace,
            "network-timeout" => ErrorKind::NetworkTimeout,
            "dns-failure" => ErrorKind::DnsFailure,
            "login-required" => ErrorKind::LoginRequired,
            "app-not-found" => ErrorKind::AppNotFound,
            other => ErrorKind::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorKind::from(s.as_str()))
    }
}

/// The `result` of an error envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    /// snapd's message.
    pub message: String,
    /// snapd's error kind, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// Details, for some kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

/// Why a request to snapd failed; each says what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket is missing, refuses connections, or the connection broke.
    #[error("cannot reach snapd at {socket}: {detail} (is snapd running? check snapd.socket)")]
    Unreachable {
        /// snapd's socket.
        socket: PathBuf,
        /// The operating system's error.
        detail: String,
    },
    /// The connection broke, or what came back was not HTTP.
    #[error("the connection to snapd broke during {what}: {detail}")]
    Broken {
        /// The request.
        what: String,
        /// What broke.
        detail: String,
    },
    /// snapd did not answer within `snapd.timeout`.
    #[error("snapd did not answer {what} within {after:?} (snapd.timeout)")]
    Timeout {
        /// The request.
        what: String,
        /// The bound that passed.
        after: std::time::Duration,
    },
    /// The answer exceeded the body limit.
    #[error("snapd's answer to {what} is larger than {limit} bytes")]
    TooLarge {
        /// The request.
        what: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The answer is not snapd's JSON.
    #[error("snapd's answer to {what} is malformed (HTTP {status}): {detail}")]
    Malformed {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// What was wrong.
        detail: String,
    },
    /// snapd answered with an error envelope.
    #[error("snapd refused {what}: {} (HTTP {status}{})", error.message, error.kind.as_ref().map(|k| format!(", kind {k}")).unwrap_or_default())]
    Api {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// snapd's error.
        error: ApiError,
    },
    /// A name or id from (possibly remote) input that must not reach a URL.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidInput {
        /// What the value names (a snap name, a change id).
        what: &'static str,
        /// The value.
        value: String,
        /// Why it was refused.
        why: &'static str,
    },
}

impl Error {
    /// snapd's error kind, when snapd answered with one.
    pub fn kind(&self) -> Option<&ErrorKind> {
        match self {
            Error::Api { error, .. } => error.kind.as_ref(),
            _ => None,
        }
    }

    /// True when it is worth asking again later unchanged.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Broken { .. } | Error::Timeout { .. } => true,
            Error::Api { status, error, .. } => {
                *status >= 500
                    || matches!(
                        error.kind,
                        Some(ErrorKind::SnapChangeConflict)
                            | Some(ErrorKind::NetworkTimeout)
                            | Some(ErrorKind::DnsFailure)
                    )
            }
            _ => false,
        }
    }
}
