//! A Kubernetes cluster's service-account signing key for tests: the JWK set a CA is started
//! with, and projected tokens minted for a pod as the kubelet would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

/// The service-account issuer of [`ClusterKey`] tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A Kubernetes cluster's service-account signing key (ES256), for CAs started with
/// `--k8s-issuer ISSUER --k8s-jwks <file with the JWK set>` in tests.
pub struct ClusterKey {
    enc: EncodingKey,
    kid: String,
    /// The public key as a JWK (kid "lab" unless made [`ClusterKey::with_kid`]).
    pub jwk: Value,
}

impl ClusterKey {
    pub fn new() -> Self {
        Self::with_kid("lab")
    }

    /// A key whose JWK names it `kid`.
    pub fn with_kid(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng).unwrap();
        let p = pair.public_key().as_ref().to_vec();
        let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                         "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..])});
        Self {
            enc: EncodingKey::from_ec_der(der.as_ref()),
            kid: kid.to_owned(),
            jwk,
        }
    }

    /// `claims` signed with this key (ES256), the header naming the key `kid`: this key's, or
    /// another one's, as a forger would.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, claims, &self.enc).unwrap()
    }

    /// `{"keys": [jwk]}`, the content of a `--k8s-jwks` file.
    pub fn jwks(&self) -> String {
        json!({"keys": [self.jwk]}).to_string()
    }

    /// A projected token (audience `kith-ca`, 1 h) for pod `pod` of service account `ns/sa`,
    /// issued `age` ago.
    pub fn token(&self, ns: &str, sa: &str, pod: &str, age: Duration) -> String {
        self.mint(ns, sa, pod, "kith-ca", 3600, age)
    }

    /// A projected token as the kubelet writes it for a `serviceAccountToken` volume source:
    /// `audience`, valid `seconds` from now.
    pub fn token_for(&self, ns: &str, sa: &str, pod: &str, audience: &str, seconds: u64) -> String {
        self.mint(ns, sa, pod, audience, seconds, Duration::ZERO)
    }

    fn mint(&self, ns: &str, sa: &str, pod: &str, aud: &str, secs: u64, age: Duration) -> String {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - age.as_secs();
        let claims = json!({
            "aud": [aud], "exp": iat + secs, "iat": iat, "nbf": iat, "iss": ISSUER,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": format!("uid-{pod}")},
                              "serviceaccount": {"name": sa, "uid": format!("uid-{sa}")}},
        });
        self.sign(&self.kid, &claims)
    }
}

impl Default for ClusterKey {
    fn default() -> Self {
        Self::new()
    }
}
