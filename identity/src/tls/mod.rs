//! The rustls plumbing every kith TLS user shares: the ring provider with the key-exchange
//! groups of each use ([`Kx`]), TLS 1.3-only config builders, one SPIFFE verifier for both
//! sides ([`SpiffeVerifier`]), one verifier for connections whose peer is authenticated by
//! something other than its certificate ([`AuthenticatedLater`]), and one hot-swapped
//! certificate ([`HotCert`]).
//!
//! TLS 1.2 is compiled out of the workspace's rustls (no `tls12` feature); the verifiers refuse
//! its signatures all the same.

mod hot;
mod later;
mod verify;

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, ConfigBuilder, DigitallySignedStruct, ServerConfig, WantsVerifier};
use rustls_pki_types::CertificateDer;

pub use hot::{Current, HotCert};
pub use later::{AuthenticatedLater, Why};
pub use verify::{
    BundleSource, ChainCache, Expect, RejectedChain, SpiffeVerifier, UnexpectedPeer, verify_chain,
};

/// The key-exchange groups a TLS user offers, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kx {
    /// X25519MLKEM768 first, X25519 second: the mesh default (see [`crate::kx`]).
    Hybrid,
    /// X25519 only: the mesh with post-quantum key exchange turned off.
    X25519,
    /// ring's defaults, X25519, P-256 and P-384: for peers outside the mesh (the CA's API and
    /// its clients, PostgreSQL, the kube-apiserver). PostgreSQL 15 refuses an X25519-only hello.
    Wide,
}

impl Kx {
    /// [`Kx::Hybrid`] when `pq` is on, [`Kx::X25519`] otherwise.
    pub fn mesh(pq: bool) -> Self {
        if pq { Self::Hybrid } else { Self::X25519 }
    }
}

/// ring with the mesh's groups ([`Kx::Hybrid`]).
pub fn provider() -> Arc<CryptoProvider> {
    provider_with(Kx::Hybrid)
}

/// ring with the groups of `kx`.
pub fn provider_with(kx: Kx) -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    match kx {
        Kx::Hybrid => provider.kx_groups = crate::kx::kx_groups(true),
        Kx::X25519 => provider.kx_groups = crate::kx::kx_groups(false),
        Kx::Wide => {}
    }
    Arc::new(provider)
}

/// A server configuration builder: ring with `kx`, TLS 1.3 only.
pub fn server_builder(kx: Kx) -> Result<ConfigBuilder<ServerConfig, WantsVerifier>, rustls::Error> {
    ServerConfig::builder_with_provider(provider_with(kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
}

/// A client configuration builder: ring with `kx`, TLS 1.3 only.
pub fn client_builder(kx: Kx) -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, rustls::Error> {
    ClientConfig::builder_with_provider(provider_with(kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
}

/// The handshake-signature checks the verifiers share: ring's algorithms (the same for every
/// [`Kx`]), TLS 1.3 only.
#[derive(Clone, Copy, Debug)]
struct Signatures(WebPkiSupportedAlgorithms);

/// The three handshake-signature methods that rustls's verifier traits (server and client
/// side alike) ask for, delegated to the verifier's `signatures` field: written once for every
/// verifier impl of this module.
macro_rules! signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls_pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.signatures.tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.signatures.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.signatures.schemes()
        }
    };
}
use signature_methods;

impl Signatures {
    fn ring() -> Self {
        Self(rustls::crypto::ring::default_provider().signature_verification_algorithms)
    }

    fn tls12(&self) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("tls 1.2 is not supported".into()))
    }

    /// SECURITY: the proof that the peer holds the key of the certificate it showed; checked
    /// by every verifier, including those that accept any certificate.
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::NamedGroup;

    fn groups(kx: Kx) -> Vec<NamedGroup> {
        provider_with(kx)
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect()
    }

    #[test]
    fn each_kx_offers_its_groups() {
        assert_eq!(
            groups(Kx::Hybrid),
            [NamedGroup::X25519MLKEM768, NamedGroup::X25519]
        );
        assert_eq!(groups(Kx::X25519), [NamedGroup::X25519]);
        assert_eq!(
            groups(Kx::Wide),
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
        assert_eq!(Kx::mesh(true), Kx::Hybrid);
        assert_eq!(Kx::mesh(false), Kx::X25519);
    }
}
