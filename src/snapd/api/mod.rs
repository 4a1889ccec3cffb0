//! The typed calls of the snapd client, one file per area of the REST API.

mod apps;
mod assertions;
mod changes;
mod interfaces;
mod snaps;
mod snapshots;
mod system;
mod users;

pub use changes::{ChangeSelect, Notices};
pub use snapshots::SnapshotStarted;
pub use system::parse_json_seq;
pub use users::CreateUser;
