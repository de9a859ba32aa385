//! The CA's signing keys: one or more roots (the bundle), the active signing intermediate and
//! the one prepared to follow it. The intermediate rotates by itself: the next one is made at
//! 1/2 of the active one's life and takes over at 5/6. A leaf never outlives its signer.
//!
//! The active signer is published through an `ArcSwap`, so issuance reads it without a lock
//! and rotation never pauses signing.
//!
//! Why this is one file of over 500 lines: roots, intermediates and JWT keys are one state machine
//! under one lock, with invariants that span it (a leaf never outlives its signer; a root is in the
//! bundle before it signs). The rollover policy is in `rollover.rs`, the imported-CA case in
//! `authority/upstream.rs`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use identity::jwt::JwtSigner;
use identity::x509::{
    BACKDATE, intermediate_params, ordered_serial, random_serial, root_params,
    svid_params_with_serial,
};
use identity::{KeyType, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

use crate::rollover::{self, Phase, Policy, Reports, RootFacts, Step, Wait};
use crate::seal::{Kek, SealError};
use crate::store::{AuditEvent, CaKeyRecord, KeyKind, Store, StoreError, Write};

mod upstream;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("failed to make a certificate: {0}")]
    Cert(String),
    #[error("the CA has no usable root: {0}")]
    NoRoot(String),
    #[error("upstream certificate or key is unusable: {0}")]
    Upstream(String),
    #[error("jwt signing key: {0}")]
    Jwt(#[from] identity::jwt::JwtError),
    #[error(
        "cannot unseal CA key {id} ({kind:?}): the sealed key does not match its database record (its certificate, activation time or, for a JWT key, validity was changed), or this is not the key-encryption key it was sealed with; restore the database from a backup or start with the right KEK"
    )]
    Binding { id: String, kind: KeyKind },
    #[error(
        "CA key {id} is sealed in the old format although it was sealed again, bound to its certificate, when this CA was upgraded (audit row key.reseal): an old copy of the key was put back into the database; restore the database from a backup"
    )]
    OldSealRestored { id: String },
    #[error("CA key {id} has an unreadable certificate: {detail}")]
    BadCert { id: String, detail: String },
    /// SECURITY: the CA refuses to sign rather than hand out a certificate that is expired or
    /// chains to an expired CA certificate.
    #[error("the CA's {what} expired at {not_after}; it signs nothing until {remedy}")]
    Expired {
        what: &'static str,
        not_after: i64,
        remedy: &'static str,
    },
}

impl AuthorityError {
    /// A stable code for refusals caused by CA certificates that expired.
    pub fn expired_code(&self) -> Option<&'static str> {
        match self {
            AuthorityError::Expired { what: "root", .. } => Some("ca_root_expired"),
            AuthorityError::Expired { .. } => Some("ca_signer_expired"),
            _ => None,
        }
    }
}

fn cert_err(e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Cert(e.to_string())
}

#[derive(Clone, Debug)]
pub struct Lifetimes {
    pub root: Duration,
    pub intermediate: Duration,
    /// When and how roots roll over (see `rollover`).
    pub rollover: Policy,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root: Duration::from_secs(365 * 86_400),
            intermediate: Duration::from_secs(7 * 86_400),
            rollover: Policy::default(),
        }
    }
}

/// An operator's root or intermediate that kith's intermediates are signed by.
pub struct Upstream {
    /// The upstream signing certificate first, then its issuers up to and including the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// A signing intermediate, ready to sign.
pub struct Signer {
    pub id: String,
    /// This intermediate, then any upstream intermediates: what follows a leaf in its chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub issuer: Issuer<'static, KeyPair>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub activate_at: SystemTime,
}

/// A JWT-SVID signing key with its schedule; it rotates like the signing intermediate.
pub struct JwtKey {
    pub signer: JwtSigner,
    pub not_before: SystemTime,
    pub activate_at: SystemTime,
}

/// What the CA signs with and what it publishes.
pub struct KeySet {
    pub active: Arc<Signer>,
    pub next: Option<Arc<Signer>>,
    pub jwt: Arc<JwtKey>,
    pub jwt_next: Option<Arc<JwtKey>>,
    /// Every JWT key whose tokens may still be in use: published until it expires.
    pub jwt_published: Vec<(identity::JwtAuthority, SystemTime)>,
    /// The bundle's sequence number: the count of keys ever published, so it only grows.
    pub sequence: u64,
    pub bundle: Arc<TrustBundle>,
    /// The root (or upstream) that signs intermediates, and when it expires.
    pub root_not_after: SystemTime,
}

pub struct Authority {
    td: TrustDomain,
    kek: Kek,
    lifetimes: Lifetimes,
    /// The root that signs intermediates and the anchors published; replaced on a rollover.
    roots: ArcSwap<Roots>,
    /// An operator's upstream CA: kith cannot roll it over, only take a replacement.
    upstream: bool,
    /// A replacement upstream waiting to take over, and the replaced one until it retires.
    up: upstream::State,
    current: ArcSwap<KeySet>,
    /// What callers said about their bundles, for the rollover's switch.
    pub reports: Reports,
    /// Reports are in memory: the rollover only trusts windows that began after this.
    observed_since: SystemTime,
    /// The rollover's latest view, for status and metrics.
    rollover_view: ArcSwap<RolloverView>,
    /// Serialises the maintenance steps (the timer and the admin verbs).
    steps: tokio::sync::Mutex<()>,
    /// The hour (unix / 3600) of the last upstream-expiry warning in the log.
    warned_hour: std::sync::atomic::AtomicI64,
}

/// The signing root and the anchors in the bundle.
pub struct Roots {
    pub issuer: Arc<Issuer<'static, KeyPair>>,
    pub anchors: Vec<CertificateDer<'static>>,
    /// Upstream intermediates between our intermediate and the anchor (empty when self-rooted).
    pub chain: Vec<CertificateDer<'static>>,
}

/// Each root with its phase, and what the rollover waits for.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RolloverView {
    pub mode: &'static str,
    pub roots: Vec<RootView>,
    /// What the switch to the published successor waits for, if it waits.
    pub waiting: Option<Wait>,
    /// When the successor of the signing root is (or was) due.
    pub successor_due_at: Option<i64>,
    /// The earliest end of a root or signer with no successor (unix seconds).
    pub outage_at: i64,
    /// Which of them it is: `root` or `signer`.
    pub outage_cause: &'static str,
    pub rollover_at: f64,
    /// Upstream mode: the upstream certificate ends within 30 days.
    pub upstream_expires_soon: bool,
    /// What an operator should do, if anything.
    pub warning: Option<String>,
}

/// How long before the upstream certificate's end the CA warns.
pub const UPSTREAM_WARNING: Duration = Duration::from_secs(30 * 86_400);

#[derive(Clone, Debug, serde::Serialize)]
pub struct RootView {
    pub id: String,
    pub sha256: String,
    pub not_before: i64,
    pub not_after: i64,
    pub created_at: i64,
    #[serde(flatten)]
    pub phase: Phase,
}

/// What `rollover` did.
#[derive(Debug, PartialEq, Eq)]
pub enum RolloverOutcome {
    Nothing,
    Published(String),
    Waiting,
    Switched {
        root: String,
        forced: bool,
    },
    /// Only the bundle changed (a root left it).
    BundleChanged,
}

/// How an operator pushes the rollover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Only what is due.
    None,
    /// Publish a successor now if there is none (the switch still waits).
    Start,
    /// Publish if needed and switch now, without waiting for callers.
    Now,
}

/// What rotation should do now: a pure function of time, unit-tested.
#[derive(Debug, PartialEq, Eq)]
pub enum Rotation {
    Nothing,
    PrepareNext,
    ActivateNext,
}

pub fn rotation_due(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    has_next: bool,
) -> Rotation {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let prepare_at = not_before + life / 2;
    let activate_at = not_before + life * 5 / 6;
    match (has_next, now >= activate_at, now >= prepare_at) {
        (true, true, _) => Rotation::ActivateNext,
        (false, _, true) => Rotation::PrepareNext,
        _ => Rotation::Nothing,
    }
}

impl Authority {
    /// Loads the keys from the store, creating the root (or importing the upstream), the first
    /// intermediate and the first JWT key on first start.
    pub async fn load_or_init<S: Store>(
        store: &S,
        kek: Kek,
        td: TrustDomain,
        lifetimes: Lifetimes,
        upstream: Option<Upstream>,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        // Old-format sealed keys are sealed again, bound to their certificates, first.
        prepare_records(store, &kek, store.ca_keys().await?, now).await?;
        let is_upstream = upstream.is_some();
        // A replacement imported by `kith ca upstream replace` wins over older flag files.
        let (upstream, staged, retiring) =
            upstream::at_start(store, &kek, upstream, lifetimes.rollover.max_leaf_ttl, now).await?;
        let (root_issuer, anchors, upstream_chain, root_not_after, root_subject) = match upstream {
            Some(up) => {
                let subject = up.chain.first().and_then(|c| subject_of(c));
                let (i, a, c, na) = import_upstream(up)?;
                (i, a, c, na, subject)
            }
            None => {
                let signing_root = signing_root_at_start(store, &kek, &td, &lifetimes, now).await?;
                let records = store.ca_keys().await?;
                // The bundle: the successor published before it signs, the signing root, and
                // replaced roots until their last leaf expired.
                let anchors = bundle_anchors(&records, now, &lifetimes.rollover);
                let key = unseal_key(&kek, &signing_root)?;
                let cert = CertificateDer::from(signing_root.cert_der.clone().unwrap_or_default());
                let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(cert_err)?;
                let subject = subject_of(&cert);
                (
                    issuer,
                    anchors,
                    Vec::new(),
                    at(signing_root.not_after),
                    subject,
                )
            }
        };
        let records = prepare_records(store, &kek, store.ca_keys().await?, now).await?;

        let live = |kind: KeyKind| -> Vec<CaKeyRecord> {
            let mut v: Vec<CaKeyRecord> = records
                .iter()
                .filter(|r| r.kind == kind && at(r.not_after) > now)
                // Only intermediates of the signing root: one prepared under a root that was
                // replaced since never signs.
                .filter(|r| {
                    kind != KeyKind::Intermediate
                        || root_subject.is_none()
                        || issuer_of(r.cert_der.as_deref().unwrap_or_default()) == root_subject
                })
                .cloned()
                .collect();
            v.sort_by_key(|r| r.activate_at);
            v
        };
        let split = |v: &[CaKeyRecord]| {
            let active = v.iter().rev().find(|r| at(r.activate_at) <= now).cloned();
            let next = v.iter().find(|r| at(r.activate_at) > now).cloned();
            (active, next)
        };

        let (active_rec, next_rec) = split(&live(KeyKind::Intermediate));
        let active = match active_rec {
            Some(rec) => load_signer(&kek, &rec, &upstream_chain)?,
            None => {
                // First start, or every intermediate expired while the CA was down.
                let (rec, signer) = new_intermediate_record(
                    &kek,
                    &td,
                    &lifetimes,
                    &root_issuer,
                    root_not_after,
                    now,
                    now,
                )?;
                store
                    .write(Write::PutCaKey(
                        rec.clone(),
                        key_event(&rec, now, "created"),
                    ))
                    .await?;
                signer.with_chain(&upstream_chain)
            }
        };
        let next = next_rec
            .map(|r| load_signer(&kek, &r, &upstream_chain))
            .transpose()?;

        let (jwt_rec, jwt_next_rec) = split(&live(KeyKind::Jwt));
        let jwt = match jwt_rec {
            Some(rec) => load_jwt(&kek, &rec)?,
            None => {
                let (rec, key) = new_jwt_record(&kek, &lifetimes, root_not_after, now, now)?;
                store
                    .write(Write::PutCaKey(
                        rec.clone(),
                        key_event(&rec, now, "created"),
                    ))
                    .await?;
                key
            }
        };
        let jwt_next = jwt_next_rec.map(|r| load_jwt(&kek, &r)).transpose()?;
        let mut jwt_published = Vec::new();
        for r in live(KeyKind::Jwt) {
            jwt_published.push((load_jwt(&kek, &r)?.signer.authority(), at(r.not_after)));
        }
        if !jwt_published
            .iter()
            .any(|(a, _)| a.key_id == jwt.signer.key_id())
        {
            jwt_published.push((jwt.signer.authority(), jwt.signer.not_after()));
        }
        let sequence = (store
            .ca_keys()
            .await?
            .iter()
            .filter(|r| r.kind != KeyKind::Intermediate)
            .count() as u64)
            .max(1);

        let keys = KeySet {
            active: Arc::new(active),
            next: next.map(Arc::new),
            jwt: Arc::new(jwt),
            jwt_next: jwt_next.map(Arc::new),
            jwt_published,
            sequence,
            bundle: Arc::new(TrustBundle::new(td.clone())),
            root_not_after,
        };
        // Upstream mode: a replaced anchor still retiring, and a replacement waiting, are
        // published beside the current anchor.
        let mut anchors = anchors;
        let current_anchor = anchors.first().cloned();
        for extra in [
            retiring.as_ref().map(|(a, _)| a.clone()),
            staged.as_ref().map(|s| s.anchor.clone()),
        ]
        .into_iter()
        .flatten()
        {
            if !anchors.contains(&extra) {
                anchors.push(extra);
            }
        }
        let keys = with_bundle(keys, &td, &anchors)?;
        if now >= root_not_after {
            // Upstream mode only (a kith root is replaced above): nothing can be signed until
            // the operator imports a new upstream certificate.
            tracing::error!(
                not_after = unix(root_not_after),
                "the upstream CA certificate has expired: the CA refuses to sign until it is replaced"
            );
        }
        let collecting = match &staged {
            Some(_) => true,
            None => {
                !is_upstream
                    && rollover::pending_successor(
                        &facts_of(&root_records(&store.ca_keys().await?)),
                        now,
                    )
                    .is_some()
            }
        };
        let reports = Reports::default();
        reports.collect(collecting);
        Ok(Self {
            td,
            kek,
            lifetimes,
            up: upstream::State::new(staged, current_anchor, retiring),
            roots: ArcSwap::from_pointee(Roots {
                issuer: Arc::new(root_issuer),
                anchors,
                chain: upstream_chain,
            }),
            upstream: is_upstream,
            current: ArcSwap::from_pointee(keys),
            reports,
            observed_since: now,
            rollover_view: ArcSwap::from_pointee(RolloverView::default()),
            steps: tokio::sync::Mutex::new(()),
            warned_hour: std::sync::atomic::AtomicI64::new(-1),
        })
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.current.load_full()
    }
    /// Replicas on a shared store: adopts what another replica prepared, activated or switched
    /// (intermediate, JWT key, root), by loading the key set from the store as a start would.
    /// The caller runs it when the stored keys changed. Not in upstream mode, where the
    /// upstream certificate comes from each replica's own files.
    pub async fn refresh<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
    ) -> Result<bool, AuthorityError> {
        if self.upstream {
            return Ok(false);
        }
        let _step = self.steps.lock().await;
        let fresh = Self::load_or_init(
            store,
            self.kek.clone(),
            self.td.clone(),
            self.lifetimes.clone(),
            None,
            now,
        )
        .await?;
        let (old, new) = (self.keys(), fresh.keys());
        let ids = |k: &KeySet| {
            (
                k.active.id.clone(),
                k.next.as_ref().map(|n| n.id.clone()),
                k.jwt.signer.key_id().to_owned(),
                k.jwt_next.as_ref().map(|n| n.signer.key_id().to_owned()),
                k.root_not_after,
                k.jwt_published.len(),
            )
        };
        let changed = ids(&old) != ids(&new)
            || self.roots.load().anchors.len() != fresh.roots.load().anchors.len();
        if changed {
            // The bundle's sequence only grows, also across a refresh.
            let keys = KeySet {
                active: new.active.clone(),
                next: new.next.clone(),
                jwt: new.jwt.clone(),
                jwt_next: new.jwt_next.clone(),
                jwt_published: new.jwt_published.clone(),
                sequence: new.sequence.max(old.sequence + 1),
                bundle: new.bundle.clone(),
                root_not_after: new.root_not_after,
            };
            self.roots.store(fresh.roots.load_full());
            self.current.store(Arc::new(with_bundle(
                keys,
                &self.td,
                &self.roots.load().anchors,
            )?));
            self.reports.collect(fresh.reports.collecting());
        }
        Ok(changed)
    }

    /// Unseals the active signer's key as stored, with the key-encryption key this process
    /// holds, and checks it is the key being signed with: proves the KEK still opens what the
    /// database holds (a replaced KEK, or a database sealed under another one, fails here).
    pub async fn check_kek(&self, store: &impl Store) -> Result<(), String> {
        let keys = self.keys();
        let record = store
            .ca_keys()
            .await
            .map_err(|e| format!("cannot read the CA keys: {e}"))?
            .into_iter()
            .find(|r| r.id == keys.active.id)
            .ok_or_else(|| format!("the active signer {} is not in the store", keys.active.id))?;
        let key = unseal_key(&self.kek, &record).map_err(|e| e.to_string())?;
        if key.public_key_raw() != keys.active.issuer.key().public_key_raw() {
            return Err(format!(
                "the stored key of signer {} is not the one in use",
                keys.active.id
            ));
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.current.load().bundle.clone()
    }

    /// Runs the rotation steps that are due for the signing intermediate and the JWT key;
    /// returns what happened to the intermediate.
    pub async fn rotate<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
    ) -> Result<Rotation, AuthorityError> {
        let _step = self.steps.lock().await;
        self.rotate_locked(store, now).await
    }

    async fn rotate_locked<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
    ) -> Result<Rotation, AuthorityError> {
        let keys = self.current.load_full();
        let roots = self.roots.load_full();
        // SECURITY: past the root's end every new key would be born expired: make none.
        if now >= keys.root_not_after {
            return Err(AuthorityError::Expired {
                what: "root",
                not_after: unix(keys.root_not_after),
                remedy: "a new root takes over",
            });
        }
        let due = rotation_due(
            now,
            keys.active.not_before,
            keys.active.not_after,
            keys.next.is_some(),
        );
        let jwt_due = rotation_due(
            now,
            keys.jwt.not_before,
            keys.jwt.signer.not_after(),
            keys.jwt_next.is_some(),
        );
        if due == Rotation::Nothing && jwt_due == Rotation::Nothing {
            return Ok(due);
        }
        let activate_at =
            |nb: SystemTime, na: SystemTime| nb + na.duration_since(nb).unwrap_or_default() * 5 / 6;
        let (mut active, mut next) = (keys.active.clone(), keys.next.clone());
        match due {
            Rotation::Nothing => {}
            Rotation::PrepareNext => {
                let when = activate_at(active.not_before, active.not_after);
                let (rec, signer) = new_intermediate_record(
                    &self.kek,
                    &self.td,
                    &self.lifetimes,
                    &roots.issuer,
                    keys.root_not_after,
                    now,
                    when,
                )?;
                store
                    .write(Write::PutCaKey(
                        rec.clone(),
                        key_event(&rec, now, "prepared"),
                    ))
                    .await?;
                next = Some(Arc::new(signer.with_chain(&roots.chain)));
            }
            Rotation::ActivateNext => {
                if let Some(n) = next.take().filter(|n| n.not_after > now) {
                    store
                        .write(Write::Audit(activate_event(&n.id, &active.id, now)))
                        .await?;
                    active = n;
                }
            }
        }
        let (mut jwt, mut jwt_next) = (keys.jwt.clone(), keys.jwt_next.clone());
        let mut jwt_published: Vec<_> = keys
            .jwt_published
            .iter()
            .filter(|(_, na)| *na > now)
            .cloned()
            .collect();
        let mut sequence = keys.sequence;
        match jwt_due {
            Rotation::Nothing => {}
            Rotation::PrepareNext => {
                let when = activate_at(jwt.not_before, jwt.signer.not_after());
                let (rec, key) =
                    new_jwt_record(&self.kek, &self.lifetimes, keys.root_not_after, now, when)?;
                store
                    .write(Write::PutCaKey(
                        rec.clone(),
                        key_event(&rec, now, "prepared"),
                    ))
                    .await?;
                // Published now, used from its activation on: verifiers learn it first.
                jwt_published.push((key.signer.authority(), key.signer.not_after()));
                sequence += 1;
                jwt_next = Some(Arc::new(key));
            }
            Rotation::ActivateNext => {
                if let Some(n) = jwt_next.take() {
                    store
                        .write(Write::Audit(activate_event(
                            n.signer.key_id(),
                            jwt.signer.key_id(),
                            now,
                        )))
                        .await?;
                    jwt = n;
                }
            }
        }
        if jwt_published.len() != keys.jwt_published.len() && jwt_due != Rotation::PrepareNext {
            sequence += 1;
        }
        let updated = KeySet {
            active,
            next,
            jwt,
            jwt_next,
            jwt_published,
            sequence,
            bundle: keys.bundle.clone(),
            root_not_after: keys.root_not_after,
        };
        self.current
            .store(Arc::new(with_bundle(updated, &self.td, &roots.anchors)?));
        Ok(due)
    }

    /// Records what a caller reported about its bundle on a renewal: the hex SHA-256 of each
    /// root it holds (None when it did not say). Bad hex is refused.
    pub fn note_held_roots(
        &self,
        caller: &str,
        held: Option<&[String]>,
        expires: SystemTime,
        now: SystemTime,
    ) -> Result<(), String> {
        let held = held.map(rollover::parse_held).transpose()?;
        self.reports.note(
            caller,
            rollover::Report {
                at: now,
                expires,
                held,
            },
        );
        Ok(())
    }

    /// The roots, their phases and what the rollover waits for, as of the last step.
    pub fn rollover_view(&self) -> Arc<RolloverView> {
        self.rollover_view.load_full()
    }

    pub fn is_upstream(&self) -> bool {
        self.upstream
    }

    /// Runs the root rollover steps that are due (or that an operator pushes): publish a
    /// successor, switch signing to it, drop retired roots from the bundle. Every phase is
    /// audited.
    pub async fn rollover<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
        push: Push,
    ) -> Result<RolloverOutcome, AuthorityError> {
        let _step = self.steps.lock().await;
        let mut outcome = RolloverOutcome::Nothing;
        let mut waiting = None;
        // Reports only matter once a successor is published (they are counted from then on).
        let pending = if self.upstream {
            self.up.staged_not_after().is_some()
        } else {
            rollover::pending_successor(&facts_of(&root_records(&store.ca_keys().await?)), now)
                .is_some()
        };
        self.reports.collect(pending);
        if self.upstream {
            (outcome, waiting) = self.upstream_step(store, now, push).await?;
        } else {
            let policy = &self.lifetimes.rollover;
            let lag = |since: SystemTime, h: &[u8; 32]| self.reports.laggards(since, now, h);
            let records = root_records(&store.ca_keys().await?);
            let facts = facts_of(&records);
            let mut step = rollover::next_step(&facts, now, policy, self.observed_since, lag);
            if push != Push::None && step == Step::Nothing {
                step = Step::MakeSuccessor;
            }
            if step == Step::MakeSuccessor {
                let rec =
                    create_root_as(store, &self.kek, &self.td, &self.lifetimes, now, true).await?;
                tracing::info!(root = %rec.id, not_after = rec.not_after, "root rollover: published a successor root in the bundle");
                self.reports.collect(true);
                outcome = RolloverOutcome::Published(rec.id);
                let records = root_records(&store.ca_keys().await?);
                let facts = facts_of(&records);
                step = rollover::next_step(&facts, now, policy, self.observed_since, lag);
            }
            if push == Push::Now
                && let Some(s) = rollover::pending_successor(
                    &facts_of(&root_records(&store.ca_keys().await?)),
                    now,
                )
            {
                let unconfirmed = self.reports.laggards(self.observed_since, now, &s.sha256);
                step = Step::Switch {
                    successor: s.id.clone(),
                    forced: true,
                    unconfirmed,
                };
            }
            match step {
                Step::Switch {
                    successor,
                    forced,
                    unconfirmed,
                } => {
                    self.switch_root(store, &successor, forced, &unconfirmed, now)
                        .await?;
                    outcome = RolloverOutcome::Switched {
                        root: successor,
                        forced,
                    };
                }
                Step::Wait(w) => {
                    waiting = Some(w);
                    if outcome == RolloverOutcome::Nothing {
                        outcome = RolloverOutcome::Waiting;
                    }
                }
                Step::Nothing | Step::MakeSuccessor => {}
            }
            // The bundle follows the phases: a published successor joins, a retired root
            // leaves.
            let records = store.ca_keys().await?;
            let anchors = bundle_anchors(&records, now, policy);
            let current = self.roots.load_full();
            if anchors != current.anchors {
                let leaving: Vec<String> = root_records(&records)
                    .iter()
                    .filter(|r| {
                        let cert = r.cert_der.as_deref().unwrap_or_default();
                        current.anchors.iter().any(|a| a.as_ref() == cert)
                            && !anchors.iter().any(|a| a.as_ref() == cert)
                    })
                    .map(|r| r.id.clone())
                    .collect();
                for id in &leaving {
                    store
                        .write(Write::Audit(AuditEvent {
                            at: unix(now),
                            action: "root.retired".into(),
                            subject: id.clone(),
                            outcome: "ok".into(),
                            detail: json!({"phase": "retired", "note": "left the bundle: every certificate under it has expired"}),
                        }))
                        .await?;
                    tracing::info!(root = %id, "root rollover: the replaced root left the bundle");
                }
                self.set_anchors(anchors)?;
                if outcome == RolloverOutcome::Nothing || outcome == RolloverOutcome::Waiting {
                    outcome = RolloverOutcome::BundleChanged;
                }
            }
        }
        self.update_view(store, now, waiting).await?;
        Ok(outcome)
    }

    /// Publishes a new set of anchors (the bundle's sequence grows).
    fn set_anchors(&self, anchors: Vec<CertificateDer<'static>>) -> Result<(), AuthorityError> {
        let roots = self.roots.load_full();
        let keys = self.current.load_full();
        let updated = KeySet {
            active: keys.active.clone(),
            next: keys.next.clone(),
            jwt: keys.jwt.clone(),
            jwt_next: keys.jwt_next.clone(),
            jwt_published: keys.jwt_published.clone(),
            sequence: keys.sequence + 1,
            bundle: keys.bundle.clone(),
            root_not_after: keys.root_not_after,
        };
        let updated = with_bundle(updated, &self.td, &anchors)?;
        self.roots.store(Arc::new(Roots {
            issuer: roots.issuer.clone(),
            anchors,
            chain: roots.chain.clone(),
        }));
        self.current.store(Arc::new(updated));
        Ok(())
    }

    /// Makes `successor` the signing root, with a fresh intermediate under it that signs from
    /// now on.
    async fn switch_root<S: Store>(
        &self,
        store: &S,
        successor: &str,
        forced: bool,
        unconfirmed: &[String],
        now: SystemTime,
    ) -> Result<(), AuthorityError> {
        let records = root_records(&store.ca_keys().await?);
        let rec = records
            .iter()
            .find(|r| r.id == successor)
            .ok_or_else(|| AuthorityError::NoRoot(format!("successor {successor} is gone")))?;
        let previous = rollover::signing_root(&facts_of(&records), now).map(|r| r.id.clone());
        let key = unseal_key(&self.kek, rec)?;
        let cert = CertificateDer::from(rec.cert_der.clone().unwrap_or_default());
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(cert_err)?;
        let root_not_after = at(rec.not_after);
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
        activate_record(store, &self.kek, rec, now, AuditEvent {
                    at: unix(now),
                    action: "root.activated".into(),
                    subject: rec.id.clone(),
                    outcome: "ok".into(),
                    detail: json!({"phase": "active", "previous": previous, "signer": irec.id, "forced": forced, "unconfirmed_callers": unconfirmed}),
                })
            .await?;
        if forced {
            tracing::warn!(root = %rec.id, unconfirmed = ?unconfirmed, "root rollover: switched signing to the new root without every caller confirming it holds it; callers that do not hold it fail to verify new certificates until they fetch the bundle");
        } else {
            tracing::info!(root = %rec.id, "root rollover: every caller holds the new root; signing switched to it");
        }
        let keys = self.current.load_full();
        let roots = self.roots.load_full();
        let updated = KeySet {
            active: Arc::new(signer.with_chain(&roots.chain)),
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
            chain: roots.chain.clone(),
        }));
        self.current.store(Arc::new(updated));
        Ok(())
    }

    async fn update_view<S: Store>(
        &self,
        store: &S,
        now: SystemTime,
        waiting: Option<Wait>,
    ) -> Result<(), AuthorityError> {
        let keys = self.current.load_full();
        let policy = &self.lifetimes.rollover;
        let view = if self.upstream {
            let staged_end = self.up.staged_not_after();
            // A replacement already imported answers the warning.
            let soon = now + UPSTREAM_WARNING >= keys.root_not_after && staged_end.is_none();
            let warning = soon.then(|| {
                format!(
                    "the upstream CA certificate ends in {}s: import its replacement with `kith ca upstream replace --cert --key` (kith cannot roll an operator's root)",
                    unix(keys.root_not_after) - unix(now)
                )
            });
            if let Some(w) = &warning {
                let hour = unix(now) / 3600;
                if self
                    .warned_hour
                    .swap(hour, std::sync::atomic::Ordering::Relaxed)
                    != hour
                {
                    tracing::warn!("{w}");
                }
            }
            let outage = rollover::outage(
                keys.root_not_after,
                staged_end,
                keys.active.not_after,
                keys.next.as_ref().map(|n| n.not_after),
            );
            RolloverView {
                upstream_expires_soon: soon,
                warning,
                mode: "upstream",
                roots: self.up.views(now, keys.root_not_after),
                waiting,
                successor_due_at: None,
                outage_at: unix(outage.0),
                outage_cause: outage.1,
                rollover_at: policy.rollover_at,
            }
        } else {
            let records = root_records(&store.ca_keys().await?);
            let facts = facts_of(&records);
            let phases = rollover::phases(&facts, now, policy.max_leaf_ttl);
            let successor = rollover::pending_successor(&facts, now);
            let roots = facts
                .iter()
                .zip(phases)
                .filter(|(f, p)| *p != Phase::Retired || f.not_after > now)
                .map(|(f, phase)| RootView {
                    id: f.id.clone(),
                    sha256: crate::store::hex(&f.sha256),
                    not_before: unix(f.not_before),
                    not_after: unix(f.not_after),
                    created_at: unix(f.created_at),
                    phase,
                })
                .collect();
            let outage = rollover::outage(
                keys.root_not_after,
                successor.map(|s| s.not_after),
                keys.active.not_after,
                keys.next.as_ref().map(|n| n.not_after),
            );
            RolloverView {
                mode: "self",
                roots,
                waiting,
                successor_due_at: rollover::signing_root(&facts, now)
                    .map(|r| unix(rollover::successor_due_at(r, policy.rollover_at))),
                outage_at: unix(outage.0),
                outage_cause: outage.1,
                rollover_at: policy.rollover_at,
                upstream_expires_soon: false,
                warning: None,
            }
        };
        self.rollover_view.store(Arc::new(view));
        Ok(())
    }

    /// Signs an X509-SVID for `id` over `public_key` (from a checked CSR). The TTL is capped by
    /// the active signer's own NotAfter. Returns the chain (leaf first), the serial and NotAfter.
    pub fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        dns: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, AuthorityError> {
        let keys = self.current.load();
        let signer = &keys.active;
        // SECURITY: never sign under an expired root or signer, and never make a certificate
        // that is expired when it is made (its NotAfter would not be after its NotBefore).
        if now >= keys.root_not_after {
            return Err(AuthorityError::Expired {
                what: "root",
                not_after: unix(keys.root_not_after),
                remedy: if self.upstream {
                    "a new upstream certificate is imported (`kith ca upstream replace`)"
                } else {
                    "a new root takes over (`kith ca root rotate --now`, see the break-glass runbook)"
                },
            });
        }
        if now >= signer.not_after {
            return Err(AuthorityError::Expired {
                what: "signing intermediate",
                not_after: unix(signer.not_after),
                remedy: "the next signer is made (the maintenance loop retries every 5 s)",
            });
        }
        let not_after = (now + ttl).min(signer.not_after);
        let serial = ordered_serial(now).map_err(cert_err)?;
        let params = svid_params_with_serial(id, dns, &[], now - BACKDATE, not_after, serial)
            .map_err(cert_err)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default();
        let leaf = params
            .signed_by(public_key, &signer.issuer)
            .map_err(cert_err)?;
        let mut chain = Vec::with_capacity(1 + signer.chain.len());
        chain.push(leaf.der().clone());
        chain.extend(signer.chain.iter().cloned());
        Ok(Issued {
            chain,
            serial,
            not_after: identity::x509::from_offset(identity::x509::to_offset(not_after)),
        })
    }
}

pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: Vec<u8>,
    pub not_after: SystemTime,
}

impl Signer {
    fn with_chain(mut self, upstream: &[CertificateDer<'static>]) -> Self {
        self.chain.extend(upstream.iter().cloned());
        self
    }
}

async fn create_root<S: Store>(
    store: &S,
    kek: &Kek,
    td: &TrustDomain,
    lifetimes: &Lifetimes,
    now: SystemTime,
) -> Result<CaKeyRecord, AuthorityError> {
    create_root_as(store, kek, td, lifetimes, now, false).await
}

/// Makes a root; a `successor` is published but pending: its activation is its own end.
async fn create_root_as<S: Store>(
    store: &S,
    kek: &Kek,
    td: &TrustDomain,
    lifetimes: &Lifetimes,
    now: SystemTime,
    successor: bool,
) -> Result<CaKeyRecord, AuthorityError> {
    let key = KeyType::P256.generate().map_err(cert_err)?;
    let id = format!("root-{}", short_id()?);
    let params = root_params(
        td,
        &format!("kith root {id}"),
        now - BACKDATE,
        now + lifetimes.root,
    )
    .map_err(cert_err)?;
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let mut rec = CaKeyRecord {
        sealed_key: Vec::new(),
        id,
        kind: KeyKind::Root,
        cert_der: Some(cert.der().to_vec()),
        not_before: unix(now - BACKDATE),
        not_after: unix(now + lifetimes.root),
        activate_at: if successor {
            unix(now + lifetimes.root)
        } else {
            unix(now - BACKDATE)
        },
        created_at: unix(now),
    };
    rec.sealed_key = kek.seal(&binding(&rec), key.serialize_der().as_slice())?;
    let event = if successor {
        AuditEvent {
            at: unix(now),
            action: "root.published".into(),
            subject: rec.id.clone(),
            outcome: "ok".into(),
            detail: json!({"phase": "published", "sha256": crate::store::hex(&sha256(rec.cert_der.as_deref().unwrap_or_default())), "not_after": rec.not_after, "note": "in the bundle beside the signing root; signs once every caller holds it"}),
        }
    } else {
        key_event(&rec, now, "created")
    };
    store.write(Write::PutCaKey(rec.clone(), event)).await?;
    Ok(rec)
}

#[allow(clippy::type_complexity)]
fn import_upstream(
    up: Upstream,
) -> Result<
    (
        Issuer<'static, KeyPair>,
        Vec<CertificateDer<'static>>,
        Vec<CertificateDer<'static>>,
        SystemTime,
    ),
    AuthorityError,
> {
    let first = up
        .chain
        .first()
        .ok_or_else(|| AuthorityError::Upstream("no certificate".into()))?;
    let key =
        KeyPair::try_from(&up.key).map_err(|e| AuthorityError::Upstream(format!("key: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| AuthorityError::Upstream(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(AuthorityError::Upstream(
            "the upstream certificate is not a CA".into(),
        ));
    }
    use rcgen::PublicKeyData;
    if key.subject_public_key_info() != parsed.public_key().raw {
        return Err(AuthorityError::Upstream(
            "the key does not belong to the upstream certificate".into(),
        ));
    }
    let not_after = identity::x509::from_offset(parsed.validity().not_after.to_datetime());
    let self_signed = parsed.subject() == parsed.issuer();
    let issuer = Issuer::from_ca_cert_der(first, key)
        .map_err(|e| AuthorityError::Upstream(e.to_string()))?;
    if self_signed {
        return Ok((issuer, vec![first.clone()], Vec::new(), not_after));
    }
    // An upstream intermediate: the chain's last certificate is the anchor; everything from
    // the upstream certificate to just below the anchor follows our intermediate in chains.
    let anchor = up
        .chain
        .last()
        .cloned()
        .ok_or_else(|| AuthorityError::Upstream("no root".into()))?;
    if up.chain.len() < 2 {
        return Err(AuthorityError::Upstream(
            "an upstream intermediate needs its chain up to the root in --upstream-cert".into(),
        ));
    }
    let between = up.chain[..up.chain.len() - 1].to_vec();
    Ok((issuer, vec![anchor], between, not_after))
}

fn new_intermediate_record(
    kek: &Kek,
    td: &TrustDomain,
    lifetimes: &Lifetimes,
    root: &Issuer<'_, KeyPair>,
    root_not_after: SystemTime,
    now: SystemTime,
    activate_at: SystemTime,
) -> Result<(CaKeyRecord, Signer), AuthorityError> {
    // SECURITY: an expired root makes no intermediate (it would be born expired).
    if now + Duration::from_secs(1) >= root_not_after {
        return Err(AuthorityError::Expired {
            what: "root",
            not_after: unix(root_not_after),
            remedy: "a new root takes over",
        });
    }
    let key = KeyType::P256.generate().map_err(cert_err)?;
    let id = format!("int-{}", short_id()?);
    // SECURITY: a CA certificate never outlives the one that signed it.
    let not_after = identity::x509::from_offset(identity::x509::to_offset(
        (now + lifetimes.intermediate).min(root_not_after),
    ));
    let not_before = identity::x509::from_offset(identity::x509::to_offset(now - BACKDATE));
    let params = intermediate_params(td, &format!("kith signer {id}"), not_before, not_after)
        .map_err(cert_err)?;
    let cert = params.signed_by(&key, root).map_err(cert_err)?;
    let mut rec = CaKeyRecord {
        id: id.clone(),
        kind: KeyKind::Intermediate,
        cert_der: Some(cert.der().to_vec()),
        sealed_key: Vec::new(),
        not_before: unix(not_before),
        not_after: unix(not_after),
        activate_at: unix(activate_at),
        created_at: unix(now),
    };
    rec.sealed_key = kek.seal(&binding(&rec), key.serialize_der().as_slice())?;
    let signer = Signer {
        id,
        chain: vec![cert.der().clone()],
        issuer: Issuer::new(params, key),
        not_before,
        not_after,
        activate_at,
    };
    Ok((rec, signer))
}

fn load_signer(
    kek: &Kek,
    r: &CaKeyRecord,
    upstream: &[CertificateDer<'static>],
) -> Result<Signer, AuthorityError> {
    let key = unseal_key(kek, r)?;
    let cert = CertificateDer::from(r.cert_der.clone().unwrap_or_default());
    let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(cert_err)?;
    let mut chain = vec![cert];
    chain.extend(upstream.iter().cloned());
    Ok(Signer {
        id: r.id.clone(),
        chain,
        issuer,
        not_before: at(r.not_before),
        not_after: at(r.not_after),
        activate_at: at(r.activate_at),
    })
}

/// The root at start: the signing one if it is still valid; else a published successor takes
/// over at once; else (break-glass: the CA was down past its root's end) a new root is made, and
/// every agent must be bootstrapped again with the new bundle.
async fn signing_root_at_start<S: Store>(
    store: &S,
    kek: &Kek,
    td: &TrustDomain,
    lifetimes: &Lifetimes,
    now: SystemTime,
) -> Result<CaKeyRecord, AuthorityError> {
    let records = root_records(&store.ca_keys().await?);
    let facts = facts_of(&records);
    let by_id = |id: &str| records.iter().find(|r| r.id == id).cloned();
    let signing = rollover::signing_root(&facts, now);
    if let Some(f) = signing.filter(|f| f.not_after > now) {
        return by_id(&f.id).ok_or_else(|| AuthorityError::NoRoot(f.id.clone()));
    }
    if let Some(s) = rollover::pending_successor(&facts, now) {
        tracing::error!(root = %s.id, "the signing root expired while the CA was down; the published successor takes over now");
        let rec = by_id(&s.id).ok_or_else(|| AuthorityError::NoRoot(s.id.clone()))?;
        let rec = activate_record(store, kek, &rec, now, AuditEvent {
                    at: unix(now),
                    action: "root.activated".into(),
                    subject: s.id.clone(),
                    outcome: "ok".into(),
                    detail: json!({"phase": "active", "previous": signing.map(|r| r.id.clone()), "forced": true, "reason": "the signing root expired while the CA was down"}),
                })
            .await?;
        return Ok(rec);
    }
    if let Some(old) = signing {
        tracing::error!(root = %old.id, not_after = unix(old.not_after), "BREAK-GLASS: the root expired while the CA was down and no successor was published; making a new root. Every agent must be bootstrapped again with the new bundle (see README, break-glass runbook)");
        store
            .write(Write::Audit(AuditEvent {
                at: unix(now),
                action: "root.break_glass".into(),
                subject: old.id.clone(),
                outcome: "expired".into(),
                detail: json!({"not_after": unix(old.not_after), "note": "a new root replaces it; agents need the new bundle"}),
            }))
            .await?;
    }
    create_root(store, kek, td, lifetimes, now).await
}

/// The root records, their validity read from their certificates (never the columns).
fn root_records(records: &[CaKeyRecord]) -> Vec<CaKeyRecord> {
    records
        .iter()
        .filter(|r| r.kind == KeyKind::Root)
        .cloned()
        .map(|mut r| {
            if let Some((nb, na)) = r.cert_der.as_deref().and_then(|c| cert_validity(c).ok()) {
                (r.not_before, r.not_after) = (nb, na);
            }
            r
        })
        .collect()
}

/// Moves a CA key's activation to `now`; its seal binds the activation time, so the key is
/// sealed again with the new binding in the same write.
async fn activate_record<S: Store>(
    store: &S,
    kek: &Kek,
    rec: &CaKeyRecord,
    now: SystemTime,
    audit: AuditEvent,
) -> Result<CaKeyRecord, AuthorityError> {
    let der = open_sealed(kek, rec)?;
    let mut moved = rec.clone();
    moved.activate_at = unix(now);
    moved.sealed_key = kek.seal(&binding(&moved), &der)?;
    store
        .write(Write::ActivateCaKey {
            id: moved.id.clone(),
            activate_at: moved.activate_at,
            sealed_key: moved.sealed_key.clone(),
            audit,
        })
        .await?;
    Ok(moved)
}

fn facts_of(roots: &[CaKeyRecord]) -> Vec<RootFacts> {
    roots
        .iter()
        .map(|r| RootFacts {
            id: r.id.clone(),
            not_before: at(r.not_before),
            not_after: at(r.not_after),
            created_at: at(r.created_at),
            activate_at: at(r.activate_at),
            sha256: sha256(r.cert_der.as_deref().unwrap_or_default()),
        })
        .collect()
}

/// The anchors of the bundle: every root whose phase keeps it there.
fn bundle_anchors(
    records: &[CaKeyRecord],
    now: SystemTime,
    policy: &Policy,
) -> Vec<CertificateDer<'static>> {
    let roots = root_records(records);
    let phases = rollover::phases(&facts_of(&roots), now, policy.max_leaf_ttl);
    roots
        .iter()
        .zip(phases)
        .filter(|(_, p)| p.in_bundle())
        .filter_map(|(r, _)| r.cert_der.clone().map(CertificateDer::from))
        .collect()
}

pub fn sha256(der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    out
}

fn subject_of(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.subject().as_raw().to_vec())
}

fn issuer_of(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.issuer().as_raw().to_vec())
}

fn unseal_key(kek: &Kek, r: &CaKeyRecord) -> Result<KeyPair, AuthorityError> {
    let der = open_sealed(kek, r)?;
    KeyPair::try_from(der.as_slice())
        .map_err(|e| AuthorityError::Cert(format!("key {}: {e}", r.id)))
}

/// A record's private key (PKCS#8), unsealed against its binding.
fn open_sealed(kek: &Kek, r: &CaKeyRecord) -> Result<Vec<u8>, AuthorityError> {
    let aad = if Kek::is_legacy(&r.sealed_key) {
        legacy_purpose(r.kind, &r.id)
    } else {
        binding(r)
    };
    kek.unseal(&aad, &r.sealed_key).map_err(|e| match e {
        SealError::Unseal(_) => AuthorityError::Binding {
            id: r.id.clone(),
            kind: r.kind,
        },
        other => other.into(),
    })
}

/// The associated data that binds a sealed key to what it is for: its kind and id, the
/// SHA-256 of its certificate and its activation time. A JWT key has no certificate, so its
/// validity is bound instead. Whoever can write the database cannot pair a key with another
/// certificate, move its activation, or stretch a JWT key's life: the key no longer unseals.
pub fn binding(r: &CaKeyRecord) -> String {
    match &r.cert_der {
        Some(cert) => format!(
            "kith-ca:v2:{:?}:{}:cert-sha256={}:activate_at={}",
            r.kind,
            r.id,
            crate::store::hex(ring::digest::digest(&ring::digest::SHA256, cert).as_ref()),
            r.activate_at
        ),
        None => format!(
            "kith-ca:v2:{:?}:{}:not_before={}:not_after={}:activate_at={}",
            r.kind, r.id, r.not_before, r.not_after, r.activate_at
        ),
    }
}

/// What kith bound before the certificate was: the key's kind and id only.
fn legacy_purpose(kind: KeyKind, id: &str) -> String {
    format!("kith-ca:{kind:?}:{id}")
}

/// The stored keys as the CA may trust them. A key's validity is read from its certificate,
/// never from the database's columns (which are kept for listing and for JWT keys). A key
/// sealed by an older kith, bound to its kind and id only, is sealed again with its full
/// binding, once.
///
/// SECURITY: until that happens, someone who can write the database could pair such a key with
/// another certificate. After it, putting the old blob back is refused while the `key.reseal`
/// audit row stands, and deleting that row breaks the audit chain.
async fn prepare_records<S: Store>(
    store: &S,
    kek: &Kek,
    records: Vec<CaKeyRecord>,
    now: SystemTime,
) -> Result<Vec<CaKeyRecord>, AuthorityError> {
    let mut out = Vec::with_capacity(records.len());
    for mut r in records {
        if let Some(der) = &r.cert_der {
            let (nb, na) = cert_validity(der).map_err(|detail| AuthorityError::BadCert {
                id: r.id.clone(),
                detail,
            })?;
            if (nb, na) != (r.not_before, r.not_after) {
                tracing::warn!(
                    key = %r.id,
                    db_not_before = r.not_before,
                    db_not_after = r.not_after,
                    cert_not_before = nb,
                    cert_not_after = na,
                    "the database's validity columns for this CA key disagree with its certificate; using the certificate's"
                );
            }
            (r.not_before, r.not_after) = (nb, na);
        }
        if Kek::is_legacy(&r.sealed_key) {
            if store.audit_has(RESEAL, &r.id).await? {
                return Err(AuthorityError::OldSealRestored { id: r.id });
            }
            let der = open_sealed(kek, &r)?;
            let sealed = kek.seal(&binding(&r), &der)?;
            let audit = AuditEvent {
                at: unix(now),
                action: RESEAL.into(),
                subject: r.id.clone(),
                outcome: "ok".into(),
                detail: json!({"kind": r.kind, "binding": "certificate"}),
            };
            store
                .write(Write::ResealCaKey {
                    id: r.id.clone(),
                    sealed_key: sealed.clone(),
                    audit,
                })
                .await?;
            tracing::info!(key = %r.id, "sealed a CA key again, now bound to its certificate");
            r.sealed_key = sealed;
        }
        out.push(r);
    }
    Ok(out)
}

/// The audit action of sealing an old-format key again.
const RESEAL: &str = "key.reseal";

/// NotBefore and NotAfter of a DER certificate, in unix seconds.
pub fn cert_validity(der: &[u8]) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The bundle for a key set: the anchors plus every published JWT key, so tokens signed by the
/// previous key still verify after a rotation.
fn with_bundle(
    mut keys: KeySet,
    td: &TrustDomain,
    anchors: &[CertificateDer<'static>],
) -> Result<KeySet, AuthorityError> {
    let mut bundle = TrustBundle::from_roots(td.clone(), anchors.to_vec())
        .map_err(|e| AuthorityError::NoRoot(e.to_string()))?;
    for (authority, _) in &keys.jwt_published {
        bundle.add_jwt_authority(authority.clone());
    }
    bundle.set_sequence(keys.sequence);
    bundle.set_refresh_hint(Duration::from_secs(300));
    keys.bundle = Arc::new(bundle);
    Ok(keys)
}

fn new_jwt_record(
    kek: &Kek,
    lifetimes: &Lifetimes,
    root_not_after: SystemTime,
    now: SystemTime,
    activate_at: SystemTime,
) -> Result<(CaKeyRecord, JwtKey), AuthorityError> {
    let not_before = identity::x509::from_offset(identity::x509::to_offset(now));
    let not_after = identity::x509::from_offset(identity::x509::to_offset(
        (now + lifetimes.intermediate).min(root_not_after),
    ));
    let (signer, der) = JwtSigner::generate(not_after)?;
    let id = signer.key_id().to_owned();
    let mut rec = CaKeyRecord {
        sealed_key: Vec::new(),
        id,
        kind: KeyKind::Jwt,
        cert_der: None,
        not_before: unix(not_before),
        not_after: unix(not_after),
        activate_at: unix(activate_at),
        created_at: unix(now),
    };
    rec.sealed_key = kek.seal(&binding(&rec), &der)?;
    Ok((
        rec,
        JwtKey {
            signer,
            not_before,
            activate_at,
        },
    ))
}

fn load_jwt(kek: &Kek, r: &CaKeyRecord) -> Result<JwtKey, AuthorityError> {
    let der = open_sealed(kek, r)?;
    let signer = JwtSigner::from_pkcs8(r.id.clone(), &der, at(r.not_after))?;
    Ok(JwtKey {
        signer,
        not_before: at(r.not_before),
        activate_at: at(r.activate_at),
    })
}

fn activate_event(new: &str, previous: &str, now: SystemTime) -> AuditEvent {
    AuditEvent {
        at: unix(now),
        action: "key.activate".into(),
        subject: new.into(),
        outcome: "ok".into(),
        detail: json!({"previous": previous}),
    }
}

fn key_event(r: &CaKeyRecord, now: SystemTime, what: &str) -> AuditEvent {
    AuditEvent {
        at: unix(now),
        action: format!("key.{what}"),
        subject: r.id.clone(),
        outcome: "ok".into(),
        detail: json!({"kind": r.kind, "not_after": r.not_after, "activate_at": r.activate_at}),
    }
}

fn short_id() -> Result<String, AuthorityError> {
    let s = random_serial().map_err(cert_err)?;
    Ok(crate::store::hex(&s.to_bytes()[..6]))
}

pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(nb: u64, na: u64) -> Signer {
        let key = KeyPair::generate().unwrap();
        let td = TrustDomain::new("td").unwrap();
        let p = intermediate_params(&td, "x", at(nb as i64), at(na as i64)).unwrap();
        Signer {
            id: "s".into(),
            chain: vec![],
            issuer: Issuer::new(p, key),
            not_before: at(nb as i64),
            not_after: at(na as i64),
            activate_at: at(nb as i64),
        }
    }

    #[test]
    fn next_is_prepared_at_half_and_activated_at_five_sixths() {
        let s = signer(0, 600);
        let due = |t: i64, next: bool| rotation_due(at(t), s.not_before, s.not_after, next);
        assert_eq!(due(299, false), Rotation::Nothing);
        assert_eq!(due(300, false), Rotation::PrepareNext);
        assert_eq!(due(450, true), Rotation::Nothing);
        assert_eq!(due(500, true), Rotation::ActivateNext);
        // Past 5/6 without a prepared successor (the CA was down): prepare one now.
        assert_eq!(due(550, false), Rotation::PrepareNext);
    }
}
