//! Scale-out: with `nats.url` set, relays share one registry in NATS
//! JetStream key-value, so any relay's admin API lists every agent and
//! knows which relay holds it, and a mapping added on one relay for an
//! agent another relay holds is served by that relay. No consensus of our
//! own: each relay writes only its own facts, with JetStream's revision
//! checks where two relays could race.
//!
//! - bucket `iot-relay-agents`: device id -> the relay holding it (or that
//!   last held it) and the connection's status, mode, address, TLS, since;
//! - bucket `iot-relay-mappings`: mapping id -> the relay serving it and
//!   the mapping without passcodes;
//! - `relay.cluster.{relayId}.mapping.add` / `.remove`: requests another
//!   relay forwards to the one that holds the device or serves the pipe.

use super::config::RelayNats;
use super::pipes::{Pipes, Spec};
use super::status::Board;
use crate::bus::topics;
use crate::supervisor::Shutdown;
use async_nats::jetstream::kv;
use futures::StreamExt;
use http::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The JetStream key-value bucket: which relay holds which agent.
pub const AGENTS_BUCKET: &str = "iot-relay-agents";
/// The JetStream key-value bucket: the mappings (without passcodes).
pub const MAPPINGS_BUCKET: &str = "iot-relay-mappings";
/// Bound on a request forwarded to another relay.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The request subject of a relay's mapping `op` (`add`, `remove`).
pub fn mapping_subject(relay: &str, op: &str) -> Result<String, topics::BadSegment> {
    topics::relay_cluster_mapping(relay, op).map(|t| t.nats())
}

/// The subjects this module uses, as the AsyncAPI document names them.
pub fn documented_addresses() -> Vec<String> {
    ["add", "remove"]
        .iter()
        .filter_map(|op| mapping_subject("PLACEHOLDER", op).ok())
        .map(|s| s.replace("PLACEHOLDER", "{relayId}"))
        .collect()
}

/// The connection, once made (the relay serves without it meanwhile).
struct Live {
    client: async_nats::Client,
    mappings: kv::Store,
}

/// This relay's part in the shared registry.
pub struct Cluster {
    /// The relay that holds the agent.
    pub id: String,
    live: OnceLock<Live>,
    /// Every key of both buckets, as last seen by the watchers.
    agents: Mutex<BTreeMap<String, Value>>,
    mappings: Mutex<BTreeMap<String, Value>>,
    /// This relay's mappings changed (the registry is brought up to date).
    changed: tokio::sync::Notify,
    /// How often held agents are re-written (`nats.refresh`); an entry not
    /// re-written for [`STALE_AFTER`] times this is its relay's gone.
    refresh: Duration,
}

/// Refresh intervals after which an entry is taken as left by a relay that
/// is gone.
pub const STALE_AFTER: u32 = 3;

impl Cluster {
    /// Starts joining the registry in the background.
    pub fn start(
        id: String,
        cfg: &RelayNats,
        board: Arc<Board>,
        pipes: Arc<Pipes>,
        shutdown: &Shutdown,
    ) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            id,
            live: OnceLock::new(),
            agents: Mutex::default(),
            mappings: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            refresh: cfg.refresh.get(),
        });
        let (c, cfg, sd) = (cluster.clone(), cfg.clone(), shutdown.clone());
        // Subscribed now, so no transition between start and join is missed.
        let events = board.subscribe();
        shutdown.spawn(async move {
            tokio::select! {
                r = c.clone().join(cfg, events, board, pipes, sd.clone()) => if let Err(e) = r {
                    tracing::error!(error = %format!("{e:#}"), "nats.url: cannot join the relays' shared registry (JetStream key-value); this relay serves alone");
                },
                _ = sd.cancelled() => {}
            }
        });
        cluster
    }

    async fn join(
        self: Arc<Self>,
        cfg: RelayNats,
        mut events: tokio::sync::broadcast::Receiver<Arc<super::status::Event>>,
        board: Arc<Board>,
        pipes: Arc<Pipes>,
        sd: Shutdown,
    ) -> anyhow::Result<()> {
        let client = super::status_nats::connect_options(&cfg)
            .connect(cfg.url.as_str())
            .await?;
        tracing::debug!("shared registry: NATS client made");
        let js = async_nats::jetstream::new(client.clone());
        let agents = bucket(&client, &js, AGENTS_BUCKET).await?;
        let mappings = bucket(&client, &js, MAPPINGS_BUCKET).await?;
        tracing::debug!("shared registry: buckets ready");
        let mut add_sub = client.subscribe(mapping_subject(&self.id, "add")?).await?;
        let mut remove_sub = client
            .subscribe(mapping_subject(&self.id, "remove")?)
            .await?;
        let mut agents_watch = agents.watch_with_history(">").await?;
        let mut mappings_watch = mappings.watch_with_history(">").await?;
        tracing::debug!("shared registry: watching");
        let _ = self.live.set(Live {
            client: client.clone(),
            mappings: mappings.clone(),
        });
        self.sync_mappings(&pipes).await;
        tracing::info!(relay = %self.id, "joined the relays' shared registry");
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh_held(&agents, &board).await,
                e = events.recv() => match e {
                    Ok(e) => self.record(&agents, &e).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "shared registry behind on status events");
                    }
                    Err(_) => return Ok(()),
                },
                Some(Ok(entry)) = agents_watch.next() => cache(&self.agents, entry),
                Some(Ok(entry)) = mappings_watch.next() => cache(&self.mappings, entry),
                Some(msg) = add_sub.next() => {
                    let answer = match serde_json::from_slice::<Value>(&msg.payload)
                        .ok()
                        .and_then(|v| serde_json::from_value::<Spec>(v["mapping"].clone()).ok())
                    {
                        Some(spec) => super::mapping_api::add_local(&pipes, spec).await,
                        None => (StatusCode::BAD_REQUEST, json!({"status": "error", "message": "bad forwarded mapping"})),
                    };
                    self.reply(&msg, answer).await;
                    self.sync_mappings(&pipes).await;
                }
                Some(msg) = remove_sub.next() => {
                    let id = serde_json::from_slice::<Value>(&msg.payload)
                        .ok()
                        .and_then(|v| v["mappingid"].as_str().map(String::from))
                        .unwrap_or_default();
                    let answer = super::mapping_api::remove_local(&pipes, &id).await;
                    self.reply(&msg, answer).await;
                    self.sync_mappings(&pipes).await;
                }
                _ = self.changed.notified() => self.sync_mappings(&pipes).await,
                _ = sd.cancelled() => return Ok(()),
            }
        }
    }

    /// Called after a local add or remove.
    pub fn mappings_changed(&self) {
        self.changed.notify_one();
    }

    async fn reply(&self, msg: &async_nats::Message, (code, body): (StatusCode, Value)) {
        let (Some(live), Some(reply)) = (self.live.get(), msg.reply.clone()) else {
            return;
        };
        let payload = json!({"code": code.as_u16(), "body": body}).to_string();
        let _ = live.client.publish(reply, payload.into()).await;
    }

    /// Writes a transition of a device this relay holds. A disconnect is
    /// written only while the entry is still this relay's: another relay
    /// may hold the device by now.
    async fn record(&self, store: &kv::Store, e: &super::status::Event) {
        let value = |status: &str| {
            json!({
                "relay": self.id, "status": status, "mode": e.mode, "address": e.address,
                "tls": e.tls, "connectedSince": (status == "connected").then_some(e.timestamp),
                "lastReason": e.reason, "timestamp": e.timestamp,
                "refreshed": crate::clock::now_ms(),
            })
            .to_string()
        };
        let r = match e.event {
            "connected" | "tls-connected" => store
                .put(&e.device_id, value("connected").into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            "disconnected" => match store.entry(&e.device_id).await {
                Ok(Some(entry)) => {
                    let ours = serde_json::from_slice::<Value>(&entry.value)
                        .is_ok_and(|v| v["relay"] == self.id.as_str());
                    if ours {
                        store
                            .update(&e.device_id, value("disconnected").into(), entry.revision)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    }
                }
                Ok(None) => Ok(()),
                Err(err) => Err(err.to_string()),
            },
            _ => Ok(()),
        };
        if let Err(err) = r {
            tracing::warn!(device = %e.device_id, error = %err, "cannot write the shared registry");
        }
    }

    /// Re-writes the entries of the agents this relay holds, so others
    /// see it is alive; never over another relay's entry.
    async fn refresh_held(&self, store: &kv::Store, board: &Board) {
        for a in board.list() {
            let Some(device) = a["deviceId"].as_str() else {
                continue;
            };
            if a["status"] != "connected" {
                continue;
            }
            let value = json!({
                "relay": self.id, "status": "connected", "mode": a["mode"],
                "address": a["address"], "tls": a["tls"], "connectedSince": a["connectedSince"],
                "lastReason": null, "timestamp": a["connectedSince"],
                "refreshed": crate::clock::now_ms(),
            })
            .to_string();
            let r = match store.entry(device).await {
                Ok(Some(entry)) => {
                    let ours = serde_json::from_slice::<Value>(&entry.value)
                        .is_ok_and(|v| v["relay"] == self.id.as_str());
                    if !ours {
                        continue;
                    }
                    store
                        .update(device, value.into(), entry.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                Ok(None) => store
                    .create(device, value.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = r {
                tracing::debug!(device, error = %e, "shared registry refresh skipped");
            }
        }
    }

    /// Whether an agent entry was re-written recently enough for its
    /// relay to be taken as alive.
    fn fresh(&self, v: &Value) -> bool {
        let bound = (self.refresh * STALE_AFTER).as_millis() as i64;
        v["refreshed"]
            .as_i64()
            .is_some_and(|t| crate::clock::now_ms() - t <= bound)
    }

    /// Puts this relay's mappings (no passcodes) and deletes those it no
    /// longer serves.
    async fn sync_mappings(&self, pipes: &Pipes) {
        let Some(live) = self.live.get() else { return };
        let local = pipes.list();
        let mut keep = Vec::new();
        for mut m in local {
            let Some(id) = m["id"].as_str().map(String::from) else {
                continue;
            };
            m["relay"] = self.id.clone().into();
            if let Err(e) = live.mappings.put(&id, m.to_string().into()).await {
                tracing::warn!(%id, error = %e, "cannot write a mapping to the shared registry");
            }
            keep.push(id);
        }
        let stale: Vec<String> = self
            .mappings
            .lock()
            .expect("cluster lock")
            .iter()
            .filter(|(id, v)| v["relay"] == self.id.as_str() && !keep.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let _ = live.mappings.delete(&id).await;
        }
    }

    /// The relay that holds `device` now, if another one does.
    pub fn holder(&self, device: &str) -> Option<String> {
        let agents = self.agents.lock().expect("cluster lock");
        let v = agents.get(device)?;
        let relay = v["relay"].as_str()?;
        (v["status"] == "connected" && relay != self.id && self.fresh(v)).then(|| relay.to_string())
    }

    /// The relay that serves mapping `id`, if another one does.
    pub fn server_of(&self, id: &str) -> Option<String> {
        let mappings = self.mappings.lock().expect("cluster lock");
        let relay = mappings.get(id)?["relay"].as_str()?;
        (relay != self.id).then(|| relay.to_string())
    }

    /// Sends a mapping request to relay `to`; its answer, with `relay`.
    pub async fn forward(&self, to: &str, op: &str, body: Value) -> (StatusCode, Value) {
        let Some(live) = self.live.get() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "error", "message": "not joined to the shared registry yet"}),
            );
        };
        let subject = match mapping_subject(to, op) {
            Ok(s) => s,
            Err(e) => {
                return (
                    StatusCode::BAD_GATEWAY,
                    json!({"status": "error", "message": e.to_string()}),
                )
            }
        };
        let asked = tokio::time::timeout(
            FORWARD_TIMEOUT,
            live.client.request(subject, body.to_string().into()),
        )
        .await;
        let answer = match asked {
            Ok(Ok(m)) => serde_json::from_slice::<Value>(&m.payload).ok(),
            _ => None,
        };
        match answer {
            Some(a) => {
                let code = a["code"]
                    .as_u64()
                    .and_then(|c| StatusCode::from_u16(c as u16).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let mut body = a["body"].clone();
                body["relay"] = to.into();
                (code, body)
            }
            None => (
                StatusCode::BAD_GATEWAY,
                json!({"status": "error", "message": format!("relay {to} did not answer the forwarded request")}),
            ),
        }
    }

    /// Other relays' agents not connected here: the registry's view.
    pub fn remote_agents(&self, local: &[Value]) -> Vec<Value> {
        let connected_here = |d: &str| {
            local
                .iter()
                .any(|a| a["deviceId"] == d && a["status"] == "connected")
        };
        let known_here = |d: &str| local.iter().any(|a| a["deviceId"] == d);
        let mappings = self.mappings.lock().expect("cluster lock");
        let agents = self.agents.lock().expect("cluster lock");
        agents
            .iter()
            .filter(|(d, v)| v["relay"] != self.id.as_str() && !connected_here(d))
            .filter(|(d, v)| v["status"] == "connected" || !known_here(d))
            .map(|(d, v)| {
                let pipes = mappings
                    .values()
                    .filter(|m| m["device"] == d.as_str())
                    .count();
                let mut a = v.clone();
                a["deviceId"] = d.clone().into();
                a["pipes"] = pipes.into();
                if a["status"] == "connected" && !self.fresh(v) {
                    a["status"] = "disconnected".into();
                    a["connectedSince"] = Value::Null;
                    a["lastReason"] = format!(
                        "relay {} has not refreshed its entry for {} (it may be gone)",
                        v["relay"].as_str().unwrap_or("?"),
                        humantime::format_duration(self.refresh * STALE_AFTER)
                    )
                    .into();
                }
                a
            })
            .collect()
    }

    /// Other relays' mappings.
    pub fn remote_mappings(&self) -> Vec<Value> {
        let mappings = self.mappings.lock().expect("cluster lock");
        mappings
            .values()
            .filter(|m| m["relay"] != self.id.as_str())
            .cloned()
            .collect()
    }
}

/// Opens a key-value bucket, creating it if it is missing. Created by its
/// stream's JetStream API request with only the fields every nats-server
/// since 2.9 knows (the client's own create sends 2.10 fields).
async fn bucket(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let stream = format!("KV_{name}");
    let config = json!({
        "name": stream,
        "subjects": [format!("$KV.{name}.>")],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "discard": "new",
        "storage": "file",
        "num_replicas": 1,
        "duplicate_window": 120_000_000_000u64,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "allow_direct": true,
    });
    let answer = client
        .request(
            format!("$JS.API.STREAM.CREATE.{stream}"),
            config.to_string().into(),
        )
        .await?;
    let answer: Value = serde_json::from_slice(&answer.payload)?;
    // 10058: created meanwhile by another relay.
    if !answer["error"].is_null() && answer["error"]["err_code"] != 10058 {
        anyhow::bail!("cannot create the bucket {name}: {}", answer["error"]);
    }
    Ok(js.get_key_value(name).await?)
}

fn cache(map: &Mutex<BTreeMap<String, Value>>, entry: kv::Entry) {
    let mut map = map.lock().expect("cluster lock");
    match entry.operation {
        kv::Operation::Put => {
            if let Ok(v) = serde_json::from_slice(&entry.value) {
                map.insert(entry.key, v);
            }
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            map.remove(&entry.key);
        }
    }
}
