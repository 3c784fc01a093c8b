//! Pure packet codec: the fixed header, TLV parameters, typed bodies, and
//! RFC 5770 UDP framing. No I/O, no crypto.

pub mod header;
pub mod packet;
pub mod params;
pub mod udp;

pub use header::{checksum, verify_checksum, Header, Hit, PacketType};
pub use packet::{Packet, RawParam};
pub use params::{ty, Param, ParamBody};
