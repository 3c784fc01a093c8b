//! ESP for HIP data (RFC 7402) in BEET semantics: the inner IP header is not
//! carried; the receiver rebuilds it from the association's HITs/LSIs, so a
//! packet is ESP(next header, transport payload).
//!
//! Suite 8 only: AES-128-CBC (RFC 3602) with HMAC-SHA-256-128 (RFC 4868).
//! Packet: SPI | Sequence | IV | E(payload | pad 1,2,3.. | pad len | next
//! header) | ICV (16). A 64-packet sliding window rejects replays (RFC 4303
//! §3.4.3); it is checked before and updated only after the ICV verifies.
//!
//! ```text
//!  inner packet ──strip IP header──► seal(next_hdr, payload) ──► UDP/10500
//!  UDP/10500 ──► open() ──(next_hdr, payload)──► rebuild IP header with HITs
//! ```

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;

use crate::crypto::keymat::Drawer;
use crate::error::CryptoError;
use crate::machine::{AssociationKeys, ESP_SUITE_AES128_CBC_SHA256};

const ENC_KEY_LEN: usize = 16;
const AUTH_KEY_LEN: usize = 32;
const ICV_LEN: usize = 16;
const IV_LEN: usize = 16;
const HEADER_LEN: usize = 8;
/// Largest ESP packet we build or accept.
pub const MAX_ESP_LEN: usize = 65535;

type Enc = cbc::Encryptor<aes::Aes128>;
type Dec = cbc::Decryptor<aes::Aes128>;

fn icv(key: &[u8], data: &[u8]) -> [u8; ICV_LEN] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; ICV_LEN];
    out.copy_from_slice(&full[..ICV_LEN]);
    out
}

/// RFC 4303 anti-replay window of 64 sequence numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    top: u32,
    bitmap: u64,
}

impl ReplayWindow {
    /// Would `seq` be accepted (new and not too old)?
    pub fn check(&self, seq: u32) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            return true;
        }
        let diff = self.top - seq;
        diff < 64 && self.bitmap & (1u64 << diff) == 0
    }

    /// (highest sequence number seen, bitmap): to move the SA with a VM.
    pub fn to_parts(&self) -> (u32, u64) {
        (self.top, self.bitmap)
    }

    pub fn from_parts(top: u32, bitmap: u64) -> Self {
        ReplayWindow { top, bitmap }
    }

    /// Records `seq` as received (call only after authentication).
    pub fn update(&mut self, seq: u32) {
        if seq > self.top {
            let shift = seq - self.top;
            self.bitmap = if shift >= 64 { 0 } else { self.bitmap << shift };
            self.bitmap |= 1;
            self.top = seq;
        } else {
            let diff = self.top - seq;
            if diff < 64 {
                self.bitmap |= 1u64 << diff;
            }
        }
    }
}

/// Our sending SA.
#[derive(Clone, Debug)]
pub struct Outbound {
    pub spi: u32,
    enc: [u8; ENC_KEY_LEN],
    auth: [u8; AUTH_KEY_LEN],
    seq: u32,
}

/// Our receiving SA.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub spi: u32,
    enc: [u8; ENC_KEY_LEN],
    auth: [u8; AUTH_KEY_LEN],
    window: ReplayWindow,
}

/// KEYMAT octets one pair of SAs of `suite` draws (both directions), or
/// None for a suite this crate does not implement.
pub fn keymat_len(suite: u16) -> Option<usize> {
    (suite == ESP_SUITE_AES128_CBC_SHA256).then_some(2 * (ENC_KEY_LEN + AUTH_KEY_LEN))
}

/// Builds both SAs of an association from its KEYMAT (RFC 7402 §7 order:
/// SA-gl encryption, SA-gl authentication, SA-lg encryption, SA-lg
/// authentication; SA-gl carries HOST_g's outgoing traffic).
pub fn sas(keys: &AssociationKeys) -> Result<(Outbound, Inbound), CryptoError> {
    if keys.esp_suite != ESP_SUITE_AES128_CBC_SHA256 {
        return Err(CryptoError::Esp("unsupported ESP suite"));
    }
    let tail = keys
        .keymat
        .get(keys.esp_keymat_index..)
        .ok_or(CryptoError::Keymat)?;
    let mut d = Drawer::new(tail);
    let mut take = |n: usize| d.draw(n);
    let gl_enc = take(ENC_KEY_LEN)?;
    let gl_auth = take(AUTH_KEY_LEN)?;
    let lg_enc = take(ENC_KEY_LEN)?;
    let lg_auth = take(AUTH_KEY_LEN)?;
    let (out_e, out_a, in_e, in_a) = if keys.we_are_greater {
        (gl_enc, gl_auth, lg_enc, lg_auth)
    } else {
        (lg_enc, lg_auth, gl_enc, gl_auth)
    };
    let arr16 = |v: &[u8]| -> Result<[u8; 16], CryptoError> {
        v.try_into().map_err(|_| CryptoError::Keymat)
    };
    let arr32 = |v: &[u8]| -> Result<[u8; 32], CryptoError> {
        v.try_into().map_err(|_| CryptoError::Keymat)
    };
    Ok((
        Outbound {
            spi: keys.peer_spi,
            enc: arr16(&out_e)?,
            auth: arr32(&out_a)?,
            seq: 0,
        },
        Inbound {
            spi: keys.our_spi,
            enc: arr16(&in_e)?,
            auth: arr32(&in_a)?,
            window: ReplayWindow::default(),
        },
    ))
}

impl Outbound {
    /// Sequence number of the last packet sent.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Continues numbering after `seq` (an SA moved with its VM: restarting
    /// at 1 would be rejected by the peer's replay window).
    pub fn resume_after(&mut self, seq: u32) {
        self.seq = seq;
    }

    /// Encrypts one BEET payload. Fails when the 32-bit sequence number
    /// would wrap: the SA must be rekeyed first.
    pub fn seal(&mut self, next_header: u8, payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut iv = [0u8; IV_LEN];
        OsRng.fill_bytes(&mut iv);
        self.seal_with_iv(next_header, payload, &iv)
    }

    pub fn seal_with_iv(
        &mut self,
        next_header: u8,
        payload: &[u8],
        iv: &[u8; IV_LEN],
    ) -> Result<Vec<u8>, CryptoError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(CryptoError::Esp("sequence number exhausted"))?;
        // Pad so payload | pad | pad len | next header fills whole blocks.
        let pad = (16 - (payload.len() + 2) % 16) % 16;
        let total = HEADER_LEN + IV_LEN + payload.len() + pad + 2 + ICV_LEN;
        if total > MAX_ESP_LEN {
            return Err(CryptoError::Esp("payload too large"));
        }
        let mut plain = Vec::with_capacity(payload.len() + pad + 2);
        plain.extend_from_slice(payload);
        plain.extend((1..=pad).map(|i| i as u8));
        plain.push(pad as u8);
        plain.push(next_header);
        let ct = Enc::new(&self.enc.into(), iv.into()).encrypt_padded_vec_mut::<NoPadding>(&plain);
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&self.spi.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(iv);
        out.extend_from_slice(&ct);
        let tag = icv(&self.auth, &out);
        out.extend_from_slice(&tag);
        Ok(out)
    }
}

/// SPI of an ESP packet (to find its SA).
pub fn spi_of(packet: &[u8]) -> Option<u32> {
    packet
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

impl Inbound {
    pub fn window(&self) -> &ReplayWindow {
        &self.window
    }

    pub fn restore_window(&mut self, w: ReplayWindow) {
        self.window = w;
    }

    /// Authenticates, replay-checks and decrypts; returns (next header,
    /// payload).
    pub fn open(&mut self, packet: &[u8]) -> Result<(u8, Vec<u8>), CryptoError> {
        let min = HEADER_LEN + IV_LEN + 16 + ICV_LEN;
        if packet.len() < min || packet.len() > MAX_ESP_LEN {
            return Err(CryptoError::Esp("bad length"));
        }
        let body_len = packet.len() - HEADER_LEN - IV_LEN - ICV_LEN;
        if !body_len.is_multiple_of(16) {
            return Err(CryptoError::Esp("ciphertext not block aligned"));
        }
        if spi_of(packet) != Some(self.spi) {
            return Err(CryptoError::Esp("wrong SPI"));
        }
        let seq = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        if !self.window.check(seq) {
            return Err(CryptoError::Esp("replayed or too old"));
        }
        let (authed, tag) = packet.split_at(packet.len() - ICV_LEN);
        let want = icv(&self.auth, authed);
        if want.iter().zip(tag).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return Err(CryptoError::Esp("ICV mismatch"));
        }
        self.window.update(seq);
        let iv = &packet[HEADER_LEN..HEADER_LEN + IV_LEN];
        let ct = &authed[HEADER_LEN + IV_LEN..];
        let mut iv_arr = [0u8; IV_LEN];
        iv_arr.copy_from_slice(iv);
        let plain = Dec::new(&self.enc.into(), &iv_arr.into())
            .decrypt_padded_vec_mut::<NoPadding>(ct)
            .map_err(|_| CryptoError::Esp("decrypt"))?;
        let n = plain.len();
        let next_header = plain[n - 1];
        let pad = usize::from(plain[n - 2]);
        if pad + 2 > n {
            return Err(CryptoError::Esp("bad padding length"));
        }
        let payload_len = n - 2 - pad;
        if plain[payload_len..n - 2]
            .iter()
            .enumerate()
            .any(|(i, b)| usize::from(*b) != i + 1)
        {
            return Err(CryptoError::Esp("bad padding"));
        }
        Ok((next_header, plain[..payload_len].to_vec()))
    }
}
