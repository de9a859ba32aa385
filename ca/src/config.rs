//! `kith ca serve` settings: each one is a flag, a `KITH_CA_*` environment variable, and a key
//! in the optional TOML file, in that order of precedence, over the built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use identity::{IdError, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::guard::MinFree;

/// A setting (flag, environment variable or config file key) that cannot be used, named as
/// the flag or the file's key, with what it must be.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid", path.display())]
    InvalidFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file: {field} = {value:?} is not a duration like 1h or 7d")]
    Duration {
        field: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("--trust-domain {value:?}")]
    TrustDomain {
        value: String,
        #[source]
        source: IdError,
    },
    #[error("--dns {0:?} is not a valid DNS name")]
    Dns(String),
    #[error("--{0} must be at least 10s")]
    TtlTooShort(&'static str),
    #[error(
        "--root-rollover-at must be a fraction of the root's life between 0 and 1 (exclusive), not {0}"
    )]
    RolloverAt(f64),
    #[error("--intermediate-ttl must be at least 1m and no longer than --root-ttl")]
    IntermediateTtl,
    /// The value shown is redacted (no password).
    #[error("--store {0:?} is neither `sqlite` nor a postgres:// connection string")]
    Store(String),
    #[error("--log-format must be text or json, not {0:?}")]
    LogFormat(String),
    #[error("--max-connections must be at least 1")]
    MaxConnections,
    #[error("config file: min-free-disk: {0}")]
    MinFreeDisk(String),
    #[error("--max-connections-per-source must be between 1 and --max-connections")]
    MaxConnectionsPerSource,
    #[error("--idle-timeout must be at least 1s")]
    IdleTimeout,
    #[error("--k8s-jwks-max-staleness must be at least 1s")]
    JwksMaxStaleness,
    #[error("--k8s-token-review {0:?} must be an https:// URL of the Kubernetes API server")]
    TokenReview(String),
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and env win over it)
    #[arg(long, env = "KITH_CA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Trust domain [default: example.org]
    #[arg(long, env = "KITH_CA_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// API address [default: 0.0.0.0:8443]
    #[arg(long, env = "KITH_CA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory (database, admin socket) [default: /var/lib/kith-ca]
    #[arg(long, env = "KITH_CA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// DNS names for the CA's serving certificate (repeatable) [default: localhost]
    #[arg(long, env = "KITH_CA_DNS", value_delimiter = ',')]
    pub dns: Vec<String>,
    /// URL agents use to reach this CA, printed in join commands [default: https://<first dns>:<port>]
    #[arg(long, env = "KITH_CA_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Workload SVID lifetime [default: 1h]
    #[arg(long, env = "KITH_CA_WORKLOAD_TTL", value_parser = humantime::parse_duration)]
    pub workload_ttl: Option<Duration>,
    /// Node SVID lifetime [default: 24h]
    #[arg(long, env = "KITH_CA_NODE_TTL", value_parser = humantime::parse_duration)]
    pub node_ttl: Option<Duration>,
    /// Signing intermediate lifetime [default: 7d]
    #[arg(long, env = "KITH_CA_INTERMEDIATE_TTL", value_parser = humantime::parse_duration)]
    pub intermediate_ttl: Option<Duration>,
    /// Root lifetime, for a root the CA creates [default: 365d]
    #[arg(long, env = "KITH_CA_ROOT_TTL", value_parser = humantime::parse_duration)]
    pub root_ttl: Option<Duration>,
    /// When in its life a root gets its successor, as a fraction (0 < f < 1) [default: 0.5]
    #[arg(long, env = "KITH_CA_ROOT_ROLLOVER_AT")]
    pub root_rollover_at: Option<f64>,
    /// File with the key-encryption key (32 bytes, base64) that seals CA keys at rest and keys
    /// the audit chain; or set KITH_CA_KEK to the key itself (there is no flag for it: a flag's
    /// value shows in `ps` to every user of the host)
    #[arg(long, env = "KITH_CA_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Metrics and health address [default: 127.0.0.1:9090]
    #[arg(long, env = "KITH_CA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Admin socket [default: <data-dir>/admin.sock]
    #[arg(long, env = "KITH_CA_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// An operator's root or intermediate certificate (PEM, its chain up to the root) to sign under
    #[arg(long, env = "KITH_CA_UPSTREAM_CERT", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// The private key of --upstream-cert (PKCS#8 PEM)
    #[arg(long, env = "KITH_CA_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Kubernetes service-account issuer (the `iss` of projected tokens); enables /v1/attest/k8s
    #[arg(long, env = "KITH_CA_K8S_ISSUER")]
    pub k8s_issuer: Option<String>,
    /// JWKS file of the service-account issuer (else fetched from <issuer>/openid/v1/jwks)
    #[arg(long, env = "KITH_CA_K8S_JWKS")]
    pub k8s_jwks: Option<PathBuf>,
    /// CA file to verify the issuer's HTTPS endpoint when fetching the JWKS
    #[arg(long, env = "KITH_CA_K8S_CA_FILE")]
    pub k8s_ca_file: Option<PathBuf>,
    /// Audience the projected tokens must carry [default: kith-ca]
    #[arg(long, env = "KITH_CA_K8S_AUDIENCE")]
    pub k8s_audience: Option<String>,
    /// Maximum concurrent API connections [default: 4096]
    #[arg(long, env = "KITH_CA_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Maximum concurrent API connections from one source address [default: max-connections / 8]
    #[arg(long, env = "KITH_CA_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Close a connection (API or metrics) on which nothing moved for this long [default: 60s]
    #[arg(long, env = "KITH_CA_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Kubernetes API server URL: ask its TokenReview API about every pod token, so a deleted
    /// pod's token stops working at once
    #[arg(long, env = "KITH_CA_K8S_TOKEN_REVIEW")]
    pub k8s_token_review: Option<String>,
    /// CA file for --k8s-token-review [default: --k8s-ca-file]
    #[arg(long, env = "KITH_CA_K8S_TOKEN_REVIEW_CA_FILE")]
    pub k8s_token_review_ca_file: Option<PathBuf>,
    /// Bearer token file for --k8s-token-review, read on every call [default: the pod's service-account token]
    #[arg(long, env = "KITH_CA_K8S_TOKEN_REVIEW_TOKEN_FILE")]
    pub k8s_token_review_token_file: Option<PathBuf>,
    /// Refuse pod tokens when the issuer's keys could not be refreshed for this long [default: 1h]
    #[arg(long, env = "KITH_CA_K8S_JWKS_MAX_STALENESS", value_parser = humantime::parse_duration)]
    pub k8s_jwks_max_staleness: Option<Duration>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "KITH_CA_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// How long a client may take to send a request [default: 10s]
    #[arg(long, env = "KITH_CA_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Free space to keep on the data volume (5%, 256MiB, 0, or auto: the smaller of 5% and
    /// 256MiB); below it anonymous requests (join and Kubernetes attestation) are refused with
    /// 503 disk_low [default: auto]
    #[arg(long, env = "KITH_CA_MIN_FREE_DISK", value_parser = MinFree::parse)]
    pub min_free_disk: Option<MinFree>,
    /// Where the CA keeps its state: `sqlite` (the file kith-ca.db in --data-dir) or a
    /// PostgreSQL connection string (`postgres://user@host1,host2/db?sslmode=verify-full&
    /// sslrootcert=FILE&target_session_attrs=read-write`) shared by several replicas, which
    /// must all use the same KEK [default: sqlite]
    #[arg(long, env = "KITH_CA_STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    trust_domain: Option<String>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    dns: Option<Vec<String>>,
    public_url: Option<String>,
    workload_ttl: Option<String>,
    node_ttl: Option<String>,
    intermediate_ttl: Option<String>,
    root_ttl: Option<String>,
    root_rollover_at: Option<f64>,
    kek_file: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    upstream_cert: Option<PathBuf>,
    upstream_key: Option<PathBuf>,
    k8s_issuer: Option<String>,
    k8s_jwks: Option<PathBuf>,
    k8s_ca_file: Option<PathBuf>,
    k8s_audience: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    idle_timeout: Option<String>,
    k8s_token_review: Option<String>,
    k8s_token_review_ca_file: Option<PathBuf>,
    k8s_token_review_token_file: Option<PathBuf>,
    k8s_jwks_max_staleness: Option<String>,
    log_format: Option<String>,
    request_timeout: Option<String>,
    min_free_disk: Option<String>,
    store: Option<String>,
}

/// The effective configuration. `Serialize` is what is logged at start: no secret is in it
/// (the KEK appears only as where it came from).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub dns: Vec<String>,
    pub public_url: String,
    #[serde(with = "humantime_serde_secs")]
    pub workload_ttl: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub node_ttl: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub intermediate_ttl: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub root_ttl: Duration,
    pub root_rollover_at: f64,
    pub kek_file: Option<PathBuf>,
    #[serde(skip)]
    pub kek: Option<String>,
    /// The PostgreSQL connection string (None: SQLite in the data dir). Not logged: it may
    /// hold a password; `store_target` is its redacted form.
    #[serde(skip)]
    pub store: Option<String>,
    pub store_target: String,
    pub metrics_listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    pub k8s_issuer: Option<String>,
    pub k8s_jwks: Option<PathBuf>,
    pub k8s_ca_file: Option<PathBuf>,
    pub k8s_audience: String,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// A connection on which nothing moves for this long is closed (API and metrics).
    #[serde(with = "humantime_serde_secs")]
    pub idle_timeout: Duration,
    pub k8s_token_review: Option<String>,
    pub k8s_token_review_ca_file: Option<PathBuf>,
    pub k8s_token_review_token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde_secs")]
    pub k8s_jwks_max_staleness: Duration,
    pub log_format: String,
    /// How long a client may take to send a request (headers, then body).
    #[serde(with = "humantime_serde_secs")]
    pub request_timeout: Duration,
    /// Free space kept on the data volume; below it anonymous work is refused.
    pub min_free_disk: MinFree,
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

fn dur(field: &'static str, v: Option<String>) -> Result<Option<Duration>> {
    v.map(|s| {
        humantime::parse_duration(&s).map_err(|source| ConfigError::Duration {
            field,
            value: s,
            source,
        })
    })
    .transpose()
}

impl Config {
    pub fn resolve(args: ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let td_text = args
            .trust_domain
            .or(file.trust_domain)
            .unwrap_or_else(|| "example.org".into());
        let trust_domain =
            TrustDomain::new(&td_text).map_err(|source| ConfigError::TrustDomain {
                value: td_text.clone(),
                source,
            })?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8443)));
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/kith-ca"));
        let dns = if !args.dns.is_empty() {
            args.dns
        } else {
            file.dns.unwrap_or_else(|| vec!["localhost".into()])
        };
        for name in &dns {
            rustls_pki_types::DnsName::try_from(name.as_str())
                .map_err(|_| ConfigError::Dns(name.clone()))?;
        }
        let public_url = args.public_url.or(file.public_url).unwrap_or_else(|| {
            format!(
                "https://{}:{}",
                dns.first().map(String::as_str).unwrap_or("localhost"),
                listen.port()
            )
        });
        let workload_ttl = args
            .workload_ttl
            .or(dur("workload-ttl", file.workload_ttl)?)
            .unwrap_or(Duration::from_secs(3600));
        let node_ttl = args
            .node_ttl
            .or(dur("node-ttl", file.node_ttl)?)
            .unwrap_or(Duration::from_secs(86_400));
        let intermediate_ttl = args
            .intermediate_ttl
            .or(dur("intermediate-ttl", file.intermediate_ttl)?)
            .unwrap_or(Duration::from_secs(7 * 86_400));
        let root_ttl = args
            .root_ttl
            .or(dur("root-ttl", file.root_ttl)?)
            .unwrap_or(Duration::from_secs(365 * 86_400));
        for (name, d) in [("workload-ttl", workload_ttl), ("node-ttl", node_ttl)] {
            if d < Duration::from_secs(10) {
                return Err(ConfigError::TtlTooShort(name));
            }
        }
        let root_rollover_at = args
            .root_rollover_at
            .or(file.root_rollover_at)
            .unwrap_or(0.5);
        if !(root_rollover_at > 0.0 && root_rollover_at < 1.0) {
            return Err(ConfigError::RolloverAt(root_rollover_at));
        }
        if intermediate_ttl < Duration::from_secs(60) || intermediate_ttl > root_ttl {
            return Err(ConfigError::IntermediateTtl);
        }
        let store = match args.store.or(file.store) {
            None => None,
            Some(s) if s == "sqlite" => None,
            Some(s) if crate::store::postgres::is_url(&s) => Some(s),
            Some(s) => return Err(ConfigError::Store(crate::store::postgres::redact(&s))),
        };
        let store_target = match &store {
            Some(url) => crate::store::postgres::redact(url),
            None => format!("sqlite:{}", data_dir.join("kith-ca.db").display()),
        };
        let admin_socket = args
            .admin_socket
            .or(file.admin_socket)
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let log_format = args
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            return Err(ConfigError::LogFormat(log_format));
        }
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(4096);
        if max_connections == 0 {
            return Err(ConfigError::MaxConnections);
        }
        let min_free_disk = match args.min_free_disk {
            Some(m) => m,
            None => match file.min_free_disk {
                Some(text) => MinFree::parse(&text).map_err(ConfigError::MinFreeDisk)?,
                None => MinFree::default(),
            },
        };
        let max_connections_per_source = args
            .max_connections_per_source
            .or(file.max_connections_per_source)
            .unwrap_or((max_connections / 8).max(1));
        if max_connections_per_source == 0 || max_connections_per_source > max_connections {
            return Err(ConfigError::MaxConnectionsPerSource);
        }
        let idle_timeout = args
            .idle_timeout
            .or(dur("idle-timeout", file.idle_timeout)?)
            .unwrap_or(Duration::from_secs(60));
        if idle_timeout < Duration::from_secs(1) {
            return Err(ConfigError::IdleTimeout);
        }
        let k8s_jwks_max_staleness = args
            .k8s_jwks_max_staleness
            .or(dur("k8s-jwks-max-staleness", file.k8s_jwks_max_staleness)?)
            .unwrap_or(Duration::from_secs(3600));
        if k8s_jwks_max_staleness < Duration::from_secs(1) {
            return Err(ConfigError::JwksMaxStaleness);
        }
        let k8s_token_review = args.k8s_token_review.or(file.k8s_token_review);
        if let Some(url) = &k8s_token_review
            && !url.starts_with("https://")
        {
            return Err(ConfigError::TokenReview(url.clone()));
        }
        Ok(Self {
            trust_domain,
            listen,
            data_dir,
            dns,
            public_url,
            workload_ttl,
            node_ttl,
            intermediate_ttl,
            root_ttl,
            root_rollover_at,
            kek_file: args.kek_file.or(file.kek_file),
            store,
            store_target,
            kek: kek_from_env(),
            metrics_listen: args
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
            admin_socket,
            upstream_cert: args.upstream_cert.or(file.upstream_cert),
            upstream_key: args.upstream_key.or(file.upstream_key),
            k8s_issuer: args.k8s_issuer.or(file.k8s_issuer),
            k8s_jwks: args.k8s_jwks.or(file.k8s_jwks),
            k8s_ca_file: args.k8s_ca_file.or(file.k8s_ca_file),
            k8s_audience: args
                .k8s_audience
                .or(file.k8s_audience)
                .unwrap_or_else(|| "kith-ca".into()),
            max_connections,
            max_connections_per_source,
            idle_timeout,
            k8s_token_review,
            k8s_token_review_ca_file: args
                .k8s_token_review_ca_file
                .or(file.k8s_token_review_ca_file),
            k8s_token_review_token_file: args
                .k8s_token_review_token_file
                .or(file.k8s_token_review_token_file),
            k8s_jwks_max_staleness,
            log_format,
            request_timeout: args
                .request_timeout
                .or(dur("request-timeout", file.request_timeout)?)
                .unwrap_or(Duration::from_secs(10)),
            min_free_disk,
        })
    }

    /// A test or embedded configuration: everything on loopback in `data_dir`.
    pub fn for_tests(data_dir: &Path, trust_domain: &str) -> Result<Self> {
        let mut c = Self::resolve(ServeArgs {
            trust_domain: Some(trust_domain.into()),
            data_dir: Some(data_dir.to_owned()),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Default::default()
        })?;
        c.kek = Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            [42u8; 32],
        ));
        Ok(c)
    }
}

/// `KITH_CA_KEK`: the key-encryption key itself (base64), read from the environment only.
pub fn kek_from_env() -> Option<String> {
    std::env::var("KITH_CA_KEK").ok().filter(|v| !v.is_empty())
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::InvalidFile {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.toml");
        std::fs::write(
            &file,
            "trust-domain = \"file.org\"\nworkload-ttl = \"30m\"\nlisten = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let c = Config::resolve(ServeArgs {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.trust_domain.as_str(), "file.org");
        assert_eq!(c.workload_ttl, Duration::from_secs(1800));
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.node_ttl, Duration::from_secs(86_400));
        assert_eq!(c.public_url, "https://localhost:7001");
        assert_eq!(c.min_free_disk, MinFree::Auto);
    }

    #[test]
    fn the_free_space_reserve_comes_from_the_file_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.toml");
        std::fs::write(&file, "min-free-disk = \"1GiB\"\n").unwrap();
        let c = Config::resolve(ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.min_free_disk, MinFree::Bytes(1 << 30));
        std::fs::write(&file, "min-free-disk = \"plenty\"\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            identity::report::chain(&err).contains("min-free-disk"),
            "{}",
            identity::report::chain(&err)
        );
    }

    #[test]
    fn wrong_config_is_refused_with_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.toml");
        std::fs::write(&file, "trust-domian = \"typo.org\"\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            identity::report::chain(&err).contains("unknown field `trust-domian`"),
            "{}",
            identity::report::chain(&err)
        );
        std::fs::write(&file, "node-ttl = \"forever\"\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            identity::report::chain(&err).contains("node-ttl"),
            "{}",
            identity::report::chain(&err)
        );
        let err = Config::resolve(ServeArgs {
            trust_domain: Some("Bad.Org".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            identity::report::chain(&err).contains("lowercase"),
            "{}",
            identity::report::chain(&err)
        );
    }

    #[test]
    fn the_logged_config_has_no_secret() {
        let mut c = Config::resolve(ServeArgs::default()).unwrap();
        c.kek = Some("c2VjcmV0".into());
        let logged = serde_json::to_string(&c).unwrap();
        assert!(!logged.contains("c2VjcmV0"));
    }
}
