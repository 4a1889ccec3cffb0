//! Past one broker (docs/scale.md): the agent against a two-node NATS
//! cluster, given both nodes in `nats.url`, keeps serving the snapd mirror
//! when the node it is connected to dies (kill -9).

use crate::common::agent_proc::AgentProcess;
use crate::common::servers::{free_port, NatsCluster, NatsConfig, NatsServer, NatsUser};
use crate::common::snapd_double::SnapdDouble;
use serde_json::Value;
use std::time::{Duration, Instant};

const PASSWORD: &str = "cluster-test-password";
/// Bound on each wait (not a timing assertion: a healthy run takes well
/// under a second for each).
const WAIT: Duration = Duration::from_secs(30);

fn node(port: u16, other: u16) -> NatsServer {
    NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        cluster: Some(NatsCluster {
            name: "agents".into(),
            port,
            routes: vec![other],
        }),
        monitor: true,
        ..Default::default()
    })
}

/// Asks the mirror for snapd's system info through `client` until it
/// answers (bounded): the answer is snapd's `sync` envelope.
async fn mirrored(client: &async_nats::Client) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("snapd.v2.system-info.get", "".into()),
        )
        .await;
        if let Ok(Ok(m)) = answer {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["type"] == "sync" {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the mirror did not answer through the cluster within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect(node: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password("snapd".into(), PASSWORD.into())
        .connect(node.url())
        .await
        .unwrap()
}

/// Which of the nodes the agent's connection is on (polled: the agent
/// connects in the background).
fn agent_node(nodes: &[&NatsServer]) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(i) = nodes.iter().position(|n| n.has_client("iot-agent")) {
            return i;
        }
        assert!(Instant::now() < deadline, "the agent is on no node");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_serving_through_the_other_node_when_its_nats_node_is_killed() {
    let (route_a, route_b) = (free_port(), free_port());
    let mut a = node(route_a, route_b);
    let mut b = node(route_b, route_a);
    let snapd = SnapdDouble::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.path().join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.path().join("common").display().to_string(),
        ),
        // Nothing listens there: enrollment waits and retries quietly.
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            snapd.socket().display().to_string(),
        ),
        // Both nodes, as docs/scale.md configures a device.
        ("IOT_AGENT_NATS__URL", format!("{},{}", a.url(), b.url())),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", PASSWORD.into()),
    ];
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("connected to NATS");

    // async-nats picks a node at random among the listed ones: find it.
    let on = agent_node(&[&a, &b]);
    let (victim, survivor) = if on == 0 { (&mut a, &b) } else { (&mut b, &a) };
    // A client of the other node reaches the agent through the route.
    let client = connect(survivor).await;
    mirrored(&client).await;

    victim.stop();
    // The agent reconnects to the survivor and serves again, without a
    // restart; the client never changed nodes.
    agent.wait_for("disconnected from NATS");
    let v = mirrored(&client).await;
    assert_eq!(v["status-code"], 200, "{v}");
    assert!(
        survivor.has_client("iot-agent"),
        "the agent is connected to the surviving node"
    );
    assert_eq!(agent.count("panicked"), 0, "{:?}", agent.seen);

    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}
