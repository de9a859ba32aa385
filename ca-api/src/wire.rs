//! The CA's HTTPS API as types: what each call sends and what it answers. The server
//! deserializes requests into these very types (unknown fields refused, so a typo is an error and
//! not a silently dropped field) and serializes its answers from them; clients do the reverse
//! (unknown answer fields ignored, so a newer CA can add some). `ca/API.md` describes each call.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The API's paths.
pub mod path {
    pub const BUNDLE: &str = "/v1/bundle";
    /// The bundle as PEM: what first contact pins.
    pub const BUNDLE_PEM: &str = "/v1/bundle?format=pem";
    pub const ATTEST_JOIN: &str = "/v1/attest/join";
    pub const ATTEST_K8S: &str = "/v1/attest/k8s";
    pub const SVID: &str = "/v1/svid";
    pub const JWT: &str = "/v1/jwt";
    pub const RENEW: &str = "/v1/renew";
    pub const ENTRIES: &str = "/v1/entries";
}

/// `POST /v1/attest/join` (a join token) and `POST /v1/attest/k8s` (a projected
/// service-account token): evidence and a CSR, answered with an [`SvidResponse`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    pub token: String,
    /// PEM; only its public key is used: the CA decides every other field.
    pub csr: String,
    /// Hex SHA-256 of each root the caller holds (root rollover waits for these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_roots: Option<Vec<String>>,
}

/// `POST /v1/svid`, over mTLS with a node SVID: a workload SVID for an entry of that node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidRequest {
    pub spiffe_id: String,
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_roots: Option<Vec<String>>,
}

/// `POST /v1/renew`, over mTLS: a new SVID for the caller's own ID.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_roots: Option<Vec<String>>,
}

/// `POST /v1/jwt`, over mTLS with a node SVID: a JWT-SVID for an entry of that node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRequest {
    pub spiffe_id: String,
    pub audience: Vec<String>,
}

/// What a successful issuance answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct SvidResponse {
    pub spiffe_id: String,
    /// PEM: the leaf, then the intermediates.
    pub svid: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// When to renew (unix seconds): the CA spreads callers over 40-60 % of the lifetime.
    pub renew_after: i64,
    /// The trust bundle in the SPIFFE format, as the CA serves it at `/v1/bundle`.
    pub bundle: Box<RawValue>,
}

/// What `POST /v1/jwt` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct JwtResponse {
    pub spiffe_id: String,
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Every error answer: a stable `code` for programs and a `message` for people.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields_and_omit_absent_roots() {
        let r: Result<AttestRequest, _> =
            serde_json::from_str(r#"{"token":"t","csr":"c","tokne":"x"}"#);
        assert!(r.is_err());
        let body = serde_json::to_string(&RenewRequest {
            csr: "c".into(),
            held_roots: None,
        })
        .unwrap();
        assert_eq!(body, r#"{"csr":"c"}"#);
    }

    #[test]
    fn answers_keep_the_bundle_as_sent_and_ignore_new_fields() {
        let a: SvidResponse = serde_json::from_str(
            r#"{"spiffe_id":"spiffe://td/x","svid":"PEM","expires_at":2,"renew_after":1,"bundle":{"keys":[]},"new":1}"#,
        )
        .unwrap();
        assert_eq!(a.bundle.get(), r#"{"keys":[]}"#);
    }
}
