//! Trust bundles (PEM, DER or SPIFFE bundle JSON) into `TrustBundle::parse` and
//! `TrustBundle::from_spiffe_json`, as the agent and `kith` read bundle files and federation
//! endpoints. A bundle that parses must serialize and parse back to the same roots.
#![no_main]

use identity::{TrustBundle, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("valid trust domain");
    let _ = TrustBundle::parse(None, data);
    // A SPIFFE JSON bundle may hold no X.509 root (JWT authorities only, or only keys of
    // another `use`, which consumers skip); PEM cannot say that, so only a bundle with roots
    // has a PEM form to round-trip.
    if let Ok(b) = TrustBundle::parse(Some(td.clone()), data)
        && !b.x509_authorities().is_empty()
    {
        let again = TrustBundle::from_pem(Some(td.clone()), b.to_pem().as_bytes())
            .expect("a parsed bundle's PEM parses again");
        assert_eq!(again.x509_authorities(), b.x509_authorities());
    }
    if let Ok(b) = TrustBundle::from_spiffe_json(td.clone(), data) {
        let json = b.to_spiffe_json();
        let again = TrustBundle::from_spiffe_json(td, json.as_bytes())
            .expect("a parsed bundle's JSON parses again");
        assert_eq!(again.x509_authorities(), b.x509_authorities());
        assert_eq!(again.jwt_authorities().len(), b.jwt_authorities().len());
    }
});
