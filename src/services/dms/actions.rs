//! The 21 actions of the DMS contract, each mapped onto the snapd client.

use super::request::{Request, Response};
use super::snaps::{self, Hashes};
use super::upload::Uploader;
use crate::config::DmsProtocol;
use crate::identity::Credentials;
use crate::snapd::{self, Assertion, CreateUser, SnapAction, SnapName, Status};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

/// What to do after the response is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing more.
    Nothing,
    /// Report the change's final status in a second message.
    FollowChange(String),
    /// Wait for the broker to take the reply, then forget the credentials.
    Unregister,
}

/// What the actions need.
#[derive(Clone)]
pub struct Ctx {
    /// snapd, which carries out every action.
    pub snapd: snapd::Client,
    /// The shared change poller: how actions follow the changes they start.
    pub changes: Arc<crate::subsystems::changes::Poller>,
    /// The device's credentials (the device id in replies).
    pub creds: Arc<Credentials>,
    /// Uploads snapshots and logs where an action says.
    pub uploader: Uploader,
    /// Longest wait for a change (snapshots, completion reports).
    pub change_timeout: Duration,
    /// Where snapshot exports are staged before upload.
    pub scratch_dir: std::path::PathBuf,
    /// Which DMS generation: the shape of the `list` reply.
    pub protocol: DmsProtocol,
    /// The hashes of the last list built, for the heartbeat.
    pub hashes: super::heartbeat::HashCache,
}

type ActionResult = Result<(Value, Next), String>;

/// Runs one request; failures become a `success:false` response.
pub async fn execute(ctx: &Ctx, req: &Request) -> (Response, Next) {
    let outcome = match req.action.as_str() {
        "install" | "remove" | "refresh" | "revert" | "enable" | "disable" => {
            snap_action(ctx, req).await
        }
        "switch" => switch(ctx, req).await,
        "start" | "stop" | "restart" => services(ctx, req).await,
        "setconf" => setconf(ctx, req).await,
        "conf" => conf(ctx, req).await,
        "info" => info(ctx, req).await,
        "ack" => ack(ctx, req).await,
        "device" => device(ctx).await.map(|v| (v, Next::Nothing)),
        "list" => return list_reply(ctx, req).await,
        "server" => server(ctx).await,
        "logs" => logs(ctx, req).await,
        "snapshot" => snapshot(ctx, req).await,
        "unregister" => device(ctx).await.map(|v| (v, Next::Unregister)),
        "user" => user(ctx, req).await,
        other => Err(format!("unknown action {other:?}")),
    };
    match outcome {
        Ok((result, next)) => (Response::ok(req, result), next),
        Err(message) => (Response::fail(&req.id, &req.action, message), Next::Nothing),
    }
}

fn snap_name(req: &Request) -> Result<SnapName, String> {
    if req.snap.is_empty() {
        return Err(format!(
            "action {} needs a snap name in the snap field",
            req.action
        ));
    }
    SnapName::parse(&req.snap).map_err(|e| e.to_string())
}

/// Reads `data` as the JSON an action needs; `example` shows the shape.
fn data_json<T: for<'de> Deserialize<'de>>(req: &Request, example: &str) -> Result<T, String> {
    serde_json::from_str(&req.data).map_err(|e| {
        format!(
            "data of action {} must be JSON like {example}: {e}",
            req.action
        )
    })
}

fn snapd_err(e: snapd::Error) -> String {
    e.to_string()
}

async fn snap_action(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let change = ctx
        .snapd
        .snap_action(&name, &SnapAction::new(&req.action))
        .await
        .map_err(snapd_err)?;
    Ok((json!(change), Next::FollowChange(change)))
}

/// The kinds of change snapd makes for each snap action (a refresh onto
/// another channel may be named for the switch).
fn change_kinds(action: &str) -> &'static [&'static str] {
    match action {
        "install" => &["install-snap"],
        "remove" => &["remove-snap"],
        "refresh" => &["refresh-snap"],
        "revert" => &["revert-snap"],
        "enable" => &["enable-snap"],
        "disable" => &["disable-snap"],
        "switch" => &["refresh-snap", "switch-snap", "switch-snap-channel"],
        _ => &[],
    }
}

/// After a restart, the change of an action that was cut short after it
/// was marked `started`: snapd may have taken the request while the agent
/// died before it learned the change id. It is the one change of the
/// action's kind for its snap (`data.snap-names`) spawned from when the
/// action was marked started (less a second for clock steps) until now.
/// `Ok(None)`: snapd shows none. `Err`: why the change cannot be told
/// (several candidates: another client acted on the snap meanwhile; or an
/// action whose change this cannot recognise).
pub fn change_of_started(
    req: &Request,
    started_ms: i64,
    changes: &[snapd::Change],
) -> Result<Option<String>, String> {
    let kinds = change_kinds(&req.action);
    if kinds.is_empty() {
        return Err(format!(
            "the change of a {} action, if snapd made one, cannot be told from others",
            req.action
        ));
    }
    let since_ns = started_ms.saturating_sub(1000).saturating_mul(1_000_000);
    let found: Vec<&snapd::Change> = changes
        .iter()
        .filter(|c| kinds.contains(&c.kind.as_str()))
        .filter(|c| crate::clock::parse_ns(&c.spawn_time).is_some_and(|t| t >= since_ns))
        .filter(|c| {
            c.data
                .as_ref()
                .and_then(|d| d["snap-names"].as_array())
                .is_some_and(|names| names.iter().any(|n| n.as_str() == Some(&req.snap)))
        })
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.id.clone())),
        many => Err(format!(
            "snapd has {} changes for {} since the action started (changes {}), so which is its own cannot be told",
            many.len(),
            req.snap,
            many.iter().map(|c| c.id.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

async fn switch(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let channel = req.data.trim();
    let valid = !channel.is_empty()
        && channel.len() <= 128
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"./-_".contains(&b));
    if !valid {
        return Err(format!(
            "data of action switch must be a channel such as latest/stable, not {:?}",
            req.data
        ));
    }
    // As the reference agent: a refresh onto the channel, so the snap moves
    // now (snapd's own `switch` only changes what it tracks).
    let action = SnapAction::new("refresh").channel(Some(channel.to_string()));
    let change = ctx
        .snapd
        .snap_action(&name, &action)
        .await
        .map_err(snapd_err)?;
    Ok((json!(change), Next::FollowChange(change)))
}

/// `app` or `snap.app` as snapd's `snap.app`; a name of another snap is
/// refused (the DMS sends fully qualified names, the reference agent
/// checked that each belongs to `snap`).
fn qualified_service(snap: &SnapName, given: &str) -> Result<String, String> {
    let invalid = || format!("service name {given:?} is not valid");
    let app = match given.split_once('.') {
        Some((owner, app)) if owner == snap.as_str() => app,
        Some((owner, _)) if SnapName::parse(owner).is_ok() => {
            return Err(format!(
                "service {given:?} belongs to snap {owner:?}, not to {snap}; name services of {snap} only"
            ))
        }
        Some(_) => return Err(invalid()),
        None => given,
    };
    let ok = !app.is_empty()
        && app.len() <= 64
        && app.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return Err(invalid());
    }
    Ok(format!("{snap}.{app}"))
}

#[derive(Deserialize)]
struct ServicesData {
    #[serde(default)]
    services: Vec<String>,
}

async fn services(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let services = if req.data.trim().is_empty() {
        Vec::new()
    } else {
        data_json::<ServicesData>(req, r#"{"services":["daemon"]}"#)?.services
    };
    let mut names = Vec::new();
    for s in &services {
        names.push(qualified_service(&name, s)?);
    }
    if names.is_empty() {
        names.push(name.to_string());
    }
    let change = ctx
        .snapd
        .app_action(&req.action, &names)
        .await
        .map_err(snapd_err)?;
    Ok((json!(change), Next::FollowChange(change)))
}

async fn setconf(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let values: Map<String, Value> = data_json(req, r#"{"key":"value"}"#)?;
    let change = ctx
        .snapd
        .set_conf(&name, &values)
        .await
        .map_err(snapd_err)?;
    Ok((json!(change), Next::FollowChange(change)))
}

/// `conf` and `info` are both answered with the snap as a `deviceSnap`
/// (its configuration in `config`): the DMS decodes both replies so.
async fn conf(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let snap = ctx.snapd.snap(&name).await.map_err(snapd_err)?;
    let conf = ctx.snapd.conf(&name, &[]).await.map_err(snapd_err)?;
    Ok((
        snaps::device_snap(&ctx.creds.device_id, &snap, &conf),
        Next::Nothing,
    ))
}

async fn info(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let snap = ctx.snapd.snap(&name).await.map_err(snapd_err)?;
    let conf = ctx.snapd.conf(&name, &[]).await.unwrap_or_default();
    Ok((
        snaps::device_snap(&ctx.creds.device_id, &snap, &conf),
        Next::Nothing,
    ))
}

async fn ack(ctx: &Ctx, req: &Request) -> ActionResult {
    if req.data.trim().is_empty() {
        return Err("data of action ack must be assertion text".into());
    }
    Assertion::parse_all(&req.data).map_err(|e| format!("data of action ack: {e}"))?;
    ctx.snapd
        .add_assertion(&req.data)
        .await
        .map_err(snapd_err)?;
    Ok((Value::Null, Next::Nothing))
}

/// `{orgId, deviceId, brand, model, serial, store, deviceKey, version:{...}}`.
pub async fn device(ctx: &Ctx) -> Result<Value, String> {
    let first = |text: String| {
        Assertion::parse_all(&text)
            .ok()
            .and_then(|mut v| (!v.is_empty()).then(|| v.remove(0)))
    };
    let model = ctx
        .snapd
        .assertions_text("model", &[])
        .await
        .map_err(snapd_err)?;
    let serial = ctx
        .snapd
        .assertions_text("serial", &[])
        .await
        .map_err(snapd_err)?;
    let (model, serial) = (first(model), first(serial));
    let h = |a: &Option<Assertion>, k: &str| {
        a.as_ref()
            .and_then(|a| a.header(k))
            .unwrap_or("")
            .to_string()
    };
    let info = ctx.snapd.system_info().await.map_err(snapd_err)?;
    let c = &ctx.creds;
    Ok(json!({
        "orgId": c.org_id,
        "deviceId": c.device_id,
        "brand": h(&model, "brand-id"),
        "model": h(&model, "model"),
        "serial": h(&serial, "serial"),
        "store": h(&model, "store"),
        "deviceKey": h(&serial, "device-key"),
        "version": with_device_id(version(&info), &c.device_id),
    }))
}

/// The DMS stores the OS version only when `version.deviceId` is set.
fn with_device_id(mut v: Value, device_id: &str) -> Value {
    v["deviceId"] = json!(device_id);
    v
}

fn version(info: &snapd::SystemInfo) -> Value {
    json!({
        "version": info.version,
        "series": info.series,
        "osId": info.os_release.id,
        "osVersionId": info.os_release.version_id,
        "onClassic": info.on_classic,
        "kernelVersion": info.kernel_version,
    })
}

async fn server(ctx: &Ctx) -> ActionResult {
    let info = ctx.snapd.system_info().await.map_err(snapd_err)?;
    Ok((
        with_device_id(version(&info), &ctx.creds.device_id),
        Next::Nothing,
    ))
}

/// The snap list as `deviceSnap`s, sorted by name (the heartbeat hashes
/// it). The hashes are remembered for the heartbeat.
pub async fn list(ctx: &Ctx) -> Result<Vec<Value>, String> {
    let gen = ctx.hashes.generation();
    let mut all = ctx.snapd.snaps().await.map_err(snapd_err)?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(all.len());
    for s in all {
        // A snap without configuration (or one snapd will not tell) is `{}`.
        let config = match SnapName::parse(&s.name) {
            Ok(n) => ctx.snapd.conf(&n, &[]).await.unwrap_or_default(),
            Err(_) => Map::new(),
        };
        out.push(snaps::device_snap(&ctx.creds.device_id, &s, &config));
    }
    ctx.hashes.store(Hashes::of(&out), gen);
    Ok(out)
}

/// The `list` reply: dmscore's versioned `{"version":"2","result":
/// {snapListHash, installedSnapsHash, snaps}}` (it updates its stored
/// hashes only from this shape), or the original DMS's bare array.
async fn list_reply(ctx: &Ctx, req: &Request) -> (Response, Next) {
    let list = match list(ctx).await {
        Ok(l) => l,
        Err(m) => return (Response::fail(&req.id, &req.action, m), Next::Nothing),
    };
    let resp = match ctx.protocol {
        DmsProtocol::Devicetwin => Response::ok(req, Value::Array(list)),
        DmsProtocol::Dmscore => {
            let h = Hashes::of(&list);
            let mut r = Response::ok(
                req,
                json!({
                    "snapListHash": h.snap_list,
                    "installedSnapsHash": h.installed_snaps,
                    "snaps": list,
                }),
            );
            r.version = Some("2".into());
            r
        }
    };
    (resp, Next::Nothing)
}

#[derive(Deserialize)]
struct LogsData {
    url: String,
    #[serde(default)]
    limit: Option<u32>,
}

/// At most this many journal lines per upload.
const MAX_LOG_LINES: u32 = 100_000;

async fn logs(ctx: &Ctx, req: &Request) -> ActionResult {
    let d: LogsData = data_json(req, r#"{"url":"https://...","limit":100}"#)?;
    super::upload::check_url(&d.url)?;
    let limit = d.limit.unwrap_or(100).clamp(1, MAX_LOG_LINES);
    let entries = ctx.snapd.logs(limit, &[]).await.map_err(snapd_err)?;
    let mut text = String::new();
    for e in &entries {
        text.push_str(&format!(
            "[{}] {} {} {}\n",
            e.timestamp, e.pid, e.sid, e.message
        ));
    }
    let bytes = ctx.uploader.put_bytes(&d.url, text.into()).await?;
    Ok((
        json!({"lines": entries.len(), "bytes": bytes}),
        Next::Nothing,
    ))
}

#[derive(Deserialize)]
struct SnapshotData {
    url: String,
}

async fn snapshot(ctx: &Ctx, req: &Request) -> ActionResult {
    let name = snap_name(req)?;
    let d: SnapshotData = data_json(req, r#"{"url":"https://..."}"#)?;
    // Check the URL before snapd does any work.
    super::upload::check_url(&d.url)?;
    let started = ctx.snapd.snapshot(&[name]).await.map_err(snapd_err)?;
    let change = wait_ready(ctx, &started.change).await?;
    if change.status != Status::Done {
        return Err(format!(
            "snapshot change {} ended {:?}: {}",
            change.id,
            change.status,
            change.err.unwrap_or_default()
        ));
    }
    let set = started
        .set_id
        .or_else(|| change.data.as_ref().and_then(|d| d["set-id"].as_u64()))
        .ok_or("snapd did not say which snapshot set it made")?;
    let staged = stage_export(ctx, set).await?;
    let result = ctx.uploader.put_file(&d.url, staged.path()).await;
    let bytes = result?;
    Ok((json!({"setId": set, "bytes": bytes}), Next::Nothing))
}

/// Writes snapd's export of a set into a temporary file, within the limit.
async fn stage_export(ctx: &Ctx, set: u64) -> Result<tempfile::NamedTempFile, String> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    std::fs::create_dir_all(&ctx.scratch_dir).map_err(|e| {
        format!(
            "cannot stage the export in {}: {e}",
            ctx.scratch_dir.display()
        )
    })?;
    let staged = tempfile::NamedTempFile::new_in(&ctx.scratch_dir).map_err(|e| {
        format!(
            "cannot stage the export in {}: {e}",
            ctx.scratch_dir.display()
        )
    })?;
    let resp = ctx.snapd.export_snapshot(set).await.map_err(snapd_err)?;
    let mut body = http_body_util::BodyStream::new(resp.into_body());
    let mut file = tokio::fs::File::from_std(staged.reopen().map_err(|e| e.to_string())?);
    let mut total = 0u64;
    // A stalled export must not hold the action forever: each read is
    // bounded by the snapd timeout (snapd.timeout).
    let stall = ctx.snapd.timeout();
    loop {
        let Some(frame) = tokio::time::timeout(stall, body.next())
            .await
            .map_err(|_| {
                format!(
                    "snapd's snapshot export sent nothing for {} (snapd.timeout); try again",
                    humantime::format_duration(stall)
                )
            })?
        else {
            break;
        };
        let frame = frame.map_err(|e| format!("snapshot export broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > ctx.uploader.limit {
                return Err(format!(
                    "the snapshot is larger than the upload limit of {} bytes (dms.upload.limit)",
                    ctx.uploader.limit
                ));
            }
            file.write_all(&data).await.map_err(|e| e.to_string())?;
        }
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(staged)
}

#[derive(Deserialize)]
struct UserData {
    action: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    sudoer: bool,
    #[serde(rename = "force-managed", default)]
    force_managed: bool,
    #[serde(default)]
    username: String,
}

async fn user(ctx: &Ctx, req: &Request) -> ActionResult {
    let d: UserData = data_json(
        req,
        r#"{"action":"create","email":"a@b.c","sudoer":false,"force-managed":false,"username":""}"#,
    )?;
    let users = match d.action.as_str() {
        "create" => {
            if d.email.is_empty() && d.username.is_empty() {
                return Err("user create needs an email or a username".into());
            }
            let u = CreateUser {
                email: d.email,
                username: d.username,
                sudoer: d.sudoer,
                force_managed: d.force_managed,
            };
            ctx.snapd.create_user(&u).await.map_err(snapd_err)?
        }
        "remove" => {
            if d.username.is_empty() {
                return Err("user remove needs a username".into());
            }
            ctx.snapd
                .remove_user(&d.username)
                .await
                .map_err(snapd_err)?
        }
        other => {
            return Err(format!(
                "user action must be create or remove, not {other:?}"
            ))
        }
    };
    Ok((
        serde_json::to_value(users).unwrap_or_default(),
        Next::Nothing,
    ))
}

/// Waits for a change to be ready, within the change timeout (through the
/// shared change poller).
pub async fn wait_ready(ctx: &Ctx, id: &str) -> Result<snapd::Change, String> {
    ctx.changes
        .wait_ready(id, ctx.change_timeout)
        .await
        .map_err(|e| format!("{e} (dms.change.timeout)"))
}

/// The second message: the final status of a change an action started.
pub async fn completion(ctx: &Ctx, req: &Request, change_id: &str) -> Response {
    let outcome = wait_ready(ctx, change_id).await;
    super::completion::report(req, outcome.as_ref().map_err(Clone::clone))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, kind: &str, snap: &str, spawn: &str) -> snapd::Change {
        serde_json::from_value(json!({
            "id": id, "kind": kind, "summary": "s", "status": "Doing", "ready": false,
            "spawn-time": spawn, "data": {"snap-names": [snap]}
        }))
        .unwrap()
    }

    fn req(action: &str, snap: &str) -> Request {
        Request {
            id: "a".into(),
            action: action.into(),
            snap: snap.into(),
            data: String::new(),
        }
    }

    #[test]
    fn the_change_of_a_started_action_is_its_kind_for_its_snap_since_it_started() {
        // 2026-11-21T05:00:00Z in Unix milliseconds.
        let started = crate::clock::parse_ns("2026-11-21T05:00:00Z").unwrap() / 1_000_000;
        let changes = vec![
            change("1", "install-snap", "other", "2026-11-21T04:00:00Z"),
            change("2", "remove-snap", "other", "2026-11-21T05:00:01Z"),
            change("3", "install-snap", "third", "2026-11-21T05:00:01Z"),
            change("4", "install-snap", "other", "2026-11-21T05:00:00.2Z"),
        ];
        let install = req("install", "other");
        assert_eq!(
            change_of_started(&install, started, &changes),
            Ok(Some("4".into()))
        );
        assert_eq!(
            change_of_started(&install, started, &changes[..3]),
            Ok(None),
            "an older change of the same kind is not its own"
        );
        let mut two = changes.clone();
        two.push(change("5", "install-snap", "other", "2026-11-21T05:10:00Z"));
        let e = change_of_started(&install, started, &two).unwrap_err();
        assert!(e.contains("4, 5"), "{e}");
        assert_eq!(
            change_of_started(
                &req("switch", "other"),
                started,
                &[change("6", "refresh-snap", "other", "2026-11-21T05:00:03Z")]
            ),
            Ok(Some("6".into()))
        );
        assert!(change_of_started(&req("setconf", "other"), started, &changes).is_err());
    }
}
