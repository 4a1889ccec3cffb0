//! What the double remembers: installed snaps and the store catalogue,
//! changes and their tasks, configuration, services, snapshots,
//! connections, users, notices; and how a change moves.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct App {
    pub(super) name: String,
    pub(super) daemon: Option<String>,
    pub(super) enabled: bool,
    pub(super) active: bool,
}

impl App {
    pub(super) fn to_json(&self, snap: &str) -> Value {
        let mut v = json!({"snap": snap, "name": self.name});
        if let Some(d) = &self.daemon {
            v["daemon"] = json!(d);
            v["daemon-scope"] = json!("system");
            v["enabled"] = json!(self.enabled);
            v["active"] = json!(self.active);
        }
        v
    }
}

#[derive(Debug, Clone)]
pub(super) struct Snap {
    pub(super) name: String,
    pub(super) version: String,
    pub(super) revision: String,
    pub(super) channel: String,
    pub(super) tracking: String,
    pub(super) active: bool,
    pub(super) apps: Vec<App>,
    pub(super) install_date: u128,
    pub(super) previous: Option<(String, String)>,
    pub(super) hold: Option<String>,
}

impl Snap {
    pub(super) fn new(name: &str, version: &str, revision: &str, channel: &str, now: u128) -> Snap {
        Snap {
            name: name.to_string(),
            version: version.to_string(),
            revision: revision.to_string(),
            channel: channel.to_string(),
            tracking: normalize_channel(channel),
            active: true,
            apps: Vec::new(),
            install_date: now,
            previous: None,
            hold: None,
        }
    }

    pub(super) fn snap_type(&self) -> &'static str {
        match self.name.as_str() {
            "snapd" => "snapd",
            "core" => "os",
            n if n.starts_with("core") || n.starts_with("bare") => "base",
            n if n.ends_with("-kernel") => "kernel",
            "pc" | "pi" => "gadget",
            _ => "app",
        }
    }

    /// The shape of a snap object from `GET /v2/snaps` (snapd's
    /// `client.Snap`, with its omitempty fields left out when empty).
    pub(super) fn to_json(&self) -> Value {
        let mut v = json!({
            "id": snap_id(&self.name),
            "title": self.name,
            "summary": format!("The {} snap", self.name),
            "description": format!("The {} snap, installed by the snapd test double.", self.name),
            "installed-size": 12345,
            "name": self.name,
            "publisher": {
                "id": "canonical",
                "username": "canonical",
                "display-name": "Canonical",
                "validation": "verified"
            },
            "developer": "canonical",
            "status": if self.active { "active" } else { "installed" },
            "type": self.snap_type(),
            "version": self.version,
            "channel": self.channel,
            "tracking-channel": self.tracking,
            "ignore-validation": false,
            "revision": self.revision,
            "confinement": "strict",
            "private": false,
            "devmode": false,
            "jailmode": false,
            "contact": "",
            "mounted-from": format!("/var/lib/snapd/snaps/{}_{}.snap", self.name, self.revision),
            "links": null
        });
        // snapd leaves `install-date` out for a snap that is not active
        // (a disabled one): the date is that of the active revision.
        if self.active {
            v["install-date"] = json!(rfc3339(self.install_date));
        }
        if self.snap_type() == "app" {
            v["base"] = json!("core24");
        }
        if !self.apps.is_empty() {
            v["apps"] = Value::Array(self.apps.iter().map(|a| a.to_json(&self.name)).collect());
        }
        if let Some(h) = &self.hold {
            v["hold"] = json!(h);
        }
        v
    }
}

#[derive(Debug, Clone)]
pub(super) struct StoreSnap {
    pub(super) version: String,
    pub(super) revision: String,
}

#[derive(Debug, Clone)]
pub(super) struct Task {
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) summary: String,
    pub(super) status: String,
    pub(super) log: Vec<String>,
    pub(super) spawn: u128,
    pub(super) ready_at: Option<u128>,
    /// `(done, total)` as a downloading task reports it; `None`: 0 or 1 of 1
    /// by status.
    pub(super) progress: Option<(u64, u64)>,
}

impl Task {
    pub(super) fn to_json(&self) -> Value {
        let (done, total) = self
            .progress
            .unwrap_or((u64::from(self.status == "Done"), 1));
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "summary": self.summary,
            "status": self.status,
            "progress": {"label": "", "done": done, "total": total},
            "spawn-time": rfc3339(self.spawn),
        });
        if !self.log.is_empty() {
            v["log"] = json!(self.log);
        }
        if let Some(r) = self.ready_at {
            v["ready-time"] = json!(rfc3339(r));
        }
        v
    }
}

/// What a change does to the device when it reaches Done.
#[derive(Debug, Clone)]
pub(super) enum Effect {
    None,
    Install {
        name: String,
        channel: String,
        version: String,
        revision: String,
    },
    Refresh {
        name: String,
        channel: Option<String>,
        version: String,
        revision: String,
    },
    Remove(String),
    Revert {
        name: String,
    },
    SetActive {
        name: String,
        active: bool,
    },
    Switch {
        name: String,
        channel: String,
    },
    Hold {
        name: String,
        until: Option<String>,
    },
    Conf {
        snap: String,
        patch: Map<String, Value>,
    },
    Services {
        action: String,
        apps: Vec<(String, String)>,
        enable: bool,
        disable: bool,
    },
    Snapshot {
        set: u64,
        snaps: Vec<String>,
    },
    ForgetSnapshot(u64),
    Connect(Connection),
    Disconnect(Connection),
    Many(Vec<Effect>),
}

#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) id: String,
    pub(super) kind: String,
    pub(super) summary: String,
    pub(super) status: String,
    pub(super) spawn: u128,
    pub(super) ready_at: Option<u128>,
    pub(super) err: Option<String>,
    pub(super) data: Option<Value>,
    /// snapd's internal "snap-names", used by `?for=`.
    pub(super) snap_names: Vec<String>,
    pub(super) tasks: Vec<Task>,
    pub(super) effect: Effect,
    pub(super) applied: bool,
}

pub(super) const STATUSES: &[&str] = &[
    "Do", "Doing", "Done", "Abort", "Undo", "Undoing", "Undone", "Hold", "Error", "Wait",
];

pub(super) fn is_ready(status: &str) -> bool {
    matches!(status, "Done" | "Undone" | "Hold" | "Error")
}

impl Change {
    pub(super) fn ready(&self) -> bool {
        is_ready(&self.status)
    }

    /// snapd's `changeInfo`: `tasks` omitted when empty, `ready-time` until
    /// ready, `err` unless failed, `data` unless there is api-data.
    pub(super) fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "summary": self.summary,
            "status": self.status,
            "ready": self.ready(),
            "spawn-time": rfc3339(self.spawn),
        });
        if !self.tasks.is_empty() {
            v["tasks"] = Value::Array(self.tasks.iter().map(Task::to_json).collect());
        }
        if let Some(r) = self.ready_at {
            v["ready-time"] = json!(rfc3339(r));
        }
        if let Some(e) = &self.err {
            v["err"] = json!(e);
        }
        if let Some(d) = &self.data {
            v["data"] = d.clone();
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Connection {
    pub(super) plug_snap: String,
    pub(super) plug: String,
    pub(super) slot_snap: String,
    pub(super) slot: String,
}

#[derive(Debug, Clone)]
pub(super) struct SnapshotSet {
    pub(super) id: u64,
    pub(super) time: u128,
    pub(super) snaps: Vec<(String, String, String)>, // name, version, revision
}

#[derive(Debug, Clone)]
pub(super) struct Notice {
    pub(super) id: String,
    pub(super) key: String,
    pub(super) kind: String,
    pub(super) first: u128,
    pub(super) last: u128,
    pub(super) occurrences: u64,
}

pub(super) struct State {
    pub(super) mode: ChangeMode,
    pub(super) fault: Option<Fault>,
    pub(super) snaps: BTreeMap<String, Snap>,
    pub(super) store: BTreeMap<String, StoreSnap>,
    pub(super) conf: BTreeMap<String, Value>,
    pub(super) changes: Vec<Change>,
    pub(super) next_change: u64,
    pub(super) next_task: u64,
    pub(super) serial: Option<String>,
    pub(super) requests: Vec<RecordedRequest>,
    pub(super) reboots: usize,
    pub(super) users: Vec<Value>,
    pub(super) snapshots: Vec<SnapshotSet>,
    pub(super) next_set: u64,
    pub(super) connections: Vec<Connection>,
    pub(super) logs: Vec<(u128, String, String)>,
    pub(super) notices_enabled: bool,
    pub(super) notices: Vec<Notice>,
    pub(super) notify: Arc<Notify>,
    pub(super) added_assertions: Vec<String>,
    pub(super) last_time: u128,
}

impl State {
    pub(super) fn new() -> State {
        let mut st = State {
            mode: ChangeMode::Auto,
            fault: None,
            snaps: BTreeMap::new(),
            store: BTreeMap::new(),
            conf: BTreeMap::new(),
            changes: Vec::new(),
            next_change: 1,
            next_task: 1,
            serial: None,
            requests: Vec::new(),
            reboots: 0,
            users: Vec::new(),
            snapshots: Vec::new(),
            next_set: 1,
            connections: Vec::new(),
            logs: Vec::new(),
            notices_enabled: false,
            notices: Vec::new(),
            notify: Arc::new(Notify::new()),
            added_assertions: Vec::new(),
            last_time: 0,
        };
        // Like real snapd: seeding is change 1, with two tasks, Done.
        let id = st.new_change(
            "seed",
            "Initialize system state",
            vec![
                (
                    "run-hook".into(),
                    "Run configure hook of \"core\" snap if present".into(),
                ),
                ("mark-seeded".into(), "Mark system seeded".into()),
            ],
            Vec::new(),
            None,
            Effect::None,
        );
        st.set_status(&id, "Done", "");
        st
    }

    /// Wall-clock nanoseconds, strictly increasing so that times order
    /// events (notices' `after` filter relies on it).
    pub(super) fn now(&mut self) -> u128 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .max(self.last_time + 1);
        self.last_time = t;
        t
    }

    pub(super) fn change_mut(&mut self, id: &str) -> Option<&mut Change> {
        self.changes.iter_mut().find(|c| c.id == id)
    }

    /// Creates a change in `Do` (tasks as `(kind, summary)`) and returns its
    /// id; callers then apply the mode with [`State::start_change`].
    pub(super) fn new_change(
        &mut self,
        kind: &str,
        summary: &str,
        tasks: Vec<(String, String)>,
        snap_names: Vec<String>,
        data: Option<Value>,
        effect: Effect,
    ) -> String {
        let now = self.now();
        let id = self.next_change.to_string();
        self.next_change += 1;
        let tasks = tasks
            .into_iter()
            .map(|(kind, summary)| {
                let tid = self.next_task.to_string();
                self.next_task += 1;
                Task {
                    id: tid,
                    kind,
                    summary,
                    status: "Do".into(),
                    log: Vec::new(),
                    spawn: now,
                    ready_at: None,
                    progress: None,
                }
            })
            .collect();
        self.changes.push(Change {
            id: id.clone(),
            kind: kind.to_string(),
            summary: summary.to_string(),
            status: "Do".into(),
            spawn: now,
            ready_at: None,
            err: None,
            data,
            snap_names,
            tasks,
            effect,
            applied: false,
        });
        self.bump_notice(&id, kind);
        id
    }

    /// A change with no tasks is Done at once (as in snapd); otherwise Auto
    /// mode finishes it now and Manual mode leaves it in Do.
    pub(super) fn start_change(&mut self, id: &str) {
        let no_tasks = self
            .changes
            .iter()
            .find(|c| c.id == id)
            .is_some_and(|c| c.tasks.is_empty());
        if no_tasks || self.mode == ChangeMode::Auto {
            self.set_status(id, "Done", "");
        }
    }

    pub(super) fn set_status(&mut self, id: &str, status: &str, reason: &str) {
        assert!(
            STATUSES.contains(&status),
            "snapd double: unknown change status {status:?} (one of {STATUSES:?})"
        );
        let now = self.now();
        let ch = self
            .change_mut(id)
            .unwrap_or_else(|| panic!("snapd double: no change with id {id:?}"));
        ch.status = status.to_string();
        let n = ch.tasks.len();
        for (i, t) in ch.tasks.iter_mut().enumerate() {
            t.status = match status {
                "Doing" if i > 0 => "Do",
                "Error" if i + 1 < n => "Undone",
                s => s,
            }
            .to_string();
            if status == "Error" && i + 1 == n {
                t.log.push(format!("{} ERROR {reason}", rfc3339(now)));
            }
            t.ready_at = if is_ready(&t.status) {
                t.ready_at.or(Some(now))
            } else {
                None
            };
        }
        ch.ready_at = if is_ready(status) {
            ch.ready_at.or(Some(now))
        } else {
            None
        };
        ch.err = (status == "Error").then(|| {
            let failed = ch
                .tasks
                .last()
                .map(|t| t.summary.clone())
                .unwrap_or_else(|| ch.summary.clone());
            format!("cannot perform the following tasks:\n- {failed} ({reason})")
        });
        let apply = status == "Done" && !ch.applied;
        if apply {
            ch.applied = true;
        }
        let effect = ch.effect.clone();
        let kind = ch.kind.clone();
        if apply {
            self.apply(effect);
        }
        self.bump_notice(id, &kind);
    }

    pub(super) fn apply(&mut self, effect: Effect) {
        let now = self.now();
        match effect {
            Effect::None => {}
            Effect::Install {
                name,
                channel,
                version,
                revision,
            } => {
                self.snaps.insert(
                    name.clone(),
                    Snap::new(&name, &version, &revision, &channel, now),
                );
            }
            Effect::Refresh {
                name,
                channel,
                version,
                revision,
            } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    if s.revision != revision {
                        s.previous = Some((s.version.clone(), s.revision.clone()));
                    }
                    s.version = version;
                    s.revision = revision;
                    if let Some(c) = channel {
                        s.tracking = normalize_channel(&c);
                        s.channel = c;
                    }
                }
            }
            Effect::Remove(name) => {
                self.snaps.remove(&name);
                self.conf.remove(&name);
            }
            Effect::Revert { name } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    if let Some((v, r)) = s.previous.take() {
                        s.previous = Some((s.version.clone(), s.revision.clone()));
                        s.version = v;
                        s.revision = r;
                    }
                }
            }
            Effect::SetActive { name, active } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.active = active;
                    for a in s.apps.iter_mut().filter(|a| a.daemon.is_some()) {
                        a.active = active && a.enabled;
                    }
                }
            }
            Effect::Switch { name, channel } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.tracking = normalize_channel(&channel);
                    s.channel = channel;
                }
            }
            Effect::Hold { name, until } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.hold = until;
                }
            }
            Effect::Conf { snap, patch } => {
                let conf = self.conf.entry(snap).or_insert_with(|| json!({}));
                for (k, v) in patch {
                    set_dotted(conf, &k, v);
                }
            }
            Effect::Services {
                action,
                apps,
                enable,
                disable,
            } => {
                for (snap, app) in apps {
                    let Some(s) = self.snaps.get_mut(&snap) else {
                        continue;
                    };
                    let Some(a) = s.apps.iter_mut().find(|a| a.name == app) else {
                        continue;
                    };
                    match action.as_str() {
                        "stop" => {
                            a.active = false;
                            if disable {
                                a.enabled = false;
                            }
                        }
                        _ => {
                            a.active = true;
                            if enable {
                                a.enabled = true;
                            }
                        }
                    }
                }
            }
            Effect::Snapshot { set, snaps } => {
                let snaps = snaps
                    .iter()
                    .filter_map(|n| self.snaps.get(n))
                    .map(|s| (s.name.clone(), s.version.clone(), s.revision.clone()))
                    .collect();
                self.snapshots.push(SnapshotSet {
                    id: set,
                    time: now,
                    snaps,
                });
            }
            Effect::ForgetSnapshot(set) => self.snapshots.retain(|s| s.id != set),
            Effect::Connect(c) => {
                if !self.connections.contains(&c) {
                    self.connections.push(c);
                }
            }
            Effect::Disconnect(c) => self.connections.retain(|x| *x != c),
            Effect::Many(list) => {
                for e in list {
                    self.apply(e);
                }
            }
        }
    }

    /// Records a `change-update` notice for the change (newer snapd emits
    /// one on every status change) and wakes long-polling readers.
    pub(super) fn bump_notice(&mut self, change_id: &str, kind: &str) {
        let now = self.now();
        if let Some(n) = self.notices.iter_mut().find(|n| n.key == change_id) {
            n.last = now;
            n.occurrences += 1;
            n.kind = kind.to_string();
        } else {
            let id = (self.notices.len() + 1).to_string();
            self.notices.push(Notice {
                id,
                key: change_id.to_string(),
                kind: kind.to_string(),
                first: now,
                last: now,
                occurrences: 1,
            });
        }
        self.notify.notify_waiters();
    }
}

pub(super) fn get_dotted<'a>(conf: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(conf, |v, k| v.get(k))
}

/// Sets `a.b.c` inside nested objects; `null` unsets, like `snap set a!`.
pub(super) fn set_dotted(conf: &mut Value, key: &str, value: Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = conf;
    for p in &parts[..parts.len() - 1] {
        if !cur.get(*p).is_some_and(Value::is_object) {
            cur[*p] = json!({});
        }
        cur = &mut cur[*p];
    }
    let last = parts[parts.len() - 1];
    if value.is_null() {
        if let Some(m) = cur.as_object_mut() {
            m.remove(last);
        }
    } else {
        cur[last] = value;
    }
}
