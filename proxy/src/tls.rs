//! The proxy's TLS: the current identity (SVID + trust bundle) published on a `watch`, a
//! certificate resolver and `identity::tls`'s SPIFFE verifier (both sides, with the handle's
//! verified-chain cache) that read it on every handshake, and the
//! rustls configurations (TLS 1.3 only, ring, ALPN `kith/1`; key exchange X25519MLKEM768 first
//! and X25519 second, or X25519 only with post-quantum off, see [`IdentityHandle::with_pq`]).
//!
//! The configs are built once per listener: because the resolvers and verifiers read the
//! current identity per handshake, a newly published SVID or bundle applies to the next
//! handshake, and established connections keep the keys they negotiated.
//!
//! Session resumption (on unless [`IdentityHandle::with_resumption`] turns it off) keeps that
//! promise: tickets and the client's session cache are bound to the identity version, so
//! every publish ends all sessions and the next handshake is a full one with the new SVID (all
//! configurations built from one handle share the ticket keys and the cache); and
//! a resumed session, which skips the verifiers, has its peer chain checked again against the
//! current bundle and clock by [`check_resumed`]: a resumed session shows no certificate, so rotation would be hidden.
//!
//! Why this is one file of over 500 lines: the data plane's TLS settings and the identity handle
//! they read (SVID, bundle, verified-chain cache, session tickets) change together: client and
//! server side are built next to each other from the one handle.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use identity::tls::{BundleSource, ChainCache, Kx, SpiffeVerifier, verify_chain};
use rustls::client::{
    ClientSessionStore, ResolvesClientCert, Resumption, TicketRequest, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::server::{ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, HandshakeKind, NamedGroup, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch;

use identity::{SpiffeId, Svid, TrustBundle, VerifyError};

/// The verifier's refusals, which [`refusal`] turns into reasons, and which peer a client
/// accepts.
pub use identity::tls::{Expect as ExpectedPeer, RejectedChain, UnexpectedPeer, provider};

use crate::metrics::Reason;
use crate::refusal::Refusal;

/// The ALPN protocol of one mTLS connection per application connection (every kith).
pub const ALPN: &[u8] = b"kith/1";

/// The ALPN protocol of the pooled hop: one mTLS connection carries many application
/// connections as HTTP/2 CONNECT streams. A kith with pooling on offers it before `kith/1`;
/// a server that does not know it picks `kith/1` and the connection is served as one.
pub const ALPN_POOLED: &[u8] = b"kith/2";

/// The longest a session ticket can resume a session; the next publish (new SVID or bundle)
/// ends it sooner.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(3600);

/// Servers (peer addresses) whose tickets the client side remembers.
const CLIENT_SESSIONS: usize = 64;

/// Tickets kept for each server: a burst of new connections to one peer takes one each, and
/// every full handshake brings two back (about 1.6 KB each, most of it the peer's chain).
const TICKETS_PER_PEER: usize = 32;

/// TLS 1.3 tickets a server sends after a full handshake (none after a resumed one, when the
/// client asks so; kith clients do).
const TICKETS_PER_HANDSHAKE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("svid does not verify against the bundle: {0}")]
    Verify(#[from] VerifyError),
    #[error("svid is for {svid}, but the chain says {chain}")]
    IdMismatch { svid: SpiffeId, chain: SpiffeId },
    #[error("private key is not usable: {0}")]
    Key(rustls::Error),
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A published identity: validated SVID, the bundle it validated against, and the signing key.
pub struct Credentials {
    svid: Svid,
    bundle: TrustBundle,
    key: Arc<CertifiedKey>,
    version: u64,
}

impl Credentials {
    pub fn svid(&self) -> &Svid {
        &self.svid
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Increases by one with every publish.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", self.svid.id())
            .field("trust_domain", self.bundle.trust_domain())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The current identity of this proxy, shared by listeners, resolvers and verifiers. Starts
/// empty: before the first publish every handshake fails closed.
#[derive(Clone)]
pub struct IdentityHandle {
    tx: Published,
    resumption: bool,
    pq: bool,
    pooling: bool,
    sessions: Arc<Sessions>,
}

type Published = Arc<watch::Sender<Option<Arc<Credentials>>>>;

/// The version of the identity in `tx` (0 before the first publish).
fn version_of(tx: &Published) -> u64 {
    tx.borrow().as_ref().map_or(0, |c| c.version)
}

/// What every configuration built from one handle shares: the ticket keys, the client's session
/// cache, and the client configurations themselves (rustls resumes only a session made with the
/// same verifier), so that all the listeners and workers of a process take each other's
/// tickets; and the peer chains already verified.
#[derive(Debug, Default)]
struct Sessions {
    tickets: OnceLock<Arc<IdentityTickets>>,
    cache: OnceLock<Arc<IdentitySessions>>,
    /// By expectation and pooling (which decides the ALPN offered).
    clients: Mutex<Vec<(ExpectedPeer, bool, Arc<ClientConfig>)>>,
    verified: Arc<ChainCache>,
}

impl IdentityHandle {
    /// An empty identity; TLS session resumption and post-quantum key exchange on.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(None)),
            resumption: true,
            pq: true,
            pooling: true,
            sessions: Arc::default(),
        }
    }

    /// Offers the post-quantum hybrid key exchange X25519MLKEM768 (before X25519) in every
    /// configuration built from this handle afterwards, on both sides; on by default. Off,
    /// X25519 only: weaker against a future quantum computer that records today's traffic.
    pub fn with_pq(mut self, on: bool) -> Self {
        self.pq = on;
        self
    }

    pub fn pq(&self) -> bool {
        self.pq
    }

    /// Turns TLS session resumption on or off for every configuration built from this handle
    /// afterwards: off, no tickets are issued or offered and every connection is a full
    /// handshake (for like-for-like comparisons, or peers that must see a certificate each
    /// time).
    pub fn with_resumption(mut self, on: bool) -> Self {
        self.resumption = on;
        self
    }

    pub fn resumption(&self) -> bool {
        self.resumption
    }

    /// Turns the pooled hop (ALPN `kith/2`, see [`crate::pool`]) on or off for every
    /// configuration built from this handle afterwards: off, this side neither offers nor
    /// accepts it and every application connection is its own mTLS connection.
    pub fn with_pooling(mut self, on: bool) -> Self {
        self.pooling = on;
        self
    }

    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// The mesh ALPN protocols this side offers (client) or accepts (server), preferred first.
    pub(crate) fn mesh_alpn(&self) -> Vec<Vec<u8>> {
        if self.pooling {
            vec![ALPN_POOLED.to_vec(), ALPN.to_vec()]
        } else {
            vec![ALPN.to_vec()]
        }
    }

    /// A receiver that sees every publish (rotation), for pooled connections to drain.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.tx.subscribe()
    }

    /// The version of the current identity (0 before the first publish).
    pub fn version(&self) -> u64 {
        version_of(&self.tx)
    }

    fn tickets(&self) -> Result<Arc<IdentityTickets>, TlsError> {
        if let Some(t) = self.sessions.tickets.get() {
            return Ok(t.clone());
        }
        let made = Arc::new(IdentityTickets {
            tx: self.tx.clone(),
            inner: rustls::crypto::ring::Ticketer::new()?,
        });
        Ok(self.sessions.tickets.get_or_init(|| made).clone())
    }

    fn session_cache(&self) -> Arc<IdentitySessions> {
        let cache = self
            .sessions
            .cache
            .get_or_init(|| Arc::new(IdentitySessions::new(self.tx.clone())));
        cache.clone()
    }

    /// Validates `svid` against `bundle` at `now` (chain, X509-SVID rules, trust domain) and
    /// only then publishes both. On error the previous identity stays in place.
    pub fn publish(
        &self,
        svid: Svid,
        bundle: TrustBundle,
        now: SystemTime,
    ) -> Result<(), TlsError> {
        let id = identity::verify_x509_svid(svid.chain(), &bundle, now)?;
        if &id != svid.id() {
            return Err(TlsError::IdMismatch {
                svid: svid.id().clone(),
                chain: id,
            });
        }
        // Borrowed, not cloned: no copy of the key is left unwiped (the Svid wipes its own).
        let der = PrivateKeyDer::Pkcs8(svid.key().secret_pkcs8_der().into());
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(TlsError::Key)?;
        let key = Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing));
        self.tx.send_modify(|current| {
            let version = current.as_ref().map_or(1, |c| c.version + 1);
            tracing::info!(id = %svid.id(), version, "identity published");
            *current = Some(Arc::new(Credentials {
                svid,
                bundle,
                key,
                version,
            }));
        });
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.tx.borrow().clone()
    }

    /// Waits up to `hold` for the first identity.
    pub async fn ready(&self, hold: Duration) -> Option<Arc<Credentials>> {
        if let Some(c) = self.current() {
            return Some(c);
        }
        let mut rx = self.tx.subscribe();
        match tokio::time::timeout(hold, rx.wait_for(Option::is_some)).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }
}

/// The verifiers read the current bundle per handshake; its version keys the chain cache.
impl BundleSource for IdentityHandle {
    fn with_bundle<R>(&self, f: impl FnOnce(&TrustBundle, u64) -> R) -> Option<R> {
        let current = self.current()?;
        Some(f(current.bundle(), current.version))
    }
}

impl Default for IdentityHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdentityHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityHandle")
            .field("current", &self.current())
            .field("resumption", &self.resumption)
            .field("pq", &self.pq)
            .field("pooling", &self.pooling)
            .finish()
    }
}

/// Serves (and presents, as a client) the current certificate, read per handshake.
#[derive(Debug)]
struct CurrentCert(IdentityHandle);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound configuration for clients that are not kith proxies (curl, a Go program with
/// its SVID): the same client-certificate requirement, but no ALPN, since such clients offer
/// their own application protocols (`h2`, `http/1.1`) and `kith/1` would refuse them.
pub fn edge_server_config(identity: &IdentityHandle) -> Result<Arc<ServerConfig>, TlsError> {
    let mesh = server_config(identity)?;
    let mut edge = (*mesh).clone();
    edge.alpn_protocols = Vec::new();
    Ok(Arc::new(edge))
}

/// The inbound (server) configuration: client certificate required, read per handshake.
pub fn server_config(identity: &IdentityHandle) -> Result<Arc<ServerConfig>, TlsError> {
    // Authorization of the client's ID happens after the handshake (`authz::Policy`).
    let verifier = SpiffeVerifier::new(identity.clone(), ExpectedPeer::TrustDomain)
        .with_cache(identity.sessions.verified.clone());
    let mut config = identity::tls::server_builder(Kx::mesh(identity.pq))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentCert(identity.clone())));
    config.alpn_protocols = identity.mesh_alpn();
    // Stateless tickets only: the server remembers nothing per session.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    if identity.resumption {
        // SECURITY: a resumed TLS 1.3 session presents no certificate and rustls reports the
        // original one; tickets die with the identity version, and `check_resumed` checks the
        // original client chain again on every resumed connection.
        config.ticketer = identity.tickets()?;
        config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
        // A kith client asks (RFC 9149 ticket_request) for no tickets on a resumed connection;
        // honoured up to this bound.
        config.max_tls13_tickets = TICKETS_PER_HANDSHAKE;
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The outbound (client) configuration: presents the current SVID, expects `expect`. One per
/// expectation and handle: asked again, it returns the same.
pub fn client_config(
    identity: &IdentityHandle,
    expect: ExpectedPeer,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut clients = identity
        .sessions
        .clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let pooling = identity.pooling;
    if let Some((_, _, config)) = clients
        .iter()
        .find(|(e, p, _)| *e == expect && *p == pooling)
    {
        return Ok(config.clone());
    }
    let config = new_client_config(identity, expect.clone())?;
    clients.push((expect, pooling, config.clone()));
    Ok(config)
}

fn new_client_config(
    identity: &IdentityHandle,
    expect: ExpectedPeer,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeVerifier::new(identity.clone(), expect)
        .with_cache(identity.sessions.verified.clone());
    let mut config = identity::tls::client_builder(Kx::mesh(identity.pq))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentCert(identity.clone())));
    config.alpn_protocols = identity.mesh_alpn();
    config.resumption = if identity.resumption {
        // SECURITY: see server_config; the cache is emptied when the identity changes, so the
        // next handshake presents the new SVID.
        Resumption::store(identity.session_cache())
    } else {
        Resumption::disabled()
    };
    // Tickets only from full handshakes. A ticket carries the peer chains of the handshake
    // that made it, and rustls issues the tickets of a resumed connection with the chains of
    // the original one: if resumed connections got tickets, one full handshake would start an
    // endless line of resumptions, all on its chains. A ticket that reached the store just
    // after an SVID rotation emptied it (tickets arrive after the handshake) would then keep
    // the old SVID in use until it expired, and every resumption from then on is refused as
    // expired. Without new tickets on resumption, each ticket is used once and the line ends.
    config.send_ticket_request = identity.resumption.then_some(TicketRequest {
        new_session_count: TICKETS_PER_HANDSHAKE as u8,
        resumption_count: 0,
    });
    Ok(Arc::new(config))
}

/// Session tickets bound to the identity version: each ticket carries the version it was
/// issued under, and a ticket from another version (an SVID or bundle ago) does not decrypt,
/// so the client falls back to a full handshake.
struct IdentityTickets {
    tx: Published,
    inner: Arc<dyn ProducesTickets>,
}

impl fmt::Debug for IdentityTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityTickets")
            .field("version", &version_of(&self.tx))
            .finish_non_exhaustive()
    }
}

impl ProducesTickets for IdentityTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(TICKET_LIFETIME.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut tagged = Vec::with_capacity(TAG + plain.len());
        tagged.extend_from_slice(&version_of(&self.tx).to_be_bytes());
        tagged.extend_from_slice(&unix_secs().to_be_bytes());
        tagged.extend_from_slice(plain);
        self.inner.encrypt(&tagged)
    }

    /// SECURITY: a ticket resumes only under the identity version it was issued under, and
    /// for at most `TICKET_LIFETIME`, whatever age the client claims.
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let mut plain = self.inner.decrypt(cipher)?;
        let (version, rest) = plain.split_first_chunk::<8>()?;
        let (issued, _) = rest.split_first_chunk::<8>()?;
        if u64::from_be_bytes(*version) != version_of(&self.tx) {
            return None;
        }
        let age = unix_secs().checked_sub(u64::from_be_bytes(*issued))?;
        if age > TICKET_LIFETIME.as_secs() {
            return None;
        }
        plain.drain(..TAG);
        Some(plain)
    }
}

/// Bytes the ticketer adds in front of rustls's ticket: identity version, issue time.
const TAG: usize = 16;

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The client's session cache, started afresh whenever the identity version changes.
struct IdentitySessions {
    tx: Published,
    store: Mutex<TicketStore>,
}

/// The tickets of one identity version, freshest last.
#[derive(Default)]
struct TicketStore {
    version: u64,
    tickets: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
    kx: HashMap<ServerName<'static>, NamedGroup>,
}

impl fmt::Debug for IdentitySessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentitySessions")
            .field("version", &version_of(&self.tx))
            .finish_non_exhaustive()
    }
}

impl IdentitySessions {
    fn new(tx: Published) -> Self {
        Self {
            tx,
            store: Mutex::default(),
        }
    }

    /// The store, emptied first if the identity changed since it was filled.
    fn store(&self) -> MutexGuard<'_, TicketStore> {
        let version = version_of(&self.tx);
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if store.version != version {
            *store = TicketStore {
                version,
                ..TicketStore::default()
            };
        }
        store
    }
}

/// Makes room for `name` in a map of at most `CLIENT_SESSIONS` servers.
fn room_for<V>(map: &mut HashMap<ServerName<'static>, V>, name: &ServerName<'static>) {
    if map.len() >= CLIENT_SESSIONS && !map.contains_key(name) {
        let evict = map.keys().next().cloned();
        if let Some(evict) = evict {
            map.remove(&evict);
        }
    }
}

impl ClientSessionStore for IdentitySessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        let mut store = self.store();
        room_for(&mut store.kx, &server_name);
        store.kx.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.store().kx.get(server_name).copied()
    }

    // TLS 1.2 is compiled out; these only keep the trait whole.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut store = self.store();
        room_for(&mut store.tickets, &server_name);
        let tickets = store.tickets.entry(server_name).or_default();
        if tickets.len() >= TICKETS_PER_PEER {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    /// Each ticket once (RFC 8446 C.4), the freshest first.
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.store().tickets.get_mut(server_name)?.pop_back()
    }
}

/// After a handshake: a resumed session skipped the certificate verifiers, so the peer chain
/// of the original handshake is checked again against the current bundle and clock, and on
/// the client side against `expect`. A full handshake was checked by the verifiers already.
pub fn check_resumed(
    identity: &IdentityHandle,
    conn: &CommonState,
    expect: Option<&ExpectedPeer>,
) -> Result<(), Refusal> {
    if conn.handshake_kind() != Some(HandshakeKind::Resumed) {
        return Ok(());
    }
    let Some((leaf, intermediates)) = conn.peer_certificates().and_then(<[_]>::split_first) else {
        return Err(Reason::BadCertificate.into());
    };
    let cache = Some(&*identity.sessions.verified);
    let id = verify_chain(identity, cache, leaf, intermediates, UnixTime::now()).map_err(|e| {
        let (reason, id) = refusal_of(&e).unwrap_or((Reason::HandshakeFailed, None));
        Refusal::new(reason, None).with_id(id)
    })?;
    if let Some(expect) = expect {
        expect
            .check(&id)
            .map_err(|_| Refusal::new(Reason::NotAuthorized, None).with_id(Some(id.clone())))?;
    }
    Ok(())
}

/// The SPIFFE ID of the peer of a finished handshake, whose chain a verifier (or
/// [`check_resumed`]) already checked: read from the verified-chain cache, where that check put
/// it, and parsed from the leaf only when the cache no longer holds the chain.
pub fn peer_id(identity: &IdentityHandle, conn: &CommonState) -> Option<SpiffeId> {
    let (leaf, intermediates) = conn.peer_certificates()?.split_first()?;
    identity
        .sessions
        .verified
        .verified_id(leaf, intermediates)
        .or_else(|| leaf_id(leaf))
}

/// The SPIFFE ID a certificate names, parsed from it (for an already verified leaf).
pub fn leaf_id(leaf: &CertificateDer<'_>) -> Option<SpiffeId> {
    identity::check_svid_leaf(leaf).ok()
}

/// Why a handshake failed, as a refusal reason and the ID the peer presented, when the error
/// says.
pub fn refusal(error: &std::io::Error) -> Option<(Reason, Option<SpiffeId>)> {
    refusal_of(error.get_ref()?.downcast_ref::<rustls::Error>()?)
}

fn refusal_of(tls: &rustls::Error) -> Option<(Reason, Option<SpiffeId>)> {
    match tls {
        // SECURITY: STRICT mode; a client that presents no identity is refused like plaintext.
        rustls::Error::NoCertificatesPresented => Some((Reason::PlaintextRefused, None)),
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            if let Some(r) = e.downcast_ref::<RejectedChain>() {
                Some((Reason::from_verify(&r.error), r.id.clone()))
            } else if let Some(v) = e.downcast_ref::<VerifyError>() {
                Some((Reason::from_verify(v), None))
            } else {
                e.downcast_ref::<UnexpectedPeer>()
                    .map(|u| (Reason::NotAuthorized, Some(u.got.clone())))
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            Some((Reason::Expired, None))
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet) => {
            Some((Reason::NotYetValid, None))
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            Some((Reason::UnknownCa, None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build_without_identity() {
        let handle = IdentityHandle::new();
        assert!(handle.current().is_none());
        server_config(&handle).expect("server config");
        client_config(&handle, ExpectedPeer::TrustDomain).expect("client config");
    }
}
