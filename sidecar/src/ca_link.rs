//! The agent's side of the CA API: first contact (pinned bundle), attestation, and calls over
//! mTLS with the current node SVID. Each call opens a fresh connection with the credentials of
//! the moment, so a rotated node SVID or bundle is used at once; the agent calls rarely.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use ca::client::{ClientError, Connection, client_config, fetch_bundle_pinned};
use hyper::Method;
use identity::{SpiffeId, TrustBundle};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls_pki_types::PrivateKeyDer;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::ca_set::CaSet;

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

/// An issued SVID as the CA answers it.
#[derive(Debug, Deserialize)]
pub struct SvidAnswer {
    pub spiffe_id: String,
    pub svid: String,
    pub expires_at: i64,
    pub renew_after: i64,
    pub bundle: serde_json::Value,
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
) -> Result<SvidAnswer, LinkError> {
    let config = client_config(bundle, None)?;
    let body = json!({"token": token, "csr": csr});
    cas.call("attest/join", |addr| {
        let (config, body) = (config.clone(), &body);
        async move {
            let mut conn = Connection::open(&addr, config).await?;
            let (status, v) = conn.post_json("/v1/attest/join", body).await?;
            answer(status, v)
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
    body: Option<serde_json::Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, Bytes), LinkError> {
    let config = client_config(
        bundle,
        Some((
            node.chain().to_vec(),
            PrivateKeyDer::Pkcs8(node.key().clone_key()),
        )),
    )?;
    let body = body.map(|b| b.to_string().into_bytes());
    cas.call(path, |addr| {
        let (config, body, method) = (config.clone(), body.clone(), method.clone());
        async move {
            let mut conn = Connection::open(&addr, config).await?;
            let (status, headers, bytes) = conn.send(method, path, body, headers).await?;
            if status == 503 {
                return Err(refused(
                    status,
                    &serde_json::from_slice(&bytes).unwrap_or_default(),
                ));
            }
            Ok((status, headers, bytes))
        }
    })
    .await
}

pub fn answer(status: u16, v: serde_json::Value) -> Result<SvidAnswer, LinkError> {
    if status != 200 {
        return Err(refused(status, &v));
    }
    serde_json::from_value(v).map_err(|e| LinkError::BadAnswer(e.to_string()))
}

pub fn refused(status: u16, v: &serde_json::Value) -> LinkError {
    LinkError::Refused {
        status,
        code: v["code"].as_str().unwrap_or("error").to_owned(),
        message: v["message"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Parses the bundle carried by a CA answer (the SPIFFE format) for `td`.
pub fn bundle_of(
    v: &serde_json::Value,
    td: &identity::TrustDomain,
) -> Result<TrustBundle, LinkError> {
    TrustBundle::from_spiffe_json(td.clone(), v.to_string().as_bytes())
        .map_err(|e| LinkError::BadAnswer(format!("bundle: {e}")))
}

/// Checks an issued SVID before it is used: the chain verifies against the bundle, it names the
/// expected ID, and the key is the one we generated.
pub fn validate(
    answer: &SvidAnswer,
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
