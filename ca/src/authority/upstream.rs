//! `kith ca upstream replace`: kith cannot roll an operator's CA, but takes its replacement
//! with the same overlap rules as its own roots. The new upstream is stored sealed (a `Root`
//! record named `upstream-…`, its certificate chain as concatenated DER), its anchor published
//! in the bundle beside the current one, and signing switches to it when the rollover's rules
//! allow (`rollover::next_step`); the replaced anchor leaves the bundle once its last leaf
//! expired. A restart keeps all of it: a stored, activated replacement wins over older
//! `--upstream-cert` files.

use std::sync::Mutex;

use super::*;

/// A replacement upstream, published and waiting to sign.
pub(super) struct Staged {
    pub id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub anchor: CertificateDer<'static>,
    pub published_at: SystemTime,
    pub not_after: SystemTime,
}

pub(super) struct State {
    staged: Mutex<Option<Arc<Staged>>>,
    /// The anchor of the upstream that signs now.
    current: Mutex<Option<CertificateDer<'static>>>,
    /// A replaced anchor and when it leaves the bundle.
    retiring: Mutex<Option<(CertificateDer<'static>, SystemTime)>>,
}

impl State {
    pub fn new(
        staged: Option<Staged>,
        current: Option<CertificateDer<'static>>,
        retiring: Option<(CertificateDer<'static>, SystemTime)>,
    ) -> Self {
        Self {
            staged: Mutex::new(staged.map(Arc::new)),
            current: Mutex::new(current),
            retiring: Mutex::new(retiring),
        }
    }

    fn staged(&self) -> Option<Arc<Staged>> {
        self.staged.lock().ok().and_then(|s| s.clone())
    }

    pub fn staged_not_after(&self) -> Option<SystemTime> {
        self.staged().map(|s| s.not_after)
    }

    /// The upstream anchors and their phases, for `kith ca root status`.
    pub fn views(&self, now: SystemTime, current_end: SystemTime) -> Vec<RootView> {
        let view = |id: &str, c: &CertificateDer<'_>, created: i64, end: i64, phase: Phase| {
            let (nb, na) = validity(c).unwrap_or((0, end));
            RootView {
                id: id.to_owned(),
                sha256: crate::store::hex(&sha256(c)),
                not_before: nb,
                not_after: na,
                created_at: created,
                phase,
            }
        };
        let mut out = Vec::new();
        if let Some((a, until)) = self.retiring.lock().ok().and_then(|r| r.clone())
            && now < until
        {
            out.push(view(
                "upstream (replaced)",
                &a,
                0,
                0,
                Phase::Retiring { until: unix(until) },
            ));
        }
        if let Some(c) = self.current.lock().ok().and_then(|c| c.clone()) {
            out.push(view("upstream", &c, 0, unix(current_end), Phase::Active));
        }
        if let Some(s) = self.staged() {
            out.push(view(
                &s.id,
                &s.anchor,
                unix(s.published_at),
                unix(s.not_after),
                Phase::Published,
            ));
        }
        out
    }
}

fn validity(c: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, p) = x509_parser::parse_x509_certificate(c).ok()?;
    Some((
        p.validity().not_before.timestamp(),
        p.validity().not_after.timestamp(),
    ))
}

fn concat(chain: &[CertificateDer<'_>]) -> Vec<u8> {
    chain.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

/// Splits concatenated DER certificates.
fn split(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| AuthorityError::Upstream(format!("stored chain: {e}")))?;
        out.push(CertificateDer::from(der[..der.len() - rest.len()].to_vec()));
        der = rest;
    }
    Ok(out)
}

fn staged_from(kek: &Kek, r: &CaKeyRecord) -> Result<Staged, AuthorityError> {
    let chain = split(r.cert_der.as_deref().unwrap_or_default())?;
    let key = open_sealed(kek, r)?;
    let anchor = chain
        .last()
        .cloned()
        .ok_or_else(|| AuthorityError::Upstream(format!("{}: empty chain", r.id)))?;
    Ok(Staged {
        id: r.id.clone(),
        chain,
        key: PrivatePkcs8KeyDer::from(key),
        anchor,
        published_at: at(r.created_at),
        not_after: at(r.not_after),
    })
}

/// At start: the upstream to sign with (a stored, activated replacement that ends later than
/// the flag files' wins) and a replacement still waiting.
#[allow(clippy::type_complexity)]
pub(super) async fn at_start<S: Store>(
    store: &S,
    kek: &Kek,
    flags: Option<Upstream>,
    max_leaf_ttl: Duration,
    now: SystemTime,
) -> Result<
    (
        Option<Upstream>,
        Option<Staged>,
        Option<(CertificateDer<'static>, SystemTime)>,
    ),
    AuthorityError,
> {
    let Some(flags) = flags else {
        return Ok((None, None, None));
    };
    let stored: Vec<CaKeyRecord> = store
        .ca_keys()
        .await?
        .into_iter()
        .filter(|r| r.kind == KeyKind::Root && r.id.starts_with("upstream-"))
        .filter(|r| at(r.not_after) > now)
        .collect();
    let flag_end = flags
        .chain
        .first()
        .and_then(validity)
        .map(|(_, na)| na)
        .unwrap_or(0);
    let active = stored
        .iter()
        .filter(|r| r.activate_at < r.not_after && at(r.activate_at) <= now)
        .max_by_key(|r| r.activate_at);
    let mut retiring = None;
    let upstream = match active {
        Some(r) if r.not_after > flag_end => {
            tracing::warn!(upstream = %r.id, "signing with the upstream imported by `kith ca upstream replace`; the --upstream-cert/--upstream-key files are older: replace them too");
            let s = staged_from(kek, r)?;
            // The flags' anchor stays trusted until the leaves issued under it expired.
            if let Some(old) = flags.chain.last().filter(|a| **a != s.anchor) {
                let until = rollover::retires_at(at(r.activate_at), max_leaf_ttl, at(flag_end));
                if now < until {
                    retiring = Some((old.clone(), until));
                }
            }
            Upstream {
                chain: s.chain,
                key: s.key,
            }
        }
        _ => flags,
    };
    let staged = stored
        .iter()
        .filter(|r| r.activate_at >= r.not_after)
        .max_by_key(|r| r.created_at)
        .map(|r| staged_from(kek, r))
        .transpose()?;
    Ok((Some(upstream), staged, retiring))
}

impl Authority {
    /// Takes a replacement for the upstream CA: checks it, stores it sealed, publishes its
    /// anchor in the bundle; the switch follows the rollover's rules. Returns its id.
    pub async fn replace_upstream<S: Store>(
        &self,
        store: &S,
        new: Upstream,
        now: SystemTime,
    ) -> Result<String, AuthorityError> {
        let _step = self.steps.lock().await;
        if !self.upstream {
            return Err(AuthorityError::Upstream(
                "this CA signs under its own root: use `kith ca root rotate`".into(),
            ));
        }
        let chain = new.chain.clone();
        let key_der = new.key.secret_pkcs8_der().to_vec();
        let (_, anchors, _, not_after) = import_upstream(new)?;
        let anchor = anchors
            .first()
            .cloned()
            .ok_or_else(|| AuthorityError::Upstream("no anchor".into()))?;
        let keys = self.current.load_full();
        if not_after <= keys.root_not_after {
            return Err(AuthorityError::Upstream(format!(
                "the new upstream certificate ends at {}, no later than the current one ({})",
                unix(not_after),
                unix(keys.root_not_after)
            )));
        }
        if not_after <= now + self.lifetimes.rollover.propagation {
            return Err(AuthorityError::Upstream(
                "the new upstream certificate ends before the new bundle could reach every caller"
                    .into(),
            ));
        }
        let id = format!("upstream-{}", short_id()?);
        let mut rec = CaKeyRecord {
            sealed_key: Vec::new(),
            id: id.clone(),
            kind: KeyKind::Root,
            cert_der: Some(concat(&chain)),
            not_before: unix(now),
            not_after: unix(not_after),
            // Pending: it signs when the switch decides.
            activate_at: unix(not_after),
            created_at: unix(now),
        };
        rec.sealed_key = self.kek.seal(&binding(&rec), &key_der)?;
        let event = AuditEvent {
            at: unix(now),
            action: "upstream.published".into(),
            subject: id.clone(),
            outcome: "ok".into(),
            detail: json!({"phase": "published", "sha256": crate::store::hex(&sha256(&anchor)), "not_after": unix(not_after)}),
        };
        store.write(Write::PutCaKey(rec, event)).await?;
        tracing::info!(upstream = %id, "published the replacement upstream's anchor in the bundle; signing switches once every caller holds it");
        let mut anchors = self.roots.load().anchors.clone();
        if !anchors.contains(&anchor) {
            anchors.push(anchor.clone());
            self.set_anchors(anchors)?;
        }
        self.reports.collect(true);
        if let Ok(mut s) = self.up.staged.lock() {
            *s = Some(Arc::new(Staged {
                id: id.clone(),
                chain,
                key: PrivatePkcs8KeyDer::from(key_der),
                anchor,
                published_at: now,
                not_after,
            }));
        }
        Ok(id)
    }

    /// The upstream mode's rollover step: switch to a staged replacement when due, retire a
    /// replaced anchor when its last leaf expired.
    pub(super) async fn upstream_step<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
        push: Push,
    ) -> Result<(RolloverOutcome, Option<Wait>), AuthorityError> {
        let mut outcome = RolloverOutcome::Nothing;
        let mut waiting = None;
        if let Some(st) = self.up.staged() {
            let keys = self.current.load_full();
            let current = self.up.current.lock().ok().and_then(|c| c.clone());
            let same_anchor = current.as_ref() == Some(&st.anchor);
            let cur = RootFacts {
                id: "upstream".into(),
                not_before: UNIX_EPOCH,
                not_after: keys.root_not_after,
                created_at: UNIX_EPOCH,
                activate_at: UNIX_EPOCH,
                sha256: [0; 32],
            };
            let next = RootFacts {
                id: st.id.clone(),
                not_before: st.published_at,
                not_after: st.not_after,
                created_at: st.published_at,
                activate_at: st.not_after,
                sha256: sha256(&st.anchor),
            };
            let lag = |since: SystemTime, h: &[u8; 32]| self.reports.laggards(since, now, h);
            let step = if push == Push::Now || same_anchor {
                // Same anchor (a renewed upstream intermediate): every caller already trusts it.
                Step::Switch {
                    successor: st.id.clone(),
                    forced: push == Push::Now && !same_anchor,
                    unconfirmed: Vec::new(),
                }
            } else {
                rollover::next_step(
                    &[cur, next],
                    now,
                    &self.lifetimes.rollover,
                    self.observed_since,
                    lag,
                )
            };
            match step {
                Step::Switch {
                    forced,
                    unconfirmed,
                    ..
                } => {
                    self.switch_upstream(store, &st, current, forced, &unconfirmed, now)
                        .await?;
                    outcome = RolloverOutcome::Switched {
                        root: st.id.clone(),
                        forced,
                    };
                }
                Step::Wait(w) => {
                    waiting = Some(w);
                    outcome = RolloverOutcome::Waiting;
                }
                _ => {}
            }
        }
        let retiring = self.up.retiring.lock().ok().and_then(|r| r.clone());
        if let Some((anchor, until)) = retiring
            && now >= until
        {
            let anchors: Vec<_> = self
                .roots
                .load()
                .anchors
                .iter()
                .filter(|a| **a != anchor)
                .cloned()
                .collect();
            store
                .write(Write::Audit(AuditEvent {
                    at: unix(now),
                    action: "upstream.retired".into(),
                    subject: crate::store::hex(&sha256(&anchor)),
                    outcome: "ok".into(),
                    detail: json!({"phase": "retired"}),
                }))
                .await?;
            self.set_anchors(anchors)?;
            if let Ok(mut r) = self.up.retiring.lock() {
                *r = None;
            }
            if outcome == RolloverOutcome::Nothing {
                outcome = RolloverOutcome::BundleChanged;
            }
        }
        Ok((outcome, waiting))
    }

    async fn switch_upstream<S: Store>(
        &self,
        store: &S,
        st: &Staged,
        old_anchor: Option<CertificateDer<'static>>,
        forced: bool,
        unconfirmed: &[String],
        now: SystemTime,
    ) -> Result<(), AuthorityError> {
        let (issuer, _, between, root_not_after) = import_upstream(Upstream {
            chain: st.chain.clone(),
            key: st.key.clone_key(),
        })?;
        let (irec, signer) = new_intermediate_record(
            &self.kek,
            &self.td,
            &self.lifetimes,
            &issuer,
            root_not_after,
            now,
            now,
        )?;
        store
            .write(Write::PutCaKey(
                irec.clone(),
                key_event(&irec, now, "created"),
            ))
            .await?;
        let rec = store
            .ca_keys()
            .await?
            .into_iter()
            .find(|r| r.id == st.id)
            .ok_or_else(|| AuthorityError::Upstream(format!("{} is gone from the store", st.id)))?;
        activate_record(store, &self.kek, &rec, now, AuditEvent {
                    at: unix(now),
                    action: "upstream.activated".into(),
                    subject: st.id.clone(),
                    outcome: "ok".into(),
                    detail: json!({"phase": "active", "signer": irec.id, "forced": forced, "unconfirmed_callers": unconfirmed}),
                })
            .await?;
        tracing::info!(upstream = %st.id, forced, "signing switched to the replacement upstream; replace the --upstream-cert/--upstream-key files too");
        let keys = self.current.load_full();
        let roots = self.roots.load_full();
        let old_end = keys.root_not_after;
        let updated = KeySet {
            active: Arc::new(signer.with_chain(&between)),
            next: None,
            jwt: keys.jwt.clone(),
            jwt_next: keys.jwt_next.clone(),
            jwt_published: keys.jwt_published.clone(),
            sequence: keys.sequence,
            bundle: keys.bundle.clone(),
            root_not_after,
        };
        let updated = with_bundle(updated, &self.td, &roots.anchors)?;
        self.roots.store(Arc::new(Roots {
            issuer: Arc::new(issuer),
            anchors: roots.anchors.clone(),
            chain: between,
        }));
        self.current.store(Arc::new(updated));
        if let Some(old) = old_anchor.filter(|a| *a != st.anchor)
            && let Ok(mut r) = self.up.retiring.lock()
        {
            let until = rollover::retires_at(now, self.lifetimes.rollover.max_leaf_ttl, old_end);
            *r = Some((old, until));
        }
        if let Ok(mut c) = self.up.current.lock() {
            *c = Some(st.anchor.clone());
        }
        if let Ok(mut s) = self.up.staged.lock() {
            *s = None;
        }
        Ok(())
    }
}
