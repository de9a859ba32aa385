//! The SPIFFE Workload API (spiffe/spiffe `standards/SPIFFE_Workload_API.md`) over a Unix
//! socket: local workloads fetch their X509-SVIDs, JWT-SVIDs and bundles here, and are told
//! who they are by the kernel (see [`crate::attest`]), never by anything they send.
//!
//! Every answer comes from the latest [`Snapshot`] the agent published. Streams push a new
//! message only when what *this* caller would receive changed.
//!
//! Why this is one file of over 500 lines: the Workload API's RPCs, their attestation and their
//! streams share one per-connection caller state pinned at accept.

mod authority_shim;
mod convert;
mod hpack;
mod metrics;
mod socket;

/// The `:authority` shim as the fuzz targets in `fuzz/` drive it: the same [`authority`]
/// rewriter the Workload API server puts in front of h2. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// One client connection's client→server half of the shim.
    #[derive(Default)]
    pub struct AuthorityShim(super::authority_shim::Rewriter);

    impl AuthorityShim {
        /// The shim's `feed`: takes the next bytes from the client, appends what goes to h2.
        pub fn feed(&mut self, bytes: &[u8], out: &mut bytes::BytesMut) -> std::io::Result<()> {
            self.0.feed(bytes, out)
        }

        /// The metric label of the failure, once the connection failed.
        pub fn failure_reason(&self) -> Option<&'static str> {
            self.0.failure_reason()
        }
    }

    /// The largest decoded header list the shim lets through (RFC 7541 §4.1 sizes).
    pub const MAX_HEADER_LIST: usize = super::authority_shim::MAX_HEADER_LIST;
}

/// The code generated from `proto/workloadapi.proto` (no package, hence `_`).
pub mod proto {
    #![allow(clippy::all, clippy::unwrap_used, missing_docs)]
    tonic::include_proto!("_");
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use identity::SpiffeId;
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};

pub use self::metrics::{CallCount, Method, WorkloadApiMetrics};
use self::proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use self::proto::*;
use self::socket::ConnInfo;
pub use self::socket::bind;
use crate::attest::{AttestError, Attestor};
use crate::snapshot::{JwtSource, Snapshot, SnapshotRx, WorkloadSvid};

/// The metadata every Workload API call must carry (SPIFFE Workload Endpoint standard): it
/// proves the request came from a Workload API client and not from a browser or a proxy
/// tricked into forwarding to the socket.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Requests are tiny; the largest is a JWT-SVID to validate (16 KiB at most).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Limits on what callers can hold open.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// HTTP/2 concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS). Clients queue
    /// past it; tonic sets no limit by default.
    pub max_streams_per_connection: u32,
    /// Server streams open at once over all connections; past it new ones get
    /// ResourceExhausted.
    pub max_streams: usize,
    /// HTTP/2 PING interval on an idle connection, and how long to wait for the answer: finds
    /// callers that vanished without closing (frozen, or the socket held by a stopped process).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// After shutdown, how long connections may take to close before they are cut. A client
    /// that never completes the HTTP/2 handshake would otherwise hold the server open forever.
    pub shutdown_grace: Duration,
    /// Connections open at once, over all callers and per caller uid. Past either, a new
    /// connection is closed as soon as it is accepted: the socket is open to every local user,
    /// and without a bound one of them could take every file descriptor the agent has.
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    /// How long a new connection has to send the HTTP/2 preface and its first request's
    /// headers; a connection that has not by then is cut.
    pub first_request_timeout: Duration,
    /// Server streams one caller uid may hold open at once (over all its connections).
    pub max_streams_per_uid: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            max_streams: 10_000,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(5),
            // Containers without a user namespace all connect as uid 0: the per-uid caps leave
            // room for many of them on one node.
            max_connections: 4096,
            max_connections_per_uid: 1024,
            first_request_timeout: Duration::from_secs(10),
            max_streams_per_uid: 2048,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload api server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves the Workload API on `listener` until `shutdown` is cancelled; then stops accepting,
/// ends every stream (callers see Unavailable and reconnect to the next agent) and returns once
/// every connection has closed.
pub async fn serve<J: JwtSource>(
    listener: UnixListener,
    snapshots: SnapshotRx,
    jwt: Arc<J>,
    attestor: Arc<Attestor>,
    limits: Limits,
    metrics: Arc<WorkloadApiMetrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let tasks = TaskTracker::new();
    let api = WorkloadApi {
        snapshots,
        jwt,
        attestor,
        metrics: metrics.clone(),
        // Semaphore::new panics past MAX_PERMITS; a configured limit must not.
        streams: Arc::new(Semaphore::new(
            limits.max_streams.min(Semaphore::MAX_PERMITS),
        )),
        streams_per_uid: listen::PerSource::new(limits.max_streams_per_uid),
        jwt_cache: Mutex::new(HashMap::new()),
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    let service = SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    let force_close = CancellationToken::new();
    let admission = socket::Admission::new(&limits, metrics.clone());
    let serving = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        // The limit h2 advertises and applies; the `:authority` shim enforces the same one
        // before h2 sees a header block.
        .http2_max_header_list_size(authority_shim::MAX_HEADER_LIST as u32)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(service)
        .serve_with_incoming_shutdown(
            socket::incoming(listener, force_close.clone(), admission, shutdown.clone()),
            shutdown.cancelled(),
        );
    tokio::pin!(serving);
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(limits.shutdown_grace).await;
    };
    let result = tokio::select! {
        result = &mut serving => result,
        () = grace_over => {
            tracing::info!("workload api connections still open after the grace period; cutting them");
            force_close.cancel();
            serving.await
        }
    };
    tasks.close();
    tasks.wait().await;
    Ok(result?)
}

struct WorkloadApi<J> {
    snapshots: SnapshotRx,
    jwt: Arc<J>,
    attestor: Arc<Attestor>,
    metrics: Arc<WorkloadApiMetrics>,
    streams: Arc<Semaphore>,
    streams_per_uid: Arc<listen::PerSource<u32>>,
    jwt_cache: Mutex<HashMap<JwtKey, CachedJwt>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

type Feed<T> = ReceiverStream<Result<T, Status>>;

/// JWT-SVIDs are reused per (ID, audience as asked) until half their life is gone (as SPIRE's
/// agent does), rather than asked from the CA at every call.
type JwtKey = (SpiffeId, Vec<String>);

struct CachedJwt {
    token: String,
    fetched: SystemTime,
    expires: SystemTime,
}

impl CachedJwt {
    fn fresh(&self, now: SystemTime) -> bool {
        let Ok(life) = self.expires.duration_since(self.fetched) else {
            return false;
        };
        now >= self.fetched && now < self.fetched + life / 2
    }
}

/// Distinct (ID, audience) tokens kept at most; the audience is the caller's choice.
const JWT_CACHE_CAPACITY: usize = 4096;

impl<J: JwtSource> WorkloadApi<J> {
    /// The caller's selectors, once the request proved it is a Workload API call. Every
    /// refusal is counted and logged with its reason.
    async fn attest<T>(&self, req: &Request<T>) -> Result<Vec<String>, Status> {
        let header = req.metadata().get(SECURITY_HEADER);
        if header.is_none_or(|v| v.as_bytes() != b"true") {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let Some(cred) = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.cred)
        else {
            self.metrics.refuse(
                "no_peer_credentials",
                None,
                None,
                "no peer credentials on the connection",
            );
            return Err(Status::permission_denied(
                "no peer credentials on this connection",
            ));
        };
        // The attestor counts and logs its refusals (it has the agent's metrics).
        self.attestor.attest(cred).await.map_err(|e| match e {
            AttestError::Task(_) => Status::internal(e.to_string()),
            _ if e.is_denial() => Status::permission_denied(e.to_string()),
            _ => Status::unavailable(e.to_string()),
        })
    }

    /// The uid of the caller of `req` (attested before this is asked).
    fn uid_of<T>(req: &Request<T>) -> Option<u32> {
        req.extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.cred)
            .map(|c| c.uid)
    }

    /// Opens a server stream for an attested caller: `build` makes the message this caller
    /// gets from a snapshot; the first goes out at once, later ones whenever the message would
    /// differ from the last one sent. An error from `build` (the caller lost its entitlement)
    /// ends the stream with that status.
    fn open_stream<T, F>(&self, uid: Option<u32>, build: F) -> Result<Feed<T>, Status>
    where
        T: PartialEq + Clone + Send + Sync + 'static,
        F: Fn(&Snapshot) -> Result<T, Status> + Send + 'static,
    {
        let uid = uid.ok_or_else(|| Status::permission_denied("no peer credentials"))?;
        let Some(per_uid) = self.streams_per_uid.admit(uid) else {
            self.metrics.refuse(
                "streams_per_uid_cap",
                Some(uid),
                None,
                "this uid holds as many workload api streams as it may",
            );
            return Err(Status::resource_exhausted(
                "too many workload api streams open for this uid",
            ));
        };
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.metrics.refuse(
                "streams_total_cap",
                Some(uid),
                None,
                "as many workload api streams are open as the agent allows",
            );
            return Err(Status::resource_exhausted(
                "too many workload api streams open",
            ));
        };
        let mut snapshots = self.snapshots.clone();
        // Clone the Arc out so the watch's lock is not held while the message is built.
        let current = snapshots.borrow_and_update().clone();
        let first = build(&current)?;
        let (tx, rx) = mpsc::channel(1);
        // Capacity 1 and nothing sent yet: this cannot fail.
        let _ = tx.try_send(Ok(first.clone()));
        let metrics = self.metrics.clone();
        let shutdown = self.shutdown.clone();
        metrics.stream_opened();
        self.tasks.spawn(async move {
            push_changes(snapshots, tx, first, build, shutdown, (permit, per_uid)).await;
            metrics.stream_closed();
        });
        Ok(ReceiverStream::new(rx))
    }

    async fn x509_svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Feed<X509svidResponse>, Status> {
        let selectors = self.attest(&req).await?;
        self.open_stream(Self::uid_of(&req), move |snap| {
            let svids = entitled(snap, &selectors)?;
            Ok(convert::x509_svid_response(&svids, &snap.bundle))
        })
    }

    async fn x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Feed<X509BundlesResponse>, Status> {
        let selectors = self.attest(&req).await?;
        self.open_stream(Self::uid_of(&req), move |snap| {
            // As SPIRE does by default: bundles go to registered workloads only.
            entitled(snap, &selectors)?;
            Ok(convert::x509_bundles_response(&snap.bundle))
        })
    }

    async fn jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Feed<JwtBundlesResponse>, Status> {
        let selectors = self.attest(&req).await?;
        self.open_stream(Self::uid_of(&req), move |snap| {
            entitled(snap, &selectors)?;
            Ok(JwtBundlesResponse {
                bundles: [(
                    convert::bundle_key(&snap.bundle),
                    convert::jwks(&snap.bundle),
                )]
                .into(),
            })
        })
    }

    async fn jwt_svid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let selectors = self.attest(&req).await?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            id => Some(
                SpiffeId::new(id)
                    .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?,
            ),
        };
        let snapshot = self.snapshots.borrow().clone();
        let mut ids: Vec<SpiffeId> = Vec::new();
        for svid in entitled(&snapshot, &selectors)? {
            // Two entries may grant the same ID: one token per ID is enough.
            if !ids.contains(&svid.spiffe_id) {
                ids.push(svid.spiffe_id.clone());
            }
        }
        if let Some(wanted) = wanted {
            if !ids.contains(&wanted) {
                tracing::debug!(?selectors, %wanted, "caller asked for a jwt-svid it is not entitled to");
                return Err(Status::permission_denied(format!(
                    "no identity issued for {wanted}"
                )));
            }
            ids = vec![wanted];
        }
        let mut svids = Vec::with_capacity(ids.len());
        for id in ids {
            let token = self.jwt_svid_for(&id, &req.audience).await?;
            svids.push(Jwtsvid {
                spiffe_id: id.to_string(),
                svid: token,
                hint: String::new(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    /// A JWT-SVID for `id` and `audience`: the cached one while it is fresh, else a new one
    /// from the CA.
    async fn jwt_svid_for(&self, id: &SpiffeId, audience: &[String]) -> Result<String, Status> {
        let key: JwtKey = (id.clone(), audience.to_vec());
        let now = SystemTime::now();
        if let Some(hit) = self.jwt_cache().get(&key).filter(|c| c.fresh(now)) {
            return Ok(hit.token.clone());
        }
        let (token, expires) =
            self.jwt.fetch_jwt(id, audience).await.map_err(|e| {
                Status::unavailable(format!("could not fetch jwt-svid for {id}: {e}"))
            })?;
        let entry = CachedJwt {
            token: token.clone(),
            fetched: now,
            expires,
        };
        if entry.fresh(now) {
            let mut cache = self.jwt_cache();
            if cache.len() >= JWT_CACHE_CAPACITY && !cache.contains_key(&key) {
                cache.retain(|_, c| c.fresh(now));
                if cache.len() >= JWT_CACHE_CAPACITY {
                    // Still full of fresh tokens (many audiences): start over rather than scan
                    // for the oldest at every call.
                    cache.clear();
                }
            }
            cache.insert(key, entry);
        }
        Ok(token)
    }

    fn jwt_cache(&self) -> std::sync::MutexGuard<'_, HashMap<JwtKey, CachedJwt>> {
        self.jwt_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn validate_jwt(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let selectors = self.attest(&req).await?;
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let snapshot = self.snapshots.borrow().clone();
        entitled(&snapshot, &selectors)?;
        let bundle = &snapshot.bundle;
        let claims = identity::jwt::verify_jwt_svid(
            &req.svid,
            bundle.jwt_authorities(),
            &req.audience,
            SystemTime::now(),
        )
        .map_err(|e| Status::invalid_argument(format!("invalid jwt-svid: {e}")))?;
        // The standard: validate against the bundle of the subject's trust domain. The agent
        // holds one, so a subject from elsewhere is not ours to vouch for.
        if !claims.sub.is_member_of(bundle.trust_domain()) {
            return Err(Status::invalid_argument(format!(
                "invalid jwt-svid: no bundle for trust domain {}",
                claims.sub.trust_domain()
            )));
        }
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: claims.sub.to_string(),
            claims: Some(convert::claims_struct(&claims)),
        }))
    }

    fn record<T>(&self, method: Method, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics.record(method, code);
    }
}

/// The caller's SVIDs in `snapshot`; PermissionDenied when there are none.
fn entitled(snapshot: &Snapshot, selectors: &[String]) -> Result<Vec<Arc<WorkloadSvid>>, Status> {
    let svids = snapshot.for_caller(selectors);
    if svids.is_empty() {
        tracing::debug!(?selectors, "workload api caller matches no entry");
        return Err(Status::permission_denied("no identity issued"));
    }
    Ok(svids)
}

/// The life of one stream after its first message.
async fn push_changes<T, F>(
    mut snapshots: SnapshotRx,
    tx: mpsc::Sender<Result<T, Status>>,
    mut last: T,
    build: F,
    shutdown: CancellationToken,
    _permits: (OwnedSemaphorePermit, listen::SourceSlot<u32>),
) where
    T: PartialEq + Clone + Send,
    F: Fn(&Snapshot) -> Result<T, Status>,
{
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    let _ = tx.try_send(Err(Status::unavailable("agent is shutting down")));
                    return;
                }
            }
            () = tx.closed() => return,
            () = shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("agent is shutting down")));
                return;
            }
        }
        let current = snapshots.borrow_and_update().clone();
        let next = build(&current);
        let item = match next {
            Ok(msg) if msg == last => continue,
            Ok(msg) => {
                last = msg.clone();
                Ok(msg)
            }
            Err(status) => Err(status),
        };
        let end = item.is_err();
        // A caller that does not read blocks this send; the snapshot it then gets is the
        // latest, since `watch` keeps only that.
        tokio::select! {
            sent = tx.send(item) => {
                if sent.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => return,
        }
        if end {
            return;
        }
    }
}

#[tonic::async_trait]
impl<J: JwtSource> SpiffeWorkloadApi for WorkloadApi<J> {
    type FetchX509SVIDStream = Feed<X509svidResponse>;
    type FetchX509BundlesStream = Feed<X509BundlesResponse>;
    type FetchJWTBundlesStream = Feed<JwtBundlesResponse>;
    type FetchWITSVIDStream = Feed<WitsvidResponse>;
    type FetchWITBundlesStream = Feed<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let result = self.x509_svid(req).await.map(Response::new);
        self.record(Method::FetchX509Svid, &result);
        result
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let result = self.x509_bundles(req).await.map(Response::new);
        self.record(Method::FetchX509Bundles, &result);
        result
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let result = self.jwt_svid(req).await;
        self.record(Method::FetchJwtSvid, &result);
        result
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let result = self.jwt_bundles(req).await.map(Response::new);
        self.record(Method::FetchJwtBundles, &result);
        result
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let result = self.validate_jwt(req).await;
        self.record(Method::ValidateJwtSvid, &result);
        result
    }

    async fn fetch_witsvid(
        &self,
        _req: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        let result = Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ));
        self.record(Method::FetchWitSvid, &result);
        result
    }

    async fn fetch_wit_bundles(
        &self,
        _req: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        let result = Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ));
        self.record(Method::FetchWitBundles, &result);
        result
    }
}
