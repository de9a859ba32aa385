//! What the SQLite and PostgreSQL stores do alike around their SQL, written once: reading a
//! result row into a record, the column values a record is written as, the join-token check,
//! the next link of the audit chain, the answer to a write once its rows are in, and the
//! newest audit row's check on open. Each backend keeps its own SQL, transactions and writer;
//! it hands these its rows through [`Cell`] (by column index, in the order its SELECTs name
//! the columns) or plain values.

use subtle::ConstantTimeEq;

use super::{
    AuditEvent, AuditHead, AuditKey, AuditRow, CaKeyRecord, CertRecord, CertRow, Entry, JoinToken,
    KeyKind, Node, Outcome, RawAuditRow, StoreError, TokenRefusal, Write, audit_mac, audit_mac_ok,
    hex, legacy_audit_hash,
};

/// The action of the row that starts the keyed chain in a database an older kith began.
pub const AUDIT_KEYED: &str = "audit.keyed";

/// Column `i` of a result row as a `T`, the backend's error mapped to a [`StoreError`].
pub(crate) trait Cell<T> {
    fn cell(&self, i: usize) -> Result<T, StoreError>;
}

/// A result row of either backend: readable as every type the store's columns hold.
pub(crate) trait Cells:
    Cell<i64>
    + Cell<Option<i64>>
    + Cell<String>
    + Cell<Option<String>>
    + Cell<Vec<u8>>
    + Cell<Option<Vec<u8>>>
{
}

impl<R> Cells for R where
    R: Cell<i64>
        + Cell<Option<i64>>
        + Cell<String>
        + Cell<Option<String>>
        + Cell<Vec<u8>>
        + Cell<Option<Vec<u8>>>
{
}

/// Columns: id, kind, cert_der, sealed_key, not_before, not_after, activate_at, created_at.
pub(crate) fn ca_key(r: &impl Cells) -> Result<CaKeyRecord, StoreError> {
    let id: String = r.cell(0)?;
    let kind: String = r.cell(1)?;
    let kind = parse_kind(&kind).ok_or_else(|| StoreError::Corrupt {
        table: "ca_keys",
        detail: format!("key {id} has unknown kind {kind:?}"),
    })?;
    Ok(CaKeyRecord {
        id,
        kind,
        cert_der: r.cell(2)?,
        sealed_key: r.cell(3)?,
        not_before: r.cell(4)?,
        not_after: r.cell(5)?,
        activate_at: r.cell(6)?,
        created_at: r.cell(7)?,
    })
}

/// Columns: hash, id, name, created_at, expires_at, used_at, revoked_at. A stored hash that is
/// not 32 bytes reads as zeros: it then matches no presented token.
pub(crate) fn token(r: &impl Cells) -> Result<JoinToken, StoreError> {
    let hash: Vec<u8> = r.cell(0)?;
    let mut h = [0u8; 32];
    if hash.len() == 32 {
        h.copy_from_slice(&hash);
    }
    Ok(JoinToken {
        hash: h,
        id: r.cell(1)?,
        name: r.cell(2)?,
        created_at: r.cell(3)?,
        expires_at: r.cell(4)?,
        used_at: r.cell(5)?,
        revoked_at: r.cell(6)?,
    })
}

/// Columns: id, spiffe_id, parent_id, selectors, ttl, dns, created_at (the lists as JSON
/// text, see [`json_list`]).
pub(crate) fn entry(r: &impl Cells) -> Result<Entry, StoreError> {
    let selectors: String = r.cell(3)?;
    let dns: String = r.cell(5)?;
    Ok(Entry {
        id: r.cell(0)?,
        spiffe_id: r.cell(1)?,
        parent_id: r.cell(2)?,
        selectors: serde_json::from_str(&selectors).unwrap_or_default(),
        ttl: Cell::<Option<i64>>::cell(r, 4)?.map(|t| t.max(0) as u64),
        dns: serde_json::from_str(&dns).unwrap_or_default(),
        created_at: r.cell(6)?,
    })
}

/// Columns: spiffe_id, name, attested_at, last_issued_at, evicted_at.
pub(crate) fn node(r: &impl Cells) -> Result<Node, StoreError> {
    Ok(Node {
        spiffe_id: r.cell(0)?,
        name: r.cell(1)?,
        attested_at: r.cell(2)?,
        last_issued_at: r.cell(3)?,
        evicted_at: r.cell(4)?,
    })
}

/// Columns: spiffe_id, kind, parent.
pub(crate) fn cert_record(r: &impl Cells) -> Result<CertRecord, StoreError> {
    Ok(CertRecord {
        spiffe_id: r.cell(0)?,
        kind: r.cell(1)?,
        parent: r.cell(2)?,
    })
}

/// Columns: serial, spiffe_id, kind, not_after, issued_at, parent.
pub(crate) fn cert_row(r: &impl Cells) -> Result<CertRow, StoreError> {
    Ok((
        r.cell(0)?,
        r.cell(1)?,
        r.cell(2)?,
        r.cell(3)?,
        r.cell(4)?,
        r.cell(5)?,
    ))
}

/// Columns: seq, at, action, subject, outcome, detail, prev_hash, hash; as stored (the
/// event's `detail` unset, the detail's JSON text beside it), for the chain's MAC.
pub(crate) fn audit_parts(r: &impl Cells) -> Result<RawAuditRow, StoreError> {
    Ok((
        r.cell(0)?,
        AuditEvent {
            at: r.cell(1)?,
            action: r.cell(2)?,
            subject: r.cell(3)?,
            outcome: r.cell(4)?,
            detail: serde_json::Value::Null,
        },
        r.cell(5)?,
        r.cell(6)?,
        r.cell(7)?,
    ))
}

/// The columns of [`audit_parts`], for reading: the detail parsed (kept as a string when it is
/// not JSON), the hashes in hex.
pub(crate) fn audit_row(r: &impl Cells) -> Result<AuditRow, StoreError> {
    let detail: String = r.cell(5)?;
    Ok(AuditRow {
        seq: r.cell(0)?,
        event: AuditEvent {
            at: r.cell(1)?,
            action: r.cell(2)?,
            subject: r.cell(3)?,
            outcome: r.cell(4)?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
        },
        prev_hash: hex(&Cell::<Vec<u8>>::cell(r, 6)?),
        hash: hex(&Cell::<Vec<u8>>::cell(r, 7)?),
    })
}

/// Columns: seq, hash.
pub(crate) fn audit_head(r: &impl Cells) -> Result<AuditHead, StoreError> {
    Ok(AuditHead {
        seq: r.cell(0)?,
        hash: hex(&Cell::<Vec<u8>>::cell(r, 1)?),
    })
}

/// How a key kind is stored.
pub(crate) fn kind_str(k: KeyKind) -> &'static str {
    match k {
        KeyKind::Root => "root",
        KeyKind::Intermediate => "intermediate",
        KeyKind::Jwt => "jwt",
    }
}

pub(crate) fn parse_kind(s: &str) -> Option<KeyKind> {
    match s {
        "root" => Some(KeyKind::Root),
        "intermediate" => Some(KeyKind::Intermediate),
        "jwt" => Some(KeyKind::Jwt),
        _ => None,
    }
}

/// An entry's selectors or DNS names as stored: JSON text.
pub(crate) fn json_list(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_default()
}

/// An entry's TTL as stored (a signed 64-bit column).
pub(crate) fn ttl_column(ttl: Option<u64>) -> Option<i64> {
    ttl.map(|t| t as i64)
}

/// A join token's row as read for spending it: hash, expiry, use and revocation times.
pub(crate) type TokenState = (Vec<u8>, i64, Option<i64>, Option<i64>);

/// Why the token whose row is `row` (None: no row with its id) may not be spent by whoever
/// presents `presented` at `now`; None when it may.
pub(crate) fn token_refusal(
    row: Option<TokenState>,
    presented: &[u8; 32],
    now: i64,
) -> Option<TokenRefusal> {
    // SECURITY: constant-time comparison of the secret's hash; a token whose hash differs is
    // unknown, whatever its state.
    let row = row.filter(|(h, ..)| bool::from(h.as_slice().ct_eq(&presented[..])));
    match row {
        None => Some(TokenRefusal::Unknown),
        Some((_, _, _, Some(_))) => Some(TokenRefusal::Revoked),
        Some((_, _, Some(_), _)) => Some(TokenRefusal::Used),
        Some((_, expires, _, _)) if expires <= now => Some(TokenRefusal::Expired),
        _ => None,
    }
}

/// `NotFound` when an update or delete changed no row: the write ends there, unaudited.
pub(crate) fn found(changed: u64) -> Option<Outcome> {
    (changed == 0).then_some(Outcome::NotFound)
}

/// The answer to a write once its own rows are in. `early` (nothing to change, a refused
/// token) stands as it is, with no audit row; otherwise the write's audit event (a probe has
/// none) goes through `append` and the write is done.
pub(crate) fn settle<E>(
    op: &Write,
    early: Option<Outcome>,
    append: impl FnOnce(&AuditEvent) -> Result<(), E>,
) -> Result<Outcome, E> {
    if let Some(outcome) = early {
        return Ok(outcome);
    }
    let audit = match op {
        Write::Issue { audit, .. }
        | Write::JoinIssue { audit, .. }
        | Write::CreateToken(_, audit)
        | Write::RevokeToken { audit, .. }
        | Write::PutEntry(_, audit)
        | Write::DeleteEntry { audit, .. }
        | Write::EvictNode { audit, .. }
        | Write::PutCaKey(_, audit)
        | Write::ActivateCaKey { audit, .. }
        | Write::ResealCaKey { audit, .. }
        | Write::Audit(audit) => audit,
        Write::Probe => return Ok(Outcome::Done),
    };
    append(audit)?;
    Ok(Outcome::Done)
}

/// The audit row that follows `last` (its sequence number and MAC) for event `e`.
pub(crate) struct Link {
    pub seq: i64,
    /// The event's detail as the JSON text the row stores and the MAC covers.
    pub detail: String,
    pub hash: [u8; 32],
}

pub(crate) fn next_link(key: &AuditKey, e: &AuditEvent, last: &(i64, [u8; 32])) -> Link {
    let seq = last.0 + 1;
    let detail = e.detail.to_string();
    let hash = audit_mac(key, &last.1, seq, e, &detail);
    Link { seq, detail, hash }
}

/// Whether the chain needs an `audit.keyed` row before this key's rows, from its newest row
/// (None: the chain is empty): `Some(rows)` when that row is a legacy plain hash; `None` when
/// the chain is empty or already keyed.
///
/// SECURITY: a newest row that verifies neither way means a wrong key-encryption key (or an
/// altered row): an error, so the store refuses to open rather than append rows nobody could
/// verify.
pub(crate) fn newest_row_state(
    key: &AuditKey,
    newest: Option<RawAuditRow>,
) -> Result<Option<i64>, StoreError> {
    let Some((seq, event, detail, prev, stored)) = newest else {
        return Ok(None);
    };
    let prev: [u8; 32] = prev.try_into().map_err(|_| StoreError::Corrupt {
        table: "audit",
        detail: format!("row {seq} has a previous hash that is not 32 bytes"),
    })?;
    if audit_mac_ok(key, &prev, seq, &event, &detail, &stored) {
        return Ok(None);
    }
    if legacy_audit_hash(&prev, seq, &event, &detail).as_slice() == stored.as_slice() {
        return Ok(Some(seq));
    }
    Err(StoreError::Corrupt {
        table: "audit",
        detail: format!(
            "the newest row ({seq}) does not verify under this key-encryption key: the KEK is not the one this CA was started with, or the row was altered (`kith ca audit verify` with the right KEK says which)"
        ),
    })
}

/// Now, in unix seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(hash: u8, expires: i64, used: Option<i64>, revoked: Option<i64>) -> TokenState {
        (vec![hash; 32], expires, used, revoked)
    }

    #[test]
    fn a_token_is_refused_for_the_first_reason_that_applies() {
        let h = [7u8; 32];
        assert_eq!(token_refusal(None, &h, 10), Some(TokenRefusal::Unknown));
        let wrong = state(8, 20, None, None);
        assert_eq!(
            token_refusal(Some(wrong), &h, 10),
            Some(TokenRefusal::Unknown)
        );
        let both = state(7, 5, Some(1), Some(2));
        assert_eq!(
            token_refusal(Some(both), &h, 10),
            Some(TokenRefusal::Revoked)
        );
        let used = state(7, 5, Some(1), None);
        assert_eq!(token_refusal(Some(used), &h, 10), Some(TokenRefusal::Used));
        let expired = state(7, 10, None, None);
        assert_eq!(
            token_refusal(Some(expired), &h, 10),
            Some(TokenRefusal::Expired)
        );
        assert_eq!(token_refusal(Some(state(7, 11, None, None)), &h, 10), None);
    }

    #[test]
    fn key_kinds_read_back_as_written() {
        for k in [KeyKind::Root, KeyKind::Intermediate, KeyKind::Jwt] {
            assert_eq!(parse_kind(kind_str(k)), Some(k));
        }
        assert_eq!(parse_kind("other"), None);
    }
}
