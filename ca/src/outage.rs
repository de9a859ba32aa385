//! Time to outage: when this CA will stop keeping the mesh alive unless someone acts, and why.
//! The earliest of: the root's end with no successor published, the active signer's end with no
//! successor prepared, a key-encryption key that no longer opens the stored signer key (an
//! outage now: the next restart or rotation cannot use the key), and the data volume falling
//! below its free-space reserve (anonymous work, such as joining nodes, is refused from then on;
//! estimated from the measured rate at which free space shrinks, now if it already is below).

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outage {
    /// Unix seconds.
    pub at: i64,
    /// `root`, `signer`, `kek` or `store_full`.
    pub cause: &'static str,
    pub detail: String,
}

/// The earliest of the candidates; on a tie the first named here wins: `kek`, `store_full`,
/// then the rollover's own (`root` or `signer`).
pub fn earliest(
    now: i64,
    rollover: (i64, &'static str),
    kek: &Result<(), String>,
    store_full_at: Option<i64>,
) -> Outage {
    let mut candidates = Vec::with_capacity(3);
    if let Err(e) = kek {
        candidates.push(Outage {
            at: now,
            cause: "kek",
            detail: format!("the key-encryption key does not open the active signer key: {e}"),
        });
    }
    if let Some(at) = store_full_at {
        candidates.push(Outage {
            at,
            cause: "store_full",
            detail: if at <= now {
                "the data volume is below its free-space reserve: anonymous requests are refused"
                    .into()
            } else {
                "the data volume reaches its free-space reserve at the rate it is filling".into()
            },
        });
    }
    let (at, cause) = rollover;
    candidates.push(Outage {
        at,
        cause,
        detail: match cause {
            "root" => "the root ends with no successor published".into(),
            _ => "the signing intermediate ends with no successor prepared".into(),
        },
    });
    let mut best = candidates.remove(0);
    for c in candidates {
        if c.at < best.at {
            best = c;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Result<(), String> = Ok(());

    #[test]
    fn without_other_trouble_the_rollover_decides() {
        let o = earliest(1000, (5000, "signer"), &OK, None);
        assert_eq!((o.at, o.cause), (5000, "signer"));
        let o = earliest(1000, (4000, "root"), &OK, Some(9000));
        assert_eq!((o.at, o.cause), (4000, "root"));
    }

    #[test]
    fn a_kek_that_does_not_open_the_signer_key_is_an_outage_now() {
        let o = earliest(1000, (5000, "root"), &Err("aead".into()), None);
        assert_eq!((o.at, o.cause), (1000, "kek"));
        assert!(o.detail.contains("aead"), "{}", o.detail);
    }

    #[test]
    fn a_store_filling_sooner_than_the_root_ends_is_the_cause() {
        let o = earliest(1000, (5000, "root"), &OK, Some(3000));
        assert_eq!((o.at, o.cause), (3000, "store_full"));
        // Already below the reserve: now.
        let o = earliest(1000, (5000, "root"), &OK, Some(1000));
        assert_eq!((o.at, o.cause), (1000, "store_full"));
        assert!(o.detail.contains("below"), "{}", o.detail);
    }

    #[test]
    fn an_expired_root_stays_earlier_than_a_kek_failure_now() {
        let o = earliest(1000, (900, "root"), &Err("x".into()), None);
        assert_eq!((o.at, o.cause), (900, "root"));
    }
}
