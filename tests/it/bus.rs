//! The bus against a real nats-server with authorization.

use crate::common::servers::{NatsConfig, NatsServer, NatsUser};
use bytes::Bytes;
use iot_agent::bus::{topics, Nats, Topic};
use std::time::Duration;

/// Sends a request until it is answered (the connection is established in
/// the background), bounded.
async fn request_until_answered(bus: &Nats, topic: &Topic, payload: &'static [u8]) -> Bytes {
    for _ in 0..100 {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            bus.request(topic, Bytes::from_static(payload)),
        )
        .await;
        if let Ok(Ok(answer)) = r {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no answer on {topic}");
}

fn echo(bus: Nats, mut sub: iot_agent::bus::Subscription) {
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&m.payload);
            reply.extend_from_slice(m.topic.mqtt().as_bytes());
            let _ = bus.reply(&m, reply.into()).await;
        }
    });
}

#[tokio::test]
async fn request_reply_over_topics_with_user_and_password() {
    let server = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "s3cret")],
        ..Default::default()
    });
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&server.url(), "s3cret"),
        "test",
    )
    .await
    .unwrap();
    let sub = bus
        .subscribe(&Topic::fixed("devices/actions/+/#"))
        .await
        .unwrap();
    echo(bus.clone(), sub);
    let topic = topics::serial_actions("A1/B2")
        .unwrap()
        .join(&["required-install"])
        .unwrap();
    let answer = request_until_answered(&bus, &topic, b"x").await;
    // The subscriber saw the MQTT form of the NATS subject it matched.
    assert_eq!(&answer[..], b"echo:xdevices/actions/A1B2/required-install");
    assert!(bus.is_connected());
}

#[tokio::test]
async fn subscriptions_survive_a_server_restart() {
    let mut server = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "pw")],
        ..Default::default()
    });
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&server.url(), "pw"),
        "test",
    )
    .await
    .unwrap();
    let topic = Topic::fixed("snapd/v2/system-info/get");
    echo(bus.clone(), bus.subscribe(&topic).await.unwrap());
    request_until_answered(&bus, &topic, b"1").await;

    server.stop();
    server.restart();
    let answer = request_until_answered(&bus, &topic, b"2").await;
    assert!(answer.starts_with(b"echo:2"));
}

#[tokio::test]
async fn a_wrong_password_never_connects_and_does_not_fail_start() {
    let server = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "right")],
        ..Default::default()
    });
    // connect returns at once: the agent starts and retries in the background.
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&server.url(), "wrong"),
        "test",
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        bus.request(&Topic::fixed("x"), Bytes::new()),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "an unauthenticated client got an answer"
    );
    assert!(!bus.is_connected());
}
