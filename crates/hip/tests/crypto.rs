//! Known-answer and round-trip tests for identities, HITs, DH, KEYMAT, the
//! puzzle, HMAC/signature coverage and the ENCRYPTED cipher. Vectors marked
//! "computed independently" were produced with Python's hashlib/hmac from
//! the RFC formulas, not with this crate.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use roam_hip::crypto::{cipher, dh, keymat, mac, puzzle};
use roam_hip::identity::*;
use roam_hip::wire::params::*;
use roam_hip::wire::{Hit, Packet, PacketType, RawParam};
use roam_hip::{CryptoError, Error};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).unwrap()
}

fn hit_from(s: &str) -> Hit {
    Hit(h(s).try_into().unwrap())
}

#[test]
fn orchid_kat_sha384_and_sha256() {
    // HI = curve 1 | 0x04 | 01..40 (computed independently).
    let mut hi = vec![0x00, 0x01, 0x04];
    hi.extend(1u8..=64);
    assert_eq!(
        orchid(HitSuite::EcdsaSha384, &hi),
        hit_from("20010022b4d8aa459bcbb134d07b3965")
    );
    assert_eq!(
        orchid(HitSuite::RsaDsaSha256, &hi),
        hit_from("2001002153baf135f0f950cfbdbaa0c7")
    );
}

#[test]
fn host_identity_encoding_and_hit() {
    let id = HostIdentity::from_secret_bytes(&[7u8; 32]).unwrap();
    let p = id.host_id_param();
    assert_eq!(p.algorithm, 7);
    // ECC Curve 1 (P-256), then the 65-byte uncompressed point.
    assert_eq!(p.hi.len(), 67);
    assert_eq!(&p.hi[..3], &[0, 1, 4]);
    let raw = RawParam::from_body(&p).unwrap();
    // HI Length 67, no DI, algorithm 7: byte by byte.
    assert_eq!(&raw.contents()[..6], &[0, 67, 0, 0, 0, 7]);
    assert_eq!(raw.wire().len(), 80);
    assert!(is_orchid(&id.hit()));
    assert_eq!(id.hit().oga_id(), 2);
    assert_eq!(id.hit(), orchid(HitSuite::EcdsaSha384, &p.hi));
    let peer = PeerIdentity::from_param(&p).unwrap();
    assert_eq!(peer.hit(), id.hit());
    // Restoring from the secret gives the same identity (VM migration).
    let again = HostIdentity::from_secret_bytes(&id.secret_bytes()).unwrap();
    assert_eq!(again.hit(), id.hit());
}

#[test]
fn signatures_verify_and_reject() {
    let id = HostIdentity::generate();
    let sig = id.sign(b"hello");
    assert_eq!(sig.len(), 64);
    id.peer().verify(b"hello", &sig).unwrap();
    assert_eq!(
        id.peer().verify(b"hellO", &sig),
        Err(CryptoError::Signature)
    );
    let other = HostIdentity::generate();
    assert_eq!(
        other.peer().verify(b"hello", &sig),
        Err(CryptoError::Signature)
    );
}

#[test]
fn lsi_pool_uses_198_19_and_is_stable() {
    let mut pool = LsiPool::new();
    let a = pool.allocate(Hit([1; 16])).unwrap();
    let b = pool.allocate(Hit([2; 16])).unwrap();
    assert_ne!(a, b);
    for x in [a, b] {
        assert_eq!(&x.octets()[..2], &[198, 19]);
    }
    assert_eq!(pool.allocate(Hit([1; 16])).unwrap(), a);
    assert_eq!(pool.hit_of(&a), Some(Hit([1; 16])));
    // A colliding start value probes to the next free address.
    let mut c = [1u8; 16];
    c[0] = 9;
    let c_lsi = pool.allocate(Hit(c)).unwrap();
    assert_ne!(c_lsi, a);
    pool.release(&Hit([1; 16]));
    assert_eq!(pool.get(&Hit([1; 16])), None);
    assert_eq!(pool.len(), 2);
}

#[test]
fn ecdh_p256_rfc5903_kat() {
    // RFC 5903 §8.1.
    let i = DhKeyPair::from("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433");
    assert_eq!(
        hex::encode_upper(i.public()),
        concat!(
            "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180",
            "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3"
        )
    );
    let r = DhKeyPair::from("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53");
    let ir = i.shared(r.public()).unwrap();
    let ri = r.shared(i.public()).unwrap();
    assert_eq!(ir, ri);
    assert_eq!(
        hex::encode_upper(&ir),
        "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE"
    );
}

struct DhKeyPair;
impl DhKeyPair {
    #[allow(clippy::new_ret_no_self, clippy::should_implement_trait)]
    fn from(s: &str) -> dh::DhKey {
        dh::DhKey::p256_from_secret(&h(s).try_into().unwrap()).unwrap()
    }
}

#[test]
fn ecdh_rejects_invalid_points() {
    let k = dh::DhKey::generate(dh::GROUP_NIST_P256).unwrap();
    assert_eq!(k.public().len(), 64);
    assert_eq!(k.shared(&[0u8; 64]), Err(CryptoError::DhPublic));
    assert_eq!(k.shared(&[1u8; 63]), Err(CryptoError::DhPublic));
}

#[test]
fn modp_1536_agreement_and_range_check() {
    let p = dh::modp_1536_prime();
    assert_eq!(p.bits(), 1536);
    let a = dh::DhKey::generate(dh::GROUP_MODP_1536).unwrap();
    let b = dh::DhKey::generate(dh::GROUP_MODP_1536).unwrap();
    assert_eq!(a.public().len(), 192);
    let s1 = a.shared(b.public()).unwrap();
    assert_eq!(s1, b.shared(a.public()).unwrap());
    assert_eq!(s1.len(), 192);
    let mut one = vec![0u8; 192];
    one[191] = 1;
    assert_eq!(a.shared(&one), Err(CryptoError::DhPublic));
    let pm1 = (p - 1u32).to_bytes_be();
    assert_eq!(a.shared(&pm1), Err(CryptoError::DhPublic));
    assert_eq!(dh::DhKey::generate(5).err(), Some(CryptoError::DhGroup(5)));
}

#[test]
fn group_selection_follows_responder_order() {
    assert_eq!(dh::select_group(&[7, 3], &[3, 4, 7]), Some(7));
    assert_eq!(dh::select_group(&[7, 3], &[4, 3]), Some(3));
    assert_eq!(dh::select_group(&[7, 3], &[8]), None);
}

#[test]
fn keymat_hkdf_kat_and_sorting() {
    // Computed independently: HKDF-SHA384(salt=I|J, IKM=Kij,
    // info=sort(HIT-I|HIT-R)), HIT-I > HIT-R so HIT-R comes first.
    let hit_i = hit_from("20010022111111111111111111111111");
    let hit_r = hit_from("20010022000000000000000000000001");
    let kij: Vec<u8> = (0u8..32).collect();
    let km = keymat::derive(
        Rhash::Sha384,
        &kij,
        &hit_i,
        &hit_r,
        &[0xa5; 48],
        &[0x3c; 48],
        128,
    )
    .unwrap();
    assert_eq!(hex::encode(&km[..80]), "8ffb4f5815a8df3dc3489c4db3fee13e258fb853a60539737fd3f0c80fd45adb1cd46875344f7d42c1866c5057e636571a4fd241032a52add1d65fc7c93130936ccf4350dd1ff23fd507c90ea3be3d83");
    // Swapping the HIT roles gives the same KEYMAT (both ends agree).
    let km2 = keymat::derive(
        Rhash::Sha384,
        &kij,
        &hit_r,
        &hit_i,
        &[0xa5; 48],
        &[0x3c; 48],
        128,
    )
    .unwrap();
    assert_eq!(km, km2);
    // Key orientation: each side's "ours" is the other's "peer".
    let mut d1 = keymat::Drawer::new(&km);
    let mut d2 = keymat::Drawer::new(&km);
    let g = keymat::HipKeys::draw(&mut d1, 16, 48, true).unwrap();
    let l = keymat::HipKeys::draw(&mut d2, 16, 48, false).unwrap();
    assert_eq!(g.our_enc, l.peer_enc);
    assert_eq!(g.our_mac, l.peer_mac);
    assert_eq!(&g.our_enc[..], &km[..16]);
    assert_eq!(d1.index(), 128);
}

#[test]
fn puzzle_kat_and_solve() {
    let hit_i = hit_from("20010022111111111111111111111111");
    let hit_r = hit_from("20010022000000000000000000000001");
    let i = [0u8; 48];
    // Computed independently: J = 723 is the first counter value whose
    // SHA-384 has its 8 low-order bits zero.
    let mut j = [0u8; 48];
    j[46..].copy_from_slice(&723u16.to_be_bytes());
    assert!(puzzle::verify(Rhash::Sha384, &i, &hit_i, &hit_r, &j, 8));
    let mut j2 = j;
    j2[47] ^= 1;
    assert!(!puzzle::verify(Rhash::Sha384, &i, &hit_i, &hit_r, &j2, 8));
    // Swapped HITs are a different puzzle.
    assert!(
        !puzzle::verify(Rhash::Sha384, &i, &hit_r, &hit_i, &j, 8)
            || puzzle::verify(Rhash::Sha384, &i, &hit_r, &hit_i, &j, 0)
    );
    let sol = puzzle::solve(Rhash::Sha256, &[9u8; 32], &hit_i, &hit_r, 10, 1 << 20).unwrap();
    assert!(puzzle::verify(
        Rhash::Sha256,
        &[9u8; 32],
        &hit_i,
        &hit_r,
        &sol,
        10
    ));
    assert_eq!(
        puzzle::solve(Rhash::Sha256, &[9u8; 32], &hit_i, &hit_r, 40, 1),
        Err(CryptoError::PuzzleDifficulty(40))
    );
}

#[test]
fn hmac_sha384_rfc4231_case1() {
    let m = mac::hmac(Rhash::Sha384, &[0x0b; 20], b"Hi There");
    assert_eq!(hex::encode(m), "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6");
}

#[test]
fn aes_128_cbc_rfc3602_case1_and_roundtrip() {
    let key = h("06a9214036b8a15b512e03d534120006");
    let iv: [u8; 16] = h("3dafba429d9eb430b422da802c9fac41").try_into().unwrap();
    let out = cipher::encrypt_with_iv(cipher::CIPHER_AES_128_CBC, &key, &iv, b"Single block msg")
        .unwrap();
    assert_eq!(&out[..16], &iv);
    assert_eq!(
        hex::encode(&out[16..32]),
        "e353779c1079aeb82708942dbe77181a"
    );
    assert_eq!(
        out.len(),
        48,
        "PKCS#7 adds a full block to an aligned input"
    );
    let plain = cipher::decrypt(cipher::CIPHER_AES_128_CBC, &key, &out).unwrap();
    assert_eq!(&plain[..16], b"Single block msg");
    assert_eq!(&plain[16..], &[16u8; 16]);
    assert_eq!(
        cipher::decrypt(cipher::CIPHER_AES_128_CBC, &key, &out[..40]),
        Err(CryptoError::Decrypt)
    );
}

fn signed_r1(id: &HostIdentity) -> Packet {
    let mut p = Packet::new(PacketType::R1, id.hit(), Hit::NULL);
    p.add(&R1Counter {
        reserved: 0,
        counter: 1,
    })
    .unwrap();
    p.add(&Puzzle {
        k: 1,
        lifetime: 37,
        opaque: [0, 0],
        i: vec![0; 48],
    })
    .unwrap();
    p.add(&DiffieHellman {
        group: 7,
        public: vec![1; 64],
    })
    .unwrap();
    p.add(&HipCipher(vec![2])).unwrap();
    p.add(&id.host_id_param()).unwrap();
    p.add(&HitSuiteList(vec![0x20])).unwrap();
    p.add(&DhGroupList(vec![7, 3])).unwrap();
    p.add(&TransportFormatList(vec![ty::ESP_TRANSFORM]))
        .unwrap();
    p.add(&EspTransform(vec![8])).unwrap();
    mac::add_signature2(&mut p, id).unwrap();
    p
}

#[test]
fn signature2_excludes_initiator_hit_and_puzzle_values() {
    let id = HostIdentity::generate();
    let r1 = signed_r1(&id);
    // Fill in what precreated R1s leave open: Initiator HIT, #I, Opaque,
    // and an unsigned echo request after the signature.
    let mut sent = r1.clone();
    sent.header.receiver_hit = Hit([0x42; 16]);
    sent.remove(ty::PUZZLE);
    sent.add(&Puzzle {
        k: 1,
        lifetime: 37,
        opaque: [9, 9],
        i: vec![0x77; 48],
    })
    .unwrap();
    sent.add(&EchoRequestUnsigned(vec![1, 2, 3])).unwrap();
    let wire = sent.encode().unwrap();
    let got = Packet::decode(&wire).unwrap();
    mac::verify_signature2(&got, &id.peer()).unwrap();
    // But #K and the DH value are covered.
    let mut k_changed = got.clone();
    k_changed.remove(ty::PUZZLE);
    k_changed
        .add(&Puzzle {
            k: 0,
            lifetime: 37,
            opaque: [9, 9],
            i: vec![0x77; 48],
        })
        .unwrap();
    assert!(matches!(
        mac::verify_signature2(&k_changed, &id.peer()),
        Err(Error::Crypto(CryptoError::Signature))
    ));
    let mut dh_changed = got;
    dh_changed.remove(ty::DIFFIE_HELLMAN);
    dh_changed
        .add(&DiffieHellman {
            group: 7,
            public: vec![2; 64],
        })
        .unwrap();
    assert!(mac::verify_signature2(&dh_changed, &id.peer()).is_err());
}

#[test]
fn mac_and_signature_coverage() {
    let id = HostIdentity::generate();
    let key = [0x33u8; 48];
    let mut p = Packet::new(PacketType::Update, id.hit(), Hit([9; 16]));
    p.add(&Seq(0)).unwrap();
    mac::add_mac(&mut p, Rhash::Sha384, &key).unwrap();
    mac::add_signature(&mut p, &id).unwrap();
    p.add(&EchoResponseUnsigned(vec![5])).unwrap();
    // The covered input has the header length set to the MAC's offset and
    // a zero checksum.
    let input = mac::mac_input(&p).unwrap();
    assert_eq!(input.len(), 48);
    assert_eq!(input[1], 5);
    let got = Packet::decode(&p.encode().unwrap()).unwrap();
    mac::verify_mac(&got, Rhash::Sha384, &key).unwrap();
    mac::verify_signature(&got, &id.peer()).unwrap();
    // The checksum field is not covered.
    let mut wire = p.encode().unwrap();
    wire[4] = 0xab;
    let got2 = Packet::decode(&wire).unwrap();
    mac::verify_mac(&got2, Rhash::Sha384, &key).unwrap();
    // Tampering with SEQ breaks both.
    let mut t = got.clone();
    t.remove(ty::SEQ);
    t.add(&Seq(1)).unwrap();
    assert!(matches!(
        mac::verify_mac(&t, Rhash::Sha384, &key),
        Err(Error::Crypto(CryptoError::Mac))
    ));
    assert!(mac::verify_signature(&t, &id.peer()).is_err());
    assert!(matches!(
        mac::verify_mac(&got, Rhash::Sha384, &[0u8; 48]),
        Err(Error::Crypto(CryptoError::Mac))
    ));
}

#[test]
fn mac2_covers_responder_host_id() {
    let id = HostIdentity::generate();
    let host_id = RawParam::from_body(&id.host_id_param()).unwrap();
    let key = [0x44u8; 48];
    let mut r2 = Packet::new(PacketType::R2, id.hit(), Hit([1; 16]));
    mac::add_mac2(&mut r2, Rhash::Sha384, &key, &host_id).unwrap();
    mac::add_signature(&mut r2, &id).unwrap();
    let input = mac::mac2_input(&r2, &host_id).unwrap();
    assert_eq!(input.len(), 40 + 80);
    assert_eq!(input[1], (120 / 8 - 1) as u8);
    mac::verify_mac2(&r2, Rhash::Sha384, &key, &host_id).unwrap();
    let other = RawParam::from_body(&HostIdentity::generate().host_id_param()).unwrap();
    assert!(mac::verify_mac2(&r2, Rhash::Sha384, &key, &other).is_err());
}

#[test]
fn ecdsa_p256_sha384_interop_vector() {
    // Key d = 07..07; the HI, HIT and a signature over the message below
    // were made with Python `cryptography` (ECDSA P-256, SHA-384).
    let id = HostIdentity::from_secret_bytes(&[7u8; 32]).unwrap();
    let x = "1e18532fd4754c02f3041d9c75ceb33b83ffd81ac7ce4fe882ccb1c98bc5896e";
    let y = "a46c311c4e2ff40dd96a3653e6e45445d32dfe486eced75c7a90c6a18881c0a3";
    assert_eq!(hex::encode(&id.host_id_param().hi), format!("000104{x}{y}"));
    assert_eq!(id.hit(), hit_from("200100220ad9f8810c0f7bf45afa2bce"));
    let sig = h(concat!(
        "21bdbed7a197e081a54468e8c6bb38fc3eafa369075d0835003c2f0839af54f3",
        "2ac9d4b8d70187c419da5e39da4170fca1e127fddc44051fd6eb4ccd336d2cfc"
    ));
    id.peer()
        .verify(b"HIP signature interop vector", &sig)
        .unwrap();
    assert!(id
        .peer()
        .verify(b"HIP signature interop vector!", &sig)
        .is_err());
    // p256 signs deterministically (RFC 6979); Python `cryptography`
    // verified this exact signature.
    assert_eq!(
        hex::encode(id.sign(b"HIP signature interop vector")),
        concat!(
            "dbfbada143d15bfda68a0f4dc8550ec08d7dd4ad8c87d0cdb6e8ab2369682869",
            "950b5ddc81a6da9902d56c6d524370129a1665d097dc2b96e957995ad6da9d9a"
        )
    );
}
