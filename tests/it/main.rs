//! The integration suite: one test binary (linking once is much faster than
//! one binary per file), with the shared harness in `tests/common`.

#[path = "../common/mod.rs"]
mod common;

mod agent_run;
mod bus;
mod config_cli;
mod export;
mod harness;
mod identity;
mod readme;
mod snapd_client;
