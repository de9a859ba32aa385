//! Projected service-account tokens into `K8sVerifier::verify` (the CA's Kubernetes
//! attestation), against a JWKS holding the test key, so seed tokens signed with it reach the
//! claim checks.
#![no_main]

use std::sync::LazyLock;

use ca::k8s::{K8sConfig, K8sVerifier};
use libfuzzer_sys::fuzz_target;

static VERIFIER: LazyLock<K8sVerifier> = LazyLock::new(|| {
    K8sVerifier::from_jwks(K8sConfig::new(kith_fuzz::K8S_ISSUER), &kith_fuzz::K8S_JWKS)
        .expect("fixture jwks loads")
});

fuzz_target!(|data: &[u8]| {
    // The CA reads the token from a gRPC string field: UTF-8 only.
    if let Ok(token) = std::str::from_utf8(data)
        && let Ok(pod) = VERIFIER.verify(token, kith_fuzz::now())
    {
        let td = identity::TrustDomain::new("example.org").expect("valid trust domain");
        let _ = pod.spiffe_id(&td);
    }
});
