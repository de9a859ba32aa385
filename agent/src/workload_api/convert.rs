//! From kith's types to the Workload API's messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use identity::TrustBundle;
use identity::jwt::JwtSvidClaims;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::{Map, Value as Json};

use super::proto::{X509BundlesResponse, X509svid, X509svidResponse};
use crate::snapshot::WorkloadSvid;

/// The trust domain's SPIFFE ID (`spiffe://example.org`): the key of every bundle map, as the
/// standard asks.
pub(crate) fn bundle_key(bundle: &TrustBundle) -> String {
    bundle.trust_domain().id().to_string()
}

/// The roots as the standard carries them: DER certificates, concatenated.
pub(crate) fn x509_roots(bundle: &TrustBundle) -> Vec<u8> {
    bundle
        .x509_authorities()
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

pub(crate) fn x509_svid_response(
    svids: &[Arc<WorkloadSvid>],
    bundle: &TrustBundle,
) -> X509svidResponse {
    let roots = x509_roots(bundle);
    X509svidResponse {
        svids: svids
            .iter()
            .map(|s| X509svid {
                spiffe_id: s.spiffe_id.to_string(),
                x509_svid: s
                    .chain
                    .iter()
                    .flat_map(|c| c.as_ref().iter().copied())
                    .collect(),
                x509_svid_key: s.key.secret_pkcs8_der().to_vec(),
                bundle: roots.clone(),
                hint: String::new(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

pub(crate) fn x509_bundles_response(bundle: &TrustBundle) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(bundle_key(bundle), x509_roots(bundle))]),
    }
}

/// The bundle's JWT-SVID keys as a JWK Set (RFC 7517). Only `jwt-svid` keys: the standard
/// forbids keys of other uses in a JWT bundle.
pub(crate) fn jwks(bundle: &TrustBundle) -> Vec<u8> {
    let keys: Vec<Json> = bundle
        .jwt_authorities()
        .iter()
        .map(|a| {
            let mut jwk: Map<String, Json> = a.jwk.clone();
            jwk.insert("kid".into(), a.key_id.clone().into());
            jwk.insert("use".into(), "jwt-svid".into());
            Json::Object(jwk)
        })
        .collect();
    let set = serde_json::json!({ "keys": keys });
    // Serializing a Value built from strings and maps cannot fail.
    serde_json::to_vec(&set).unwrap_or_default()
}

/// The claims of a validated JWT-SVID as a `google.protobuf.Struct`.
pub(crate) fn claims_struct(claims: &JwtSvidClaims) -> Struct {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let number = |t: SystemTime| Value {
        // Whole seconds, exact in an f64 for any date JSON can express.
        kind: Some(Kind::NumberValue(unix_secs(t) as f64)),
    };
    let mut fields = BTreeMap::new();
    fields.insert("sub".to_owned(), string(claims.sub.as_str()));
    fields.insert(
        "aud".to_owned(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: claims.aud.iter().map(|a| string(a)).collect(),
            })),
        },
    );
    fields.insert("exp".to_owned(), number(claims.exp));
    if let Some(iat) = claims.iat {
        fields.insert("iat".to_owned(), number(iat));
    }
    Struct { fields }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use identity::jwt::JwtSigner;
    use identity::{SpiffeId, TrustDomain};

    use super::*;

    #[test]
    fn jwks_holds_only_jwt_keys_with_kid_and_use() {
        let (signer, _) = JwtSigner::generate(SystemTime::now() + Duration::from_secs(60)).unwrap();
        let mut bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        bundle.add_jwt_authority(signer.authority());
        let set: Json = serde_json::from_slice(&jwks(&bundle)).unwrap();
        let keys = set["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["kid"], signer.key_id());
        assert_eq!(keys[0]["use"], "jwt-svid");
        assert_eq!(keys[0]["kty"], "EC");
        assert_eq!(bundle_key(&bundle), "spiffe://example.org");

        let empty = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        assert_eq!(jwks(&empty), br#"{"keys":[]}"#);
    }

    #[test]
    fn claims_as_struct() {
        let claims = JwtSvidClaims {
            sub: SpiffeId::new("spiffe://example.org/web").unwrap(),
            aud: vec!["db".into(), "cache".into()],
            exp: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            iat: Some(UNIX_EPOCH + Duration::from_secs(1_799_999_000)),
        };
        let s = claims_struct(&claims);
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/web".into()))
        );
        assert_eq!(
            s.fields["exp"].kind,
            Some(Kind::NumberValue(1_800_000_000.0))
        );
        assert_eq!(
            s.fields["iat"].kind,
            Some(Kind::NumberValue(1_799_999_000.0))
        );
        let Some(Kind::ListValue(aud)) = &s.fields["aud"].kind else {
            panic!("aud is not a list");
        };
        assert_eq!(aud.values.len(), 2);
    }
}
