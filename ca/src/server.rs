//! Wiring: opens the store, unseals or creates the keys, issues the CA's own SVID, and runs the
//! API, the metrics endpoint, the admin socket and the maintenance loop until shutdown.
//!
//! Why this is one file of over 500 lines: the CA's start, in order, with one error variant
//! for each step that can fail, and the loop that maintains what the start set up.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use identity::Jitter;
use identity::tls::HotCert;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use identity::pem::PemError;

use crate::admin::{self, AdminContext};
use crate::api::{self, Limits, json_response, readyz_response};
use crate::authority::{Authority, AuthorityError, Lifetimes, Push, Rotation, Upstream, unix};
use crate::config::Config;
use crate::guard::DiskGuard;
use crate::k8s::{JwksSource, K8sConfig, K8sError, K8sVerifier, TokenReview};
use crate::metrics::Metrics;
use crate::seal::{Kek, KekSource, SealError};
use crate::service::{Ca, Policy};
use crate::store::any::AnyStore;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::tls::{server_config, serving_cert};

/// Connections the metrics listener serves at once (scrapers and probes need a handful).
const METRICS_MAX_CONNECTIONS: usize = 64;

/// The serving certificate's lifetime; it renews at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why the CA could not start: the data directory, the KEK, the store, the keys, an upstream
/// CA's files or the Kubernetes token verifier.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data dir {}", path.display())]
    CreateDataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set permissions on {}", path.display())]
    DataDirMode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key-encryption key")]
    Kek(#[source] SealError),
    #[error("opening the CA database")]
    OpenDatabase(#[source] StoreError),
    #[error("opening the CA store {target}")]
    OpenStore {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error("start lock")]
    StartLock(#[source] StoreError),
    #[error("cannot read {}", path.display())]
    ReadUpstream {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a certificate chain", path.display())]
    UpstreamChain {
        path: PathBuf,
        #[source]
        source: PemError,
    },
    #[error("{} is not a private key", path.display())]
    UpstreamKey {
        path: PathBuf,
        #[source]
        source: PemError,
    },
    #[error("loading the CA keys")]
    LoadKeys(#[source] AuthorityError),
    #[error("root rollover at start")]
    Rollover(#[source] AuthorityError),
    #[error("--k8s-jwks {}", path.display())]
    JwksFile {
        path: PathBuf,
        #[source]
        source: K8sError,
    },
    #[error("fetching the service-account keys from {issuer}")]
    FetchJwks {
        issuer: String,
        #[source]
        source: K8sError,
    },
    #[error(transparent)]
    K8s(#[from] K8sError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA's own serving certificate could not be issued.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = ServerError> = std::result::Result<T, E>;

pub struct Listeners {
    pub api: TcpListener,
    pub metrics: TcpListener,
    pub admin: UnixListener,
}

/// A running CA, for tests and embedding.
pub struct Running {
    pub ca: Arc<Ca<AnyStore>>,
    pub tasks: TaskTracker,
}

/// Creates the data directory (0700) if needed.
pub fn prepare_data_dir(cfg: &Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServerError::CreateDataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700)).map_err(
        |source| ServerError::DataDirMode {
            path: cfg.data_dir.clone(),
            source,
        },
    )?;
    Ok(())
}

/// Starts everything on already-bound listeners and returns once serving has begun.
pub async fn start(
    cfg: &Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Running> {
    prepare_data_dir(cfg)?;
    let (kek, source) = Kek::load(cfg.kek_file.as_deref(), cfg.kek.as_deref(), &cfg.data_dir)
        .map_err(ServerError::Kek)?;
    match &source {
        KekSource::Generated(p) | KekSource::Existing(p) => tracing::warn!(
            kek = %p.display(),
            "the key-encryption key sits on the same disk as the CA data; use --kek-file on separate storage (or KITH_CA_KEK) in production"
        ),
        KekSource::File(p) => tracing::info!(kek = %p.display(), "key-encryption key from file"),
        KekSource::Env => tracing::info!("key-encryption key from KITH_CA_KEK"),
    }
    let store = Arc::new(match &cfg.store {
        None => AnyStore::Sqlite(
            SqliteStore::open(&cfg.data_dir, kek.audit_key()).map_err(ServerError::OpenDatabase)?,
        ),
        Some(url) => {
            let replica = replica_id();
            let pg = PgStore::open(url, kek.audit_key(), &replica)
                .await
                .map_err(|source| ServerError::OpenStore {
                    target: cfg.store_target.clone(),
                    source,
                })?;
            tracing::info!(store = %cfg.store_target, replica = %replica, "CA store on PostgreSQL");
            AnyStore::Postgres(pg)
        }
    });
    // Replicas starting together on an empty database take turns: exactly one creates the
    // root and the first keys.
    let startup = match store.as_ref() {
        AnyStore::Postgres(pg) => Some(pg.startup_lock().await.map_err(ServerError::StartLock)?),
        AnyStore::Sqlite(_) => None,
    };
    let upstream = match (&cfg.upstream_cert, &cfg.upstream_key) {
        (Some(c), Some(k)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| ServerError::ReadUpstream {
                    path: path.clone(),
                    source,
                })
            };
            let chain = identity::pem::certificates(&read(c)?).map_err(|source| {
                ServerError::UpstreamChain {
                    path: c.clone(),
                    source,
                }
            })?;
            let key = identity::pem::private_key(&read(k)?).map_err(|source| {
                ServerError::UpstreamKey {
                    path: k.clone(),
                    source,
                }
            })?;
            Some(Upstream { chain, key })
        }
        _ => None,
    };
    let now = SystemTime::now();
    let lifetimes = Lifetimes {
        root: cfg.root_ttl,
        intermediate: cfg.intermediate_ttl,
        rollover: crate::rollover::Policy {
            rollover_at: cfg.root_rollover_at,
            propagation: cfg.workload_ttl.max(cfg.node_ttl),
            max_leaf_ttl: cfg.workload_ttl.max(cfg.node_ttl),
        },
    };
    let authority = Arc::new(
        Authority::load_or_init(
            store.as_ref(),
            kek,
            cfg.trust_domain.clone(),
            lifetimes,
            upstream,
            now,
        )
        .await
        .map_err(ServerError::LoadKeys)?,
    );
    // The bundle is right from the first answer: a successor published, retired roots gone.
    authority
        .rollover(store.as_ref(), now, Push::None)
        .await
        .map_err(ServerError::Rollover)?;
    drop(startup);
    let metrics = Arc::new(Metrics::new());
    let policy = Policy {
        workload_ttl: cfg.workload_ttl,
        node_ttl: cfg.node_ttl,
        max_ttl: cfg.workload_ttl.max(cfg.node_ttl),
    };
    let mut ca = Ca::new(store, authority.clone(), policy, metrics.clone()).await?;
    ca.k8s = k8s_verifier(cfg, &shutdown).await?;
    let disk = Arc::new(DiskGuard::new(&cfg.data_dir, cfg.min_free_disk));
    ca.disk = Some(disk.clone());
    ca.measure_disk();
    let ca = Arc::new(ca);

    let serving = Arc::new(HotCert::new(serving_cert(
        &authority,
        &cfg.dns,
        SERVING_TTL,
        now,
    )?));
    let tls = Arc::new(ArcSwap::new(server_config(serving.clone())?));

    let api_addr = listeners.api.local_addr()?;
    let metrics_addr = listeners.metrics.local_addr()?;
    tracing::info!(
        config = %serde_json::to_string(cfg).unwrap_or_default(),
        api = %api_addr,
        metrics = %metrics_addr,
        "kith ca serving"
    );

    let tasks = TaskTracker::new();
    let limits = Limits {
        max_connections: cfg.max_connections,
        max_per_source: cfg.max_connections_per_source,
        request_timeout: cfg.request_timeout,
        idle_timeout: cfg.idle_timeout,
        ..Limits::default()
    };
    let metrics_limits = Limits {
        max_connections: METRICS_MAX_CONNECTIONS,
        max_per_source: METRICS_MAX_CONNECTIONS,
        ..limits.clone()
    };
    tasks.spawn(api::serve(
        ca.clone(),
        listeners.api,
        tls,
        limits,
        shutdown.clone(),
    ));
    tasks.spawn(serve_metrics(
        ca.clone(),
        listeners.metrics,
        metrics_limits,
        shutdown.clone(),
    ));
    let ctx = AdminContext {
        public_url: cfg.public_url.clone(),
    };
    tasks.spawn(admin::serve(
        ca.clone(),
        ctx,
        listeners.admin,
        shutdown.clone(),
    ));
    tasks.spawn(maintain(
        ca.clone(),
        serving,
        cfg.dns.clone(),
        shutdown.clone(),
    ));
    tasks.close();
    Ok(Running { ca, tasks })
}

/// The Kubernetes token verifier, when an issuer is configured: keys from `--k8s-jwks`, or
/// fetched from the issuer and refreshed every 10 minutes (and on an unknown `kid`, at most
/// every 30 s), refused once older than `--k8s-jwks-max-staleness`; with
/// `--k8s-token-review`, every token is also put to the API server's TokenReview.
async fn k8s_verifier(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<K8sVerifier>>> {
    let Some(issuer) = &cfg.k8s_issuer else {
        return Ok(None);
    };
    let mut k8s_cfg = K8sConfig::new(issuer.clone());
    k8s_cfg.audience = cfg.k8s_audience.clone();
    k8s_cfg.max_staleness = cfg.k8s_jwks_max_staleness;
    // In a pod, the CA's own service-account token lets it read the issuer's keys and ask
    // for token reviews.
    let token_file = PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token");
    let token_file = token_file.exists().then_some(token_file);
    let review = cfg.k8s_token_review.as_ref().map(|url| TokenReview {
        api_url: url.clone(),
        ca_file: cfg
            .k8s_token_review_ca_file
            .clone()
            .or_else(|| cfg.k8s_ca_file.clone()),
        bearer_token_file: cfg
            .k8s_token_review_token_file
            .clone()
            .or_else(|| token_file.clone()),
    });
    if let Some(r) = &review {
        tracing::info!(api = %r.api_url, "pod tokens are checked with the api server's TokenReview");
    }
    let with_review = |v: K8sVerifier| match &review {
        Some(r) => v.with_review(r.clone()),
        None => v,
    };
    if let Some(path) = &cfg.k8s_jwks {
        let v =
            K8sVerifier::from_jwks_file(k8s_cfg, path).map_err(|source| ServerError::JwksFile {
                path: path.clone(),
                source,
            })?;
        return Ok(Some(Arc::new(with_review(v))));
    }
    let token = token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let jwks = crate::k8s::fetch_jwks(
        issuer,
        cfg.k8s_ca_file.as_deref(),
        token.as_deref().map(str::trim),
    )
    .await
    .map_err(|source| ServerError::FetchJwks {
        issuer: issuer.clone(),
        source,
    })?;
    let source = JwksSource {
        issuer_url: issuer.clone(),
        ca_file: cfg.k8s_ca_file.clone(),
        bearer_token_file: token_file.clone(),
    };
    let v = K8sVerifier::from_jwks(k8s_cfg, &jwks)?.with_source(source, SystemTime::now());
    let v = Arc::new(with_review(v));
    v.spawn_refresh(
        issuer.clone(),
        cfg.k8s_ca_file.clone(),
        token_file,
        Duration::from_secs(600),
        shutdown.clone(),
    );
    Ok(Some(v))
}

/// Rotates the signer when due, renews the CA's own certificate, and keeps the expiry gauges
/// current.
async fn maintain(
    ca: Arc<Ca<AnyStore>>,
    serving: Arc<HotCert>,
    dns: Vec<String>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(if ca.store.shared() {
        MAINTAIN_EVERY
    } else {
        Duration::from_secs(5)
    });
    let mut serving_signer = ca.authority.keys().active.id.clone();
    let mut seen_keys = None;
    let mut leading = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        // Replicas: exactly one (the holder of the `keys` lease) prepares signers, JWT keys
        // and roots; every replica adopts what is in the store when it changed, and rebuilds
        // its entry and node caches (admin verbs may have run on another replica).
        let lead = if ca.store.shared() {
            follow(&ca, &mut seen_keys, now).await;
            match ca
                .store
                .try_lease(KEYS_LEASE, LEASE_TTL.as_secs() as i64)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the keys lease; not preparing keys");
                    false
                }
            }
        } else {
            true
        };
        if leading != Some(lead) {
            if ca.store.shared() {
                tracing::info!(lease = KEYS_LEASE, held = lead, "replica lease");
            }
            leading = Some(lead);
        }
        if lead {
            match ca.authority.rotate(ca.store.as_ref(), now).await {
                Ok(Rotation::Nothing) => {}
                Ok(r) => tracing::info!(step = ?r, "signer rotation"),
                Err(e) => tracing::error!(error = %e, "signer rotation failed; will retry"),
            }
            if let Err(e) = ca
                .authority
                .rollover(ca.store.as_ref(), now, Push::None)
                .await
            {
                tracing::error!(error = %e, "root rollover step failed; will retry");
            }
        }
        // A new signer (a rotation, a root switch here or by `kith ca root rotate --now`) signs
        // the CA's own certificate too, before the old root can leave the bundle.
        let active = ca.authority.keys().active.id.clone();
        if active != serving_signer {
            match serving_cert(&ca.authority, &dns, SERVING_TTL, now).map(|c| serving.store(c)) {
                Ok(()) => serving_signer = active,
                Err(e) => {
                    tracing::error!(error = %e, "failed to renew the CA's serving certificate")
                }
            }
        }
        if now >= serving.load().refresh_at(Jitter::NONE) {
            match serving_cert(&ca.authority, &dns, SERVING_TTL, now).map(|c| serving.store(c)) {
                Ok(()) => tracing::info!("renewed the CA's serving certificate"),
                Err(e) => {
                    tracing::error!(error = %e, "failed to renew the CA's serving certificate")
                }
            }
        }
        ca.chores(now).await;
        let keys = ca.authority.keys();
        ca.metrics
            .signer_seconds_to_expiry
            .set(unix(keys.active.not_after) - unix(now));
        ca.metrics
            .root_seconds_to_expiry
            .set(unix(keys.root_not_after) - unix(now));
        ca.metrics.observe_rollover(&ca.authority.rollover_view());
        ca.metrics.observe_outage(&ca.outage(now).await, unix(now));
    }
}

/// How often the maintenance loop runs: replicas pick up each other's keys within it.
const MAINTAIN_EVERY: Duration = Duration::from_secs(2);
/// The lease of the replica that prepares keys and runs the rollover.
pub const KEYS_LEASE: &str = "keys";
/// A lease not renewed for this long passes to another replica.
const LEASE_TTL: Duration = Duration::from_secs(15);

/// A name for this process in leases and probes: the host name and a random suffix (several
/// replicas may share a host).
fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    format!("{host}-{}", crate::store::hex(&r))
}

/// Adopts keys and cache changes another replica made, when the stored keys changed.
async fn follow(ca: &Ca<AnyStore>, seen: &mut Option<Vec<(String, i64, bool)>>, now: SystemTime) {
    match ca.store.ca_keys().await {
        Ok(records) => {
            // A key whose activation time passed changes the print too: the replica that
            // prepared it activates it on its own clock, and so does every other.
            let print: Vec<(String, i64, bool)> = records
                .iter()
                .map(|r| (r.id.clone(), r.activate_at, r.activate_at <= unix(now)))
                .collect();
            if seen.as_ref() != Some(&print) {
                match ca.authority.refresh(ca.store.as_ref(), now).await {
                    Ok(true) => tracing::info!("adopted keys prepared by a replica"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot load the keys from the store"),
                }
                *seen = Some(print);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the keys from the store"),
    }
    if let Err(e) = ca.reload().await {
        tracing::warn!(error = %e, "cannot refresh entries and nodes from the store");
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` in plain HTTP/1.1, through the one accept loop
/// (connection and per-source caps, the API's header and idle deadlines): the port is often
/// reachable from a whole cluster.
async fn serve_metrics(
    ca: Arc<Ca<AnyStore>>,
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let http = listen::HttpLimits {
        max_connections: limits.max_connections,
        max_per_source: limits.max_per_source,
        header_timeout: limits.request_timeout,
        idle_timeout: limits.idle_timeout,
    };
    let counted = ca.clone();
    let refused = move |r: listen::Refusal| {
        counted.metrics.refused(match r {
            listen::Refusal::TooManyConnections => "metrics_too_many_connections",
            listen::Refusal::TooManyFromSource => "metrics_too_many_from_source",
            listen::Refusal::HeaderTimeout => "metrics_header_timeout",
            listen::Refusal::IdleTimeout => "metrics_idle_timeout",
        })
    };
    listen::serve_http1(listener, "metrics", http, refused, shutdown, |_, _| {
        let ca = ca.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let ca = ca.clone();
            async move { Ok::<_, Infallible>(metrics_route(&ca, req.uri().path()).await) }
        })
    })
    .await
}

async fn metrics_route(ca: &Ca<AnyStore>, path: &str) -> hyper::Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut r = hyper::Response::new(Full::new(Bytes::from(ca.metrics.encode())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => readyz_response(&ca.readiness(SystemTime::now()).await),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"code": "not_found", "message": "try /metrics, /healthz or /readyz"}),
        ),
    }
}
