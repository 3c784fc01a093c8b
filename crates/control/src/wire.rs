//! The framing of the migrate stream, without I/O.
//!
//! `POST /v1/vms/{name}/migrate` answers `200` with `Content-Type: application/x-ndjson`:
//! one JSON object per line,
//!
//! ```text
//! {"progress": {"phase": "memory", "elapsed_ms": 1200, ...}}    (>= 5 per second)
//! {"progress": {...}}
//! {"result": {"vm": "desk", "outcome": "completed", ...}}       (last line), or
//! {"error": {"code": "not_found", "message": "..."}}            (last line)
//! ```
//!
//! The reader side ([`LineSplitter`]) caps the length of one line, so a broken or hostile
//! peer cannot make the client buffer without bound.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, MigrationResult, Progress};

/// Content type of the migrate stream.
pub const NDJSON: &str = "application/x-ndjson";

/// Longest line the client accepts in the migrate stream (a result with a large `tuning`
/// object stays far below this).
pub const MAX_LINE: usize = 1 << 20;

/// Largest request body the server accepts.
pub const MAX_REQUEST_BODY: usize = 64 << 10;
/// Largest plain answer the client reads (lists of many VMs).
pub const MAX_RESPONSE_BODY: usize = 16 << 20;

/// One line of the migrate stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrateEvent {
    /// A progress snapshot.
    Progress(Progress),
    /// The final report (completed or aborted).
    Result(Box<MigrationResult>),
    /// The request was refused (or the daemon failed); final line.
    Error(ApiError),
}

impl MigrateEvent {
    /// The line, with its trailing newline.
    pub fn to_line(&self) -> Bytes {
        // Serialising these types cannot fail: no maps with non-string keys, no foreign
        // Serialize impls that error.
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            let err = ApiError::internal(format!("cannot encode event: {e}"));
            serde_json::to_vec(&MigrateEvent::Error(err)).unwrap_or_default()
        });
        v.push(b'\n');
        Bytes::from(v)
    }

    /// Parses one line (without its newline).
    pub fn from_line(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// A line longer than [`MAX_LINE`] arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream line longer than {max} bytes")]
pub struct LineTooLong {
    /// The cap that was exceeded.
    pub max: usize,
}

/// Splits a byte stream into newline-terminated lines, with a cap on line length.
#[derive(Debug)]
pub struct LineSplitter {
    buf: BytesMut,
    max: usize,
}

impl LineSplitter {
    /// A splitter that refuses lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete line (without `\n`, empty lines skipped), `Ok(None)` if none is
    /// complete yet.
    pub fn next_line(&mut self) -> Result<Option<Bytes>, LineTooLong> {
        loop {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(i) if i > self.max => return Err(LineTooLong { max: self.max }),
                Some(i) => {
                    let line = self.buf.split_to(i + 1).freeze().slice(..i);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Ok(Some(line));
                }
                None if self.buf.len() > self.max => return Err(LineTooLong { max: self.max }),
                None => return Ok(None),
            }
        }
    }

    /// Bytes of an unfinished line still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::Phase;

    #[test]
    fn event_lines_are_externally_tagged() {
        let line = MigrateEvent::Progress(Progress::new(Phase::Memory)).to_line();
        assert!(line.starts_with(b"{\"progress\":{\"phase\":\"memory\""));
        assert!(line.ends_with(b"}\n"));
        let back = MigrateEvent::from_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, MigrateEvent::Progress(Progress::new(Phase::Memory)));
        let e = MigrateEvent::Error(ApiError::not_found("no vm x")).to_line();
        assert_eq!(
            &e[..],
            b"{\"error\":{\"code\":\"not_found\",\"message\":\"no vm x\"}}\n"
        );
    }

    #[test]
    fn splitter_reassembles_lines_across_chunks() {
        let mut s = LineSplitter::new(16);
        s.push(b"ab");
        assert_eq!(s.next_line().unwrap(), None);
        s.push(b"c\n\nde\nf");
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"de"[..]));
        assert_eq!(s.next_line().unwrap(), None);
        assert_eq!(s.pending(), 1);
    }

    #[test]
    fn splitter_caps_line_length() {
        let mut s = LineSplitter::new(4);
        s.push(b"12345");
        assert_eq!(s.next_line(), Err(LineTooLong { max: 4 }));
        let mut s = LineSplitter::new(4);
        s.push(b"1234\n123456\n");
        assert_eq!(s.next_line().unwrap().as_deref(), Some(&b"1234"[..]));
        assert!(s.next_line().is_err());
    }
}
