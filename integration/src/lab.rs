//! The pod lab: a "node" that is itself a network namespace (so nothing touches the host's
//! interfaces or firewall, where a Docker engine may keep its own rules), a bridge in it, and
//! "pods": network namespaces with an address on the bridge, their own nat rules from
//! `kith sidecar init`, a sidecar running as UID 1337 and an application ([`podapp`]). The CA
//! runs on the node; pods get their SVIDs from it with a projected-token lookalike signed by
//! the lab's own "cluster" key, exactly as in Kubernetes.
//!
//! Everything is torn down on drop, also when a test panics: processes are killed, namespaces
//! deleted (which removes their links and rules).
//!
//! The tests need root, `ip`, `iptables`, `setpriv` (and `tcpdump` for the capture test):
//! [`Lab::available`] says whether they can run and prints why not; under `CI=true` a missing
//! piece fails instead, so the lab never passes silently.
//!
//! Also here: readers of a sidecar's metrics and logs ([`metric`], [`connections`],
//! [`identity_updates`], [`logged_peers`]), which the lab's tests and the binary-level tests use.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{ClusterKey, ISSUER};
use crate::eventually;
use crate::process::{Proc, kith_bin, podapp, run, sh, tool_works};

/// The proxy's UID, as `kith sidecar init` assumes by default.
pub const PROXY_UID: u32 = 1337;
/// The app port every pod serves on.
pub const APP_PORT: u16 = 8080;
pub const TRUST_DOMAIN: &str = "example.org";
const SUBNET: &str = "10.77.0";
const CA_PORT: u16 = 8443;
/// The key-encryption key (`KITH_CA_KEK`, base64 of 32 bytes of 42) the tests give the CAs they
/// start as processes; the in-process CA's test configuration has the same.
pub const CA_KEK: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// The node: its namespace, bridge, CA and "cluster" signing key.
pub struct Lab {
    pub node: String,
    pub dir: tempfile::TempDir,
    pub ca: Option<Proc>,
    pods: Vec<String>,
    procs: Vec<Proc>,
    cluster: ClusterKey,
    next_ip: u8,
    /// Extra `kith ca serve` flags, kept for restarts.
    ca_flags: Vec<String>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Whether the lab can run here; prints why not (and panics under CI=true).
    pub fn available(test: &str) -> bool {
        let mut missing = Vec::new();
        if !nix::unistd::geteuid().is_root() {
            missing.push("root");
        }
        for (tool, probe) in [
            ("ip", &["ip", "-V"][..]),
            ("iptables", &["iptables", "--version"][..]),
            ("setpriv", &["setpriv", "--version"][..]),
            ("tcpdump", &["tcpdump", "--version"][..]),
        ] {
            if !tool_works(probe) {
                missing.push(tool);
            }
        }
        if missing.is_empty() {
            return true;
        }
        crate::skip::skip(test, &format!("the pod lab needs {}", missing.join(", ")));
        false
    }

    /// A node namespace with a bridge at 10.77.0.1/24 and the CA listening on it. Pods' SVIDs
    /// live `workload_ttl`.
    pub fn start(workload_ttl: &str) -> Lab {
        Self::start_with(workload_ttl, &[])
    }

    /// `start` with extra `kith ca serve` flags (`--root-ttl`, …), also used on restarts.
    pub fn start_with(workload_ttl: &str, ca_flags: &[&str]) -> Lab {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let node = format!("kn{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("kith-lab")
            .tempdir()
            .unwrap();
        // The sidecars run as UID 1337 and read their token and bundle from here.
        set_mode(dir.path(), 0o755);
        sh(&["ip", "netns", "add", &node]);
        let cluster = ClusterKey::new();
        let mut lab = Lab {
            node,
            dir,
            ca: None,
            pods: Vec::new(),
            procs: Vec::new(),
            cluster,
            next_ip: 2,
            ca_flags: ca_flags.iter().map(|f| f.to_string()).collect(),
        };
        lab.exec_node(&["ip", "link", "set", "lo", "up"]);
        lab.exec_node(&["ip", "link", "add", "br0", "type", "bridge"]);
        lab.exec_node(&["ip", "addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        lab.exec_node(&["ip", "link", "set", "br0", "up"]);
        let jwks = lab.path("jwks.json");
        std::fs::write(&jwks, lab.cluster.jwks()).unwrap();
        let ttl = workload_ttl.to_owned();
        lab.ca = Some(lab.start_ca(&ttl));
        let bundle = lab.path("bundle.pem");
        let pem = sh(&[
            kith_bin().to_str().unwrap(),
            "ca",
            "bundle",
            "--data-dir",
            lab.path("ca").to_str().unwrap(),
        ]);
        std::fs::write(&bundle, pem).unwrap();
        set_mode(&bundle, 0o644);
        lab
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn ca_url(&self) -> String {
        format!("https://{SUBNET}.1:{CA_PORT}")
    }

    /// `kith ca serve` in the node namespace on its data dir (a restart keeps the state).
    pub fn start_ca(&self, workload_ttl: &str) -> Proc {
        let ca_dir = self.path("ca");
        let jwks = self.path("jwks.json");
        let listen = format!("{SUBNET}.1:{CA_PORT}");
        let args = [
            "ca",
            "serve",
            "--data-dir",
            ca_dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--metrics-listen",
            "127.0.0.1:9090",
            "--k8s-issuer",
            ISSUER,
            "--k8s-jwks",
            jwks.to_str().unwrap(),
            "--workload-ttl",
            workload_ttl,
        ];
        let kith = kith_bin();
        let mut cmd = vec![kith.to_str().unwrap()];
        cmd.extend_from_slice(&args);
        cmd.extend(self.ca_flags.iter().map(String::as_str));
        let ca = self.spawn_in(&self.node, "ca", None, &cmd, &[("KITH_CA_KEK", CA_KEK)]);
        eventually("the CA answers", Duration::from_secs(20), || {
            self.exec_ok(&self.node, &[podapp(), "get", "127.0.0.1:9090", "/readyz"])
        });
        ca
    }

    /// Stops the CA with SIGTERM (as an init system would) and waits for it.
    pub fn stop_ca(&mut self) -> Option<i32> {
        let mut ca = self.ca.take()?;
        ca.signal(nix::sys::signal::Signal::SIGTERM);
        ca.wait_exit(Duration::from_secs(10))
    }

    /// Spawns `cmd` in namespace `ns`, as `uid` when given; stderr goes to `<dir>/<name>.log`.
    pub fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        uid: Option<u32>,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = self.path(&format!("{name}.log"));
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            c.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        c.args(cmd)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Proc::new(name, c.spawn().unwrap(), log)
    }

    /// Keeps `p` until the lab is dropped.
    pub fn keep(&mut self, p: Proc) {
        self.procs.push(p);
    }

    pub fn exec_node(&self, args: &[&str]) -> String {
        self.exec(&self.node, args)
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", ns];
        a.extend_from_slice(args);
        sh(&a)
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> bool {
        let mut a = vec!["ip", "netns", "exec", ns];
        a.extend_from_slice(args);
        run(&a).status.success()
    }

    /// A pod namespace with the next address, a veth into the bridge and a default route.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let ns = format!("{}-{name}", self.node);
        let ip = Ipv4Addr::new(10, 77, 0, self.next_ip);
        self.next_ip += 1;
        sh(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        let host_end = format!("v{}{}", self.next_ip, &name[..name.len().min(6)]);
        self.exec_node(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.exec_node(&["ip", "link", "set", &host_end, "master", "br0", "up"]);
        self.exec(&ns, &["ip", "link", "set", "lo", "up"]);
        self.exec(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        self.exec(&ns, &["ip", "link", "set", "eth0", "up"]);
        self.exec(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("{SUBNET}.1"),
            ],
        );
        Pod {
            name: name.to_owned(),
            ns,
            ip,
        }
    }

    /// A projected service-account token for pod `pod` of `default/<sa>`, issued `age` ago.
    pub fn token(&self, sa: &str, pod: &str, age: Duration) -> String {
        self.cluster.token("default", sa, pod, age)
    }

    /// Writes a valid token for `pod` (its service account is named like the pod).
    pub fn write_token(&self, pod: &Pod, age: Duration) {
        let path = self.token_path(pod);
        std::fs::write(&path, self.token(&pod.name, &pod.name, age)).unwrap();
        set_mode(&path, 0o644);
    }

    pub fn token_path(&self, pod: &Pod) -> PathBuf {
        self.path(&format!("{}.token", pod.name))
    }

    /// `kith sidecar init` in the pod: its nat rules, proven by the canary.
    pub fn init_capture(&self, pod: &Pod) {
        self.exec(&pod.ns, &[kith_bin().to_str().unwrap(), "sidecar", "init"]);
    }

    /// The pod's sidecar in transparent mode, as UID 1337, identity from the CA with the pod's
    /// token; `extra` flags are appended.
    pub fn start_sidecar(&self, pod: &Pod, extra: &[&str]) -> Proc {
        let kith = kith_bin();
        let token = self.token_path(pod);
        let bundle = self.path("bundle.pem");
        let ca = self.ca_url();
        let mut cmd = vec![
            kith.to_str().unwrap(),
            "sidecar",
            "run",
            "--k8s-token-file",
            token.to_str().unwrap(),
            "--ca",
            &ca,
            "--bundle",
            bundle.to_str().unwrap(),
            "--mesh-cidr",
            "10.77.0.0/24",
            "--log-format",
            "json",
        ];
        if !extra.contains(&"--admin-listen") {
            cmd.extend_from_slice(&["--admin-listen", "127.0.0.1:15020"]);
        }
        cmd.extend_from_slice(extra);
        self.spawn_in(
            &pod.ns,
            &format!("{}-sidecar", pod.name),
            Some(PROXY_UID),
            &cmd,
            &[("RUST_LOG", "info,proxy=debug")],
        )
    }

    /// The pod's application server on 0.0.0.0:8080, answering `<pod name>:<body>`.
    pub fn start_app(&self, pod: &Pod) -> Proc {
        let addr = format!("0.0.0.0:{APP_PORT}");
        self.spawn_in(
            &pod.ns,
            &format!("{}-app", pod.name),
            None,
            &[podapp(), "serve", &addr, &pod.name],
            &[],
        )
    }

    /// A pod with capture, sidecar and app, its sidecar ready.
    pub fn ready_pod(&mut self, name: &str, sidecar_flags: &[&str]) -> (Pod, Proc) {
        let pod = self.add_pod(name);
        self.write_token(&pod, Duration::ZERO);
        self.init_capture(&pod);
        let sidecar = self.start_sidecar(&pod, sidecar_flags);
        let app = self.start_app(&pod);
        self.keep(app);
        self.wait_ready(&pod, &sidecar);
        (pod, sidecar)
    }

    pub fn wait_ready(&self, pod: &Pod, sidecar: &Proc) {
        let what = format!("{}'s sidecar to be ready", pod.name);
        eventually(&what, Duration::from_secs(30), || {
            let ready = self.exec_ok(&pod.ns, &[podapp(), "get", "127.0.0.1:15020", "/ready"]);
            ready
                .then_some(())
                .ok_or_else(|| format!("its log:\n{}", sidecar.log()))
        });
    }

    /// One request from `from`'s app side (a process in its namespace, not UID 1337, so it is
    /// captured) to `to`'s app port: (succeeded, output).
    pub fn request(&self, from: &Pod, to: &Pod, body: &str) -> (bool, String) {
        let addr = format!("{}:{APP_PORT}", to.ip);
        let mut a = vec![
            "ip",
            "netns",
            "exec",
            &from.ns,
            podapp(),
            "get",
            &addr,
            "/",
            body,
        ];
        if body.is_empty() {
            a.pop();
        }
        let out = run(&a);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The pod sidecar's Prometheus text.
    pub fn metrics(&self, pod: &Pod) -> String {
        self.exec(&pod.ns, &[podapp(), "get", "127.0.0.1:15020", "/metrics"])
    }

    /// `kith ca <args>` admin commands against the lab's CA data dir.
    pub fn ca_cli(&self, args: &[&str]) -> String {
        let kith = kith_bin();
        let data = self.path("ca");
        let mut a = vec![kith.to_str().unwrap(), "ca"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--data-dir", data.to_str().unwrap()]);
        sh(&a)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.procs.clear();
        self.ca = None;
        for ns in self.pods.drain(..) {
            let _ = run(&["ip", "netns", "delete", &ns]);
        }
        let _ = run(&["ip", "netns", "delete", &self.node]);
    }
}

/// A pod: its namespace and address.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{}", self.name)
    }
}

/// The value of the series `series` (name and labels as written) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `kith_sidecar_connections_total{direction=…,result=…}` in `text` (0 when absent).
pub fn connections(text: &str, direction: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("kith_sidecar_connections_total{{direction=\"{direction}\",result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Successful identity updates (SVIDs published) of a sidecar.
pub fn identity_updates(text: &str) -> f64 {
    metric(text, "kith_sidecar_identity_updates_total{result=\"ok\"}").unwrap_or(0.0)
}

/// The peers a sidecar logged for established mTLS connections (JSON logs, proxy=debug).
pub fn logged_peers(log: &str, direction: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            // identity::mesh::events::MTLS_ESTABLISHED (this harness stands apart from kith's crates)
            v["fields"]["message"] == "mTLS connection established"
                && v["fields"]["direction"] == direction
        })
        .filter_map(|v| v["fields"]["peer"].as_str().map(str::to_owned))
        .collect()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
