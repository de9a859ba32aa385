//! The app's kubelet probes, performed by the sidecar (`--app-probe`): the injector rewrites a
//! container's `httpGet`/`tcpSocket` probes of captured ports to `GET
//! /app-health/<container>/<livez|readyz|startupz>` on the sidecar's admin port, so the app's
//! ports stay mTLS-only, and the sidecar runs the original probe against the app over the pod's
//! loopback. The answer is 200 when the app's is (HTTP 200–399, or a TCP connect), else 503
//! with the reason.
//!
//! `--app-probe <container>/<kind>=http:<port><path>` or `…=tcp:<port>`, repeatable.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hyper::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The longest a probe may take; the kubelet's own timeout (1 s by default) usually ends first.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most of the app's answer read: the status line is all that counts.
const MAX_HEAD: usize = 4096;

/// A `--app-probe` flag that cannot be used, and how to write it.
#[derive(Debug, thiserror::Error)]
pub enum AppProbeError {
    #[error("--app-probe {0:?}: write <container>/<kind>=http:<port><path> or =tcp:<port>")]
    Syntax(String),
    #[error(
        "--app-probe {0:?}: the name must be <container>/<livez|readyz|startupz> with a \
         Kubernetes container name"
    )]
    Name(String),
    #[error("--app-probe {flag:?}: {port:?} is not a port (1-65535)")]
    Port { flag: String, port: String },
    #[error("--app-probe {0:?}: the path has spaces or control characters")]
    Path(String),
    #[error("--app-probe {0:?}: the target must start with http: or tcp:")]
    Scheme(String),
    #[error("--app-probe {flag:?}: {name} is given twice")]
    Twice { flag: String, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

/// The probes by name (`<container>/<kind>`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AppProbes(BTreeMap<String, Target>);

impl AppProbes {
    pub fn parse<'a>(flags: impl IntoIterator<Item = &'a str>) -> Result<Self, AppProbeError> {
        let mut out = BTreeMap::new();
        for flag in flags {
            let (name, target) = parse_one(flag)?;
            if out.insert(name.clone(), target).is_some() {
                return Err(AppProbeError::Twice {
                    flag: flag.to_owned(),
                    name,
                });
            }
        }
        Ok(Self(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The answer to `GET /app-health/<name>`.
    pub async fn check(&self, name: &str) -> (StatusCode, String) {
        let Some(target) = self.0.get(name) else {
            return (
                StatusCode::NOT_FOUND,
                format!("no app probe named {:?}\n", name.escape_debug().to_string()),
            );
        };
        match tokio::time::timeout(TIMEOUT, run(target)).await {
            Ok(Ok(())) => (StatusCode::OK, "ok\n".to_owned()),
            Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no answer within {TIMEOUT:?}\n"),
            ),
        }
    }
}

fn parse_one(flag: &str) -> Result<(String, Target), AppProbeError> {
    let Some((name, target)) = flag.split_once('=') else {
        return Err(AppProbeError::Syntax(flag.to_owned()));
    };
    let valid_name = name.split_once('/').is_some_and(|(c, k)| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && ["livez", "readyz", "startupz"].contains(&k)
    });
    if !valid_name {
        return Err(AppProbeError::Name(flag.to_owned()));
    }
    let port = |p: &str| -> Result<u16, AppProbeError> {
        match p.parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(AppProbeError::Port {
                flag: flag.to_owned(),
                port: p.to_owned(),
            }),
        }
    };
    let target = if let Some(rest) = target.strip_prefix("http:") {
        let (p, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(AppProbeError::Path(flag.to_owned()));
        }
        Target::Http {
            port: port(p)?,
            path: path.to_owned(),
        }
    } else if let Some(p) = target.strip_prefix("tcp:") {
        Target::Tcp { port: port(p)? }
    } else {
        return Err(AppProbeError::Scheme(flag.to_owned()));
    };
    Ok((name.to_owned(), target))
}

async fn run(target: &Target) -> Result<(), String> {
    let port = match target {
        Target::Http { port, .. } | Target::Tcp { port } => *port,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let Target::Http { path, .. } = target else {
        return Ok(());
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: kith-probe\r\nconnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("GET {path} on {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {path} on {addr}: no HTTP answer"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {path} on {addr}: HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_ones_say_why() {
        let p =
            AppProbes::parse(["web/readyz=http:8081/healthz?x=1", "web/livez=tcp:8080"]).unwrap();
        assert_eq!(
            p.0["web/readyz"],
            Target::Http {
                port: 8081,
                path: "/healthz?x=1".into()
            }
        );
        assert_eq!(p.0["web/livez"], Target::Tcp { port: 8080 });
        for (bad, why) in [
            ("web/readyz", "write <container>"),
            ("web/ready=tcp:1", "livez|readyz|startupz"),
            ("Web/readyz=tcp:1", "container name"),
            ("web/readyz=tcp:0", "not a port"),
            ("web/readyz=udp:53", "http: or tcp:"),
            ("web/readyz=http:80/a b", "spaces"),
        ] {
            let err = AppProbes::parse([bad]).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let twice = AppProbes::parse(["a/livez=tcp:1", "a/livez=tcp:2"]).unwrap_err();
        assert!(twice.to_string().contains("twice"), "{twice}");
    }

    #[tokio::test]
    async fn the_probe_reports_the_apps_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&req[..n]).into_owned();
                let status = if req.starts_with("GET /ok ") {
                    "204 No Content"
                } else {
                    "500 Oops"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = AppProbes::parse(
            [
                format!("a/readyz=http:{port}/ok"),
                format!("a/livez=http:{port}/broken"),
                format!("a/startupz=tcp:{port}"),
                format!("b/livez=tcp:{closed}"),
            ]
            .iter()
            .map(String::as_str),
        )
        .unwrap();
        assert_eq!(p.check("a/readyz").await.0, StatusCode::OK);
        assert_eq!(p.check("a/startupz").await.0, StatusCode::OK);
        let (status, why) = p.check("a/livez").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(why.contains("HTTP 500"), "{why}");
        let (status, why) = p.check("b/livez").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(why.contains("connect"), "{why}");
        assert_eq!(p.check("c/livez").await.0, StatusCode::NOT_FOUND);
    }
}
