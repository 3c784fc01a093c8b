#![no_main]
//! HOST_ID contents of any algorithm (ECDSA, RSA per RFC 3110) and stored
//! identity secrets: parsing must not panic, and an accepted RSA HI must
//! re-encode to the same bytes.

use libfuzzer_sys::fuzz_target;
use roam_hip::hi_rsa;
use roam_hip::identity::{algorithm, HostIdentity, PeerIdentity};
use roam_hip::wire::params::{HostIdParam, ParamBody};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = HostIdParam::decode(data) {
        let _ = PeerIdentity::from_param(&p);
    }
    for alg in [algorithm::RSA, algorithm::ECDSA] {
        let p = HostIdParam {
            algorithm: alg,
            hi: data.to_vec(),
            di_type: 0,
            di: Vec::new(),
        };
        let _ = PeerIdentity::from_param(&p);
    }
    if let Ok(key) = hi_rsa::decode_hi(data) {
        assert_eq!(hi_rsa::encode_hi(&key), data);
    }
    let _ = HostIdentity::from_secret(data);
});
