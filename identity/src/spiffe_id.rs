//! SPIFFE IDs and trust domains, parsed once into newtypes per the SPIFFE ID standard
//! (spiffe/spiffe `standards/SPIFFE-ID.md`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// The standard caps a SPIFFE ID, as a URI, at 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;
/// A trust domain is a DNS-like name; 255 bytes is the DNS limit the standard points at.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE trust domain such as `example.org`: lowercase letters, digits, `.`, `-` and `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://<trust domain><path>`, where the path may be empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the end of the trust domain).
    path_start: usize,
}

/// The rule of the SPIFFE ID standard that an input breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("spiffe id is empty")]
    Empty,
    #[error("spiffe id must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error(
        "trust domain must be lowercase (found {0:?}); SPIFFE trust domains are case-sensitive and lowercase only"
    )]
    UppercaseTrustDomain(char),
    #[error("trust domain contains {0:?}: only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("a port is not allowed in a spiffe id")]
    Port,
    #[error("user info ('user@') is not allowed in a spiffe id")]
    UserInfo,
    #[error("a query ('?') is not allowed in a spiffe id")]
    Query,
    #[error("a fragment ('#') is not allowed in a spiffe id")]
    Fragment,
    #[error("path has an empty segment ('//')")]
    EmptySegment,
    #[error("path segments '.' and '..' are not allowed")]
    DotSegment,
    #[error("path contains {0:?}: only A-Z, a-z, 0-9, '.', '-' and '_' are allowed in a segment")]
    BadPathChar(char),
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error("path must start with '/'")]
    RelativePath,
    #[error("spiffe id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

impl TrustDomain {
    /// Parses a bare trust domain (`example.org`) or the SPIFFE ID of a trust domain
    /// (`spiffe://example.org`).
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.contains("://") {
            let id = SpiffeId::new(input)?;
            if !id.path().is_empty() {
                return Err(IdError::BadTrustDomainChar('/'));
            }
            return Ok(id.trust_domain());
        }
        validate_trust_domain(input)?;
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself: `spiffe://<td>` (used in CA certificates).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0),
            path_start: SCHEME.len() + self.0.len(),
        }
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with '/').
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::new(&format!("{SCHEME}{}{path}", self.0))
    }
}

impl SpiffeId {
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = input.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        // A query or fragment may sit in the authority part too (`spiffe://td?x`).
        for (c, err) in [('?', IdError::Query), ('#', IdError::Fragment)] {
            if td.contains(c) {
                return Err(err);
            }
        }
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            id: input.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id[SCHEME.len()..self.path_start].to_owned())
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, empty or starting with '/'.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(IdError::UserInfo);
    }
    if td.contains(':') {
        return Err(IdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdError::UppercaseTrustDomain(c)),
            '?' => return Err(IdError::Query),
            '#' => return Err(IdError::Fragment),
            _ => return Err(IdError::BadTrustDomainChar(c)),
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(IdError::RelativePath);
    };
    // Query and fragment first: `/a?b=c` breaks the query rule, not the character rule.
    if path.contains('?') {
        return Err(IdError::Query);
    }
    if path.contains('#') {
        return Err(IdError::Fragment);
    }
    if rest.is_empty() {
        return Err(IdError::TrailingSlash);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(if i == last {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if *segment == "." || *segment == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::BadPathChar(c));
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let cases = [
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/web", "example.org", "/web"),
            (
                "spiffe://a-b_c.9/ns/default/sa/web",
                "a-b_c.9",
                "/ns/default/sa/web",
            ),
            ("spiffe://td/Mixed.Case-Path_9", "td", "/Mixed.Case-Path_9"),
            ("spiffe://td/...", "td", "/..."),
            ("spiffe://td/.hidden", "td", "/.hidden"),
        ];
        for (input, td, path) in cases {
            let id = SpiffeId::new(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain_str(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.to_string(), input);
        }
    }

    #[test]
    fn every_rule_is_named() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        let cases: Vec<(&str, IdError)> = vec![
            ("", IdError::Empty),
            ("http://example.org/web", IdError::WrongScheme),
            ("SPIFFE://example.org/web", IdError::WrongScheme),
            ("spiffe:/example.org", IdError::WrongScheme),
            ("example.org/web", IdError::WrongScheme),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe:///web", IdError::MissingTrustDomain),
            (
                "spiffe://Example.org/web",
                IdError::UppercaseTrustDomain('E'),
            ),
            ("spiffe://exa mple.org", IdError::BadTrustDomainChar(' ')),
            ("spiffe://exa%41mple.org", IdError::BadTrustDomainChar('%')),
            ("spiffe://exämple.org", IdError::BadTrustDomainChar('ä')),
            ("spiffe://example.org:8443/web", IdError::Port),
            ("spiffe://user@example.org/web", IdError::UserInfo),
            ("spiffe://user:pw@example.org/web", IdError::UserInfo),
            ("spiffe://example.org/web?x=1", IdError::Query),
            ("spiffe://example.org?x=1", IdError::Query),
            ("spiffe://example.org/web#frag", IdError::Fragment),
            ("spiffe://example.org#frag", IdError::Fragment),
            ("spiffe://example.org//web", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/./web", IdError::DotSegment),
            ("spiffe://example.org/web/..", IdError::DotSegment),
            ("spiffe://example.org/we%20b", IdError::BadPathChar('%')),
            ("spiffe://example.org/we b", IdError::BadPathChar(' ')),
            ("spiffe://example.org/wéb", IdError::BadPathChar('é')),
            ("spiffe://example.org/a:b", IdError::BadPathChar(':')),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org/web/", IdError::TrailingSlash),
            (&long_path, IdError::TooLong),
            (&long_td, IdError::TrustDomainTooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::new(input), Err(want.clone()), "{input:?}");
        }
    }

    #[test]
    fn the_longest_allowed_id_parses() {
        let prefix = "spiffe://td/";
        let id = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(id.len(), MAX_ID_LEN);
        assert!(SpiffeId::new(&id).is_ok());
    }

    #[test]
    fn trust_domain_parsing() {
        assert_eq!(
            TrustDomain::new("example.org").map(|t| t.to_string()),
            Ok("example.org".into())
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").map(|t| t.to_string()),
            Ok("example.org".into())
        );
        assert_eq!(TrustDomain::new(""), Err(IdError::Empty));
        assert_eq!(
            TrustDomain::new("Example.org"),
            Err(IdError::UppercaseTrustDomain('E'))
        );
        assert_eq!(TrustDomain::new("example.org:80"), Err(IdError::Port));
        assert_eq!(TrustDomain::new("a@example.org"), Err(IdError::UserInfo));
        assert!(TrustDomain::new("spiffe://example.org/web").is_err());
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(td.id().trust_domain(), td);
        assert_eq!(
            td.id_with_path("/web").unwrap().as_str(),
            "spiffe://example.org/web"
        );
    }

    #[test]
    fn serde_round_trip_rejects_bad_ids() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://td/web\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://td/web\"");
        let bad = serde_json::from_str::<SpiffeId>("\"spiffe://td/web/\"");
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("must not end with '/'")
        );
    }
}
