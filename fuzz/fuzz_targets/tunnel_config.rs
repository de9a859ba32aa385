//! Tunnel config files (`kith sidecar run --config`) into `tunnel_config::load_tunnels`, which
//! reads a path: each input is written to a file of this process in /dev/shm (memory) first.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use proxy::authz::Policy;

static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("kith-fuzz-tunnels-{}.toml", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    std::fs::write(&*PATH, data).expect("scratch file is writable");
    if let Ok(tunnels) = sidecar::tunnel_config::load_tunnels(&PATH, &Policy::own_trust_domain()) {
        assert!(!tunnels.is_empty());
        let mut names: Vec<&str> = tunnels.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), tunnels.len(), "tunnel names are unique");
    }
});
