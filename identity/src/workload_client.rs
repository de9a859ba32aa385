//! A SPIFFE Workload API client: what `kith agent fetch` and `kith sidecar run --identity
//! workload-api` both need to receive an X509-SVID from an agent. It follows the agent's
//! X509-SVID stream (reconnecting with backoff), picks the SVID a caller asked for, and checks
//! every message against its own trust domain's bundle before anyone uses it.
//!
//! The transport and the protobuf messages come from the reference Rust client (the `spiffe`
//! crate, Unix socket only, no TLS), so this is also proof that the agent speaks the standard.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::transport::{Endpoint, GrpcStatusCode, TransportError};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use tokio_util::sync::CancellationToken;

use crate::{Svid, TrustBundle, TrustDomain, verify_x509_svid};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadClientError {
    #[error(
        "invalid workload api endpoint {endpoint:?}: {detail} (expected unix:///path/to/socket)"
    )]
    Endpoint { endpoint: String, detail: String },
    #[error(
        "cannot reach the agent at {endpoint} ({detail}); is `kith agent run` running there? pass --socket or set SPIFFE_ENDPOINT_SOCKET"
    )]
    Unreachable { endpoint: String, detail: String },
    #[error(
        "no registration entry matches this process (uid {uid}); create one, e.g. `kith ca entry create --selector unix:uid:{uid} ...`"
    )]
    NoEntry { uid: u32 },
    #[error("this process was not issued {wanted}; it has: {have}")]
    IdNotIssued { wanted: String, have: String },
    #[error("workload api call to {endpoint} failed: {detail}")]
    Api { endpoint: String, detail: String },
    #[error("the agent sent an unusable svid or bundle: {0}")]
    BadResponse(String),
    #[error("the workload api stream ended")]
    StreamEnded,
}

type Error = WorkloadClientError;

/// What [`pick`] chose from a Workload API message, checked.
pub struct Picked {
    pub svid: Svid,
    /// The bundle of the SVID's own trust domain.
    pub own: TrustBundle,
    /// (trust domain, PEM) of every bundle, sorted by trust domain.
    pub bundles: Vec<(String, String)>,
}

/// Fetches the caller's X509 context once.
pub async fn fetch_once(endpoint: &str) -> Result<X509Context, Error> {
    check_endpoint(endpoint)?;
    connect(endpoint)
        .await?
        .fetch_x509_context()
        .await
        .map_err(|e| api_error(endpoint, e))
}

/// Follows the agent's X509-SVID stream until `shutdown` (or until `tx`'s receiver is gone),
/// sending every message to `tx`, and reconnects with exponential backoff (`backoff`: first and
/// longest wait) whenever the stream fails; `keeping` says in the log what stays in use
/// meanwhile.
pub async fn follow(
    endpoint: &str,
    backoff: (Duration, Duration),
    shutdown: &CancellationToken,
    keeping: &str,
    tx: tokio::sync::mpsc::Sender<X509Context>,
) -> Result<(), Error> {
    check_endpoint(endpoint)?;
    let (min_backoff, max_backoff) = backoff;
    let mut wait = min_backoff;
    loop {
        let mut delivered = false;
        let ended = tokio::select! {
            e = session(endpoint, &mut delivered, &tx) => e,
            () = shutdown.cancelled() => return Ok(()),
        };
        if tx.is_closed() {
            return Ok(());
        }
        if delivered {
            // The agent was healthy a moment ago: come back quickly.
            wait = min_backoff;
        }
        tracing::warn!(error = %ended, retry_in = ?wait, "workload api stream lost; {keeping}");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        wait = (wait * 2).min(max_backoff);
    }
}

/// One connection: follows the stream until it fails; always returns the reason it stopped.
async fn session(
    endpoint: &str,
    delivered: &mut bool,
    tx: &tokio::sync::mpsc::Sender<X509Context>,
) -> Error {
    let client = match connect(endpoint).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut stream = match client.stream_x509_contexts().await {
        Ok(s) => s,
        Err(e) => return api_error(endpoint, e),
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(context) => {
                *delivered = true;
                if tx.send(context).await.is_err() {
                    return Error::StreamEnded;
                }
            }
            Err(e) => return api_error(endpoint, e),
        }
    }
    Error::StreamEnded
}

/// Refuses an endpoint that is not a Workload API address before anything is tried.
pub fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    Endpoint::parse(endpoint)
        .map(|_| ())
        .map_err(|e| Error::Endpoint {
            endpoint: endpoint.to_owned(),
            detail: e.to_string(),
        })
}

async fn connect(endpoint: &str) -> Result<WorkloadApiClient, Error> {
    WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(|e| api_error(endpoint, e))
}

/// Turns the client's errors into what the user should do about them.
fn api_error(endpoint: &str, e: WorkloadApiError) -> Error {
    let uid = nix::unistd::getuid().as_raw();
    match e {
        WorkloadApiError::NoIdentityIssued => Error::NoEntry { uid },
        WorkloadApiError::PermissionDenied(msg) if msg.contains("no identity") => {
            Error::NoEntry { uid }
        }
        WorkloadApiError::Endpoint(e) => Error::Endpoint {
            endpoint: endpoint.to_owned(),
            detail: e.to_string(),
        },
        WorkloadApiError::Transport(TransportError::Status(s))
            if s.code() == GrpcStatusCode::Unavailable =>
        {
            Error::Unreachable {
                endpoint: endpoint.to_owned(),
                detail: s.message().to_owned(),
            }
        }
        WorkloadApiError::Transport(t @ TransportError::Connect(_)) => Error::Unreachable {
            endpoint: endpoint.to_owned(),
            detail: crate::report::chain(&t),
        },
        other => Error::Api {
            endpoint: endpoint.to_owned(),
            detail: crate::report::chain(&other),
        },
    }
}

/// Picks the SVID (`wanted`, or the default one) and checks it against its own trust domain's
/// bundle. Everything from the agent is checked here, before anyone uses it.
pub fn pick(context: &X509Context, wanted: Option<&str>) -> Result<Picked, Error> {
    let chosen = match wanted {
        None => context.default_svid(),
        Some(id) => context
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == id),
    };
    let Some(chosen) = chosen else {
        let have: Vec<String> = context
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        return Err(Error::IdNotIssued {
            wanted: wanted.unwrap_or("any svid").to_owned(),
            have: if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            },
        });
    };

    let mut bundles = Vec::new();
    let mut own = None;
    for (td, bundle) in context.bundle_set().iter() {
        // Our own parser again: the name becomes a file name, and the roots must be CAs.
        let td = TrustDomain::new(td.as_ref())
            .map_err(|e| Error::BadResponse(format!("trust domain: {e}")))?;
        let roots = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let parsed = TrustBundle::from_roots(td.clone(), roots)
            .map_err(|e| Error::BadResponse(format!("bundle of {}: {e}", td.as_str())))?;
        bundles.push((td.as_str().to_owned(), parsed.to_pem()));
        if td.as_str() == chosen.spiffe_id().trust_domain_name() {
            own = Some(parsed);
        }
    }
    bundles.sort();
    let own = own.ok_or_else(|| {
        Error::BadResponse(format!(
            "no bundle for the svid's trust domain {}",
            chosen.spiffe_id().trust_domain_name()
        ))
    })?;

    let mut certs: Vec<CertificateDer<'static>> = chosen
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    // The standard: the chain stops before the trust anchor. An agent that sends the root
    // along should not make us write a non-conforming file.
    while certs.len() > 1
        && certs
            .last()
            .is_some_and(|c| own.x509_authorities().contains(c))
    {
        certs.pop();
    }
    let key = PrivatePkcs8KeyDer::from(chosen.private_key().as_bytes().to_vec());
    let svid = Svid::new(certs, key).map_err(|e| Error::BadResponse(format!("svid: {e}")))?;
    // A chain its own bundle does not verify would fail every handshake; keep the old files.
    verify_x509_svid(svid.chain(), &own, SystemTime::now())
        .map_err(|e| Error::BadResponse(format!("svid does not verify against its bundle: {e}")))?;
    Ok(Picked { svid, own, bundles })
}
