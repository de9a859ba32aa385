//! What the injector puts into pods: images, the CA's address, the mesh's address blocks, and the
//! fixed names and ports the injected containers share with `kith sidecar`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

pub use identity::mesh::{
    INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, SIDECAR_ADMIN_PORT as ADMIN_PORT,
    TOKEN_AUDIENCE as DEFAULT_AUDIENCE,
};

pub const INIT_CONTAINER: &str = "kith-init";
pub const PROXY_CONTAINER: &str = "kith-proxy";
pub const TOKEN_VOLUME: &str = "kith-token";
pub const BUNDLE_VOLUME: &str = "kith-bundle";
/// A small tmpfs at `/run` for the init container: iptables takes its lock there, and the
/// container's root filesystem is read-only.
pub const XTABLES_VOLUME: &str = "kith-xtables";

pub const TOKEN_DIR: &str = "/var/run/secrets/kith";
pub const TOKEN_FILE: &str = "token";
pub const BUNDLE_DIR: &str = "/etc/kith/bundle";
pub const BUNDLE_FILE: &str = "bundle.pem";
/// The projected token's lifetime; the kubelet refreshes it at 80 %.
pub const TOKEN_SECONDS: u64 = 3600;

pub const INJECT_KEY: &str = "kith.dev/inject";
pub const STATUS_KEY: &str = "kith.dev/status";
pub const EXCLUDE_INBOUND_KEY: &str = "kith.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_KEY: &str = "kith.dev/exclude-outbound-ports";
pub const EXCLUDE_CIDRS_KEY: &str = "kith.dev/exclude-outbound-cidrs";

pub const DEFAULT_CA_URL: &str = "https://kith-ca.kith-system.svc:8443";
pub const DEFAULT_MESH_CIDR: &str = "10.0.0.0/8";
pub const DEFAULT_BUNDLE_CONFIGMAP: &str = "kith-bundle";

/// The kith version that injects; recorded in every injected pod.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The image of this kith release.
pub fn default_image() -> String {
    format!("ghcr.io/kith-dev/kith:{VERSION}")
}

/// The capture init image of this kith release: `kith` beside `iptables` and `ip6tables`
/// (deploy/docker/Dockerfile.init, or deploy/docker/build-init-image.sh without a registry).
/// The `FROM scratch` kith image has no iptables, so `kith sidecar init` cannot run in it.
pub fn default_init_image() -> String {
    format!("ghcr.io/kith-dev/kith-init:{VERSION}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The sidecar's image (`kith sidecar run`).
    pub image: String,
    /// The init container's image (`kith sidecar init`); it needs `iptables` in it.
    pub init_image: String,
    /// Where the sidecar gets its SVIDs.
    pub ca_url: String,
    /// Destinations that get mTLS; others pass through.
    pub mesh_cidrs: Vec<Cidr>,
    /// The ConfigMap (in the pod's namespace) with `bundle.pem`; used only without
    /// `bundle_sha256`.
    pub bundle_configmap: String,
    /// The SHA-256 of the CA's PEM bundle: each sidecar fetches the bundle from the CA at first
    /// contact and checks it against this pin (`kith sidecar run --bundle-sha256`), so no
    /// namespace needs a bundle ConfigMap. 64 lowercase hex digits.
    pub bundle_sha256: Option<String>,
    /// The audience of the projected token; the CA's `--k8s-audience`.
    pub audience: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: default_image(),
            init_image: default_init_image(),
            ca_url: DEFAULT_CA_URL.to_owned(),
            mesh_cidrs: vec![Cidr::V4_PRIVATE_10],
            bundle_configmap: DEFAULT_BUNDLE_CONFIGMAP.to_owned(),
            bundle_sha256: None,
            audience: DEFAULT_AUDIENCE.to_owned(),
        }
    }
}

/// A SHA-256 pin as `kith ca bundle | sha256sum` prints it: 64 hex digits, kept lowercase.
pub fn parse_pin(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?} is not a SHA-256 (64 hex digits: kith ca bundle | sha256sum)"
        ))
    }
}

/// An address block, `addr/len`; a bare address is a /32 or /128. The address is kept as
/// written (iptables clears host bits itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    const V4_PRIVATE_10: Cidr = Cidr(IpNet::V4(Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 0, 0, 0),
        8,
    )));
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address block (e.g. 10.0.0.0/8 or fd00::/8)"))?;
        if len.is_empty() && !s.contains('/') {
            return Ok(Cidr(IpNet::from(addr)));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        s.parse::<IpNet>()
            .map(Cidr)
            .map_err(|_| format!("{s:?}: the prefix length must be 0..={max}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_with_and_without_a_prefix() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "192.168.1.7".parse::<Cidr>().unwrap().to_string(),
            "192.168.1.7/32"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!(" ::1 ".parse::<Cidr>().unwrap().to_string(), "::1/128");
    }

    #[test]
    fn bad_cidrs_say_what_is_wrong() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/-1",
            "",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(
                err.contains("address block") || err.contains("prefix length"),
                "{bad}: {err}"
            );
        }
    }
}
