//! `/readyz`: whether this CA can issue right now. Each check is named, so a 503 says which one
//! failed: the store takes a durable write, the active signer and the root are present and
//! unexpired, the key-encryption key opens the stored signer key, and (with Kubernetes
//! attestation) the issuer's keys are fresh enough to trust.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::service::Ca;
use crate::store::{Store, Write};

/// The store write must finish within this, or the store counts as failing.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Readiness {
    /// `ok`, `degraded` (ready, but the data volume is below its free-space reserve, so
    /// anonymous work is refused) or `unavailable`.
    pub status: &'static str,
    /// The names of the failing checks.
    pub failing: Vec<&'static str>,
    pub checks: Vec<Check>,
    /// The data volume's free space. A low disk does not make the CA unready: renewals, which
    /// keep the mesh alive, still work; `status` says `degraded` and the report says why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<crate::guard::DiskReport>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.failing.is_empty()
    }
}

/// Runs every check now.
pub async fn check<S: Store>(ca: &Ca<S>, now: SystemTime) -> Readiness {
    let mut checks = Vec::with_capacity(5);
    let store = match tokio::time::timeout(STORE_PROBE_TIMEOUT, ca.store.write(Write::Probe)).await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("the store refused a write: {e}")),
        Err(_) => Err(format!(
            "a store write did not finish within {}s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    };
    checks.push(named("store", store));
    let keys = ca.authority.keys();
    let signer = if keys.active.not_after <= now {
        Err(format!("the active signer {} has expired", keys.active.id))
    } else if keys.active.not_before > now {
        Err(format!(
            "the active signer {} is not valid yet",
            keys.active.id
        ))
    } else {
        Ok(())
    };
    checks.push(named("signer", signer));
    let root = if keys.root_not_after <= now {
        Err("the root has expired".to_owned())
    } else {
        Ok(())
    };
    checks.push(named("root", root));
    checks.push(named(
        "kek",
        ca.authority.check_kek(ca.store.as_ref()).await,
    ));
    if let Some(k8s) = &ca.k8s {
        checks.push(named("k8s_jwks", k8s.freshness(now)));
    }
    let failing: Vec<_> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    for c in checks.iter().filter(|c| !c.ok) {
        tracing::warn!(check = c.name, detail = %c.detail, "not ready");
    }
    let disk = ca.disk.as_ref().map(|d| d.report());
    let status = if !failing.is_empty() {
        "unavailable"
    } else if disk.as_ref().is_some_and(|d| d.state == "low") {
        "degraded"
    } else {
        "ok"
    };
    Readiness {
        status,
        failing,
        checks,
        disk,
    }
}

fn named(name: &'static str, result: Result<(), String>) -> Check {
    match result {
        Ok(()) => Check {
            name,
            ok: true,
            detail: "ok".into(),
        },
        Err(detail) => Check {
            name,
            ok: false,
            detail,
        },
    }
}
