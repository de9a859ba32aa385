//! What `kith sidecar init` reads from the system: `iptables-save` output
//! (`capture::save_has_rules`, picking the backend) and `/proc/net/if_inet6`
//! (`capture::parse_if_inet6`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sidecar::capture::save_has_rules(data);
    let text = String::from_utf8_lossy(data);
    for a in sidecar::capture::parse_if_inet6(&text) {
        assert!(a.prefix <= u8::MAX);
        assert!(!a.interface.is_empty());
    }
});
