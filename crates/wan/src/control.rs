//! Control protocol of the `roam-wan` binary: one JSON object per line over a unix stream
//! socket, one request and one response per connection.
//!
//! ```text
//!  client                                   roam-wan run
//!    │  {"v":1,"req":{"outage":{"on":true}}}\n  │
//!    │ ───────────────────────────────────────► │  handle.set_outage(true)
//!    │  {"v":1,"ok":true,...}\n                 │
//!    │ ◄─────────────────────────────────────── │
//! ```
//!
//! Both sides refuse a line longer than [`MAX_LINE`] before parsing it, and a message whose
//! `v` is not [`VERSION`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{WanError, WanHandle};
use crate::model::LinkParams;
use crate::stats::WanStats;

/// Protocol version carried in every message.
pub const VERSION: u32 = 1;
/// Longest accepted line, newline included.
pub const MAX_LINE: usize = 1 << 20;

/// Changes to link parameters; absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkUpdate {
    /// New rate in Mbit/s (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbit: Option<f64>,
    /// New RTT in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// New jitter in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// New loss in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// New queue size in bytes; 0 = back to the bandwidth-delay product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<u64>,
    /// Allow reordering under jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_reorder: Option<bool>,
}

impl LinkUpdate {
    /// `base` with this update applied.
    pub fn apply(&self, mut base: LinkParams) -> LinkParams {
        if let Some(x) = self.bandwidth_mbit {
            base.bandwidth_mbit = x;
        }
        if let Some(x) = self.rtt_ms {
            base.rtt_ms = x;
        }
        if let Some(x) = self.jitter_ms {
            base.jitter_ms = x;
        }
        if let Some(x) = self.loss_pct {
            base.loss_pct = x;
        }
        if let Some(x) = self.queue_bytes {
            base.queue_bytes = (x != 0).then_some(x);
        }
        if let Some(x) = self.allow_reorder {
            base.allow_reorder = x;
        }
        base
    }
}

/// A request. `between` limits it to the path between two ports (both directions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Start or end an outage.
    Outage {
        /// On or off.
        on: bool,
        /// Only this pair of ports.
        #[serde(default)]
        between: Option<(String, String)>,
    },
    /// Change link parameters.
    Set {
        /// What changes.
        update: LinkUpdate,
        /// Only this pair of ports.
        #[serde(default)]
        between: Option<(String, String)>,
    },
    /// Read the counters and current parameters.
    Stats,
    /// Stop the emulator.
    Shutdown,
}

/// A response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Counters (for `stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<WanStats>,
    /// Parameters of the first path after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkParams>,
}

#[derive(Serialize, Deserialize)]
struct RequestMsg {
    v: u32,
    req: Request,
}

/// Control-protocol failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Socket trouble.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// A line over [`MAX_LINE`].
    #[error("message longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not valid JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Another protocol version.
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u32),
    /// The emulator refused the request.
    #[error("emulator: {0}")]
    Refused(String),
}

/// Serializes a request as one line.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut v = serde_json::to_vec(&RequestMsg {
        v: VERSION,
        req: req.clone(),
    })
    .unwrap_or_default();
    v.push(b'\n');
    v
}

/// Parses one request line.
pub fn decode_request(line: &[u8]) -> Result<Request, ControlError> {
    if line.len() > MAX_LINE {
        return Err(ControlError::TooLong);
    }
    // Look at the version before the body, so a newer client gets a version error rather
    // than a confusing shape error.
    let probe: serde_json::Value = serde_json::from_slice(line)?;
    let v = probe.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if v != VERSION {
        return Err(ControlError::Version(v));
    }
    Ok(serde_json::from_value::<RequestMsg>(probe)?.req)
}

/// Serializes a response as one line.
pub fn encode_response(resp: &Response) -> Vec<u8> {
    let mut v = serde_json::to_vec(resp).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Parses one response line.
pub fn decode_response(line: &[u8]) -> Result<Response, ControlError> {
    if line.len() > MAX_LINE {
        return Err(ControlError::TooLong);
    }
    let r: Response = serde_json::from_slice(line)?;
    if r.v != VERSION {
        return Err(ControlError::Version(r.v));
    }
    Ok(r)
}

fn read_line(s: &mut impl Read) -> Result<Vec<u8>, ControlError> {
    let mut line = Vec::new();
    BufReader::new(s.take(MAX_LINE as u64 + 1)).read_until(b'\n', &mut line)?;
    if line.len() > MAX_LINE {
        return Err(ControlError::TooLong);
    }
    Ok(line)
}

/// Carries out one request on a running WAN. Returns whether it asked for shutdown.
pub fn execute(handle: &WanHandle, req: &Request) -> (Response, bool) {
    let names = handle.port_names();
    let first = || -> Result<LinkParams, WanError> { handle.link(&names[0], &names[1]) };
    let result: Result<Response, WanError> = (|| {
        let mut resp = Response {
            v: VERSION,
            ok: true,
            ..Response::default()
        };
        match req {
            Request::Outage { on, between: None } => handle.set_outage(*on),
            Request::Outage {
                on,
                between: Some((a, b)),
            } => handle.set_outage_between(a, b, *on)?,
            Request::Set {
                update,
                between: None,
            } => handle.set_link(update.apply(first()?))?,
            Request::Set {
                update,
                between: Some((a, b)),
            } => handle.set_link_between(a, b, update.apply(handle.link(a, b)?))?,
            Request::Stats => resp.stats = Some(handle.stats()),
            Request::Shutdown => {}
        }
        resp.link = Some(first()?);
        Ok(resp)
    })();
    let resp = result.unwrap_or_else(|e| Response {
        v: VERSION,
        ok: false,
        error: Some(e.to_string()),
        ..Response::default()
    });
    (resp, matches!(req, Request::Shutdown))
}

/// Serves requests on `path` until a `shutdown` request or `stop` is set (checked every
/// 200 ms). Removes a stale socket file first.
pub fn serve(handle: &WanHandle, path: &Path, stop: &AtomicBool) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let result = (|| loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => return Err(ControlError::Io(e)),
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (resp, quit) = match read_line(&mut conn).and_then(|l| decode_request(&l)) {
            Ok(req) => execute(handle, &req),
            Err(e) => (
                Response {
                    v: VERSION,
                    ok: false,
                    error: Some(e.to_string()),
                    ..Response::default()
                },
                false,
            ),
        };
        let _ = conn.write_all(&encode_response(&resp));
        if quit {
            return Ok(());
        }
    })();
    let _ = std::fs::remove_file(path);
    result
}

/// Sends one request to a server at `path` and returns its (successful) response.
pub fn call(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(&encode_request(req))?;
    let resp = decode_response(&read_line(&mut conn)?)?;
    if !resp.ok {
        return Err(ControlError::Refused(resp.error.unwrap_or_default()));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let reqs = [
            Request::Outage {
                on: true,
                between: None,
            },
            Request::Outage {
                on: false,
                between: Some(("office".into(), "home".into())),
            },
            Request::Set {
                update: LinkUpdate {
                    rtt_ms: Some(80.0),
                    ..Default::default()
                },
                between: None,
            },
            Request::Stats,
            Request::Shutdown,
        ];
        for r in reqs {
            let line = encode_request(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode_request(&line).unwrap(), r);
        }
    }

    #[test]
    fn rejects_other_versions_and_oversize() {
        let line = br#"{"v":2,"req":"stats"}"#;
        assert!(matches!(
            decode_request(line),
            Err(ControlError::Version(2))
        ));
        assert!(matches!(
            decode_request(br#"{"req":"stats"}"#),
            Err(ControlError::Version(0))
        ));
        assert!(matches!(
            decode_request(b"nonsense"),
            Err(ControlError::Malformed(_))
        ));
        let big = vec![b' '; MAX_LINE + 1];
        assert!(matches!(decode_request(&big), Err(ControlError::TooLong)));
        let resp = br#"{"v":9,"ok":true}"#;
        assert!(matches!(
            decode_response(resp),
            Err(ControlError::Version(9))
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }
    }

    #[test]
    fn update_keeps_absent_fields() {
        let base = LinkParams {
            bandwidth_mbit: 100.0,
            rtt_ms: 40.0,
            queue_bytes: Some(5),
            ..Default::default()
        };
        let u = LinkUpdate {
            loss_pct: Some(1.0),
            queue_bytes: Some(0),
            ..Default::default()
        };
        let p = u.apply(base);
        assert_eq!(p.bandwidth_mbit, 100.0);
        assert_eq!(p.rtt_ms, 40.0);
        assert_eq!(p.loss_pct, 1.0);
        assert_eq!(p.queue_bytes, None);
    }
}
