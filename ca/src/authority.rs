//! The CA's signing keys: one or more roots (the bundle), the active signing intermediate and
//! the one prepared to follow it. The intermediate rotates by itself: the next one is made at
//! 1/2 of the active one's life and takes over at 5/6. A leaf never outlives its signer.
//!
//! The active signer is published through an `ArcSwap`, so issuance reads it without a lock
//! and rotation never pauses signing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use identity::x509::{
    BACKDATE, intermediate_params, ordered_serial, random_serial, root_params,
    svid_params_with_serial,
};
use identity::{KeyType, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

use crate::jwt_svid::JwtSigner;
use crate::seal::{Kek, SealError};
use crate::store::{AuditEvent, CaKeyRecord, KeyKind, Store, StoreError, Write};

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
    Jwt(#[from] crate::jwt_svid::JwtError),
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
}

fn cert_err(e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Cert(e.to_string())
}

#[derive(Clone, Debug)]
pub struct Lifetimes {
    pub root: Duration,
    pub intermediate: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root: Duration::from_secs(365 * 86_400),
            intermediate: Duration::from_secs(7 * 86_400),
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
    root_issuer: Issuer<'static, KeyPair>,
    /// Upstream intermediates between our intermediate and the anchor (empty when self-rooted).
    upstream_chain: Vec<CertificateDer<'static>>,
    /// The trust anchors published in the bundle.
    anchors: Vec<CertificateDer<'static>>,
    current: ArcSwap<KeySet>,
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
        let records = prepare_records(store, &kek, store.ca_keys()?, now).await?;
        let (root_issuer, anchors, upstream_chain, root_not_after) = match upstream {
            Some(up) => import_upstream(up)?,
            None => {
                let roots: Vec<&CaKeyRecord> =
                    records.iter().filter(|r| r.kind == KeyKind::Root).collect();
                let signing_root = match roots.iter().rev().find(|r| at(r.activate_at) <= now) {
                    Some(r) => (*r).clone(),
                    None => create_root(store, &kek, &td, &lifetimes, now).await?,
                };
                // Every unexpired root is in the bundle: that is how a successor root is
                // published before it signs anything.
                let mut anchors: Vec<CertificateDer<'static>> = roots
                    .iter()
                    .filter(|r| at(r.not_after) > now)
                    .filter_map(|r| r.cert_der.clone().map(CertificateDer::from))
                    .collect();
                if let Some(cert) = &signing_root.cert_der
                    && !anchors.iter().any(|a| a.as_ref() == cert.as_slice())
                {
                    anchors.push(CertificateDer::from(cert.clone()));
                }
                let key = unseal_key(&kek, &signing_root)?;
                let cert = CertificateDer::from(signing_root.cert_der.clone().unwrap_or_default());
                let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(cert_err)?;
                (issuer, anchors, Vec::new(), at(signing_root.not_after))
            }
        };

        let live = |kind: KeyKind| -> Vec<CaKeyRecord> {
            let mut v: Vec<CaKeyRecord> = records
                .iter()
                .filter(|r| r.kind == kind && at(r.not_after) > now)
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
            .ca_keys()?
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
        let keys = with_bundle(keys, &td, &anchors)?;
        Ok(Self {
            td,
            kek,
            lifetimes,
            root_issuer,
            upstream_chain,
            anchors,
            current: ArcSwap::from_pointee(keys),
        })
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// Unseals the active signer's key as stored, with the key-encryption key this process
    /// holds, and checks it is the key being signed with: proves the KEK still opens what the
    /// database holds (a replaced KEK, or a database sealed under another one, fails here).
    pub fn check_kek(&self, store: &impl Store) -> Result<(), String> {
        let keys = self.keys();
        let record = store
            .ca_keys()
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
        let keys = self.current.load_full();
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
                    &self.root_issuer,
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
                next = Some(Arc::new(signer.with_chain(&self.upstream_chain)));
            }
            Rotation::ActivateNext => {
                if let Some(n) = next.take() {
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
            .store(Arc::new(with_bundle(updated, &self.td, &self.anchors)?));
        Ok(due)
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
        activate_at: unix(now - BACKDATE),
        created_at: unix(now),
    };
    rec.sealed_key = kek.seal(&binding(&rec), key.serialize_der().as_slice())?;
    store
        .write(Write::PutCaKey(
            rec.clone(),
            key_event(&rec, now, "created"),
        ))
        .await?;
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
            if store.audit_has(RESEAL, &r.id)? {
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
