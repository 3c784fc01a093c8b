//! Rendezvous relaying of I1 (RFC 8004 §3.3, §4.2) as pure packet
//! transformations.
//!
//! ```text
//!  Initiator ──I1──► RVS ──I1 + FROM(initiator IP) + RVS_HMAC──► Responder
//!  Initiator ◄──────────── R1 + VIA_RVS(RVS IP) ───────────────── Responder
//! ```
//!
//! RVS_HMAC is computed like HIP_MAC (header with checksum zero and length
//! covering only the parameters below RVS_HMAC's type, so FROM is covered)
//! with the integrity key of the RVS→Responder direction of the
//! registration association between them. VIA_RVS and RVS_HMAC sit above
//! HIP_SIGNATURE_2, so a precreated, signed R1 can carry VIA_RVS.
//!
//! [`relay_for`] is the whole rendezvous server's decision for one incoming
//! packet: the registrar's state lives in the [`Host`] (a registration is an
//! association whose R2 or a later UPDATE carried REG_RESPONSE(rendezvous),
//! until its lifetime ends or the host cancels it), and the
//! registered host's current locator is that association's peer address, so
//! an UPDATE(LOCATOR_SET) from a host that moved (RFC 8046) re-points the
//! relay with no further bookkeeping.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::crypto::mac::hmac;
use crate::error::{CryptoError, Error};
use crate::identity::Rhash;
use crate::machine::Host;
use crate::wire::params::{From, RvsHmac, ViaRvs, REG_TYPE_RENDEZVOUS};
use crate::wire::{ty, Packet, PacketType};

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// IPv4-mapped addresses come back as IPv4.
pub fn from_v6(a: Ipv6Addr) -> IpAddr {
    match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    }
}

/// Bytes covered by RVS_HMAC.
pub fn rvs_mac_input(p: &Packet) -> Result<Vec<u8>, Error> {
    Ok(p.encode_selected(0, |q| q.ty() < ty::RVS_HMAC, None)?)
}

/// The RVS side: adds FROM (the Initiator's address) and RVS_HMAC to an I1
/// before forwarding it to the registered Responder.
pub fn relay_i1(i1: &Packet, initiator: IpAddr, rhash: Rhash, key: &[u8]) -> Result<Packet, Error> {
    if i1.header.packet_type != PacketType::I1 {
        return Err(Error::Unexpected("only I1 is relayed"));
    }
    let mut p = i1.clone();
    p.header.checksum = 0;
    p.add(&From(to_v6(initiator)))?;
    let m = hmac(rhash, key, &rvs_mac_input(&p)?);
    p.add(&RvsHmac(m))?;
    Ok(p)
}

/// The Responder side: checks RVS_HMAC with the key of the RVS→Responder
/// direction and returns the Initiator's address from FROM.
pub fn verify_relayed_i1(p: &Packet, rhash: Rhash, key: &[u8]) -> Result<IpAddr, Error> {
    let from: From = p.get()?.ok_or(Error::Missing(ty::FROM))?;
    let got: RvsHmac = p.get()?.ok_or(Error::Missing(ty::RVS_HMAC))?;
    let want = hmac(rhash, key, &rvs_mac_input(p)?);
    let same = got.0.len() == want.len()
        && got.0.iter().zip(&want).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    if !same {
        return Err(CryptoError::Mac.into());
    }
    Ok(from_v6(from.0))
}

/// Adds VIA_RVS to an R1 answering a relayed I1.
pub fn add_via_rvs(r1: &mut Packet, rvs: &[IpAddr]) -> Result<(), Error> {
    r1.add(&ViaRvs(rvs.iter().map(|a| to_v6(*a)).collect()))?;
    Ok(())
}

/// What a rendezvous server does with an incoming packet `p` from `from`
/// (RFC 8004 §3.3): `None` when it is not an I1 for a HIT registered with
/// `rvs` for rendezvous (the caller processes it as its own);
/// `Some(Ok((to, relayed)))` to forward the relayed I1 to the registered
/// host's current locator; `Some(Err(_))` when relaying failed (drop it).
pub fn relay_for(
    rvs: &Host,
    p: &Packet,
    from: SocketAddr,
) -> Option<Result<(SocketAddr, Packet), Error>> {
    let target = p.header.receiver_hit;
    if p.header.packet_type != PacketType::I1 || target == rvs.hit() {
        return None;
    }
    let registered = rvs
        .registrations()
        .iter()
        .any(|(h, types, _)| *h == target && types.contains(&REG_TYPE_RENDEZVOUS));
    if !registered {
        return None;
    }
    let keys = rvs.keys(&target)?;
    let to = rvs.peer_addr(&target)?;
    Some(relay_i1(p, from.ip(), keys.rhash, &keys.hip.our_mac).map(|r| (to, r)))
}
