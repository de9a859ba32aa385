//! Per-pod sidecar settings from the pod's annotations, validated at admission with the
//! sidecar's own parsers, so that a pod the injector accepts never has a sidecar that refuses
//! to start:
//!
//! | annotation | sidecar flag | value |
//! |---|---|---|
//! | `kith.dev/allow` | `--allow` | SPIFFE IDs or `spiffe://td/prefix/*`, each optionally `@PORT[+PORT…]`; comma- or space-separated |
//! | `kith.dev/expect-ids` | `--expect-id` | `CIDR[:PORT]=ID` rules (and at most one plain ID, the default) |
//! | `kith.dev/mode` | `--mode` | `strict` (default) or `permissive` |
//! | `kith.dev/outbound-policy` | `--outbound-policy` | `passthrough` (default) or `deny` |
//! | `kith.dev/workers` | `--workers` | 1–256 |
//!
//! Any other `kith.dev/` annotation than these, the exclusions and the inject switch is refused:
//! a misspelt key would otherwise be ignored and the pod run with settings it did not ask for.

use serde_norway::{Mapping, Value};

use super::InjectError;
use crate::settings::{
    EXCLUDE_CIDRS_KEY, EXCLUDE_INBOUND_KEY, EXCLUDE_OUTBOUND_KEY, INJECT_KEY, STATUS_KEY,
};

pub const ALLOW_KEY: &str = "kith.dev/allow";
pub const EXPECT_IDS_KEY: &str = "kith.dev/expect-ids";
pub const MODE_KEY: &str = "kith.dev/mode";
pub const OUTBOUND_POLICY_KEY: &str = "kith.dev/outbound-policy";
pub const WORKERS_KEY: &str = "kith.dev/workers";

/// Every annotation key of kith's the injector reads.
const KNOWN: [&str; 10] = [
    INJECT_KEY,
    STATUS_KEY,
    EXCLUDE_INBOUND_KEY,
    EXCLUDE_OUTBOUND_KEY,
    EXCLUDE_CIDRS_KEY,
    ALLOW_KEY,
    EXPECT_IDS_KEY,
    MODE_KEY,
    OUTBOUND_POLICY_KEY,
    WORKERS_KEY,
];

/// The sidecar's extra arguments for the pod's annotations, in a fixed order.
pub(super) fn sidecar_args(annotations: Option<&Mapping>) -> Result<Vec<String>, InjectError> {
    let Some(annotations) = annotations else {
        return Ok(Vec::new());
    };
    for key in annotations.keys().filter_map(Value::as_str) {
        if key.starts_with("kith.dev/") && !KNOWN.contains(&key) {
            return Err(InjectError::BadAnnotation {
                key: "kith.dev/*",
                reason: format!(
                    "{key:?} is not an annotation kith knows (known: {})",
                    KNOWN.join(", ")
                ),
            });
        }
    }
    let get = |key: &'static str| -> Result<Option<&str>, InjectError> {
        match annotations.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or(InjectError::BadAnnotation {
                key,
                reason: "the value must be a string".to_owned(),
            }),
        }
    };
    let bad = |key: &'static str, reason: String| InjectError::BadAnnotation { key, reason };
    let mut args = Vec::new();

    if let Some(v) = get(ALLOW_KEY)? {
        let items = items(v);
        if items.is_empty() {
            return Err(bad(
                ALLOW_KEY,
                "empty; remove it to allow the own trust domain".into(),
            ));
        }
        let mut policy = proxy::Policy::own_trust_domain();
        for item in items {
            let (rule, ports) = split_ports(item).map_err(|r| bad(ALLOW_KEY, r))?;
            policy = policy
                .allow_on(rule, &ports)
                .map_err(|e| bad(ALLOW_KEY, format!("{item:?}: {e}")))?;
            args.push(format!("--allow={item}"));
        }
    }
    if let Some(v) = get(EXPECT_IDS_KEY)? {
        let items = items(v);
        if items.is_empty() {
            return Err(bad(
                EXPECT_IDS_KEY,
                "empty; remove it to expect any ID of the own trust domain".into(),
            ));
        }
        proxy::transparent::ExpectRules::parse(items.iter().copied())
            .map_err(|e| bad(EXPECT_IDS_KEY, e.to_string()))?;
        args.extend(items.iter().map(|i| format!("--expect-id={i}")));
    }
    if let Some(v) = get(MODE_KEY)? {
        match v {
            "strict" | "permissive" => args.push(format!("--mode={v}")),
            other => {
                return Err(bad(
                    MODE_KEY,
                    format!("{other:?}: write strict or permissive"),
                ));
            }
        }
    }
    if let Some(v) = get(OUTBOUND_POLICY_KEY)? {
        match v {
            "passthrough" | "deny" => args.push(format!("--outbound-policy={v}")),
            other => {
                return Err(bad(
                    OUTBOUND_POLICY_KEY,
                    format!("{other:?}: write passthrough or deny"),
                ));
            }
        }
    }
    if let Some(v) = get(WORKERS_KEY)? {
        let n = v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .ok_or_else(|| bad(WORKERS_KEY, format!("{v:?}: write a number from 1 to 256")))?;
        args.push(format!("--workers={n}"));
    }
    Ok(args)
}

/// Items separated by commas or white space.
fn items(v: &str) -> Vec<&str> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|i| !i.is_empty())
        .collect()
}

/// `rule@8080+8081` -> (rule, [8080, 8081]), as `kith sidecar run --allow` reads it.
fn split_ports(item: &str) -> Result<(&str, Vec<u16>), String> {
    let Some((rule, ports)) = item.rsplit_once('@') else {
        return Ok((item, Vec::new()));
    };
    let ports = ports
        .split('+')
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{item:?}: {p:?} is not a port (1-65535)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rule, ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_for(pairs: &[(&str, &str)]) -> Result<Vec<String>, InjectError> {
        let m: Mapping = pairs
            .iter()
            .map(|(k, v)| (Value::String((*k).into()), Value::String((*v).into())))
            .collect();
        sidecar_args(Some(&m))
    }

    #[test]
    fn each_annotation_becomes_its_sidecar_flag() {
        let args = args_for(&[
            (
                ALLOW_KEY,
                "spiffe://cluster.local/ns/shop/sa/web@8080+8081, spiffe://cluster.local/ns/ops/*",
            ),
            (
                EXPECT_IDS_KEY,
                "10.96.0.0/12:5432=spiffe://cluster.local/ns/db/sa/pg",
            ),
            (MODE_KEY, "permissive"),
            (OUTBOUND_POLICY_KEY, "deny"),
            (WORKERS_KEY, "4"),
        ])
        .unwrap();
        assert_eq!(
            args,
            [
                "--allow=spiffe://cluster.local/ns/shop/sa/web@8080+8081",
                "--allow=spiffe://cluster.local/ns/ops/*",
                "--expect-id=10.96.0.0/12:5432=spiffe://cluster.local/ns/db/sa/pg",
                "--mode=permissive",
                "--outbound-policy=deny",
                "--workers=4",
            ]
        );
        assert!(args_for(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_values_are_refused_with_the_key_and_the_reason() {
        for (key, value, expect) in [
            (ALLOW_KEY, "web", "web"),
            (ALLOW_KEY, "spiffe://td/a@http", "\"http\" is not a port"),
            (ALLOW_KEY, "spiffe://td/a@0", "\"0\" is not a port"),
            (ALLOW_KEY, " , ", "empty"),
            (EXPECT_IDS_KEY, "10.0.0.0/33=spiffe://td/a", "10.0.0.0/33"),
            (EXPECT_IDS_KEY, "10.0.0.0/8:0=spiffe://td/a", "10.0.0.0/8:0"),
            (
                EXPECT_IDS_KEY,
                "spiffe://td/a,spiffe://td/b",
                "spiffe://td/b",
            ),
            (MODE_KEY, "STRICT", "strict or permissive"),
            (OUTBOUND_POLICY_KEY, "allow", "passthrough or deny"),
            (WORKERS_KEY, "0", "1 to 256"),
            (WORKERS_KEY, "257", "1 to 256"),
            (WORKERS_KEY, "many", "1 to 256"),
        ] {
            let err = args_for(&[(key, value)]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(key) && msg.contains(expect),
                "{key}={value}: {msg}"
            );
            assert_eq!(err.label(), "bad_annotation");
        }
    }

    #[test]
    fn unknown_kith_annotations_are_refused_others_ignored() {
        let err = args_for(&[("kith.dev/alow", "spiffe://td/a")]).unwrap_err();
        assert!(err.to_string().contains("\"kith.dev/alow\""), "{err}");
        assert!(
            args_for(&[("example.com/kith.dev", "x")])
                .unwrap()
                .is_empty()
        );
    }
}
