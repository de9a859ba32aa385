//! Kubernetes as shipped, on the real Docker engine: `kith inject` rewrites
//! deploy/kubernetes/examples/app.yaml with the images built here (the `FROM scratch` kith image
//! and the capture init image of deploy/docker/build-init-image.sh), and the pod runner of
//! `integration::kubelet` runs two replicas of the injected pod as a kubelet would (pause
//! container, `kith-init`, the native sidecar `kith-proxy`, the app), beside a CA container
//! that trusts the lab cluster key's JWKS. Then:
//!
//! - pod A's app reaches pod B's app by B's IP, over mTLS: each sidecar logs the other's
//!   SPIFFE ID, and B's app answers;
//! - a capture on the node's Docker bridge shows only TLS 1.3 records between A and B, and
//!   never the request's bytes in clear;
//! - plaintext straight into B's app port is refused (STRICT) and counted;
//! - the app's probes were rewritten to the sidecar's `/app-health/…`, pass when the runner
//!   calls them as the kubelet does, and the probe port refuses plaintext like the app port;
//! - pod C (`kith.dev/mode: permissive`) lets plaintext in and counts it; pod D
//!   (`kith.dev/allow` naming another ID) refuses A as not_authorized;
//! - no namespace holds a bundle: each sidecar fetched it from the CA by the injector's pin;
//! - every container ran with the user, group, capabilities, read-only root and no privilege
//!   escalation its spec says (the engine's record, and /proc of the running processes);
//! - the init image fails closed: without NET_ADMIN, `kith sidecar init` exits non-zero.
//!
//! Needs root and a Docker engine (and apt-get/dpkg-deb for the init image): without them it
//! prints `SKIPPED kubernetes_pods: …` and passes; in CI (CI=true) that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::eventually;
use integration::kubelet::{self, Kind, Node, RunningPod, docker, process_identity};
use serde_json::Value;

const NAMESPACE: &str = "shop";
const APP_IMAGE_IN_SPEC: &str = "registry.example/shop/web:1.0";
const CA_ALIAS: &str = "kith-ca.kith-system.svc";
/// The body of A's request to B: it must never be on the wire in clear.
const MARKER: &str = "order 42 \u{2713} kith-k8s-marker";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const OTHER_ID: &str = "spiffe://cluster.local/ns/shop/sa/other";

#[test]
fn kubernetes_pods() {
    let Some(()) = prerequisites() else {
        return;
    };
    let began = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let kith = integration::static_build::static_kith(repo);
    let unique = format!(
        "{}-{:x}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut images = Images(Vec::new());
    let kith_image = format!("kith-k8s-kith:{unique}");
    let init_image = format!("kith-k8s-init:{unique}");
    let app_image = format!("kith-k8s-app:{unique}");
    build_kith_image(repo, &kith, dir.path(), &kith_image, &mut images);
    build_init_image(repo, &kith, &init_image, &mut images);
    build_app_image(repo, dir.path(), &app_image, &mut images);
    eprintln!("images built ({:?})", began.elapsed());

    init_image_fails_closed(&init_image);

    let mut node = new_node(&unique, &app_image);
    node.images.insert(kith_image.clone(), kith_image.clone());
    node.images.insert(init_image.clone(), init_image.clone());
    node.images
        .insert(APP_IMAGE_IN_SPEC.to_owned(), app_image.clone());
    // No bundle ConfigMap anywhere (the runner fails a pod that mounts a missing one): the
    // injector hands each sidecar the pin of the CA's bundle, and the sidecar fetches it.
    let bundle = start_ca(&mut node, &kith_image);
    let pin = ca::admin::bundle_sha256(&bundle);

    let inject = |annotations: &[(&str, &str)]| {
        injected_template(&kith, repo, &kith_image, &init_image, &pin, annotations)
    };
    let template = inject(&[]);
    // Pod C takes plaintext (a migration), pod D lets in only an ID that A does not have.
    let permissive = inject(&[("kith.dev/mode", "permissive")]);
    let allow_other = inject(&[("kith.dev/allow", OTHER_ID)]);

    let a = run_pod(&mut node, "web-a", &template);
    let b = run_pod(&mut node, "web-b", &template);
    let c = run_pod(&mut node, "web-c", &permissive);
    let d = run_pod(&mut node, "web-d", &allow_other);
    eprintln!("pods running ({:?})", began.elapsed());

    let capture = Capture::start(&node, dir.path());
    a_reaches_b_over_mtls(&a, &b);
    capture.only_tls_between(&a, &b);
    plaintext_into_b_is_refused(&b);
    probes_go_through_the_sidecar(&b);
    permissive_pod_accepts_plaintext_and_counts_it(&c);
    allow_annotation_refuses_a(&a, &d);
    for pod in [&a, &b, &c, &d] {
        containers_ran_as_their_spec_says(pod);
    }
    eprintln!("kubernetes_pods passed in {:?}", began.elapsed());
}

/// A's app (UID 10001, captured) calls B's IP on the app port; A's sidecar proves B's identity
/// and B's sidecar A's, and B's app answers.
fn a_reaches_b_over_mtls(a: &RunningPod, b: &RunningPod) {
    let body = MARKER;
    let out = a.exec(
        "web",
        &[
            "kith-testapp",
            "call",
            &format!("{}:8080", b.ip),
            "POST",
            "/orders",
            body,
        ],
    );
    let answer = out.ok().unwrap_or_else(|e| {
        panic!(
            "A -> B failed: {e}\nA's sidecar:\n{}\nB's sidecar:\n{}",
            a.logs("kith-proxy"),
            b.logs("kith-proxy")
        )
    });
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        answer.ends_with(&format!("web got POST /orders: {body}")),
        "{answer}"
    );
    eventually(
        "each sidecar logs the other's SPIFFE ID",
        Duration::from_secs(10),
        || {
            let out_peers = integration::logged_peers(&a.logs("kith-proxy"), "outbound");
            let in_peers = integration::logged_peers(&b.logs("kith-proxy"), "inbound");
            if out_peers == [WEB_ID] && in_peers == [WEB_ID] {
                Ok(())
            } else {
                Err(format!(
                    "A logged {out_peers:?} outbound, B {in_peers:?} inbound"
                ))
            }
        },
    );
    eventually(
        "the sidecars count the connection",
        Duration::from_secs(10),
        || {
            let a_out = integration::connections(&metrics(a), "outbound", "accepted");
            let b_in = integration::connections(&metrics(b), "inbound", "accepted");
            if a_out == 1.0 && b_in == 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "A outbound accepted {a_out}, B inbound accepted {b_in}"
                ))
            }
        },
    );
}

/// One plain HTTP request from the node (outside every pod, so no sidecar wraps it): what came
/// back.
fn plaintext(pod: &RunningPod, port: u16, path: &str) -> String {
    let addr: SocketAddr = format!("{}:{port}", pod.ip).parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Plain HTTP to B's app port never reaches the app: B's nat table hands it to the sidecar,
/// which wants TLS.
fn plaintext_into_b_is_refused(b: &RunningPod) {
    let answer = plaintext(b, 8080, "/plain");
    assert!(!answer.contains("HTTP/1.1 200"), "plaintext got: {answer}");
    eventually(
        "B counts the plaintext refusal",
        Duration::from_secs(10),
        || {
            let n = integration::connections(&metrics(b), "inbound", "plaintext_refused");
            if n == 1.0 {
                Ok(())
            } else {
                Err(format!("plaintext_refused = {n}"))
            }
        },
    );
    let app_log = b.logs("web");
    assert!(
        !app_log.contains("/plain"),
        "B's app saw the plaintext request:\n{app_log}"
    );
}

/// The app's probes were rewritten to the sidecar (the runner waited for the rewritten
/// readiness probe before calling the pod started), they pass when called as the kubelet
/// calls them, and the port the app serves them on is captured like any other: no plaintext.
fn probes_go_through_the_sidecar(b: &RunningPod) {
    let web = b.container_spec("web").unwrap();
    for (probe, kind) in [("readinessProbe", "readyz"), ("livenessProbe", "livez")] {
        assert_eq!(
            web[probe]["httpGet"],
            serde_json::json!({"path": format!("/app-health/web/{kind}"), "port": 15020}),
            "{probe}"
        );
        kubelet::probe_once(b, web, &web[probe]).unwrap();
    }
    let proxy = b.container_spec("kith-proxy").unwrap();
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--app-probe=web/readyz=http:8081/healthz"),
        "{args:?}"
    );
    let status: Value =
        serde_json::from_str(b.annotations["kith.dev/status"].as_str().unwrap()).unwrap();
    assert_eq!(status["probePorts"], serde_json::json!([]), "{status}");
    assert_eq!(
        status["inboundPortsNotCaptured"],
        serde_json::json!([15020])
    );

    let before = integration::connections(&metrics(b), "inbound", "plaintext_refused");
    let answer = plaintext(b, 8081, "/healthz");
    assert!(
        !answer.contains("HTTP/1.1 200"),
        "plaintext probe port: {answer}"
    );
    eventually(
        "B counts the plaintext on the probe port",
        Duration::from_secs(10),
        || {
            let n = integration::connections(&metrics(b), "inbound", "plaintext_refused");
            if n == before + 1.0 {
                Ok(())
            } else {
                Err(format!("plaintext_refused = {n}, was {before}"))
            }
        },
    );
}

/// `kith.dev/mode: permissive`: plaintext reaches C's app, and C's sidecar counts it.
fn permissive_pod_accepts_plaintext_and_counts_it(c: &RunningPod) {
    let answer = plaintext(c, 8080, "/migrating");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("web got GET /migrating: "), "{answer}");
    eventually(
        "C counts the plaintext it let in",
        Duration::from_secs(10),
        || {
            let n = integration::metric(
                &metrics(c),
                "kith_sidecar_captured_total{outcome=\"inbound_plaintext\"}",
            );
            if n == Some(1.0) {
                Ok(())
            } else {
                Err(format!("inbound_plaintext = {n:?}"))
            }
        },
    );
}

/// `kith.dev/allow` with another ID: D refuses A (not_authorized) and logs whom.
fn allow_annotation_refuses_a(a: &RunningPod, d: &RunningPod) {
    let out = a.exec(
        "web",
        &[
            "kith-testapp",
            "call",
            &format!("{}:8080", d.ip),
            "GET",
            "/",
        ],
    );
    assert_ne!(out.code, Some(0), "A got into D: {}", out.stdout);
    eventually(
        "D counts A as not authorized",
        Duration::from_secs(10),
        || {
            let n = integration::connections(&metrics(d), "inbound", "not_authorized");
            if n == 1.0 {
                Ok(())
            } else {
                Err(format!("not_authorized = {n}"))
            }
        },
    );
    let log = d.logs("kith-proxy");
    assert!(
        log.contains("inbound connection not authorized") && log.contains(WEB_ID),
        "D's sidecar log:\n{log}"
    );
    assert!(!d.logs("web").contains("GET / "), "D's app saw A's request");
}

/// The engine's record of each container against its spec, and for the running ones, the
/// process itself: user, group and effective capabilities.
fn containers_ran_as_their_spec_says(pod: &RunningPod) {
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["kith-init", "kith-proxy", "web"], "{}", pod.name);
    for c in &pod.containers {
        let spec = pod.container_spec(&c.name).unwrap();
        let sc = &spec["securityContext"];
        let inspect: Value =
            serde_json::from_str(docker(&["inspect", &c.id]).ok().unwrap()).unwrap();
        let inspect = &inspect[0];
        let host = &inspect["HostConfig"];
        let pod_sc = &pod.spec["securityContext"];
        let want_uid = sc["runAsUser"].as_u64().or(pod_sc["runAsUser"].as_u64());
        let want_gid = sc["runAsGroup"].as_u64().or(pod_sc["runAsGroup"].as_u64());
        let user = format!("{}:{}", want_uid.unwrap(), want_gid.unwrap());
        assert_eq!(inspect["Config"]["User"], user.as_str(), "{}", c.name);
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        let cap_list = |v: &Value| -> Vec<String> {
            let mut l: Vec<String> = strings(v)
                .into_iter()
                .map(|c| c.trim_start_matches("CAP_").to_owned())
                .collect();
            l.sort();
            l
        };
        assert_eq!(
            cap_list(&host["CapDrop"]),
            cap_list(&sc["capabilities"]["drop"]),
            "{} drops",
            c.name
        );
        assert_eq!(
            cap_list(&host["CapAdd"]),
            cap_list(&sc["capabilities"]["add"]),
            "{} adds",
            c.name
        );
        assert_eq!(
            host["ReadonlyRootfs"], sc["readOnlyRootFilesystem"],
            "{}",
            c.name
        );
        assert_eq!(
            strings(&host["SecurityOpt"]).contains(&"no-new-privileges".to_owned()),
            sc["allowPrivilegeEscalation"] == Value::Bool(false),
            "{}",
            c.name
        );
        assert_eq!(host["Privileged"], false, "{}", c.name);
        match c.kind {
            Kind::Init => {
                assert_eq!(inspect["State"]["ExitCode"], 0, "{}", c.name);
                let log = pod.logs(&c.name);
                assert!(log.contains("verified"), "kith-init's report:\n{log}");
            }
            Kind::Sidecar | Kind::App => {
                assert_eq!(inspect["State"]["Running"], true, "{}", c.name);
                let (uid, gid, caps) = process_identity(&c.id).unwrap();
                assert_eq!((Some(uid), Some(gid)), (want_uid, want_gid), "{}", c.name);
                assert_eq!(caps, 0, "{} has capabilities {caps:#x}", c.name);
            }
        }
    }
    // The one with capabilities: exactly NET_ADMIN and NET_RAW, as root.
    let init = pod.container("kith-init");
    assert_eq!(init.cap_add, ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(init.cap_drop, ["ALL"]);
    assert_eq!(init.uid, Some(0));
    let proxy = pod.container("kith-proxy");
    assert_eq!(proxy.uid, Some(1337));
    assert_eq!(proxy.kind, Kind::Sidecar);
}

/// The init image with everything the spec grants except NET_ADMIN: `kith sidecar init` must
/// fail (no capture, no pod), for IPv4 and IPv6 alike; with it, it succeeds and proves the
/// capture with its canary.
fn init_image_fails_closed(init_image: &str) {
    let base = [
        "run",
        "--rm",
        "--user",
        "0:0",
        "--cap-drop",
        "ALL",
        "--read-only",
        "--tmpfs",
        "/run",
        "--security-opt",
        "no-new-privileges",
    ];
    let cmd = ["sidecar", "init", "--proxy-uid=1337"];
    let mut without = base.to_vec();
    without.extend(["--cap-add", "NET_RAW", init_image]);
    without.extend(cmd);
    let out = docker(&without);
    assert_ne!(out.code, Some(0), "init without NET_ADMIN: {}", out.stdout);
    assert!(out.stderr.contains("error:"), "{}", out.stderr);

    let mut with = base.to_vec();
    with.extend(["--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", init_image]);
    with.extend(cmd);
    let out = docker(&with);
    let report = out.ok().unwrap().to_owned();
    assert!(report.contains("verified"), "{report}");
    assert!(
        report.contains("ip6tables"),
        "IPv6 is captured too:\n{report}"
    );
}

fn metrics(pod: &RunningPod) -> String {
    let (status, body) =
        kubelet::http_get(&pod.ip, 15020, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200);
    body
}

fn run_pod(node: &mut Node, name: &str, template: &Value) -> RunningPod {
    node.run_pod(NAMESPACE, name, template)
        .unwrap_or_else(|e| panic!("pod {name}: {e}"))
}

/// The CA, as 11-ca.yaml runs it (trust domain cluster.local, Kubernetes attestation), with the
/// lab cluster key's JWKS instead of the API server's, reachable as kith-ca.kith-system.svc.
fn start_ca(node: &mut Node, kith_image: &str) -> String {
    let jwks = node.path("jwks.json");
    std::fs::write(&jwks, node.key.jwks()).unwrap();
    let mount = format!("{}:/etc/kith/jwks.json:ro", jwks.display());
    let id = node
        .run_detached(
            "ca",
            &[
                "--network-alias",
                CA_ALIAS,
                "-v",
                &mount,
                "-e",
                &format!("KITH_CA_KEK={}", integration::CA_KEK),
                "--read-only",
                "--tmpfs",
                "/tmp",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--mount",
                "type=volume,dst=/var/lib/kith-ca",
                kith_image,
                "ca",
                "serve",
                "--data-dir=/var/lib/kith-ca/data",
                "--trust-domain=cluster.local",
                "--listen=0.0.0.0:8443",
                "--metrics-listen=0.0.0.0:9090",
                &format!("--dns={CA_ALIAS}"),
                &format!("--k8s-issuer={}", integration::ISSUER),
                "--k8s-jwks=/etc/kith/jwks.json",
                "--log-format=json",
            ],
        )
        .unwrap();
    let ip = node.ip_of(&id).unwrap();
    eventually(
        "the CA is ready",
        Duration::from_secs(60),
        || match kubelet::http_get(&ip, 9090, "/readyz", Duration::from_secs(2)) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let out = docker(&[
        "exec",
        &id,
        "kith",
        "ca",
        "bundle",
        "--data-dir=/var/lib/kith-ca/data",
    ]);
    out.ok().unwrap();
    // Untrimmed: the pin is the SHA-256 of exactly what the CA serves.
    let pem = out.stdout;
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    pem
}

/// `kith inject -f -` of deploy/kubernetes/examples/app.yaml's web Deployment, with the local
/// images, the CA bundle's pin and `annotations` added to its pod template: the injected pod
/// template.
fn injected_template(
    kith: &Path,
    repo: &Path,
    image: &str,
    init_image: &str,
    pin: &str,
    annotations: &[(&str, &str)],
) -> Value {
    let example =
        std::fs::read_to_string(repo.join("deploy/kubernetes/examples/app.yaml")).unwrap();
    let mut deployment = yaml_docs(&example)
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the example has a Deployment");
    for (k, v) in annotations {
        deployment["spec"]["template"]["metadata"]["annotations"][*k] = Value::from(*v);
    }
    let mut child = Command::new(kith)
        .args([
            "inject",
            "-f",
            "-",
            "--image",
            image,
            "--init-image",
            init_image,
            "--bundle-sha256",
            pin,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_norway::to_string(&deployment).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let injected = yaml_docs(&text).into_iter().next().unwrap();
    let mut template = injected["spec"]["template"].clone();
    // The sidecar logs each connection's peer at debug level; as compose.test.yaml does, the
    // test turns that on (an env var the runner passes like any other), nothing else.
    let proxy = template["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "kith-proxy")
        .unwrap();
    assert!(proxy.get("env").is_none(), "{proxy}");
    proxy["env"] = serde_json::json!([{"name": "RUST_LOG", "value": "info,proxy=debug"}]);
    template
}

/// The documents of a multi-document YAML text.
fn yaml_docs(text: &str) -> Vec<Value> {
    let mut docs: Vec<Value> = Vec::new();
    let mut doc = String::new();
    for line in text.lines().chain(["---"]) {
        if line == "---" {
            if let Ok(v) = serde_norway::from_str::<Value>(&doc)
                && !v.is_null()
            {
                docs.push(v);
            }
            doc.clear();
        } else {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

/// A node on the first free /24 of 10.249.0.0/16.
fn new_node(unique: &str, pause_image: &str) -> Node {
    let start = std::process::id() % 250;
    let mut last = String::new();
    for i in 0..250 {
        let subnet = format!("10.249.{}.0/24", (start + i) % 250);
        match Node::new(&format!("kith-k8s-{unique}"), &subnet, pause_image) {
            Ok(n) => return n,
            Err(e) => last = e,
        }
    }
    panic!("no free /24 for the node's network: {last}");
}

// ---- the wire ----

/// tcpdump on the bridge of the node's Docker network, where the pods' packets cross.
struct Capture {
    child: std::process::Child,
    file: PathBuf,
    log: PathBuf,
}

impl Capture {
    fn start(node: &Node, dir: &Path) -> Capture {
        let id = docker(&["network", "inspect", "-f", "{{.Id}}", &node.network])
            .ok()
            .unwrap()
            .to_owned();
        let bridge = format!("br-{}", &id[..12]);
        let (file, log) = (dir.join("bridge.pcap"), dir.join("tcpdump.log"));
        let child = Command::new("tcpdump")
            .args(["-i", &bridge, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let c = Capture { child, file, log };
        eventually(
            "tcpdump listens on the bridge",
            Duration::from_secs(10),
            || {
                let text = std::fs::read_to_string(&c.log).unwrap_or_default();
                if text.contains("listening on") {
                    Ok(())
                } else {
                    Err(text)
                }
            },
        );
        c
    }

    /// Stops the capture; every flow between A and B (both ways) is whole TLS records, the
    /// server chose TLS 1.3, and the marker never crossed in clear.
    fn only_tls_between(mut self, a: &RunningPod, b: &RunningPod) {
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "the request is on the wire in clear"
        );
        let ips: [std::net::Ipv4Addr; 2] = [a.ip.parse().unwrap(), b.ip.parse().unwrap()];
        let flows = integration::pcap::flows(&bytes).unwrap();
        let between: Vec<_> = flows
            .iter()
            .filter(|((src, _, dst, _), _)| ips.contains(src) && ips.contains(dst))
            .collect();
        assert_eq!(
            between.len(),
            2,
            "one connection, payload both ways: {:?}; tcpdump: {}",
            flows.keys(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        let mut tls13 = 0;
        for (flow, stream) in between {
            let records = integration::pcap::tls_records(stream)
                .unwrap_or_else(|e| panic!("{flow:?} is not TLS: {e}"));
            assert!(records.handshake >= 1, "{flow:?}: {records:?}");
            assert!(records.application_data >= 1, "{flow:?}: {records:?}");
            tls13 += usize::from(records.server_hello_tls13);
        }
        assert_eq!(tls13, 1, "the server chose TLS 1.3");
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- images ----

/// Removed on drop.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for i in &self.0 {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

fn build_kith_image(repo: &Path, kith: &Path, dir: &Path, tag: &str, images: &mut Images) {
    let ctx = dir.join("kith-context");
    std::fs::create_dir_all(ctx.join("empty")).unwrap();
    std::fs::copy(kith, ctx.join("kith")).unwrap();
    images.0.push(tag.to_owned());
    let file = repo.join("deploy/docker/Dockerfile.local");
    docker(&[
        "build",
        "-q",
        "--network",
        "none",
        "-f",
        file.to_str().unwrap(),
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ])
    .ok()
    .unwrap();
}

fn build_init_image(repo: &Path, kith: &Path, tag: &str, images: &mut Images) {
    images.0.push(tag.to_owned());
    let out = Command::new(repo.join("deploy/docker/build-init-image.sh"))
        .arg(kith)
        .arg(tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-init-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The example's app: kith-testapp serving the app port (8080) and the probe port (8081).
fn build_app_image(repo: &Path, dir: &Path, tag: &str, images: &mut Images) {
    let ctx = dir.join("app-context");
    std::fs::create_dir_all(&ctx).unwrap();
    let bin = ctx.join("kith-testapp");
    let out = Command::new("rustc")
        .args([
            "--edition",
            "2024",
            "-C",
            "target-feature=+crt-static",
            "-O",
            "-o",
        ])
        .arg(&bin)
        .arg(repo.join("deploy/docker/testapp/main.rs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY kith-testapp /usr/local/bin/kith-testapp\nENV PATH=/usr/local/bin\n\
         USER 65532:65532\nENTRYPOINT [\"/usr/local/bin/kith-testapp\"]\n\
         CMD [\"serve\", \"0.0.0.0:8080,0.0.0.0:8081\", \"web\"]\n",
    )
    .unwrap();
    images.0.push(tag.to_owned());
    docker(&[
        "build",
        "-q",
        "--network",
        "none",
        "-t",
        tag,
        ctx.to_str().unwrap(),
    ])
    .ok()
    .unwrap();
}

// ---- the machine ----

fn prerequisites() -> Option<()> {
    let mut missing = Vec::new();
    if !nix_is_root() {
        missing.push("root".to_owned());
    }
    if let Err(e) = kubelet::engine_available() {
        missing.push(format!("a Docker engine ({e})"));
    }
    for tool in ["apt-get", "apt-cache", "dpkg-deb", "tcpdump"] {
        if Command::new(tool).arg("--version").output().is_err() {
            missing.push(tool.to_owned());
        }
    }
    if missing.is_empty() {
        return Some(());
    }
    integration::skip::skip("kubernetes_pods", &format!("needs {}", missing.join(", ")));
    None
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
