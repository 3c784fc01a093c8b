//! Identity files on a real filesystem.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use roam_channel::{Identity, IdentityError, PublicKey};

#[test]
fn save_load_round_trip_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    let id = Identity::generate().unwrap();
    id.save(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("format: roam-identity/1"), "{text}");
    assert!(text.contains(&id.public_key().to_string()));

    let back = Identity::load(&path).unwrap();
    assert_eq!(back.public_key(), id.public_key());
    // Same secret: signatures verify under the original key.
    assert!(id.public_key().verify(b"m", &back.sign(b"m")));
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn never_overwrites_a_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    let first = Identity::generate().unwrap();
    first.save(&path).unwrap();
    let second = Identity::generate().unwrap();
    assert!(matches!(
        second.save(&path),
        Err(IdentityError::AlreadyExists(_))
    ));
    assert_eq!(
        Identity::load(&path).unwrap().public_key(),
        first.public_key()
    );
}

#[test]
fn refuses_a_readable_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    Identity::generate().unwrap().save(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(
        matches!(err, IdentityError::InsecurePermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0600"));
}

#[test]
fn load_or_generate_creates_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-key");
    let (a, created) = Identity::load_or_generate(&path).unwrap();
    assert!(created);
    let (b, created) = Identity::load_or_generate(&path).unwrap();
    assert!(!created);
    assert_eq!(a.public_key(), b.public_key());
}

#[test]
fn damaged_or_foreign_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    Identity::generate().unwrap().save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let other = Identity::generate().unwrap().public_key().to_string();
    let start = text.find("public: ").unwrap() + 8;
    let damaged = format!("{}{}\n", &text[..start], other);
    std::fs::write(&path, damaged).unwrap();
    assert!(matches!(
        Identity::load(&path),
        Err(IdentityError::KeyMismatch(_))
    ));
    std::fs::write(&path, vec![b'x'; 10_000]).unwrap();
    assert!(matches!(
        Identity::load(&path),
        Err(IdentityError::TooLarge { .. })
    ));
}

#[test]
fn cli_text_form() {
    let id = Identity::generate().unwrap();
    let text = id.public_key().to_string();
    let parsed: PublicKey = format!("  {text}\n").parse().unwrap();
    assert_eq!(parsed, id.public_key());
    let err = text
        .replace("ed25519:", "")
        .parse::<PublicKey>()
        .unwrap_err();
    assert!(err.to_string().contains("ed25519:"), "{err}");
}
