//! Kubernetes attestation: verifies a pod's projected service-account token (a JWT signed by the
//! cluster's service-account issuer) and turns its pod binding into a [`PodIdentity`].
//!
//! The issuer's public keys come from a JWKS file or from the issuer itself
//! (`<issuer>/openid/v1/jwks`, [`fetch_jwks`]), and are swapped in place by
//! [`K8sVerifier::replace_jwks`] or [`K8sVerifier::spawn_refresh`] without ever blocking a
//! verification.
//!
//! The JWKS is read as jsonwebtoken's `JwkSet`, and tokens are checked with jsonwebtoken's
//! `decode`. Each key's algorithm is fixed when the JWKS is loaded, from the JWK's `kty` (and
//! `alg`, when it names one): RSA → RS256, EC P-256 → ES256. `decode` runs with that key's
//! `Validation`, whose only algorithm is the key's, so the token header can only ask for what
//! the key already allows. The claims are checked here, not by the library: its `exp`/`nbf`
//! checks read the system clock (kith checks against the clock it is given, with the configured
//! leeway), it has no `iat` check and knows nothing of the `kubernetes.io` pod binding, and its
//! `iss`/`aud` checks would run inside `decode`, before the binding can be looked at (a legacy
//! secret token is reported as having no pod binding), and would take an `iss` array.
//!
//! Why this is one file of over 500 lines: Kubernetes token verification end to end: the JWKS
//! source (fetched, cached, refreshed), the key set with its per-key algorithm, and the claim
//! checks in the order whose error kinds `ca/API.md` documents.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use identity::jwt::{JwsError, read_header};
use identity::{SpiffeId, TrustDomain};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, OtherKeyParameters, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::ServerName;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

/// The audience kith asks pods to request for their projected token.
pub const DEFAULT_AUDIENCE: &str = identity::mesh::TOKEN_AUDIENCE;
/// Clock skew allowed between the cluster's API server and the CA. It only absorbs skew: a
/// token is refused once `now > exp + leeway`, and the SVID it buys is capped by `exp` (plus
/// [`SVID_MARGIN`]), never by `exp + leeway`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// How long an SVID bought with a pod token may outlive that token's `exp`: the time the
/// sidecar needs to re-attest with the token the kubelet has rotated in meanwhile (the kubelet
/// refreshes a projected token at 80 % of its life, so the new one is there long before the
/// old one's `exp`; this margin covers the sidecar's retries with backoff across a short CA
/// outage). No SVID lives past `exp + SVID_MARGIN`.
pub const SVID_MARGIN: Duration = Duration::from_secs(300);
/// Without a successful refresh for this long, the issuer's keys are no longer trusted.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(3600);
/// An unknown `kid` triggers a refresh of the issuer's keys at most this often.
pub const KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The largest TokenReview answer accepted.
const MAX_REVIEW_LEN: usize = 64 * 1024;
/// Tokens larger than this are refused before any parsing (real ones are 1–2 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The largest JWKS accepted, from a file or from the issuer.
pub const MAX_JWKS_LEN: usize = 1024 * 1024;
/// The whole JWKS fetch (connect, TLS, request, body) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed refresh, the next attempt comes at most this much later.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// SECURITY: RSA keys below 2048 bits are refused when the JWKS is loaded.
const MIN_RSA_MODULUS_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("algorithm not allowed: {0}")]
    AlgNotAllowed(String),
    #[error("no key for kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("bad signature")]
    BadSignature,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no pod binding")]
    NoPodBinding,
    #[error("invalid kubernetes name {0:?}")]
    BadName(String),
    #[error("bad jwks: {0}")]
    BadJwks(String),
    #[error("bad config: {0}")]
    BadConfig(&'static str),
    #[error("reading jwks: {0}")]
    Io(#[from] std::io::Error),
    #[error("fetching jwks: {0}")]
    Fetch(String),
    #[error(
        "the issuer's keys were last refreshed {age}s ago, longer than the {max}s allowed; pod tokens are refused until a refresh succeeds"
    )]
    StaleKeys { age: u64, max: u64 },
    #[error("the api server's TokenReview did not authenticate the token: {0}")]
    ReviewRejected(String),
    #[error("cannot ask the api server's TokenReview: {0}")]
    ReviewFailed(String),
}

impl K8sError {
    /// A stable snake_case label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::AlgNotAllowed(_) => "alg_not_allowed",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NoPodBinding => "no_pod_binding",
            Self::BadName(_) => "bad_name",
            Self::BadJwks(_) => "bad_jwks",
            Self::BadConfig(_) => "bad_config",
            Self::Io(_) => "io",
            Self::Fetch(_) => "fetch_failed",
            Self::StaleKeys { .. } => "jwks_stale",
            Self::ReviewRejected(_) => "review_rejected",
            Self::ReviewFailed(_) => "review_failed",
        }
    }
}

impl From<JwsError> for K8sError {
    fn from(e: JwsError) -> Self {
        match e {
            JwsError::UnknownAlgorithm(alg) => Self::AlgNotAllowed(alg),
            other => Self::Malformed(other.detail()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sConfig {
    /// The `iss` the cluster puts in its tokens (`--service-account-issuer`).
    pub issuer: String,
    /// The audience pods request for their projected token; `aud` must contain it.
    pub audience: String,
    pub leeway: Duration,
    /// Keys fetched from the issuer are refused once no refresh succeeded for this long.
    pub max_staleness: Duration,
    /// The least time between two refreshes caused by an unknown `kid`.
    pub kid_refresh_interval: Duration,
}

impl K8sConfig {
    /// A config for `issuer` with the default audience and leeway.
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            leeway: DEFAULT_LEEWAY,
            max_staleness: DEFAULT_MAX_STALENESS,
            kid_refresh_interval: KID_REFRESH_INTERVAL,
        }
    }
}

/// Who a verified token says the caller is: the pod it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The token's `exp`. With the leeway a token may be accepted slightly after it.
    pub expires_at: SystemTime,
}

impl PodIdentity {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`. Names that Kubernetes itself would
    /// not allow are refused, so no token can smuggle a `/` or a `..` into the path.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, K8sError> {
        check_names(&self.namespace, &self.service_account)?;
        td.id_with_path(&format!(
            "/ns/{}/sa/{}",
            self.namespace, self.service_account
        ))
        .map_err(|e| K8sError::BadName(e.to_string()))
    }
}

/// A namespace is an RFC 1123 label; a service account name is an RFC 1123 subdomain.
fn check_names(namespace: &str, service_account: &str) -> Result<(), K8sError> {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !label(namespace) {
        return Err(K8sError::BadName(namespace.to_owned()));
    }
    if service_account.len() > 253 || !service_account.split('.').all(label) {
        return Err(K8sError::BadName(service_account.to_owned()));
    }
    Ok(())
}

/// One verification key, with the only algorithm it may be used with.
#[derive(Debug)]
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// What `decode` checks with this key: the signature, under `alg` only. No claim: those are
    /// [`K8sVerifier::check_claims`]'s (the module documentation says why).
    validation: Validation,
}

#[derive(Debug)]
struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Reads a JWK Set. Keys of a type kith does not verify with (`oct`, other curves, other
    /// algorithms, `use` other than `sig`) are skipped, as RFC 7517 asks; a key of a supported
    /// type that is broken, a duplicate kid, or a set with no usable key is an error, and so is
    /// a set jsonwebtoken cannot read as one (a member of the wrong JSON type).
    fn parse(input: &[u8]) -> Result<Self, K8sError> {
        if input.len() > MAX_JWKS_LEN {
            return Err(K8sError::BadJwks("larger than 1 MiB".into()));
        }
        let set: JwkSet =
            serde_json::from_slice(input).map_err(|e| K8sError::BadJwks(e.to_string()))?;
        let mut keys: Vec<VerifyKey> = Vec::new();
        for (index, jwk) in set.keys.iter().enumerate() {
            let Some(key) =
                parse_jwk(jwk).map_err(|e| K8sError::BadJwks(format!("key {index}: {e}")))?
            else {
                continue;
            };
            if key.kid.is_some() && keys.iter().any(|k| k.kid == key.kid) {
                return Err(K8sError::BadJwks(format!("key {index}: duplicate kid")));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(K8sError::BadJwks("no usable rsa or p-256 key".into()));
        }
        Ok(Self { keys })
    }

    /// The key for a token: by kid, or the only key when the token names none.
    fn select(&self, kid: Option<&str>) -> Result<&VerifyKey, K8sError> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => match self.keys.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        }
        .ok_or_else(|| K8sError::UnknownKey(kid.map(str::to_owned)))
    }
}

/// `Ok(None)` for a key kith does not use; `Err` for a supported key that is broken.
fn parse_jwk(jwk: &Jwk) -> Result<Option<VerifyKey>, &'static str> {
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Ok(None);
    }
    let kid = match &common.key_id {
        Some(k) if k.is_empty() => return Err("kid is empty"),
        kid => kid.clone(),
    };
    let b64 = |value: &str| {
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| "bad base64url key parameter")
    };
    // SECURITY: the algorithm is decided here, from the key, once.
    let (alg, key) = match (&jwk.algorithm, common.key_algorithm) {
        (AlgorithmParameters::RSA(rsa), None | Some(KeyAlgorithm::RS256)) => {
            let n = b64(&rsa.n)?;
            let e = b64(&rsa.e)?;
            let modulus = n.iter().skip_while(|b| **b == 0).count();
            if modulus < MIN_RSA_MODULUS_BYTES {
                return Err("rsa key shorter than 2048 bits");
            }
            if e.is_empty() || e.len() > 8 {
                return Err("bad rsa exponent");
            }
            (
                Algorithm::RS256,
                DecodingKey::from_rsa_raw_components(&n, &e),
            )
        }
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            if b64(&ec.x)?.len() != 32 || b64(&ec.y)?.len() != 32 {
                return Err("p-256 coordinates must be 32 bytes");
            }
            let key = DecodingKey::from_ec_components(&ec.x, &ec.y)
                .map_err(|_| "bad base64url key parameter")?;
            (Algorithm::ES256, key)
        }
        (AlgorithmParameters::Other(other), alg) if supported_but_unreadable(other, alg) => {
            return Err("missing or bad key parameter");
        }
        _ => return Ok(None),
    };
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    Ok(Some(VerifyKey {
        kid,
        alg,
        key,
        validation,
    }))
}

/// jsonwebtoken files a JWK whose key parameters it cannot read (one missing, or not a
/// string) under `Other`. If its `kty` (and curve, and `alg`) are of a key kith verifies with,
/// it is a broken key of ours, not a key of another type.
fn supported_but_unreadable(other: &OtherKeyParameters, alg: Option<KeyAlgorithm>) -> bool {
    let field = |name: &str| other.fields.get(name).and_then(Value::as_str);
    match (field("kty"), alg) {
        (Some("RSA"), None | Some(KeyAlgorithm::RS256)) => true,
        (Some("EC"), None | Some(KeyAlgorithm::ES256)) => field("crv") == Some("P-256"),
        _ => false,
    }
}

/// Verifies projected service-account tokens against the issuer's current keys.
/// Where the issuer's keys are fetched from, for periodic and unknown-`kid` refreshes.
#[derive(Clone, Debug)]
pub struct JwksSource {
    pub issuer_url: String,
    pub ca_file: Option<PathBuf>,
    /// Read on every fetch: projected tokens rotate.
    pub bearer_token_file: Option<PathBuf>,
}

/// The API server's TokenReview (authentication.k8s.io/v1), asked about every token that
/// verified locally, so that a token whose pod was deleted stops working at once.
#[derive(Clone, Debug)]
pub struct TokenReview {
    /// `https://<api server>`.
    pub api_url: String,
    pub ca_file: Option<PathBuf>,
    /// The CA's own credential for the API server, read on every call.
    pub bearer_token_file: Option<PathBuf>,
}

#[derive(Debug)]
pub struct K8sVerifier {
    config: K8sConfig,
    keys: ArcSwap<KeySet>,
    source: Option<JwksSource>,
    review: Option<TokenReview>,
    /// When the keys were last loaded from the issuer (unix seconds); unused without a source.
    refreshed_at: AtomicU64,
    /// When an unknown `kid` last caused a refresh; the lock also makes concurrent callers
    /// wait for the one refresh in flight.
    kid_refresh: tokio::sync::Mutex<Option<SystemTime>>,
}

impl K8sVerifier {
    pub fn from_jwks(config: K8sConfig, jwks_json: &[u8]) -> Result<Self, K8sError> {
        if config.issuer.is_empty() {
            return Err(K8sError::BadConfig("issuer is empty"));
        }
        if config.audience.is_empty() {
            return Err(K8sError::BadConfig("audience is empty"));
        }
        let keys = KeySet::parse(jwks_json)?;
        Ok(Self {
            config,
            keys: ArcSwap::from_pointee(keys),
            source: None,
            review: None,
            refreshed_at: AtomicU64::new(0),
            kid_refresh: tokio::sync::Mutex::new(None),
        })
    }

    /// Keys fetched from `source` at `fetched_at`: they are refreshed from it, and refused
    /// once no refresh succeeded for the configured maximum staleness.
    pub fn with_source(mut self, source: JwksSource, fetched_at: SystemTime) -> Self {
        self.source = Some(source);
        self.refreshed_at.store(secs(fetched_at), Ordering::Relaxed);
        self
    }

    /// Asks `review` about every token that verified locally.
    pub fn with_review(mut self, review: TokenReview) -> Self {
        self.review = Some(review);
        self
    }

    /// `Err` with why when the keys are older than the maximum staleness.
    pub fn freshness(&self, now: SystemTime) -> Result<(), String> {
        self.check_fresh(now).map_err(|e| e.to_string())
    }

    fn check_fresh(&self, now: SystemTime) -> Result<(), K8sError> {
        if self.source.is_none() {
            return Ok(());
        }
        let age = secs(now).saturating_sub(self.refreshed_at.load(Ordering::Relaxed));
        let max = self.config.max_staleness.as_secs();
        if age > max {
            return Err(K8sError::StaleKeys { age, max });
        }
        Ok(())
    }

    /// Verifies a token as [`Self::verify`] does, then: an unknown `kid` refreshes the keys
    /// from the issuer (at most once per `kid_refresh_interval`, shared by concurrent callers)
    /// and verifies again; with a TokenReview configured, the API server must also say the
    /// token is authenticated, for the same service account and pod.
    pub async fn attest(&self, token: &str, now: SystemTime) -> Result<PodIdentity, K8sError> {
        let pod = match self.verify(token, now) {
            // Stale keys also try a refresh now, rate-limited the same way, rather than wait
            // for the next periodic one.
            Err(e @ (K8sError::UnknownKey(_) | K8sError::StaleKeys { .. }))
                if self.source.is_some() =>
            {
                let kid = match &e {
                    K8sError::UnknownKey(kid) => kid.clone(),
                    _ => None,
                };
                if self.refresh_on_demand(kid.as_deref(), now).await {
                    self.verify(token, now)?
                } else {
                    return Err(e);
                }
            }
            other => other?,
        };
        if let Some(review) = &self.review {
            review.check(token, &self.config.audience, &pod).await?;
        }
        Ok(pod)
    }

    /// Refreshes the keys unless an on-demand refresh happened recently; returns whether the
    /// keys were refreshed (by this call or by a concurrent one).
    async fn refresh_on_demand(&self, kid: Option<&str>, now: SystemTime) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let before = self.refreshed_at.load(Ordering::Relaxed);
        let mut last = self.kid_refresh.lock().await;
        if self.refreshed_at.load(Ordering::Relaxed) != before {
            // A concurrent caller refreshed while this one waited.
            return true;
        }
        if last.is_some_and(|t| {
            now.duration_since(t).unwrap_or_default() < self.config.kid_refresh_interval
        }) {
            tracing::debug!(kid, "keys were refreshed on demand recently, not again");
            return false;
        }
        *last = Some(now);
        tracing::info!(
            kid,
            "unknown kid in a pod token; refreshing the issuer's keys"
        );
        match self
            .refresh(
                &source.issuer_url,
                source.ca_file.as_deref(),
                source.bearer_token_file.as_deref(),
            )
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(reason = e.reason(), error = %e, "on-demand refresh of the issuer's keys failed");
                false
            }
        }
    }

    pub fn from_jwks_file(config: K8sConfig, path: &Path) -> Result<Self, K8sError> {
        Self::from_jwks(config, &read_capped(path)?)
    }

    pub fn config(&self) -> &K8sConfig {
        &self.config
    }

    /// Swaps in a new key set. A set that does not parse leaves the current one in place.
    pub fn replace_jwks(&self, jwks_json: &[u8]) -> Result<(), K8sError> {
        let keys = KeySet::parse(jwks_json)?;
        self.keys.store(Arc::new(keys));
        self.refreshed_at
            .store(secs(SystemTime::now()), Ordering::Relaxed);
        Ok(())
    }

    /// Verifies a projected service-account token as of `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<PodIdentity, K8sError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(K8sError::TooLarge);
        }
        let header = read_header(token)?;
        // SECURITY: none, HS*, PS* and everything else stop here, before any key is looked up
        // (or refreshed for an unknown kid). Which of the two a token may use is its key's.
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(K8sError::AlgNotAllowed(format!("{:?}", header.alg)));
        }
        // We implement no JWS extensions, so a token marking any as critical is refused.
        if header.crit.is_some() {
            return Err(K8sError::Malformed("crit header not supported"));
        }
        // Structure before keys: a payload or signature that is not base64url is malformed
        // (decode would report a bad payload as a bad signature: it verifies first).
        if token
            .split('.')
            .skip(1)
            .any(|segment| URL_SAFE_NO_PAD.decode(segment).is_err())
        {
            return Err(K8sError::Malformed("bad base64url"));
        }

        // SECURITY: keys that could not be refreshed for too long may include one the
        // cluster has since withdrawn; fail closed.
        self.check_fresh(now)?;
        let keys = self.keys.load();
        let key = keys.select(header.kid.as_deref())?;
        // The key's Validation allows the key's pinned algorithm only, not the header's.
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidAlgorithm => {
                    K8sError::AlgNotAllowed(format!("{:?} on a {:?} key", header.alg, key.alg))
                }
                ErrorKind::Json(_) => K8sError::Malformed("claims are not a json object"),
                _ => K8sError::BadSignature,
            })?
            .claims;
        // Claims are interpreted only once the signature holds.
        self.check_claims(&claims, now)
    }

    fn check_claims(
        &self,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<PodIdentity, K8sError> {
        // First, so that a legacy secret-based token (no binding, no exp, another iss) is
        // reported as what it is.
        let binding = claims
            .get("kubernetes.io")
            .and_then(Value::as_object)
            .ok_or(K8sError::NoPodBinding)?;
        if claims.get("iss").and_then(Value::as_str) != Some(self.config.issuer.as_str()) {
            return Err(K8sError::WrongIssuer);
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.config.audience,
            Some(Value::Array(list)) => list.iter().any(|a| *a == *self.config.audience),
            _ => false,
        };
        if !audience_ok {
            return Err(K8sError::WrongAudience);
        }

        let now = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| K8sError::Malformed("now is before 1970"))?
            .as_secs();
        let leeway = self.config.leeway.as_secs();
        // SECURITY: exp is required: a token that never expires (legacy secret token) is refused.
        let exp = numeric_date(claims, "exp")?.ok_or(K8sError::Malformed("no exp"))?;
        if now >= exp.saturating_add(leeway) {
            return Err(K8sError::Expired);
        }
        for name in ["nbf", "iat"] {
            if let Some(t) = numeric_date(claims, name)?
                && t > now.saturating_add(leeway)
            {
                return Err(K8sError::NotYetValid);
            }
        }

        let text = |path: &[&str]| -> Result<String, K8sError> {
            let mut v = binding.get(path[0]);
            for p in &path[1..] {
                v = v.and_then(|v| v.get(p));
            }
            v.and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or(K8sError::NoPodBinding)
        };
        let namespace = text(&["namespace"])?;
        let service_account = text(&["serviceaccount", "name"])?;
        text(&["serviceaccount", "uid"])?;
        let pod_name = text(&["pod", "name"])?;
        let pod_uid = text(&["pod", "uid"])?;
        check_names(&namespace, &service_account)?;
        // The API server writes sub from the same service account; a mismatch means the token
        // was not minted by it.
        if let Some(sub) = claims.get("sub")
            && *sub != *format!("system:serviceaccount:{namespace}:{service_account}")
        {
            return Err(K8sError::Malformed("sub does not match the binding"));
        }
        Ok(PodIdentity {
            namespace,
            service_account,
            pod_name,
            pod_uid,
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// Fetches the issuer's JWKS once and swaps it in. The bearer token file is read on every
    /// call because projected tokens rotate.
    pub async fn refresh(
        &self,
        issuer_url: &str,
        ca_file: Option<&Path>,
        bearer_token_file: Option<&Path>,
    ) -> Result<(), K8sError> {
        let token = match bearer_token_file {
            Some(path) => Some(tokio::fs::read_to_string(path).await?.trim().to_owned()),
            None => None,
        };
        let jwks = fetch_jwks(issuer_url, ca_file, token.as_deref()).await?;
        self.replace_jwks(&jwks)
    }

    /// Refreshes the keys from the issuer every `interval` until `shutdown` is cancelled.
    /// A failed refresh is logged and keeps the current keys; the next try then comes sooner.
    ///
    /// Takes `bearer_token_file` in addition to the issuer and CA: a real API server serves
    /// `/openid/v1/jwks` only to authenticated callers (service accounts by default).
    pub fn spawn_refresh(
        self: &Arc<Self>,
        issuer_url: String,
        ca_file: Option<PathBuf>,
        bearer_token_file: Option<PathBuf>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut delay = interval;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                let attempt = this.refresh(
                    &issuer_url,
                    ca_file.as_deref(),
                    bearer_token_file.as_deref(),
                );
                let result = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = attempt => r,
                };
                match result {
                    Ok(()) => {
                        tracing::debug!(issuer = %issuer_url, "k8s jwks refreshed");
                        delay = interval;
                    }
                    Err(e) => {
                        tracing::warn!(
                            issuer = %issuer_url, reason = e.reason(), error = %e,
                            "k8s jwks refresh failed; keeping the current keys"
                        );
                        delay = interval.min(RETRY_AFTER_FAILURE);
                    }
                }
            }
        })
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenReview {
    /// POSTs a TokenReview for `token` and checks the answer: authenticated, for the service
    /// account and pod the token names. Any failure to get a clear answer refuses the token.
    pub async fn check(
        &self,
        token: &str,
        audience: &str,
        pod: &PodIdentity,
    ) -> Result<(), K8sError> {
        let failed = K8sError::ReviewFailed;
        let bearer = match &self.bearer_token_file {
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| failed(format!("reading {}: {e}", path.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        let url = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            self.api_url.trim_end_matches('/')
        );
        let (status, answer) = tokio::time::timeout(
            FETCH_TIMEOUT,
            https_request(
                &url,
                self.ca_file.as_deref(),
                bearer.as_deref(),
                Some(body.to_string().into_bytes()),
                MAX_REVIEW_LEN,
            ),
        )
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            return Err(failed(format!("status {status}")));
        }
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|_| failed("the answer is not json".into()))?;
        let review_status = answer
            .get("status")
            .and_then(Value::as_object)
            .ok_or_else(|| failed("the answer has no status".into()))?;
        if review_status.get("authenticated").and_then(Value::as_bool) != Some(true) {
            let why = review_status
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("not authenticated");
            return Err(K8sError::ReviewRejected(why.chars().take(200).collect()));
        }
        let user = review_status.get("user");
        let username = user.and_then(|u| u.get("username")).and_then(Value::as_str);
        let expected = format!(
            "system:serviceaccount:{}:{}",
            pod.namespace, pod.service_account
        );
        if username != Some(expected.as_str()) {
            return Err(K8sError::ReviewRejected(format!(
                "the api server says the token is {username:?}, not {expected}"
            )));
        }
        if let Some(uids) = user
            .and_then(|u| u.get("extra"))
            .and_then(|e| e.get("authentication.kubernetes.io/pod-uid"))
            && *uids != serde_json::json!([pod.pod_uid])
        {
            return Err(K8sError::ReviewRejected(
                "the api server names another pod for this token".into(),
            ));
        }
        if let Some(auds) = review_status.get("audiences").and_then(Value::as_array)
            && !auds.iter().any(|a| a == audience)
        {
            return Err(K8sError::ReviewRejected(
                "the api server did not confirm the audience".into(),
            ));
        }
        Ok(())
    }
}

/// An optional NumericDate claim; only non-negative integers are accepted (Kubernetes writes
/// integers).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, K8sError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or(K8sError::Malformed("time claim is not an integer")),
    }
}

fn read_capped(path: &Path) -> Result<Vec<u8>, K8sError> {
    use std::io::Read as _;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_JWKS_LEN as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > MAX_JWKS_LEN {
        return Err(K8sError::BadJwks("larger than 1 MiB".into()));
    }
    Ok(out)
}

/// GETs `<issuer_url>/openid/v1/jwks` over HTTPS (TLS 1.3, ring provider), trusting only the
/// roots in `ca_file`, with an optional bearer token, a 1 MiB body cap and [`FETCH_TIMEOUT`].
/// Returns the body unparsed; [`K8sVerifier::replace_jwks`] validates it.
///
/// An issuer whose JWKS lives elsewhere (found through `.well-known/openid-configuration`) is
/// not handled: pass a JWKS file for those.
pub async fn fetch_jwks(
    issuer_url: &str,
    ca_file: Option<&Path>,
    bearer_token: Option<&str>,
) -> Result<Vec<u8>, K8sError> {
    fetch_with_timeout(issuer_url, ca_file, bearer_token, FETCH_TIMEOUT).await
}

async fn fetch_with_timeout(
    issuer_url: &str,
    ca_file: Option<&Path>,
    bearer_token: Option<&str>,
    timeout: Duration,
) -> Result<Vec<u8>, K8sError> {
    tokio::time::timeout(timeout, fetch(issuer_url, ca_file, bearer_token))
        .await
        .map_err(|_| K8sError::Fetch("timed out".into()))?
}

async fn fetch(
    issuer_url: &str,
    ca_file: Option<&Path>,
    bearer_token: Option<&str>,
) -> Result<Vec<u8>, K8sError> {
    let url = format!("{}/openid/v1/jwks", issuer_url.trim_end_matches('/'));
    let (status, body) = https_request(&url, ca_file, bearer_token, None, MAX_JWKS_LEN).await?;
    if status != hyper::StatusCode::OK {
        return Err(K8sError::Fetch(format!("status {status}")));
    }
    Ok(body)
}

/// One HTTPS request (GET, or POST of a JSON `body`) to the cluster: TLS 1.3/1.2 with the ring
/// provider, trusting only the roots in `ca_file`, an optional bearer token, and a body cap.
async fn https_request(
    url: &str,
    ca_file: Option<&Path>,
    bearer_token: Option<&str>,
    body: Option<Vec<u8>>,
    max_len: usize,
) -> Result<(hyper::StatusCode, Vec<u8>), K8sError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| K8sError::Fetch(format!("{what}: {e}"));
    let uri: hyper::Uri = url.parse().map_err(|e| fail("bad url", &e))?;
    // SECURITY: https only; the keys that decide every pod's identity must not travel in the
    // clear, and neither may the bearer token or the pod's token under review.
    if uri.scheme_str() != Some("https") {
        return Err(K8sError::Fetch("issuer url must be https".into()));
    }
    let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
        return Err(K8sError::Fetch("issuer url has no host".into()));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();

    // SECURITY: only the given roots are trusted: no system store, no process default.
    let ca_file = ca_file.ok_or_else(|| K8sError::Fetch("a ca file is required".into()))?;
    let pem = tokio::fs::read(ca_file).await?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in identity::pem::certificates(&pem).map_err(|e| fail("ca file", &e))? {
        roots
            .add(cert)
            .map_err(|e| fail("ca file certificate", &e))?;
    }
    // ring's default key-exchange groups; TLS 1.3, the only version this build of rustls has.
    let mut tls = identity::tls::client_builder(identity::tls::Kx::Wide)
        .map_err(|e| fail("tls config", &e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = ServerName::try_from(host.clone()).map_err(|e| fail("server name", &e))?;

    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| fail("connect", &e))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail("tls", &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail("http", &e))?;

    let method = if body.is_some() {
        hyper::Method::POST
    } else {
        hyper::Method::GET
    };
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::ACCEPT, "application/json");
    if body.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = bearer_token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| fail("request", &e))?;
    // The request owns the sender, so the connection future ends once the response is read;
    // running both in one future leaves no task behind when the timeout drops it.
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail("http", &e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_len)
            .collect()
            .await
            .map_err(|e| fail("body", &e))?;
        Ok((status, body.to_bytes().to_vec()))
    };
    let (result, _) = tokio::join!(exchange, conn);
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, OnceLock};

    use http_body_util::Full;
    use jsonwebtoken::EncodingKey;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use rsa::pkcs1::{EncodeRsaPrivateKey as _, EncodeRsaPublicKey as _};
    use rsa::traits::PublicKeyParts as _;
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const T: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    struct TestKey {
        enc: EncodingKey,
        alg: Algorithm,
        /// The public JWK, without kid.
        jwk: Value,
        /// DER of the public key (PKCS#1 for RSA, the SEC1 point for EC): the "secret" an
        /// algorithm-confusion attacker would try.
        public_der: Vec<u8>,
    }

    impl TestKey {
        fn jwk(&self, kid: Option<&str>) -> Value {
            let mut jwk = self.jwk.clone();
            if let Some(kid) = kid {
                jwk["kid"] = kid.into();
            }
            jwk
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn ec_key() -> TestKey {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        TestKey {
            enc: EncodingKey::from_ec_der(der.as_ref()),
            alg: Algorithm::ES256,
            jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..])}),
            public_der: point,
        }
    }

    fn rsa_key() -> TestKey {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = key.to_public_key();
        TestKey {
            enc: EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
            alg: Algorithm::RS256,
            jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256",
                        "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
            public_der: public.to_pkcs1_der().unwrap().as_bytes().to_vec(),
        }
    }

    /// RSA key generation takes a second or two in a debug build: two keys, shared by all tests.
    fn rsa_keys() -> &'static [TestKey; 2] {
        static KEYS: OnceLock<[TestKey; 2]> = OnceLock::new();
        KEYS.get_or_init(|| [rsa_key(), rsa_key()])
    }

    fn ec_keys() -> &'static [TestKey; 2] {
        static KEYS: OnceLock<[TestKey; 2]> = OnceLock::new();
        KEYS.get_or_init(|| [ec_key(), ec_key()])
    }

    fn jwks(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    /// The main key set: one EC key (kid ec-1), one RSA key (kid rsa-1).
    fn verifier() -> K8sVerifier {
        let set = jwks(&[
            ec_keys()[0].jwk(Some("ec-1")),
            rsa_keys()[0].jwk(Some("rsa-1")),
        ]);
        K8sVerifier::from_jwks(K8sConfig::new(ISS), &set).unwrap()
    }

    fn claims() -> Value {
        json!({
            "aud": ["https://kubernetes.default.svc", "kith-ca"],
            "exp": T + 3600, "iat": T, "nbf": T,
            "iss": ISS,
            "jti": "5b1f7c3e",
            "sub": "system:serviceaccount:payments:api",
            "kubernetes.io": {
                "namespace": "payments",
                "node": {"name": "node-1", "uid": "n-uid"},
                "pod": {"name": "api-7d9f8", "uid": "pod-uid-1"},
                "serviceaccount": {"name": "api", "uid": "sa-uid-1"},
            },
        })
    }

    fn claims_with(edit: impl FnOnce(&mut Value)) -> Value {
        let mut c = claims();
        edit(&mut c);
        c
    }

    /// Signs `header.claims` with `key` under `alg`, whatever the header says.
    fn forge(header: Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
        let message = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(claims).unwrap())
        );
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
        format!("{message}.{sig}")
    }

    fn token(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": format!("{:?}", key.alg), "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        forge(header, claims, &key.enc, key.alg)
    }

    fn unsigned(header: Value, claims: &Value) -> String {
        format!(
            "{}.{}.",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(claims).unwrap())
        )
    }

    #[test]
    fn verify_table() {
        let ec = &ec_keys()[0];
        let rsa = &rsa_keys()[0];
        let good_ec = token(ec, Some("ec-1"), &claims());
        let good_parts: Vec<String> = good_ec.split('.').map(str::to_owned).collect();
        let now = at(T + 10);
        let cases: Vec<(&str, String, SystemTime, Result<(), &str>)> = vec![
            ("valid es256", good_ec.clone(), now, Ok(())),
            (
                "valid rs256",
                token(rsa, Some("rsa-1"), &claims()),
                now,
                Ok(()),
            ),
            (
                "expired",
                good_ec.clone(),
                at(T + 3600 + 30),
                Err("expired"),
            ),
            (
                "expired long ago",
                good_ec.clone(),
                at(T + 90_000),
                Err("expired"),
            ),
            (
                "expired within leeway",
                good_ec.clone(),
                at(T + 3600 + 29),
                Ok(()),
            ),
            (
                "nbf in the future",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["nbf"] = (T + 120).into()),
                ),
                now,
                Err("not_yet_valid"),
            ),
            (
                "nbf within leeway",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["nbf"] = (T + 35).into()),
                ),
                now,
                Ok(()),
            ),
            (
                "iat in the future",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["iat"] = (T + 120).into()),
                ),
                now,
                Err("not_yet_valid"),
            ),
            (
                "wrong audience",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["aud"] = json!(["other"])),
                ),
                now,
                Err("wrong_audience"),
            ),
            (
                "audience as a string",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["aud"] = "kith-ca".into()),
                ),
                now,
                Ok(()),
            ),
            (
                "audience missing",
                token(ec, Some("ec-1"), &claims_with(|c| c["aud"] = Value::Null)),
                now,
                Err("wrong_audience"),
            ),
            (
                "wrong issuer",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["iss"] = "https://evil".into()),
                ),
                now,
                Err("wrong_issuer"),
            ),
            (
                "unknown kid",
                token(ec, Some("ec-9"), &claims()),
                now,
                Err("unknown_key"),
            ),
            (
                "other ec key under the same kid",
                token(&ec_keys()[1], Some("ec-1"), &claims()),
                now,
                Err("bad_signature"),
            ),
            (
                "other rsa key under the same kid",
                token(&rsa_keys()[1], Some("rsa-1"), &claims()),
                now,
                Err("bad_signature"),
            ),
            (
                "tampered payload",
                format!(
                    "{}.{}.{}",
                    good_parts[0],
                    b64(&serde_json::to_vec(&claims_with(
                        |c| c["kubernetes.io"]["namespace"] = "kube-system".into()
                    ))
                    .unwrap()),
                    good_parts[2]
                ),
                now,
                Err("bad_signature"),
            ),
            (
                "alg none",
                unsigned(json!({"alg": "none", "kid": "ec-1"}), &claims()),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "alg none without kid",
                unsigned(json!({"alg": "none"}), &claims()),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "hs256 with the rsa public key as secret",
                forge(
                    json!({"alg": "HS256", "kid": "rsa-1"}),
                    &claims(),
                    &EncodingKey::from_secret(&rsa.public_der),
                    Algorithm::HS256,
                ),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "hs256 with the ec public point as secret",
                forge(
                    json!({"alg": "HS256", "kid": "ec-1"}),
                    &claims(),
                    &EncodingKey::from_secret(&ec.public_der),
                    Algorithm::HS256,
                ),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "header rs256 on the ec key",
                forge(
                    json!({"alg": "RS256", "kid": "ec-1"}),
                    &claims(),
                    &rsa.enc,
                    Algorithm::RS256,
                ),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "header es256 on the rsa key",
                forge(
                    json!({"alg": "ES256", "kid": "rsa-1"}),
                    &claims(),
                    &ec.enc,
                    Algorithm::ES256,
                ),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "ps256 on the rsa key",
                forge(
                    json!({"alg": "PS256", "kid": "rsa-1"}),
                    &claims(),
                    &rsa.enc,
                    Algorithm::PS256,
                ),
                now,
                Err("alg_not_allowed"),
            ),
            (
                "no pod binding (legacy secret token)",
                token(
                    rsa,
                    Some("rsa-1"),
                    &json!({
                        "iss": "kubernetes/serviceaccount",
                        "sub": "system:serviceaccount:payments:api",
                        "kubernetes.io/serviceaccount/namespace": "payments",
                        "kubernetes.io/serviceaccount/service-account.name": "api",
                    }),
                ),
                now,
                Err("no_pod_binding"),
            ),
            (
                "binding without a pod",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| {
                        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
                    }),
                ),
                now,
                Err("no_pod_binding"),
            ),
            (
                "binding with an empty pod uid",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["kubernetes.io"]["pod"]["uid"] = "".into()),
                ),
                now,
                Err("no_pod_binding"),
            ),
            (
                "no exp",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| {
                        c.as_object_mut().unwrap().remove("exp");
                    }),
                ),
                now,
                Err("malformed"),
            ),
            (
                "exp is a string",
                token(ec, Some("ec-1"), &claims_with(|c| c["exp"] = "soon".into())),
                now,
                Err("malformed"),
            ),
            (
                "sub does not match the binding",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| {
                        c["sub"] = "system:serviceaccount:kube-system:admin".into();
                    }),
                ),
                now,
                Err("malformed"),
            ),
            (
                "namespace kubernetes would not allow",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| {
                        c["kubernetes.io"]["namespace"] = "../x".into();
                        c.as_object_mut().unwrap().remove("sub");
                    }),
                ),
                now,
                Err("bad_name"),
            ),
            (
                "crit header",
                forge(
                    json!({"alg": "ES256", "kid": "ec-1", "crit": ["b64"]}),
                    &claims(),
                    &ec.enc,
                    Algorithm::ES256,
                ),
                now,
                Err("malformed"),
            ),
            (
                "crit null",
                forge(
                    json!({"alg": "ES256", "kid": "ec-1", "crit": null}),
                    &claims(),
                    &ec.enc,
                    Algorithm::ES256,
                ),
                now,
                Err("malformed"),
            ),
            (
                "kid null",
                forge(
                    json!({"alg": "ES256", "kid": null}),
                    &claims(),
                    &ec.enc,
                    Algorithm::ES256,
                ),
                now,
                Err("malformed"),
            ),
            ("garbage", "garbage".into(), now, Err("malformed")),
            ("empty", String::new(), now, Err("malformed")),
            (
                "two segments",
                format!("{}.{}", good_parts[0], good_parts[1]),
                now,
                Err("malformed"),
            ),
            (
                "four segments",
                format!("{good_ec}.x"),
                now,
                Err("malformed"),
            ),
            (
                "bad base64 header",
                format!("!!!.{}.{}", good_parts[1], good_parts[2]),
                now,
                Err("malformed"),
            ),
            (
                "bad base64 payload",
                format!("{}.!!!.{}", good_parts[0], good_parts[2]),
                now,
                Err("malformed"),
            ),
            (
                "bad base64 signature",
                format!("{}.{}.!!!", good_parts[0], good_parts[1]),
                now,
                Err("malformed"),
            ),
            (
                "header is not json",
                format!("{}.{}.{}", b64(b"{not json"), good_parts[1], good_parts[2]),
                now,
                Err("malformed"),
            ),
            (
                "oversized garbage",
                "a".repeat(MAX_TOKEN_LEN + 1),
                now,
                Err("too_large"),
            ),
            (
                "oversized signed token",
                token(
                    ec,
                    Some("ec-1"),
                    &claims_with(|c| c["pad"] = "x".repeat(MAX_TOKEN_LEN).into()),
                ),
                now,
                Err("too_large"),
            ),
        ];
        let v = verifier();
        for (name, token, now, want) in cases {
            let got = v.verify(&token, now).map(|_| ()).map_err(|e| e.reason());
            assert_eq!(got, want, "case {name:?}");
        }
    }

    #[test]
    fn identity_from_a_valid_token() {
        let v = verifier();
        for (key, kid) in [(&ec_keys()[0], "ec-1"), (&rsa_keys()[0], "rsa-1")] {
            let id = v
                .verify(&token(key, Some(kid), &claims()), at(T + 1))
                .unwrap();
            assert_eq!(
                id,
                PodIdentity {
                    namespace: "payments".into(),
                    service_account: "api".into(),
                    pod_name: "api-7d9f8".into(),
                    pod_uid: "pod-uid-1".into(),
                    expires_at: at(T + 3600),
                }
            );
            let td = TrustDomain::new("example.org").unwrap();
            assert_eq!(
                id.spiffe_id(&td).unwrap().as_str(),
                "spiffe://example.org/ns/payments/sa/api"
            );
        }
    }

    #[test]
    fn token_without_kid_uses_the_only_key() {
        let ec = &ec_keys()[0];
        let single = K8sVerifier::from_jwks(K8sConfig::new(ISS), &jwks(&[ec.jwk(None)])).unwrap();
        let no_kid = token(ec, None, &claims());
        single.verify(&no_kid, at(T)).unwrap();
        // The only key also answers a token without kid when the key has one.
        let single_kid =
            K8sVerifier::from_jwks(K8sConfig::new(ISS), &jwks(&[ec.jwk(Some("a"))])).unwrap();
        single_kid.verify(&no_kid, at(T)).unwrap();
        // With two keys, a token without kid names none of them.
        let err = verifier().verify(&no_kid, at(T)).unwrap_err();
        assert_eq!(err.reason(), "unknown_key");
    }

    #[test]
    fn custom_audience_and_leeway() {
        let ec = &ec_keys()[0];
        let config = K8sConfig {
            issuer: ISS.into(),
            audience: "https://kubernetes.default.svc".into(),
            leeway: Duration::ZERO,
            ..K8sConfig::new(ISS)
        };
        let v = K8sVerifier::from_jwks(config, &jwks(&[ec.jwk(Some("ec-1"))])).unwrap();
        let t = token(ec, Some("ec-1"), &claims());
        v.verify(&t, at(T + 3599)).unwrap();
        assert_eq!(v.verify(&t, at(T + 3600)).unwrap_err().reason(), "expired");
        let config = K8sConfig {
            audience: String::new(),
            ..K8sConfig::new(ISS)
        };
        let err = K8sVerifier::from_jwks(config, &jwks(&[ec.jwk(None)])).unwrap_err();
        assert_eq!(err.reason(), "bad_config");
    }

    #[test]
    fn jwks_parsing() {
        let ec = &ec_keys()[0];
        let rsa = &rsa_keys()[0];
        let parse = |keys: &[Value]| {
            K8sVerifier::from_jwks(K8sConfig::new(ISS), &jwks(keys)).map_err(|e| e.reason())
        };
        let oct = json!({"kty": "oct", "kid": "h", "k": b64(b"secret")});
        // Unusable keys are skipped; only they is not enough.
        assert!(parse(&[oct.clone(), ec.jwk(Some("ec-1"))]).is_ok());
        assert_eq!(parse(std::slice::from_ref(&oct)).unwrap_err(), "bad_jwks");
        assert_eq!(parse(&[]).unwrap_err(), "bad_jwks");
        let mut p384 = ec.jwk(Some("p"));
        p384["crv"] = "P-384".into();
        p384["alg"] = "ES384".into();
        assert_eq!(parse(&[p384]).unwrap_err(), "bad_jwks");
        let mut enc_use = ec.jwk(Some("e"));
        enc_use["use"] = "enc".into();
        assert_eq!(parse(&[enc_use]).unwrap_err(), "bad_jwks");
        let mut ps256 = rsa.jwk(Some("r"));
        ps256["alg"] = "PS256".into();
        assert_eq!(parse(&[ps256]).unwrap_err(), "bad_jwks");
        // Broken keys of a supported type, and duplicate kids, are errors.
        assert_eq!(
            parse(&[ec.jwk(Some("a")), ec.jwk(Some("a"))]).unwrap_err(),
            "bad_jwks"
        );
        let mut short_rsa = rsa.jwk(Some("r"));
        short_rsa["n"] = b64(&[0xff; 128]).into();
        assert_eq!(parse(&[short_rsa]).unwrap_err(), "bad_jwks");
        let mut bad_x = ec.jwk(Some("e"));
        bad_x["x"] = b64(&[1; 31]).into();
        assert_eq!(parse(&[bad_x]).unwrap_err(), "bad_jwks");
        let mut no_y = ec.jwk(Some("e"));
        no_y.as_object_mut().unwrap().remove("y");
        assert_eq!(parse(&[no_y]).unwrap_err(), "bad_jwks");
        // A broken key of a supported type is an error even beside a good key; a key of a type
        // kith does not use is skipped.
        let good = ec.jwk(Some("ec-1"));
        let mut no_e = rsa.jwk(Some("r"));
        no_e.as_object_mut().unwrap().remove("e");
        let mut n_number = rsa.jwk(Some("r"));
        n_number["n"] = 7.into();
        let mut no_x = ec.jwk(Some("e"));
        no_x.as_object_mut().unwrap().remove("x");
        for broken in [no_e, n_number, no_x, ec.jwk(Some(""))] {
            assert_eq!(
                parse(&[good.clone(), broken.clone()]).unwrap_err(),
                "bad_jwks",
                "{broken}"
            );
        }
        let mut k256 = ec.jwk(Some("k"));
        k256["crv"] = "secp256k1".into();
        k256["alg"] = "ES256K".into();
        let mut k256_no_y = k256.clone();
        k256_no_y.as_object_mut().unwrap().remove("y");
        let okp = json!({"kty": "OKP", "crv": "Ed25519", "kid": "o", "x": b64(&[7; 32])});
        assert!(parse(&[good.clone(), k256, k256_no_y, okp]).is_ok());
        let not_json = K8sVerifier::from_jwks(K8sConfig::new(ISS), b"{\"keys\": 7}");
        assert_eq!(not_json.unwrap_err().reason(), "bad_jwks");
        let huge = vec![b' '; MAX_JWKS_LEN + 1];
        let err = K8sVerifier::from_jwks(K8sConfig::new(ISS), &huge).unwrap_err();
        assert_eq!(err.reason(), "bad_jwks");
    }

    #[test]
    fn each_key_allows_only_the_algorithm_its_jwk_pins() {
        let (ec, rsa) = (&ec_keys()[0], &rsa_keys()[0]);
        // Without `alg` in the JWK, the algorithm comes from kty (and crv).
        let mut keys = [ec.jwk(Some("ec-1")), rsa.jwk(Some("rsa-1"))];
        for jwk in &mut keys {
            jwk.as_object_mut().unwrap().remove("alg");
        }
        let v = K8sVerifier::from_jwks(K8sConfig::new(ISS), &jwks(&keys)).unwrap();
        v.verify(&token(ec, Some("ec-1"), &claims()), at(T))
            .unwrap();
        v.verify(&token(rsa, Some("rsa-1"), &claims()), at(T))
            .unwrap();
        let set = v.keys.load();
        for (kid, own, other) in [("ec-1", ec, rsa), ("rsa-1", rsa, ec)] {
            let key = set.select(Some(kid)).unwrap();
            assert_eq!(key.validation.algorithms, vec![own.alg]);
            // The key's Validation alone refuses another algorithm (here without the check of
            // the header in verify): HS256 with the public key as the secret, the other
            // asymmetric algorithm, and alg none.
            let hs256 = EncodingKey::from_secret(&own.public_der);
            let forged = [
                (Algorithm::HS256, &hs256),
                (other.alg, &other.enc),
                (Algorithm::PS256, &rsa.enc),
            ];
            for (alg, enc) in forged {
                let header = json!({"alg": format!("{alg:?}"), "kid": kid});
                let t = forge(header, &claims(), enc, alg);
                let err = jsonwebtoken::decode::<Value>(&t, &key.key, &key.validation);
                assert!(
                    matches!(err.unwrap_err().kind(), ErrorKind::InvalidAlgorithm),
                    "{alg:?} on {kid}"
                );
                assert_eq!(v.verify(&t, at(T)).unwrap_err().reason(), "alg_not_allowed");
            }
            let none = unsigned(json!({"alg": "none", "kid": kid}), &claims());
            assert!(jsonwebtoken::decode::<Value>(&none, &key.key, &key.validation).is_err());
            assert_eq!(
                v.verify(&none, at(T)).unwrap_err().reason(),
                "alg_not_allowed"
            );
        }
    }

    #[test]
    fn replace_jwks_swaps_and_bad_set_keeps_old_keys() {
        let v = verifier();
        let old = token(&ec_keys()[0], Some("ec-1"), &claims());
        for bad in [&b"not json"[..], b"{\"keys\": []}", b""] {
            assert_eq!(v.replace_jwks(bad).unwrap_err().reason(), "bad_jwks");
            v.verify(&old, at(T)).unwrap();
        }
        // Rotation: a new key under a new kid; the old key is gone.
        let new_key = &ec_keys()[1];
        v.replace_jwks(&jwks(&[new_key.jwk(Some("ec-2"))])).unwrap();
        v.verify(&token(new_key, Some("ec-2"), &claims()), at(T))
            .unwrap();
        assert_eq!(v.verify(&old, at(T)).unwrap_err().reason(), "unknown_key");
    }

    #[test]
    fn jwks_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks(&[ec_keys()[0].jwk(Some("ec-1"))])).unwrap();
        let v = K8sVerifier::from_jwks_file(K8sConfig::new(ISS), &path).unwrap();
        v.verify(&token(&ec_keys()[0], Some("ec-1"), &claims()), at(T))
            .unwrap();
        let missing = K8sVerifier::from_jwks_file(K8sConfig::new(ISS), &dir.path().join("no"));
        assert_eq!(missing.unwrap_err().reason(), "io");
    }

    #[test]
    fn spiffe_id_refuses_bad_names() {
        let td = TrustDomain::new("example.org").unwrap();
        let pod = |ns: &str, sa: &str| PodIdentity {
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            expires_at: at(T),
        };
        assert_eq!(
            pod("default", "build.bot-1")
                .spiffe_id(&td)
                .unwrap()
                .as_str(),
            "spiffe://example.org/ns/default/sa/build.bot-1"
        );
        for (ns, sa) in [
            ("", "a"),
            ("a", ""),
            ("Default", "a"),
            ("a", "B"),
            ("..", "a"),
            ("a", ".."),
            ("a", "x/y"),
            ("a/b", "x"),
            ("-a", "x"),
            ("a", "x..y"),
            ("a", "x_y"),
        ] {
            let err = pod(ns, sa).spiffe_id(&td).unwrap_err();
            assert_eq!(err.reason(), "bad_name", "{ns:?} {sa:?}");
        }
        assert!(pod(&"n".repeat(64), "a").spiffe_id(&td).is_err());
    }

    // --- fetching the JWKS from a local HTTPS issuer ---

    struct Issuer {
        url: String,
        dir: tempfile::TempDir,
        /// Status and body the server answers with; changeable while it runs.
        answer: Arc<Mutex<(u16, Vec<u8>)>>,
    }

    impl Issuer {
        fn ca_file(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }
        fn set(&self, status: u16, body: Vec<u8>) {
            *self.answer.lock().unwrap() = (status, body);
        }
    }

    /// Starts an HTTPS server on 127.0.0.1 with a certificate for localhost/127.0.0.1 from a
    /// fresh CA. It requires `Bearer <token>` when `token` is set and never answers when
    /// `stall` is set.
    async fn start_issuer(token: Option<&'static str>, stall: bool) -> Issuer {
        use hyper::service::service_fn;
        let ca = integration::pki::TlsCa::new("issuer ca");
        let (leaf, leaf_key) = ca.server(&["localhost", "127.0.0.1"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new((200, Vec::new())));
        let shared = Arc::clone(&answer);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let answer = Arc::clone(&shared);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = Arc::clone(&answer);
                        async move {
                            if stall {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            let authorized = token.is_none_or(|t| {
                                req.headers().get(hyper::header::AUTHORIZATION)
                                    == Some(&format!("Bearer {t}").parse().unwrap())
                            });
                            let known = [
                                "/openid/v1/jwks",
                                "/apis/authentication.k8s.io/v1/tokenreviews",
                            ];
                            let (status, body) = if !known.contains(&req.uri().path()) {
                                (404, Vec::new())
                            } else if !authorized {
                                (401, Vec::new())
                            } else {
                                answer.lock().unwrap().clone()
                            };
                            let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Issuer {
            url: format!("https://127.0.0.1:{port}"),
            dir,
            answer,
        }
    }

    #[tokio::test]
    async fn fetch_jwks_over_https() {
        let issuer = start_issuer(Some("sa-token"), false).await;
        let set = jwks(&[ec_keys()[0].jwk(Some("ec-1"))]);
        issuer.set(200, set.clone());
        let ca = issuer.ca_file();
        let got = fetch_jwks(&issuer.url, Some(&ca), Some("sa-token"))
            .await
            .unwrap();
        assert_eq!(got, set);
        // A trailing slash and the DNS name work as well.
        let by_name = issuer.url.replace("127.0.0.1", "localhost") + "/";
        let got = fetch_jwks(&by_name, Some(&ca), Some("sa-token"))
            .await
            .unwrap();
        assert_eq!(got, set);
        K8sVerifier::from_jwks(K8sConfig::new(ISS), &got).unwrap();
    }

    #[tokio::test]
    async fn fetch_jwks_refusals() {
        let issuer = start_issuer(Some("sa-token"), false).await;
        let ca = issuer.ca_file();
        issuer.set(200, jwks(&[ec_keys()[0].jwk(None)]));
        let fetch = |url: String, ca: Option<PathBuf>, token: Option<&'static str>| async move {
            fetch_jwks(&url, ca.as_deref(), token).await.unwrap_err()
        };
        // No token: the server says 401.
        let err = fetch(issuer.url.clone(), Some(ca.clone()), None).await;
        assert!(err.to_string().contains("401"), "{err}");
        // Plain http is refused before connecting.
        let http = issuer.url.replace("https", "http");
        let err = fetch(http, Some(ca.clone()), Some("sa-token")).await;
        assert!(err.to_string().contains("https"), "{err}");
        // No roots, or roots that did not sign the server's certificate.
        let err = fetch(issuer.url.clone(), None, Some("sa-token")).await;
        assert_eq!(err.reason(), "fetch_failed");
        let other = start_issuer(None, false).await;
        let err = fetch(issuer.url.clone(), Some(other.ca_file()), Some("sa-token")).await;
        assert!(err.to_string().contains("tls"), "{err}");
        // A body over 1 MiB.
        issuer.set(200, vec![b' '; MAX_JWKS_LEN + 1]);
        let err = fetch(issuer.url.clone(), Some(ca.clone()), Some("sa-token")).await;
        assert!(err.to_string().contains("body"), "{err}");
        assert_eq!(err.reason(), "fetch_failed");
        // A server that never answers.
        let stalled = start_issuer(None, true).await;
        let err = fetch_with_timeout(
            &stalled.url,
            Some(&stalled.ca_file()),
            None,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn refresh_keeps_old_keys_on_failure_then_rotates() {
        let issuer = start_issuer(Some("sa-token"), false).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "sa-token\n").unwrap();
        let v = Arc::new(verifier());
        let old = token(&ec_keys()[0], Some("ec-1"), &claims());
        let new = token(&ec_keys()[1], Some("ec-2"), &claims());
        issuer.set(200, b"not a jwks".to_vec());
        let err = v
            .refresh(&issuer.url, Some(&issuer.ca_file()), Some(&token_file))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "bad_jwks");
        v.verify(&old, at(T)).unwrap();

        let shutdown = CancellationToken::new();
        let task = v.spawn_refresh(
            issuer.url.clone(),
            Some(issuer.ca_file()),
            Some(token_file),
            Duration::from_millis(50),
            shutdown.clone(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        v.verify(&old, at(T)).unwrap();
        assert_eq!(v.verify(&new, at(T)).unwrap_err().reason(), "unknown_key");

        issuer.set(200, jwks(&[ec_keys()[1].jwk(Some("ec-2"))]));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while v.verify(&new, at(T)).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "refresh never happened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(v.verify(&old, at(T)).unwrap_err().reason(), "unknown_key");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn token_review_accepts_only_a_clear_yes_for_the_same_pod() {
        let server = start_issuer(Some("ca-token"), false).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "ca-token\n").unwrap();
        let review = TokenReview {
            api_url: server.url.clone(),
            ca_file: Some(server.ca_file()),
            bearer_token_file: Some(token_file),
        };
        let pod = PodIdentity {
            namespace: "payments".into(),
            service_account: "api".into(),
            pod_name: "api-1".into(),
            pod_uid: "uid-1".into(),
            expires_at: at(T),
        };
        let answer = |status: Value| {
            serde_json::to_vec(&json!({"kind": "TokenReview", "status": status})).unwrap()
        };
        let yes = json!({"authenticated": true,
            "user": {"username": "system:serviceaccount:payments:api",
                     "extra": {"authentication.kubernetes.io/pod-uid": ["uid-1"]}},
            "audiences": ["kith-ca"]});
        server.set(201, answer(yes.clone()));
        review.check("t", "kith-ca", &pod).await.unwrap();

        let mut cases: Vec<(u16, Vec<u8>, &str)> = Vec::new();
        let mut edit = |f: fn(&mut Value), reason| {
            let mut v = yes.clone();
            f(&mut v);
            cases.push((201, answer(v), reason));
        };
        edit(|v| v["authenticated"] = json!(false), "review_rejected");
        edit(
            |v| v["user"]["username"] = json!("system:serviceaccount:payments:admin"),
            "review_rejected",
        );
        edit(
            |v| v["user"]["extra"]["authentication.kubernetes.io/pod-uid"] = json!(["uid-2"]),
            "review_rejected",
        );
        edit(|v| v["audiences"] = json!(["other"]), "review_rejected");
        cases.push((201, b"not json".to_vec(), "review_failed"));
        cases.push((201, answer(Value::Null), "review_failed"));
        cases.push((403, Vec::new(), "review_failed"));
        for (status, body, reason) in cases {
            server.set(status, body.clone());
            let err = review.check("t", "kith-ca", &pod).await.unwrap_err();
            assert_eq!(
                err.reason(),
                reason,
                "{status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        // Without the CA's credential the API server says 401: no answer, refused.
        let anonymous = TokenReview {
            bearer_token_file: None,
            ..review.clone()
        };
        server.set(201, answer(yes.clone()));
        let err = anonymous.check("t", "kith-ca", &pod).await.unwrap_err();
        assert_eq!(err.reason(), "review_failed");
        // Plain http is never used: the pod's token would travel in the clear.
        let http = TokenReview {
            api_url: server.url.replace("https", "http"),
            ..review
        };
        let err = http.check("t", "kith-ca", &pod).await.unwrap_err();
        assert_eq!(err.reason(), "review_failed");
    }

    #[test]
    fn fetched_keys_go_stale_after_the_maximum_staleness() {
        let ec = &ec_keys()[0];
        let source = JwksSource {
            issuer_url: ISS.into(),
            ca_file: None,
            bearer_token_file: None,
        };
        let v = K8sVerifier::from_jwks(K8sConfig::new(ISS), &jwks(&[ec.jwk(Some("ec-1"))]))
            .unwrap()
            .with_source(source, at(T - 3600));
        let t = token(ec, Some("ec-1"), &claims());
        v.freshness(at(T)).unwrap();
        v.verify(&t, at(T)).unwrap();
        let err = v.verify(&t, at(T + 1)).unwrap_err();
        assert_eq!(err.reason(), "jwks_stale");
        assert!(v.freshness(at(T + 1)).unwrap_err().contains("3601s"));
        // Keys from a file are the operator's to replace: they never go stale.
        let file = verifier();
        file.verify(&t, at(T + 1)).unwrap();
        file.freshness(at(T + 86_400)).unwrap();
    }
}
