//! The sidecar's one registry: the proxy's counters and the sidecar's own, encoded once as
//! OpenMetrics text. Traffic through a real pair of tunnels (loopback) moves the counters.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use identity::SpiffeId;
use integration::eventually_async;
use integration::pki::{Pki, now};
use proxy::{ExpectedPeer, IdentityHandle, Limits, Metrics, Policy};
use sidecar::admin::{self, AdminRefusals, Counters, QuitRefusal};
use sidecar::source::SourceMetrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SERVER: &str = "spiffe://example.test/server";
const CLIENT: &str = "spiffe://example.test/client";
const WAIT: Duration = Duration::from_secs(10);

/// Every family the sidecar exposes in explicit-tunnel mode, with its OpenMetrics type.
const FAMILIES: [(&str, &str); 10] = [
    ("kith_sidecar_connections", "counter"),
    ("kith_sidecar_active_connections", "gauge"),
    ("kith_sidecar_bytes", "counter"),
    ("kith_sidecar_handshake_seconds", "histogram"),
    ("kith_sidecar_tls_resumed", "counter"),
    ("kith_sidecar_handshakes", "counter"),
    ("kith_sidecar_pooled_connections", "counter"),
    ("kith_sidecar_svid_seconds_to_expiry", "gauge"),
    ("kith_sidecar_identity_updates", "counter"),
    ("kith_sidecar_admin_refused", "counter"),
];

/// The parsed exposition: family → type, and series (name with labels) → value. Panics on a
/// family described twice, a sample outside its family, or a missing `# EOF`.
fn parse(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, f64>) {
    let body = text.strip_suffix("# EOF\n").expect("ends in # EOF");
    let (mut families, mut series) = (BTreeMap::new(), BTreeMap::new());
    let mut current: Option<(String, String)> = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let dup = families.insert(name.to_owned(), kind.to_owned());
            assert!(dup.is_none(), "{name} described twice in\n{text}");
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let name = key.split('{').next().unwrap();
        let (family, kind) = current.as_ref().expect("a sample after its # TYPE");
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        assert!(
            suffixes.iter().any(|s| name == format!("{family}{s}")),
            "{line} is not in {family}"
        );
        let dup = series.insert(key.to_owned(), value.parse::<f64>().unwrap());
        assert!(dup.is_none(), "{key} twice");
    }
    (families, series)
}

async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                let _ = s.write_all(&buf).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn handle(pki: &Pki, id: &str) -> IdentityHandle {
    let h = IdentityHandle::new();
    h.publish(pki.svid(id), pki.bundle(), now()).unwrap();
    h
}

#[tokio::test]
async fn one_registry_encodes_every_family_once_and_counts_traffic() {
    let pki = Pki::new("example.test");
    let (server, client) = (handle(&pki, SERVER), handle(&pki, CLIENT));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();

    let backend = echo_backend().await;
    let (inbound, outbound) = (Arc::new(Metrics::default()), Arc::new(Metrics::default()));
    let in_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let in_addr = in_listener.local_addr().unwrap();
    tokio::spawn(proxy::serve_inbound(
        in_listener,
        server.clone(),
        Policy::new(pki.td.clone()),
        backend,
        Limits::default(),
        inbound.clone(),
        shutdown.clone(),
    ));
    let out_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out_addr = out_listener.local_addr().unwrap();
    tokio::spawn(proxy::serve_outbound(
        out_listener,
        client,
        in_addr.into(),
        ExpectedPeer::Id(SpiffeId::new(SERVER).unwrap()),
        Limits::default(),
        outbound.clone(),
        shutdown.clone(),
    ));

    let (source, refused) = (
        Arc::new(SourceMetrics::default()),
        Arc::new(AdminRefusals::default()),
    );
    let counters = Counters::Explicit(vec![
        ("orders".to_owned(), inbound.clone()),
        (String::new(), outbound.clone()),
    ]);
    let registry = admin::registry(counters, &server, &source, &refused);

    let (families, before) = parse(&admin::encode(&registry));
    let want: BTreeMap<String, String> = FAMILIES
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect();
    assert_eq!(families, want);

    let mut s = TcpStream::connect(out_addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    refused.count(QuitRefusal::Proxied);
    eventually_async("both ends closed and counted", WAIT, async || {
        inbound.inbound.bytes_from_tls() == 4 && outbound.outbound.bytes_to_tls() == 4
    })
    .await;

    let text = admin::encode(&registry);
    let (families, after) = parse(&text);
    assert_eq!(families, want);
    let inb = r#"tunnel="orders",direction="inbound""#;
    let outb = r#"direction="outbound""#;
    for (series, moved_by) in [
        (
            format!("kith_sidecar_connections_total{{{inb},result=\"accepted\"}}"),
            1.0,
        ),
        (
            format!("kith_sidecar_connections_total{{{outb},result=\"accepted\"}}"),
            1.0,
        ),
        (
            format!("kith_sidecar_bytes_total{{{inb},side=\"from_tls\"}}"),
            4.0,
        ),
        (
            format!("kith_sidecar_bytes_total{{{outb},side=\"to_tls\"}}"),
            4.0,
        ),
        (
            format!("kith_sidecar_handshake_seconds_count{{{inb}}}"),
            1.0,
        ),
        (
            format!("kith_sidecar_handshake_seconds_bucket{{le=\"+Inf\",{outb}}}"),
            1.0,
        ),
        (
            "kith_sidecar_admin_refused_total{reason=\"proxied\"}".to_owned(),
            1.0,
        ),
    ] {
        let (b, a) = (before.get(&series), after.get(&series));
        assert_eq!(
            a.zip(b).map(|(a, b)| a - b),
            Some(moved_by),
            "{series} in\n{text}"
        );
    }
    let expiry = format!("kith_sidecar_svid_seconds_to_expiry{{spiffe_id=\"{SERVER}\"}}");
    assert!(after[&expiry] > 0.0, "{text}");
    assert_eq!(
        after[r#"kith_sidecar_identity_updates_total{result="failed"}"#],
        0.0
    );
}
