//! The remote browser over a real nats-server: the agent's service
//! in-process, the operator's `iot-remote browse` as a process, a local
//! test web site on the "device", and headless Chromium (Debian's
//! `chromium`) as the operator's browser.

use crate::common::servers::{free_port, NatsConfig, NatsServer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use iot_agent::bus::{topics, Nats, Topic};
use iot_agent::services::browser::protocol::{self, Frame};
use iot_agent::services::browser::{Browser, NatsBrowser, Settings};
use iot_agent::supervisor::{Shutdown, Subsystem};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const EXAMPLE_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/nats-server.conf");
const AGENT_PASSWORD: &str = "change this agent password";
const OPERATOR_PASSWORD: &str = "change this operator password";
const WAIT: Duration = Duration::from_secs(30);
/// The image's colour, looked for in the screenshot.
const PINK: [u8; 3] = [0xff, 0x00, 0x80];

/// What the test site saw: (path, cookie header).
pub(crate) type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// The device's web UI: a start page whose script follows a relative link,
/// a redirect (absolute, to its own origin) that sets a cookie, a final
/// page that shows whether the cookie came back and a relative image, and
/// a large body.
pub(crate) async fn site() -> (u16, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Default::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let cookie = req
                                .headers()
                                .get("cookie")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            s.lock().unwrap().push((path.clone(), cookie.clone()));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut r = hyper::Response::builder();
                            let b: Bytes = match path.as_str() {
                                "/start" => {
                                    r = r.header("content-type", "text/html");
                                    "<html><body><h1>start</h1><a id=l href=\"go/next\">next</a>\
                                 <script>document.getElementById('l').click()</script></body></html>"
                                    .into()
                                }
                                "/go/next" => {
                                    r = r
                                        .status(302)
                                        .header(
                                            "location",
                                            format!("http://127.0.0.1:{port}/final"),
                                        )
                                        .header(
                                            "set-cookie",
                                            "devsession=s3cr3t; Path=/; HttpOnly",
                                        );
                                    Bytes::new()
                                }
                                "/final" => {
                                    r = r.header("content-type", "text/html");
                                    let ok = if cookie.contains("devsession=s3cr3t") {
                                        "cookie ok"
                                    } else {
                                        "cookie missing"
                                    };
                                    format!(
                                    "<html><body style=\"margin:0\"><h1 id=t>Hello from the device: {ok}</h1>\
                                     <img src=\"img/box.svg\" width=\"400\" height=\"300\"></body></html>"
                                )
                                .into()
                                }
                                "/img/box.svg" => {
                                    r = r.header("content-type", "image/svg+xml");
                                    "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"300\">\
                                 <rect width=\"400\" height=\"300\" fill=\"#ff0080\"/></svg>"
                                    .into()
                                }
                                "/big" => (0..3_000_000u32)
                                    .map(|i| (i % 251) as u8)
                                    .collect::<Vec<_>>()
                                    .into(),
                                "/echo" => body,
                                _ => {
                                    r = r.status(404);
                                    "not here".into()
                                }
                            };
                            Ok::<_, std::convert::Infallible>(r.body(Full::new(b)).unwrap())
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (port, seen)
}

struct Rig {
    nats: NatsServer,
    site_port: u16,
    seen: Seen,
    _shutdown: ShutdownOnDrop,
}

struct ShutdownOnDrop(Shutdown);
impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn rig(max_body: u64) -> Rig {
    let nats = NatsServer::start(NatsConfig {
        include: Some(EXAMPLE_CONF.into()),
        ..Default::default()
    });
    let (site_port, seen) = site().await;
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&nats.url(), AGENT_PASSWORD),
        "browser-under-test",
    )
    .await
    .unwrap();
    let browser = Browser::new(Settings {
        allow: vec![format!("127.0.0.1:{site_port}")],
        max_body,
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    let shutdown = Shutdown::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        NatsBrowser { browser, bus }.run(s).await.unwrap();
    });
    let rig = Rig {
        nats,
        site_port,
        seen,
        _shutdown: ShutdownOnDrop(shutdown),
    };
    // Served once a request is answered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(frames) =
            tokio::time::timeout(Duration::from_secs(1), raw(&rig, "GET", "/final", "")).await
        {
            if !frames.is_empty() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser never answered"
        );
    }
    rig
}

/// One request over the wire as the operator user; its frames in order.
async fn raw(rig: &Rig, method: &str, path: &str, origin: &str) -> Vec<Frame> {
    let c = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        OPERATOR_PASSWORD.into(),
    )
    .connect(rig.nats.url())
    .await
    .unwrap();
    let inbox = c.new_inbox();
    let mut sub = c.subscribe(inbox.clone()).await.unwrap();
    let req = protocol::Request {
        origin: origin.into(),
        method: method.into(),
        path: path.into(),
        ..Default::default()
    };
    let subject = Topic::fixed(topics::BROWSER)
        .join(&[protocol::REQUEST])
        .unwrap()
        .nats();
    c.publish_with_reply(subject, inbox, serde_json::to_vec(&req).unwrap().into())
        .await
        .unwrap();
    let mut frames = Vec::new();
    let mut expect = 1;
    use futures::StreamExt;
    loop {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await else {
            return frames;
        };
        let (seq, f) = Frame::decode(&m.payload).unwrap();
        assert_eq!(seq, expect, "frames in order");
        expect += 1;
        let last = f.is_last();
        frames.push(f);
        if last {
            return frames;
        }
    }
}

/// `iot-remote browse` as the operator, on a free port.
struct Proxy {
    child: std::process::Child,
    port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy(rig: &Rig) -> Proxy {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_iot-remote"))
        .args([
            "browse",
            &rig.nats.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("IOT_REMOTE_USER", "operator")
        .env("IOT_REMOTE_PASSWORD", OPERATOR_PASSWORD)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !crate::common::servers::tcp_accepts(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "iot-remote browse never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Proxy { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_only_allowed_origins_and_bodies_come_back_whole_in_order() {
    let rig = rig(4 * 1024 * 1024).await;
    // Another origin, even on loopback: refused with an answer.
    let frames = raw(&rig, "GET", "/final", "127.0.0.1:1").await;
    match frames.as_slice() {
        [Frame::Error(f)] => assert_eq!(f.kind, "browser-forbidden-origin"),
        other => panic!("{other:?}"),
    }
    let frames = raw(&rig, "GET", "no-slash", "").await;
    assert!(matches!(frames.as_slice(), [Frame::Error(f)] if f.kind == "browser-bad-request"));
    // 3 MB in 64 KiB chunks, in order, exact.
    let frames = raw(&rig, "GET", "/big", "").await;
    let Frame::Head(h) = &frames[0] else {
        panic!("{:?}", frames[0])
    };
    assert_eq!(h.status, 200);
    assert!(matches!(frames.last(), Some(Frame::End)));
    let body: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Body(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(frames.len() > 40, "chunked: {} frames", frames.len());
    assert_eq!(
        body,
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
    );

    // Through the operator's proxy, with a body both ways.
    let p = proxy(&rig);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("http://127.0.0.1:{}/echo", p.port))
        .body(vec![0u8, 0xff, b',', 7])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &[0u8, 0xff, b',', 7]);
    // An absolute redirect to the device's origin stays on the proxy.
    let r = http
        .get(format!("http://127.0.0.1:{}/go/next", p.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/final");
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_beyond_the_maximum_is_refused() {
    let rig = rig(1024 * 1024).await;
    let frames = raw(&rig, "GET", "/big", "").await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(f)) if f.kind == "browser-too-large"),
        "{:?}",
        frames.last()
    );
}

/// The operator's browser (headless Chromium) opens the device's web UI
/// through `iot-remote browse`: the start page's relative link is
/// followed, the redirect and its cookie work, and the screenshot shows
/// the final page's image; its text says the cookie came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_shows_the_device_page_through_the_proxy() {
    let rig = rig(4 * 1024 * 1024).await;
    let p = proxy(&rig);
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("page.png");
    let url = format!("http://127.0.0.1:{}/start", p.port);
    let profile = dir.path().join("profile");
    let (u, pr) = (url.clone(), profile.clone());
    let dom = tokio::task::spawn_blocking(move || chromium(&pr, &u, &["--dump-dom".to_string()]))
        .await
        .unwrap();
    assert!(dom.contains("Hello from the device: cookie ok"), "{dom}");
    let shot_arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&profile, &url, &[shot_arg]))
        .await
        .unwrap();
    // The image is on the screenshot: a large area of its colour.
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pink = buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|px| px[..3] == PINK)
        .count();
    assert!(pink > 100_000, "{pink} pixels of the image's colour");
    // Dark pixels: the heading's text.
    let dark = buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|px| px[0] < 80 && px[1] < 80 && px[2] < 80)
        .count();
    assert!(dark > 500, "{dark} dark pixels (text)");
    if let Ok(keep) = std::env::var("IOT_AGENT_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let seen = rig.seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    for want in ["/start", "/go/next", "/final", "/img/box.svg"] {
        assert!(paths.contains(&want), "{want} not requested: {paths:?}");
    }
    assert!(seen
        .iter()
        .any(|(p, c)| p == "/img/box.svg" && c.contains("devsession=s3cr3t")));
    let _ = rig.site_port;
}

fn chromium(profile: &std::path::Path, url: &str, extra: &[String]) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=800,600",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
