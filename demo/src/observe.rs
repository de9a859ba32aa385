//! What the demo learns from its children, only through what an operator can see too: their
//! JSON log lines (`--log-format json`, `RUST_LOG=info,proxy=debug` for the sidecars) and the
//! sidecars' Prometheus `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A log line the demo cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `kith ca serve` is up: its API and metrics addresses as bound.
    CaServing {
        api: SocketAddr,
        metrics: SocketAddr,
    },
    /// A sidecar's mTLS connection (proxy, debug): who the peer is and what was negotiated.
    Established {
        direction: String,
        peer: String,
        tls: String,
        suite: String,
    },
    /// The inbound policy refused a verified peer.
    NotAuthorized { id: String, port: Option<u16> },
    /// A connection refused by a sidecar, with the reason its metrics count it under.
    Refused { direction: String, reason: String },
    /// A sidecar published an SVID (version 1 is the first).
    Published { id: String, version: u64 },
    /// A warning or error, shown as it is.
    Problem { message: String },
}

/// Parses one JSON log line of a `kith` component.
pub fn parse_line(line: &str) -> Option<LogEvent> {
    let v: Value = serde_json::from_str(line).ok()?;
    let f = &v["fields"];
    let text = |k: &str| f[k].as_str().map(str::to_owned);
    let event = match f["message"].as_str()? {
        "kith ca serving" => LogEvent::CaServing {
            api: text("api")?.parse().ok()?,
            metrics: text("metrics")?.parse().ok()?,
        },
        identity::mesh::events::MTLS_ESTABLISHED => LogEvent::Established {
            direction: text("direction")?,
            peer: text("peer")?,
            tls: tls_version(&text("tls").unwrap_or_default()),
            suite: unwrap_some(&text("suite").unwrap_or_default()).to_owned(),
        },
        "inbound connection not authorized" => {
            // proxy::Denied: "<id> is not allowed to port <port>".
            let denied = text("denied")?;
            let (id, port) = match denied.split_once(" is not allowed to port ") {
                Some((id, port)) => (id.to_owned(), port.trim().parse().ok()),
                None => (denied, None),
            };
            LogEvent::NotAuthorized { id, port }
        }
        // proxy::refusal: every refusal, rate-limited per reason.
        "connection refused" => LogEvent::Refused {
            direction: text("direction")?,
            reason: text("reason")?,
        },
        "identity published" => LogEvent::Published {
            id: text("id")?,
            version: f["version"].as_u64()?,
        },
        _ if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) => LogEvent::Problem {
            message: readable(line),
        },
        _ => return None,
    };
    Some(event)
}

/// A JSON log line as `LEVEL message key=value …`; any other line as it is.
pub fn readable(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    let mut out = format!(
        "{} {}",
        v["level"].as_str().unwrap_or("?"),
        v["fields"]["message"].as_str().unwrap_or("")
    );
    if let Some(fields) = v["fields"].as_object() {
        for (k, val) in fields.iter().filter(|(k, _)| *k != "message") {
            let val = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let val: String = val.chars().take(160).collect();
            out.push_str(&format!(" {k}={val}"));
        }
    }
    out
}

/// `Some(TLSv1_3)` or `TLSv1_3` (rustls' Debug) as `TLSv1.3`.
fn tls_version(raw: &str) -> String {
    let v = unwrap_some(raw);
    match v.strip_prefix("TLSv") {
        Some(rest) => format!("TLSv{}", rest.replace('_', ".")),
        None => v.to_owned(),
    }
}

fn unwrap_some(raw: &str) -> &str {
    raw.strip_prefix("Some(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(raw)
}

/// One read of a sidecar's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scrape {
    /// The SPIFFE ID of the SVID the sidecar holds, and its seconds to expiry.
    pub svid: Option<(String, i64)>,
    /// `kith_sidecar_identity_updates_total{result="ok"}`: SVIDs published, the first included.
    pub updates_ok: u64,
    /// Inbound refusals by reason (`kith_sidecar_connections_total{direction="inbound"}`).
    pub inbound_refused: BTreeMap<String, u64>,
}

pub fn parse_metrics(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let label = |key: &str| {
            let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
            let len = labels[start..].find('"')?;
            Some(labels[start..start + len].to_owned())
        };
        match name {
            "kith_sidecar_svid_seconds_to_expiry" => {
                if let (Some(id), Ok(left)) = (label("spiffe_id"), value.parse()) {
                    s.svid = Some((id, left));
                }
            }
            "kith_sidecar_identity_updates_total" if label("result").as_deref() == Some("ok") => {
                s.updates_ok = value.parse().unwrap_or(0);
            }
            "kith_sidecar_connections_total"
                if label("direction").as_deref() == Some("inbound") =>
            {
                let n: u64 = value.parse().unwrap_or(0);
                if let Some(result) = label("result").filter(|r| r != "accepted" && n > 0) {
                    *s.inbound_refused.entry(result).or_default() += n;
                }
            }
            _ => {}
        }
    }
    s
}

/// The value of the series `name` (no labels) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET /metrics` at a sidecar's admin address.
pub async fn scrape(admin: SocketAddr) -> Option<Scrape> {
    let (status, body) = http_get(admin, "/metrics").await?;
    (status == 200).then(|| parse_metrics(&body))
}

/// A one-shot HTTP/1.1 GET with `Connection: close`, within one second: the status and body.
/// Plain enough to need no client library (admin and health endpoints only).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_lines_give_peer_version_and_suite() {
        let line = r#"{"timestamp":"2026-11-27T10:49:43Z","level":"DEBUG","fields":{"message":"mTLS connection established","direction":"outbound","peer":"spiffe://demo.kith/api","tls":"Some(TLSv1_3)","suite":"Some(TLS13_AES_256_GCM_SHA384)"},"target":"proxy::tunnel"}"#;
        assert_eq!(
            parse_line(line),
            Some(LogEvent::Established {
                direction: "outbound".into(),
                peer: "spiffe://demo.kith/api".into(),
                tls: "TLSv1.3".into(),
                suite: "TLS13_AES_256_GCM_SHA384".into(),
            })
        );
    }

    #[test]
    fn refusals_give_the_denied_id_and_the_reason() {
        let denied = r#"{"level":"DEBUG","fields":{"message":"inbound connection not authorized","denied":"spiffe://demo.kith/intruder is not allowed to port 40411"}}"#;
        assert_eq!(
            parse_line(denied),
            Some(LogEvent::NotAuthorized {
                id: "spiffe://demo.kith/intruder".into(),
                port: Some(40411),
            })
        );
        let refused = r#"{"level":"INFO","fields":{"message":"connection refused","direction":"inbound","peer":"127.0.0.1:40000","reason":"not_authorized","peer_id":"spiffe://demo.kith/intruder"}}"#;
        assert_eq!(
            parse_line(refused),
            Some(LogEvent::Refused {
                direction: "inbound".into(),
                reason: "not_authorized".into(),
            })
        );
    }

    #[test]
    fn the_ca_line_gives_its_bound_addresses_and_noise_is_ignored() {
        let serving = r#"{"level":"INFO","fields":{"message":"kith ca serving","api":"127.0.0.1:41000","metrics":"127.0.0.1:41001"}}"#;
        assert!(matches!(
            parse_line(serving),
            Some(LogEvent::CaServing { api, .. }) if api.port() == 41000
        ));
        assert_eq!(parse_line("not json"), None);
        assert_eq!(
            parse_line(r#"{"level":"INFO","fields":{"message":"something else"}}"#),
            None
        );
        assert!(matches!(
            parse_line(r#"{"level":"WARN","fields":{"message":"retrying","error":"refused"}}"#),
            Some(LogEvent::Problem { message }) if message == "WARN retrying error=refused"
        ));
    }

    #[test]
    fn metrics_give_the_svid_updates_and_inbound_refusals() {
        let text = "\
# TYPE kith_sidecar_connections_total counter
kith_sidecar_connections_total{direction=\"inbound\",result=\"accepted\"} 40
kith_sidecar_connections_total{direction=\"inbound\",result=\"not_authorized\"} 3
kith_sidecar_connections_total{direction=\"inbound\",result=\"handshake_failed\"} 0
kith_sidecar_connections_total{direction=\"outbound\",result=\"peer_refused\"} 2
kith_sidecar_svid_seconds_to_expiry{spiffe_id=\"spiffe://demo.kith/api\"} 17
kith_sidecar_identity_updates_total{result=\"ok\"} 3
kith_sidecar_identity_updates_total{result=\"failed\"} 0
";
        let s = parse_metrics(text);
        assert_eq!(s.svid, Some(("spiffe://demo.kith/api".into(), 17)));
        assert_eq!(s.updates_ok, 3);
        assert_eq!(
            s.inbound_refused,
            BTreeMap::from([("not_authorized".to_owned(), 3)])
        );
    }
}
