//! Uploads for the `logs` and `snapshot` actions: HTTP PUT to the URL the
//! DMS gives (usually a presigned object-store URL), with a size limit and
//! a timeout. Presigned URLs carry credentials in their query, so only the
//! scheme and host ever appear in messages.

use bytes::Bytes;
use std::path::Path;
use std::time::Duration;

/// Uploads files to the URL an action names, bounded in time and size.
#[derive(Clone)]
pub struct Uploader {
    http: reqwest::Client,
    /// Largest upload, in bytes.
    pub limit: u64,
}

impl Uploader {
    /// An uploader with these bounds.
    pub fn new(timeout: Duration, limit: u64) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(15)))
            .user_agent(concat!("iot-agent/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(
                |attempt| match redirect_refusal(
                    attempt.previous().iter().map(|u| u.scheme()),
                    attempt.url().scheme(),
                ) {
                    Some(why) => attempt.error(why),
                    None => attempt.follow(),
                },
            ))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Uploader { http, limit })
    }

    /// Uploads bytes held in memory.
    pub async fn put_bytes(&self, url: &str, body: Bytes) -> Result<u64, String> {
        let target = check_url(url)?;
        let len = body.len() as u64;
        if len > self.limit {
            return Err(format!(
                "{len} bytes is more than the upload limit of {} (dms.upload.limit)",
                self.limit
            ));
        }
        self.send(url, &target, reqwest::Body::from(body), len)
            .await
    }

    /// Uploads a file with its length (object stores refuse chunked PUTs).
    pub async fn put_file(&self, url: &str, path: &Path) -> Result<u64, String> {
        let target = check_url(url)?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let len = file.metadata().await.map_err(|e| e.to_string())?.len();
        let stream = tokio_util::io::ReaderStream::new(file);
        self.send(url, &target, reqwest::Body::wrap_stream(stream), len)
            .await
    }

    async fn send(
        &self,
        url: &str,
        target: &str,
        body: reqwest::Body,
        len: u64,
    ) -> Result<u64, String> {
        let resp = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                // reqwest's errors name the URL (normalised, or the one it
                // was redirected to): never let one reach a message.
                format!(
                    "upload to {target} {what}: {}",
                    scrub(&crate::errors::chain(&e.without_url()), url)
                )
            })?;
        if !resp.status().is_success() {
            return Err(format!(
                "upload to {target} refused: HTTP {}",
                resp.status()
            ));
        }
        Ok(len)
    }
}

/// Checks the URL and returns `scheme://host` for messages.
pub fn check_url(url: &str) -> Result<String, String> {
    let uri: Option<http::Uri> = url.parse().ok();
    match uri.as_ref().map(|u| (u.scheme_str(), u.host())) {
        Some((Some(s @ ("http" | "https")), Some(h))) if !h.is_empty() => Ok(format!("{s}://{h}")),
        _ => Err("the upload URL must be an http:// or https:// URL with a host".into()),
    }
}

/// Most redirects followed for one upload.
const MAX_REDIRECTS: usize = 5;

/// Why a redirect is not followed: to plain http after https (the body and
/// the presigned credentials would travel in clear), or too many of them.
fn redirect_refusal<'a>(
    previous: impl Iterator<Item = &'a str>,
    next: &str,
) -> Option<&'static str> {
    let mut n = 0;
    let mut was_https = false;
    for scheme in previous {
        n += 1;
        was_https |= scheme == "https";
    }
    if was_https && next != "https" {
        return Some("redirected from https to a plain http URL; refused");
    }
    if n > MAX_REDIRECTS {
        return Some("too many redirects");
    }
    None
}

/// Removes the URL (with its signature) from an error text.
fn scrub(text: &str, url: &str) -> String {
    text.replace(url, "<url>")
}

#[cfg(test)]
mod tests {
    #[test]
    fn redirects_never_downgrade_https() {
        use super::redirect_refusal as r;
        assert!(r(["https"].into_iter(), "http").is_some());
        assert!(r(["http", "https"].into_iter(), "http").is_some());
        assert!(r(["https"].into_iter(), "https").is_none());
        assert!(r(["http"].into_iter(), "http").is_none());
        assert!(r(["http"; 6].into_iter(), "http").is_some());
    }

    /// reqwest normalises the URL it names in errors (here the host's
    /// case), so removing the given text is not enough.
    #[tokio::test]
    async fn upload_errors_never_carry_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let u = super::Uploader::new(std::time::Duration::from_secs(5), 1024).unwrap();
        let url = format!("http://LOCALHOST:{port}/bucket/o?X-Amz-Signature=s3cr3tsig");
        let e = u
            .put_bytes(&url, bytes::Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(!e.contains("s3cr3tsig") && !e.contains("/bucket"), "{e}");
        assert!(e.contains("upload to http://LOCALHOST"), "{e}");
    }

    #[test]
    fn urls_are_checked_and_never_echoed() {
        assert_eq!(
            super::check_url("https://s3.example/b?X-Sig=1").unwrap(),
            "https://s3.example"
        );
        assert!(super::check_url("file:///etc/passwd").is_err());
        assert!(super::check_url("not a url").is_err());
        assert_eq!(
            super::scrub("error for https://h/p?sig=1 here", "https://h/p?sig=1"),
            "error for <url> here"
        );
    }
}
