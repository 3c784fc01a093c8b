//! TLS 1.3 inside QUIC, authenticated by pinned Ed25519 keys instead of a CA.
//!
//! Each host presents a self-signed certificate made from its identity key. The
//! certificate is only a wrapper for the key: validity dates, names and issuers are
//! ignored. What is checked, on both sides:
//!
//! 1. the certificate parses and its SubjectPublicKeyInfo is exactly an Ed25519 key;
//! 2. that key is the pinned one: the expected key of the peer we dial (client side), or a
//!    key in the trust store (server side);
//! 3. the TLS 1.3 CertificateVerify signature over the handshake transcript verifies with
//!    that same key (rustls calls `verify_tls13_signature` with the certificate checked in
//!    step 2), which proves the peer holds the secret key, and only Ed25519 is offered.
//!
//! A refusal aborts the handshake with a TLS alert; no stream can be opened before it.
//! Session tickets are off so every connection is checked against the trust store as it
//! is *now* (a resumed session would skip the client certificate).

use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SignatureVerificationAlgorithm,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::ChannelError;
use crate::frame::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::identity::{Identity, PublicKey};
use crate::trust::{RefusalLog, TrustStore};

/// TLS server name the client asks for; the verifier ignores it (keys, not names).
pub(crate) const SERVER_NAME: &str = "roam";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// TLS alert numbers (RFC 8446 §6) seen inside QUIC CRYPTO_ERROR codes.
pub(crate) const ALERT_ACCESS_DENIED: u8 = 49;
pub(crate) const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// ALPN token of a protocol version.
fn alpn(version: u16) -> Vec<u8> {
    format!("roam/{version}").into_bytes()
}

/// The ALPN tokens offered, highest first: current and previous version. The server
/// picks the first of its own list that the client offered, i.e. the highest common one.
fn alpn_list() -> Vec<Vec<u8>> {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION)
        .rev()
        .map(alpn)
        .collect()
}

/// The protocol version an ALPN token names.
pub(crate) fn version_from_alpn(token: &[u8]) -> Option<u16> {
    std::str::from_utf8(token)
        .ok()?
        .strip_prefix("roam/")?
        .parse()
        .ok()
}

/// The Ed25519 key inside a certificate, or a rustls error saying why not.
pub(crate) fn key_from_cert(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    let key = spki
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        // Not an Ed25519 key: not something a roam host would present.
        .ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
    Ok(PublicKey::from_bytes(key))
}

/// A self-signed certificate for `identity`, and its key in the form rustls takes.
/// Made once per endpoint.
pub(crate) fn self_signed(
    identity: &Identity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), ChannelError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(identity.pkcs8_der());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| ChannelError::Tls(format!("identity key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| ChannelError::Tls(format!("certificate parameters: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("roam host {}", identity.public_key()),
    );
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| ChannelError::Tls(format!("self-signing: {e}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// Only Ed25519 handshake signatures, via *ring*.
fn ed25519_only() -> WebPkiSupportedAlgorithms {
    static ALL: &[&dyn SignatureVerificationAlgorithm] = &[webpki::ring::ED25519];
    static MAPPING: &[(SignatureScheme, &[&dyn SignatureVerificationAlgorithm])] =
        &[(SignatureScheme::ED25519, ALL)];
    WebPkiSupportedAlgorithms {
        all: ALL,
        mapping: MAPPING,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client side: accepts the server only if its key is the expected one.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    expected: PublicKey,
    /// The key the server showed when it was refused, for a typed error after the
    /// handshake fails (quinn only reports the alert).
    pub(crate) refused: Mutex<Option<PublicKey>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = key_from_cert(end_entity)?;
        if got != self.expected {
            tracing::warn!(expected = %self.expected, %got, "server presented the wrong key; refusing");
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; never called.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: accepts a client only if its key is in the trust store.
#[derive(Debug)]
struct TrustedClientVerifier {
    trust: Arc<dyn TrustStore>,
    refusals: Arc<RefusalLog>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for TrustedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = key_from_cert(end_entity)?;
        if self.trust.lookup(&key).is_none() {
            let err = ChannelError::UnknownPeer { key };
            tracing::warn!(%key, "refusing handshake: {err}");
            self.refusals.record(key);
            // Sent as the access_denied alert; the client maps it back to UnknownPeer.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// TLS configuration of the accepting side.
pub(crate) fn server_crypto(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    trust: Arc<dyn TrustStore>,
    refusals: Arc<RefusalLog>,
) -> Result<QuicServerConfig, ChannelError> {
    let verifier = Arc::new(TrustedClientVerifier {
        trust,
        refusals,
        algs: ed25519_only(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ChannelError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(|e| ChannelError::Tls(e.to_string()))?;
    cfg.alpn_protocols = alpn_list();
    // No resumption: every handshake must go through the trust store.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    QuicServerConfig::try_from(cfg).map_err(|e| ChannelError::Tls(e.to_string()))
}

/// TLS configuration for dialing a peer whose key must be `expected`. The verifier is
/// returned too: after a failed handshake it tells which key the server showed.
pub(crate) fn client_crypto(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    expected: PublicKey,
) -> Result<(QuicClientConfig, Arc<PinnedServerVerifier>), ChannelError> {
    let verifier = Arc::new(PinnedServerVerifier {
        expected,
        refused: Mutex::new(None),
        algs: ed25519_only(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ChannelError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| ChannelError::Tls(e.to_string()))?;
    cfg.alpn_protocols = alpn_list();
    cfg.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| ChannelError::Tls(e.to_string()))?;
    Ok((quic, verifier))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cert_carries_the_identity_key() {
        let id = Identity::generate().unwrap();
        let (cert, _) = self_signed(&id).unwrap();
        assert_eq!(key_from_cert(&cert).unwrap(), id.public_key());
    }

    #[test]
    fn garbage_cert_is_bad_encoding() {
        let junk = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        assert!(matches!(
            key_from_cert(&junk),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding
            ))
        ));
    }

    #[test]
    fn alpn_offers_current_then_previous() {
        let list = alpn_list();
        assert_eq!(list[0], b"roam/1".to_vec());
        assert_eq!(version_from_alpn(&list[0]), Some(PROTOCOL_VERSION));
        assert_eq!(version_from_alpn(b"h3"), None);
    }
}
