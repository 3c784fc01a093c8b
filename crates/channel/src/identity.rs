//! A host's Ed25519 identity: generate, save, load, and the text form of its public key.
//!
//! The identity file is small, versioned text, written with mode 0600 and never
//! overwritten (losing a host key means every peer has to re-pin it):
//!
//! ```text
//! # roam host identity: secret, keep mode 0600
//! format: roam-identity/1
//! algorithm: ed25519
//! secret: <32-byte seed, base64url without padding>
//! public: ed25519:<32-byte key, base64url without padding>
//! ```
//!
//! `public` is redundant with `secret`; it is checked on load so that a damaged file is
//! reported instead of silently becoming a different host.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Prefix of the text form of a public key.
pub const KEY_PREFIX: &str = "ed25519:";
/// `format:` value of the identity file this code writes.
pub const IDENTITY_FORMAT: &str = "roam-identity/1";
/// Identity files are tiny; anything larger is not ours.
const MAX_IDENTITY_FILE: u64 = 4096;

/// An Ed25519 public key: what a peer is pinned by.
///
/// Text form (CLI, config, logs): `ed25519:` + 43 characters of base64url without padding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies an Ed25519 signature made by the holder of this key.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }

    /// A short form for log lines (first 8 base64 characters), never for pinning.
    pub fn short(&self) -> String {
        let full = URL_SAFE_NO_PAD.encode(self.0);
        full[..8].to_string()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text does not start with an algorithm prefix such as `ed25519:`.
    #[error("public key must look like `ed25519:<base64url>`; `{0}` has no `ed25519:` prefix")]
    MissingPrefix(String),
    /// The algorithm prefix names something other than ed25519.
    #[error("unsupported key algorithm `{0}`: only `ed25519` keys are accepted")]
    UnsupportedAlgorithm(String),
    /// The part after the prefix is not base64url without padding.
    #[error("public key is not valid base64url (no padding): {0}")]
    BadBase64(String),
    /// The decoded key has the wrong size.
    #[error("an ed25519 public key is 32 bytes, this one decodes to {got} bytes")]
    WrongLength {
        /// Number of decoded bytes.
        got: usize,
    },
}

/// Cuts user input short before echoing it in an error message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(24).collect();
    if s.chars().count() > 24 {
        out.push('…');
    }
    out
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some((alg, b64)) = s.split_once(':') else {
            return Err(KeyParseError::MissingPrefix(clip(s)));
        };
        if !alg.eq_ignore_ascii_case("ed25519") {
            return Err(KeyParseError::UnsupportedAlgorithm(clip(alg)));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|e| KeyParseError::BadBase64(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyParseError::WrongLength { got: bytes.len() })?;
        Ok(Self(arr))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why an identity could not be made, saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the identity file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Refusing to overwrite an existing identity.
    #[error("identity file {0} already exists; refusing to overwrite a host key")]
    AlreadyExists(PathBuf),
    /// Group or others can access the secret key.
    #[error("identity file {path} has mode {mode:o}; it holds a secret key and must be 0600")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than any identity file.
    #[error("identity file {path} is {size} bytes; not an identity file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file was written by a newer (or unknown) format.
    #[error("identity file {path} has format `{found}`; this build reads `{IDENTITY_FORMAT}`")]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The `format:` value found.
        found: String,
    },
    /// The file does not parse.
    #[error("identity file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The stored public key is not the one the secret key yields: the file is damaged.
    #[error("identity file {0} is damaged: its public key does not match its secret key")]
    KeyMismatch(PathBuf),
    /// The system random source or the key code failed.
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// A host's Ed25519 key pair. Cloning shares the key.
#[derive(Clone)]
pub struct Identity {
    seed: [u8; 32],
    key_pair: Arc<Ed25519KeyPair>,
    public: PublicKey,
}

impl AsRef<Identity> for Identity {
    fn as_ref(&self) -> &Identity {
        self
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        // Best effort: the key pair inside ring keeps its own copy.
        self.seed = [0; 32];
    }
}

impl Identity {
    /// Makes a new random identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| IdentityError::Crypto("system random source failed"))?;
        Self::from_seed(seed)
    }

    /// Rebuilds an identity from its 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, IdentityError> {
        let key_pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| IdentityError::Crypto("bad ed25519 seed"))?;
        let public: [u8; 32] = key_pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| IdentityError::Crypto("ed25519 public key is not 32 bytes"))?;
        Ok(Self {
            seed,
            key_pair: Arc::new(key_pair),
            public: PublicKey(public),
        })
    }

    /// The public half, the one peers pin.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Signs `msg` (64-byte Ed25519 signature).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let sig = self.key_pair.sign(msg);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }

    /// The key as PKCS#8 v1 DER (RFC 8410), the form rustls and rcgen take.
    pub(crate) fn pkcs8_der(&self) -> Vec<u8> {
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = Vec::with_capacity(48);
        der.extend_from_slice(&PREFIX);
        der.extend_from_slice(&self.seed);
        der
    }

    /// The file text (see the module doc).
    fn to_file_text(&self) -> String {
        format!(
            "# roam host identity: secret, keep mode 0600\nformat: {IDENTITY_FORMAT}\nalgorithm: ed25519\nsecret: {}\npublic: {}\n",
            URL_SAFE_NO_PAD.encode(self.seed),
            self.public
        )
    }

    /// Parses the file text; `path` is only for error messages.
    fn from_file_text(text: &str, path: &Path) -> Result<Self, IdentityError> {
        let malformed = |reason: &str| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let (mut format, mut alg, mut secret, mut public) = (None, None, None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| malformed("a line is not `key: value`"))?;
            let slot = match k.trim() {
                "format" => &mut format,
                "algorithm" => &mut alg,
                "secret" => &mut secret,
                "public" => &mut public,
                _ => continue, // later minor versions may add fields
            };
            if slot.replace(v.trim()).is_some() {
                return Err(malformed("a field appears twice"));
            }
        }
        let format = format.ok_or_else(|| malformed("no `format:` line"))?;
        if format != IDENTITY_FORMAT {
            return Err(IdentityError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: clip(format),
            });
        }
        if alg != Some("ed25519") {
            return Err(malformed("`algorithm:` must be ed25519"));
        }
        let seed = URL_SAFE_NO_PAD
            .decode(secret.ok_or_else(|| malformed("no `secret:` line"))?)
            .map_err(|_| malformed("`secret:` is not base64url"))?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| malformed("`secret:` is not 32 bytes"))?;
        let stored: PublicKey = public
            .ok_or_else(|| malformed("no `public:` line"))?
            .parse()
            .map_err(|e: KeyParseError| malformed(&format!("`public:`: {e}")))?;
        let id = Self::from_seed(seed)?;
        if id.public != stored {
            return Err(IdentityError::KeyMismatch(path.to_path_buf()));
        }
        Ok(id)
    }

    /// Writes the identity to a new file with mode 0600. Never overwrites: an existing
    /// file is an error ([`IdentityError::AlreadyExists`]).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            return Err(IdentityError::AlreadyExists(path.to_path_buf()));
        }
        // Write a temporary file then hard-link it into place: the link fails if the target
        // appeared meanwhile, and readers never see a half-written key.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = fs::remove_file(&tmp);
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(self.to_file_text().as_bytes())?;
            f.sync_all()?;
            fs::hard_link(&tmp, path)
        })();
        let _ = fs::remove_file(&tmp);
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(IdentityError::AlreadyExists(path.to_path_buf()))
            }
            Err(e) => return Err(io(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the new directory entry durable; failure here is not worth an error.
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Reads an identity file, refusing one that group or others may access.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = fs::File::open(path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.size() > MAX_IDENTITY_FILE {
            return Err(IdentityError::TooLarge {
                path: path.to_path_buf(),
                size: meta.size(),
            });
        }
        let mut text = String::new();
        f.take(MAX_IDENTITY_FILE)
            .read_to_string(&mut text)
            .map_err(io)?;
        Self::from_file_text(&text, path)
    }

    /// Loads the identity at `path`, or generates and saves one if there is no file.
    /// Returns the identity and whether it was just created.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(path) {
            Ok(id) => Ok((id, false)),
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let id = Self::generate()?;
                id.save(path)?;
                Ok((id, true))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trip() {
        let id = Identity::from_seed([7; 32]).unwrap();
        let text = id.public_key().to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(text.len(), 8 + 43);
        assert_eq!(text.parse::<PublicKey>().unwrap(), id.public_key());
    }

    #[test]
    fn key_parse_errors_name_the_problem() {
        assert!(matches!(
            "AAAA".parse::<PublicKey>(),
            Err(KeyParseError::MissingPrefix(_))
        ));
        assert!(matches!(
            "rsa:AAAA".parse::<PublicKey>(),
            Err(KeyParseError::UnsupportedAlgorithm(a)) if a == "rsa"
        ));
        assert!(matches!(
            "ed25519:!!!".parse::<PublicKey>(),
            Err(KeyParseError::BadBase64(_))
        ));
        assert_eq!(
            "ed25519:AAAA".parse::<PublicKey>(),
            Err(KeyParseError::WrongLength { got: 3 })
        );
        let msg = "rsa:AAAA".parse::<PublicKey>().unwrap_err().to_string();
        assert!(msg.contains("rsa") && msg.contains("ed25519"), "{msg}");
    }

    #[test]
    fn sign_verify() {
        let id = Identity::generate().unwrap();
        let sig = id.sign(b"hello");
        assert!(id.public_key().verify(b"hello", &sig));
        assert!(!id.public_key().verify(b"hellO", &sig));
    }

    #[test]
    fn serde_as_text() {
        let k = Identity::from_seed([1; 32]).unwrap().public_key();
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&j).unwrap(), k);
        assert!(serde_json::from_str::<PublicKey>("\"ed25519:AA\"").is_err());
    }

    #[test]
    fn damaged_file_is_detected() {
        let a = Identity::from_seed([1; 32]).unwrap();
        let b = Identity::from_seed([2; 32]).unwrap();
        let text = a
            .to_file_text()
            .replace(&a.public.to_string(), &b.public.to_string());
        let p = Path::new("x");
        assert!(matches!(
            Identity::from_file_text(&text, p),
            Err(IdentityError::KeyMismatch(_))
        ));
        let v2 = a
            .to_file_text()
            .replace("roam-identity/1", "roam-identity/2");
        assert!(matches!(
            Identity::from_file_text(&v2, p),
            Err(IdentityError::UnsupportedFormat { .. })
        ));
        assert!(matches!(
            Identity::from_file_text("format: roam-identity/1\n", p),
            Err(IdentityError::Malformed { .. })
        ));
    }
}
