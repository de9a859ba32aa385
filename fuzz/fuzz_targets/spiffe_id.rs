//! Differential: `SpiffeId::new` (and `TrustDomain::new` on the same input) against a second,
//! deliberately plain reading of the SPIFFE ID standard's rules written here:
//! - scheme `spiffe://` (lowercase), then a non-empty trust domain of `a-z 0-9 . - _`, at most
//!   255 bytes (the crate's `MAX_TRUST_DOMAIN_LEN`);
//! - an empty path, or `/`-separated segments of `A-Z a-z 0-9 . - _`, none empty, `.` or `..`
//!   (so no trailing slash);
//! - no query, fragment, port, user info or percent-encoding (all fall out of the character
//!   sets);
//! - at most 2048 bytes in all (the crate's `MAX_ID_LEN`).
//!
//! Both must accept exactly the same strings; an accepted ID must round-trip its parts.
#![no_main]

use identity::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fn td_ok(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn reference(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !td_ok(td) {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = SpiffeId::new(s);
    assert_eq!(
        parsed.is_ok(),
        reference(s),
        "SpiffeId::new({s:?}) = {parsed:?}"
    );
    if let Ok(id) = parsed {
        assert_eq!(id.as_str(), s);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain_str(), id.path()),
            s
        );
        assert!(id.is_member_of(&id.trust_domain()));
        assert_eq!(id.segments().count(), id.path().matches('/').count());
        let again: SpiffeId = id.to_string().parse().expect("display parses back");
        assert_eq!(again, id);
    }
    // A trust domain: bare, or the ID of a trust domain (no path).
    let td = TrustDomain::new(s);
    let bare = s.strip_prefix("spiffe://").unwrap_or(s);
    assert_eq!(td.is_ok(), td_ok(bare), "TrustDomain::new({s:?}) = {td:?}");
    if let Ok(td) = td {
        assert_eq!(td.as_str(), bare);
        assert_eq!(td.id().trust_domain(), td);
    }
});
