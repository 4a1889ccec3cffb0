//! The integration suite: one test binary (linking once is much faster than
//! one binary per file), with the shared harness in `tests/common`.

#[path = "../common/mod.rs"]
mod common;

mod agent_run;
mod asyncapi;
mod bus;
mod config_cli;
mod harness;
mod identity;
mod mirror;
mod readme;
mod snapd_client;
