//! The local admin API: HTTP/1.1 over a Unix socket in the data directory, mode 0600, so only
//! the CA's own user (or root) can create tokens, manage entries and evict nodes; each
//! connection's uid is also checked with SO_PEERCRED, so a socket or directory made wider by
//! mistake still serves no one else. The `kith ca token|entry|node|bundle|status|audit`
//! commands are its client (`admin_client`).
//!
//! Why this is one file of over 500 lines: one route table for the admin socket (tokens, entries,
//! nodes, upstream, roots, audit) with short handlers over the service and the store.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::unix::UCred;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use identity::SpiffeId;

use crate::api::{error_response, json_response};
use crate::authority::unix;
use crate::service::{ApiError, Ca, secret_hash};
use crate::store::{AuditEvent, AuditHead, Entry, JoinToken, Outcome, Store, Write};

type Body = Full<Bytes>;

/// Binds the admin socket: a stale socket file is removed, the new one is made 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[derive(Clone)]
pub struct AdminContext {
    pub public_url: String,
}

pub async fn serve<S: Store>(
    ca: Arc<Ca<S>>,
    ctx: AdminContext,
    listener: UnixListener,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut acceptor = listen::Acceptor::new(listener, "ca admin", ADMIN_CAPS);
    while let Some(next) = acceptor.next(&shutdown).await {
        let conn = match next {
            listen::Next::Admitted(conn) => conn,
            listen::Next::Refused(_, why) => {
                ca.metrics.refused(match why {
                    listen::Refusal::TooManyFromSource => "admin_too_many_from_source",
                    _ => "admin_too_many_connections",
                });
                continue;
            }
        };
        let (stream, held) = (conn.io, conn.held);
        let ca = ca.clone();
        let ctx = ctx.clone();
        // SECURITY: the socket's mode is a first fence, not the only one: a data directory or
        // socket made wider by mistake must not hand the CA to every local user. The kernel
        // says who connected; only root and the CA's own user are served.
        if let Err(why) = peer_allowed(conn.peer, own_uid) {
            ca.metrics.refused("admin_peer_not_allowed");
            tracing::warn!(reason = %why, "refused an admin connection");
            tracker.spawn(async move {
                let _held = held;
                refuse_peer(stream, why).await;
            });
            continue;
        }
        tracker.spawn(async move {
            let _held = held;
            let svc = hyper::service::service_fn(move |req| {
                let ca = ca.clone();
                let ctx = ctx.clone();
                async move {
                    let resp = match handle(&ca, &ctx, req).await {
                        Ok(r) => r,
                        Err(e) => {
                            ca.metrics.refused(e.code);
                            tracing::warn!(code = e.code, message = %e.message, "admin request refused");
                            error_response(&e)
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Connections the admin socket holds at once, and per UID: it serves one operator's commands,
/// and a local user that is refused must not be able to hold the socket either.
const ADMIN_CAPS: listen::Caps = listen::Caps {
    max_connections: 64,
    max_per_source: 16,
};

/// How long an admin client may take to send a request's headers.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the connected process may use the admin API: root or the CA's own user, as the
/// kernel reports it (SO_PEERCRED).
fn peer_allowed(cred: Option<UCred>, own_uid: u32) -> Result<(), String> {
    let cred = cred.ok_or("the kernel gave no credentials for the peer")?;
    if cred.uid() == 0 || cred.uid() == own_uid {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) is neither root nor the CA's user (uid {own_uid})",
            cred.uid(),
            cred.pid().map_or_else(|| "?".into(), |p| p.to_string())
        ))
    }
}

/// Answers every request on a refused connection with 403 and why, then closes it.
async fn refuse_peer(stream: UnixStream, why: String) {
    let svc = hyper::service::service_fn(move |_req| {
        let err = ApiError::new(
            403,
            "admin_peer_not_allowed",
            format!("the admin socket serves only root and the CA's own user: {why}"),
        );
        async move { Ok::<_, Infallible>(error_response(&err)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    pub ttl_seconds: u64,
}

#[derive(Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub id: String,
    pub name: String,
    pub spiffe_id: String,
    pub expires_at: i64,
    pub ca_url: String,
    pub bundle_sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryCreate {
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub dns: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEvict {
    pub spiffe_id: String,
}

async fn handle<S: Store>(
    ca: &Ca<S>,
    ctx: &AdminContext,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let now = SystemTime::now();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["status"]) => Ok(json_response(StatusCode::OK, &status(ca, now).await?)),
        ("GET", ["roots"]) => Ok(json_response(StatusCode::OK, &roots(ca, now).await)),
        ("POST", ["upstream", "replace"]) => {
            let body: UpstreamReplace = read_json(req).await?;
            Ok(json_response(
                StatusCode::OK,
                &replace_upstream(ca, &body, now).await?,
            ))
        }
        ("POST", ["roots", "rotate"]) => {
            let body: RootRotate = read_json(req).await?;
            Ok(json_response(
                StatusCode::OK,
                &rotate_root(ca, body.now, now).await?,
            ))
        }
        ("GET", ["bundle"]) => {
            if query.contains("format=pem") {
                Ok(Response::new(Full::new(Bytes::from(
                    ca.authority.bundle().to_pem(),
                ))))
            } else {
                Ok(json_response(StatusCode::OK, &ca.bundle_value()))
            }
        }
        ("POST", ["tokens"]) => {
            let body: TokenCreate = read_json(req).await?;
            let created = create_token(ca, ctx, &body, now).await?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        ("GET", ["tokens"]) => Ok(json_response(StatusCode::OK, &ca.store.tokens().await?)),
        ("DELETE", ["tokens", id]) => {
            let audit = event("token.revoke", id, json!({}), now);
            match ca
                .store
                .write(Write::RevokeToken {
                    id: (*id).to_owned(),
                    now: unix(now),
                    audit,
                })
                .await?
            {
                Outcome::Done => Ok(json_response(StatusCode::OK, &json!({"revoked": id}))),
                _ => Err(ApiError::new(
                    404,
                    "not_found",
                    format!("no active token with id {id}"),
                )),
            }
        }
        ("POST", ["entries"]) => {
            let body: EntryCreate = read_json(req).await?;
            let entry = create_entry(ca, body, now).await?;
            Ok(json_response(StatusCode::CREATED, &entry))
        }
        ("GET", ["entries"]) => Ok(json_response(StatusCode::OK, &ca.store.entries().await?)),
        ("GET", ["entries", id]) => {
            let entry = ca.store.entries().await?.into_iter().find(|e| e.id == *id);
            entry
                .map(|e| json_response(StatusCode::OK, &e))
                .ok_or_else(|| ApiError::new(404, "not_found", format!("no entry {id}")))
        }
        ("DELETE", ["entries", id]) => {
            let audit = event("entry.delete", id, json!({}), now);
            match ca
                .store
                .write(Write::DeleteEntry {
                    id: (*id).to_owned(),
                    audit,
                })
                .await?
            {
                Outcome::Done => {
                    ca.reload().await?;
                    Ok(json_response(StatusCode::OK, &json!({"deleted": id})))
                }
                _ => Err(ApiError::new(404, "not_found", format!("no entry {id}"))),
            }
        }
        ("GET", ["nodes"]) => Ok(json_response(StatusCode::OK, &ca.store.nodes().await?)),
        ("POST", ["nodes", "evict"]) => {
            let body: NodeEvict = read_json(req).await?;
            let id = parse_id(&body.spiffe_id)?;
            let audit = event("node.evict", id.as_str(), json!({}), now);
            match ca
                .store
                .write(Write::EvictNode {
                    spiffe_id: id.to_string(),
                    now: unix(now),
                    audit,
                })
                .await?
            {
                Outcome::Done => {
                    ca.reload().await?;
                    Ok(json_response(StatusCode::OK, &json!({"evicted": id})))
                }
                _ => Err(ApiError::new(
                    404,
                    "not_found",
                    format!("no active node {id}"),
                )),
            }
        }
        ("GET", ["audit"]) => {
            let param = |k: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse::<i64>().ok())
            };
            let rows = ca
                .store
                .audit(
                    param("after").unwrap_or(0),
                    param("limit").unwrap_or(100).clamp(1, 10_000),
                )
                .await?;
            Ok(json_response(StatusCode::OK, &rows))
        }
        ("GET", ["audit", "verify"]) => {
            let expect = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("expect="))
                .map(|v| {
                    AuditHead::parse(&v.replace("%3A", ":").replace("%3a", ":"))
                        .map_err(|e| ApiError::new(400, "bad_expect_head", e))
                })
                .transpose()?;
            Ok(json_response(
                StatusCode::OK,
                &ca.store.verify_audit(expect.as_ref()).await?,
            ))
        }
        ("GET", ["audit", "head"]) => match ca.store.audit_head().await? {
            Some(head) => Ok(json_response(StatusCode::OK, &head)),
            None => Err(ApiError::new(
                404,
                "audit_empty",
                "the audit log has no rows yet",
            )),
        },
        _ => Err(ApiError::new(
            404,
            "not_found",
            format!("no admin endpoint {method} {path}"),
        )),
    }
}

async fn create_token<S: Store>(
    ca: &Ca<S>,
    ctx: &AdminContext,
    body: &TokenCreate,
    now: SystemTime,
) -> Result<TokenCreated, ApiError> {
    if body.ttl_seconds == 0 || body.ttl_seconds > 30 * 86_400 {
        return Err(ApiError::new(
            400,
            "bad_ttl",
            "token ttl must be between 1s and 30d",
        ));
    }
    let spiffe_id = ca
        .trust_domain()
        .id_with_path(&format!("/kith/node/{}", body.name))
        .map_err(|e| {
            ApiError::new(
                400,
                "bad_name",
                format!("node name {:?} makes no valid SPIFFE ID: {e}", body.name),
            )
        })?;
    // 256 random bits; only the SHA-256 is stored.
    let mut secret = [0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| ApiError::new(500, "internal", "random number generator failed"))?;
    let mut id_bytes = [0u8; 6];
    SystemRandom::new()
        .fill(&mut id_bytes)
        .map_err(|_| ApiError::new(500, "internal", "random number generator failed"))?;
    let id = crate::store::hex(&id_bytes);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let hash = secret_hash(&secret);
    let token = format!("{id}.{secret}");
    let expires_at = unix(now + Duration::from_secs(body.ttl_seconds));
    let record = JoinToken {
        id: id.clone(),
        hash,
        name: body.name.clone(),
        created_at: unix(now),
        expires_at,
        used_at: None,
        revoked_at: None,
    };
    let audit = event(
        "token.create",
        &id,
        json!({"name": body.name, "expires_at": expires_at}),
        now,
    );
    ca.store.write(Write::CreateToken(record, audit)).await?;
    Ok(TokenCreated {
        token,
        id,
        name: body.name.clone(),
        spiffe_id: spiffe_id.to_string(),
        expires_at,
        ca_url: ctx.public_url.clone(),
        bundle_sha256: bundle_sha256(&ca.authority.bundle().to_pem()),
    })
}

/// The pin a new agent checks the bundle it downloads against: SHA-256 of the PEM bundle as
/// `GET /v1/bundle?format=pem` serves it.
pub fn bundle_sha256(pem: &str) -> String {
    identity::digest::sha256_hex(pem.as_bytes())
}

async fn create_entry<S: Store>(
    ca: &Ca<S>,
    body: EntryCreate,
    now: SystemTime,
) -> Result<Entry, ApiError> {
    let id = parse_id(&body.spiffe_id)?;
    let parent = parse_id(&body.parent_id)?;
    for (what, i) in [("spiffe_id", &id), ("parent_id", &parent)] {
        if !i.is_member_of(ca.trust_domain()) {
            return Err(ApiError::new(
                400,
                "wrong_trust_domain",
                format!("{what} {i} is not in {}", ca.trust_domain()),
            ));
        }
    }
    if id.path().is_empty() || id.path().starts_with("/kith/") {
        return Err(ApiError::new(
            400,
            "reserved_id",
            format!("{id} is reserved for kith itself"),
        ));
    }
    if body.selectors.is_empty() {
        return Err(ApiError::new(
            400,
            "no_selectors",
            "an entry needs at least one selector (type:value)",
        ));
    }
    crate::selector::check_entry(&body.selectors)
        .map_err(|e| ApiError::new(400, e.code(), e.to_string()))?;
    for d in &body.dns {
        rustls_pki_types::DnsName::try_from(d.as_str())
            .map_err(|_| ApiError::new(400, "bad_dns", format!("{d:?} is not a DNS name")))?;
    }
    let mut raw = [0u8; 8];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| ApiError::new(500, "internal", "random number generator failed"))?;
    let entry = Entry {
        id: crate::store::hex(&raw),
        spiffe_id: id.to_string(),
        parent_id: parent.to_string(),
        selectors: body.selectors,
        ttl: body.ttl_seconds,
        dns: body.dns,
        created_at: unix(now),
    };
    let audit = event(
        "entry.create",
        &entry.id,
        json!({"spiffe_id": entry.spiffe_id, "parent_id": entry.parent_id, "selectors": entry.selectors}),
        now,
    );
    ca.store
        .write(Write::PutEntry(entry.clone(), audit))
        .await?;
    ca.reload().await?;
    Ok(entry)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamReplace {
    /// PEM: the new upstream certificate, then its issuers up to the root.
    pub cert_pem: String,
    /// PEM: its private key (PKCS#8).
    pub key_pem: String,
}

/// `kith ca upstream replace`: the replacement is published now and signs once the rollover's
/// rules allow.
async fn replace_upstream<S: Store>(
    ca: &Ca<S>,
    body: &UpstreamReplace,
    now: SystemTime,
) -> Result<serde_json::Value, ApiError> {
    let bad = |e: String| ApiError::new(400, "bad_upstream", e);
    let chain = identity::pem::certificates(body.cert_pem.as_bytes())
        .map_err(|e| bad(format!("cert: {e}")))?;
    let key = identity::pem::private_key(body.key_pem.as_bytes())
        .map_err(|e| bad(format!("key: {e}")))?;
    if !ca.authority.is_upstream() {
        return Err(ApiError::new(
            409,
            "not_upstream_mode",
            "this CA signs under its own root: use `kith ca root rotate`",
        ));
    }
    let id = ca
        .authority
        .replace_upstream(
            ca.store.as_ref(),
            crate::authority::Upstream { chain, key },
            now,
        )
        .await
        .map_err(|e| match e {
            crate::authority::AuthorityError::Upstream(m) => bad(m),
            e => ApiError::from(e),
        })?;
    ca.authority
        .rollover(ca.store.as_ref(), now, crate::authority::Push::None)
        .await
        .map_err(ApiError::from)?;
    Ok(json!({"outcome": "published", "root": id, "roots": roots(ca, now).await}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootRotate {
    /// Switch now instead of waiting for the bundle to reach every caller.
    #[serde(default)]
    pub now: bool,
}

/// The roots, their phases, what the rollover waits for, and the time to outage.
pub async fn roots<S: Store>(ca: &Ca<S>, now: SystemTime) -> serde_json::Value {
    let view = ca.authority.rollover_view();
    let outage = ca.outage(now).await;
    let mut v = serde_json::to_value(view.as_ref()).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert(
            "time_to_outage_seconds".into(),
            (outage.at - unix(now)).into(),
        );
        map.insert("time_to_outage_cause".into(), outage.cause.into());
        map.insert("time_to_outage_detail".into(), outage.detail.into());
        map.insert(
            "bundle_sequence".into(),
            ca.authority.bundle().sequence().into(),
        );
    }
    v
}

/// `kith ca root rotate [--now]`: publish a successor now (the switch still waits for callers),
/// or with `now` also switch at once.
async fn rotate_root<S: Store>(
    ca: &Ca<S>,
    switch_now: bool,
    now: SystemTime,
) -> Result<serde_json::Value, ApiError> {
    use crate::authority::{Push, RolloverOutcome};
    // Upstream mode: only `--now`, to switch to a replacement already imported.
    if ca.authority.is_upstream() && !switch_now {
        return Err(ApiError::new(
            409,
            "upstream_mode",
            "this CA signs under an upstream certificate that kith cannot roll; import its replacement with `kith ca upstream replace --cert --key` (then `--now` switches to it at once)",
        ));
    }
    let push = if switch_now { Push::Now } else { Push::Start };
    let outcome = ca
        .authority
        .rollover(ca.store.as_ref(), now, push)
        .await
        .map_err(ApiError::from)?;
    let (what, root, forced) = match &outcome {
        RolloverOutcome::Published(id) => ("published", Some(id.clone()), false),
        RolloverOutcome::Switched { root, forced } => ("switched", Some(root.clone()), *forced),
        RolloverOutcome::Waiting => ("waiting", None, false),
        _ => ("nothing", None, false),
    };
    Ok(json!({"outcome": what, "root": root, "forced": forced, "roots": roots(ca, now).await}))
}

#[derive(Serialize, Deserialize)]
pub struct Status {
    pub trust_domain: String,
    pub signers: Vec<SignerStatus>,
    pub root_not_after: i64,
    pub root_expires_in_seconds: i64,
    /// The earliest of: a root or signer's end with no successor, a KEK that does not open the
    /// signer key (now), the data volume reaching its reserve.
    pub time_to_outage_seconds: i64,
    /// `root`, `signer`, `kek` or `store_full`.
    #[serde(default)]
    pub time_to_outage_cause: String,
    #[serde(default)]
    pub time_to_outage_detail: String,
    /// The roots, their phases and what a rollover waits for (`kith ca root status`).
    #[serde(default)]
    pub rollover: serde_json::Value,
    pub counts: serde_json::Value,
    /// The data volume's free space and reserve.
    #[serde(default)]
    pub disk: Option<serde_json::Value>,
    /// The newest audit row, to keep somewhere else for `audit verify --expect-head`.
    #[serde(default)]
    pub audit_head: Option<AuditHead>,
    /// What the store is (`sqlite` or `postgres`), whether it answers, and for PostgreSQL
    /// this replica's id and its connection pool.
    #[serde(default)]
    pub store: serde_json::Value,
    /// The replicas holding a lease (PostgreSQL): the one that prepares keys.
    #[serde(default)]
    pub replicas: Vec<crate::store::Lease>,
}

#[derive(Serialize, Deserialize)]
pub struct SignerStatus {
    pub id: String,
    pub state: String,
    pub not_after: i64,
    pub expires_in_seconds: i64,
    pub activate_at: i64,
}

pub async fn status<S: Store>(ca: &Ca<S>, now: SystemTime) -> Result<Status, ApiError> {
    let keys = ca.authority.keys();
    let secs = |t: SystemTime| unix(t) - unix(now);
    let mut signers = vec![SignerStatus {
        id: keys.active.id.clone(),
        state: "active".into(),
        not_after: unix(keys.active.not_after),
        expires_in_seconds: secs(keys.active.not_after),
        activate_at: unix(keys.active.activate_at),
    }];
    if let Some(next) = &keys.next {
        signers.push(SignerStatus {
            id: next.id.clone(),
            state: "next".into(),
            not_after: unix(next.not_after),
            expires_in_seconds: secs(next.not_after),
            activate_at: unix(next.activate_at),
        });
    }
    let view = ca.authority.rollover_view();
    let disk = ca
        .disk
        .as_ref()
        .and_then(|d| serde_json::to_value(d.check()).ok());
    let outage = ca.outage(now).await;
    // A store that does not answer is reported, not an error: status is how to find out.
    let mut store = ca.store.describe();
    let (counts, audit_head, replicas) = match ca.store.counts().await {
        Ok(c) => {
            store["healthy"] = true.into();
            (
                serde_json::to_value(c).unwrap_or_default(),
                ca.store.audit_head().await.ok().flatten(),
                ca.store.leases().await.unwrap_or_default(),
            )
        }
        Err(e) => {
            store["healthy"] = false.into();
            store["error"] = e.to_string().into();
            (serde_json::Value::Null, None, Vec::new())
        }
    };
    Ok(Status {
        trust_domain: ca.trust_domain().to_string(),
        signers,
        root_not_after: unix(keys.root_not_after),
        root_expires_in_seconds: secs(keys.root_not_after),
        time_to_outage_seconds: outage.at - unix(now),
        time_to_outage_cause: outage.cause.into(),
        time_to_outage_detail: outage.detail,
        rollover: serde_json::to_value(view.as_ref()).unwrap_or_default(),
        counts,
        disk,
        audit_head,
        store,
        replicas,
    })
}

fn event(action: &str, subject: &str, detail: serde_json::Value, now: SystemTime) -> AuditEvent {
    AuditEvent {
        at: unix(now),
        action: action.into(),
        subject: subject.into(),
        outcome: "ok".into(),
        detail,
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, ApiError> {
    SpiffeId::new(s).map_err(|e| ApiError::new(400, "invalid_spiffe_id", format!("{s:?}: {e}")))
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = Limited::new(req.into_body(), crate::api::MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(400, "bad_request", e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::new(400, "malformed_json", e.to_string()))
}
