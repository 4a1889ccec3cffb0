//! An MQTT client for tests (the DMS side, or an app of nats-server's MQTT
//! listener): its event loop runs in a task and received publishes arrive
//! on a channel.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::sync::mpsc;

pub struct TestMqtt {
    pub client: AsyncClient,
    /// `(topic, payload)` of every message received.
    pub messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

/// Connects, subscribes to `topics` at QoS 1 and returns once the broker
/// acknowledged every subscription (bounded wait).
pub async fn connect_and_subscribe(opts: MqttOptions, topics: &[&str]) -> TestMqtt {
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // As the agent's driver: no Nagle delay on small packets (a test or a
    // benchmark would otherwise wait some 40 ms on the broker's delayed ACK).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, messages) = mpsc::unbounded_channel();
    let (acked_tx, mut acked) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = acked_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    for t in topics {
        client.subscribe(*t, QoS::AtLeastOnce).await.unwrap();
    }
    for t in topics {
        tokio::time::timeout(Duration::from_secs(20), acked.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {t}"));
    }
    TestMqtt { client, messages }
}
