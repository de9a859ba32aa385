//! Kubelet probes without plaintext holes. The kubelet probes in plaintext from the node, and a
//! captured port refuses plaintext (STRICT), so an app container's `httpGet` and `tcpSocket`
//! probes are rewritten to `GET /app-health/<container>/<livez|readyz|startupz>` on the
//! sidecar's admin port (never captured), and the sidecar gets the original probe
//! (`--app-probe`), which it runs against the app over the pod's loopback. The app's ports then
//! stay mTLS-only. The probe's timing fields are kept.
//!
//! Left as they are, with their port left out of inbound capture as before (pod.rs,
//! `probe_ports`): probes of another `host`, HTTPS probes and probes with `httpHeaders` (the
//! sidecar's probe sends neither TLS nor extra headers), and `grpc` probes (the sidecar would
//! have to speak the gRPC health protocol to the app; it does not).

use serde_norway::{Mapping, Value};

use super::containers::s;
use crate::settings::ADMIN_PORT;

const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Rewrites the probes of `spec.containers` that the sidecar can run; its `--app-probe` flags.
pub(super) fn rewrite(spec: &mut Mapping) -> Vec<String> {
    let mut flags = Vec::new();
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_sequence_mut) else {
        return flags;
    };
    for c in containers {
        let original = c.clone();
        let Some(cm) = c.as_mapping_mut() else {
            continue;
        };
        let Some(name) = original.get("name").and_then(Value::as_str) else {
            continue;
        };
        // Kubernetes container names are DNS labels; anything else is left alone rather than
        // put into a URL path.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            continue;
        }
        for (key, kind) in KINDS {
            let Some(probe) = cm.get_mut(key).and_then(Value::as_mapping_mut) else {
                continue;
            };
            let Some((handler, target)) = target(&original, probe) else {
                continue;
            };
            let rewritten = Value::Mapping(
                [
                    (s("path"), s(format!("/app-health/{name}/{kind}"))),
                    (s("port"), Value::Number(u64::from(ADMIN_PORT).into())),
                ]
                .into_iter()
                .collect(),
            );
            if handler == "httpGet" {
                // In place: the probe keeps its key order.
                probe.insert(s("httpGet"), rewritten);
            } else {
                probe.remove(handler);
                probe.insert(s("httpGet"), rewritten);
            }
            flags.push(format!("--app-probe={name}/{kind}={target}"));
        }
    }
    flags
}

/// The handler's key and the sidecar's target (`http:<port><path>`, `tcp:<port>`), when the
/// sidecar can run this probe.
fn target(container: &Value, probe: &Mapping) -> Option<(&'static str, String)> {
    let other_host = |h: &Value| {
        h.get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
    };
    if let Some(h) = probe.get("httpGet") {
        let plain = h
            .get("scheme")
            .and_then(Value::as_str)
            .is_none_or(|s| s == "HTTP");
        let headers = h
            .get("httpHeaders")
            .and_then(Value::as_sequence)
            .is_some_and(|l| !l.is_empty());
        if other_host(h) || !plain || headers {
            return None;
        }
        let port = super::resolve_port(container, h.get("port")?).ok()?;
        let path = h.get("path").and_then(Value::as_str).unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return None;
        }
        Some(("httpGet", format!("http:{port}{path}")))
    } else if let Some(t) = probe.get("tcpSocket") {
        if other_host(t) {
            return None;
        }
        let port = super::resolve_port(container, t.get("port")?).ok()?;
        Some(("tcpSocket", format!("tcp:{port}")))
    } else {
        None
    }
}
