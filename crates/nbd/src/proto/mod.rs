//! The NBD wire protocol as pure encode/decode: no sockets, no files.
//!
//! Only the subset roam needs is spoken: the fixed-newstyle handshake with
//! `NBD_OPT_GO`/`INFO`/`LIST`/`ABORT`/`EXPORT_NAME`, and simple replies in the
//! transmission phase. Everything else a client may ask for (structured
//! replies, TLS, meta contexts, extended headers) is refused with
//! `NBD_REP_ERR_UNSUP`, which every client must accept.
//!
//! ```text
//!  client                                   server
//!    |  <-- NBDMAGIC IHAVEOPT hflags(u16) ---  |   handshake::encode_greeting
//!    |  --- cflags(u32) ------------------->   |   handshake::decode_client_flags
//!    |  --- IHAVEOPT opt len data --------->   |   OptionHeader / ClientOption::decode
//!    |  <-- REPMAGIC opt type len data -----   |   handshake::encode_*reply
//!    |        ... until GO / EXPORT_NAME ...   |
//!    |  --- request(28) [+ write payload] ->   |   Request::decode + check_request
//!    |  <-- reply(16) [+ read payload] -----   |   SimpleReply::encode
//! ```
//!
//! Every length read from the peer is compared with a cap ([`MAX_OPTION_LEN`],
//! [`MAX_REQUEST_LEN`], [`MAX_EXPORT_NAME_LEN`]) before anything is allocated.

pub mod handshake;
pub mod transmission;

pub use handshake::{
    ClientFlags, ClientOption, HandshakeError, InfoRequests, OptionHeader, OptionReplyHeader,
};
pub use transmission::{check_request, Action, Command, Rejection, Request, SimpleReply};

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that prefixes every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Largest option payload accepted; real options are a few hundred bytes.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE payload (also the advertised maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Longest export name (the NBD spec says servers may cap it at 4096).
pub const MAX_EXPORT_NAME_LEN: usize = 4096;

/// Block size constraints announced with `NBD_INFO_BLOCK_SIZE`.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Preferred block size: a page, below which writes cost a read-modify-write.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Maximum block size = the request payload cap.
pub const BLOCK_SIZE_MAX: u32 = MAX_REQUEST_LEN;

/// Handshake flags (server → client, u16).
pub mod hflags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, u32).
pub mod cflags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;

    /// True for the error reply types (high bit set).
    pub fn is_error(t: u32) -> bool {
        t & ERR != 0
    }
}

/// `NBD_INFO_*` item types carried in `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (u16), sent with the export size.
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Command types (u16).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (u16).
pub mod cmdflags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Error numbers carried in simple replies (NBD's own numbering, which
/// happens to match Linux for these values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// Maps an OS error to the nearest NBD error; anything unknown is EIO,
    /// because the spec only lets a server send the listed values.
    pub fn from_io(e: &std::io::Error) -> u32 {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
            Some(libc::EOVERFLOW) => EOVERFLOW,
            Some(libc::EOPNOTSUPP) => ENOTSUP,
            Some(libc::ESHUTDOWN) => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// Transmission flags advertised for an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::CAN_MULTI_CONN;
    if read_only {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES;
    }
    f
}
