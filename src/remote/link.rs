//! A connection to a device's broker, as the operator's side uses it:
//! requests with answers, publishes, subscriptions. NATS has request/reply;
//! on MQTT a request names a `reply-to` token and the answer comes on
//! `{root}/reply/{token}`.

use crate::bus::{topics, Topic};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;

/// Bound on one request's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a device is, parsed from its name on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// `nats://host:port` or `tls://host:port`.
    Nats {
        /// The server URL as given.
        url: String,
    },
    /// `mqtt://host:port/DEVICE` or `mqtts://host:port/DEVICE`.
    Mqtt {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// TLS.
        tls: bool,
        /// The device id (its DMS topics).
        device: String,
    },
}

impl Device {
    /// Parses `nats://HOST:PORT` or `mqtt[s]://HOST:PORT/DEVICE_ID`.
    pub fn parse(s: &str) -> Result<Device, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("{s:?}: name a device as nats://HOST:PORT or mqtt://HOST:PORT/DEVICE_ID")
        })?;
        match scheme {
            "nats" | "tls" => Ok(Device::Nats { url: s.to_string() }),
            "mqtt" | "mqtts" => {
                let (addr, device) = rest.split_once('/').ok_or_else(|| {
                    format!("{s:?}: the device id follows the address: mqtt://HOST:PORT/DEVICE_ID")
                })?;
                topics::segment(device).map_err(|e| e.to_string())?;
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{s:?}: the address needs a port"))?;
                let port = port
                    .parse()
                    .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
                Ok(Device::Mqtt {
                    host: host.to_string(),
                    port,
                    tls: scheme == "mqtts",
                    device: device.to_string(),
                })
            }
            other => Err(format!(
                "{other}:// is not a device address (nats://, tls://, mqtt://, mqtts://)"
            )),
        }
    }

    /// The terminal service's root for this device.
    pub fn terminal_root(&self) -> Topic {
        match self {
            Device::Nats { .. } => Topic::fixed(topics::TERMINAL),
            Device::Mqtt { device, .. } => {
                topics::dms_terminal(device).expect("checked when parsed")
            }
        }
    }

    /// The browser service's root for this device.
    pub fn browser_root(&self) -> Topic {
        match self {
            Device::Nats { .. } => Topic::fixed(topics::BROWSER),
            Device::Mqtt { device, .. } => {
                topics::dms_browser(device).expect("checked when parsed")
            }
        }
    }
}

/// A connection to the device's broker.
#[derive(Clone)]
pub enum Link {
    /// NATS.
    Nats(async_nats::Client),
    /// MQTT.
    Mqtt(mqtt::MqttLinkClient),
}

/// Messages of one subscription.
pub struct Messages {
    rx: mpsc::UnboundedReceiver<(Topic, Bytes)>,
    _task: Option<tokio::task::JoinHandle<()>>,
    _mqtt: Option<mqtt::Unsubscribe>,
}

impl Messages {
    /// The next message.
    pub async fn next(&mut self) -> Option<(Topic, Bytes)> {
        self.rx.recv().await
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        if let Some(t) = &self._task {
            t.abort();
        }
    }
}

impl Link {
    /// Connects as `user` / `password` (empty user: none).
    pub async fn connect(device: &Device, user: &str, password: &str) -> Result<Link, String> {
        Link::connect_with(device, user, password, &TlsFiles::default()).await
    }

    /// [`Link::connect`] with a CA and client certificate for `mqtts://`.
    pub async fn connect_with(
        device: &Device,
        user: &str,
        password: &str,
        files: &TlsFiles,
    ) -> Result<Link, String> {
        match device {
            Device::Nats { url } => {
                let opts = if user.is_empty() {
                    async_nats::ConnectOptions::new()
                } else {
                    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                };
                let c = opts
                    .name("iot-remote")
                    .request_timeout(Some(REQUEST_TIMEOUT))
                    .connect(url.as_str())
                    .await
                    .map_err(|e| format!("cannot connect to {url}: {e}"))?;
                Ok(Link::Nats(c))
            }
            Device::Mqtt {
                host, port, tls, ..
            } => {
                let tls = if *tls {
                    Some(operator_tls(files)?)
                } else {
                    None
                };
                Link::connect_mqtt(host, *port, tls, user, password).await
            }
        }
    }

    /// Connects to an MQTT broker with a TLS configuration of the caller's
    /// (a client certificate, a private CA).
    pub async fn connect_mqtt(
        host: &str,
        port: u16,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        user: &str,
        password: &str,
    ) -> Result<Link, String> {
        Ok(Link::Mqtt(
            mqtt::MqttLinkClient::connect(host, port, tls, user, password).await?,
        ))
    }

    /// Subscribes (before anything is asked that it should see).
    pub async fn subscribe(&self, topic: &Topic) -> Result<Messages, String> {
        match self {
            Link::Nats(c) => {
                let mut sub = c
                    .subscribe(topic.nats())
                    .await
                    .map_err(|e| format!("cannot subscribe to {}: {e}", topic.nats()))?;
                // The subscription is in place on the server once flushed.
                c.flush().await.map_err(|e| e.to_string())?;
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        if tx
                            .send((Topic::from_nats(m.subject.as_str()), m.payload))
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                Ok(Messages {
                    rx,
                    _task: Some(task),
                    _mqtt: None,
                })
            }
            Link::Mqtt(m) => {
                let (rx, unsub) = m.subscribe(topic).await?;
                Ok(Messages {
                    rx,
                    _task: None,
                    _mqtt: Some(unsub),
                })
            }
        }
    }

    /// Publishes.
    pub async fn publish(&self, topic: &Topic, payload: Bytes) -> Result<(), String> {
        match self {
            Link::Nats(c) => c
                .publish(topic.nats(), payload)
                .await
                .map_err(|e| format!("cannot publish on {}: {e}", topic.nats())),
            Link::Mqtt(m) => m.publish(topic, payload).await,
        }
    }

    /// Sends a JSON request under `root` and waits for its answer. On MQTT
    /// the body gets a `reply-to` token, and the answer is read on
    /// `{root}/reply/{token}`.
    pub async fn request(
        &self,
        root: &Topic,
        topic: &Topic,
        mut body: serde_json::Value,
    ) -> Result<Bytes, String> {
        match self {
            Link::Nats(c) => {
                let payload = serde_json::to_vec(&body).expect("JSON");
                let m =
                    c.request(topic.nats(), payload.into())
                        .await
                        .map_err(|e| match e.kind() {
                            async_nats::RequestErrorKind::NoResponders => format!(
                                "nothing answers on {} (is the service enabled on the device, and \
                             may this user publish there?)",
                                topic.nats()
                            ),
                            _ => format!("request on {} failed: {e}", topic.nats()),
                        })?;
                Ok(m.payload)
            }
            Link::Mqtt(m) => {
                let token = reply_token();
                body["reply-to"] = serde_json::Value::String(token.clone());
                let reply = root
                    .join(&[crate::services::terminal::protocol::REPLY, &token])
                    .map_err(|e| e.to_string())?;
                let mut sub = self.subscribe(&reply).await?;
                m.publish(topic, serde_json::to_vec(&body).expect("JSON").into())
                    .await?;
                match tokio::time::timeout(REQUEST_TIMEOUT, sub.next()).await {
                    Ok(Some((_, b))) => Ok(b),
                    Ok(None) => Err("the MQTT connection closed".into()),
                    Err(_) => Err(format!("no answer on {topic} within {REQUEST_TIMEOUT:?}")),
                }
            }
        }
    }
}

/// PEM files for an `mqtts://` broker.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// A CA trusted besides the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate (chain) ...
    pub cert: Option<std::path::PathBuf>,
    /// ... and its key.
    pub key: Option<std::path::PathBuf>,
}

/// The TLS configuration for an `mqtts://` broker: the server verified
/// (chain and name) against the system's roots and `ca`; a client
/// certificate when given.
pub fn operator_tls(files: &TlsFiles) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use crate::tls;
    let mut roots = tls::Roots::new().system();
    if let Some(ca) = &files.ca {
        roots = roots.file(ca, "--ca").map_err(|e| e.to_string())?;
    }
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let pems = match (&files.cert, &files.key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    tls::client_config(
        roots,
        pems.as_ref().map(|(c, k)| tls::ClientCert {
            cert_pem: c,
            key_pem: k,
        }),
        tls::Verify::Full,
        tls::Advice {
            peer: "the MQTT broker",
            ca_key: "--ca",
            verify_key: None,
        },
    )
    .map_err(|e| e.to_string())
}

/// A token for a reply topic nobody else uses.
pub fn reply_token() -> String {
    use rand::Rng;
    let mut b = [0u8; 8];
    rand::rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub mod mqtt {
    //! The operator's MQTT connection: one rumqttc client whose messages
    //! are handed to the subscriptions by topic filter.
    use crate::bus::Topic;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    type Routes = Arc<Mutex<Vec<(u64, String, mpsc::UnboundedSender<(Topic, Bytes)>)>>>;

    /// A connected MQTT client.
    #[derive(Clone)]
    pub struct MqttLinkClient {
        client: rumqttc::AsyncClient,
        routes: Routes,
        next: Arc<std::sync::atomic::AtomicU64>,
        /// Ends when the connection is lost.
        pub lost: tokio_util::sync::CancellationToken,
        suback: Arc<tokio::sync::Notify>,
    }

    /// Removes a subscription's route when dropped.
    pub struct Unsubscribe {
        routes: Routes,
        id: u64,
        client: rumqttc::AsyncClient,
        filter: String,
    }

    impl Drop for Unsubscribe {
        fn drop(&mut self) {
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(id, _, _)| *id != self.id);
            let _ = self.client.try_unsubscribe(self.filter.clone());
        }
    }

    fn matches(filter: &str, topic: &str) -> bool {
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    impl MqttLinkClient {
        /// Connects (clean session; TLS with `tls`) and starts polling.
        pub async fn connect(
            host: &str,
            port: u16,
            tls: Option<Arc<rustls::ClientConfig>>,
            user: &str,
            password: &str,
        ) -> Result<MqttLinkClient, String> {
            let id = format!("iot-remote-{}", super::reply_token());
            let mut opts = rumqttc::MqttOptions::new(id, host, port);
            opts.set_keep_alive(std::time::Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(1024 * 1024, 1024 * 1024);
            if !user.is_empty() {
                opts.set_credentials(user, password);
            }
            if let Some(cfg) = tls {
                opts.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(cfg),
                ));
            }
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 1024);
            let routes: Routes = Default::default();
            let lost = tokio_util::sync::CancellationToken::new();
            let suback = Arc::new(tokio::sync::Notify::new());
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            let (r, l, s) = (routes.clone(), lost.clone(), suback.clone());
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            s.notify_waiters();
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let routes = r.lock().unwrap_or_else(|e| e.into_inner());
                            for (_, f, tx) in routes.iter() {
                                if matches(f, &p.topic) {
                                    let _ = tx.send((Topic::fixed(&p.topic), p.payload.clone()));
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Err(e.to_string()));
                            }
                            l.cancel();
                            return;
                        }
                    }
                }
            });
            ready_rx
                .await
                .map_err(|_| "the MQTT connection ended".to_string())?
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            Ok(MqttLinkClient {
                client,
                routes,
                next: Default::default(),
                lost,
                suback,
            })
        }

        /// Subscribes at QoS 1 and waits for the broker's SubAck.
        pub async fn subscribe(
            &self,
            topic: &Topic,
        ) -> Result<(mpsc::UnboundedReceiver<(Topic, Bytes)>, Unsubscribe), String> {
            let (tx, rx) = mpsc::unbounded_channel();
            let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let filter = topic.mqtt().to_string();
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id, filter.clone(), tx));
            let acked = self.suback.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            self.client
                .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| format!("cannot subscribe to {filter}: {e}"))?;
            tokio::time::timeout(super::REQUEST_TIMEOUT, acked)
                .await
                .map_err(|_| format!("the broker did not grant {filter}"))?;
            Ok((
                rx,
                Unsubscribe {
                    routes: self.routes.clone(),
                    id,
                    client: self.client.clone(),
                    filter,
                },
            ))
        }

        /// Publishes at QoS 1.
        pub async fn publish(&self, topic: &Topic, payload: Bytes) -> Result<(), String> {
            self.client
                .publish(
                    topic.mqtt(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload.to_vec(),
                )
                .await
                .map_err(|e| format!("cannot publish on {topic}: {e}"))
        }
    }
}
