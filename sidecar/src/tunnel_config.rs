//! `kith sidecar run`'s configuration beyond flags: several explicit tunnels from a TOML file
//! (`--config`), an authorization policy file (`--policy`), and `--allow` rules with ports.
//!
//! ```toml
//! # tunnels.toml
//! [[tunnel]]                      # client side: plaintext in, mTLS out
//! name = "db"                     # label in logs and metrics (default: the listen address)
//! listen = "127.0.0.1:5432"
//! connect = "10.0.0.2:8443"
//! expect_id = "spiffe://example.org/db"   # required, or expect_trust_domain = true
//!
//! [[tunnel]]                      # server side: mTLS in, plaintext out
//! listen = "0.0.0.0:8443"
//! forward = "127.0.0.1:8080"
//! allow = ["spiffe://example.org/ns/shop/*"]   # default: the global policy
//! ```
//!
//! ```toml
//! # policy.toml: who may connect in; with no rule, any ID of the own trust domain
//! [[allow]]
//! id = "spiffe://example.org/ns/shop/sa/web"
//! ports = [8080]                  # default: every port
//!
//! [[allow]]
//! id = "spiffe://example.org/ns/monitoring/*"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use identity::SpiffeId;
use proxy::authz::Policy;
use proxy::tls::ExpectedPeer;
use proxy::tunnel::{Upstream, UpstreamError};
use serde::Deserialize;

/// The largest config or policy file read (a typo'd path to a huge file fails fast).
const MAX_FILE: u64 = 1 << 20;

/// A tunnel config, policy file or `--allow`/`--expect-id` value that cannot be used; the
/// message names the file (and tunnel or rule) or the flag, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is {len} bytes; a {what} is at most {MAX_FILE}", path.display())]
    TooLarge {
        path: PathBuf,
        len: u64,
        what: &'static str,
    },
    #[error("cannot read {} as UTF-8 text", path.display())]
    NotText {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's message (unknown field, wrong type) already says where.
    #[error("{} ({what}): {error}", path.display())]
    Toml {
        path: PathBuf,
        what: &'static str,
        error: Box<toml::de::Error>,
    },
    #[error("--allow {flag:?}: {port:?} is not a port")]
    AllowPort { flag: String, port: String },
    #[error("--allow {flag:?}")]
    Allow {
        flag: String,
        #[source]
        source: proxy::authz::Error,
    },
    #[error("{} has no [[allow]] rule; remove --policy to allow the own trust domain", path.display())]
    NoAllowRule { path: PathBuf },
    #[error("{}: allow rule {rule} lists port 0", path.display())]
    RulePortZero { path: PathBuf, rule: usize },
    #[error("{}: allow rule {rule}", path.display())]
    Rule {
        path: PathBuf,
        rule: usize,
        #[source]
        source: proxy::authz::Error,
    },
    #[error("{} defines no [[tunnel]]", path.display())]
    NoTunnel { path: PathBuf },
    /// `at` is `FILE: tunnel N (NAME)`; the source says what is wrong with it.
    #[error("{at}")]
    Tunnel {
        at: String,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("the name must be non-empty, without quotes")]
    TunnelName,
    #[error("another tunnel has this name")]
    SameName,
    #[error("another tunnel listens on {0}")]
    SameListen(SocketAddr),
    #[error("allow is for server tunnels (forward)")]
    AllowOnClient,
    #[error("expect_id and expect_trust_domain are for client tunnels (connect)")]
    ExpectOnServer,
    #[error("give either connect (client side) or forward (server side)")]
    TunnelEnd,
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("--expect-id {id:?}")]
    ExpectId {
        id: String,
        #[source]
        source: identity::IdError,
    },
    #[error("give either {id_hint} or {td_hint}, not both")]
    ExpectBoth { id_hint: String, td_hint: String },
    #[error(
        "a client tunnel must name the server it expects: give {id_hint} (the server's SPIFFE ID), or {td_hint} to accept any server of the own trust domain (anyone who can intercept the traffic with such an SVID is then believed)"
    )]
    ExpectNone { id_hint: String, td_hint: String },
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// One explicit tunnel, resolved.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub name: String,
    pub listen: SocketAddr,
    pub end: End,
}

#[derive(Debug, Clone)]
pub enum End {
    /// Plaintext in, mTLS to `connect`, whose server must match `expect`.
    Client {
        connect: Upstream,
        expect: ExpectedPeer,
    },
    /// mTLS in, authorized by `policy`, plaintext to `forward`.
    Server { forward: SocketAddr, policy: Policy },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tunnel: Vec<TunnelEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelEntry {
    name: Option<String>,
    listen: SocketAddr,
    connect: Option<String>,
    expect_id: Option<String>,
    #[serde(default)]
    expect_trust_domain: bool,
    forward: Option<SocketAddr>,
    allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<AllowEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowEntry {
    id: String,
    #[serde(default)]
    ports: Vec<u16>,
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path, what: &'static str) -> Result<T> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_FILE {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            len: meta.len(),
            what,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::NotText {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Toml {
        path: path.to_owned(),
        what,
        error: Box::new(error),
    })
}

/// `spiffe://td/path`, `spiffe://td/prefix/*`, either with `@PORT[+PORT…]`: the rule holds for
/// those ports only (`@` and `+` cannot occur in a SPIFFE ID).
pub fn add_allow_flag(policy: Policy, flag: &str) -> Result<Policy> {
    let (rule, ports) = match flag.rsplit_once('@') {
        None => (flag, Vec::new()),
        Some((rule, ports)) => {
            let ports = ports
                .split('+')
                .map(|p| {
                    p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                        ConfigError::AllowPort {
                            flag: flag.to_owned(),
                            port: p.to_owned(),
                        }
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (rule, ports)
        }
    };
    policy
        .allow_on(rule, &ports)
        .map_err(|source| ConfigError::Allow {
            flag: flag.to_owned(),
            source,
        })
}

/// Adds the rules of a policy file.
pub fn add_policy_file(mut policy: Policy, path: &Path) -> Result<Policy> {
    let file: PolicyFile = read_toml(path, "policy file")?;
    if file.allow.is_empty() {
        return Err(ConfigError::NoAllowRule {
            path: path.to_owned(),
        });
    }
    for (i, rule) in file.allow.iter().enumerate() {
        if rule.ports.contains(&0) {
            return Err(ConfigError::RulePortZero {
                path: path.to_owned(),
                rule: i + 1,
            });
        }
        policy = policy
            .allow_on(&rule.id, &rule.ports)
            .map_err(|source| ConfigError::Rule {
                path: path.to_owned(),
                rule: i + 1,
                source,
            })?;
    }
    Ok(policy)
}

/// The tunnels of a config file; server tunnels without their own `allow` get `global`.
pub fn load_tunnels(path: &Path, global: &Policy) -> Result<Vec<Tunnel>> {
    let file: File = read_toml(path, "tunnel config")?;
    if file.tunnel.is_empty() {
        return Err(ConfigError::NoTunnel {
            path: path.to_owned(),
        });
    }
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    let mut out = Vec::new();
    for (i, t) in file.tunnel.into_iter().enumerate() {
        let name = t.name.clone().unwrap_or_else(|| t.listen.to_string());
        let at = |problem: ConfigError| ConfigError::Tunnel {
            at: format!("{}: tunnel {} ({name})", path.display(), i + 1),
            source: Box::new(problem),
        };
        if name.is_empty() || name.contains(['"', '\\', '\n']) {
            return Err(at(ConfigError::TunnelName));
        }
        if !names.insert(name.clone()) {
            return Err(at(ConfigError::SameName));
        }
        if !listens.insert(t.listen) {
            return Err(at(ConfigError::SameListen(t.listen)));
        }
        let end = match (t.connect, t.forward) {
            (Some(connect), None) => {
                if t.allow.is_some() {
                    return Err(at(ConfigError::AllowOnClient));
                }
                End::Client {
                    connect: connect.parse().map_err(|e: UpstreamError| at(e.into()))?,
                    expect: expected_peer(
                        t.expect_id.as_deref(),
                        t.expect_trust_domain,
                        "expect_id = \"SPIFFE_ID\"",
                        "expect_trust_domain = true",
                    )
                    .map_err(at)?,
                }
            }
            (None, Some(forward)) => {
                if t.expect_id.is_some() || t.expect_trust_domain {
                    return Err(at(ConfigError::ExpectOnServer));
                }
                let policy = match &t.allow {
                    None => global.clone(),
                    Some(rules) => rules
                        .iter()
                        .try_fold(Policy::own_trust_domain(), |p, r| add_allow_flag(p, r))
                        .map_err(at)?,
                };
                End::Server { forward, policy }
            }
            _ => return Err(at(ConfigError::TunnelEnd)),
        };
        out.push(Tunnel {
            name,
            listen: t.listen,
            end,
        });
    }
    Ok(out)
}

/// A client tunnel's server: an exact SPIFFE ID, or, only when asked for explicitly, any ID
/// of the own trust domain. `id_hint` and `td_hint` name the two settings in the error.
///
/// SECURITY: no silent default. A tunnel that accepted any SVID of the domain would let a
/// workload that can intercept the traffic (DNS, ARP, a reused address) pose as the server.
pub fn expected_peer(
    expect_id: Option<&str>,
    any_of_trust_domain: bool,
    id_hint: &str,
    td_hint: &str,
) -> Result<ExpectedPeer> {
    match (expect_id, any_of_trust_domain) {
        (Some(s), false) => Ok(ExpectedPeer::Id(SpiffeId::new(s).map_err(|source| {
            ConfigError::ExpectId {
                id: s.to_owned(),
                source,
            }
        })?)),
        (None, true) => Ok(ExpectedPeer::TrustDomain),
        (Some(_), true) => Err(ConfigError::ExpectBoth {
            id_hint: id_hint.to_owned(),
            td_hint: td_hint.to_owned(),
        }),
        (None, false) => Err(ConfigError::ExpectNone {
            id_hint: id_hint.to_owned(),
            td_hint: td_hint.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use identity::report::chain;

    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).expect("id")
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn allow_flags_with_ports() {
        let p =
            add_allow_flag(Policy::own_trust_domain(), "spiffe://td/db@5432+5433").expect("rule");
        let p = add_allow_flag(p, "spiffe://td/ops/*").expect("rule");
        assert!(p.check(&id("spiffe://td/db"), 5433).is_ok());
        assert!(p.check(&id("spiffe://td/db"), 80).is_err());
        assert!(p.check(&id("spiffe://td/ops/x"), 80).is_ok());
        for bad in [
            "spiffe://td/db@",
            "spiffe://td/db@0",
            "spiffe://td/db@70000",
            "spiffe://td/db@80+x",
            "db@80",
        ] {
            assert!(
                add_allow_flag(Policy::own_trust_domain(), bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn policy_file() {
        let f = write(
            "[[allow]]\nid = \"spiffe://td/web\"\nports = [8080]\n\n[[allow]]\nid = \"spiffe://td/mon/*\"\n",
        );
        let p = add_policy_file(Policy::own_trust_domain(), f.path()).expect("policy");
        assert!(p.check(&id("spiffe://td/web"), 8080).is_ok());
        assert!(p.check(&id("spiffe://td/web"), 9090).is_err());
        assert!(p.check(&id("spiffe://td/mon/prom"), 9090).is_ok());
        assert!(p.check(&id("spiffe://td/other"), 8080).is_err());

        let typo = write("[[allow]]\nid = \"spiffe://td/web\"\nport = [8080]\n");
        let e = chain(&add_policy_file(Policy::own_trust_domain(), typo.path()).unwrap_err());
        assert!(e.contains("unknown field `port`"), "{e}");
        let empty = write("");
        assert!(add_policy_file(Policy::own_trust_domain(), empty.path()).is_err());
        let bad = write("[[allow]]\nid = \"web\"\n");
        let e = chain(&add_policy_file(Policy::own_trust_domain(), bad.path()).unwrap_err());
        assert!(e.contains("allow rule 1"), "{e}");
    }

    #[test]
    fn tunnels_file() {
        let f = write(
            r#"
[[tunnel]]
name = "db"
listen = "127.0.0.1:5432"
connect = "10.0.0.2:8443"
expect_id = "spiffe://td/db"

[[tunnel]]
listen = "127.0.0.1:5433"
connect = "db.internal:8443"
expect_trust_domain = true

[[tunnel]]
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
allow = ["spiffe://td/web@8080"]

[[tunnel]]
listen = "0.0.0.0:9443"
forward = "127.0.0.1:9090"
"#,
        );
        let global = add_allow_flag(Policy::own_trust_domain(), "spiffe://td/ops").expect("r");
        let t = load_tunnels(f.path(), &global).expect("tunnels");
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].name, "db");
        assert!(
            matches!(&t[1].end, End::Client { connect: Upstream::Host(h, 8443), .. } if h == "db.internal")
        );
        assert!(
            matches!(&t[0].end, End::Client { expect: ExpectedPeer::Id(i), .. } if i.as_str() == "spiffe://td/db")
        );
        assert!(matches!(
            &t[1].end,
            End::Client {
                expect: ExpectedPeer::TrustDomain,
                ..
            }
        ));
        let t = &t[1..];
        assert_eq!(t[1].name, "0.0.0.0:8443");
        let End::Server { policy, .. } = &t[1].end else {
            panic!("server")
        };
        assert!(policy.check(&id("spiffe://td/web"), 8080).is_ok());
        assert!(policy.check(&id("spiffe://td/ops"), 8080).is_err());
        let End::Server { policy, .. } = &t[2].end else {
            panic!("server")
        };
        assert_eq!(policy, &global);
    }

    #[test]
    fn bad_tunnel_files_name_the_problem() {
        for (text, want) in [
            ("", "defines no [[tunnel]]"),
            ("[[tunnel]]\nlisten = \"127.0.0.1:1\"\n", "either connect"),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\nforward = \"127.0.0.1:3\"\n",
                "either connect",
            ),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\nexpect_trust_domain = true\nallow = []\n",
                "allow is for server tunnels",
            ),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\n",
                "must name the server it expects",
            ),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\nexpect_id = \"spiffe://td/a\"\nexpect_trust_domain = true\n",
                "not both",
            ),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\nexpect_trust_domain = true\n[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:3\"\nexpect_trust_domain = true\n",
                "another tunnel",
            ),
            (
                "[[tunnel]]\nlisten = \"nowhere\"\n",
                "invalid socket address",
            ),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"127.0.0.1:2\"\nexpect_id = \"db\"\n",
                "--expect-id",
            ),
            ("[[tunel]]\n", "unknown field `tunel`"),
            (
                "[[tunnel]]\nlisten = \"127.0.0.1:1\"\nconnect = \"bad host:80\"\nexpect_trust_domain = true\n",
                "invalid upstream",
            ),
        ] {
            let f = write(text);
            let e = chain(&load_tunnels(f.path(), &Policy::own_trust_domain()).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = load_tunnels(
            Path::new("/nonexistent/t.toml"),
            &Policy::own_trust_domain(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
