//! The agent wire protocol: newline-delimited JSON over the virtio-serial port
//! `org.roam.agent.0`. Pure encode/decode, no I/O.
//!
//! ```text
//!  host (AgentMonitor)                         guest (roam-agent)
//!       | -- connect chardev socket -------------->|  (port becomes "host connected")
//!       |<------------- hello {version, boot_id…} --|  (sent on every (re)connect)
//!       | -- ping {nonce} ------------------------->|
//!       |<--------------------------- pong {nonce} --|
//!       |<---------------- hb {seq, boot_id, …} -----|  every 10 ms, own thread
//!       | -- config {disk_writes_per_s, …} -------->|
//!       |<------------------------- ack {seq, sum} --|  only once the record is durable
//!       | -- verify {upto_seq} -------------------->|
//!       |<------------------ verify_report {…} -----|
//!       |<------------------ error {code, message} --|  on anything it cannot do
//! ```
//!
//! Every line is at most [`MAX_LINE`] bytes including the newline; the length is
//! checked before any parsing. The protocol version travels in `hello`; unknown
//! fields are ignored (so a newer peer may add fields), unknown message types
//! are decode errors (the agent answers them with `error`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version carried in `hello`. The host accepts this version only.
pub const PROTO_VERSION: u32 = 1;
/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Name of the virtio-serial port (`virtserialport,name=…`).
pub const PORT_NAME: &str = "org.roam.agent.0";
/// Default size of the raw write log at the end of the disk.
pub const DEFAULT_LOG_REGION: u64 = 256 * 1024 * 1024;
/// The ready marker `/init` prints on the serial console.
pub const READY_MARKER: &str = "ROAM-GUEST-READY";
/// How many bad sequence numbers / file names a verify report lists at most.
pub const MAX_REPORTED_BAD: usize = 16;

/// Errors of the codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A line longer than [`MAX_LINE`] (length as far as it was seen).
    #[error("line of {0} bytes exceeds the {MAX_LINE}-byte limit")]
    Oversized(usize),
    /// Not valid JSON for any known message.
    #[error("undecodable line: {0}")]
    Decode(String),
    /// A peer speaking another protocol version.
    #[error("agent protocol version {0} not supported (want {PROTO_VERSION})")]
    Version(u32),
}

/// A random 128-bit id chosen by the agent once per guest boot.
/// On the wire: 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BootId(pub u128);

impl std::fmt::Display for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootId({self})")
    }
}

impl std::str::FromStr for BootId {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(ProtoError::Decode(format!(
                "boot id {s:?}: want 32 hex digits"
            )));
        }
        u128::from_str_radix(s, 16)
            .map(BootId)
            .map_err(|e| ProtoError::Decode(format!("boot id {s:?}: {e}")))
    }
}

impl Serialize for BootId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for BootId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the raw write log lives on the guest disk (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRegion {
    pub offset: u64,
    pub len: u64,
}

impl LogRegion {
    /// Number of 4 KiB record slots.
    pub fn slots(&self) -> u64 {
        self.len / crate::record::RECORD_SIZE as u64
    }

    /// The layout both `roam-mkdisk` and the agent derive from the disk size:
    /// the last [`DEFAULT_LOG_REGION`] bytes, or the last half of a disk smaller
    /// than twice that; `None` below 8 MiB. Offsets are 4 KiB aligned.
    pub fn for_disk(disk_size: u64) -> Option<LogRegion> {
        const ALIGN: u64 = crate::record::RECORD_SIZE as u64;
        if disk_size < 8 * 1024 * 1024 {
            return None;
        }
        let len = if disk_size >= 2 * DEFAULT_LOG_REGION {
            DEFAULT_LOG_REGION
        } else {
            disk_size / 2
        };
        let offset = (disk_size - len).div_ceil(ALIGN) * ALIGN;
        let len = (disk_size - offset) / ALIGN * ALIGN;
        Some(LogRegion { offset, len })
    }
}

/// First message on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub boot_id: BootId,
    pub agent_version: String,
    /// Size of /dev/vda in bytes, if the guest has a disk.
    #[serde(default)]
    pub disk_size: Option<u64>,
    #[serde(default)]
    pub log: Option<LogRegion>,
    /// Whether the data file system with its MANIFEST is mounted (verify
    /// then checks its files).
    #[serde(default)]
    pub data_mounted: bool,
    /// Next record sequence number the agent will write.
    #[serde(default)]
    pub next_seq: u64,
}

/// Heartbeat, every 10 ms from a dedicated thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    pub boot_id: BootId,
    /// Guest CLOCK_MONOTONIC in ms (stops while the VM is paused under TCG).
    pub uptime_ms: u64,
}

/// One durable write of a log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub seq: u64,
    /// The record checksum (see [`crate::record`]).
    pub sum: u64,
}

/// Counts of a verification pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub checked: u64,
    pub ok: u64,
    pub bad: u64,
    pub missing: u64,
}

/// The agent's answer to `verify`. The top-level counts are log records;
/// the data files are counted in `files`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// As asked.
    pub upto_seq: u64,
    /// Lowest and highest seq actually checked (older ones were overwritten by
    /// wrap-around, newer ones were never written). `None` if nothing was.
    #[serde(default)]
    pub range: Option<(u64, u64)>,
    pub checked: u64,
    pub ok: u64,
    /// Records present but wrong (other seq/boot, bad checksum or payload).
    pub bad: u64,
    /// Slots holding no record at all.
    pub missing: u64,
    #[serde(default)]
    pub first_bad_seqs: Vec<u64>,
    /// Files listed in /data/MANIFEST.
    #[serde(default)]
    pub files: Counts,
    #[serde(default)]
    pub first_bad_files: Vec<String>,
    /// A one-line account of what was wrong; `None` when all is well.
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl VerifyReport {
    /// Everything checked was intact and nothing was missing.
    pub fn all_ok(&self) -> bool {
        self.bad == 0 && self.missing == 0 && self.files.bad == 0 && self.files.missing == 0
    }

    /// Builds `detail` from the counts and first bad items.
    pub fn summarize(&mut self) {
        if self.all_ok() {
            self.detail = None;
            return;
        }
        let mut d = Vec::new();
        if self.bad + self.missing > 0 {
            d.push(format!(
                "records: {} bad, {} missing, first {:?}",
                self.bad, self.missing, self.first_bad_seqs
            ));
        }
        if self.files.bad + self.files.missing > 0 {
            d.push(format!(
                "files: {} bad, {} missing, first {:?}",
                self.files.bad, self.files.missing, self.first_bad_files
            ));
        }
        self.detail = Some(d.join("; "));
    }
}

/// Something the agent could not do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub code: String,
    pub message: String,
}

/// Workload settings; every field defaults to 0 (= off), so a `config`
/// naming only some fields switches the others off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkloadConfig {
    /// MiB/s of guest memory dirtied (page by page, cycling the working set).
    pub mem_dirty_mib_s: u32,
    /// Size of the dirtied working set, MiB.
    pub mem_working_set_mib: u32,
    /// Durable 4 KiB log writes per second.
    pub disk_writes_per_s: u32,
    /// Operations per second on files under `/data/churn` (rewrite + fsync + rename,
    /// append + fsync, delete): ext4 metadata changes, each made durable by a FLUSH.
    pub file_writes_per_s: u32,
    /// Single 4 KiB O_DIRECT reads per second at random places of the files under
    /// `/data` (what "a read of one block" costs, e.g. during a post-copy migration).
    pub probe_reads_per_s: u32,
    /// Rewrite whole pages with random bytes instead of stamping 8 bytes into each:
    /// memory that compression cannot shrink (a pre-copy's worst case).
    pub mem_incompressible: bool,
}

/// Messages from the agent to the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Hello(Hello),
    Hb(Heartbeat),
    Ack(Ack),
    VerifyReport(VerifyReport),
    Pong { nonce: u64 },
    Error(AgentError),
}

/// Messages from the host to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    Config(WorkloadConfig),
    Verify { upto_seq: u64 },
    Ping { nonce: u64 },
}

/// Encodes one message as a line (with the trailing newline).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut v = serde_json::to_vec(msg).map_err(|e| ProtoError::Decode(e.to_string()))?;
    v.push(b'\n');
    if v.len() > MAX_LINE {
        return Err(ProtoError::Oversized(v.len()));
    }
    Ok(v)
}

/// Decodes one line (a trailing `\n` / `\r\n` is allowed). The size cap is
/// checked before the JSON parser sees a byte.
pub fn decode<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, ProtoError> {
    if line.len() > MAX_LINE {
        return Err(ProtoError::Oversized(line.len()));
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    serde_json::from_slice(line).map_err(|e| ProtoError::Decode(e.to_string()))
}

/// Checks a decoded hello's version.
pub fn check_hello(h: &Hello) -> Result<(), ProtoError> {
    if h.version == PROTO_VERSION {
        Ok(())
    } else {
        Err(ProtoError::Version(h.version))
    }
}

/// Splits a byte stream into lines of at most `max` bytes (newline included).
/// A longer line is reported once as [`ProtoError::Oversized`] and its bytes
/// are dropped up to the next newline, so memory stays bounded by `max`.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Inside an oversized line: drop bytes until the next newline.
    discarding: bool,
    /// Where the newline search resumes (bytes before it hold none).
    scanned: usize,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(MAX_LINE)
    }
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max,
            discarding: false,
            scanned: 0,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held (at most `max` once `next_line` has been drained).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line (with its newline), an oversize report, or
    /// `None` when more input is needed. Call until it returns `None`.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, ProtoError>> {
        loop {
            let nl = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| p + self.scanned);
            match nl {
                Some(i) if self.discarding => {
                    self.buf.drain(..=i);
                    self.discarding = false;
                    self.scanned = 0;
                }
                Some(i) => {
                    self.scanned = 0;
                    if i + 1 > self.max {
                        self.buf.drain(..=i);
                        return Some(Err(ProtoError::Oversized(i + 1)));
                    }
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return Some(Ok(line));
                }
                None if self.discarding => {
                    self.buf.clear();
                    self.scanned = 0;
                    return None;
                }
                None => {
                    if self.buf.len() >= self.max {
                        let n = self.buf.len();
                        self.buf.clear();
                        self.scanned = 0;
                        self.discarding = true;
                        return Some(Err(ProtoError::Oversized(n)));
                    }
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip_agent(m: AgentMsg) {
        let line = encode(&m).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: AgentMsg = decode(&line).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn agent_messages_round_trip() {
        let boot_id = BootId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        round_trip_agent(AgentMsg::Hello(Hello {
            version: PROTO_VERSION,
            boot_id,
            agent_version: "0.1.0".into(),
            disk_size: Some(2 << 30),
            log: LogRegion::for_disk(2 << 30),
            data_mounted: true,
            next_seq: 7,
        }));
        round_trip_agent(AgentMsg::Hb(Heartbeat {
            seq: u64::MAX,
            boot_id,
            uptime_ms: 12,
        }));
        round_trip_agent(AgentMsg::Ack(Ack {
            seq: 3,
            sum: u64::MAX - 1,
        }));
        round_trip_agent(AgentMsg::VerifyReport(VerifyReport {
            upto_seq: 10,
            range: Some((0, 10)),
            checked: 11,
            ok: 10,
            bad: 1,
            missing: 0,
            first_bad_seqs: vec![4],
            files: Counts::default(),
            first_bad_files: vec!["data/a b".into()],
            detail: Some("records: 1 bad".into()),
            elapsed_ms: 5,
        }));
        round_trip_agent(AgentMsg::Pong { nonce: 9 });
        round_trip_agent(AgentMsg::Error(AgentError {
            code: "no_disk".into(),
            message: "no \"disk\"\n".into(),
        }));
    }

    #[test]
    fn host_messages_round_trip_and_defaults() {
        for m in [
            HostMsg::Config(WorkloadConfig {
                mem_dirty_mib_s: 1,
                mem_working_set_mib: 2,
                disk_writes_per_s: 3,
                file_writes_per_s: 4,
                probe_reads_per_s: 5,
                mem_incompressible: true,
            }),
            HostMsg::Verify { upto_seq: 99 },
            HostMsg::Ping { nonce: 1 },
        ] {
            let back: HostMsg = decode(&encode(&m).unwrap()).unwrap();
            assert_eq!(back, m);
        }
        // Omitted fields are 0; unknown fields are ignored.
        let m: HostMsg =
            decode(b"{\"type\":\"config\",\"disk_writes_per_s\":5,\"new\":1}\r\n").unwrap();
        assert_eq!(
            m,
            HostMsg::Config(WorkloadConfig {
                disk_writes_per_s: 5,
                ..Default::default()
            })
        );
    }

    #[test]
    fn wire_shape_is_stable() {
        let line = encode(&AgentMsg::Hb(Heartbeat {
            seq: 1,
            boot_id: BootId(255),
            uptime_ms: 2,
        }))
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"hb\",\"seq\":1,\"boot_id\":\"000000000000000000000000000000ff\",\"uptime_ms\":2}\n"
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            decode::<HostMsg>(b"{\"type\":\"format_disk\"}"),
            Err(ProtoError::Decode(_))
        ));
        assert!(decode::<AgentMsg>(
            b"{\"type\":\"hb\",\"seq\":1,\"boot_id\":\"xyz\",\"uptime_ms\":2}"
        )
        .is_err());
        let big = vec![b' '; MAX_LINE + 1];
        assert_eq!(
            decode::<HostMsg>(&big),
            Err(ProtoError::Oversized(MAX_LINE + 1))
        );
        let huge = AgentMsg::Error(AgentError {
            code: "x".into(),
            message: "y".repeat(MAX_LINE),
        });
        assert!(matches!(encode(&huge), Err(ProtoError::Oversized(_))));
    }

    #[test]
    fn hello_version_is_checked() {
        let mut h = Hello {
            version: PROTO_VERSION,
            boot_id: BootId(1),
            agent_version: "x".into(),
            disk_size: None,
            log: None,
            data_mounted: false,
            next_seq: 0,
        };
        assert!(check_hello(&h).is_ok());
        h.version = 2;
        assert_eq!(check_hello(&h), Err(ProtoError::Version(2)));
    }

    #[test]
    fn splitter_yields_lines_across_chunks() {
        let mut s = LineSplitter::new(16);
        s.push(b"ab");
        assert!(s.next_line().is_none());
        s.push(b"c\nde\nf");
        assert_eq!(s.next_line(), Some(Ok(b"abc\n".to_vec())));
        assert_eq!(s.next_line(), Some(Ok(b"de\n".to_vec())));
        assert!(s.next_line().is_none());
        s.push(b"\n");
        assert_eq!(s.next_line(), Some(Ok(b"f\n".to_vec())));
        assert!(s.next_line().is_none());
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn splitter_refuses_oversized_lines_and_recovers() {
        let mut s = LineSplitter::new(8);
        // Too long with its newline in the same chunk.
        s.push(b"0123456789\nok\n");
        assert_eq!(s.next_line(), Some(Err(ProtoError::Oversized(11))));
        assert_eq!(s.next_line(), Some(Ok(b"ok\n".to_vec())));
        // Too long without a newline yet: reported once, then dropped until
        // the newline, never buffered beyond the cap.
        s.push(b"aaaaaaaaaa");
        assert_eq!(s.next_line(), Some(Err(ProtoError::Oversized(10))));
        assert!(s.next_line().is_none());
        s.push(&[b'b'; 1000]);
        assert!(s.next_line().is_none());
        assert_eq!(s.buffered(), 0);
        s.push(b"bb\nnext\n");
        assert_eq!(s.next_line(), Some(Ok(b"next\n".to_vec())));
        // Exactly at the cap is fine.
        s.push(b"1234567\n");
        assert_eq!(s.next_line(), Some(Ok(b"1234567\n".to_vec())));
    }

    #[test]
    fn log_region_layout() {
        let r = LogRegion::for_disk(2 << 30).unwrap();
        assert_eq!(r.len, DEFAULT_LOG_REGION);
        assert_eq!(r.offset + r.len, 2 << 30);
        assert_eq!(r.slots(), 65536);
        let small = LogRegion::for_disk(100 * 1024 * 1024 + 1000).unwrap();
        assert_eq!(small.offset % 4096, 0);
        assert_eq!(small.len % 4096, 0);
        assert!(small.offset + small.len <= 100 * 1024 * 1024 + 1000);
        assert!(LogRegion::for_disk(4 << 20).is_none());
    }
}
