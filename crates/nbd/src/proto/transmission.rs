//! Transmission phase: 28-byte requests, 16-byte simple replies, and the
//! validation that turns a request into an [`Action`] or a [`Rejection`].

use super::handshake::{be32, be64};
use super::{cmd, cmdflags, errno, MAX_REQUEST_LEN, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};

/// A request header as it came off the wire (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request with a bad magic: the stream is out of sync, so close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

impl Request {
    pub const LEN: usize = 28;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, BadRequestMagic> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Bytes of payload that follow this header on the wire, whatever the
    /// server thinks of the request: only WRITE carries one.
    pub fn payload_len(&self) -> u32 {
        if self.kind == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// The command part of a request, named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    Other(u16),
}

impl From<u16> for Command {
    fn from(k: u16) -> Self {
        match k {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disconnect,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }
}

/// What a valid request asks the backend to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload (`len` bytes) follows the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        /// False when the client set `NO_HOLE`.
        may_trim: bool,
        fua: bool,
    },
    Disconnect,
}

/// A request the server refuses. The server first discards `skip` payload
/// bytes, replies with `errno`, and closes afterwards if `close`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub skip: u32,
    pub close: bool,
}

/// Validates a request against an export of `size` bytes.
///
/// Pure: the caller does the I/O. Errors follow the NBD spec where it has
/// an opinion: ENOSPC for writes past the end, EINVAL for reads past the end
/// and bad flags, EPERM for writes to a read-only export, EINVAL (then
/// close, because the payload cannot be skipped cheaply) for a write larger
/// than the advertised maximum block size.
pub fn check_request(req: &Request, size: u64, read_only: bool) -> Result<Action, Rejection> {
    let skip = req.payload_len();
    let reject = |errno| Rejection {
        errno,
        skip,
        close: false,
    };
    let command = Command::from(req.kind);

    if command == Command::Write && req.length > MAX_REQUEST_LEN {
        return Err(Rejection {
            errno: errno::EINVAL,
            skip: 0,
            close: true,
        });
    }

    let allowed = match command {
        Command::WriteZeroes => cmdflags::FUA | cmdflags::NO_HOLE,
        // FUA is meaningless on reads and flushes but harmless; accept it.
        _ => cmdflags::FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(reject(errno::EINVAL));
    }
    let fua = req.flags & cmdflags::FUA != 0;

    let end = req.offset.checked_add(u64::from(req.length));
    let in_bounds = matches!(end, Some(e) if e <= size);

    match command {
        Command::Disconnect => Ok(Action::Disconnect),
        Command::Flush => Ok(Action::Flush),
        Command::Read => {
            if req.length > MAX_REQUEST_LEN || !in_bounds {
                return Err(reject(errno::EINVAL));
            }
            Ok(Action::Read {
                offset: req.offset,
                len: req.length,
            })
        }
        Command::Write | Command::Trim | Command::WriteZeroes => {
            if read_only {
                return Err(reject(errno::EPERM));
            }
            if !in_bounds {
                return Err(reject(errno::ENOSPC));
            }
            let (offset, len) = (req.offset, req.length);
            Ok(match command {
                Command::Write => Action::Write { offset, len, fua },
                Command::Trim => Action::Trim { offset, len, fua },
                _ => Action::WriteZeroes {
                    offset,
                    len,
                    may_trim: req.flags & cmdflags::NO_HOLE == 0,
                    fua,
                },
            })
        }
        Command::Other(_) => Err(reject(errno::EINVAL)),
    }
}

/// A simple reply header; READ payload follows it when `error == 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    /// Client side.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, BadRequestMagic> {
        let magic = be32(&b[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(SimpleReply {
            error: be32(&b[4..8]),
            cookie: be64(&b[8..16]),
        })
    }
}
