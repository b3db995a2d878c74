//! A minimal HTTP/1.1 client for the CLI's own calls (health polling, admin commands), so the
//! binary needs no HTTP client library.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET url` → (status, body). Only `http://HOST:PORT/PATH`.
pub fn get(url: &str, bearer: Option<&str>, timeout: Duration) -> anyhow::Result<(u16, String)> {
    request("GET", url, bearer, None, timeout)
}

/// `METHOD url` with an optional JSON body → (status, body).
pub fn request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    json_body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let auth = bearer.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = json_body.unwrap_or("");
    let content = if json_body.is_some() {
        format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())
    } else {
        String::new()
    };
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{content}Connection: close\r\n\r\n{body}")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("reading the reply from {host}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP reply")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("malformed status line")?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("malformed chunk")?;
        let n = usize::from_str_radix(size.trim(), 16).context("malformed chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        if rest.len() < n {
            bail!("truncated chunk");
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
}
