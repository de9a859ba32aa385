//! JWT-SVIDs (spiffe/spiffe `standards/JWT-SVID.md`): the CA signs them with an ES256 (P-256)
//! key whose public half it publishes in the trust bundle as a `jwt-svid` JWK, and
//! [`verify_jwt_svid`] checks one against the bundle's JWT authorities.
//!
//! Both directions go through jsonwebtoken (its pure-Rust `rust_crypto` backend): `encode` with
//! an `EncodingKey` made from the PKCS#8 key, and `decode` with a `Validation` that allows only
//! the algorithm the authority's JWK pins (ES256: every authority is a P-256 key; never the
//! algorithm the token header names) and checks the audience. This module keeps the checks the
//! library does not make: `exp` and `nbf` against the clock the caller passes (the library would
//! read the system clock, so its time checks are off), `typ`, refusing `crit`, and the subject as
//! a SPIFFE ID.
//!
//! [`read_header`] is the header step shared with the CA's Kubernetes token verifier.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::Deserialize as _;
use serde_json::{Map, Value};

use crate::{JwtAuthority, SpiffeId};

/// Tokens larger than this are refused before any parsing. A JWT-SVID is a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The one algorithm of JWT-SVIDs: every JWT authority is a P-256 key.
const ALGORITHM: Algorithm = Algorithm::ES256;

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, BIT STRING of
/// 66 bytes): followed by the 65-byte uncompressed point it is the whole SPKI.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("invalid signing key: {0}")]
    Key(String),
    #[error("key id is empty")]
    EmptyKeyId,
    #[error("audience is empty")]
    EmptyAudience,
    #[error("ttl must be positive")]
    BadTtl,
    #[error("signing key expired")]
    SignerExpired,
    #[error("time before the unix epoch")]
    BadTime,
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("algorithm not allowed: {0}")]
    AlgNotAllowed(String),
    #[error("token has no kid")]
    MissingKid,
    #[error("no jwt authority with kid {0:?}")]
    UnknownKey(String),
    #[error("jwt authority {0:?} is not a usable p-256 key")]
    BadAuthority(String),
    #[error("bad signature")]
    BadSignature,
    #[error("audience does not contain {0:?}")]
    WrongAudience(String),
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("subject is not a spiffe id: {0}")]
    BadSubject(#[from] crate::IdError),
}

impl JwtError {
    /// A stable snake_case label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Key(_) | Self::EmptyKeyId => "bad_key",
            Self::EmptyAudience => "empty_audience",
            Self::BadTtl => "bad_ttl",
            Self::SignerExpired => "signer_expired",
            Self::BadTime => "bad_time",
            Self::Sign(_) => "sign_failed",
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::AlgNotAllowed(_) => "alg_not_allowed",
            Self::MissingKid => "missing_kid",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadAuthority(_) => "bad_authority",
            Self::BadSignature => "bad_signature",
            Self::WrongAudience(_) => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSubject(_) => "bad_subject",
        }
    }
}

impl From<JwsError> for JwtError {
    fn from(e: JwsError) -> Self {
        match e {
            JwsError::UnknownAlgorithm(alg) => Self::AlgNotAllowed(alg),
            other => Self::Malformed(other.detail()),
        }
    }
}

/// The claims of a verified JWT-SVID.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtSvidClaims {
    pub sub: SpiffeId,
    pub aud: Vec<String>,
    pub exp: SystemTime,
    pub iat: Option<SystemTime>,
}

/// The CA's JWT-SVID signing key: ES256 over P-256.
pub struct JwtSigner {
    key_id: String,
    encoding_key: EncodingKey,
    /// The 65-byte uncompressed public point (0x04 || x || y).
    public_point: Vec<u8>,
    not_after: SystemTime,
}

impl std::fmt::Debug for JwtSigner {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Generates a new P-256 key. The key ID is derived, not random: base64url (no padding) of
    /// the first 16 bytes of SHA-256 over the key's DER SubjectPublicKeyInfo, so the same key
    /// always gets the same ID and two keys practically never share one. Returns the signer and
    /// the PKCS#8 DER of the key, for the caller to seal and store.
    pub fn generate(not_after: SystemTime) -> Result<(Self, Vec<u8>), JwtError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| JwtError::Key("key generation failed".into()))?;
        let der = pkcs8.as_ref().to_vec();
        let point = public_point(&der)?;
        let key_id = key_id_for(&point);
        let signer = Self::with_point(key_id, &der, point, not_after);
        Ok((signer, der))
    }

    /// Loads a stored key (PKCS#8 DER of a P-256 key) under the key ID it was published with.
    pub fn from_pkcs8(key_id: String, der: &[u8], not_after: SystemTime) -> Result<Self, JwtError> {
        if key_id.is_empty() {
            return Err(JwtError::EmptyKeyId);
        }
        let point = public_point(der)?;
        Ok(Self::with_point(key_id, der, point, not_after))
    }

    fn with_point(key_id: String, der: &[u8], point: Vec<u8>, not_after: SystemTime) -> Self {
        Self {
            key_id,
            encoding_key: EncodingKey::from_ec_der(der),
            public_point: point,
            not_after,
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Mints a JWT-SVID for `subject`. `exp` is `now + ttl`, cut back to the signer's own
    /// not_after so no token outlives the key that vouches for it. Returns the token and its exp.
    pub fn mint(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, SystemTime), JwtError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::EmptyAudience);
        }
        if ttl.is_zero() {
            return Err(JwtError::BadTtl);
        }
        let iat = unix_secs(now)?;
        // Flooring both to whole seconds keeps exp at or before not_after.
        let wanted = now.checked_add(ttl).ok_or(JwtError::BadTtl)?;
        let exp = unix_secs(wanted)?.min(unix_secs(self.not_after)?);
        if exp <= iat {
            return Err(JwtError::SignerExpired);
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = serde_json::json!({
            "sub": subject.as_str(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
        });
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding_key)
            .map_err(|e| JwtError::Sign(e.to_string()))?;
        Ok((token, UNIX_EPOCH + Duration::from_secs(exp)))
    }

    /// The public key as a JWK for the trust bundle (`use: jwt-svid`).
    pub fn authority(&self) -> JwtAuthority {
        let (x, y) = self.public_point[1..].split_at(32);
        let mut jwk = Map::new();
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), "P-256".into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        jwk.insert("kid".into(), self.key_id.clone().into());
        jwk.insert("use".into(), "jwt-svid".into());
        JwtAuthority {
            key_id: self.key_id.clone(),
            jwk,
        }
    }
}

/// Parses a PKCS#8 P-256 key with ring (which checks the key) and returns its public point.
fn public_point(der: &[u8]) -> Result<Vec<u8>, JwtError> {
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
            .map_err(|e| JwtError::Key(e.to_string()))?;
    Ok(pair.public_key().as_ref().to_vec())
}

fn key_id_for(point: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&P256_SPKI_PREFIX);
    ctx.update(point);
    let digest = ctx.finish();
    URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16])
}

/// Why a compact JWS was refused before any key was looked at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("not three segments")]
    Segments,
    #[error("bad base64url")]
    Base64,
    #[error("bad jws header")]
    Header,
    /// An `alg` jsonwebtoken has no [`Algorithm`] for (`none` among them).
    #[error("algorithm not allowed: {0}")]
    UnknownAlgorithm(String),
}

impl JwsError {
    /// What a verifier reports as a malformed token (the text without the algorithm's name).
    pub fn detail(&self) -> &'static str {
        match self {
            Self::Segments => "not three segments",
            Self::Base64 => "bad base64url",
            Self::Header => "bad jws header",
            Self::UnknownAlgorithm(_) => "unknown algorithm",
        }
    }
}

/// Reads the header of a compact JWS of three segments into jsonwebtoken's [`Header`].
///
/// Two things the plain `decode_header` would blur are told apart here. An `alg` the library
/// does not know (`none` among them) fails as bad JSON; it is reported as the refused algorithm
/// it is. And the library reads a member whose value is null as absent: `alg`, `typ`, `kid` and
/// `crit` may not be null (a `"crit": null` must not pass for a token without `crit`).
pub fn read_header(token: &str) -> Result<Header, JwsError> {
    let mut segments = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(JwsError::Segments);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwsError::Base64)?;
    let members: Map<String, Value> =
        serde_json::from_slice(&json).map_err(|_| JwsError::Header)?;
    if ["alg", "typ", "kid", "crit"]
        .iter()
        .any(|name| members.get(*name).is_some_and(Value::is_null))
    {
        return Err(JwsError::Header);
    }
    Header::deserialize(&members).map_err(|_| match members.get("alg").and_then(Value::as_str) {
        Some(alg) if alg.parse::<Algorithm>().is_err() => {
            JwsError::UnknownAlgorithm(alg.to_owned())
        }
        _ => JwsError::Header,
    })
}

/// Verifies a JWT-SVID against the JWT authorities of a bundle: ES256 only, `kid` required and
/// found among `authorities`, `aud` must contain `audience`, `exp` required and in the future,
/// `sub` must be a SPIFFE ID.
///
/// SECURITY: no clock-skew leeway: the agent and the CA share the issuing host's notion of time
/// closely enough, and a JWT-SVID is a bearer token that should die when its exp says.
pub fn verify_jwt_svid(
    token: &str,
    authorities: &[JwtAuthority],
    audience: &str,
    now: SystemTime,
) -> Result<JwtSvidClaims, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge);
    }
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    let header = read_header(token)?;
    // No authority allows another algorithm, whatever kid the token names: refused before any
    // key is looked up. `decode` refuses it again against the key's own Validation.
    if header.alg != ALGORITHM {
        return Err(JwtError::AlgNotAllowed(format!("{:?}", header.alg)));
    }
    // SECURITY: the standard allows typ JWT or JOSE; anything else is another kind of token.
    if header
        .typ
        .as_deref()
        .is_some_and(|t| t != "JWT" && t != "JOSE")
    {
        return Err(JwtError::Malformed("typ is not JWT"));
    }
    // SECURITY: we implement no JWS extensions, so a token that marks any critical is refused.
    if header.crit.is_some() {
        return Err(JwtError::Malformed("crit header not supported"));
    }
    let kid = match header.kid.as_deref() {
        None => return Err(JwtError::MissingKid),
        Some("") => return Err(JwtError::Malformed("kid is empty")),
        Some(kid) => kid,
    };
    let authority = authorities
        .iter()
        .find(|a| a.key_id == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.to_owned()))?;
    let key = authority_key(authority)?;

    // Structure first: a payload that is not base64url is malformed whatever its signature
    // (jsonwebtoken verifies the signature before it decodes the payload).
    if token
        .split('.')
        .nth(1)
        .is_none_or(|payload| URL_SAFE_NO_PAD.decode(payload).is_err())
    {
        return Err(JwtError::Malformed("bad base64url"));
    }
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation(audience))
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => JwtError::BadSignature,
            ErrorKind::InvalidAudience => JwtError::WrongAudience(audience.to_owned()),
            ErrorKind::MissingRequiredClaim(_) => {
                JwtError::Malformed("no aud, or aud is not a string or string array")
            }
            ErrorKind::Json(_) => JwtError::Malformed("claims are not a json object"),
            ErrorKind::Base64(_) => JwtError::Malformed("bad signature encoding"),
            ErrorKind::InvalidEcdsaKey => JwtError::BadAuthority(kid.to_owned()),
            ErrorKind::InvalidAlgorithm => JwtError::AlgNotAllowed(format!("{:?}", header.alg)),
            _ => JwtError::Malformed("undecodable token"),
        })?
        .claims;

    // decode checked that aud is a string, or an array of strings, holding `audience`.
    let aud = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => return Err(JwtError::Malformed("no aud")),
    };
    let now_secs = unix_secs(now)?;
    let exp = numeric_date(&claims, "exp")?.ok_or(JwtError::Malformed("no exp"))?;
    if now_secs >= exp {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")?
        && now_secs < nbf
    {
        return Err(JwtError::NotYetValid);
    }
    let iat = numeric_date(&claims, "iat")?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed("no sub"))?;
    Ok(JwtSvidClaims {
        sub: SpiffeId::new(sub)?,
        aud,
        exp: UNIX_EPOCH + Duration::from_secs(exp),
        iat: iat.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
    })
}

/// What `decode` checks: the signature under the authority key's one algorithm (SECURITY: the
/// key's, never the header's), and `aud`. Not `exp` and `nbf`: those are checked against the
/// clock the caller passes, not the system clock the library reads.
fn validation(audience: &str) -> Validation {
    let mut validation = Validation::new(ALGORITHM);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["aud"]);
    validation.set_audience(&[audience]);
    validation
}

/// The verification key of a `jwt-svid` JWK, read as jsonwebtoken's [`Jwk`]: an EC P-256 key
/// (the kty and curve that pin ES256) that, if it names an algorithm, names ES256.
fn authority_key(authority: &JwtAuthority) -> Result<DecodingKey, JwtError> {
    let bad = || JwtError::BadAuthority(authority.key_id.clone());
    let jwk = Jwk::deserialize(&authority.jwk).map_err(|_| bad())?;
    let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
        return Err(bad());
    };
    if ec.curve != EllipticCurve::P256
        || jwk
            .common
            .key_algorithm
            .is_some_and(|alg| alg != KeyAlgorithm::ES256)
    {
        return Err(bad());
    }
    let coordinate_ok = |c: &str| URL_SAFE_NO_PAD.decode(c).is_ok_and(|b| b.len() == 32);
    if !coordinate_ok(&ec.x) || !coordinate_ok(&ec.y) {
        return Err(bad());
    }
    DecodingKey::from_jwk(&jwk).map_err(|_| bad())
}

/// Reads an optional NumericDate claim. Only non-negative integers are accepted.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or(JwtError::Malformed("time claim is not an integer")),
    }
}

fn unix_secs(t: SystemTime) -> Result<u64, JwtError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| JwtError::BadTime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn subject() -> SpiffeId {
        SpiffeId::new("spiffe://example.org/ns/default/sa/web").unwrap()
    }

    fn aud(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn signer() -> JwtSigner {
        JwtSigner::generate(t0() + 24 * HOUR).unwrap().0
    }

    fn segment(token: &str, i: usize) -> Map<String, Value> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).unwrap())
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// `header.claims`, signed with `key` under `alg` whatever the header says.
    fn forge(header: Value, claims: Value, key: &EncodingKey, alg: Algorithm) -> String {
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
        let message = format!("{}.{}", enc(header), enc(claims));
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
        format!("{message}.{sig}")
    }

    fn good_claims() -> Value {
        serde_json::json!({"sub": subject().as_str(), "aud": ["db"], "exp": 1_900_000_000u64})
    }

    #[test]
    fn round_trip() {
        let s = signer();
        let (token, exp) = s
            .mint(&subject(), &aud(&["db", "cache"]), HOUR, t0())
            .unwrap();
        assert_eq!(exp, t0() + HOUR);
        let header = segment(&token, 0);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], s.key_id());
        let claims = verify_jwt_svid(
            &token,
            &[s.authority()],
            "cache",
            t0() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(claims.sub, subject());
        assert_eq!(claims.aud, aud(&["db", "cache"]));
        assert_eq!(claims.exp, t0() + HOUR);
        assert_eq!(claims.iat, Some(t0()));
    }

    #[test]
    fn reloaded_key_keeps_id_and_verifies() {
        let (s, der) = JwtSigner::generate(t0() + HOUR).unwrap();
        let again = JwtSigner::from_pkcs8(s.key_id().to_owned(), &der, t0() + HOUR).unwrap();
        assert_eq!(again.authority(), s.authority());
        assert_eq!(key_id_for(&again.public_point), s.key_id());
        assert_eq!(s.key_id().len(), 22); // 16 bytes in unpadded base64url
        let (token, _) = again.mint(&subject(), &aud(&["x"]), HOUR, t0()).unwrap();
        verify_jwt_svid(&token, &[s.authority()], "x", t0()).unwrap();
    }

    #[test]
    fn from_pkcs8_refuses_bad_input() {
        let (_, der) = JwtSigner::generate(t0()).unwrap();
        assert!(matches!(
            JwtSigner::from_pkcs8(String::new(), &der, t0()),
            Err(JwtError::EmptyKeyId)
        ));
        assert!(matches!(
            JwtSigner::from_pkcs8("k".into(), b"not a key", t0()),
            Err(JwtError::Key(_))
        ));
    }

    #[test]
    fn wrong_audience() {
        let s = signer();
        let (token, _) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        let err = verify_jwt_svid(&token, &[s.authority()], "cache", t0()).unwrap_err();
        assert_eq!(err.reason(), "wrong_audience");
        let err = verify_jwt_svid(&token, &[s.authority()], "", t0()).unwrap_err();
        assert_eq!(err.reason(), "empty_audience");
    }

    #[test]
    fn expired() {
        let s = signer();
        let (token, exp) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        verify_jwt_svid(&token, &[s.authority()], "db", exp - Duration::from_secs(1)).unwrap();
        let err = verify_jwt_svid(&token, &[s.authority()], "db", exp).unwrap_err();
        assert_eq!(err.reason(), "expired");
    }

    #[test]
    fn tampered_payload() {
        let s = signer();
        let (token, _) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = segment(&token, 1);
        claims.insert("sub".into(), "spiffe://example.org/admin".into());
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        let err = verify_jwt_svid(&forged, &[s.authority()], "db", t0()).unwrap_err();
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn unknown_kid_and_missing_kid() {
        let s = signer();
        let other = signer();
        let (token, _) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        let err = verify_jwt_svid(&token, &[other.authority()], "db", t0()).unwrap_err();
        assert_eq!(err.reason(), "unknown_key");

        let mut header = Header::new(Algorithm::ES256);
        header.kid = None;
        let claims =
            serde_json::json!({"sub": subject().as_str(), "aud": ["db"], "exp": 1_900_000_000u64});
        let no_kid = jsonwebtoken::encode(&header, &claims, &s.encoding_key).unwrap();
        let err = verify_jwt_svid(&no_kid, &[s.authority()], "db", t0()).unwrap_err();
        assert_eq!(err.reason(), "missing_kid");
    }

    #[test]
    fn signed_by_another_signer_under_the_same_kid() {
        let s = signer();
        let (_, other_der) = JwtSigner::generate(t0() + HOUR).unwrap();
        let impostor =
            JwtSigner::from_pkcs8(s.key_id().to_owned(), &other_der, t0() + HOUR).unwrap();
        let (token, _) = impostor
            .mint(&subject(), &aud(&["db"]), HOUR, t0())
            .unwrap();
        let err = verify_jwt_svid(&token, &[s.authority()], "db", t0()).unwrap_err();
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn exp_capped_at_signer_not_after() {
        let not_after = t0() + Duration::from_secs(600);
        let (s, _) = JwtSigner::generate(not_after).unwrap();
        let (token, exp) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        assert_eq!(exp, not_after);
        assert_eq!(segment(&token, 1)["exp"], unix_secs(not_after).unwrap());
        // A signer past its not_after mints nothing.
        let err = s
            .mint(&subject(), &aud(&["db"]), HOUR, not_after)
            .unwrap_err();
        assert_eq!(err.reason(), "signer_expired");
    }

    #[test]
    fn empty_audience_and_zero_ttl_refused() {
        let s = signer();
        let err = s.mint(&subject(), &[], HOUR, t0()).unwrap_err();
        assert_eq!(err.reason(), "empty_audience");
        let err = s.mint(&subject(), &aud(&[""]), HOUR, t0()).unwrap_err();
        assert_eq!(err.reason(), "empty_audience");
        let err = s
            .mint(&subject(), &aud(&["db"]), Duration::ZERO, t0())
            .unwrap_err();
        assert_eq!(err.reason(), "bad_ttl");
    }

    #[test]
    fn jwk_coordinates_are_the_public_point() {
        let (s, der) = JwtSigner::generate(t0()).unwrap();
        let authority = s.authority();
        assert_eq!(authority.key_id, s.key_id());
        let jwk = &authority.jwk;
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["kid"], s.key_id());
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
                .unwrap();
        let mut point = vec![0x04];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        assert_eq!(point, pair.public_key().as_ref());
    }

    #[test]
    fn refuses_other_algorithms_and_malformed_tokens() {
        let s = signer();
        let (token, _) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
        let check = |t: &str, reason: &str| {
            let err = verify_jwt_svid(t, &[s.authority()], "db", t0()).unwrap_err();
            assert_eq!(err.reason(), reason, "{t}: {err}");
        };
        let none = enc(serde_json::json!({"alg": "none", "kid": s.key_id()}));
        check(&format!("{none}.{}.", parts[1]), "alg_not_allowed");
        let hs = enc(serde_json::json!({"alg": "HS256", "kid": s.key_id()}));
        check(
            &format!("{hs}.{}.{}", parts[1], parts[2]),
            "alg_not_allowed",
        );
        let crit = enc(serde_json::json!({"alg": "ES256", "kid": s.key_id(), "crit": ["x"]}));
        check(&format!("{crit}.{}.{}", parts[1], parts[2]), "malformed");
        check("garbage", "malformed");
        check(&format!("{}.{}", parts[0], parts[1]), "malformed");
        check(&format!("{}.!!!.{}", parts[0], parts[2]), "malformed");
        check(&"a".repeat(MAX_TOKEN_LEN + 1), "too_large");
    }

    #[test]
    fn hmac_with_the_public_key_as_secret_is_refused() {
        let s = signer();
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": s.key_id()});
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&s.public_point);
        let jwk = &s.authority().jwk;
        for secret in [
            &s.public_point[..],
            &spki,
            jwk["x"].as_str().unwrap().as_bytes(),
        ] {
            let token = forge(
                header.clone(),
                good_claims(),
                &EncodingKey::from_secret(secret),
                Algorithm::HS256,
            );
            let err = verify_jwt_svid(&token, &[s.authority()], "db", t0()).unwrap_err();
            assert_eq!(err.reason(), "alg_not_allowed", "{err}");
        }
        // The key's Validation refuses it on its own too, not only the check of the header.
        let token = forge(
            header.clone(),
            good_claims(),
            &EncodingKey::from_secret(&s.public_point),
            Algorithm::HS256,
        );
        let key = authority_key(&s.authority()).unwrap();
        let err = jsonwebtoken::decode::<Value>(&token, &key, &validation("db")).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::InvalidAlgorithm);
        // The same with an authority that names no alg, and one that names HS256.
        for alg in [None, Some("HS256")] {
            let mut authority = s.authority();
            match alg {
                Some(alg) => drop(authority.jwk.insert("alg".into(), alg.into())),
                None => drop(authority.jwk.remove("alg")),
            }
            let token = forge(
                header.clone(),
                good_claims(),
                &EncodingKey::from_secret(&s.public_point),
                Algorithm::HS256,
            );
            let err = verify_jwt_svid(&token, &[authority], "db", t0()).unwrap_err();
            assert_eq!(err.reason(), "alg_not_allowed", "{alg:?}: {err}");
        }
    }

    #[test]
    fn claims_the_library_leaves_to_us() {
        let s = signer();
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": s.key_id()});
        let check = |claims: Value, reason: &str| {
            let token = forge(header.clone(), claims, &s.encoding_key, Algorithm::ES256);
            let got = verify_jwt_svid(&token, &[s.authority()], "db", t0()).map(|_| ());
            assert_eq!(got.map_err(|e| e.reason()), Err(reason), "{token}");
        };
        let with = |edit: fn(&mut Value)| {
            let mut c = good_claims();
            edit(&mut c);
            c
        };
        check(
            with(|c| c["nbf"] = (1_800_000_001u64).into()),
            "not_yet_valid",
        );
        check(with(|c| c["exp"] = (1_800_000_000u64).into()), "expired");
        check(with(|c| c["exp"] = 1.9e9.into()), "malformed");
        check(with(|c| c["iat"] = "now".into()), "malformed");
        check(
            with(|c| drop(c.as_object_mut().unwrap().remove("exp"))),
            "malformed",
        );
        check(
            with(|c| drop(c.as_object_mut().unwrap().remove("aud"))),
            "malformed",
        );
        check(
            with(|c| c["aud"] = serde_json::json!(["db", 7])),
            "malformed",
        );
        check(with(|c| c["aud"] = serde_json::json!([])), "wrong_audience");
        check(with(|c| c["sub"] = "web".into()), "bad_subject");
        check(
            with(|c| drop(c.as_object_mut().unwrap().remove("sub"))),
            "malformed",
        );
        check(serde_json::json!(["not", "an", "object"]), "malformed");
        let ok = forge(
            header.clone(),
            good_claims(),
            &s.encoding_key,
            Algorithm::ES256,
        );
        let claims = verify_jwt_svid(&ok, &[s.authority()], "db", t0()).unwrap();
        assert_eq!(claims.aud, aud(&["db"]));
        assert_eq!(claims.iat, None);
    }

    #[test]
    fn read_header_tells_unknown_algorithms_apart() {
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
        let with = |h: Value| format!("{}.e30.", enc(h));
        let header = read_header(&with(
            serde_json::json!({"alg": "ES256", "kid": "k", "x": null}),
        ))
        .unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::ES256, Some("k"))
        );
        let cases = [
            (
                with(serde_json::json!({"alg": "none"})),
                JwsError::UnknownAlgorithm("none".into()),
            ),
            (
                with(serde_json::json!({"alg": "ES256", "kid": 7})),
                JwsError::Header,
            ),
            (with(serde_json::json!({"alg": 7})), JwsError::Header),
            (with(serde_json::json!({"kid": "k"})), JwsError::Header),
            (
                with(serde_json::json!({"alg": "ES256", "crit": null})),
                JwsError::Header,
            ),
            (
                with(serde_json::json!({"alg": "ES256", "kid": null})),
                JwsError::Header,
            ),
            (
                with(serde_json::json!({"alg": "ES256", "typ": null})),
                JwsError::Header,
            ),
            (with(serde_json::json!({"alg": null})), JwsError::Header),
            (with(serde_json::json!(["alg", "ES256"])), JwsError::Header),
            (
                format!("{}.e30.x.y", enc(serde_json::json!({"alg": "ES256"}))),
                JwsError::Segments,
            ),
            ("!!!.e30.".to_owned(), JwsError::Base64),
        ];
        for (token, want) in cases {
            assert_eq!(read_header(&token).unwrap_err(), want, "{token}");
        }
    }

    #[test]
    fn authority_must_be_p256() {
        let s = signer();
        let (token, _) = s.mint(&subject(), &aud(&["db"]), HOUR, t0()).unwrap();
        let mut authority = s.authority();
        authority.jwk.insert("crv".into(), "P-384".into());
        let err = verify_jwt_svid(&token, &[authority], "db", t0()).unwrap_err();
        assert_eq!(err.reason(), "bad_authority");
    }
}
