//! What `kith sidecar init` reads from the system: `iptables-save` output
//! (`capture::save_has_rules`, picking the backend) and `/proc/net/if_inet6`
//! (`capture::parse_if_inet6`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sidecar::capture::save_has_rules(data);
    let text = String::from_utf8_lossy(data);
    // Every address read renders back (in the kernel's format) to a line read the same way.
    for a in sidecar::capture::parse_if_inet6(&text) {
        assert!(!a.interface.is_empty() && !a.interface.contains(char::is_whitespace));
        let line = format!(
            "{:032x} {:02x} {:02x} 20 {:02x} {}\n",
            u128::from(a.addr),
            a.ifindex,
            a.prefix,
            if a.tentative { 0x40 } else { 0 },
            a.interface
        );
        assert_eq!(sidecar::capture::parse_if_inet6(&line), vec![a]);
    }
});
