//! The accept filter's other half: the pending list of devices that dialed
//! in with a valid certificate and were refused because the filter does not
//! list them (G-SDK's `GetPendingList`). Bounded: the entry tried longest
//! ago is forgotten first.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Most devices kept in the pending list.
pub const PENDING_MAX: usize = 256;

/// Longest device id the admin API takes (a NATS subject token's bound).
pub const DEVICE_ID_MAX: usize = 128;

/// One refused device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingEntry {
    /// The device that was refused.
    pub device_id: String,
    /// The address it dialed from (`ip:port`).
    pub address: String,
    /// Milliseconds since the epoch of its last refused try.
    pub last_try: i64,
    /// Refused tries since it entered the list.
    pub tries: u64,
}

/// Refused devices, least recently tried first.
#[derive(Default)]
pub struct Pending {
    entries: Mutex<VecDeque<PendingEntry>>,
}

impl Pending {
    /// Records a refused try (it becomes the most recent entry).
    pub fn record(&self, device: &str, address: &str) {
        let mut entries = self.entries.lock().expect("pending lock");
        let tries = match entries.iter().position(|e| e.device_id == device) {
            Some(i) => entries.remove(i).map(|e| e.tries).unwrap_or(0),
            None => 0,
        };
        entries.push_back(PendingEntry {
            device_id: device.to_string(),
            address: address.to_string(),
            last_try: crate::clock::now_ms(),
            tries: tries + 1,
        });
        while entries.len() > PENDING_MAX {
            entries.pop_front();
        }
    }

    /// A device taken is no longer pending.
    pub fn forget(&self, device: &str) {
        self.entries
            .lock()
            .expect("pending lock")
            .retain(|e| e.device_id != device);
    }

    /// Most recent try first.
    pub fn list(&self) -> Vec<PendingEntry> {
        let entries = self.entries.lock().expect("pending lock");
        entries.iter().rev().cloned().collect()
    }
}

/// Checks a device id given to the admin API: what a NATS subject token
/// and a certificate CN can both carry (letters, digits, `-`, `_`).
pub fn check_device_id(id: &str) -> Result<(), String> {
    crate::bus::topics::segment(id).map(|_| ()).map_err(|_| {
        format!(
            "device id {:?} must be 1 to {DEVICE_ID_MAX} letters, digits, '-' or '_'",
            id.chars().take(64).collect::<String>()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pending_list_is_bounded_and_forgets_the_oldest_try_first() {
        let p = Pending::default();
        for i in 0..PENDING_MAX {
            p.record(&format!("d{i}"), "10.0.0.1:1");
        }
        // d0 tries again: now the most recent, so d1 goes first.
        p.record("d0", "10.0.0.2:2");
        p.record("new", "10.0.0.3:3");
        let list = p.list();
        assert_eq!(list.len(), PENDING_MAX);
        assert_eq!(list[0].device_id, "new");
        assert_eq!(list[1].device_id, "d0");
        assert_eq!(list[1].tries, 2);
        assert_eq!(list[1].address, "10.0.0.2:2");
        assert!(!list.iter().any(|e| e.device_id == "d1"));
        p.forget("d0");
        assert!(!p.list().iter().any(|e| e.device_id == "d0"));
    }

    #[test]
    fn device_ids_are_checked() {
        assert!(check_device_id("device-1_A").is_ok());
        for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(129)] {
            assert!(check_device_id(bad).is_err(), "{bad:?}");
        }
    }
}
