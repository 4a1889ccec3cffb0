//! iot-agent: a device-management agent for Ubuntu Core.
//!
//! Module map (see `README.md` for the picture):
//! - [`config`]: the layered configuration, one key namespace everywhere;
//! - [`snapd`]: the REST client over snapd's unix socket;
//! - [`identity`]: enrollment with the identity service, the credential store;
//! - [`bus`]: two transports ([`bus::Nats`], [`bus::mqtt`]) and one topic vocabulary;
//! - [`supervisor`]: the one subsystem shape ([`supervisor::Subsystem`]); runs
//!   subsystems, restarts them, stops them (and their tasks) on signal;
//! - [`services`]: what the agent answers on a bus: the DMS's actions, the
//!   snapd mirror, the per-serial action tree;
//! - [`subsystems`]: what owns state and runs on its own: snapd's
//!   [`subsystems::changes`] (poller, SQLite history, watchdog),
//!   [`subsystems::export`] (store-and-forward telemetry) and the
//!   [`subsystems::tunnel`] client (off until configured);
//! - [`signing`]: signed actions (Ed25519 JWS): the verifier, the keys, the signer's half;
//! - [`db`]: SQLite databases and their schema migrations;
//! - [`nats_server`]: the bundled nats-server's generated configuration and passwords;
//! - [`clock`]: the wall clock ("now" in s, ms, ns) and snapd's RFC 3339 timestamps;
//! - [`sys`]: the few libc calls (file lock, signals), the crate's only `unsafe`;
//! - [`tls`]: the one TLS builder (roots, client certificate, verify mode, servers);
//! - [`relay`]: the `iot-relay` binary's library: the cloud half of the tunnel;
//! - [`est`]: the EST wire format (RFC 7030), shared by the relay's server and
//!   provisioning;
//! - [`remote`]: the operator's side of the remote terminal and browser
//!   (`iot-remote`);
//! - [`backoff`], [`fsutil`] (atomic, private files), [`errors`], [`logging`]:
//!   the small mechanisms everything shares;
//! - [`commands`]: the one-shot subcommands; [`control`]: the running daemon
//!   seen from them (pid file, reload);
//! - [`agent`]: the `run` command that wires it all together.
//!
//! Every public item is documented (`missing_docs`, enforced by CI's
//! `cargo doc -D warnings`); `unsafe` is denied outside [`sys`].

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod backoff;
pub mod bus;
pub mod clock;
pub mod commands;
pub mod config;
pub mod control;
pub mod db;
pub mod errors;
pub mod est;
pub mod fsutil;
pub mod identity;
pub mod logging;
pub mod nats_server;
pub mod relay;
pub mod remote;
pub mod services;
pub mod signing;
pub mod snapd;
pub mod subsystems;
pub mod supervisor;
pub mod sys;
pub mod tls;
