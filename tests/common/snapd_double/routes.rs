//! Routing as snapd does it, on the decoded path, with snapd's 404 and
//! 405 answers, and the handlers of each endpoint.

use super::*;

/// The request as the handlers see it.
pub(super) struct Req {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: BTreeMap<String, String>,
    pub(super) content_type: String,
    pub(super) body: Vec<u8>,
}

impl Req {
    pub(super) fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    /// A comma-separated query list (`snaps=a,b`), empty items dropped.
    pub(super) fn list(&self, key: &str) -> Vec<String> {
        self.q(key)
            .map(|s| {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub(super) async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let uri = req.uri().clone();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => return into_response(bad_request(format!("cannot read request body: {e}"))),
    };
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let fault = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests.push(RecordedRequest {
            method: method.clone(),
            path_and_query,
            headers: headers.clone(),
            body: body.clone(),
        });
        let fault = st.fault.clone();
        if let Some(Fault::Conflict(n)) = fault {
            if method != "GET" {
                st.fault = (n > 1).then(|| Fault::Conflict(n - 1));
            }
        }
        fault
    };
    match fault {
        Some(Fault::Garbage) => {
            return into_response(Reply {
                status: 200,
                content_type: "application/json",
                headers: Vec::new(),
                body: b"<html>this is not JSON {\"type\":".to_vec(),
            })
        }
        Some(Fault::Status500) => {
            return into_response(error(500, "simulated internal error", None, None))
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Conflict(_)) if method != "GET" => {
            return into_response(error(
                409,
                "snap \"hello-world\" has \"refresh-snap\" change in progress",
                Some("snap-change-conflict"),
                None,
            ))
        }
        Some(Fault::Conflict(_) | Fault::StallExport | Fault::LateAnswer(_)) | None => {}
    }
    let req = Req {
        method,
        // snapd's router (gorilla/mux without UseEncodedPath) matches the
        // decoded path: `%2F` separates segments there too.
        path: percent_encoding::percent_decode_str(uri.path())
            .decode_utf8_lossy()
            .into_owned(),
        query: parse_query(uri.query().unwrap_or("")),
        content_type: headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        body,
    };
    if req.path == "/v2/notices" && req.method == "GET" {
        let enabled = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notices_enabled;
        if enabled {
            return into_response(get_notices(&state, &req).await);
        }
    }
    let reply = route(&mut state.lock().unwrap_or_else(|e| e.into_inner()), &req);
    if fault == Some(Fault::StallExport) && req.path.ends_with("/export") && reply.status == 200 {
        return into_stalled_response(reply);
    }
    if let Some(Fault::LateAnswer(d)) = fault.filter(|_| req.method != "GET") {
        tokio::time::sleep(d).await;
    }
    into_response(reply)
}

pub(super) fn route(st: &mut State, req: &Req) -> Reply {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let allowed: &[&str] = match segs.as_slice() {
        ["v2", "system-info"] => &["GET"],
        ["v2", "snaps"] => &["GET", "POST"],
        ["v2", "snaps", _] => &["GET", "POST"],
        ["v2", "snaps", _, "conf"] => &["GET", "PUT"],
        ["v2", "changes"] => &["GET"],
        ["v2", "changes", _] => &["GET", "POST"],
        ["v2", "assertions"] => &["GET", "POST"],
        ["v2", "assertions", _] => &["GET"],
        ["v2", "model"] | ["v2", "model", "serial"] => &["GET"],
        ["v2", "apps"] => &["GET", "POST"],
        ["v2", "logs"] => &["GET"],
        ["v2", "snapshots"] => &["GET", "POST"],
        ["v2", "snapshots", _, "export"] => &["GET"],
        ["v2", "interfaces"] => &["GET", "POST"],
        ["v2", "connections"] => &["GET"],
        ["v2", "users"] => &["GET", "POST"],
        ["v2", "warnings"] | ["v2", "aliases"] => &["GET"],
        ["v2", "systems"] => &["GET", "POST"],
        _ => &[],
    };
    if allowed.is_empty() || segs.iter().any(|s| s.is_empty()) {
        return error(404, "not found", None, None);
    }
    if !allowed.contains(&req.method.as_str()) {
        return error(
            405,
            format!("method \"{}\" not allowed", req.method),
            None,
            None,
        );
    }
    let m = req.method.as_str();
    match (m, segs.as_slice()) {
        (_, ["v2", "system-info"]) => system_info(st),
        ("GET", ["v2", "snaps"]) => get_snaps(st, req),
        ("POST", ["v2", "snaps"]) => post_snaps(st, req),
        ("GET", ["v2", "snaps", name]) => match st.snaps.get(*name) {
            Some(s) => sync(s.to_json()),
            None => error(
                404,
                "snap not installed",
                Some("snap-not-found"),
                Some(json!(name)),
            ),
        },
        ("POST", ["v2", "snaps", name]) => post_snap(st, name, req),
        ("GET", ["v2", "snaps", name, "conf"]) => get_conf(st, name, req),
        ("PUT", ["v2", "snaps", name, "conf"]) => put_conf(st, name, req),
        ("GET", ["v2", "changes"]) => get_changes(st, req),
        ("GET", ["v2", "changes", id]) => match st.changes.iter().find(|c| c.id == *id) {
            Some(c) => sync(c.to_json()),
            None => error(
                404,
                format!("cannot find change with id \"{id}\""),
                None,
                None,
            ),
        },
        ("POST", ["v2", "changes", id]) => post_change(st, id, req),
        ("GET", ["v2", "assertions"]) => sync(json!({"types": ASSERTION_TYPES})),
        ("POST", ["v2", "assertions"]) => post_assertions(st, req),
        ("GET", ["v2", "assertions", kind]) => get_assertions(st, kind),
        ("GET", ["v2", "model"]) => {
            if req.q("json") == Some("true") {
                sync(json!({"headers": model_headers()}))
            } else {
                assertion_reply(&[MODEL_ASSERTION], false)
            }
        }
        ("GET", ["v2", "model", "serial"]) => match &st.serial {
            None => error(
                404,
                "no serial assertion yet",
                Some("assertion-not-found"),
                Some(json!("serial")),
            ),
            Some(s) if req.q("json") == Some("true") => sync(json!({"headers": simple_headers(s)})),
            Some(s) => assertion_reply(&[s], false),
        },
        ("GET", ["v2", "apps"]) => get_apps(st, req),
        ("POST", ["v2", "apps"]) => post_apps(st, req),
        ("GET", ["v2", "logs"]) => get_logs(st, req),
        ("GET", ["v2", "snapshots"]) => get_snapshots(st, req),
        ("POST", ["v2", "snapshots"]) => post_snapshots(st, req),
        ("GET", ["v2", "snapshots", set, "export"]) => export_snapshot(st, set),
        ("GET", ["v2", "interfaces"]) => get_interfaces(st, req),
        ("POST", ["v2", "interfaces"]) => post_interfaces(st, req),
        ("GET", ["v2", "connections"]) => get_connections(st),
        ("GET", ["v2", "users"]) => sync(Value::Array(st.users.clone())),
        ("POST", ["v2", "users"]) => post_users(st, req),
        ("GET", ["v2", "warnings"]) => sync(json!([])),
        ("GET", ["v2", "aliases"]) => sync(json!({})),
        ("GET", ["v2", "systems"]) => sync(json!({"systems": []})),
        ("POST", ["v2", "systems"]) => post_systems(st, req),
        _ => error(404, "not found", None, None),
    }
}

pub(super) fn system_info(st: &mut State) -> Reply {
    let next = st.now() + 4 * 3600 * 1_000_000_000;
    sync(json!({
        "architecture": "amd64",
        "build-id": "5f1c2d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
        "confinement": "strict",
        "kernel-version": "6.8.0-45-generic",
        "locations": {"snap-bin-dir": "/snap/bin", "snap-mount-dir": "/snap"},
        "managed": !st.users.is_empty(),
        "on-classic": false,
        "os-release": {"id": "ubuntu-core", "version-id": "24"},
        "refresh": {"timer": "00:00~24:00/4", "next": rfc3339(next)},
        "sandbox-features": {
            "apparmor": ["kernel:caps", "kernel:domain", "kernel:file", "kernel:mount", "kernel:network", "kernel:policy", "kernel:ptrace", "kernel:signal", "parser:unsafe", "policy:default"],
            "confinement-options": ["devmode", "strict"],
            "dbus": ["mediated-bus-access"],
            "kmod": ["mediated-modprobe"],
            "mount": ["freezer-cgroup-v1", "layouts", "mount-namespace", "per-snap-persistency", "per-snap-profiles", "per-snap-updates", "per-snap-user-profiles", "stale-base-invalidation"],
            "seccomp": ["bpf-actlog", "bpf-argument-filtering", "kernel:allow", "kernel:errno", "kernel:kill_process", "kernel:kill_thread", "kernel:log", "kernel:trace", "kernel:trap", "kernel:user_notif"],
            "udev": ["device-cgroup-v2", "device-filtering", "tagging"]
        },
        "series": "16",
        "system-mode": "run",
        "version": "2.61-double",
        "virtualization": "none"
    }))
}

pub(super) fn get_snaps(st: &mut State, req: &Req) -> Reply {
    let wanted = req.list("snaps");
    match req.q("select") {
        None | Some("") | Some("all") | Some("enabled") | Some("refresh-inhibited") => {}
        Some(other) => return bad_request(format!("invalid select parameter: \"{other}\"")),
    }
    let enabled_only = req.q("select") == Some("enabled");
    let all_revisions = req.q("select") == Some("all");
    let mut list: Vec<Value> = Vec::new();
    for s in st
        .snaps
        .values()
        .filter(|s| wanted.is_empty() || wanted.contains(&s.name))
        .filter(|s| !enabled_only || s.active)
    {
        list.push(s.to_json());
        // `select=all` also lists the revisions kept for revert, inactive
        // (`installed`, no install-date), as snapd does.
        if let (true, Some((version, revision))) = (all_revisions, &s.previous) {
            let mut old = s.clone();
            old.version = version.clone();
            old.revision = revision.clone();
            old.active = false;
            list.push(old.to_json());
        }
    }
    json_reply(
        200,
        json!({"type": "sync", "status-code": 200, "status": "OK", "result": list, "sources": ["local"]}),
    )
}

/// A parsed snap instruction (`POST /v2/snaps[/{name}]` body).
pub(super) struct Instruction {
    pub(super) action: String,
    pub(super) channel: Option<String>,
    pub(super) revision: Option<String>,
    pub(super) snaps: Vec<String>,
    pub(super) time: Option<String>,
    pub(super) hold_level: Option<String>,
}

pub(super) fn parse_instruction(body: &[u8]) -> Result<Instruction, Reply> {
    let decode_err = |e: String| {
        bad_request(format!(
            "cannot decode request body into snap instruction: {e}"
        ))
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| decode_err(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| {
        decode_err(
            "json: cannot unmarshal non-object into Go value of type daemon.snapInstruction".into(),
        )
    })?;
    let string = |key: &str| -> Result<Option<String>, Reply> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(decode_err(format!(
                "json: cannot unmarshal {other} into Go struct field snapInstruction.{key} of type string"
            ))),
        }
    };
    let revision = match obj.get("revision") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) if n.as_i64().is_some() => Some(n.to_string()),
        Some(other) => return Err(decode_err(format!("invalid snap revision: {other}"))),
    };
    let snaps = match obj.get("snaps") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| decode_err("json: cannot unmarshal into []string".into()))?,
        Some(_) => return Err(decode_err("json: cannot unmarshal into []string".into())),
    };
    let inst = Instruction {
        action: string("action")?.unwrap_or_default(),
        channel: string("channel")?.filter(|c| !c.is_empty()),
        revision,
        snaps,
        time: string("time")?.filter(|c| !c.is_empty()),
        hold_level: string("hold-level")?.filter(|c| !c.is_empty()),
    };
    // snapInstruction.validate(), in snapd's order.
    if inst.action == "hold" {
        match inst.time.as_deref() {
            None => return Err(bad_request("hold action requires a non-empty time value")),
            Some("forever") => {}
            Some(t) if parse_rfc3339(t).is_none() => {
                return Err(bad_request(format!(
                    "hold action requires time to be \"forever\" or in RFC3339 format: parsing time \"{t}\""
                )))
            }
            Some(_) => {}
        }
        match inst.hold_level.as_deref() {
            None => {
                return Err(bad_request(
                    "hold action requires a non-empty hold-level value",
                ))
            }
            Some("auto-refresh") | Some("general") => {}
            Some(_) => {
                return Err(bad_request(
                    "hold action requires hold-level to be either \"auto-refresh\" or \"general\"",
                ))
            }
        }
    } else {
        if inst.time.is_some() {
            return Err(bad_request(
                "time can only be specified for the \"hold\" action",
            ));
        }
        if inst.hold_level.is_some() {
            return Err(bad_request(
                "hold-level can only be specified for the \"hold\" action",
            ));
        }
    }
    Ok(inst)
}

pub(super) const SNAP_ACTIONS: &[&str] = &[
    "install", "refresh", "remove", "revert", "enable", "disable", "switch", "hold", "unhold",
];

/// One planned snap operation: summary, tasks and effect.
pub(super) struct Plan {
    pub(super) summary: String,
    pub(super) tasks: Vec<(String, String)>,
    pub(super) effect: Effect,
}

pub(super) fn t(kind: &str, summary: String) -> (String, String) {
    (kind.to_string(), summary)
}

pub(super) fn hold_time(inst: &Instruction, st: &mut State) -> Option<String> {
    match inst.time.as_deref() {
        // snapd holds "forever" as a time centuries ahead.
        Some("forever") => Some(rfc3339(
            st.now() + 300 * 365 * 24 * 3600 * 1_000_000_000u128,
        )),
        Some(t) => Some(t.to_string()),
        None => None,
    }
}

/// Plans `action` on one snap, or answers the error snapd would.
pub(super) fn plan_one(st: &mut State, inst: &Instruction, name: &str) -> Result<Plan, Reply> {
    let action = inst.action.as_str();
    if action == "install" {
        if let Err(why) = validate_instance(name) {
            return Err(bad_request(format!(
                "cannot install \"{name}\": invalid instance name: {why}"
            )));
        }
        if st.snaps.contains_key(name) {
            return Err(error(
                400,
                format!("snap \"{name}\" is already installed"),
                Some("snap-already-installed"),
                Some(json!(name)),
            ));
        }
        let Some(store) = st.store.get(name).cloned() else {
            return Err(error(
                404,
                "snap not found",
                Some("snap-not-found"),
                Some(json!(name)),
            ));
        };
        let channel = inst.channel.clone().unwrap_or_else(|| "stable".into());
        let revision = inst.revision.clone().unwrap_or(store.revision);
        let mut summary = format!("Install \"{name}\" snap");
        if channel != "stable" {
            summary += &format!(" from \"{channel}\" channel");
        }
        return Ok(Plan {
            summary,
            tasks: vec![
                t(
                    "prerequisites",
                    format!("Ensure prerequisites for \"{name}\" are available"),
                ),
                t(
                    "download-snap",
                    format!("Download snap \"{name}\" ({revision}) from channel \"{channel}\""),
                ),
                t(
                    "link-snap",
                    format!("Make snap \"{name}\" ({revision}) available to the system"),
                ),
            ],
            effect: Effect::Install {
                name: name.to_string(),
                channel,
                version: store.version,
                revision,
            },
        });
    }
    let Some(snap) = st.snaps.get(name).cloned() else {
        return Err(not_installed(name));
    };
    let rev = snap.revision.clone();
    let plan = match action {
        "refresh" => {
            let store = st.store.get(name).cloned();
            let target_rev = inst
                .revision
                .clone()
                .or_else(|| store.as_ref().map(|s| s.revision.clone()))
                .unwrap_or_else(|| rev.clone());
            let version = store
                .filter(|s| s.revision == target_rev)
                .map(|s| s.version)
                .unwrap_or_else(|| snap.version.clone());
            let switching = inst
                .channel
                .as_ref()
                .is_some_and(|c| normalize_channel(c) != snap.tracking);
            if target_rev == rev && !switching {
                return Err(error(
                    400,
                    format!("snap \"{name}\" has no updates available"),
                    Some("snap-no-update-available"),
                    Some(json!(name)),
                ));
            }
            let summary = match &inst.channel {
                Some(c) if c != "stable" => format!("Refresh \"{name}\" snap from \"{c}\" channel"),
                _ => format!("Refresh \"{name}\" snap"),
            };
            Plan {
                summary,
                tasks: vec![
                    t(
                        "download-snap",
                        format!(
                            "Download snap \"{name}\" ({target_rev}) from channel \"{}\"",
                            inst.channel
                                .clone()
                                .unwrap_or_else(|| snap.tracking.clone())
                        ),
                    ),
                    t(
                        "link-snap",
                        format!("Make snap \"{name}\" ({target_rev}) available to the system"),
                    ),
                ],
                effect: Effect::Refresh {
                    name: name.to_string(),
                    channel: inst.channel.clone(),
                    version,
                    revision: target_rev,
                },
            }
        }
        "remove" => Plan {
            summary: format!("Remove \"{name}\" snap"),
            tasks: vec![
                t(
                    "stop-snap-services",
                    format!("Stop snap \"{name}\" ({rev}) services"),
                ),
                t(
                    "unlink-snap",
                    format!("Make snap \"{name}\" unavailable to the system"),
                ),
                t(
                    "discard-snap",
                    format!("Remove snap \"{name}\" ({rev}) from the system"),
                ),
            ],
            effect: Effect::Remove(name.to_string()),
        },
        "revert" => {
            if snap.previous.is_none() {
                return Err(bad_request(format!(
                    "cannot revert \"{name}\": no revision to revert to"
                )));
            }
            Plan {
                summary: format!("Revert \"{name}\" snap"),
                tasks: vec![t(
                    "link-snap",
                    format!("Make snap \"{name}\" available to the system"),
                )],
                effect: Effect::Revert {
                    name: name.to_string(),
                },
            }
        }
        "enable" | "disable" => {
            if inst.revision.is_some() {
                return Err(bad_request(format!(
                    "cannot {action} \"{name}\": {action} takes no revision"
                )));
            }
            let enable = action == "enable";
            if snap.active == enable {
                return Err(bad_request(format!(
                    "cannot {action} \"{name}\": snap \"{name}\" already {action}d"
                )));
            }
            let tasks = if enable {
                vec![
                    t(
                        "link-snap",
                        format!("Make snap \"{name}\" ({rev}) available to the system"),
                    ),
                    t(
                        "start-snap-services",
                        format!("Start snap \"{name}\" ({rev}) services"),
                    ),
                ]
            } else {
                vec![
                    t(
                        "stop-snap-services",
                        format!("Stop snap \"{name}\" ({rev}) services"),
                    ),
                    t(
                        "unlink-current-snap",
                        format!("Make current revision for snap \"{name}\" unavailable"),
                    ),
                ]
            };
            Plan {
                summary: format!(
                    "{} \"{name}\" snap",
                    if enable { "Enable" } else { "Disable" }
                ),
                tasks,
                effect: Effect::SetActive {
                    name: name.to_string(),
                    active: enable,
                },
            }
        }
        "switch" => {
            if inst.revision.is_some() {
                return Err(bad_request(format!(
                    "cannot switch \"{name}\": switch takes no revision"
                )));
            }
            let channel = inst.channel.clone().unwrap_or_default();
            Plan {
                summary: format!("Switch \"{name}\" snap to channel \"{channel}\""),
                tasks: vec![t(
                    "switch-snap-channel",
                    format!(
                        "Switch snap \"{name}\" from channel \"{}\" to \"{channel}\"",
                        snap.tracking
                    ),
                )],
                effect: Effect::Switch {
                    name: name.to_string(),
                    channel,
                },
            }
        }
        "hold" => {
            let level = inst.hold_level.as_deref().unwrap_or("general");
            Plan {
                summary: if level == "general" {
                    format!("Hold general refreshes for \"{name}\"")
                } else {
                    format!("Hold auto-refreshes for \"{name}\"")
                },
                tasks: Vec::new(),
                effect: Effect::Hold {
                    name: name.to_string(),
                    until: hold_time(inst, st),
                },
            }
        }
        "unhold" => Plan {
            summary: format!("Remove refresh hold on \"{name}\""),
            tasks: Vec::new(),
            effect: Effect::Hold {
                name: name.to_string(),
                until: None,
            },
        },
        other => return Err(bad_request(format!("unknown action {other}"))),
    };
    Ok(plan)
}

pub(super) fn post_snap(st: &mut State, name: &str, req: &Req) -> Reply {
    let inst = match parse_instruction(&req.body) {
        Ok(i) => i,
        Err(r) => return r,
    };
    if !SNAP_ACTIONS.contains(&inst.action.as_str()) {
        return bad_request(format!("unknown action {}", inst.action));
    }
    let plan = match plan_one(st, &inst, name) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let id = st.new_change(
        &format!("{}-snap", inst.action),
        &plan.summary,
        plan.tasks,
        vec![name.to_string()],
        Some(json!({"snap-names": [name]})),
        plan.effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

pub(super) fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn post_snaps(st: &mut State, req: &Req) -> Reply {
    // Like snapd: JSON bodies must say so (multipart would be a sideload).
    let media = req.content_type.split(';').next().unwrap_or("").trim();
    if media.is_empty() {
        return bad_request("cannot parse content type: mime: no media type");
    }
    if media != "application/json" {
        return bad_request(format!("unknown content type: {}", req.content_type));
    }
    let inst = match parse_instruction(&req.body) {
        Ok(i) => i,
        Err(r) => return r,
    };
    if inst.channel.is_some() || inst.revision.is_some() {
        return bad_request("unsupported option provided for multi-snap operation");
    }
    let names = inst.snaps.clone();
    let (summary, affected, plans, result) = match inst.action.as_str() {
        "install" => {
            if names.is_empty() {
                return bad_request("cannot install zero snaps");
            }
            let mut plans = Vec::new();
            for n in &names {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if names.len() == 1 {
                plans[0].summary.clone()
            } else {
                format!("Install snaps {}", quoted(&names))
            };
            (summary, names.clone(), plans, Value::Null)
        }
        "refresh" => {
            for n in &names {
                if !st.snaps.contains_key(n) {
                    return not_installed(n);
                }
            }
            let candidates: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let mut plans = Vec::new();
            let mut updated = Vec::new();
            for n in &candidates {
                if let Ok(p) = plan_one(st, &inst, n) {
                    plans.push(p);
                    updated.push(n.clone());
                }
            }
            let summary = match updated.len() {
                0 if names.is_empty() => "Refresh all snaps: no updates".to_string(),
                0 => format!("Refresh snaps {}: no updates", quoted(&names)),
                1 => format!("Refresh snap \"{}\"", updated[0]),
                _ => format!("Refresh snaps {}", quoted(&updated)),
            };
            (summary, updated, plans, Value::Null)
        }
        "remove" => {
            if names.is_empty() {
                return bad_request("cannot remove zero snaps");
            }
            let mut plans = Vec::new();
            for n in &names {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if names.len() == 1 {
                format!("Remove snap \"{}\"", names[0])
            } else {
                format!("Remove snaps {}", quoted(&names))
            };
            (summary, names.clone(), plans, Value::Null)
        }
        "hold" | "unhold" => {
            let targets: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let mut plans = Vec::new();
            for n in &targets {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if inst.action == "hold" {
                format!("Hold refreshes for {}", quoted(&targets))
            } else {
                format!("Remove refresh hold on {}", quoted(&targets))
            };
            for p in &mut plans {
                p.tasks.clear();
            }
            (summary, targets, plans, Value::Null)
        }
        "snapshot" => {
            for n in &names {
                if !st.snaps.contains_key(n) {
                    return not_installed(n);
                }
            }
            let snaps: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let set = st.next_set;
            st.next_set += 1;
            let summary = if names.is_empty() {
                "Snapshot all snaps".to_string()
            } else {
                format!("Snapshot snaps {}", quoted(&names))
            };
            let plan = Plan {
                summary: summary.clone(),
                tasks: snaps
                    .iter()
                    .map(|n| {
                        t(
                            "save-snapshot",
                            format!("Save data of snap \"{n}\" in snapshot set #{set}"),
                        )
                    })
                    .collect(),
                effect: Effect::Snapshot {
                    set,
                    snaps: snaps.clone(),
                },
            };
            (summary, snaps, vec![plan], json!({"set-id": set}))
        }
        other => return bad_request(format!("unsupported multi-snap operation \"{other}\"")),
    };
    let mut tasks = Vec::new();
    let mut effects = Vec::new();
    for p in plans {
        tasks.extend(p.tasks);
        effects.push(p.effect);
    }
    let mut data = Map::new();
    if !affected.is_empty() {
        data.insert("snap-names".into(), json!(affected));
    }
    if let Some(set) = result.get("set-id") {
        data.insert("set-id".into(), set.clone());
    }
    let id = st.new_change(
        &format!("{}-snap", inst.action),
        &summary,
        tasks,
        affected,
        (!data.is_empty()).then_some(Value::Object(data)),
        Effect::Many(effects),
    );
    st.start_change(&id);
    async_reply(&id, result)
}

/// Snaps whose configuration exists without the snap being installed.
pub(super) fn is_system_snap(name: &str) -> bool {
    matches!(name, "core" | "system" | "snapd")
}

pub(super) fn get_conf(st: &mut State, name: &str, req: &Req) -> Reply {
    let conf = st.conf.get(name).cloned().unwrap_or_else(|| json!({}));
    let keys = req.list("keys");
    if keys.is_empty() {
        return sync(conf);
    }
    let mut out = Map::new();
    for k in keys {
        match get_dotted(&conf, &k) {
            Some(v) => {
                out.insert(k, v.clone());
            }
            None => {
                return error(
                    400,
                    format!("snap \"{name}\" has no \"{k}\" configuration option"),
                    Some("option-not-found"),
                    Some(json!({"SnapName": name, "Key": k})),
                )
            }
        }
    }
    sync(Value::Object(out))
}

pub(super) fn put_conf(st: &mut State, name: &str, req: &Req) -> Reply {
    let patch: Map<String, Value> = match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return bad_request(
                "cannot decode request body into patch values: json: cannot unmarshal non-object into Go value of type map[string]interface {}",
            )
        }
        Err(e) => return bad_request(format!("cannot decode request body into patch values: {e}")),
    };
    if !is_system_snap(name) && !st.snaps.contains_key(name) {
        return error(
            404,
            format!("snap \"{name}\" is not installed"),
            Some("snap-not-found"),
            Some(json!(name)),
        );
    }
    let hook_snap = if is_system_snap(name) { "core" } else { name };
    let id = st.new_change(
        "configure-snap",
        &format!("Change configuration of \"{name}\" snap"),
        vec![t(
            "run-hook",
            format!("Run configure hook of \"{hook_snap}\" snap"),
        )],
        vec![name.to_string()],
        None,
        Effect::Conf {
            snap: name.to_string(),
            patch,
        },
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

pub(super) fn get_changes(st: &mut State, req: &Req) -> Reply {
    let select = req.q("select").unwrap_or("in-progress");
    let keep: fn(&Change) -> bool = match select {
        "all" => |_| true,
        "in-progress" => |c| !c.ready(),
        "ready" => |c| c.ready(),
        _ => return bad_request("select should be one of: all,in-progress,ready"),
    };
    let for_snap = req.q("for").filter(|s| !s.is_empty());
    let list: Vec<Value> = st
        .changes
        .iter()
        .filter(|c| keep(c))
        .filter(|c| for_snap.is_none_or(|s| c.snap_names.iter().any(|n| n == s)))
        .map(Change::to_json)
        .collect();
    sync(Value::Array(list))
}

pub(super) fn post_change(st: &mut State, id: &str, req: &Req) -> Reply {
    let action = match serde_json::from_slice::<Value>(&req.body) {
        Ok(v) => v["action"].as_str().unwrap_or("").to_string(),
        Err(e) => return bad_request(format!("cannot decode data from request body: {e}")),
    };
    let Some(ch) = st.changes.iter().find(|c| c.id == id) else {
        return error(
            404,
            format!("cannot find change with id \"{id}\""),
            None,
            None,
        );
    };
    if action != "abort" {
        return bad_request(format!("change action \"{action}\" is unsupported"));
    }
    if ch.ready() {
        return bad_request(format!("cannot abort change {id} with nothing pending"));
    }
    // Tasks not started go to Hold (ready); one already running must be
    // undone first, so the change sits in Abort until the test moves it.
    let next = if ch.tasks.iter().any(|t| t.status == "Doing") || ch.status == "Doing" {
        "Abort"
    } else {
        "Hold"
    };
    st.set_status(id, next, "");
    sync(
        st.changes
            .iter()
            .find(|c| c.id == id)
            .map(Change::to_json)
            .unwrap_or(Value::Null),
    )
}

pub(super) const ASSERTION_TYPES: &[&str] = &[
    "account",
    "account-key",
    "account-key-request",
    "base-declaration",
    "device-session-request",
    "model",
    "preseed",
    "repair",
    "serial",
    "serial-request",
    "snap-build",
    "snap-declaration",
    "snap-developer",
    "snap-resource-pair",
    "snap-resource-revision",
    "snap-revision",
    "store",
    "system-user",
    "validation",
    "validation-set",
];

pub(super) fn get_assertions(st: &mut State, kind: &str) -> Reply {
    match kind {
        "model" => assertion_reply(&[MODEL_ASSERTION], true),
        // Real snapd with no serial: 200, count 0, empty body.
        "serial" => match &st.serial {
            Some(s) => assertion_reply(&[s], true),
            None => assertion_reply(&[], true),
        },
        k if ASSERTION_TYPES.contains(&k) => assertion_reply(&[], true),
        other => bad_request(format!("invalid assert type: \"{other}\"")),
    }
}

pub(super) fn post_assertions(st: &mut State, req: &Req) -> Reply {
    let text = String::from_utf8_lossy(&req.body).into_owned();
    if text.is_empty() {
        return bad_request("cannot decode request body into assertions: unexpected EOF");
    }
    if !text.starts_with("type: ") {
        return bad_request(
            "cannot decode request body into assertions: assertion content/signature separator not found",
        );
    }
    if text.starts_with("type: serial\n") {
        st.serial = Some(text.trim_end().to_string());
    }
    st.added_assertions.push(text);
    sync(Value::Null)
}

/// The model's headers as `GET /v2/model?json=true` gives them.
pub(super) fn model_headers() -> Value {
    let snap = |name: &str, id: &str, kind: &str, channel: &str| json!({"default-channel": channel, "id": id, "name": name, "type": kind});
    json!({
        "architecture": "amd64",
        "authority-id": "canonical",
        "base": "core24",
        "brand-id": "canonical",
        "grade": "signed",
        "model": "ubuntu-core-24-amd64",
        "series": "16",
        "sign-key-sha3-384": "9tydnLa6MTJ-jaQTFUXEwHl1yRx7ZS4K5cyFDhYDcPzhS7uyEkDxdUjg9g08BtNn",
        "snaps": [
            snap("pc", "UqFziVZDHLSyO3TqSWgNBoAdHbLI4dAH", "gadget", "24/stable"),
            snap("pc-kernel", "pYVQrBcKmBa0mZ4CCN7ExT6jH8rY1hza", "kernel", "24/stable"),
            snap("core24", "dwTAh7MZZ01zyriOZErqd1JynQLiOGvM", "base", "latest/stable"),
            snap("snapd", "PMrrV4ml8uWuEUDBT8dSGnKUYbevVhc4", "snapd", "latest/stable"),
        ],
        "timestamp": "2024-04-19T12:00:00+00:00",
        "type": "model"
    })
}

/// Headers of a flat assertion (like a serial): `key: value` lines, with a
/// `key:` followed by indented lines becoming one newline-joined string.
pub(super) fn simple_headers(text: &str) -> Value {
    let mut out = Map::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with(' ') {
            if let Some(k) = &current {
                if let Some(Value::String(s)) = out.get_mut(k) {
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.insert(k.to_string(), json!(v.trim()));
            current = Some(k.to_string());
        }
    }
    Value::Object(out)
}

/// Resolves `names` (`snap` or `snap.app`) to apps, as `GET /v2/apps` and
/// `/v2/logs` do; an uninstalled snap is a 404 `snap-not-found`.
pub(super) fn resolve_apps(
    st: &State,
    names: &[String],
    services_only: bool,
) -> Result<Vec<(String, App)>, Reply> {
    let mut out = Vec::new();
    let all: Vec<String> = if names.is_empty() {
        st.snaps.keys().cloned().collect()
    } else {
        names.to_vec()
    };
    for n in &all {
        let (snap, app) = match n.split_once('.') {
            Some((s, a)) => (s, Some(a)),
            None => (n.as_str(), None),
        };
        let Some(s) = st.snaps.get(snap) else {
            return Err(error(
                404,
                format!("snap \"{snap}\" not found"),
                Some("snap-not-found"),
                Some(json!(snap)),
            ));
        };
        for a in &s.apps {
            if app.is_some_and(|x| x != a.name) || (services_only && a.daemon.is_none()) {
                continue;
            }
            if !out
                .iter()
                .any(|(sn, x): &(String, App)| *sn == s.name && x.name == a.name)
            {
                out.push((s.name.clone(), a.clone()));
            }
        }
    }
    Ok(out)
}

pub(super) fn no_matching(services: bool) -> Reply {
    error(
        404,
        if services {
            "no matching services"
        } else {
            "no matching apps"
        },
        Some("app-not-found"),
        None,
    )
}

pub(super) fn get_apps(st: &mut State, req: &Req) -> Reply {
    let services = match req.q("select") {
        None | Some("") => false,
        Some("service") => true,
        Some(other) => return bad_request(format!("invalid select parameter: \"{other}\"")),
    };
    let names = req.list("names");
    let apps = match resolve_apps(st, &names, services) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if apps.is_empty() && !names.is_empty() {
        return no_matching(services);
    }
    sync(Value::Array(
        apps.iter().map(|(s, a)| a.to_json(s)).collect(),
    ))
}

pub(super) fn post_apps(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into service operation: {e}"
            ))
        }
    };
    let action = v["action"].as_str().unwrap_or("").to_string();
    if !matches!(action.as_str(), "start" | "stop" | "restart") {
        return bad_request(format!("unknown action \"{action}\""));
    }
    let names: Vec<String> = v["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return bad_request("cannot perform operation on services without a list of services");
    }
    let apps = match resolve_apps(st, &names, true) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if apps.is_empty() {
        return no_matching(true);
    }
    let mut snap_names: Vec<String> = apps.iter().map(|(s, _)| s.clone()).collect();
    snap_names.dedup();
    let mut tasks = Vec::new();
    for snap in &snap_names {
        let svc: Vec<String> = apps
            .iter()
            .filter(|(s, _)| s == snap)
            .map(|(_, a)| format!("\"{}\"", a.name))
            .collect();
        tasks.push(t(
            "service-control",
            format!(
                "Run service command \"{action}\" for services [{}] of snap \"{snap}\"",
                svc.join(" ")
            ),
        ));
    }
    let id = st.new_change(
        "service-control",
        "Running service command",
        tasks,
        snap_names,
        None,
        Effect::Services {
            action,
            apps: apps
                .iter()
                .map(|(s, a)| (s.clone(), a.name.clone()))
                .collect(),
            enable: v["enable"].as_bool().unwrap_or(false),
            disable: v["disable"].as_bool().unwrap_or(false),
        },
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

pub(super) fn get_logs(st: &mut State, req: &Req) -> Reply {
    let names = req.list("names");
    let apps = match resolve_apps(st, &names, true) {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Real snapd: no services at all (or none matching) is a 404.
    if apps.is_empty() {
        return no_matching(true);
    }
    let n: i64 = req.q("n").and_then(|n| n.parse().ok()).unwrap_or(10);
    let mut records: Vec<(u128, String, String)> = Vec::new();
    for (snap, app) in &apps {
        let sid = format!("{snap}.{}", app.name);
        let mine: Vec<_> = st
            .logs
            .iter()
            .filter(|(_, s, _)| *s == sid)
            .cloned()
            .collect();
        if mine.is_empty() {
            let base = st.now();
            for i in 0..3u128 {
                records.push((
                    base + i,
                    sid.clone(),
                    format!("{sid} synthetic log line {}", i + 1),
                ));
            }
        } else {
            records.extend(mine);
        }
    }
    records.sort_by_key(|r| r.0);
    if n >= 0 {
        let skip = records.len().saturating_sub(n as usize);
        records.drain(..skip);
    }
    let mut body = Vec::new();
    for (i, (time, sid, message)) in records.iter().enumerate() {
        body.push(0x1e);
        let rec = json!({
            "timestamp": rfc3339(*time),
            "message": message,
            "sid": sid,
            "pid": (1000 + i).to_string()
        });
        body.extend(serde_json::to_vec(&rec).expect("JSON"));
        body.push(b'\n');
    }
    Reply {
        status: 200,
        content_type: "application/json-seq",
        headers: Vec::new(),
        body,
    }
}

pub(super) fn snapshot_json(set: &SnapshotSet) -> Value {
    let snapshots: Vec<Value> = set
        .snaps
        .iter()
        .map(|(name, version, revision)| {
            json!({
                "set": set.id,
                "time": rfc3339(set.time),
                "snap": name,
                "revision": revision,
                "snap-id": snap_id(name),
                "epoch": {"read": [0], "write": [0]},
                "summary": "",
                "version": version,
                "sha3-384": {"archive.tgz": format!("{:096x}", set.id)},
                "size": 4096,
                "auto": false
            })
        })
        .collect();
    json!({"id": set.id, "snapshots": snapshots})
}

pub(super) fn get_snapshots(st: &mut State, req: &Req) -> Reply {
    let want_set: Option<u64> = req.q("set").and_then(|s| s.parse().ok());
    let want_snaps = req.list("snaps");
    let list: Vec<Value> = st
        .snapshots
        .iter()
        .filter(|s| want_set.is_none_or(|w| w == s.id))
        .map(|s| {
            let mut s = s.clone();
            if !want_snaps.is_empty() {
                s.snaps.retain(|(n, _, _)| want_snaps.contains(n));
            }
            s
        })
        .filter(|s| !s.snaps.is_empty())
        .map(|s| snapshot_json(&s))
        .collect();
    sync(Value::Array(list))
}

/// `POST /v2/snapshots` acts on existing sets (check, restore, forget).
/// Creating one is `POST /v2/snaps {"action":"snapshot"}`: real snapd
/// answers a `snapshot` action here with "requires snapshot set ID".
pub(super) fn post_snapshots(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into snapshot operation: {e}"
            ))
        }
    };
    let set = v["set"].as_u64().unwrap_or(0);
    if set == 0 {
        return bad_request("snapshot operation requires snapshot set ID");
    }
    let action = v["action"].as_str().unwrap_or("").to_string();
    let (kind, verb) = match action.as_str() {
        "check" => ("check-snapshot", "Check"),
        "restore" => ("restore-snapshot", "Restore"),
        "forget" => ("forget-snapshot", "Forget"),
        other => return bad_request(format!("unknown snapshot operation \"{other}\"")),
    };
    let Some(found) = st.snapshots.iter().find(|s| s.id == set).cloned() else {
        return error(404, format!("no snapshot data found for {set}"), None, None);
    };
    let names: Vec<String> = found.snaps.iter().map(|(n, _, _)| n.clone()).collect();
    let tasks = names
        .iter()
        .map(|n| {
            t(
                kind,
                format!("{verb} data of snap \"{n}\" in snapshot set #{set}"),
            )
        })
        .collect();
    let effect = if action == "forget" {
        Effect::ForgetSnapshot(set)
    } else {
        Effect::None
    };
    let id = st.new_change(
        &format!("{action}-snapshot"),
        &format!("{verb} snapshot set #{set}"),
        tasks,
        names.clone(),
        Some(json!({"snap-names": names})),
        effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

pub(super) fn export_snapshot(st: &mut State, set: &str) -> Reply {
    let Ok(id) = set.parse::<u64>() else {
        return bad_request(format!("'{set}' is not a valid snapshot set ID"));
    };
    let Some(found) = st.snapshots.iter().find(|s| s.id == id) else {
        return bad_request(format!(
            "cannot export {id}: no snapshot data found for {id}"
        ));
    };
    let meta = serde_json::to_vec(&snapshot_json(found)).expect("JSON");
    let mtime = (found.time / 1_000_000_000) as u64;
    let mut body = Vec::new();
    tar_entry(&mut body, "export.json", &meta, mtime);
    body.extend_from_slice(&[0u8; 1024]);
    Reply {
        status: 200,
        content_type: "application/x.snapshot",
        headers: Vec::new(),
        body,
    }
}

pub(super) fn conn_json(conns: &[Connection]) -> Value {
    let established: Vec<Value> = conns
        .iter()
        .map(|c| {
            json!({
                "slot": {"snap": c.slot_snap, "slot": c.slot},
                "plug": {"snap": c.plug_snap, "plug": c.plug},
                "interface": c.plug,
                "manual": true
            })
        })
        .collect();
    let plugs: Vec<Value> = conns
        .iter()
        .map(|c| json!({"snap": c.plug_snap, "plug": c.plug, "interface": c.plug, "connections": [{"snap": c.slot_snap, "slot": c.slot}]}))
        .collect();
    let slots: Vec<Value> = conns
        .iter()
        .map(|c| json!({"snap": c.slot_snap, "slot": c.slot, "interface": c.plug, "connections": [{"snap": c.plug_snap, "plug": c.plug}]}))
        .collect();
    json!({"established": established, "plugs": plugs, "slots": slots})
}

pub(super) fn get_connections(st: &mut State) -> Reply {
    sync(conn_json(&st.connections))
}

pub(super) fn get_interfaces(st: &mut State, req: &Req) -> Reply {
    match req.q("select") {
        // Legacy form: plugs and slots, both omitted when empty.
        None | Some("") => {
            let mut v = conn_json(&st.connections);
            let mut out = Map::new();
            for k in ["plugs", "slots"] {
                if v[k].as_array().is_some_and(|a| !a.is_empty()) {
                    out.insert(k.to_string(), v[k].take());
                }
            }
            sync(Value::Object(out))
        }
        Some("all") | Some("connected") => {
            let mut names: Vec<String> = st.connections.iter().map(|c| c.plug.clone()).collect();
            names.sort();
            names.dedup();
            sync(Value::Array(
                names
                    .iter()
                    .map(|n| json!({"name": n, "summary": format!("allows {n}")}))
                    .collect(),
            ))
        }
        Some(other) => bad_request(format!("unsupported select qualifier: \"{other}\"")),
    }
}

pub(super) fn post_interfaces(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into an interface action: {e}"
            ))
        }
    };
    let action = v["action"].as_str().unwrap_or("").to_string();
    if !matches!(action.as_str(), "connect" | "disconnect") {
        return bad_request(format!("unsupported interface action: \"{action}\""));
    }
    let plugs = v["plugs"].as_array().cloned().unwrap_or_default();
    let slots = v["slots"].as_array().cloned().unwrap_or_default();
    if plugs.is_empty() || slots.is_empty() {
        return bad_request("at least one plug and slot is required");
    }
    if plugs.len() > 1 || slots.len() > 1 {
        return error(
            501,
            "many-to-many operations are not implemented",
            None,
            None,
        );
    }
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut c = Connection {
        plug_snap: s(&plugs[0], "snap"),
        plug: s(&plugs[0], "plug"),
        slot_snap: s(&slots[0], "snap"),
        slot: s(&slots[0], "slot"),
    };
    if c.slot_snap.is_empty() || is_system_snap(&c.slot_snap) {
        c.slot_snap = "snapd".into();
    }
    if c.slot.is_empty() {
        c.slot = c.plug.clone();
    }
    for snap in [&c.plug_snap, &c.slot_snap] {
        if snap != "snapd" && !st.snaps.contains_key(snap) {
            return bad_request(format!("snap \"{snap}\" is not installed"));
        }
    }
    let label = format!(
        "{}:{} {} {}:{}",
        c.plug_snap,
        c.plug,
        if action == "connect" { "to" } else { "from" },
        c.slot_snap,
        c.slot
    );
    let (summary, effect) = if action == "connect" {
        (format!("Connect {label}"), Effect::Connect(c.clone()))
    } else {
        if !st.connections.contains(&c) {
            return bad_request(format!(
                "cannot disconnect {}:{} from {}:{}, it is not connected",
                c.plug_snap, c.plug, c.slot_snap, c.slot
            ));
        }
        (format!("Disconnect {label}"), Effect::Disconnect(c.clone()))
    };
    let id = st.new_change(
        &format!("{action}-snap"),
        &summary,
        vec![t(&action, summary.clone())],
        vec![c.plug_snap.clone(), c.slot_snap.clone()],
        None,
        effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

pub(super) fn post_users(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode user action data from request body: {e}"
            ))
        }
    };
    match v["action"].as_str().unwrap_or("") {
        "create" => {
            let email = v["email"].as_str().unwrap_or("").to_string();
            if email.is_empty() {
                return bad_request("cannot create user: 'email' field is empty");
            }
            let username: String = email
                .split('@')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
                .to_ascii_lowercase();
            if st.users.iter().any(|u| u["username"] == username.as_str()) {
                return bad_request(format!(
                    "cannot create user {username}: user already exists"
                ));
            }
            let user = json!({"id": st.users.len() + 1, "username": username, "email": email});
            st.users.push(user.clone());
            sync(json!([user]))
        }
        "remove" => {
            let username = v["username"].as_str().unwrap_or("");
            if username.is_empty() {
                return bad_request("need a username to remove");
            }
            let Some(pos) = st.users.iter().position(|u| u["username"] == username) else {
                return bad_request(format!("user \"{username}\" is not known"));
            };
            let user = st.users.remove(pos);
            sync(json!({"removed": [user]}))
        }
        "" => bad_request("missing user action"),
        other => bad_request(format!("unsupported user action \"{other}\"")),
    }
}

pub(super) fn post_systems(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into system action: {e}"
            ))
        }
    };
    match v["action"].as_str().unwrap_or("") {
        "reboot" => {
            st.reboots += 1;
            json_reply(
                200,
                json!({
                    "type": "sync", "status-code": 200, "status": "OK", "result": null,
                    "maintenance": {"message": "system is restarting", "kind": "system-restart", "value": {"op": "reboot"}}
                }),
            )
        }
        other => bad_request(format!("unsupported action \"{other}\"")),
    }
}

/// `GET /v2/notices?types=change-update&after=T&timeout=30s`: the notices
/// after `after`; with none and a `timeout`, waits for the next one (the
/// long poll newer snapd offers) without holding the state lock.
pub(super) async fn get_notices(state: &Arc<Mutex<State>>, req: &Req) -> Reply {
    let types = req.list("types");
    let after = match req.q("after").filter(|s| !s.is_empty()) {
        None => 0,
        Some(a) => match parse_rfc3339(a) {
            Some(t) => t,
            None => return bad_request(format!("invalid \"after\" timestamp: \"{a}\"")),
        },
    };
    let timeout = match req.q("timeout").filter(|s| !s.is_empty()) {
        None => Duration::ZERO,
        Some(s) => match parse_go_duration(s) {
            Some(d) => d,
            None => return bad_request(format!("invalid timeout: \"{s}\"")),
        },
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let notify = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .notify
        .clone();
    loop {
        // Register for the wake-up before looking, so a notice recorded
        // between the look and the wait is not missed.
        let mut notified = std::pin::pin!(notify.notified());
        notified.as_mut().enable();
        let list = {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            let mut list: Vec<&Notice> = st
                .notices
                .iter()
                .filter(|n| n.last > after)
                .filter(|_| types.is_empty() || types.iter().any(|t| t == "change-update"))
                .collect();
            list.sort_by_key(|n| n.last);
            let json: Vec<Value> = list
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "user-id": null,
                        "type": "change-update",
                        "key": n.key,
                        "first-occurred": rfc3339(n.first),
                        "last-occurred": rfc3339(n.last),
                        "last-repeated": rfc3339(n.last),
                        "occurrences": n.occurrences,
                        "last-data": {"kind": n.kind},
                        "expire-after": "168h0m0s"
                    })
                })
                .collect();
            json
        };
        if !list.is_empty() || tokio::time::Instant::now() >= deadline {
            return sync(Value::Array(list));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

pub(super) fn parse_query(q: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}
