//! Authorization policy input: policy files (`--policy`, `tunnel_config::add_policy_file`,
//! written to a file of this process in /dev/shm first) and `--allow` flags
//! (`tunnel_config::add_allow_flag`, one per input line), then the parsed policy's check.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use identity::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;
use proxy::authz::Policy;
use sidecar::tunnel_config::{add_allow_flag, add_policy_file};

static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("kith-fuzz-policy-{}.toml", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("valid trust domain");
    let peer = SpiffeId::new("spiffe://example.org/ns/shop/sa/web").expect("valid id");
    std::fs::write(&*PATH, data).expect("scratch file is writable");
    if let Ok(policy) = add_policy_file(Policy::own_trust_domain(), &PATH) {
        assert!(policy.has_rules());
        let _ = policy.check_in(&peer, 8080, Some(&td));
    }
    let text = String::from_utf8_lossy(data);
    let mut policy = Policy::own_trust_domain();
    for line in text.lines().take(8) {
        let Ok(p) = add_allow_flag(policy.clone(), line) else {
            continue;
        };
        policy = p;
        // An exact rule without ports allows exactly that ID on every port.
        if !line.contains(['@', '*'])
            && let Ok(id) = SpiffeId::new(line)
        {
            assert!(
                policy.check_in(&id, 1, Some(&td)).is_ok(),
                "{line:?} allowed"
            );
        }
    }
    let _ = policy.check_in(&peer, 8080, Some(&td));
});
