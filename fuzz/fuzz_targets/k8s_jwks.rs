//! JWKS documents (what the cluster's issuer serves) into `K8sVerifier::from_jwks` and
//! `replace_jwks`, the two places the CA parses them.
#![no_main]

use std::sync::LazyLock;

use ca::k8s::{K8sConfig, K8sVerifier};
use libfuzzer_sys::fuzz_target;

static VERIFIER: LazyLock<K8sVerifier> = LazyLock::new(|| {
    K8sVerifier::from_jwks(K8sConfig::new(kith_fuzz::K8S_ISSUER), &kith_fuzz::K8S_JWKS)
        .expect("fixture jwks loads")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = K8sVerifier::from_jwks(K8sConfig::new(kith_fuzz::K8S_ISSUER), data) {
        // A key set that loads is used: a token against it must not panic either.
        let _ = v.verify("eyJhbGciOiJSUzI1NiJ9.e30.AAAA", kith_fuzz::now());
    }
    let _ = VERIFIER.replace_jwks(data);
});
