//! kith on a real Docker host, as deploy/docker/compose.yaml sets it up: the images built here
//! (`FROM scratch` with the static `kith` binary, and the stand-in app), the compose project
//! brought up with a CA, the host's agent and two services with sidecars, then:
//!
//! - the Docker attestor against the real engine: containers labelled `kith.dev/service=web`
//!   and `=api` get different SVIDs from the agent, a label without an entry and no label at
//!   all get none;
//! - web's app sends a request through its sidecar, over mTLS, to api's sidecar and app, and
//!   the bytes cross unchanged; each sidecar shows its own ID in /metrics, api's logs the peer
//!   ID it authorized (web), web's only connects to a server proving api;
//! - refusals: a sidecar with an ID that api does not allow (other), plaintext to api's mTLS
//!   port, and api's app from the network (loopback only); the app sees exactly one request.
//!
//! Everything is torn down (containers, network, volumes, images) even when a check fails,
//! after printing the project's logs. Without a Docker engine (or docker-compose), the test
//! prints `SKIPPED docker_compose: …` and passes; in CI (CI=true) that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::eventually;
use serde_json::Value;

/// The CA's user in the image (Dockerfile.local, Dockerfile).
const CA_UID: u32 = 65532;
const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";
const OTHER: &str = "spiffe://example.org/other";
const NODE: &str = "spiffe://example.org/kith/node/docker-host";

#[test]
fn docker_compose() {
    let Some(compose_cmd) = docker_or_skip() else {
        return;
    };
    let began = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();

    let t = Instant::now();
    let kith = integration::static_build::static_kith(repo);
    eprintln!("static kith: {} ({:?})", kith.display(), t.elapsed());
    let Some(kek) = kek_file(dir.path()) else {
        return;
    };
    let unique = format!(
        "{}-{:x}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut stack = Stack {
        project: format!("kith-e2e-{unique}"),
        files: vec![
            repo.join("deploy/docker/compose.yaml"),
            repo.join("deploy/docker/compose.test.yaml"),
        ],
        compose_cmd,
        env: vec![
            ("KITH_IMAGE".into(), format!("kith-e2e-kith:{unique}")),
            (
                "KITH_TESTAPP_IMAGE".into(),
                format!("kith-e2e-testapp:{unique}"),
            ),
            ("KITH_NET".into(), free_net()),
            ("KITH_CA_KEK_FILE".into(), kek.display().to_string()),
        ],
        images: Vec::new(),
    };

    let t = Instant::now();
    build_images(&mut stack, repo, &kith, dir.path());
    eprintln!("images built in {:?}", t.elapsed());
    let t = Instant::now();
    ca_and_agent(&mut stack);
    eprintln!("CA and agent up in {:?}", t.elapsed());
    let t = Instant::now();
    svids_by_label(&stack);
    eprintln!("attestation checks in {:?}", t.elapsed());
    let t = Instant::now();
    services(&stack);
    eprintln!("services ready in {:?}", t.elapsed());
    web_calls_api(&stack, &unique);
    refusals(&stack);
    stack.down();
    eprintln!("docker_compose passed in {:?}", began.elapsed());
}

/// The kith image from the static binary (Dockerfile.local) and the stand-in app's.
fn build_images(stack: &mut Stack, repo: &Path, kith: &Path, dir: &Path) {
    let kith_image = stack.var("KITH_IMAGE");
    let testapp_image = stack.var("KITH_TESTAPP_IMAGE");
    let ctx = dir.join("kith-context");
    std::fs::create_dir_all(ctx.join("empty")).unwrap();
    copy_stripped(kith, &ctx.join("kith"));
    stack.images.push(kith_image.clone());
    build_image(
        &repo.join("deploy/docker/Dockerfile.local"),
        &ctx,
        &kith_image,
    );

    let app_ctx = dir.join("testapp-context");
    std::fs::create_dir_all(&app_ctx).unwrap();
    build_testapp(repo, &app_ctx.join("kith-testapp"));
    stack.images.push(testapp_image.clone());
    build_image(
        &repo.join("deploy/docker/testapp/Dockerfile"),
        &app_ctx,
        &testapp_image,
    );

    let kith_size = image_size(&kith_image);
    eprintln!(
        "image sizes: kith {:.1} MB, testapp {:.1} MB",
        kith_size as f64 / 1e6,
        image_size(&testapp_image) as f64 / 1e6
    );
    // FROM scratch: the image is the binary and an empty directory, nothing else. (The test
    // binary is unoptimised, see integration::static_build; the release one makes about 16 MB.)
    let binary = std::fs::metadata(ctx.join("kith")).unwrap().len();
    assert!(
        kith_size < binary + 1_000_000,
        "the kith image is {kith_size} bytes for a {binary}-byte binary: it carries more than kith"
    );
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", &kith_image]);
    assert_eq!(user.stdout.trim(), "65532:65532", "runs as non-root");
}

/// The README's steps: the CA, a join token, one entry per service, the agent with the token.
fn ca_and_agent(stack: &mut Stack) {
    stack.compose(&["up", "-d", "ca"], 180).ok();
    eventually(
        "the CA answers on its admin socket",
        Duration::from_secs(60),
        || stack.kith_ca(&["status"]).ok_or_err(),
    );
    let token = stack
        .kith_ca(&["token", "create", "--name", "docker-host", "--json"])
        .ok();
    let token: Value = serde_json::from_str(&token.stdout).unwrap();
    assert_eq!(token["spiffe_id"], NODE);
    for (id, service) in [(WEB, "web"), (API, "api"), (OTHER, "other")] {
        let selector = format!("docker:label:kith.dev/service={service}");
        let created = stack
            .kith_ca(&[
                "entry",
                "create",
                "--id",
                id,
                "--parent",
                NODE,
                "--selector",
                &selector,
            ])
            .ok();
        assert!(created.stdout.contains(id), "{}", created.stdout);
    }
    // Every later compose call carries the token, so that `up` never sees the agent's
    // configuration change (and recreate it) between calls.
    for (var, field) in [
        ("KITH_AGENT_JOIN_TOKEN", "token"),
        ("KITH_AGENT_BUNDLE_SHA256", "bundle_sha256"),
    ] {
        let value = token[field].as_str().unwrap().to_owned();
        stack.env.push((var.into(), value));
    }
    stack.compose(&["up", "-d", "agent"], 180).ok();
}

/// The Docker attestor on the real engine: fresh containers that differ only in their label
/// get web's SVID, api's, or none.
fn svids_by_label(stack: &Stack) {
    let web = eventually(
        "the agent issues web's SVID",
        Duration::from_secs(60),
        || stack.probe(Some("web")),
    );
    assert_eq!(web, WEB);
    // The agent fetches all its entries' SVIDs together; a short wait covers a slow CA.
    let api = eventually(
        "the agent issues api's SVID",
        Duration::from_secs(30),
        || stack.probe(Some("api")),
    );
    assert_eq!(api, API);
    for label in [Some("stranger"), None] {
        let refused = stack.probe(label).unwrap_err();
        assert!(
            refused.contains("no registration entry matches this process"),
            "label {label:?}: {refused}"
        );
    }
}

/// The rest of the project; each sidecar ready (an SVID from the agent) and showing its own ID.
fn services(stack: &Stack) {
    stack.compose(&["up", "-d"], 180).ok();
    for (app, id) in [("web-app", WEB), ("api-app", API), ("other-app", OTHER)] {
        eventually(
            &format!("{app}'s sidecar is ready"),
            Duration::from_secs(60),
            || {
                let ready = stack.call(app, "127.0.0.1:15020", "GET", "/ready", "");
                if ready.starts_with("HTTP/1.1 200 OK") {
                    Ok(())
                } else {
                    Err(ready)
                }
            },
        );
        assert_eq!(stack.metrics(app).svid_id(), Some(id), "{app}'s sidecar");
    }
}

/// web's app → web's sidecar → mTLS → api's sidecar → api's app, and who saw whom: web's
/// sidecar connects only to a server proving api (--expect-id), api's lets only web in and
/// logs the peer ID of the connection.
fn web_calls_api(stack: &Stack, unique: &str) {
    let body = format!("order {unique} \u{2713} 42");
    let answer = stack.call("web-app", "127.0.0.1:9000", "POST", "/orders", &body);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        answer.ends_with(&format!("api got POST /orders: {body}")),
        "{answer}"
    );
    eventually(
        "web's sidecar counts the connection",
        Duration::from_secs(10),
        || check_eq(stack.connections("web-app", "outbound", "accepted"), 1),
    );
    check_eq(stack.connections("api-app", "inbound", "accepted"), 1).unwrap();
    eventually(
        "api's sidecar logs web as the peer",
        Duration::from_secs(10),
        || {
            let peers = stack.api_log(identity::mesh::events::MTLS_ESTABLISHED, "peer");
            if peers == [WEB] {
                Ok(())
            } else {
                Err(format!("peers logged: {peers:?}"))
            }
        },
    );
}

/// other has an SVID, but api allows only web; plaintext never reaches api's app, and the app
/// itself listens on loopback only. Through all of it, api's app saw web's request only.
fn refusals(stack: &Stack) {
    let refused = stack.call("other-app", "127.0.0.1:9000", "POST", "/orders", "other");
    assert!(
        refused.contains("connection closed without an answer"),
        "{refused}"
    );
    eventually(
        "api's sidecar counts other as not authorized",
        Duration::from_secs(10),
        || check_eq(stack.connections("api-app", "inbound", "not_authorized"), 1),
    );
    eventually(
        "api's sidecar logs whom it refused, at info",
        Duration::from_secs(10),
        || {
            let denied: Vec<String> = stack
                .logs("api-sidecar")
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| {
                    v["level"] == "INFO"
                        && v["fields"]["message"] == "connection refused"
                        && v["fields"]["reason"] == "not_authorized"
                })
                .map(|v| {
                    v["fields"]["peer_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            if denied == [OTHER] {
                Ok(())
            } else {
                Err(format!("denials logged: {denied:?}"))
            }
        },
    );
    eventually(
        "other's sidecar sees the refusal",
        Duration::from_secs(10),
        || {
            check_eq(
                stack.connections("other-app", "outbound", "peer_refused"),
                1,
            )
        },
    );

    let api_ip = format!("{}.10", stack.var("KITH_NET"));
    let plain = stack.call("other-app", &format!("{api_ip}:8443"), "GET", "/", "");
    assert!(!plain.contains("HTTP/1.1"), "{plain}");
    eventually(
        "api's sidecar counts the plaintext refusal",
        Duration::from_secs(10),
        || {
            check_eq(
                stack.connections("api-app", "inbound", "plaintext_refused"),
                1,
            )
        },
    );
    let direct = stack.call("other-app", &format!("{api_ip}:8080"), "GET", "/", "");
    assert!(direct.contains("Connection refused"), "{direct}");

    let app_log = stack.logs("api-app");
    assert_eq!(
        app_log.matches("kith-testapp api: ").count(),
        1,
        "api's app saw one request only:\n{app_log}"
    );
}

// ---- the compose project ----

/// The project and its images; torn down on drop, also on panic (with the logs printed).
struct Stack {
    project: String,
    files: Vec<PathBuf>,
    /// `docker-compose`, or `docker compose`.
    compose_cmd: Vec<String>,
    env: Vec<(String, String)>,
    images: Vec<String>,
}

impl Stack {
    fn var(&self, key: &str) -> String {
        let (_, v) = self.env.iter().find(|(k, _)| k == key).unwrap();
        v.clone()
    }

    fn compose(&self, args: &[&str], timeout_secs: u64) -> Out {
        let mut cmd = Command::new(&self.compose_cmd[0]);
        cmd.args(&self.compose_cmd[1..]).args(["-p", &self.project]);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        run(cmd, Duration::from_secs(timeout_secs))
    }

    /// `kith ca <args>` in the CA's container.
    fn kith_ca(&self, args: &[&str]) -> Out {
        let mut all = vec!["exec", "-T", "ca", "kith", "ca"];
        all.extend_from_slice(args);
        self.compose(&all, 30)
    }

    /// `kith agent fetch` in a fresh container with `kith.dev/service=<label>`: the SPIFFE ID
    /// the agent issued it, or the error it printed.
    fn probe(&self, label: Option<&str>) -> Result<String, String> {
        let label_arg = label.map(|l| format!("kith.dev/service={l}"));
        let mut args = vec!["run", "--rm", "-T"];
        if let Some(l) = &label_arg {
            args.extend(["-l", l]);
        }
        args.push("probe");
        let out = self.compose(&args, 60);
        if out.code != Some(0) {
            return Err(format!("{}{}", out.stdout, out.stderr));
        }
        let line = out.stdout.lines().find(|l| l.starts_with('{'));
        let written: Value = serde_json::from_str(line.unwrap_or_default())
            .map_err(|e| format!("{e}: {}", out.stdout))?;
        Ok(written["spiffe_id"].as_str().unwrap_or_default().to_owned())
    }

    /// One HTTP request from inside `service`'s network namespace (its sidecar's too); the
    /// status line and body, or kith-testapp's error.
    fn call(&self, service: &str, addr: &str, method: &str, path: &str, body: &str) -> String {
        let out = self.compose(
            &[
                "exec",
                "-T",
                service,
                "kith-testapp",
                "call",
                addr,
                method,
                path,
                body,
            ],
            60,
        );
        if out.code == Some(0) {
            out.stdout.trim_end().to_owned()
        } else {
            format!("exit {:?}: {}{}", out.code, out.stdout, out.stderr)
        }
    }

    /// The /metrics of the sidecar in `app`'s network namespace.
    fn metrics(&self, app: &str) -> Metrics {
        let text = self.call(app, "127.0.0.1:15020", "GET", "/metrics", "");
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        Metrics(text)
    }

    /// `kith_sidecar_connections_total{direction, result}` of the sidecar in `app`'s namespace.
    fn connections(&self, app: &str, direction: &str, result: &str) -> Option<u64> {
        self.metrics(app)
            .value("kith_sidecar_connections_total", direction, result)
    }

    /// A service's container output, without compose's prefixes.
    fn logs(&self, service: &str) -> String {
        let id = self.compose(&["ps", "-q", service], 30).ok().stdout;
        let out = docker(&["logs", id.trim()]);
        format!("{}{}", out.stdout, out.stderr)
    }

    /// The `field` of every JSON log line of api's sidecar whose message is `message`.
    fn api_log(&self, message: &str, field: &str) -> Vec<String> {
        self.logs("api-sidecar")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"][field].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn down(&mut self) {
        let out = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"], 180);
        if out.code != Some(0) {
            eprintln!("compose down failed: {}", out.stderr);
        }
        // Whatever compose left (or could not remove), by its project label.
        let label = format!("label=com.docker.compose.project={}", self.project);
        for (list, remove) in [
            (vec!["ps", "-aq", "--filter", &label], vec!["rm", "-f"]),
            (
                vec!["volume", "ls", "-q", "--filter", &label],
                vec!["volume", "rm", "-f"],
            ),
            (
                vec!["network", "ls", "-q", "--filter", &label],
                vec!["network", "rm"],
            ),
        ] {
            let ids = docker(&list).stdout;
            for id in ids.split_whitespace() {
                eprintln!("removing leftover {id}");
                let mut args = remove.clone();
                args.push(id);
                let _ = docker(&args);
            }
        }
        for image in self.images.drain(..) {
            let _ = docker(&["rmi", "-f", &image]);
        }
        self.files.clear();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.files.is_empty() {
            return;
        }
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color", "--timestamps"], 60);
            eprintln!(
                "---- docker-compose logs of {} ----\n{}{}\n---- end of logs ----",
                self.project, logs.stdout, logs.stderr
            );
        }
        self.down();
    }
}

/// Prometheus text from a sidecar's /metrics.
struct Metrics(String);

impl Metrics {
    /// The SPIFFE ID of the sidecar's current SVID.
    fn svid_id(&self) -> Option<&str> {
        let prefix = "kith_sidecar_svid_seconds_to_expiry{spiffe_id=\"";
        let line = self.0.lines().find(|l| l.starts_with(prefix))?;
        line[prefix.len()..].split('"').next()
    }

    /// `name{direction="…",result="…"}`.
    fn value(&self, name: &str, direction: &str, result: &str) -> Option<u64> {
        let series = format!("{name}{{direction=\"{direction}\",result=\"{result}\"}} ");
        let line = self.0.lines().find(|l| l.starts_with(&series))?;
        line[series.len()..].trim().parse().ok()
    }
}

fn check_eq(got: Option<u64>, want: u64) -> Result<(), String> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(format!("got {got:?}, want {want}"))
    }
}

// ---- building ----

/// The symbols are 20 % of the binary and nothing in a container reads them.
fn copy_stripped(from: &Path, to: &Path) {
    let mut cmd = Command::new("strip");
    cmd.arg("-o").arg(to).arg(from);
    let out = run(cmd, Duration::from_secs(60));
    if out.code != Some(0) {
        eprintln!(
            "strip unavailable ({}): the image gets the binary as built",
            out.stderr.trim()
        );
        std::fs::copy(from, to).unwrap();
    }
}

fn build_testapp(repo: &Path, out: &Path) {
    let mut cmd = Command::new("rustc");
    cmd.args([
        "--edition",
        "2024",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "strip=symbols",
        "-O",
        "-o",
    ])
    .arg(out)
    .arg(repo.join("deploy/docker/testapp/main.rs"));
    run(cmd, Duration::from_secs(300)).ok();
}

fn build_image(dockerfile: &Path, context: &Path, tag: &str) {
    // Scratch images need nothing from the network.
    docker(&[
        "build",
        "-q",
        "--force-rm",
        "--network",
        "none",
        "-f",
        &dockerfile.display().to_string(),
        "-t",
        tag,
        &context.display().to_string(),
    ])
    .ok();
}

fn image_size(tag: &str) -> u64 {
    let out = docker(&["image", "inspect", "-f", "{{.Size}}", tag]);
    out.ok().stdout.trim().parse().unwrap()
}

/// The CA's key-encryption key, as compose.yaml's secret: 32 random bytes in base64, 0600,
/// owned by the CA's user. `None` (skipped) when this process may not give it away.
fn kek_file(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut key)
        .unwrap();
    let path = dir.join("kith-ca.kek");
    std::fs::write(&path, format!("{}\n", base64(&key))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Err(e) = std::os::unix::fs::chown(&path, Some(CA_UID), Some(CA_UID)) {
        skip_or_fail(&format!(
            "cannot hand the CA's key file to uid {CA_UID} ({e}): run as root, as CI does"
        ));
        return None;
    }
    Some(path)
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- the machine ----

/// The compose command when an engine answers; `None` after printing why the test is skipped
/// (a failure in CI, where the engine and docker-compose are part of the machine).
fn docker_or_skip() -> Option<Vec<String>> {
    let info = docker(&["info", "--format", "{{.ServerVersion}}"]);
    if info.code != Some(0) {
        skip_or_fail(&format!(
            "no Docker engine answers ({})",
            info.stderr.trim()
        ));
        return None;
    }
    for candidate in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let mut cmd = Command::new(candidate[0]);
        cmd.args(&candidate[1..]).arg("version");
        if run(cmd, Duration::from_secs(30)).code == Some(0) {
            return Some(candidate.into_iter().map(String::from).collect());
        }
    }
    skip_or_fail("neither docker-compose nor `docker compose` is installed");
    None
}

fn skip_or_fail(why: &str) {
    integration::skip::skip("docker_compose", why);
}

/// The first three octets of a /24 for the project's network (compose.yaml's KITH_NET) that
/// no Docker network and no route of this host overlaps. Starts at a pid-derived offset, so
/// that two runs at once pick different ones.
fn free_net() -> String {
    let mut used: Vec<(u32, u32)> = Vec::new();
    let ids = docker(&["network", "ls", "-q"]).ok().stdout.clone();
    for id in ids.split_whitespace() {
        let out = docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            id,
        ]);
        for cidr in out.stdout.split_whitespace() {
            used.extend(parse_cidr(cidr));
        }
    }
    // /proc/net/route: destination and mask as the hex of a network-order u32 read natively;
    // the default route (mask 0) is no conflict.
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let word = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|n| u32::from_be_bytes(n.to_ne_bytes()))
    };
    for line in routes.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let (Some(dst), Some(mask)) = (
            f.get(1).and_then(|h| word(h)),
            f.get(7).and_then(|h| word(h)),
        ) && mask != 0
        {
            used.push((dst, mask));
        }
    }
    let start = std::process::id() % 250;
    (0..250)
        .map(|i| (start + i) % 250)
        .map(|third| (10u32 << 24 | 247 << 16 | third << 8, 0xffff_ff00u32))
        .find(|&(net, mask)| {
            used.iter()
                .all(|&(u, umask)| (net & (mask & umask)) != (u & (mask & umask)))
        })
        .map(|(net, _)| format!("10.247.{}", (net >> 8) & 0xff))
        .expect("a free /24 in 10.247.0.0/16")
}

/// `a.b.c.d/n` as (address, mask); IPv6 subnets are ignored.
fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let net: ipnet::Ipv4Net = cidr.parse().ok()?;
    Some((u32::from(net.addr()), u32::from(net.netmask())))
}

// ---- processes with a deadline ----

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    fn ok_or_err(&self) -> Result<(), String> {
        if self.code == Some(0) {
            Ok(())
        } else {
            Err(format!(
                "exit {:?}: {}{}",
                self.code, self.stdout, self.stderr
            ))
        }
    }
}

fn docker(args: &[&str]) -> Out {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(cmd, Duration::from_secs(300))
}

/// Runs `cmd` to completion or until `timeout`, when it is killed (its output so far is
/// returned with code `None`).
fn run(mut cmd: Command, timeout: Duration) -> Out {
    let what = format!("{cmd:?}");
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Out {
                code: None,
                stdout: String::new(),
                stderr: format!("cannot run {what}: {e}"),
            };
        }
    };
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let exited = integration::wait::poll(timeout, || {
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    });
    let code = match exited {
        Ok(status) => status.code(),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    let mut out = Out {
        code,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if code.is_none() {
        out.stderr
            .push_str(&format!("\n{what} killed after {timeout:?}"));
    }
    out
}

#[test]
fn the_two_dockerfiles_make_the_same_image() {
    // Only Dockerfile.local can be built here (no registry for the rust: builder image), so
    // the final stage of the users' Dockerfile is held to it line by line.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let final_stage = |name: &str| -> Vec<String> {
        let text = std::fs::read_to_string(repo.join("deploy/docker").join(name)).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
        lines[from..]
            .iter()
            .map(|l| {
                l.replace("--from=build ", "")
                    .replace("/out/kith ", "kith ")
                    .replace("/out/empty/ ", "empty/ ")
            })
            .collect()
    };
    let users = final_stage("Dockerfile");
    assert_eq!(users, final_stage("Dockerfile.local"));
    assert_eq!(users[0], "FROM scratch");
    assert!(users.contains(&"USER 65532:65532".to_owned()), "{users:?}");
}

/// The two-replica variant (compose.ha.yaml over compose.yaml) is a valid compose project: two
/// CA services on one PostgreSQL with the same KEK, the connection string only from the shell,
/// and an agent that knows both replicas. Needs docker-compose (or `docker compose`), not the
/// engine: PostgreSQL's image cannot be pulled here, so the variant is parsed, not run.
#[test]
fn ha_variant_parses_with_two_replicas_on_one_database() {
    let Some(compose_cmd) = compose_or_skip() else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (kek, password) = (dir.path().join("kek"), dir.path().join("password"));
    std::fs::write(&kek, "k").unwrap();
    std::fs::write(&password, "p").unwrap();
    let config = |store: Option<&str>, extra: &[&str]| {
        let mut cmd = Command::new(&compose_cmd[0]);
        cmd.args(&compose_cmd[1..])
            .arg("-f")
            .arg(repo.join("deploy/docker/compose.yaml"))
            .arg("-f")
            .arg(repo.join("deploy/docker/compose.ha.yaml"))
            .arg("config")
            .args(extra)
            .env("KITH_CA_KEK_FILE", &kek)
            .env("KITH_CA_DB_PASSWORD_FILE", &password)
            .env_remove("KITH_CA_STORE");
        if let Some(url) = store {
            cmd.env("KITH_CA_STORE", url);
        }
        run(cmd, Duration::from_secs(60))
    };
    let url = "postgres://kith:secret@postgres:5432/kith?sslmode=disable";
    let services = config(Some(url), &["--services"]).ok().stdout;
    let mut services: Vec<&str> = services.lines().map(str::trim).collect();
    services.sort();
    for want in ["ca", "ca-2", "postgres", "agent"] {
        assert!(services.contains(&want), "{want} missing: {services:?}");
    }
    let text = config(Some(url), &[]).ok().stdout;
    let parsed: serde_json::Value = serde_norway::from_str(&text).unwrap();
    let svc = &parsed["services"];
    for ca in ["ca", "ca-2"] {
        assert_eq!(svc[ca]["environment"]["KITH_CA_STORE"], url, "{ca}");
        let secrets = svc[ca]["secrets"].to_string();
        assert!(secrets.contains("kith-ca-kek"), "{ca}: {secrets}");
        assert!(
            svc[ca]["depends_on"]["postgres"].is_object(),
            "{ca} waits for the database"
        );
    }
    let agent = svc["agent"]["command"].to_string();
    assert!(
        agent.contains("--ca=https://ca:8443") && agent.contains("--ca=https://ca-2:8443"),
        "{agent}"
    );
    // The password never sits in the file: without KITH_CA_STORE the project does not parse.
    let missing = config(None, &["--services"]);
    assert_ne!(missing.code, Some(0));
    assert!(
        missing.stderr.contains("KITH_CA_STORE"),
        "{}",
        missing.stderr
    );
}

/// docker-compose or `docker compose`, for what needs only the compose tool.
fn compose_or_skip() -> Option<Vec<String>> {
    for candidate in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let mut cmd = Command::new(candidate[0]);
        cmd.args(&candidate[1..]).arg("version");
        if run(cmd, Duration::from_secs(30)).code == Some(0) {
            return Some(candidate.into_iter().map(String::from).collect());
        }
    }
    skip_or_fail("neither docker-compose nor `docker compose` is installed");
    None
}
