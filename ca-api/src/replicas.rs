//! Several CA replicas behind one client: `--ca` given more than once (or as a comma list), and
//! each name resolved to all of its addresses. A call goes to the replica that answered last;
//! when that one refuses the connection, does not answer in time, breaks the TLS or HTTP
//! exchange, or answers 503 (a replica that lost its database stops issuing), the same call
//! goes to the next address at once. Only when every address failed does the caller see the
//! error, and its own backoff (1 s doubling to 60 s in the agent, to 30 s in the sidecar)
//! applies as before. A refusal that another replica would repeat (a spent join token, a
//! forbidden ID, a bad CSR) is returned at once: the replicas share one database.
//!
//! Every replica is authenticated the same way as a single CA: by its X509-SVID
//! `spiffe://<td>/kith/ca` against the trust bundle, never by the address it was reached at, so
//! an address from DNS can point anywhere without being trusted for it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::client::ClientError;

use crate::link::{self as ca_link, LinkError};

/// How long one attempt at one replica may take (connect, TLS, request, answer).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The CA replicas a client may use, and which one answered last.
#[derive(Debug)]
pub struct CaSet {
    /// `host:port` per `--ca` URL, in the order given.
    targets: Vec<String>,
    attempt_timeout: Duration,
    /// The address that answered last: tried first next time.
    last_good: Mutex<Option<SocketAddr>>,
}

impl CaSet {
    /// From `https://host:port` URLs; an entry may itself be a comma list. At least one.
    pub fn new<S: AsRef<str>>(urls: &[S]) -> Result<Self, LinkError> {
        let mut targets = Vec::new();
        for url in urls
            .iter()
            .flat_map(|u| u.as_ref().split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let target = ca_link::ca_addr(url)?;
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            return Err(LinkError::BadUrl(String::new()));
        }
        Ok(Self {
            targets,
            attempt_timeout: ATTEMPT_TIMEOUT,
            last_good: Mutex::new(None),
        })
    }

    /// Another time limit per attempt (tests; callers with tighter deadlines).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The configured `host:port` targets, for logs.
    pub fn describe(&self) -> String {
        self.targets.join(",")
    }

    /// The address that answered last, if any.
    pub fn current(&self) -> Option<SocketAddr> {
        *self.last_good.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every address of every target, resolved now (a name with several A/AAAA records gives
    /// several replicas), without duplicates, the one that answered last first.
    pub async fn addresses(&self) -> Result<Vec<SocketAddr>, LinkError> {
        let mut out: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        for target in &self.targets {
            match tokio::time::timeout(self.attempt_timeout, tokio::net::lookup_host(target)).await
            {
                Ok(Ok(addrs)) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(ca = %target, %error, "cannot resolve a CA address; trying the others");
                    last_error = Some(ClientError::Connect {
                        addr: target.clone(),
                        error,
                    });
                }
                Err(_) => {
                    tracing::warn!(ca = %target, "resolving a CA address timed out; trying the others");
                    last_error = Some(ClientError::Connect {
                        addr: target.clone(),
                        error: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "name resolution timed out",
                        ),
                    });
                }
            }
        }
        if out.is_empty() {
            return Err(LinkError::Client(last_error.unwrap_or_else(|| {
                ClientError::Connect {
                    addr: self.describe(),
                    error: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                }
            })));
        }
        if let Some(good) = self.current()
            && let Some(i) = out.iter().position(|a| *a == good)
        {
            out[..=i].rotate_right(1);
        }
        Ok(out)
    }

    /// Runs `attempt` against one replica after another until one gives an answer that is not
    /// a reason to move on (see [`moves_on`]); returns that answer, or the last error when
    /// every replica failed. Logs when the replica that answers changes.
    pub async fn call<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, LinkError>
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = Result<T, LinkError>>,
    {
        let addrs = self.addresses().await?;
        let total = addrs.len();
        let mut last = None;
        for (i, addr) in addrs.into_iter().enumerate() {
            let result =
                match tokio::time::timeout(self.attempt_timeout, attempt(addr.to_string())).await {
                    Ok(r) => r,
                    Err(_) => Err(LinkError::Timeout),
                };
            match result {
                Err(e) if moves_on(&e) => {
                    if i + 1 < total {
                        tracing::warn!(ca = %addr, error = %e, call = what, "CA replica failed; trying the next");
                    }
                    last = Some(e);
                }
                other => {
                    self.answered(addr);
                    return other;
                }
            }
        }
        Err(last.unwrap_or(LinkError::Timeout))
    }

    fn answered(&self, addr: SocketAddr) {
        let mut last = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        if *last != Some(addr) {
            match *last {
                Some(before) => {
                    tracing::info!(ca = %addr, before = %before, "now using this CA replica")
                }
                None => tracing::info!(ca = %addr, "using this CA replica"),
            }
            *last = Some(addr);
        }
    }
}

/// Whether another replica may do better: the connection failed, timed out or broke, or this
/// replica is not serving (503). Everything else is the answer of the shared database.
pub fn moves_on(e: &LinkError) -> bool {
    match e {
        LinkError::Client(ClientError::Connect { .. })
        | LinkError::Client(ClientError::Tls(_))
        | LinkError::Client(ClientError::Http(_))
        | LinkError::Timeout => true,
        LinkError::Refused { status, .. } => *status == 503,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_are_split_deduplicated_and_checked() {
        let set = CaSet::new(&["https://a:1,https://b:2", " https://a:1 ", "https://c"]).unwrap();
        assert_eq!(set.describe(), "a:1,b:2,c:443");
        assert!(CaSet::new(&["https://a:1,http://b:2"]).is_err());
        assert!(CaSet::new::<&str>(&[]).is_err());
        assert!(CaSet::new(&[" , "]).is_err());
    }

    #[test]
    fn what_moves_on() {
        let refused = |status| LinkError::Refused {
            status,
            code: "x".into(),
            message: String::new(),
        };
        assert!(moves_on(&refused(503)));
        assert!(!moves_on(&refused(403)));
        assert!(!moves_on(&refused(409)));
        assert!(moves_on(&LinkError::Timeout));
        assert!(!moves_on(&LinkError::BadAnswer("x".into())));
        assert!(!moves_on(&LinkError::Client(ClientError::PinMismatch {
            expected: "a".into(),
            got: "b".into()
        })));
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_gives_each_and_the_last_good_comes_first() {
        let set = CaSet::new(&["https://127.0.0.1:7001", "https://127.0.0.2:7002"]).unwrap();
        let all = set.addresses().await.unwrap();
        assert_eq!(all.len(), 2);
        set.answered(all[1]);
        assert_eq!(set.addresses().await.unwrap(), vec![all[1], all[0]]);
        // `localhost` resolves here to 127.0.0.1 and, where IPv6 is configured, ::1: each is
        // a candidate.
        let named = CaSet::new(&["https://localhost:7003"]).unwrap();
        let addrs = named.addresses().await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 7003)
        );
        assert!(!addrs.is_empty());
    }
}
