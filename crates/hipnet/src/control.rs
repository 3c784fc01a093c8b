//! The control socket: a unix stream socket taking one line per connection
//! (`locator ADDR`, `stats`, `status`, `export`, `unregister`, `stop`) and
//! answering with text.
//! `roam-hip ctl` is its client; tests use [`request`].

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::debug;

use crate::endpoint::Handle;
use crate::error::Error;

/// Longest request line accepted.
const MAX_LINE: usize = 256;

/// Listens on `path` (replacing a stale socket) and serves requests until
/// the runtime stops.
pub fn serve(path: &Path, handle: Handle) -> Result<(), Error> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let h = handle.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_LINE];
                let mut n = 0;
                while n < MAX_LINE {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if buf[..n].contains(&b'\n') {
                                break;
                            }
                        }
                    }
                }
                let line = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = answer(&h, line.trim()).await;
                debug!(request = line.trim(), "control");
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(())
}

async fn answer(h: &Handle, line: &str) -> String {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("locator"), Some(a)) => match a.parse::<IpAddr>() {
            Ok(ip) => match h.set_locator(ip).await {
                Ok(n) => format!("ok {n}\n"),
                Err(e) => format!("error {e}\n"),
            },
            Err(_) => format!("error bad address {a}\n"),
        },
        (Some("stats"), None) => h.stats.render(),
        (Some("status"), None) => h.status().await,
        // Hex, so the reply stays a line of text.
        (Some("export"), None) => match h.export_and_stop().await {
            Ok(b) => format!("{}\n", hex::encode(b)),
            Err(e) => format!("error {e}\n"),
        },
        (Some("stop"), None) => {
            h.stop().await;
            "ok\n".to_string()
        }
        (Some("unregister"), None) => match h.unregister().await {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error {e}\n"),
        },
        _ => "error commands: locator ADDR | stats | status | export | unregister | stop\n"
            .to_string(),
    }
}

/// Sends one request line and returns the whole reply (blocking).
pub fn request(path: &Path, line: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Parses `name value` lines from `stats` into a lookup.
pub fn parse_stats(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}
