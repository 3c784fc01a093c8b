//! Checks a real base exchange with an independent implementation of the
//! RFC 7401 rules (tests/hip_check.py: Python hashlib/hmac + the
//! `cryptography` package, apt package python3-cryptography). The test
//! fails, rather than skips, when Python or the package is missing.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use roam_hip::identity::HostIdentity;
use roam_hip::machine::{Config, Host, Output};
use roam_hip::wire::PacketType;

/// The 2048-bit RSA key of the tests (made with `openssl genrsa`; PKCS#1).
pub fn rsa_test_identity() -> HostIdentity {
    let mut secret = roam_hip::identity::algorithm::RSA.to_be_bytes().to_vec();
    secret.extend_from_slice(include_bytes!("data/rsa2048-test-key.der"));
    HostIdentity::from_secret(&secret).unwrap()
}

/// Runs a base exchange between `ids[0]` (Initiator) and `ids[1]` and
/// checks its packets with tests/hip_check.py.
fn exchange_passes_the_checker(ids: [HostIdentity; 2]) -> tempfile::TempDir {
    let now = Instant::now();
    let [id0, id1] = ids;
    let mut hosts = [
        Host::new(id0, Config::default(), now).unwrap(),
        Host::new(id1, Config::default(), now).unwrap(),
    ];
    let addr: [SocketAddr; 2] = [
        "198.18.0.1:10500".parse().unwrap(),
        "198.18.0.2:10500".parse().unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut keymat = None;
    let peer = hosts[1].hit();
    let mut queue: Vec<(usize, Output)> = hosts[0]
        .connect(now, peer, addr[1])
        .unwrap()
        .into_iter()
        .map(|o| (0, o))
        .collect();
    while let Some((src, o)) = queue.pop() {
        match o {
            Output::Send { packet, .. } => {
                let bytes = packet.encode().unwrap();
                let name = match packet.header.packet_type {
                    PacketType::I1 => "i1.bin",
                    PacketType::R1 => "r1.bin",
                    PacketType::I2 => "i2.bin",
                    PacketType::R2 => "r2.bin",
                    other => panic!("unexpected {other:?}"),
                };
                std::fs::write(dir.path().join(name), &bytes).unwrap();
                let dst = 1 - src;
                for out in hosts[dst].receive_bytes(now, addr[src], &bytes).unwrap() {
                    queue.push((dst, out));
                }
            }
            Output::Established { keys, .. } => keymat = Some(keys.keymat.clone()),
            _ => {}
        }
    }
    std::fs::write(dir.path().join("keymat.hex"), hex::encode(keymat.unwrap())).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hip_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("python3 must be installed (apt: python3, python3-cryptography)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "independent checker failed:\n{text}");
    assert!(
        text.contains("all RFC 7401 base exchange checks passed"),
        "{text}"
    );

    dir
}

#[test]
fn python_checker_accepts_our_base_exchange() {
    let dir = exchange_passes_the_checker([HostIdentity::generate(), HostIdentity::generate()]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hip_check.py");
    // The checker is not a rubber stamp: a flipped bit in the R2's HIP_MAC_2
    // (its first parameter after ESP_INFO) must make it fail.
    let r2_path = dir.path().join("r2.bin");
    let mut r2 = std::fs::read(&r2_path).unwrap();
    r2[40 + 16 + 4] ^= 1;
    std::fs::write(&r2_path, r2).unwrap();
    let out = Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("HIP_MAC_2"));
}

/// Debian's python3 (where scripts/setup.sh installs python3-cryptography), else PATH's.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

#[test]
fn python_checker_accepts_rsa_initiator_with_ecdsa_responder() {
    exchange_passes_the_checker([rsa_test_identity(), HostIdentity::generate()]);
}

#[test]
fn python_checker_accepts_ecdsa_initiator_with_rsa_responder() {
    // RHASH is then SHA-256 (the RSA Responder's suite) for puzzle, MACs, KDF.
    exchange_passes_the_checker([HostIdentity::generate(), rsa_test_identity()]);
}
