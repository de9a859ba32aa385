//! Shared fixtures of the fuzz targets: a fixed test signing key (so that seed tokens signed
//! with it verify in every run), the clock the targets verify at, and the trust material built
//! from the key the way the CA and the agent build it.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use identity::{JwtAuthority, SpiffeId};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

/// A P-256 key (PKCS#8 DER, base64) made for the fuzz targets only; `fuzz/seeds.py` signs the
/// seed tokens with the same key.
const TEST_KEY_PKCS8_B64: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgEB8eIFtardfCri9vZTlw6YOLjvj6w8ftODuuRlgTCtahRANCAASZ//Gv0+t4ONWslREz5Bi2uGdbR3D+yE146vvVFsBjDrIuDyRhWGpy50VkZ7JM5ZyZ4uB1Vc5AAO5CQsKAMgM/";

/// The key ID of the test key, in the JWT authority and the JWKS.
pub const KEY_ID: &str = "fuzz-key";
/// The Kubernetes issuer the k8s targets configure.
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience the JWT-SVID targets verify for.
pub const AUDIENCE: &str = "kith-fuzz";

/// The time every target verifies at (2027-01-15): seed tokens carry `exp` after it.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

pub static TEST_KEY_PKCS8: LazyLock<Vec<u8>> = LazyLock::new(|| {
    STANDARD
        .decode(TEST_KEY_PKCS8_B64)
        .expect("test key is valid base64")
});

static KEY_PAIR: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &TEST_KEY_PKCS8,
        &SystemRandom::new(),
    )
    .expect("test key is a P-256 PKCS#8 key")
});

/// The test key as the CA publishes a JWT authority in the trust bundle.
pub static AUTHORITY: LazyLock<JwtAuthority> = LazyLock::new(|| {
    let signer = identity::jwt::JwtSigner::from_pkcs8(
        KEY_ID.to_owned(),
        &TEST_KEY_PKCS8,
        UNIX_EPOCH + Duration::from_secs(4_000_000_000),
    )
    .expect("test key loads as a JWT signer");
    signer.authority()
});

/// A JWKS with the test key, as a Kubernetes issuer serves it.
pub static K8S_JWKS: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let jwk = &AUTHORITY.jwk;
    serde_json::to_vec(&serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KEY_ID,
        "x": jwk["x"], "y": jwk["y"],
    }]}))
    .expect("jwks serializes")
});

/// The SPIFFE ID the CSR targets request for.
pub static EXPECTED_ID: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::new("spiffe://example.org/ns/default/sa/web").expect("valid id"));

/// `base64url(header).base64url(claims).base64url(ES256 signature)` with the test key.
pub fn sign_jwt(header: &[u8], claims: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let sig = KEY_PAIR
        .sign(&SystemRandom::new(), token.as_bytes())
        .expect("ecdsa signing");
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    token
}
