//! One file per thing the agent answers or watches.

pub mod dms;
pub mod mirror;
pub mod required;
pub mod snapd_health;
pub mod terminal;
