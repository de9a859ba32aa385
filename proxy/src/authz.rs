//! Authorization of a verified peer: one plain policy with one check (ghostunnel's
//! `auth/auth.go`). Rules are exact SPIFFE IDs or `spiffe://td/prefix/*`; with no rule, any
//! workload of the own trust domain is allowed.

use identity::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid allow rule {rule:?}: {why}")]
    BadRule { rule: String, why: String },
}

/// A refusal: `id` may not reach `port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{id} is not allowed to port {port}")]
pub struct Denied {
    pub id: SpiffeId,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(SpiffeId),
    /// Matches IDs starting with this string, which ends in `/` (so `ns/a/*` never matches
    /// `ns/ab`).
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: Pattern,
    /// Empty: every port.
    ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The trust domain of the default rule; `None`: that of the proxy's current SVID.
    own: Option<TrustDomain>,
    rules: Vec<Rule>,
}

impl Policy {
    /// The default policy: any ID of `own` trust domain.
    pub fn new(own: TrustDomain) -> Self {
        Self {
            own: Some(own),
            rules: Vec::new(),
        }
    }

    /// The default policy when the trust domain is not known yet (the identity comes later):
    /// any ID of the trust domain of the proxy's SVID at the time of the check.
    pub fn own_trust_domain() -> Self {
        Self {
            own: None,
            rules: Vec::new(),
        }
    }

    /// Whether any allow rule was added (otherwise the own trust domain is allowed).
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Adds a rule (`spiffe://td/path` or `spiffe://td/path/*`) for every port.
    pub fn allow(self, rule: &str) -> Result<Self, Error> {
        self.allow_on(rule, &[])
    }

    /// Adds a rule for the given ports only (empty: every port).
    pub fn allow_on(mut self, rule: &str, ports: &[u16]) -> Result<Self, Error> {
        let bad = |why: String| Error::BadRule {
            rule: rule.to_owned(),
            why,
        };
        let pattern = match rule.strip_suffix("/*") {
            Some(base) => {
                let id = SpiffeId::new(base).map_err(|e| bad(e.to_string()))?;
                Pattern::Prefix(format!("{}/", id.as_str().trim_end_matches('/')))
            }
            None if rule.contains('*') => return Err(bad("'*' only as a last segment".into())),
            None => Pattern::Exact(SpiffeId::new(rule).map_err(|e| bad(e.to_string()))?),
        };
        self.rules.push(Rule {
            pattern,
            ports: ports.to_vec(),
        });
        Ok(self)
    }

    /// Allows or denies a verified peer ID to a destination port.
    pub fn check(&self, id: &SpiffeId, port: u16) -> Result<(), Denied> {
        self.check_in(id, port, None)
    }

    /// [`Self::check`], with `current` as the own trust domain when the policy was built
    /// without one.
    pub fn check_in(
        &self,
        id: &SpiffeId,
        port: u16,
        current: Option<&TrustDomain>,
    ) -> Result<(), Denied> {
        let allowed = if self.rules.is_empty() {
            self.own
                .as_ref()
                .or(current)
                .is_some_and(|td| id.is_member_of(td))
        } else {
            self.rules.iter().any(|r| {
                (r.ports.is_empty() || r.ports.contains(&port))
                    && match &r.pattern {
                        Pattern::Exact(e) => e == id,
                        Pattern::Prefix(p) => id.as_str().starts_with(p.as_str()),
                    }
            })
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied {
                id: id.clone(),
                port,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).expect("valid id")
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.test").expect("valid td")
    }

    #[test]
    fn default_allows_own_trust_domain_only() {
        let p = Policy::new(td());
        assert!(p.check(&id("spiffe://example.test/ns/a"), 80).is_ok());
        assert!(p.check(&id("spiffe://other.test/ns/a"), 80).is_err());
    }

    #[test]
    fn default_without_trust_domain_follows_the_current_one() {
        let p = Policy::own_trust_domain();
        let a = id("spiffe://example.test/ns/a");
        assert!(
            p.check(&a, 80).is_err(),
            "no trust domain yet: nothing allowed"
        );
        assert!(p.check_in(&a, 80, Some(&td())).is_ok());
        let other = TrustDomain::new("other.test").expect("td");
        assert!(p.check_in(&a, 80, Some(&other)).is_err());
    }

    #[test]
    fn exact_rule_allows_that_id_only() {
        let p = Policy::new(td())
            .allow("spiffe://example.test/web")
            .expect("rule");
        assert!(p.check(&id("spiffe://example.test/web"), 1).is_ok());
        let denied = p.check(&id("spiffe://example.test/web2"), 1).unwrap_err();
        assert_eq!(denied.port, 1);
        assert!(p.check(&id("spiffe://example.test/web/x"), 1).is_err());
    }

    #[test]
    fn prefix_rule_respects_segment_boundaries() {
        let p = Policy::new(td())
            .allow("spiffe://example.test/ns/a/*")
            .expect("rule");
        assert!(p.check(&id("spiffe://example.test/ns/a/x"), 1).is_ok());
        assert!(p.check(&id("spiffe://example.test/ns/a/x/y"), 1).is_ok());
        assert!(p.check(&id("spiffe://example.test/ns/ab"), 1).is_err());
        assert!(p.check(&id("spiffe://example.test/ns/a"), 1).is_err());
    }

    #[test]
    fn trust_domain_wildcard() {
        let p = Policy::new(td())
            .allow("spiffe://other.test/*")
            .expect("rule");
        assert!(p.check(&id("spiffe://other.test/x"), 1).is_ok());
        // Rules replace the default.
        assert!(p.check(&id("spiffe://example.test/x"), 1).is_err());
    }

    #[test]
    fn port_rules() {
        let p = Policy::new(td())
            .allow_on("spiffe://example.test/db", &[5432])
            .expect("rule");
        assert!(p.check(&id("spiffe://example.test/db"), 5432).is_ok());
        assert!(p.check(&id("spiffe://example.test/db"), 80).is_err());
    }

    #[test]
    fn bad_rules_are_refused() {
        for rule in [
            "web",
            "spiffe://example.test/a*",
            "spiffe://example.test/*/x",
            "*",
        ] {
            assert!(Policy::new(td()).allow(rule).is_err(), "{rule}");
        }
    }
}
