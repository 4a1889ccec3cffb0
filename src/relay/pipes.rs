//! Pipes: relay ports open to visitors. A **public** pipe carries each
//! visitor as a new stream to a device's local target; a **private** pipe
//! ([`super::private`]) joins connections on its two ports. Mappings are
//! kept in the relay's database ([`super::store`]), so after a restart
//! every pipe is back on its ports (the lease), whether or not its agent
//! is connected yet.

use super::agents::Agents;
use super::store::{not_saved, Store};
use crate::subsystems::tunnel::mux;
use crate::subsystems::tunnel::protocol::{self, Open};
use crate::supervisor::Shutdown;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Bound on the agent's answer to a stream open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `mapping=` asks for (ioFog's fields, and for a public pipe the
/// device and its local target, which ioFog's agent-side port stood for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Spec {
    /// Visitors on one relay port reach `target` on `device`.
    Public {
        /// Most visitors at once.
        #[serde(default = "default_max")]
        maxconnections: u32,
        /// Milliseconds; the relay enforces its own `agents.threshold` on
        /// the agent's connection, this is kept and listed.
        #[serde(default = "default_threshold")]
        heartbeatabsencethreshold: u64,
        /// The device to reach.
        device: String,
        /// `host:port` as seen from the device.
        target: String,
    },
    /// Two ports joined through the relay, each side with its passcode.
    Private {
        /// Most connections on port 1 at once.
        #[serde(default = "one")]
        maxconnectionsport1: u32,
        /// Most connections on port 2 at once.
        #[serde(default = "one")]
        maxconnectionsport2: u32,
        /// Milliseconds a waiting side may leave a `BEAT` unanswered.
        #[serde(default = "default_threshold")]
        heartbeatabsencethresholdport1: u64,
        /// Milliseconds port 2's waiting side may leave a `BEAT` unanswered.
        #[serde(default = "default_threshold")]
        heartbeatabsencethresholdport2: u64,
    },
}

fn default_max() -> u32 {
    60
}
fn one() -> u32 {
    1
}
fn default_threshold() -> u64 {
    200_000
}

/// One mapping as kept and answered (also the JSON of the `state` file
/// earlier relays wrote, which [`super::store`] imports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mapping {
    /// The mapping's id (answered at creation, used to delete it).
    pub id: String,
    /// What was asked for.
    pub spec: Spec,
    /// A private pipe's first port; for a public one, the agents' port (as
    /// ioFog answers it).
    pub port1: u16,
    /// A private pipe's second port; for a public one, the port visitors use.
    pub port2: u16,
    /// Port 1's passcode (private pipes).
    pub passcode1: String,
    /// Port 2's passcode (private pipes).
    pub passcode2: String,
    /// When it was added, ms since the epoch.
    pub timestamp: i64,
}

/// Why a mapping was not added (each an HTTP status of ioFog's API).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The request is not a valid mapping (400).
    #[error("{0}")]
    Bad(String),
    /// `pipes.ports` has no free port (503).
    #[error("no free port in pipes.ports")]
    NoPort,
    /// The same public mapping exists (409).
    #[error("a public mapping for this device and target exists: {0}")]
    Duplicate(String),
    /// The relay could not keep it (500).
    #[error("{0}")]
    Internal(String),
}

struct Running {
    mapping: Mapping,
    /// Connections now, on port1 and on port2.
    active: [Arc<AtomicU32>; 2],
    /// Cancelled when the mapping is removed: its port closes, its
    /// visitors are reset.
    stop: CancellationToken,
}

/// Every pipe of the relay.
pub struct Pipes {
    running: Mutex<BTreeMap<String, Running>>,
    pool: Vec<u16>,
    bind: String,
    store: Arc<Store>,
    /// The agents' port, answered as `port1` of a public pipe: the device
    /// side reaches the relay there, with its certificate for a passcode.
    agents_port: u16,
    agents: Arc<Agents>,
    shutdown: Shutdown,
}

impl Pipes {
    /// The mappings of ports in `pool`, kept in `state`.
    pub fn new(
        pool: Vec<u16>,
        bind: String,
        store: Arc<Store>,
        agents_port: u16,
        agents: Arc<Agents>,
        shutdown: Shutdown,
    ) -> Pipes {
        Pipes {
            running: Mutex::new(BTreeMap::new()),
            pool,
            bind,
            store,
            agents_port,
            agents,
            shutdown,
        }
    }

    /// Re-opens the database's mappings on their ports. A port that
    /// cannot be bound any more is logged and its mapping kept (listed, and
    /// retried at the next start).
    pub fn restore(&self) -> Result<(), crate::db::DbError> {
        let mappings = self.store.mappings()?;
        let mut running = self.running.lock().expect("pipes lock");
        for m in mappings {
            let ports = match m.spec {
                Spec::Public { .. } => vec![m.port2],
                Spec::Private { .. } => vec![m.port1, m.port2],
            };
            let listeners: Option<Vec<TcpListener>> = ports
                .iter()
                .map(|&port| {
                    self.listen(port)
                        .inspect_err(|e| {
                            tracing::error!(id = %m.id, port, error = %e, "cannot listen again on a pipe's port")
                        })
                        .ok()
                })
                .collect();
            tracing::info!(id = %m.id, ports = ?ports, "pipe restored");
            let r = self.start(m, listeners.unwrap_or_default());
            running.insert(r.mapping.id.clone(), r);
        }
        Ok(())
    }

    /// Adds a pipe: its row is committed before its ports serve (a failed
    /// write closes them again and changes nothing). Blocks on SQLite.
    pub fn add(&self, spec: Spec) -> Result<Mapping, AddError> {
        let ports_needed = match &spec {
            Spec::Public {
                device,
                target,
                maxconnections,
                ..
            } => {
                if device.is_empty() || target.is_empty() {
                    return Err(AddError::Bad(
                        "a public mapping needs device and target".into(),
                    ));
                }
                if *maxconnections == 0 {
                    return Err(AddError::Bad("maxconnections must be at least 1".into()));
                }
                1
            }
            Spec::Private {
                maxconnectionsport1: m1,
                maxconnectionsport2: m2,
                heartbeatabsencethresholdport1: t1,
                heartbeatabsencethresholdport2: t2,
            } => {
                if *m1 == 0 || *m2 == 0 {
                    return Err(AddError::Bad(
                        "maxconnectionsport1 and maxconnectionsport2 must be at least 1".into(),
                    ));
                }
                if *t1 < 100 || *t2 < 100 {
                    return Err(AddError::Bad(
                        "heartbeat absence thresholds are milliseconds, at least 100".into(),
                    ));
                }
                2
            }
        };
        let mut running = self.running.lock().expect("pipes lock");
        if let Spec::Public { device, target, .. } = &spec {
            let same = |r: &&Running| matches!(&r.mapping.spec, Spec::Public { device: d, target: t, .. } if d == device && t == target);
            if let Some(r) = running.values().find(same) {
                return Err(AddError::Duplicate(r.mapping.id.clone()));
            }
        }
        let used: Vec<u16> = running
            .values()
            .flat_map(|r| [r.mapping.port1, r.mapping.port2])
            .collect();
        let mut listeners: Vec<(u16, TcpListener)> = self
            .pool
            .iter()
            .filter(|p| !used.contains(p))
            .filter_map(|&p| self.listen(p).ok().map(|l| (p, l)))
            .take(ports_needed)
            .collect();
        if listeners.len() < ports_needed {
            return Err(AddError::NoPort);
        }
        let passcode = || Alphanumeric.sample_string(&mut rand::rng(), PASSCODE_LEN);
        let (port1, port2, passcode1, passcode2) = match &spec {
            Spec::Public { .. } => (
                self.agents_port,
                listeners[0].0,
                String::new(),
                String::new(),
            ),
            Spec::Private { .. } => (listeners[0].0, listeners[1].0, passcode(), passcode()),
        };
        let mapping = Mapping {
            id: Alphanumeric
                .sample_string(&mut rand::rng(), 16)
                .to_lowercase(),
            spec,
            port1,
            port2,
            passcode1,
            passcode2,
            timestamp: crate::clock::now_ms(),
        };
        self.store
            .insert_mapping(&mapping)
            .map_err(|e| AddError::Internal(not_saved(e)))?;
        let r = self.start(
            mapping.clone(),
            listeners.drain(..).map(|(_, l)| l).collect(),
        );
        running.insert(mapping.id.clone(), r);
        tracing::info!(id = %mapping.id, port1, port2, "pipe added");
        Ok(mapping)
    }

    /// Removes a mapping, committed first: its port closes and its
    /// visitors are reset (a failed write leaves it serving). Blocks on
    /// SQLite.
    pub fn remove(&self, id: &str) -> Result<bool, String> {
        let mut running = self.running.lock().expect("pipes lock");
        if !running.contains_key(id) {
            return Ok(false);
        }
        self.store.delete_mapping(id).map_err(not_saved)?;
        if let Some(r) = running.remove(id) {
            r.stop.cancel();
        }
        tracing::info!(id = %id, "pipe removed");
        Ok(true)
    }

    /// Every mapping with whether its agent is connected and its visitors.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let running = self.running.lock().expect("pipes lock");
        running
            .values()
            .map(|r| {
                let m = &r.mapping;
                let mut v = serde_json::to_value(&m.spec).unwrap_or_default();
                v["id"] = m.id.clone().into();
                v["port1"] = m.port1.into();
                v["port2"] = m.port2.into();
                v["timestamp"] = m.timestamp.into();
                let count = |i: usize| r.active[i].load(Ordering::Relaxed);
                match &m.spec {
                    Spec::Public { device, .. } => {
                        v["connected"] = self.agents.is_connected(device).into();
                        v["connections"] = count(1).into();
                    }
                    Spec::Private { .. } => {
                        v["connectionsport1"] = count(0).into();
                        v["connectionsport2"] = count(1).into();
                    }
                }
                v
            })
            .collect()
    }

    fn listen(&self, port: u16) -> std::io::Result<TcpListener> {
        // std sets SO_REUSEADDR: a restarted relay gets its ports back at once.
        let l = std::net::TcpListener::bind((self.bind.as_str(), port))?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    }

    /// Starts serving a mapping on its listeners (none: it is only kept).
    fn start(&self, mapping: Mapping, listeners: Vec<TcpListener>) -> Running {
        let active = [Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0))];
        let stop = self.shutdown.token().child_token();
        let tasks = self.shutdown.clone();
        match &mapping.spec {
            Spec::Public { .. } => {
                let pipe = Arc::new(Public {
                    id: mapping.id.clone(),
                    spec: mapping.spec.clone(),
                    active: active[1].clone(),
                    stop: stop.clone(),
                    agents: self.agents.clone(),
                });
                for l in listeners {
                    self.shutdown.spawn(accept(l, pipe.clone(), tasks.clone()));
                }
            }
            Spec::Private { .. } => {
                // Without both ports (one could not be bound again) the
                // mapping is kept, not served.
                if let Ok([l1, l2]) = <[TcpListener; 2]>::try_from(listeners) {
                    let pipe = super::private::Private::new(&mapping, active.clone(), stop.clone());
                    self.shutdown
                        .spawn(super::private::accept(l1, 0, pipe.clone(), tasks.clone()));
                    self.shutdown
                        .spawn(super::private::accept(l2, 1, pipe, tasks));
                }
            }
        }
        Running {
            mapping,
            active,
            stop,
        }
    }
}

/// Length of generated passcodes (letters and digits).
pub const PASSCODE_LEN: usize = 32;

/// A public pipe's listener side.
struct Public {
    id: String,
    spec: Spec,
    active: Arc<AtomicU32>,
    stop: CancellationToken,
    agents: Arc<Agents>,
}

async fn accept(listener: TcpListener, pipe: Arc<Public>, tasks: Shutdown) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => { tasks.spawn(visit(tcp, pipe.clone())); }
                Err(e) => {
                    tracing::warn!(id = %pipe.id, error = %e, "cannot accept a visitor");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = pipe.stop.cancelled() => return,
        }
    }
}

/// Holds one of a pipe's `maxconnections` while a visitor is served.
pub(super) struct Slot(Arc<AtomicU32>);

impl Slot {
    pub(super) fn take(active: &Arc<AtomicU32>, max: u32) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One visitor of a public pipe: a new stream to the device, or a reset
/// at once when it cannot be served.
async fn visit(mut tcp: TcpStream, pipe: Arc<Public>) {
    let Spec::Public {
        device,
        target,
        maxconnections,
        ..
    } = &pipe.spec
    else {
        unreachable!("a public pipe's spec")
    };
    let refuse = |tcp: &TcpStream, why: &str| {
        tracing::debug!(id = %pipe.id, reason = why, "visitor refused");
        mux::reset_tcp(tcp);
    };
    let Some(link) = pipe.agents.get(device) else {
        return refuse(&tcp, "the device is not connected");
    };
    let Some(_slot) = Slot::take(&pipe.active, *maxconnections) else {
        return refuse(&tcp, "maxconnections reached");
    };
    let _ = tcp.set_nodelay(true);
    // The open frame, and the visitor's bytes right behind it: the
    // agent's answer is read before any of its bytes reach the visitor.
    let open = async {
        let mut s = link.opener.open().await.map_err(|e| e.to_string())?;
        let open = Open {
            pipe: pipe.id.clone(),
            target: target.clone(),
        };
        protocol::write_frame(&mut s, &open)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(mux::Answered::new(s, OPEN_TIMEOUT))
    };
    let mut stream = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return refuse(&tcp, &why),
        Err(_) => return refuse(&tcp, "the device did not take the stream"),
    };
    let stop = async {
        tokio::select! {
            _ = link.ended.cancelled() => {}
            _ = pipe.stop.cancelled() => {}
        }
    };
    if let Err(e) = mux::splice(&mut stream, &mut tcp, stop).await {
        tracing::debug!(id = %pipe.id, error = %e, "visitor reset");
    }
}
