//! TLV parameters (RFC 7401 §5.2.1) and whole packets.
//!
//! A decoded [`Packet`] keeps every parameter exactly as received
//! ([`RawParam`], padding included) so that HIP_MAC and signatures are
//! verified over the sender's bytes, not over a re-encoding.

use std::net::IpAddr;

use super::header::{checksum, Header, Hit, PacketType, HEADER_LEN, MAX_PACKET_LEN};
use super::params::{Param, ParamBody};
use crate::error::WireError;

/// Total TLV length for `content_len` bytes of contents: 4 bytes of type and
/// length, the contents, zero padding to a multiple of 8
/// (the RFC's `11 + Length - (Length + 3) % 8`).
pub fn padded_len(content_len: usize) -> usize {
    (4 + content_len).div_ceil(8) * 8
}

/// One parameter as it is on the wire: type, length, contents, padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawParam {
    ty: u16,
    wire: Vec<u8>,
}

impl RawParam {
    /// Builds a parameter with zero padding.
    pub fn new(ty: u16, contents: &[u8]) -> Result<Self, WireError> {
        if contents.len() > usize::from(u16::MAX) {
            return Err(WireError::ParamTooLong(contents.len()));
        }
        let mut wire = Vec::with_capacity(padded_len(contents.len()));
        wire.extend_from_slice(&ty.to_be_bytes());
        wire.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        wire.extend_from_slice(contents);
        wire.resize(padded_len(contents.len()), 0);
        Ok(RawParam { ty, wire })
    }

    /// Encodes a typed parameter.
    pub fn from_body<T: ParamBody>(body: &T) -> Result<Self, WireError> {
        let mut c = Vec::new();
        body.encode(&mut c);
        RawParam::new(T::TYPE, &c)
    }

    pub fn ty(&self) -> u16 {
        self.ty
    }

    /// Odd types are critical: an unknown one aborts processing.
    pub fn critical(&self) -> bool {
        self.ty & 1 == 1
    }

    pub fn contents(&self) -> &[u8] {
        let len = usize::from(u16::from_be_bytes([self.wire[2], self.wire[3]]));
        &self.wire[4..4 + len]
    }

    /// The full TLV bytes, padding included.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Decodes into the given typed parameter.
    pub fn body<T: ParamBody>(&self) -> Result<T, WireError> {
        if self.ty != T::TYPE {
            return Err(WireError::BadParam {
                ty: self.ty,
                reason: "requested as another type",
            });
        }
        T::decode(self.contents())
    }

    /// Mutable access to the contents (used to zero PUZZLE fields for
    /// HIP_SIGNATURE_2).
    pub(crate) fn contents_mut(&mut self) -> &mut [u8] {
        let len = usize::from(u16::from_be_bytes([self.wire[2], self.wire[3]]));
        &mut self.wire[4..4 + len]
    }
}

/// A HIP packet: fixed header plus ordered parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub header: Header,
    pub params: Vec<RawParam>,
}

impl Packet {
    pub fn new(packet_type: PacketType, sender_hit: Hit, receiver_hit: Hit) -> Self {
        Packet {
            header: Header::new(packet_type, sender_hit, receiver_hit),
            params: Vec::new(),
        }
    }

    /// Inserts a parameter at its place in type order (after existing ones of
    /// the same type, which must stay consecutive).
    pub fn insert(&mut self, p: RawParam) {
        let at = self.params.partition_point(|q| q.ty <= p.ty);
        self.params.insert(at, p);
    }

    /// Encodes and inserts a typed parameter.
    pub fn add<T: ParamBody>(&mut self, body: &T) -> Result<(), WireError> {
        self.insert(RawParam::from_body(body)?);
        Ok(())
    }

    /// Removes all parameters of the given type.
    pub fn remove(&mut self, ty: u16) {
        self.params.retain(|p| p.ty != ty);
    }

    pub fn find(&self, ty: u16) -> Option<&RawParam> {
        self.params.iter().find(|p| p.ty == ty)
    }

    pub fn find_all(&self, ty: u16) -> impl Iterator<Item = &RawParam> {
        self.params.iter().filter(move |p| p.ty == ty)
    }

    /// The first parameter of type `T`, decoded, if present.
    pub fn get<T: ParamBody>(&self) -> Result<Option<T>, WireError> {
        self.find(T::TYPE).map(|p| p.body()).transpose()
    }

    /// Encoded length of the whole packet.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.params.iter().map(|p| p.wire.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Serialises the header (with the given checksum) and the parameters
    /// selected by `keep`; the header length covers exactly those.
    pub(crate) fn encode_selected(
        &self,
        checksum_field: u16,
        keep: impl Fn(&RawParam) -> bool,
        extra: Option<&RawParam>,
    ) -> Result<Vec<u8>, WireError> {
        let chosen: Vec<&RawParam> = self.params.iter().filter(|p| keep(p)).collect();
        let total = HEADER_LEN
            + chosen.iter().map(|p| p.wire.len()).sum::<usize>()
            + extra.map_or(0, |p| p.wire.len());
        if total > MAX_PACKET_LEN {
            return Err(WireError::TooLarge(total));
        }
        let mut out = Vec::with_capacity(total);
        self.header.write(total, checksum_field, &mut out);
        for p in chosen {
            out.extend_from_slice(&p.wire);
        }
        if let Some(p) = extra {
            out.extend_from_slice(&p.wire);
        }
        Ok(out)
    }

    /// Encodes with a zero checksum: the form RFC 5770 UDP encapsulation
    /// sends (the UDP checksum protects it; NATs could not fix a HIP one).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.encode_selected(0, |_| true, None)
    }

    /// Encodes with the §5.1.1 checksum for raw IP (protocol 139) transport.
    pub fn encode_with_checksum(&self, src: IpAddr, dst: IpAddr) -> Result<Vec<u8>, WireError> {
        let mut out = self.encode()?;
        let c = checksum(&out, src, dst);
        out[4..6].copy_from_slice(&c.to_be_bytes());
        Ok(out)
    }

    /// Decodes and validates a packet: header, TLV bounds, type order, and
    /// every known parameter's format. Unknown non-critical parameters are
    /// kept; unknown critical ones reject the packet (§5.2.1).
    pub fn decode(buf: &[u8]) -> Result<Packet, WireError> {
        let (header, total) = Header::parse(buf)?;
        let body = &buf[HEADER_LEN..total];
        let mut params = Vec::new();
        let mut off = 0usize;
        let mut prev: Option<u16> = None;
        while off < body.len() {
            if body.len() - off < 4 {
                return Err(WireError::ParamOverrun {
                    ty: 0,
                    offset: HEADER_LEN + off,
                });
            }
            let ty = u16::from_be_bytes([body[off], body[off + 1]]);
            let len = usize::from(u16::from_be_bytes([body[off + 2], body[off + 3]]));
            let plen = padded_len(len);
            if plen > body.len() - off {
                return Err(WireError::ParamOverrun {
                    ty,
                    offset: HEADER_LEN + off,
                });
            }
            if let Some(p) = prev {
                if ty < p {
                    return Err(WireError::Order { prev: p, next: ty });
                }
            }
            prev = Some(ty);
            let raw = RawParam {
                ty,
                wire: body[off..off + plen].to_vec(),
            };
            // Validates known formats and rejects unknown critical types.
            Param::decode(&raw)?;
            params.push(raw);
            off += plen;
        }
        Ok(Packet { header, params })
    }

    /// Decodes every parameter into its typed form.
    pub fn typed_params(&self) -> Result<Vec<Param>, WireError> {
        self.params.iter().map(Param::decode).collect()
    }
}
