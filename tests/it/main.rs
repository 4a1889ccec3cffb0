//! The integration suite: one test binary (linking once is much faster than
//! one binary per file), with the shared harness in `tests/common`.

#[path = "../common/mod.rs"]
mod common;

mod agent_run;
mod asyncapi;
mod browser;
mod bus;
mod changes;
mod config_cli;
mod discovery;
mod dms;
mod dms_faults;
mod export;
mod fuzz_smoke;
mod hardening;
mod harness;
mod identity;
mod mirror;
mod nats_bundled;
mod nats_cluster;
mod per_serial;
mod provisioning;
mod readme;
mod relay_connections;
mod relay_store;
mod remote_mqtt;
mod run_script;
mod signing;
mod snap_hook;
mod snap_pack;
mod snapd_client;
mod terminal;
mod tunnel;

/// The snap-pack tool's code (layout, meta/snap.yaml, checks), shared with
/// `scripts/snap-pack`.
#[path = "../../tools/snap-pack/snap.rs"]
mod snap_tool;
