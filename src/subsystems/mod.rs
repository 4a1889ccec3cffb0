//! Subsystems of the agent that are off until configured, each in the one
//! shape of [`crate::supervisor::Subsystem`].

pub mod tunnel;
