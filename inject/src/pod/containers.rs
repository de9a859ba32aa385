//! The containers and volumes kith adds to a pod, built as ordered YAML mappings so that the
//! offline output reads like a hand-written manifest (name first, then image, args, ...).

use serde_norway::{Mapping, Value};

use super::Exclusions;
use crate::settings::{
    ADMIN_PORT, BUNDLE_DIR, BUNDLE_FILE, BUNDLE_VOLUME, INBOUND_PORT, INIT_CONTAINER,
    OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID, Settings, TOKEN_DIR, TOKEN_FILE, TOKEN_SECONDS,
    TOKEN_VOLUME, XTABLES_VOLUME,
};

/// `kith sidecar init`: root with NET_ADMIN and NET_RAW only, to program the pod's nat table.
pub(super) fn init_container(
    settings: &Settings,
    not_captured: &[u16],
    excl: &Exclusions,
) -> Value {
    let mut args = vec![
        s("sidecar"),
        s("init"),
        s(format!("--proxy-uid={PROXY_UID}")),
        s(format!("--proxy-gid={PROXY_UID}")),
        s(format!("--outbound-port={OUTBOUND_PORT}")),
        s(format!("--inbound-port={INBOUND_PORT}")),
        s(format!("--exclude-inbound-ports={}", join(not_captured))),
    ];
    if !excl.outbound.is_empty() {
        args.push(s(format!("--exclude-ports={}", join(&excl.outbound))));
    }
    if !excl.cidrs.is_empty() {
        args.push(s(format!("--exclude-cidrs={}", join(&excl.cidrs))));
    }
    // No --no-verify: the canary check connects from init's own UID (0, not the proxy's), so
    // it needs no capability beyond NET_ADMIN and NET_RAW, and a pod whose capture does not
    // work never starts.
    map([
        ("name", s(INIT_CONTAINER)),
        ("image", s(&settings.init_image)),
        ("command", kith_command()),
        ("args", Value::Sequence(args)),
        ("resources", resources(("10m", "16Mi"), ("100m", "64Mi"))),
        (
            "securityContext",
            security_context(0, &["NET_ADMIN", "NET_RAW"]),
        ),
        (
            "volumeMounts",
            seq([map([("name", s(XTABLES_VOLUME)), ("mountPath", s("/run"))])]),
        ),
    ])
}

/// `kith sidecar run` in transparent mode, as a native sidecar (an init container that keeps
/// running), identified by the pod's projected service-account token.
/// `extra`: the flags from the pod's own annotations (annotations.rs), already validated.
pub(super) fn proxy_container(settings: &Settings, extra: &[String]) -> Value {
    let cidrs = join(&settings.mesh_cidrs);
    // SECURITY: the admin port listens on the pod's address because the kubelet probes /ready
    // there; `kith sidecar init` never captures it. It serves /live, /ready, /metrics and
    // POST /quitquitquit to anyone who can reach the pod (see deploy/kubernetes/README.md).
    let mut args = vec![
        "sidecar".to_owned(),
        "run".to_owned(),
        format!("--k8s-token-file={TOKEN_DIR}/{TOKEN_FILE}"),
        format!("--ca={}", settings.ca_url),
        match &settings.bundle_sha256 {
            Some(pin) => format!("--bundle-sha256={pin}"),
            None => format!("--bundle={BUNDLE_DIR}/{BUNDLE_FILE}"),
        },
        format!("--mesh-cidr={cidrs}"),
        format!("--admin-listen=0.0.0.0:{ADMIN_PORT}"),
        "--log-format=json".to_owned(),
    ];
    args.extend(extra.iter().cloned());
    let mut mounts = vec![map([
        ("name", s(TOKEN_VOLUME)),
        ("mountPath", s(TOKEN_DIR)),
        ("readOnly", Value::Bool(true)),
    ])];
    if settings.bundle_sha256.is_none() {
        mounts.push(map([
            ("name", s(BUNDLE_VOLUME)),
            ("mountPath", s(BUNDLE_DIR)),
            ("readOnly", Value::Bool(true)),
        ]));
    }
    let probe = |path: &str, period: u64, failures: u64| {
        map([
            (
                "httpGet",
                map([("path", s(path)), ("port", n(u64::from(ADMIN_PORT)))]),
            ),
            ("periodSeconds", n(period)),
            ("timeoutSeconds", n(1)),
            ("failureThreshold", n(failures)),
        ])
    };
    map([
        ("name", s(PROXY_CONTAINER)),
        ("image", s(&settings.image)),
        ("command", kith_command()),
        ("args", seq(args.into_iter().map(s))),
        (
            "ports",
            seq([map([
                ("name", s("kith-admin")),
                ("containerPort", n(u64::from(ADMIN_PORT))),
                ("protocol", s("TCP")),
            ])]),
        ),
        ("restartPolicy", s("Always")),
        ("resources", resources(("50m", "32Mi"), ("1", "256Mi"))),
        ("securityContext", security_context(PROXY_UID, &[])),
        // Up to two minutes for the first SVID; the app's containers start only after this.
        ("startupProbe", probe("/ready", 1, 120)),
        ("readinessProbe", probe("/ready", 5, 3)),
        ("livenessProbe", probe("/live", 10, 3)),
        ("volumeMounts", seq(mounts)),
    ])
}

/// `kith`, found on the image's PATH: the init image (which needs iptables besides kith) may
/// have another entrypoint than kith's own image.
fn kith_command() -> Value {
    seq([s("kith")])
}

/// The token, the bundle ConfigMap (unless the sidecar fetches the bundle by its pin) and the
/// init container's tmpfs.
pub(super) fn volumes(settings: &Settings) -> Vec<Value> {
    let token = map([(
        "serviceAccountToken",
        map([
            ("audience", s(&settings.audience)),
            ("expirationSeconds", n(TOKEN_SECONDS)),
            ("path", s(TOKEN_FILE)),
        ]),
    )]);
    let mut out = vec![map([
        ("name", s(TOKEN_VOLUME)),
        ("projected", map([("sources", seq([token]))])),
    ])];
    if settings.bundle_sha256.is_none() {
        out.push(map([
            ("name", s(BUNDLE_VOLUME)),
            ("configMap", map([("name", s(&settings.bundle_configmap))])),
        ]));
    }
    out.push(map([
        ("name", s(XTABLES_VOLUME)),
        (
            "emptyDir",
            map([("medium", s("Memory")), ("sizeLimit", s("1Mi"))]),
        ),
    ]));
    out
}

fn resources(requests: (&str, &str), limits: (&str, &str)) -> Value {
    let pair = |(cpu, memory): (&str, &str)| map([("cpu", s(cpu)), ("memory", s(memory))]);
    map([("requests", pair(requests)), ("limits", pair(limits))])
}

/// Non-root unless `uid` is 0; nothing but `add` on top of dropping every capability.
fn security_context(uid: u32, add: &[&str]) -> Value {
    let mut caps = Mapping::new();
    if !add.is_empty() {
        caps.insert(s("add"), seq(add.iter().map(|c| s(*c))));
    }
    caps.insert(s("drop"), seq([s("ALL")]));
    map([
        ("allowPrivilegeEscalation", Value::Bool(false)),
        ("capabilities", Value::Mapping(caps)),
        ("privileged", Value::Bool(false)),
        ("readOnlyRootFilesystem", Value::Bool(true)),
        ("runAsGroup", n(u64::from(uid))),
        ("runAsNonRoot", Value::Bool(uid != 0)),
        ("runAsUser", n(u64::from(uid))),
        ("seccompProfile", map([("type", s("RuntimeDefault"))])),
    ])
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

fn n(v: u64) -> Value {
    Value::Number(v.into())
}

fn seq(items: impl IntoIterator<Item = Value>) -> Value {
    Value::Sequence(items.into_iter().collect())
}

/// A mapping whose keys keep the order given.
fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}
