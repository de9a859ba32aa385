//! TLS 1.3 key exchange for kith: the post-quantum hybrid X25519MLKEM768
//! (draft-ietf-tls-ecdhe-mlkem, codepoint 0x11EC) as a rustls key-exchange group on the ring
//! provider, and the group lists every kith TLS user offers.
//!
//! rustls ships X25519MLKEM768 only with its aws-lc-rs provider; kith stays on ring (no C build,
//! no aws-lc-sys in the lock file), so the hybrid is put together here from ring's X25519 (the
//! ring provider's own group) and ML-KEM-768 from RustCrypto's `ml-kem` (pure Rust, FIPS 203).
//!
//! Wire layout, ML-KEM first (unlike the P-256 hybrid, where the classical part comes first):
//! - client share: ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key (32);
//! - server share: ML-KEM-768 ciphertext (1088) || X25519 public key (32);
//! - shared secret: ML-KEM shared secret (32) || X25519 shared secret (32).
//!
//! ML-KEM is a KEM, not a Diffie-Hellman: the server encapsulates to the client's key, so the
//! server side is `start_and_complete` (one step, with the client's share in hand).

use std::fmt;

use ml_kem::array::Array;
use ml_kem::{B32, DecapsulationKey, EncapsulationKey, KeyExport, MlKem768, Seed};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::ring::kx_group::X25519;
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::Zeroize;

/// X25519MLKEM768: ML-KEM-768 and X25519, both secrets into the TLS 1.3 key schedule. The
/// connection is as strong as the stronger of the two.
pub static X25519MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

/// ML-KEM-768 encapsulation key: the post-quantum part of the client's share.
pub const MLKEM768_ENCAP_LEN: usize = 1184;
/// ML-KEM-768 ciphertext: the post-quantum part of the server's share.
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;
/// X25519 public key: the classical part of both shares.
pub const X25519_LEN: usize = 32;
/// The client's whole key share.
pub const CLIENT_SHARE_LEN: usize = MLKEM768_ENCAP_LEN + X25519_LEN;
/// The server's whole key share.
pub const SERVER_SHARE_LEN: usize = MLKEM768_CIPHERTEXT_LEN + X25519_LEN;

const INVALID_KEY_SHARE: Error = Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);

/// The key-exchange groups kith offers, in order of preference. With `pq` on (the default
/// everywhere): X25519MLKEM768 first, then X25519, so that a peer without the hybrid still
/// agrees on X25519 in the same round trip (a kith client sends both key shares; the X25519
/// one is the hybrid's own X25519 key, so it costs no second key generation). With `pq` off:
/// X25519 only.
pub fn kx_groups(pq: bool) -> Vec<&'static dyn SupportedKxGroup> {
    if pq {
        vec![X25519MLKEM768, X25519]
    } else {
        vec![X25519]
    }
}

/// A short, fixed name for a negotiated group, for logs and metric labels ("X25519MLKEM768",
/// "X25519"; "other" for anything kith does not offer).
pub fn group_name(group: NamedGroup) -> &'static str {
    match group {
        NamedGroup::X25519MLKEM768 => "X25519MLKEM768",
        NamedGroup::X25519 => "X25519",
        _ => "other",
    }
}

/// The hybrid group itself; see the module documentation for the layout.
struct X25519MlKem768;

impl fmt::Debug for X25519MlKem768 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519MLKEM768")
    }
}

impl SupportedKxGroup for X25519MlKem768 {
    /// Client side: a fresh ML-KEM-768 key pair and a fresh X25519 key pair.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let classical = X25519.start()?;
        let mut seed = Seed::default();
        fill_random(&mut seed)?;
        let decaps = Box::new(DecapsulationKey::<MlKem768>::from_seed(seed));
        seed.zeroize();
        let encaps = decaps.encapsulation_key().to_bytes();
        let mut share = Vec::with_capacity(CLIENT_SHARE_LEN);
        share.extend_from_slice(&encaps);
        share.extend_from_slice(classical.pub_key());
        Ok(Box::new(ActiveHybrid {
            decaps,
            classical,
            share,
        }))
    }

    /// Server side: encapsulates to the client's ML-KEM key and completes X25519 with the
    /// client's X25519 key. A share of the wrong length, an ML-KEM key that fails the FIPS 203
    /// modulus check, or an X25519 key that gives the all-zero secret is refused as an invalid
    /// key share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != CLIENT_SHARE_LEN {
            return Err(INVALID_KEY_SHARE);
        }
        let (pq_share, classical_share) = client_share.split_at(MLKEM768_ENCAP_LEN);
        let key = Array::try_from(pq_share).map_err(|_| INVALID_KEY_SHARE)?;
        let encaps = EncapsulationKey::<MlKem768>::new(&key).map_err(|_| INVALID_KEY_SHARE)?;
        let classical = X25519.start_and_complete(classical_share)?;

        // SECURITY: encapsulation needs 32 uniformly random bytes, used once; they come from
        // the operating system through ring, like every other key of the handshake.
        let mut m = B32::default();
        fill_random(&mut m)?;
        let (ciphertext, mut pq_secret) = encaps.encapsulate_deterministic(&m);
        m.zeroize();

        let mut pub_key = Vec::with_capacity(SERVER_SHARE_LEN);
        pub_key.extend_from_slice(&ciphertext);
        pub_key.extend_from_slice(&classical.pub_key);
        let secret = combine(&pq_secret, classical.secret.secret_bytes());
        pq_secret.zeroize();
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret,
        })
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    /// Defined for TLS 1.3 only (kith compiles TLS 1.2 out anyway).
    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// The client's half-done exchange: its ML-KEM decapsulation key (wiped on drop by `ml-kem`'s
/// `zeroize` feature) and its X25519 key pair (ring's ephemeral key: single use, consumed by
/// `complete`).
struct ActiveHybrid {
    decaps: Box<DecapsulationKey<MlKem768>>,
    classical: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ActiveHybrid {
    /// Client side, with the server's share: decapsulates the ciphertext and completes X25519.
    /// A ciphertext of the right length never fails (ML-KEM's implicit rejection gives a
    /// secret the server does not have, and the handshake then fails on the server's Finished).
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        if peer_pub_key.len() != SERVER_SHARE_LEN {
            return Err(INVALID_KEY_SHARE);
        }
        let (pq_share, classical_share) = peer_pub_key.split_at(MLKEM768_CIPHERTEXT_LEN);
        let ciphertext = Array::try_from(pq_share).map_err(|_| INVALID_KEY_SHARE)?;
        let classical = self.classical.complete(classical_share)?;
        let mut pq_secret = ml_kem::Decapsulate::decapsulate(&*self.decaps, &ciphertext);
        let secret = combine(&pq_secret, classical.secret_bytes());
        pq_secret.zeroize();
        Ok(secret)
    }

    /// The X25519 half on its own: a kith client offers it as its second key share, so a
    /// server without the hybrid picks X25519 without a HelloRetryRequest.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((self.classical.group(), self.classical.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer_pub_key: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.classical.complete(peer_pub_key)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

/// ML-KEM secret, then X25519 secret, in a buffer that `SharedSecret` wipes when dropped.
fn combine(pq: &[u8], classical: &[u8]) -> SharedSecret {
    let mut both = Vec::with_capacity(pq.len() + classical.len());
    both.extend_from_slice(pq);
    both.extend_from_slice(classical);
    SharedSecret::from(both)
}

fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::FailedToGetRandomBytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_share() -> (Box<dyn ActiveKeyExchange>, Vec<u8>) {
        let active = X25519MLKEM768.start().expect("start");
        let share = active.pub_key().to_vec();
        (active, share)
    }

    #[test]
    fn shares_have_the_draft_layout_and_secrets_agree() {
        let (client, share) = client_share();
        assert_eq!(share.len(), CLIENT_SHARE_LEN);
        assert_eq!(client.group(), NamedGroup::X25519MLKEM768);
        assert_eq!(u16::from(client.group()), 0x11ec);
        // The X25519 half offered on its own is the tail of the hybrid share.
        let (group, x25519) = client.hybrid_component().expect("hybrid component");
        assert_eq!(group, NamedGroup::X25519);
        assert_eq!(x25519, &share[MLKEM768_ENCAP_LEN..]);

        let server = X25519MLKEM768
            .start_and_complete(&share)
            .expect("server completes");
        assert_eq!(server.pub_key.len(), SERVER_SHARE_LEN);
        assert_eq!(server.secret.secret_bytes().len(), 64);
        let secret = client.complete(&server.pub_key).expect("client completes");
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn secret_is_mlkem_then_x25519() {
        // The X25519 part of the combined secret must equal a plain X25519 exchange between
        // the same halves: only the tail 32 bytes can match it.
        let (client, share) = client_share();
        let server_x = X25519.start().expect("x25519");
        let server_x_pub = server_x.pub_key().to_vec();
        let plain = server_x
            .complete(&share[MLKEM768_ENCAP_LEN..])
            .expect("plain x25519");
        // A server share built from a real ciphertext and server_x's key.
        let full = X25519MLKEM768.start_and_complete(&share).expect("server");
        let mut forged = full.pub_key[..MLKEM768_CIPHERTEXT_LEN].to_vec();
        forged.extend_from_slice(&server_x_pub);
        let secret = client.complete(&forged).expect("client completes");
        assert_eq!(&secret.secret_bytes()[32..], plain.secret_bytes());
        assert_eq!(
            &secret.secret_bytes()[..32],
            &full.secret.secret_bytes()[..32]
        );
    }

    #[test]
    fn server_refuses_malformed_client_shares() {
        let (_client, share) = client_share();
        let refused = |bad: &[u8]| {
            let got = X25519MLKEM768.start_and_complete(bad).map(|_| ());
            assert_eq!(got, Err(INVALID_KEY_SHARE), "share of {} bytes", bad.len());
        };
        refused(&[]);
        refused(&share[..X25519_LEN]); // an X25519 share under the hybrid's codepoint
        refused(&share[..CLIENT_SHARE_LEN - 1]);
        refused(&[share.as_slice(), &[0]].concat());
        // An encapsulation key whose coefficients are not reduced mod q (all 0xff).
        let mut garbage = vec![0xff; MLKEM768_ENCAP_LEN];
        garbage.extend_from_slice(&share[MLKEM768_ENCAP_LEN..]);
        refused(&garbage);
        // A good ML-KEM key with an all-zero X25519 key (a low-order point: zero secret).
        let mut zero_x = share[..MLKEM768_ENCAP_LEN].to_vec();
        zero_x.extend_from_slice(&[0; X25519_LEN]);
        assert!(X25519MLKEM768.start_and_complete(&zero_x).is_err());
    }

    #[test]
    fn client_refuses_malformed_server_shares() {
        let (_client, share) = client_share();
        let good = X25519MLKEM768.start_and_complete(&share).expect("server");
        for bad in [
            Vec::new(),
            good.pub_key[..X25519_LEN].to_vec(),
            good.pub_key[..SERVER_SHARE_LEN - 1].to_vec(),
            [good.pub_key.as_slice(), &[0]].concat(),
        ] {
            let (client, _) = client_share();
            assert_eq!(
                client.complete(&bad).map(|_| ()),
                Err(INVALID_KEY_SHARE),
                "share of {} bytes",
                bad.len()
            );
        }
        // A garbled ciphertext of the right length: ML-KEM's implicit rejection gives a secret
        // that does not match the server's, so the handshake cannot complete.
        let (client, share) = client_share();
        let server = X25519MLKEM768.start_and_complete(&share).expect("server");
        let mut garbled = server.pub_key.clone();
        garbled[7] ^= 0x01;
        let secret = client.complete(&garbled).expect("implicit rejection");
        assert_ne!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn random_shares_of_any_length_are_refused_without_panic() {
        let rng = SystemRandom::new();
        let mut len = [0u8; 2];
        for _ in 0..300 {
            rng.fill(&mut len).expect("random");
            let n = usize::from(u16::from_be_bytes(len)) % (CLIENT_SHARE_LEN + 64);
            let mut share = vec![0; n];
            rng.fill(&mut share).expect("random");
            // Random bytes of the exact length are an ML-KEM key with unreduced coefficients
            // (all but certainly) and are refused like the rest.
            assert!(
                X25519MLKEM768.start_and_complete(&share).is_err(),
                "{n} bytes"
            );
            let (client, _) = client_share();
            let result = client.complete(&share);
            assert_eq!(result.is_ok(), n == SERVER_SHARE_LEN, "{n} bytes");
        }
        // The exact lengths, random content.
        let mut share = vec![0; CLIENT_SHARE_LEN];
        rng.fill(&mut share).expect("random");
        assert!(X25519MLKEM768.start_and_complete(&share).is_err());
        let mut share = vec![0; SERVER_SHARE_LEN];
        rng.fill(&mut share).expect("random");
        let (client, _) = client_share();
        // Any ciphertext decapsulates (implicit rejection); X25519 takes any 32 bytes but
        // low-order points, which random bytes are not.
        assert!(client.complete(&share).is_ok());
    }

    #[test]
    fn group_lists() {
        let names = |pq| kx_groups(pq).iter().map(|g| g.name()).collect::<Vec<_>>();
        assert_eq!(
            names(true),
            [NamedGroup::X25519MLKEM768, NamedGroup::X25519]
        );
        assert_eq!(names(false), [NamedGroup::X25519]);
        assert_eq!(group_name(NamedGroup::X25519MLKEM768), "X25519MLKEM768");
        assert_eq!(group_name(NamedGroup::X25519), "X25519");
        assert_eq!(group_name(NamedGroup::secp256r1), "other");
    }
}
