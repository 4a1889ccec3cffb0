//! The DMS link under load and faults, against a real mosquitto with
//! persistence on (as a DMS deployment runs it): a burst of thousands of
//! actions, a backlog delivered by the persistent session after the agent
//! was down, SIGKILL in the middle of an action (before and after snapd
//! made its change) and between its answer and its change's end, and broker outages longer than the keep-alive with
//! and without the broker's session.

use super::dms::{setup_on, DmsClient, Setup};
use crate::common::agent_proc::run_once;
use crate::common::identity_double::DEVICE_ID;
use crate::common::servers::Mosquitto;
use crate::common::snapd_double::{ChangeMode, Fault};
use crate::common::tls::TestPki;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

fn responses_topic() -> String {
    format!("devices/pub/{DEVICE_ID}")
}

async fn persistent_setup(extra: &[(&'static str, String)]) -> Setup {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls_persistent(&pki);
    setup_on(pki, broker, extra, "subscribed to DMS actions").await
}

fn request(id: &str, action: &str, snap: &str) -> Vec<u8> {
    json!({"id": id, "action": action, "snap": snap, "data": ""})
        .to_string()
        .into_bytes()
}

/// A completion report (the second message of an action that started a
/// change), as opposed to the action's reply.
fn is_completion(v: &Value) -> bool {
    v["result"].get("change").is_some() && v["result"].get("status").is_some()
}

/// Waits (bounded) until `cond` holds; for state of the doubles.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Collects replies until every id in `ids` has one; returns how many
/// replies each id got and how many heartbeats arrived meanwhile (after
/// the first reply, before the last).
async fn collect(
    s: &mut Setup,
    dms: &mut DmsClient,
    ids: &HashSet<String>,
) -> (HashMap<String, usize>, usize) {
    let mut got: HashMap<String, usize> = HashMap::new();
    let mut heartbeats = 0;
    let health = format!("devices/health/{DEVICE_ID}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ids.iter().any(|id| !got.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some((topic, payload)) = dms.next(left.min(Duration::from_secs(30))).await else {
            eprintln!("only {} of {} actions answered", got.len(), ids.len());
            // Fails with the agent's log.
            s.agent
                .wait_for_within("(the agent's log)", Duration::from_secs(2));
            panic!("only {} of {} actions answered", got.len(), ids.len());
        };
        if topic == health && !got.is_empty() {
            heartbeats += 1;
        }
        if topic != responses_topic() {
            continue;
        }
        let v: Value = serde_json::from_slice(&payload).unwrap();
        let id = v["id"].as_str().unwrap_or("").to_string();
        if ids.contains(&id) && !is_completion(&v) {
            assert_eq!(v["success"], true, "{v}");
            *got.entry(id).or_default() += 1;
        }
    }
    (got, heartbeats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_thousands_of_actions_is_answered_in_full_while_heartbeats_flow() {
    let mut s = persistent_setup(&[("IOT_AGENT_DMS__HEARTBEAT__INTERVAL", "1s".into())]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    const N: usize = 3000;
    let ids: HashSet<String> = (0..N).map(|i| format!("burst-{i}")).collect();
    for id in &ids {
        dms.publish_raw(request(id, "list", "")).await;
    }
    let (got, heartbeats) = collect(&mut s, &mut dms, &ids).await;
    assert_eq!(got.len(), N);
    assert!(
        heartbeats >= 1,
        "no heartbeat while {N} actions were being answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn actions_sent_while_the_agent_is_down_are_answered_once_on_its_return() {
    let mut s = persistent_setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    s.agent.signal("TERM");
    s.agent.wait_exit();
    let mut ids = HashSet::new();
    for i in 0..300 {
        let id = format!("offline-{i}");
        let action = if i % 2 == 0 { "device" } else { "list" };
        dms.publish_raw(request(&id, action, "")).await;
        ids.insert(id);
    }
    dms.publish_raw(request("offline-install", "install", "other"))
        .await;
    ids.insert("offline-install".into());
    s.start_agent_again();
    let (got, _) = collect(&mut s, &mut dms, &ids).await;
    // A round trip after the backlog: anything sent twice has arrived.
    let v = dms.call("sentinel", "device", "", "").await;
    assert_eq!(v["success"], true);
    while let Some((topic, payload)) = dms.next(Duration::from_millis(500)).await {
        let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
        let id = v["id"].as_str().unwrap_or("");
        assert!(
            topic != responses_topic() || !ids.contains(id) || is_completion(&v),
            "answered twice: {v}"
        );
    }
    assert!(got.values().all(|n| *n == 1), "{got:?}");
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_an_action_runs_reports_it_and_never_runs_it_again() {
    let mut s = persistent_setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    // snapd takes the install and does not answer before the kill.
    s.snapd
        .set_fault(Some(Fault::Slow(Duration::from_secs(60))));
    let req = request("cut", "install", "other");
    dms.publish_raw(req.clone()).await;
    let snapd = &s.snapd;
    until("the install to reach snapd", || {
        snapd.posts_to("/v2/snaps/other") == 1
    })
    .await;
    s.agent.signal("KILL");
    s.agent.wait_exit();
    s.snapd.set_fault(None);
    s.start_agent_again();
    let v = dms.response("cut").await;
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not run again"),
        "{v}"
    );
    // The same id again: answered from the ledger, not run.
    dms.publish_raw(req).await;
    let again = dms.response("cut").await;
    assert_eq!(again, v);
    assert_eq!(
        s.snapd.posts_to("/v2/snaps/other"),
        1,
        "the install ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_between_the_answer_and_the_change_end_reports_completion_after_restart() {
    let mut s = persistent_setup(&[]).await;
    s.snapd.set_change_mode(ChangeMode::Manual);
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("k2", "install", "other", "").await;
    let change = v["result"].as_str().unwrap().to_string();
    s.agent.signal("KILL");
    s.agent.wait_exit();
    s.snapd.set_change_status(&change, "Done");
    s.start_agent_again();
    let raw = dms
        .wait(&responses_topic(), |p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["id"] == "k2" && is_completion(&v))
                .unwrap_or(false)
        })
        .await;
    let done: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(done["result"]["change"], change.as_str());
    assert_eq!(done["result"]["status"], "Done");
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_after_snapd_took_the_action_follows_its_change_after_restart() {
    let mut s = persistent_setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    // snapd makes the change at once but answers too late: the agent dies
    // with the action `started` and no change id.
    s.snapd.set_change_mode(ChangeMode::Manual);
    s.snapd
        .set_fault(Some(Fault::LateAnswer(Duration::from_secs(60))));
    dms.publish_raw(request("late", "install", "other")).await;
    let snapd = &s.snapd;
    until("snapd to make the install's change", || {
        snapd.changes().iter().any(|c| c["kind"] == "install-snap")
    })
    .await;
    s.agent.signal("KILL");
    s.agent.wait_exit();
    s.snapd.set_fault(None);
    let change = s
        .snapd
        .changes()
        .iter()
        .find(|c| c["kind"] == "install-snap")
        .and_then(|c| c["id"].as_str().map(str::to_string))
        .unwrap();
    s.start_agent_again();
    // The reply it would have had, then the completion of that change.
    let v = dms.response("late").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"], change.as_str(), "{v}");
    s.snapd.set_change_status(&change, "Done");
    let raw = dms
        .wait(&responses_topic(), |p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["id"] == "late" && is_completion(&v))
                .unwrap_or(false)
        })
        .await;
    let done: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(done["success"], true, "{done}");
    assert_eq!(done["result"]["change"], change.as_str());
    assert_eq!(
        s.snapd.posts_to("/v2/snaps/other"),
        1,
        "the install ran twice"
    );
}

/// Waits until `iot-agent status` reports the DMS link as `connected`.
async fn status_says_connected(s: &Setup, connected: bool) {
    let mut last = Value::Null;
    for _ in 0..100 {
        let out = run_once(&["status", "--json"], &s.env);
        assert!(out.status.success(), "{out:?}");
        last = serde_json::from_slice::<Value>(&out.stdout).unwrap()["dms"].clone();
        if last["connected"] == connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("iot-agent status never said connected={connected}: {last}");
}

/// The broker goes away for longer than the keep-alive while a change is
/// followed, and comes back with its saved sessions or with none.
async fn broker_outage(keep_session: bool) {
    let mut s = persistent_setup(&[("IOT_AGENT_DMS__KEEPALIVE", "2s".into())]).await;
    s.snapd.set_change_mode(ChangeMode::Manual);
    let mut dms = DmsClient::connect_with(&s.pki, s.broker.port(), "dms", false).await;
    let v = dms.call("out-1", "install", "other", "").await;
    let change = v["result"].as_str().unwrap().to_string();
    if keep_session {
        s.broker.terminate();
    } else {
        s.broker.stop();
        s.broker.forget_sessions();
    }
    s.agent.wait_for("DMS broker connection failed");
    status_says_connected(&s, false).await;
    // Longer than the keep-alive (2 s) with the broker gone.
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.broker.restart();
    if !keep_session {
        // The broker forgot the DMS side's subscriptions too.
        dms = DmsClient::connect_with(&s.pki, s.broker.port(), "dms-2", true).await;
    }
    s.agent.wait_for("subscribed to DMS actions");
    s.snapd.set_change_status(&change, "Done");
    let raw = dms
        .wait(&responses_topic(), |p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["id"] == "out-1" && is_completion(&v))
                .unwrap_or(false)
        })
        .await;
    let done: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(done["result"]["status"], "Done", "{done}");
    let v = dms.call("out-2", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
    status_says_connected(&s, true).await;
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_longer_than_keepalive_with_its_session_kept() {
    broker_outage(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_longer_than_keepalive_with_its_session_lost() {
    broker_outage(false).await;
}
