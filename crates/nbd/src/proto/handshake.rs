//! Handshake phase: greeting, client flags, options and option replies.
//!
//! Decoders take slices that the caller read after checking the length
//! field against [`MAX_OPTION_LEN`]; they never allocate. Encoders append to
//! a caller-owned `Vec<u8>` so a connection reuses one buffer.

use super::{
    cflags, hflags, info, opt, rep, BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, IHAVEOPT,
    MAX_EXPORT_NAME_LEN, MAX_OPTION_LEN, NBDMAGIC, OPT_REPLY_MAGIC,
};

/// Errors that end a connection during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad magic {0:#018x}")]
    BadMagic(u64),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("option length {0} exceeds the cap")]
    OptionTooLong(u32),
    #[error("truncated message")]
    Truncated,
}

/// Why an option payload was refused; the connection stays open and the
/// server answers with [`OptionError::reply_type`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("malformed option: {0}")]
    Invalid(&'static str),
    #[error("export name longer than {MAX_EXPORT_NAME_LEN} bytes")]
    NameTooLong,
}

impl OptionError {
    /// The `NBD_REP_ERR_*` that reports this error.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::Invalid(_) => rep::ERR_INVALID,
            OptionError::NameTooLong => rep::ERR_TOO_BIG,
        }
    }
}

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;

/// The server's first message: magic, newstyle marker, handshake flags.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES).to_be_bytes());
    b
}

/// Client side of [`encode_greeting`]: returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, HandshakeError> {
    let magic = be64(&b[0..8]);
    if magic != NBDMAGIC {
        return Err(HandshakeError::BadMagic(magic));
    }
    let marker = be64(&b[8..16]);
    if marker != IHAVEOPT {
        return Err(HandshakeError::BadMagic(marker));
    }
    Ok(u16::from_be_bytes([b[16], b[17]]))
}

/// What the client agreed to in its flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// Skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`'s reply.
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub fn encode(&self) -> [u8; 4] {
        let mut f = cflags::FIXED_NEWSTYLE;
        if self.no_zeroes {
            f |= cflags::NO_ZEROES;
        }
        f.to_be_bytes()
    }

    /// Unknown bits must make the server close (spec: "MUST NOT continue").
    pub fn decode(b: &[u8; 4]) -> Result<Self, HandshakeError> {
        let f = u32::from_be_bytes(*b);
        if f & !(cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES) != 0 {
            return Err(HandshakeError::UnknownClientFlags(f));
        }
        if f & cflags::FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle);
        }
        Ok(ClientFlags {
            no_zeroes: f & cflags::NO_ZEROES != 0,
        })
    }
}

/// The fixed 16-byte prefix of every client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Checks the magic and the length cap, so the caller may allocate
    /// `length` bytes afterwards.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, HandshakeError> {
        let magic = be64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let h = OptionHeader {
            option: be32(&b[8..12]),
            length: be32(&b[12..16]),
        };
        if h.length > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong(h.length));
        }
        Ok(h)
    }
}

/// The `NBD_INFO_*` types a client asked for in `NBD_OPT_INFO`/`GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequests<'a>(&'a [u8]);

impl<'a> InfoRequests<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    pub fn contains(&self, t: u16) -> bool {
        self.iter().any(|x| x == t)
    }

    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// Legacy: select an export and enter transmission; no error reply exists.
    ExportName(&'a str),
    Abort,
    List,
    Info {
        name: &'a str,
        requests: InfoRequests<'a>,
    },
    Go {
        name: &'a str,
        requests: InfoRequests<'a>,
    },
    /// Anything else: answered with `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

impl<'a> ClientOption<'a> {
    /// Decodes the payload of an option whose header was already checked.
    pub fn decode(option: u32, data: &'a [u8]) -> Result<Self, OptionError> {
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(name_str(data)?)),
            // The spec forbids data with ABORT, but refusing to abort helps nobody.
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST if data.is_empty() => Ok(ClientOption::List),
            opt::LIST => Err(OptionError::Invalid("LIST carries no data")),
            opt::INFO | opt::GO => {
                let (name, requests) = decode_info_payload(data)?;
                Ok(if option == opt::GO {
                    ClientOption::Go { name, requests }
                } else {
                    ClientOption::Info { name, requests }
                })
            }
            other => Ok(ClientOption::Unsupported(other)),
        }
    }

    /// The option number on the wire.
    pub fn number(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::Info { .. } => opt::INFO,
            ClientOption::Go { .. } => opt::GO,
            ClientOption::Unsupported(n) => *n,
        }
    }

    /// Client side: appends header and payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; OptionHeader::LEN]);
        match self {
            ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                out.extend_from_slice(&(name.len() as u32).to_be_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                out.extend_from_slice(&requests.0[..requests.len() * 2]);
            }
            ClientOption::Abort | ClientOption::List | ClientOption::Unsupported(_) => {}
        }
        let length = (out.len() - start - OptionHeader::LEN) as u32;
        let h = OptionHeader {
            option: self.number(),
            length,
        };
        out[start..start + OptionHeader::LEN].copy_from_slice(&h.encode());
    }
}

/// Builds the raw info-request list for [`ClientOption::encode`].
pub fn info_requests(raw: &[u8]) -> InfoRequests<'_> {
    InfoRequests(raw)
}

fn decode_info_payload(data: &[u8]) -> Result<(&str, InfoRequests<'_>), OptionError> {
    let name_len = data
        .get(0..4)
        .map(be32)
        .ok_or(OptionError::Invalid("missing name length"))? as usize;
    if name_len > MAX_EXPORT_NAME_LEN {
        return Err(OptionError::NameTooLong);
    }
    let name_end = 4 + name_len;
    let name = name_str(
        data.get(4..name_end)
            .ok_or(OptionError::Invalid("name runs past option"))?,
    )?;
    let count = data
        .get(name_end..name_end + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(OptionError::Invalid("missing info request count"))? as usize;
    let reqs = &data[name_end + 2..];
    if reqs.len() != count * 2 {
        return Err(OptionError::Invalid(
            "info request count disagrees with length",
        ));
    }
    Ok((name, InfoRequests(reqs)))
}

fn name_str(b: &[u8]) -> Result<&str, OptionError> {
    if b.len() > MAX_EXPORT_NAME_LEN {
        return Err(OptionError::NameTooLong);
    }
    std::str::from_utf8(b).map_err(|_| OptionError::Invalid("export name is not UTF-8"))
}

/// The fixed 20-byte prefix of every option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Client side; the caller must cap `length` before reading the body.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, HandshakeError> {
        let magic = be64(&b[0..8]);
        if magic != OPT_REPLY_MAGIC {
            return Err(HandshakeError::BadMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: be32(&b[8..12]),
            reply_type: be32(&b[12..16]),
            length: be32(&b[16..20]),
        })
    }
}

/// Appends one option reply with its body.
pub fn encode_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, body: &[u8]) {
    let h = OptionReplyHeader {
        option,
        reply_type,
        length: body.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(body);
}

pub fn encode_ack(out: &mut Vec<u8>, option: u32) {
    encode_reply(out, option, rep::ACK, &[]);
}

/// An error reply; the message is for humans and may be empty.
pub fn encode_error(out: &mut Vec<u8>, option: u32, err: u32, message: &str) {
    encode_reply(out, option, err, message.as_bytes());
}

/// One `NBD_REP_SERVER` entry of an `NBD_OPT_LIST` answer.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    let h = OptionReplyHeader {
        option: opt::LIST,
        reply_type: rep::SERVER,
        length: 4 + name.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut body = [0u8; 12];
    body[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    body[2..10].copy_from_slice(&size.to_be_bytes());
    body[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_reply(out, option, rep::INFO, &body);
}

/// `NBD_INFO_NAME`: the canonical export name.
pub fn encode_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let h = OptionReplyHeader {
        option,
        reply_type: rep::INFO,
        length: 2 + name.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&info::NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// `NBD_INFO_BLOCK_SIZE` with roam's fixed constraints.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32) {
    let mut body = [0u8; 14];
    body[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    body[2..6].copy_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
    body[6..10].copy_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
    body[10..14].copy_from_slice(&BLOCK_SIZE_MAX.to_be_bytes());
    encode_reply(out, option, rep::INFO, &body);
}

/// Reply to the legacy `NBD_OPT_EXPORT_NAME` (no option-reply header).
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Client-side view of an `NBD_REP_INFO` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    Export { size: u64, flags: u16 },
    Name(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other(u16),
}

impl InfoItem {
    pub fn decode(body: &[u8]) -> Result<Self, HandshakeError> {
        let t = body
            .get(0..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(HandshakeError::Truncated)?;
        match t {
            info::EXPORT if body.len() == 12 => Ok(InfoItem::Export {
                size: be64(&body[2..10]),
                flags: u16::from_be_bytes([body[10], body[11]]),
            }),
            info::NAME => Ok(InfoItem::Name(
                String::from_utf8_lossy(&body[2..]).into_owned(),
            )),
            info::BLOCK_SIZE if body.len() == 14 => Ok(InfoItem::BlockSize {
                min: be32(&body[2..6]),
                preferred: be32(&body[6..10]),
                max: be32(&body[10..14]),
            }),
            info::EXPORT | info::BLOCK_SIZE => Err(HandshakeError::Truncated),
            other => Ok(InfoItem::Other(other)),
        }
    }
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
