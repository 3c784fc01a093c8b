//! Moving an established association to another host with its VM.
//!
//! The blob is versioned and bounded: magic "RHIPAS", version, length, body,
//! and a SHA-256 checksum (a corruption check, not a MAC: it travels inside
//! the authenticated host-to-host channel). The size cap is checked before
//! anything is decoded. It holds secrets (KEYMAT): never store it in clear.
//!
//! ```text
//!  "RHIPAS" | version u16 | body length u32 | body | SHA-256(all before)[..16]
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sha2::{Digest, Sha256};

use super::{Association, AssociationKeys, Host, State};
use crate::crypto::keymat::HipKeys;
use crate::error::{Error, WireError};
use crate::identity::{PeerIdentity, Rhash};
use crate::wire::Hit;

const MAGIC: &[u8; 6] = b"RHIPAS";
/// Current format version.
pub const VERSION: u16 = 1;
/// Largest blob accepted; checked before decoding.
pub const MAX_BLOB: usize = 8192;

fn bad(reason: &'static str) -> Error {
    Error::Wire(WireError::BadParam { ty: 0, reason })
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(bad("association blob truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Error> {
        let n = usize::from(self.u16()?);
        Ok(self.take(n)?.to_vec())
    }
}

impl Host {
    /// Serialises the ESTABLISHED (or R2-SENT) association with `peer`.
    pub fn export_association(&self, peer: &Hit) -> Result<Vec<u8>, Error> {
        let a = self
            .assocs
            .get(peer)
            .filter(|a| matches!(a.state, State::Established | State::R2Sent))
            .ok_or(Error::Unexpected("no established association to export"))?;
        let (k, host_id) = match (&a.keys, &a.peer_host_id) {
            (Some(k), Some(h)) => (k, h.clone()),
            _ => return Err(Error::Unexpected("association lacks keys or peer identity")),
        };
        let mut w = W(Vec::new());
        w.0.extend_from_slice(&self.id.hit().0);
        w.0.extend_from_slice(&a.peer_hit.0);
        match a.peer_addr.ip() {
            IpAddr::V4(ip) => {
                w.u8(4);
                w.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                w.u8(6);
                w.0.extend_from_slice(&ip.octets());
            }
        }
        w.u16(a.peer_addr.port());
        w.bytes(host_id.wire());
        w.u8(match k.rhash {
            Rhash::Sha256 => 1,
            Rhash::Sha384 => 2,
        });
        w.u16(k.cipher);
        for key in [
            &k.hip.our_enc,
            &k.hip.our_mac,
            &k.hip.peer_enc,
            &k.hip.peer_mac,
        ] {
            w.bytes(key);
        }
        w.bytes(&k.keymat);
        w.u32(k.esp_keymat_index as u32);
        w.u16(k.esp_suite);
        w.u32(k.our_spi);
        w.u32(k.peer_spi);
        w.u8(u8::from(k.we_are_greater));
        w.u32(a.update_id);
        match a.peer_update_id {
            Some(id) => {
                w.u8(1);
                w.u32(id);
            }
            None => w.u8(0),
        }
        let body = w.0;
        let mut out = Vec::with_capacity(body.len() + 28);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum[..16]);
        if out.len() > MAX_BLOB {
            return Err(bad("association blob too large"));
        }
        Ok(out)
    }

    /// Moves every association's next UPDATE SEQ `by` ahead. After a handover
    /// that was called off, the host that takes the identity back resumes from
    /// the state it exported; the other host may already have announced with
    /// the next SEQ, and a peer silently ignores a repeated SEQ (RFC 7401
    /// §6.12.1), so the move back must skip past anything it could have sent.
    pub fn advance_update_ids(&mut self, by: u32) {
        for a in self.assocs.values_mut() {
            a.update_id = a.update_id.wrapping_add(by);
        }
    }

    /// Installs an association exported by another host running the same
    /// identity (the VM moved here). It becomes ESTABLISHED; announce the
    /// new locator with [`Host::update_locators`].
    pub fn import_association(&mut self, blob: &[u8]) -> Result<Hit, Error> {
        if blob.len() > MAX_BLOB {
            return Err(bad("association blob too large"));
        }
        if blob.len() < 12 + 16 || &blob[..6] != MAGIC {
            return Err(bad("not an association blob"));
        }
        let version = u16::from_be_bytes([blob[6], blob[7]]);
        if version != VERSION {
            return Err(bad("unsupported association blob version"));
        }
        let len = u32::from_be_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
        if blob.len() != 12 + len + 16 {
            return Err(bad("association blob length mismatch"));
        }
        let (signed, sum) = blob.split_at(12 + len);
        if Sha256::digest(signed)[..16] != *sum {
            return Err(bad("association blob checksum mismatch"));
        }
        let mut r = R(&signed[12..]);
        if r.take(16)? != self.id.hit().0 {
            return Err(bad("association belongs to another host identity"));
        }
        let mut hit = [0u8; 16];
        hit.copy_from_slice(r.take(16)?);
        let peer_hit = Hit(hit);
        let ip = match r.u8()? {
            4 => {
                let b = r.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(r.take(16)?);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return Err(bad("bad address family")),
        };
        let peer_addr = SocketAddr::new(ip, r.u16()?);
        let host_id_wire = r.bytes()?;
        let host_id = crate::machine::responder::first_param(&host_id_wire)
            .ok_or(bad("bad HOST_ID in association blob"))?;
        let peer_id = PeerIdentity::from_param(&host_id.body()?)?;
        if peer_id.hit() != peer_hit {
            return Err(Error::HitMismatch);
        }
        let rhash = match r.u8()? {
            1 => Rhash::Sha256,
            2 => Rhash::Sha384,
            _ => return Err(bad("bad RHASH")),
        };
        let cipher = r.u16()?;
        let hip = HipKeys {
            our_enc: r.bytes()?,
            our_mac: r.bytes()?,
            peer_enc: r.bytes()?,
            peer_mac: r.bytes()?,
        };
        let keymat = r.bytes()?;
        let esp_keymat_index = r.u32()? as usize;
        let keys = AssociationKeys {
            peer_hit,
            rhash,
            cipher,
            hip,
            keymat,
            esp_keymat_index,
            esp_suite: r.u16()?,
            our_spi: r.u32()?,
            peer_spi: r.u32()?,
            we_are_greater: r.u8()? == 1,
        };
        let update_id = r.u32()?;
        let peer_update_id = match r.u8()? {
            1 => Some(r.u32()?),
            _ => None,
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes in association blob"));
        }
        let mut a = Association::new(peer_hit, peer_addr);
        a.state = State::Established;
        a.peer = Some(peer_id);
        a.peer_host_id = Some(host_id);
        a.keys = Some(keys);
        a.update_id = update_id;
        a.peer_update_id = peer_update_id;
        self.assocs.insert(peer_hit, a);
        Ok(peer_hit)
    }
}
