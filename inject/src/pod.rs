//! The injection itself, on one pod template (a mapping with `metadata` and `spec`, which is
//! also what a Pod is): whether to inject, and then the capture init container, the native
//! sidecar, their volumes and the annotation that records them.
//!
//! Everything else in the template is left as it was, in its order.
//!
//! Why this is one file of over 500 lines: the mutation of one pod template: every container,
//! volume and annotation the injector adds, and the refusals for pods it must not touch, in the
//! order the patch applies them.

use serde::Serialize;
use serde_norway::{Mapping, Value};

use crate::settings::{
    ADMIN_PORT, BUNDLE_VOLUME, Cidr, EXCLUDE_CIDRS_KEY, EXCLUDE_INBOUND_KEY, EXCLUDE_OUTBOUND_KEY,
    INBOUND_PORT, INIT_CONTAINER, INJECT_KEY, OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID,
    STATUS_KEY, Settings, TOKEN_VOLUME, VERSION, XTABLES_VOLUME,
};

mod annotations;
mod containers;
mod probes;

pub use annotations::{ALLOW_KEY, EXPECT_IDS_KEY, MODE_KEY, OUTBOUND_POLICY_KEY, WORKERS_KEY};

use containers::{init_container, proxy_container, s, volumes};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("{path} is not a {expected}")]
    WrongShape {
        path: &'static str,
        expected: &'static str,
    },
    #[error("spec.containers is missing or empty: a pod needs at least one container")]
    NoContainers,
    #[error("{place} {INJECT_KEY} must be \"enabled\" or \"disabled\", not {value:?}")]
    BadInjectValue { place: &'static str, value: String },
    #[error("annotation {key}: {reason}")]
    BadAnnotation { key: &'static str, reason: String },
    #[error(
        "the pod already has a {what} named {name:?} but no {STATUS_KEY} annotation; rename it, \
         or opt the pod out with {INJECT_KEY}: disabled"
    )]
    NameTaken {
        what: &'static str,
        name: &'static str,
    },
    #[error(
        "container {container} declares port {port}, which kith's sidecar uses in the pod's \
         network namespace (15001, 15006, 15020); move the app, or opt the pod out"
    )]
    PortTaken { container: String, port: u64 },
    #[error(
        "container {container} runs as {what} {PROXY_UID}, the proxy's: capture exempts the \
         proxy's UID and GID, so this container could bypass mTLS and egress policy; run it as \
         another {what}, or opt the pod out"
    )]
    ProxyIdentity {
        container: String,
        what: &'static str,
    },
    #[error(
        "container {container} {why}: with SETUID and SETGID it could switch to the proxy's UID \
         and GID ({PROXY_UID}) and bypass capture; kith drops both from every app container, so \
         remove that, or opt the pod out"
    )]
    SetIdCapability { container: String, why: String },
}

impl InjectError {
    /// A stable snake_case label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            InjectError::WrongShape { .. } | InjectError::NoContainers => "malformed_pod",
            InjectError::BadInjectValue { .. } | InjectError::BadAnnotation { .. } => {
                "bad_annotation"
            }
            InjectError::NameTaken { .. } => "name_taken",
            InjectError::PortTaken { .. } => "port_taken",
            InjectError::ProxyIdentity { .. } => "proxy_identity",
            InjectError::SetIdCapability { .. } => "setid_capability",
        }
    }
}

/// Why a template was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    AlreadyInjected,
    OptedOut,
    NotOptedIn,
    HostNetwork,
}

impl Skip {
    /// A stable snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "already_injected",
            Skip::OptedOut => "opted_out",
            Skip::NotOptedIn => "not_opted_in",
            Skip::HostNetwork => "host_network",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Skip::AlreadyInjected => "already injected (kith.dev/status is set)",
            Skip::OptedOut => "opted out (kith.dev/inject: disabled)",
            Skip::NotOptedIn => {
                "not opted in (set the label or annotation kith.dev/inject: enabled, or pass --all)"
            }
            Skip::HostNetwork => {
                "uses hostNetwork: capture would rewrite the node's own nat table, so kith never injects it"
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected { warnings: Vec<String> },
    Skipped(Skip),
}

/// Injects kith into `template` unless it opts out, is already injected or uses the host's
/// network. A template that says nothing is injected when `by_default` (the webhook, whose
/// selectors already chose the pod; `--all` offline).
pub fn inject(
    template: &mut Value,
    settings: &Settings,
    by_default: bool,
) -> Result<Outcome, InjectError> {
    let template = template.as_mapping_mut().ok_or(InjectError::WrongShape {
        path: "the pod template",
        expected: "mapping",
    })?;
    if let Some(skip) = skip_reason(template, by_default)? {
        return Ok(Outcome::Skipped(skip));
    }
    let annotations = annotations(template);
    let exclusions = Exclusions::from_annotations(annotations.as_ref())?;
    let mut sidecar_args = annotations::sidecar_args(annotations.as_ref())?;

    let spec = child_mapping(template, "spec", "spec")?;
    if spec
        .get("containers")
        .and_then(Value::as_sequence)
        .is_none_or(Vec::is_empty)
    {
        return Err(InjectError::NoContainers);
    }
    check_names_free(spec)?;
    check_ports_free(spec)?;
    check_not_proxy_identity(spec)?;
    drop_setid_capabilities(spec)?;
    sidecar_args.extend(probes::rewrite(spec));
    let (mut probe_ports, warnings) = probe_ports(spec);
    // The rewritten probes go to the sidecar's admin port, which is never captured.
    probe_ports.retain(|p| *p != ADMIN_PORT);
    let mut not_captured = vec![ADMIN_PORT];
    not_captured.extend(&exclusions.inbound);
    not_captured.extend(&probe_ports);
    not_captured.sort_unstable();
    not_captured.dedup();

    let init = child_sequence(spec, "initContainers", "spec.initContainers")?;
    init.insert(0, proxy_container(settings, &sidecar_args));
    init.insert(0, init_container(settings, &not_captured, &exclusions));
    let added = volumes(settings);
    let volume_names: Vec<&str> = VOLUME_NAMES
        .into_iter()
        .filter(|n| {
            added
                .iter()
                .any(|v| v.get("name").and_then(Value::as_str) == Some(n))
        })
        .collect();
    child_sequence(spec, "volumes", "spec.volumes")?.extend(added);

    let status = Status {
        version: VERSION,
        image: &settings.image,
        init_image: &settings.init_image,
        init_containers: [INIT_CONTAINER, PROXY_CONTAINER],
        volumes: &volume_names,
        inbound_ports_not_captured: &not_captured,
        probe_ports: &probe_ports,
    };
    let status = serde_json::to_string(&status).unwrap_or_default();
    let meta = child_mapping(template, "metadata", "metadata")?;
    child_mapping(meta, "annotations", "metadata.annotations")?.insert(s(STATUS_KEY), s(status));
    Ok(Outcome::Injected { warnings })
}

const VOLUME_NAMES: [&str; 3] = [TOKEN_VOLUME, BUNDLE_VOLUME, XTABLES_VOLUME];

/// What `kith.dev/status` records.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    version: &'a str,
    image: &'a str,
    init_image: &'a str,
    init_containers: [&'a str; 2],
    volumes: &'a [&'a str],
    inbound_ports_not_captured: &'a [u16],
    probe_ports: &'a [u16],
}

/// `None` when the template is to be injected.
fn skip_reason(template: &Mapping, by_default: bool) -> Result<Option<Skip>, InjectError> {
    let meta = template.get("metadata");
    if string_at(meta, &["annotations", STATUS_KEY]).is_some() {
        return Ok(Some(Skip::AlreadyInjected));
    }
    // The label wins over the annotation: it is what the webhook's selectors see.
    let wish = match string_at(meta, &["labels", INJECT_KEY]) {
        Some(v) => Some(parse_wish("label", v)?),
        None => match string_at(meta, &["annotations", INJECT_KEY]) {
            Some(v) => Some(parse_wish("annotation", v)?),
            None => None,
        },
    };
    match wish {
        Some(false) => return Ok(Some(Skip::OptedOut)),
        None if !by_default => return Ok(Some(Skip::NotOptedIn)),
        _ => {}
    }
    let host_network = template
        .get("spec")
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(host_network.then_some(Skip::HostNetwork))
}

fn parse_wish(place: &'static str, value: &str) -> Result<bool, InjectError> {
    match value {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        other => Err(InjectError::BadInjectValue {
            place,
            value: other.to_owned(),
        }),
    }
}

fn annotations(template: &Mapping) -> Option<Mapping> {
    template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .cloned()
}

/// The pod's own exclusions from capture, from its annotations.
#[derive(Debug, Default, PartialEq, Eq)]
struct Exclusions {
    inbound: Vec<u16>,
    outbound: Vec<u16>,
    cidrs: Vec<Cidr>,
}

impl Exclusions {
    fn from_annotations(annotations: Option<&Mapping>) -> Result<Self, InjectError> {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
        Ok(Self {
            inbound: parse_ports(EXCLUDE_INBOUND_KEY, get(EXCLUDE_INBOUND_KEY))?,
            outbound: parse_ports(EXCLUDE_OUTBOUND_KEY, get(EXCLUDE_OUTBOUND_KEY))?,
            cidrs: parse_cidrs(get(EXCLUDE_CIDRS_KEY))?,
        })
    }
}

/// "8080, 9090" -> [8080, 9090]; empty items are ignored.
fn parse_ports(key: &'static str, value: Option<&str>) -> Result<Vec<u16>, InjectError> {
    let items = value.unwrap_or("").split(',').map(str::trim);
    items
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| InjectError::BadAnnotation {
                    key,
                    reason: format!(
                        "{i:?} is not a port (1-65535); write ports separated by commas"
                    ),
                })
        })
        .collect()
}

fn parse_cidrs(value: Option<&str>) -> Result<Vec<Cidr>, InjectError> {
    let items = value.unwrap_or("").split(',').map(str::trim);
    items
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.parse::<Cidr>()
                .map_err(|reason| InjectError::BadAnnotation {
                    key: EXCLUDE_CIDRS_KEY,
                    reason,
                })
        })
        .collect()
}

/// The containers and volumes kith adds must not collide with the pod's own.
fn check_names_free(spec: &Mapping) -> Result<(), InjectError> {
    let names = |key: &str| -> Vec<String> {
        spec.get(key)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let containers: Vec<String> = [names("containers"), names("initContainers")].concat();
    for name in [INIT_CONTAINER, PROXY_CONTAINER] {
        if containers.iter().any(|c| c == name) {
            return Err(InjectError::NameTaken {
                what: "container",
                name,
            });
        }
    }
    let volumes = names("volumes");
    for name in VOLUME_NAMES {
        if volumes.iter().any(|v| v == name) {
            return Err(InjectError::NameTaken {
                what: "volume",
                name,
            });
        }
    }
    Ok(())
}

/// The app must not listen where the sidecar does: one of them would fail to bind.
fn check_ports_free(spec: &Mapping) -> Result<(), InjectError> {
    const SIDECAR_PORTS: [u64; 3] = [OUTBOUND_PORT as u64, INBOUND_PORT as u64, ADMIN_PORT as u64];
    for list in ["containers", "initContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let ports = c
                .get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten();
            for port in ports.filter_map(|p| p.get("containerPort").and_then(Value::as_u64)) {
                if SIDECAR_PORTS.contains(&port) {
                    let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
                    return Err(InjectError::PortTaken {
                        container: name.to_owned(),
                        port,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The ports the kubelet probes (httpGet, tcpSocket, grpc) on the pod's IP, and warnings for
/// probe ports that name no declared port.
///
/// SECURITY: under STRICT mode a captured port refuses the kubelet's plaintext probes, so these
/// ports are left out of inbound capture: they accept plaintext from anywhere in the cluster.
/// Apps that serve their probes on a port of their own keep every other port in the mesh.
fn probe_ports(spec: &Mapping) -> (Vec<u16>, Vec<String>) {
    let mut ports = Vec::new();
    let mut warnings = Vec::new();
    for list in ["containers", "initContainers"] {
        for container in spec
            .get(list)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let Some(probe) = container.get(probe) else {
                    continue;
                };
                for handler in ["httpGet", "tcpSocket", "grpc"] {
                    let Some(h) = probe.get(handler) else {
                        continue;
                    };
                    // A probe of another host does not come to this pod's ports.
                    if h.get("host")
                        .and_then(Value::as_str)
                        .is_some_and(|h| !h.is_empty())
                    {
                        continue;
                    }
                    match h.get("port").map(|p| resolve_port(container, p)) {
                        Some(Ok(port)) => ports.push(port),
                        Some(Err(w)) => warnings.push(w),
                        None => {}
                    }
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    (ports, warnings)
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> Result<u16, String> {
    let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
    if let Some(p) = port.as_u64().and_then(|p| u16::try_from(p).ok()) {
        return Ok(p);
    }
    let Some(port_name) = port.as_str() else {
        return Err(format!(
            "container {name}: a probe port is neither a number nor a name"
        ));
    };
    if let Ok(p) = port_name.parse::<u16>() {
        return Ok(p);
    }
    container
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(port_name))
        .and_then(|p| p.get("containerPort"))
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| {
            format!(
                "container {name}: probe port {port_name:?} names no declared port, so it stays captured and the probe will fail under STRICT mode"
            )
        })
}

/// SECURITY: capture exempts what runs as the proxy's UID and GID; an app container (or one
/// of the pod's own init containers, which run after capture is installed) must run as
/// neither. The container's own securityContext wins over the pod's.
fn check_not_proxy_identity(spec: &Mapping) -> Result<(), InjectError> {
    let proxy = u64::from(PROXY_UID);
    let pod = spec.get("securityContext");
    for list in ["containers", "initContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for (key, what) in [("runAsUser", "UID"), ("runAsGroup", "GID")] {
                let id = c
                    .get("securityContext")
                    .and_then(|sc| sc.get(key))
                    .or_else(|| pod.and_then(|sc| sc.get(key)))
                    .and_then(Value::as_u64);
                if id == Some(proxy) {
                    return Err(InjectError::ProxyIdentity {
                        container: container_name(c),
                        what,
                    });
                }
            }
        }
    }
    Ok(())
}

fn container_name(c: &Value) -> String {
    c.get("name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

/// SECURITY: an app that keeps CAP_SETUID and CAP_SETGID (root's default) can become the
/// proxy's UID and GID and leave capture. Adds SETUID and SETGID to every app container's
/// `capabilities.drop` (unless it drops ALL); refuses a container that is privileged or adds
/// either back.
fn drop_setid_capabilities(spec: &mut Mapping) -> Result<(), InjectError> {
    for list in ["containers", "initContainers"] {
        let Some(seq) = spec.get_mut(list).and_then(Value::as_sequence_mut) else {
            continue;
        };
        for c in seq.iter_mut() {
            let name = container_name(c);
            let Some(c) = c.as_mapping_mut() else {
                continue;
            };
            let refuse = |why: String| InjectError::SetIdCapability {
                container: name.clone(),
                why,
            };
            let sc = child_mapping(c, "securityContext", "a container's securityContext")?;
            if sc.get("privileged").and_then(Value::as_bool) == Some(true) {
                return Err(refuse("is privileged (all capabilities)".into()));
            }
            let caps = child_mapping(sc, "capabilities", "a container's capabilities")?;
            let names = |v: Option<&Value>| -> Vec<String> {
                v.and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|n| n.trim_start_matches("CAP_").to_ascii_uppercase())
                    .collect()
            };
            if let Some(bad) = names(caps.get("add"))
                .into_iter()
                .find(|n| matches!(n.as_str(), "SETUID" | "SETGID" | "ALL"))
            {
                return Err(refuse(format!("adds the capability {bad}")));
            }
            let dropped = names(caps.get("drop"));
            if dropped.iter().any(|n| n == "ALL") {
                continue;
            }
            let drop = child_sequence(caps, "drop", "a container's capabilities.drop")?;
            for cap in ["SETUID", "SETGID"] {
                if !dropped.iter().any(|n| n == cap) {
                    drop.push(s(cap));
                }
            }
        }
    }
    Ok(())
}

/// The mapping under `key`, created when absent or null.
fn child_mapping<'a>(
    parent: &'a mut Mapping,
    key: &str,
    path: &'static str,
) -> Result<&'a mut Mapping, InjectError> {
    let slot = parent.entry(s(key)).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut().ok_or(InjectError::WrongShape {
        path,
        expected: "mapping",
    })
}

/// The sequence under `key`, created when absent or null.
fn child_sequence<'a>(
    parent: &'a mut Mapping,
    key: &str,
    path: &'static str,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let slot = parent.entry(s(key)).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut().ok_or(InjectError::WrongShape {
        path,
        expected: "list",
    })
}

/// The string at a path of mapping keys, if every step is there.
fn string_at<'a>(root: Option<&'a Value>, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(root?, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_norway::from_str(text).unwrap()
    }

    const APP: &str = r#"
metadata:
  labels: {app: web, kith.dev/inject: enabled}
spec:
  initContainers:
  - name: migrate
    image: migrate:1
  containers:
  - name: web
    image: web:1
    ports:
    - {name: http, containerPort: 8080}
"#;

    fn injected(text: &str) -> (Value, Vec<String>) {
        let mut v = yaml(text);
        match inject(&mut v, &Settings::default(), false).unwrap() {
            Outcome::Injected { warnings } => (v, warnings),
            other => panic!("not injected: {other:?}"),
        }
    }

    fn init_names(v: &Value) -> Vec<&str> {
        v["spec"]["initContainers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    fn args(container: &Value) -> Vec<&str> {
        container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    fn status(v: &Value) -> serde_json::Value {
        serde_json::from_str(v["metadata"]["annotations"][STATUS_KEY].as_str().unwrap()).unwrap()
    }

    #[test]
    fn capture_and_the_native_sidecar_come_before_the_pods_own_init_containers() {
        let (v, warnings) = injected(APP);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(init_names(&v), ["kith-init", "kith-proxy", "migrate"]);
        let proxy = &v["spec"]["initContainers"][1];
        assert_eq!(proxy["command"], yaml("[kith]"));
        assert_eq!(v["spec"]["initContainers"][0]["command"], yaml("[kith]"));
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
        assert_eq!(
            args(proxy),
            [
                "sidecar",
                "run",
                "--k8s-token-file=/var/run/secrets/kith/token",
                "--ca=https://kith-ca.kith-system.svc:8443",
                "--bundle=/etc/kith/bundle/bundle.pem",
                "--mesh-cidr=10.0.0.0/8",
                "--admin-listen=0.0.0.0:15020",
                "--log-format=json",
            ]
        );
        // The app's containers are untouched but for the drop of SETUID and SETGID.
        let mut app = yaml(APP)["spec"]["containers"].clone();
        app[0].as_mapping_mut().unwrap().insert(
            s("securityContext"),
            yaml("capabilities: {drop: [SETUID, SETGID]}"),
        );
        assert_eq!(v["spec"]["containers"], app);
    }

    #[test]
    fn the_sidecar_runs_as_1337_non_root_read_only_without_capabilities() {
        let (v, _) = injected(APP);
        let sc = &v["spec"]["initContainers"][1]["securityContext"];
        assert_eq!(sc["runAsUser"], 1337);
        assert_eq!(sc["runAsGroup"], 1337);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["capabilities"], yaml("drop: [ALL]"));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        let res = &v["spec"]["initContainers"][1]["resources"];
        assert!(res["requests"]["cpu"].is_string() && res["limits"]["memory"].is_string());
    }

    #[test]
    fn the_init_container_gets_net_admin_and_net_raw_and_nothing_else() {
        let (v, _) = injected(APP);
        let init = &v["spec"]["initContainers"][0];
        let sc = &init["securityContext"];
        assert_eq!(
            sc["capabilities"],
            yaml("{add: [NET_ADMIN, NET_RAW], drop: [ALL]}")
        );
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["runAsNonRoot"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            args(init),
            [
                "sidecar",
                "init",
                "--proxy-uid=1337",
                "--proxy-gid=1337",
                "--outbound-port=15001",
                "--inbound-port=15006",
                "--exclude-inbound-ports=15020",
            ]
        );
    }

    #[test]
    fn volumes_carry_the_kith_ca_token_and_the_bundle() {
        let (v, _) = injected(APP);
        let vols = v["spec"]["volumes"].as_sequence().unwrap();
        assert_eq!(
            vols[0],
            yaml(
                "{name: kith-token, projected: {sources: [{serviceAccountToken: \
                 {audience: kith-ca, expirationSeconds: 3600, path: token}}]}}"
            )
        );
        assert_eq!(
            vols[1],
            yaml("{name: kith-bundle, configMap: {name: kith-bundle}}")
        );
        assert_eq!(vols[2]["name"], "kith-xtables");
    }

    #[test]
    fn with_a_bundle_pin_the_sidecar_fetches_the_bundle_and_no_configmap_is_mounted() {
        let pin = "ab".repeat(32);
        let settings = Settings {
            bundle_sha256: Some(pin.clone()),
            ..Settings::default()
        };
        let mut v = yaml(APP);
        inject(&mut v, &settings, false).unwrap();
        let proxy = &v["spec"]["initContainers"][1];
        let a = args(proxy);
        assert!(
            a.contains(&format!("--bundle-sha256={pin}").as_str()),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| x.starts_with("--bundle=")), "{a:?}");
        let names = |list: &Value| -> Vec<String> {
            list.as_sequence()
                .unwrap()
                .iter()
                .map(|x| x["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&proxy["volumeMounts"]), ["kith-token"]);
        assert_eq!(names(&v["spec"]["volumes"]), ["kith-token", "kith-xtables"]);
        assert_eq!(
            status(&v)["volumes"],
            serde_json::json!(["kith-token", "kith-xtables"])
        );
        assert!(crate::settings::parse_pin("abc").is_err());
        assert_eq!(crate::settings::parse_pin(&"AB".repeat(32)).unwrap(), pin);
    }

    #[test]
    fn the_status_annotation_records_what_was_injected() {
        let (v, _) = injected(APP);
        let st = status(&v);
        assert_eq!(st["version"], VERSION);
        assert_eq!(st["image"], crate::settings::default_image());
        assert_eq!(
            st["initContainers"],
            serde_json::json!(["kith-init", "kith-proxy"])
        );
        assert_eq!(st["inboundPortsNotCaptured"], serde_json::json!([15020]));
    }

    #[test]
    fn opting_in_and_out() {
        // Ok(None): injected; Ok(Some(why)): skipped; Err: refused.
        type Want = Result<Option<Skip>, ()>;
        let cases: &[(&str, bool, Want)] = &[
            ("labels: {kith.dev/inject: enabled}", false, Ok(None)),
            ("annotations: {kith.dev/inject: enabled}", false, Ok(None)),
            ("labels: {}", false, Ok(Some(Skip::NotOptedIn))),
            ("labels: {}", true, Ok(None)),
            (
                "labels: {kith.dev/inject: disabled}",
                true,
                Ok(Some(Skip::OptedOut)),
            ),
            (
                "annotations: {kith.dev/inject: disabled}",
                true,
                Ok(Some(Skip::OptedOut)),
            ),
            // The label wins: it is what the webhook's selectors see.
            (
                "labels: {kith.dev/inject: disabled}, annotations: {kith.dev/inject: enabled}",
                false,
                Ok(Some(Skip::OptedOut)),
            ),
            ("labels: {kith.dev/inject: 'true'}", true, Err(())),
        ];
        for (meta, by_default, want) in cases {
            let mut v = yaml(&format!(
                "metadata: {{{meta}}}\nspec: {{containers: [{{name: a, image: a}}]}}"
            ));
            let got = inject(&mut v, &Settings::default(), *by_default);
            let got = match got {
                Ok(Outcome::Injected { .. }) => Ok(None),
                Ok(Outcome::Skipped(s)) => Ok(Some(s)),
                Err(e) => {
                    assert!(e.to_string().contains("\"enabled\" or \"disabled\""), "{e}");
                    Err(())
                }
            };
            assert_eq!(&got, want, "{meta} by_default={by_default}");
        }
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let (once, _) = injected(APP);
        let mut twice = once.clone();
        let outcome = inject(&mut twice, &Settings::default(), true).unwrap();
        assert_eq!(outcome, Outcome::Skipped(Skip::AlreadyInjected));
        assert_eq!(once, twice);
    }

    #[test]
    fn host_network_pods_are_never_injected() {
        let mut v = yaml(
            "metadata: {labels: {kith.dev/inject: enabled}}\n\
             spec: {hostNetwork: true, containers: [{name: a, image: a}]}",
        );
        let before = v.clone();
        let outcome = inject(&mut v, &Settings::default(), true).unwrap();
        assert_eq!(outcome, Outcome::Skipped(Skip::HostNetwork));
        assert_eq!(v, before);
    }

    #[test]
    fn exclusion_annotations_reach_the_capture_rules() {
        let (v, _) = injected(
            r#"
metadata:
  annotations:
    kith.dev/inject: enabled
    kith.dev/exclude-inbound-ports: "9000, 9001"
    kith.dev/exclude-outbound-ports: "5432,6379"
    kith.dev/exclude-outbound-cidrs: "169.254.169.254/32,fd00::/8"
spec:
  containers: [{name: a, image: a}]
"#,
        );
        let a = args(&v["spec"]["initContainers"][0]);
        assert!(
            a.contains(&"--exclude-inbound-ports=9000,9001,15020"),
            "{a:?}"
        );
        assert!(a.contains(&"--exclude-ports=5432,6379"), "{a:?}");
        assert!(
            a.contains(&"--exclude-cidrs=169.254.169.254/32,fd00::/8"),
            "{a:?}"
        );
    }

    #[test]
    fn per_pod_annotations_reach_the_sidecar_and_bad_ones_refuse_the_pod() {
        let (v, _) = injected(
            r#"
metadata:
  annotations:
    kith.dev/inject: enabled
    kith.dev/allow: "spiffe://cluster.local/ns/shop/sa/web@8080"
    kith.dev/mode: permissive
    kith.dev/workers: "1"
spec:
  containers: [{name: a, image: a}]
"#,
        );
        let a = args(&v["spec"]["initContainers"][1]);
        assert!(
            a.ends_with(&[
                "--allow=spiffe://cluster.local/ns/shop/sa/web@8080",
                "--mode=permissive",
                "--workers=1"
            ]),
            "{a:?}"
        );
        let mut v = yaml(
            "metadata: {annotations: {kith.dev/inject: enabled, kith.dev/mode: open}}\n\
             spec: {containers: [{name: a, image: a}]}",
        );
        let before = v.clone();
        let err = inject(&mut v, &Settings::default(), false).unwrap_err();
        assert!(err.to_string().contains("kith.dev/mode"), "{err}");
        assert_eq!(v, before, "a refused pod is left as it was");
    }

    #[test]
    fn bad_exclusion_annotations_are_refused_with_the_reason() {
        for (key, value, expect) in [
            (EXCLUDE_INBOUND_KEY, "80,http", "\"http\" is not a port"),
            (EXCLUDE_OUTBOUND_KEY, "70000", "\"70000\" is not a port"),
            (EXCLUDE_OUTBOUND_KEY, "0", "\"0\" is not a port"),
            (EXCLUDE_CIDRS_KEY, "10.0.0.0/40", "prefix length"),
        ] {
            let mut v = yaml(&format!(
                "metadata: {{annotations: {{kith.dev/inject: enabled, {key}: '{value}'}}}}\n\
                 spec: {{containers: [{{name: a, image: a}}]}}"
            ));
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(key) && msg.contains(expect), "{msg}");
        }
    }

    #[test]
    fn probes_are_rewritten_to_the_sidecar_and_only_the_rest_left_out_of_capture() {
        let (v, warnings) = injected(
            r#"
metadata: {labels: {kith.dev/inject: enabled}}
spec:
  containers:
  - name: web
    image: web
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9901}]
    livenessProbe: {httpGet: {path: /healthz, port: admin}, periodSeconds: 7}
    readinessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {exec: {command: [true]}}
  - name: grpc
    image: grpc
    readinessProbe: {grpc: {port: 9090}}
    livenessProbe: {httpGet: {host: example.com, port: 443}}
    startupProbe: {httpGet: {scheme: HTTPS, port: 8443, path: /}}
  - name: broken
    image: broken
    livenessProbe: {httpGet: {port: nosuchport}}
"#,
        );
        // httpGet and tcpSocket probes go to the sidecar, which runs the original ones.
        let web = &v["spec"]["containers"][0];
        assert_eq!(
            web["livenessProbe"],
            yaml("{httpGet: {path: /app-health/web/livez, port: 15020}, periodSeconds: 7}")
        );
        assert_eq!(
            web["readinessProbe"],
            yaml("{httpGet: {path: /app-health/web/readyz, port: 15020}}")
        );
        assert_eq!(web["startupProbe"], yaml("{exec: {command: [true]}}"));
        let proxy = args(&v["spec"]["initContainers"][1]);
        assert!(
            proxy.ends_with(&[
                "--app-probe=web/livez=http:9901/healthz",
                "--app-probe=web/readyz=tcp:8080"
            ]),
            "{proxy:?}"
        );
        // gRPC and HTTPS probes cannot be run by the sidecar: their ports stay open to the
        // kubelet's plaintext, as before; another host's probe does not come to the pod.
        let a = args(&v["spec"]["initContainers"][0]);
        assert!(
            a.contains(&"--exclude-inbound-ports=8443,9090,15020"),
            "{a:?}"
        );
        assert_eq!(status(&v)["probePorts"], serde_json::json!([8443, 9090]));
        assert_eq!(
            v["spec"]["containers"][1]["readinessProbe"],
            yaml("{grpc: {port: 9090}}")
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("\"nosuchport\""), "{warnings:?}");
    }

    /// SECURITY: an app running as the proxy's UID or GID would be exempt from capture.
    #[test]
    fn containers_running_as_the_proxy_uid_or_gid_are_refused() {
        for (spec, container, what) in [
            (
                "{securityContext: {runAsUser: 1337}, containers: [{name: a, image: a}]}",
                "a",
                "UID",
            ),
            (
                "{containers: [{name: a, image: a}, {name: b, securityContext: {runAsGroup: 1337}}]}",
                "b",
                "GID",
            ),
            (
                "{containers: [{name: a}], initContainers: [{name: i, securityContext: {runAsUser: 1337}}]}",
                "i",
                "UID",
            ),
        ] {
            let mut v = yaml(&format!(
                "metadata: {{labels: {{kith.dev/inject: enabled}}}}\nspec: {spec}"
            ));
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            assert_eq!(
                err,
                InjectError::ProxyIdentity {
                    container: container.into(),
                    what
                },
                "{spec}"
            );
            assert_eq!(err.label(), "proxy_identity");
            assert!(err.to_string().contains(&format!("runs as {what} 1337")));
        }
        // The container's own UID wins over the pod's.
        let (_, warnings) = injected(
            "metadata: {labels: {kith.dev/inject: enabled}}\n\
             spec: {securityContext: {runAsUser: 1337}, containers: [{name: a, image: a, \
             securityContext: {runAsUser: 1000}}]}",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    /// SECURITY: app containers lose SETUID and SETGID (so they cannot become 1337:1337).
    #[test]
    fn app_containers_drop_setuid_and_setgid() {
        let (v, _) = injected(
            "metadata: {labels: {kith.dev/inject: enabled}}\n\
             spec: {containers: [{name: a, image: a}, \
             {name: b, securityContext: {runAsUser: 0, capabilities: {add: [NET_BIND_SERVICE], drop: [SETUID]}}}, \
             {name: c, securityContext: {capabilities: {drop: [ALL]}}}], \
             initContainers: [{name: i, image: i}]}",
        );
        let caps =
            |list: &str, i: usize| v["spec"][list][i]["securityContext"]["capabilities"].clone();
        assert_eq!(caps("containers", 0), yaml("drop: [SETUID, SETGID]"));
        assert_eq!(
            caps("containers", 1),
            yaml("{add: [NET_BIND_SERVICE], drop: [SETUID, SETGID]}")
        );
        assert_eq!(
            v["spec"]["containers"][1]["securityContext"]["runAsUser"],
            0
        );
        assert_eq!(caps("containers", 2), yaml("drop: [ALL]"));
        // The pod's own init container (index 2, after kith's two).
        assert_eq!(v["spec"]["initContainers"][2]["name"], "i");
        assert_eq!(caps("initContainers", 2), yaml("drop: [SETUID, SETGID]"));
        // kith's own containers keep their settings.
        assert_eq!(
            caps("initContainers", 0),
            yaml("{add: [NET_ADMIN, NET_RAW], drop: [ALL]}")
        );
    }

    #[test]
    fn containers_that_add_setuid_or_setgid_back_are_refused() {
        for (sc, why) in [
            (
                "{capabilities: {add: [SETUID]}}",
                "adds the capability SETUID",
            ),
            (
                "{capabilities: {add: [CAP_SETGID]}}",
                "adds the capability SETGID",
            ),
            ("{capabilities: {add: [ALL]}}", "adds the capability ALL"),
            ("{privileged: true}", "is privileged"),
        ] {
            let mut v = yaml(&format!(
                "metadata: {{labels: {{kith.dev/inject: enabled}}}}\n\
                 spec: {{containers: [{{name: a, securityContext: {sc}}}]}}"
            ));
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            assert_eq!(err.label(), "setid_capability", "{sc}");
            let msg = err.to_string();
            assert!(msg.contains("container a") && msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn names_already_taken_are_refused() {
        for spec in [
            "{containers: [{name: kith-proxy, image: x}]}",
            "{containers: [{name: a, image: a}], initContainers: [{name: kith-init, image: x}]}",
            "{containers: [{name: a, image: a}], volumes: [{name: kith-token, emptyDir: {}}]}",
        ] {
            let mut v = yaml(&format!(
                "metadata: {{labels: {{kith.dev/inject: enabled}}}}\nspec: {spec}"
            ));
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            assert!(
                matches!(err, InjectError::NameTaken { .. }),
                "{spec}: {err}"
            );
        }
    }

    #[test]
    fn apps_on_the_sidecars_ports_are_refused() {
        for port in [15001, 15006, 15020] {
            let mut v = yaml(&format!(
                "metadata: {{labels: {{kith.dev/inject: enabled}}}}\n\
                 spec: {{containers: [{{name: a, ports: [{{containerPort: 80}}, {{containerPort: {port}}}]}}]}}"
            ));
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            assert_eq!(
                err,
                InjectError::PortTaken {
                    container: "a".into(),
                    port
                }
            );
            assert_eq!(err.label(), "port_taken");
        }
    }

    #[test]
    fn malformed_templates_are_errors_not_panics() {
        for (text, expect) in [
            ("[1, 2]", "the pod template is not a mapping"),
            (
                "{metadata: {labels: {kith.dev/inject: enabled}}}",
                "spec.containers",
            ),
            (
                "{metadata: {labels: {kith.dev/inject: enabled}}, spec: {containers: []}}",
                "spec.containers",
            ),
            (
                "{metadata: {labels: {kith.dev/inject: enabled}}, spec: {containers: [{name: a}], initContainers: 5}}",
                "spec.initContainers is not a list",
            ),
            (
                "{metadata: {labels: {kith.dev/inject: enabled}}, spec: {containers: [{name: a}], volumes: {}}}",
                "spec.volumes is not a list",
            ),
        ] {
            let mut v = yaml(text);
            let err = inject(&mut v, &Settings::default(), false).unwrap_err();
            assert!(err.to_string().contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn the_templates_own_fields_keep_their_order() {
        let text = "metadata: {labels: {z: '1', kith.dev/inject: enabled}, name: n}\n\
                    spec: {serviceAccountName: sa, containers: [{name: a, image: a}], dnsPolicy: ClusterFirst}";
        let (v, _) = injected(text);
        let keys = |v: &Value| -> Vec<String> {
            v.as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            keys(&v["spec"]),
            [
                "serviceAccountName",
                "containers",
                "dnsPolicy",
                "initContainers",
                "volumes"
            ]
        );
        assert_eq!(keys(&v["metadata"]), ["labels", "name", "annotations"]);
    }
}
