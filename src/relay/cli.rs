//! The operator's subcommands of `iot-relay` that ask a running relay
//! (its admin API, with the token and address of the same configuration).

use super::config::RelayConfig;
use anyhow::{anyhow, bail, Context};
use std::path::Path;

/// Where and how to reach the admin API.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    /// From the configuration: `api.listen` (a wildcard address is asked on
    /// loopback), `api.token`, HTTPS unless `dev`, trusting `ca` (default
    /// `agents.ca`, the CA of the walk-through) and the system roots.
    pub fn new(c: &RelayConfig, url: Option<&str>, ca: Option<&Path>) -> anyhow::Result<Self> {
        if c.api.token.is_empty() {
            bail!("api.token is not set (IOT_RELAY_API__TOKEN): the admin API needs it");
        }
        let base = match url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let (host, port) = c
                    .api
                    .listen
                    .rsplit_once(':')
                    .ok_or_else(|| anyhow!("api.listen {:?} is not host:port", c.api.listen))?;
                let host = match host {
                    "0.0.0.0" | "" => "127.0.0.1",
                    "[::]" => "[::1]",
                    h => h,
                };
                let scheme = if c.dev { "http" } else { "https" };
                format!("{scheme}://{host}:{port}")
            }
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30));
        if base.starts_with("https://") {
            let mut roots = crate::tls::Roots::new().system();
            roots = match ca {
                Some(p) => roots.file(p, "--ca")?,
                None => roots.source(&c.agents.ca, "agents.ca")?,
            };
            let tls = crate::tls::client_config(
                roots,
                None,
                crate::tls::Verify::Full,
                crate::tls::Advice {
                    peer: "the relay's admin API",
                    ca_key: "--ca",
                    verify_key: None,
                },
            )?;
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        Ok(ApiClient {
            http: builder.build()?,
            base,
            token: c.api.token.clone(),
        })
    }

    /// `GET path` as JSON; an error answer becomes an error with its message.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the relay's admin API at {url}"))?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.context("the relay's answer")?;
        if !status.is_success() {
            bail!(
                "{url}: {status}: {}",
                body["message"].as_str().unwrap_or("(no message)")
            );
        }
        Ok(body)
    }
}

/// `iot-relay agents`: the relay's agents as a table, or its JSON.
pub fn agents(
    c: &RelayConfig,
    url: Option<&str>,
    ca: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let client = ApiClient::new(c, url, ca)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(client.get("/api/v2/agents"))?;
    let agents = answer["agents"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(());
    }
    print!("{}", agents_table(&agents));
    Ok(())
}

/// The table `iot-relay agents` prints.
pub fn agents_table(agents: &[serde_json::Value]) -> String {
    let mut rows = vec![[
        "DEVICE",
        "STATUS",
        "MODE",
        "ADDRESS",
        "TLS",
        "CONNECTED SINCE",
        "PIPES",
        "IN",
        "OUT",
    ]
    .map(String::from)
    .to_vec()];
    for a in agents {
        let s = |k: &str| a[k].as_str().unwrap_or("-").to_string();
        let n = |k: &str| a[k].as_u64().map(|n| n.to_string()).unwrap_or("-".into());
        let since = a["connectedSince"]
            .as_i64()
            .map(|ms| crate::clock::format_short(ms.saturating_mul(1_000_000)))
            .unwrap_or_else(|| "-".into());
        rows.push(vec![
            s("deviceId"),
            s("status"),
            s("mode"),
            s("address"),
            if a["tls"] == true { "yes" } else { "no" }.into(),
            since,
            n("pipes"),
            n("bytesIn"),
            n("bytesOut"),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
