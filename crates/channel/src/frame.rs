//! The message frame: a pure codec, no I/O.
//!
//! ```text
//!  0       4       6       8              12
//!  +-------+-------+-------+---------------+----------------------+
//!  | "ROAM"|version| kind  | payload length|  payload (JSON)      |
//!  +-------+-------+-------+---------------+----------------------+
//!   magic   u16 BE  u16 BE   u32 BE, <= cap   `length` bytes
//! ```
//!
//! Version rule: a receiver accepts frames of its current version and of the previous
//! one, so hosts can be upgraded one at a time. A sender writes the version negotiated
//! for the connection (the lower of the two peers' current versions, see `tls::ALPN_*`).
//!
//! The length is checked against a cap *before* anything is allocated, so a peer cannot
//! make us reserve gigabytes with twelve bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"ROAM";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build still accepts (current and previous).
pub const MIN_PROTOCOL_VERSION: u16 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    1
};
/// Size of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Default cap on a frame's payload (16 MiB): control messages are small, but a
/// chunk manifest of a large disk can reach a few MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;

/// Whether frames of `version` are accepted.
pub const fn is_supported_version(version: u16) -> bool {
    version >= MIN_PROTOCOL_VERSION && version <= PROTOCOL_VERSION
}

/// What a frame carries. 0 is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Server to client, once per connection: "you are accepted".
    Hello = 1,
    /// An application message (JSON).
    Message = 2,
    /// The sender gives up on this exchange; the payload is a UTF-8 reason.
    Error = 3,
}

impl FrameKind {
    /// Decodes a kind number.
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Hello),
            2 => Some(Self::Message),
            3 => Some(Self::Error),
            _ => None,
        }
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not a roam frame (or the stream lost sync).
    #[error("bad frame magic {0:02x?}, expected \"ROAM\"")]
    BadMagic([u8; 4]),
    /// The version is neither current nor previous.
    #[error("frame protocol version {got} not supported (this host accepts {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A valid frame of a kind not allowed here (e.g. a Hello on a bidirectional stream).
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
    /// The announced payload is over the cap.
    #[error("frame payload of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The cap in force.
        cap: u32,
    },
    /// The input ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// The payload could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(serde_json::Error),
    /// The payload is not the expected message.
    #[error("cannot decode message: {0}")]
    Decode(serde_json::Error),
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the payload.
    pub version: u16,
    /// What the payload is.
    pub kind: FrameKind,
    /// Payload length in bytes.
    pub len: u32,
}

/// A whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Protocol version of the payload.
    pub version: u16,
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Encodes a header.
pub fn encode_header(h: &FrameHeader) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&h.version.to_be_bytes());
    out[6..8].copy_from_slice(&(h.kind as u16).to_be_bytes());
    out[8..12].copy_from_slice(&h.len.to_be_bytes());
    out
}

/// Parses and checks a header: magic, version, kind, and `len <= cap`.
pub fn parse_header(b: &[u8; HEADER_LEN], cap: u32) -> Result<FrameHeader, FrameError> {
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([b[4], b[5]]);
    if !is_supported_version(version) {
        return Err(FrameError::UnsupportedVersion { got: version });
    }
    let kind_raw = u16::from_be_bytes([b[6], b[7]]);
    let kind = FrameKind::from_u16(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
    let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    if len > cap {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            cap,
        });
    }
    Ok(FrameHeader { version, kind, len })
}

/// Encodes a whole frame. Fails if the payload is over `cap`.
pub fn encode_frame(
    version: u16,
    kind: FrameKind,
    payload: &[u8],
    cap: u32,
) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= cap)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            cap,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(&FrameHeader { version, kind, len }));
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` if `buf` holds only part of a frame (read more), or the frame and
/// the number of bytes it used.
pub fn decode_frame(buf: &[u8], cap: u32) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = parse_header(head, cap)?;
    let end = HEADER_LEN + h.len as usize;
    let Some(payload) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((
        Frame {
            version: h.version,
            kind: h.kind,
            payload: payload.to_vec(),
        },
        end,
    )))
}

/// Encodes `msg` as a [`FrameKind::Message`] frame.
pub fn encode_message<T: Serialize + ?Sized>(
    version: u16,
    msg: &T,
    cap: u32,
) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
    encode_frame(version, FrameKind::Message, &payload, cap)
}

/// Decodes the payload of a [`FrameKind::Message`] frame.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(FrameError::Decode)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_layout_is_stable() {
        let h = FrameHeader {
            version: 1,
            kind: FrameKind::Message,
            len: 0x0102_0304,
        };
        assert_eq!(
            encode_header(&h),
            [b'R', b'O', b'A', b'M', 0, 1, 0, 2, 1, 2, 3, 4]
        );
    }

    #[test]
    fn version_rule_current_and_previous() {
        assert!(is_supported_version(PROTOCOL_VERSION));
        assert!(!is_supported_version(PROTOCOL_VERSION + 1));
        assert!(!is_supported_version(0));
        let mut b = encode_header(&FrameHeader {
            version: PROTOCOL_VERSION,
            kind: FrameKind::Hello,
            len: 0,
        });
        b[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        assert!(matches!(
            parse_header(&b, 10),
            Err(FrameError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn over_cap_refused_from_header_alone() {
        // Only the header is present: a decoder that allocated first would need 4 GiB.
        let h = encode_header(&FrameHeader {
            version: 1,
            kind: FrameKind::Message,
            len: u32::MAX,
        });
        assert!(matches!(
            decode_frame(&h, DEFAULT_MAX_PAYLOAD),
            Err(FrameError::TooLarge { len, .. }) if len == u64::from(u32::MAX)
        ));
        assert!(matches!(
            encode_frame(1, FrameKind::Message, &[0; 11], 10),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn message_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct M {
            a: u32,
            b: String,
        }
        let m = M {
            a: 5,
            b: "x".into(),
        };
        let bytes = encode_message(1, &m, 1024).unwrap();
        let (f, used) = decode_frame(&bytes, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(f.kind, FrameKind::Message);
        assert_eq!(decode_message::<M>(&f.payload).unwrap(), m);
    }

    fn kind() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Hello),
            Just(FrameKind::Message),
            Just(FrameKind::Error)
        ]
    }

    proptest! {
        #[test]
        fn round_trip(kind in kind(), payload in proptest::collection::vec(any::<u8>(), 0..4096),
                      tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = encode_frame(PROTOCOL_VERSION, kind, &payload, 1 << 20).unwrap();
            let frame_len = bytes.len();
            bytes.extend_from_slice(&tail);
            let (f, used) = decode_frame(&bytes, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(used, frame_len);
            prop_assert_eq!(f.kind, kind);
            prop_assert_eq!(f.version, PROTOCOL_VERSION);
            prop_assert_eq!(f.payload, payload);
            // Every strict prefix is "need more", never an error or a frame.
            for cut in 0..frame_len {
                prop_assert!(decode_frame(&bytes[..cut], 1 << 20).unwrap().is_none());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                       cap in any::<u32>()) {
            if let Ok(Some((f, used))) = decode_frame(&bytes, cap) {
                prop_assert!(used <= bytes.len());
                prop_assert!(f.payload.len() as u64 <= u64::from(cap));
            }
            let _ = decode_message::<serde_json::Value>(&bytes);
        }

        #[test]
        fn over_cap_length_refused(len in 1u32.., kind in kind()) {
            let cap = len - 1;
            let h = encode_header(&FrameHeader { version: PROTOCOL_VERSION, kind, len });
            let refused = matches!(decode_frame(&h, cap), Err(FrameError::TooLarge { .. }));
            prop_assert!(refused);
        }
    }
}
