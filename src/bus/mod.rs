//! The message bus: two transports and one topic vocabulary.
//!
//! The agent speaks on two brokers whose semantics differ, so each keeps
//! its own type rather than hiding behind one transport trait:
//! - [`Nats`] ([`nats`]): the device-local NATS connection. Core NATS,
//!   request/reply, at most once: an answer is a reply message, and nothing
//!   is kept for a subscriber that is not there. The snapd mirror, the
//!   per-serial tree's NATS side, export intake and the health subjects.
//! - [`mqtt::MqttHandle`] ([`mqtt`], run by [`driver`]): the DMS broker
//!   connection, which exists only while the device has credentials. MQTT
//!   QoS 1: a message is acknowledged (PUBACK) only once its receiver has
//!   made it safe, and holding back acknowledgements is how the DMS session
//!   admits work; replies are publishes confirmed by the broker.
//!
//! A trait over both would have to be the weaker of the two (no
//! acknowledgement that means "stored", no request/reply), and the code
//! that serves both transports does not need it: the per-serial tree keeps
//! its logic transport-free ([`crate::services::per_serial::PerSerial::receive`]
//! takes a topic and a payload and says what to publish), and each
//! transport's side acknowledges in its own terms. What the transports do
//! share is written once: the topic vocabulary ([`topics`], MQTT form
//! mapped to NATS subjects), the protected trees, and the connection status
//! ([`status`]).

pub mod driver;
pub mod mqtt;
pub mod nats;
pub mod status;
pub mod topics;

pub use status::{ConnectionStatus, StatusRx, StatusTx};
pub use topics::Topic;

pub use nats::{Incoming, Nats, NatsError, Subscription};
