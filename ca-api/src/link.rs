//! The agent's side of the CA API: first contact (pinned bundle), attestation, and calls over
//! mTLS with the current node SVID. Each call opens a fresh connection with the credentials of
//! the moment, so a rotated node SVID or bundle is used at once; the agent calls rarely.

use std::sync::Arc;
use std::time::SystemTime;

use crate::client::{ClientError, Connection, client_config, fetch_bundle_pinned, held_roots};
use bytes::Bytes;
use hyper::Method;
use identity::{SpiffeId, TrustBundle};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::PrivateKeyDer;
use zeroize::Zeroizing;

use crate::replicas::CaSet;
use crate::wire::{self, AttestRequest, ErrorBody, SvidResponse};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the CA did not answer in time")]
    Timeout,
    #[error("the CA refused: {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the CA's answer is not valid: {0}")]
    BadAnswer(String),
    #[error("--ca {0:?} is not an https://host:port URL")]
    BadUrl(String),
}

impl LinkError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &str {
        match self {
            Self::Client(ClientError::Connect { .. }) => "ca_unreachable",
            Self::Client(_) => "transport",
            Self::Timeout => "timeout",
            Self::Refused { code, .. } => code,
            Self::BadAnswer(_) => "bad_answer",
            Self::BadUrl(_) => "bad_url",
        }
    }
}

/// A fresh key and its CSR (empty subject: the CA decides every field).
/// A new key (wiped from memory when dropped) and a CSR for it.
pub fn new_key_and_csr() -> Result<(Zeroizing<KeyPair>, String), LinkError> {
    let key = Zeroizing::new(
        KeyPair::generate().map_err(|e| LinkError::BadAnswer(format!("key generation: {e}")))?,
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&*key)
        .and_then(|c| c.pem())
        .map_err(|e| LinkError::BadAnswer(format!("csr: {e}")))?;
    Ok((key, csr))
}

/// `https://ca.example.org:8443` → `ca.example.org:8443`.
pub fn ca_addr(url: &str) -> Result<String, LinkError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| LinkError::BadUrl(url.into()))?;
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains('/') {
        return Err(LinkError::BadUrl(url.into()));
    }
    Ok(
        if host_port
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host_port.to_owned()
        } else {
            format!("{host_port}:443")
        },
    )
}

/// First contact: the CA's bundle, fetched from the first replica that answers and accepted
/// only if it hashes to `pin`.
pub async fn first_contact(cas: &CaSet, pin: &str) -> Result<TrustBundle, LinkError> {
    cas.call("bundle", |addr| async move {
        Ok(fetch_bundle_pinned(&addr, pin).await?)
    })
    .await
}

/// Node attestation with a join token.
///
/// The token is spent once across all replicas (they share one database): a replica that
/// failed after spending it cannot hand it to another, which then refuses it as used.
pub async fn attest_join(
    cas: &CaSet,
    bundle: Arc<TrustBundle>,
    token: &str,
    csr: &str,
) -> Result<SvidResponse, LinkError> {
    attest(cas, bundle, wire::path::ATTEST_JOIN, token, csr).await
}

/// A pod's attestation with its projected service-account token; the SVID's ID comes from the
/// token's namespace and service account.
pub async fn attest_k8s(
    cas: &CaSet,
    bundle: Arc<TrustBundle>,
    token: &str,
    csr: &str,
) -> Result<SvidResponse, LinkError> {
    attest(cas, bundle, wire::path::ATTEST_K8S, token, csr).await
}

/// Attestation: evidence and a CSR over TLS that authenticates the CA (no client certificate
/// yet), with the roots `bundle` holds reported. A 503 (a replica without its database) moves
/// on to the next replica inside `call`.
async fn attest(
    cas: &CaSet,
    bundle: Arc<TrustBundle>,
    path: &'static str,
    token: &str,
    csr: &str,
) -> Result<SvidResponse, LinkError> {
    let body = AttestRequest {
        token: token.to_owned(),
        csr: csr.to_owned(),
        held_roots: Some(held_roots(&bundle)),
    };
    let config = client_config(bundle, None)?;
    cas.call(path.trim_start_matches("/v1/"), |addr| {
        let (config, body) = (config.clone(), &body);
        async move {
            let mut conn = Connection::open(&addr, config).await?;
            let (status, bytes) = conn.post(path, body).await?;
            answer(status, &bytes)
        }
    })
    .await
}

/// A call over mTLS with the node's SVID, to the first replica that answers; a 503 from every
/// replica comes back as `LinkError::Refused`, other statuses as they are.
pub async fn call(
    cas: &CaSet,
    bundle: Arc<TrustBundle>,
    node: &identity::Svid,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, Bytes), LinkError> {
    let config = client_config(
        bundle,
        Some((
            node.chain().to_vec(),
            PrivateKeyDer::Pkcs8(node.key().clone_key()),
        )),
    )?;
    cas.call(path, |addr| {
        let (config, body, method) = (config.clone(), body.clone(), method.clone());
        async move {
            let mut conn = Connection::open(&addr, config).await?;
            let (status, headers, bytes) = conn.send(method, path, body, headers).await?;
            if status == 503 {
                return Err(refused(status, &bytes));
            }
            Ok((status, headers, bytes))
        }
    })
    .await
}

/// A request body as JSON.
pub fn body(request: &impl serde::Serialize) -> Result<Vec<u8>, LinkError> {
    serde_json::to_vec(request).map_err(|e| LinkError::BadAnswer(format!("request body: {e}")))
}

/// An issuance's answer: the SVID, or the CA's refusal.
pub fn answer(status: u16, body: &[u8]) -> Result<SvidResponse, LinkError> {
    if status != 200 {
        return Err(refused(status, body));
    }
    serde_json::from_slice(body).map_err(|e| LinkError::BadAnswer(e.to_string()))
}

/// A refusal as the CA explains it (`{"code", "message"}`); a body that is not one still gives
/// the status.
pub fn refused(status: u16, body: &[u8]) -> LinkError {
    let ErrorBody { code, message } = serde_json::from_slice(body).unwrap_or_default();
    LinkError::Refused {
        status,
        code: if code.is_empty() {
            "error".into()
        } else {
            code
        },
        message,
    }
}

/// Parses the bundle carried by a CA answer (the SPIFFE format) for `td`.
pub fn bundle_of(
    bundle: &serde_json::value::RawValue,
    td: &identity::TrustDomain,
) -> Result<TrustBundle, LinkError> {
    TrustBundle::from_spiffe_json(td.clone(), bundle.get().as_bytes())
        .map_err(|e| LinkError::BadAnswer(format!("bundle: {e}")))
}

/// Checks an issued SVID before it is used: the chain verifies against the bundle, it names the
/// expected ID, and the key is the one we generated.
pub fn validate(
    answer: &SvidResponse,
    key: &KeyPair,
    bundle: &TrustBundle,
    expected: &SpiffeId,
    now: SystemTime,
) -> Result<identity::Svid, LinkError> {
    let chain = identity::pem::certificates(answer.svid.as_bytes())
        .map_err(|e| LinkError::BadAnswer(e.to_string()))?;
    let svid = identity::Svid::new(chain, identity::x509::portable_pkcs8(key))
        .map_err(|e| LinkError::BadAnswer(e.to_string()))?;
    let id = identity::verify_x509_svid(svid.chain(), bundle, now)
        .map_err(|e| LinkError::BadAnswer(format!("issued SVID does not verify: {e}")))?;
    if &id != expected {
        return Err(LinkError::BadAnswer(format!(
            "the CA issued {id}, expected {expected}"
        )));
    }
    Ok(svid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_urls() {
        assert_eq!(ca_addr("https://ca:8443").unwrap(), "ca:8443");
        assert_eq!(
            ca_addr("https://ca.example.org/").unwrap(),
            "ca.example.org:443"
        );
        assert_eq!(ca_addr("https://127.0.0.1:9").unwrap(), "127.0.0.1:9");
        assert!(ca_addr("http://ca:8443").is_err());
        assert!(ca_addr("https://ca:8443/v1").is_err());
    }
}
