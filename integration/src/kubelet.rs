//! A pod runner on the real Docker engine: what a kubelet does with a pod spec, for tests of
//! `kith inject`'s output with the real images (no Kubernetes API server can be installed on
//! the machines this project is tested on).
//!
//! For each pod, as a kubelet does:
//!
//! - a pause container holds the network namespace (on the node's Docker network; its address
//!   is the pod's IP);
//! - the init containers run in order with `--network container:<pause>`; one with
//!   `restartPolicy: Always` is a native sidecar: it is started (`--restart always`), its
//!   `startupProbe` must pass before the next container starts, and it keeps running;
//! - then the app containers, whose `readinessProbe` the runner waits for;
//! - every container with exactly its spec's securityContext (the pod's, overridden by the
//!   container's): user and group, capabilities dropped and added, read-only root, no privilege
//!   escalation, seccomp `RuntimeDefault` (Docker's default profile); `runAsNonRoot` is checked
//!   as the kubelet checks it; CPU and memory limits;
//! - `env` (plain values), `command`/`args` (command replaces the image's entrypoint, args its
//!   command), `volumeMounts` of `emptyDir`, `configMap` (from [`Node::config_maps`]) and
//!   `projected` service-account tokens, minted by the node's [`ClusterKey`] for the pod's
//!   namespace, service account and name, with the volume's audience;
//! - probes (`httpGet`, `tcpSocket`) from the node (this host) to the pod's IP, as the kubelet
//!   probes.
//!
//! - read but with nothing to do on one node: `imagePullPolicy` (images are local: the spec's
//!   image names map to local images in [`Node::images`]), `resources.requests` (scheduling),
//!   `ports` (informational in Kubernetes too; TCP only), labels and annotations.
//!
//! Anything in a spec the runner does not understand is an error naming its path, never
//! silently skipped: a test that passes proves what the spec says.
//!
//! Why this is one file of over 500 lines: it is one sequence, a pod's life as the kubelet runs
//! it (read the spec, refuse what is not understood, start the pause container, the init and
//! native sidecar containers in order, the app containers, probe, tear down), and every step
//! reads the same parsed spec and writes the same `docker run` flags. Split by step, each piece
//! would import the others' types and no piece would read alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::ClusterKey;

/// The result of `docker …`: exit code and output.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> Result<&str, String> {
        if self.code == Some(0) {
            Ok(self.stdout.trim())
        } else {
            Err(format!(
                "exit {:?}: {}{}",
                self.code,
                self.stdout,
                self.stderr.trim()
            ))
        }
    }
}

pub fn docker(args: &[&str]) -> Out {
    match Command::new("docker").args(args).output() {
        Ok(o) => Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => Out {
            code: None,
            stdout: String::new(),
            stderr: format!("cannot run docker: {e}"),
        },
    }
}

/// Whether the engine answers; why not, otherwise.
pub fn engine_available() -> Result<(), String> {
    docker(&["info", "--format", "{{.ServerVersion}}"])
        .ok()
        .map(drop)
}

/// What kind of container of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Init,
    /// An init container with `restartPolicy: Always`.
    Sidecar,
    App,
}

/// A container as the runner started it, with what its spec asked for.
#[derive(Debug, Clone)]
pub struct Started {
    pub name: String,
    pub id: String,
    pub kind: Kind,
    /// The user and group the spec runs it as (None: the image's).
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub read_only: bool,
    pub no_new_privileges: bool,
}

/// A pod the runner started.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub pause: String,
    pub containers: Vec<Started>,
    /// The spec as it was run.
    pub spec: Value,
    /// The template's `metadata.annotations` (null when none).
    pub annotations: Value,
}

impl RunningPod {
    pub fn container(&self, name: &str) -> &Started {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {} has no container {name}", self.name))
    }

    /// Runs a command in one of the pod's running containers.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Out {
        let id = self.container(container).id.clone();
        let mut args = vec!["exec", id.as_str()];
        args.extend_from_slice(cmd);
        docker(&args)
    }

    /// A container's output (stdout and stderr).
    pub fn logs(&self, container: &str) -> String {
        let out = docker(&["logs", &self.container(container).id]);
        format!("{}{}", out.stdout, out.stderr)
    }

    /// The container spec named `name` (init or app).
    pub fn container_spec(&self, name: &str) -> Option<&Value> {
        ["initContainers", "containers"]
            .iter()
            .filter_map(|l| self.spec[*l].as_array())
            .flatten()
            .find(|c| c["name"] == name)
    }
}

/// The node: a Docker network the pods' pause containers join, the cluster's signing key, the
/// ConfigMaps pods may mount, and the image names of specs mapped to local images. Every
/// container and the network are removed on drop.
pub struct Node {
    pub prefix: String,
    pub network: String,
    pub key: ClusterKey,
    /// ConfigMap name -> file name -> content (one namespace: the tests run one).
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Image in a spec -> local image.
    pub images: BTreeMap<String, String>,
    /// The image of pause containers; it must run `<image> pause` and do nothing.
    pub pause_image: String,
    dir: tempfile::TempDir,
    containers: Vec<String>,
}

impl Node {
    /// A node with a fresh bridge network `subnet` (e.g. `10.248.7.0/24`).
    pub fn new(prefix: &str, subnet: &str, pause_image: &str) -> Result<Node, String> {
        let network = format!("{prefix}-net");
        docker(&["network", "create", "--subnet", subnet, &network]).ok()?;
        let dir = tempfile::Builder::new()
            .prefix("kith-kubelet")
            .tempdir()
            .map_err(|e| e.to_string())?;
        set_mode(dir.path(), 0o755);
        Ok(Node {
            prefix: prefix.to_owned(),
            network,
            key: ClusterKey::new(),
            config_maps: BTreeMap::new(),
            images: BTreeMap::new(),
            pause_image: pause_image.to_owned(),
            dir,
            containers: Vec::new(),
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `docker run -d` of a container that is not part of a pod (the CA), on the node's
    /// network, removed with the node.
    pub fn run_detached(&mut self, name: &str, args: &[&str]) -> Result<String, String> {
        let full = format!("{}-{name}", self.prefix);
        let mut all = vec!["run", "-d", "--name", &full, "--network", &self.network];
        all.extend_from_slice(args);
        let id = docker(&all).ok()?.to_owned();
        self.containers.push(id.clone());
        Ok(id)
    }

    /// A container's address on the node's network.
    pub fn ip_of(&self, id: &str) -> Result<String, String> {
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip = docker(&["inspect", "-f", &fmt, id]).ok()?.to_owned();
        if ip.is_empty() {
            return Err(format!("container {id} has no address on {}", self.network));
        }
        Ok(ip)
    }

    /// Runs the pod `name` in `namespace` from `template` (a pod, or a workload's pod template:
    /// a mapping with `metadata` and `spec`), as a kubelet would.
    pub fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        template: &Value,
    ) -> Result<RunningPod, String> {
        check_template(template)?;
        let spec = &template["spec"];
        if spec["automountServiceAccountToken"] != Value::Bool(false) {
            return Err(format!(
                "pod {name}: automountServiceAccountToken is not false; the runner mounts no \
                 API token (it has no API server)"
            ));
        }
        let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
        let volumes = self.volumes(namespace, name, sa, spec)?;

        let pause_name = format!("{}-{name}-pause", self.prefix);
        let pause = docker(&[
            "run",
            "-d",
            "--name",
            &pause_name,
            "--network",
            &self.network,
            "--hostname",
            name,
            "--cap-drop",
            "ALL",
            "--read-only",
            "--user",
            "65535:65535",
            "--security-opt",
            "no-new-privileges",
            &self.pause_image,
            "pause",
        ])
        .ok()?
        .to_owned();
        self.containers.push(pause.clone());
        let ip = self.ip_of(&pause)?;
        let mut pod = RunningPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip,
            pause,
            containers: Vec::new(),
            spec: spec.clone(),
            annotations: template["metadata"]["annotations"].clone(),
        };

        for c in spec["initContainers"].as_array().into_iter().flatten() {
            let sidecar = c["restartPolicy"] == "Always";
            let kind = if sidecar { Kind::Sidecar } else { Kind::Init };
            let started = self.start(&pod, c, kind, &volumes)?;
            pod.containers.push(started.clone());
            if sidecar {
                if let Some(probe) = c.get("startupProbe") {
                    wait_probe(&pod, c, probe, "startupProbe")
                        .map_err(|e| format!("{e}\n{}", pod.logs(&started.name)))?;
                }
            } else {
                let code = docker(&["wait", &started.id]).ok()?.to_owned();
                if code != "0" {
                    return Err(format!(
                        "init container {} of pod {name} exited with {code}:\n{}",
                        started.name,
                        pod.logs(&started.name)
                    ));
                }
            }
        }
        let apps: Vec<Value> = spec["containers"].as_array().cloned().unwrap_or_default();
        for c in &apps {
            let started = self.start(&pod, c, Kind::App, &volumes)?;
            pod.containers.push(started);
        }
        for c in &apps {
            for which in ["startupProbe", "readinessProbe"] {
                if let Some(probe) = c.get(which) {
                    let name = c["name"].as_str().unwrap_or_default();
                    wait_probe(&pod, c, probe, which)
                        .map_err(|e| format!("{e}\n{}", pod.logs(name)))?;
                }
            }
        }
        Ok(pod)
    }

    /// Volume name -> (host path, read-only by nature).
    fn volumes(
        &self,
        namespace: &str,
        pod: &str,
        sa: &str,
        spec: &Value,
    ) -> Result<BTreeMap<String, (PathBuf, bool)>, String> {
        let mut out = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().ok_or("a volume without a name")?;
            let dir = self.path(&format!("{pod}-vol-{name}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let read_only = if let Some(e) = v.get("emptyDir") {
                // Memory or disk: a directory of the node either way (shared by the pod's
                // containers, as an emptyDir is); every user of the pod may write it.
                known(e, "emptyDir", &["medium", "sizeLimit"])?;
                set_mode(&dir, 0o1777);
                false
            } else if let Some(cm) = v.get("configMap") {
                known(cm, "configMap", &["name"])?;
                let cm_name = cm["name"].as_str().ok_or("configMap without a name")?;
                let files = self.config_maps.get(cm_name).ok_or_else(|| {
                    format!("pod {pod}: ConfigMap {cm_name} does not exist in {namespace}")
                })?;
                for (file, content) in files {
                    let path = dir.join(file);
                    std::fs::write(&path, content).map_err(|e| e.to_string())?;
                    set_mode(&path, 0o644);
                }
                set_mode(&dir, 0o755);
                true
            } else if let Some(p) = v.get("projected") {
                known(p, "projected", &["sources"])?;
                for src in p["sources"].as_array().into_iter().flatten() {
                    let t = src.get("serviceAccountToken").ok_or_else(|| {
                        format!("volume {name}: only serviceAccountToken sources are supported")
                    })?;
                    known(src, "projected.sources[]", &["serviceAccountToken"])?;
                    known(
                        t,
                        "serviceAccountToken",
                        &["audience", "expirationSeconds", "path"],
                    )?;
                    let audience = t["audience"].as_str().ok_or("a token without audience")?;
                    let file = t["path"].as_str().ok_or("a token without path")?;
                    let token = self.key.token_for(
                        namespace,
                        sa,
                        pod,
                        audience,
                        t["expirationSeconds"].as_u64().unwrap_or(3600),
                    );
                    let path = dir.join(file);
                    std::fs::write(&path, token).map_err(|e| e.to_string())?;
                    set_mode(&path, 0o644);
                }
                set_mode(&dir, 0o755);
                true
            } else {
                return Err(format!(
                    "volume {name}: the runner understands emptyDir, configMap and projected \
                     service-account tokens only: {v}"
                ));
            };
            known(
                v,
                "volumes[]",
                &["name", "emptyDir", "configMap", "projected"],
            )?;
            out.insert(name.to_owned(), (dir, read_only));
        }
        Ok(out)
    }

    fn start(
        &mut self,
        pod: &RunningPod,
        c: &Value,
        kind: Kind,
        volumes: &BTreeMap<String, (PathBuf, bool)>,
    ) -> Result<Started, String> {
        let name = c["name"].as_str().ok_or("a container without a name")?;
        let image_in_spec = c["image"].as_str().ok_or("a container without an image")?;
        let image = self
            .images
            .get(image_in_spec)
            .ok_or_else(|| format!("container {name}: no local image for {image_in_spec}"))?
            .clone();
        let pod_sc = &pod.spec["securityContext"];
        let sc = &c["securityContext"];
        let pick = |key: &str| sc.get(key).or_else(|| pod_sc.get(key)).cloned();
        let uid = pick("runAsUser").and_then(|v| v.as_u64());
        let gid = pick("runAsGroup").and_then(|v| v.as_u64());
        if pick("runAsNonRoot") == Some(Value::Bool(true)) {
            let uid = match uid {
                Some(u) => u,
                None => image_uid(&image)?,
            };
            if uid == 0 {
                return Err(format!(
                    "container {name}: runAsNonRoot is true but it would run as root (the \
                     kubelet refuses to start it)"
                ));
            }
        }
        let cname = format!("{}-{}-{name}", self.prefix, pod.name);
        let net = format!("container:{}", pod.pause);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            cname,
            "--network".into(),
            net,
        ];
        if kind == Kind::Sidecar {
            args.extend(["--restart".into(), "always".into()]);
        }
        match (uid, gid) {
            (Some(u), Some(g)) => args.extend(["--user".into(), format!("{u}:{g}")]),
            (Some(u), None) => args.extend(["--user".into(), format!("{u}")]),
            (None, Some(g)) => {
                return Err(format!(
                    "container {name}: runAsGroup {g} without runAsUser is not supported"
                ));
            }
            (None, None) => {}
        }
        let caps = &sc["capabilities"];
        let list = |key: &str| -> Vec<String> {
            caps[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let (cap_add, cap_drop) = (list("add"), list("drop"));
        for cap in &cap_drop {
            args.extend(["--cap-drop".into(), cap.clone()]);
        }
        for cap in &cap_add {
            args.extend(["--cap-add".into(), cap.clone()]);
        }
        if sc["privileged"] == Value::Bool(true) {
            return Err(format!("container {name}: privileged is not supported"));
        }
        let read_only = sc["readOnlyRootFilesystem"] == Value::Bool(true);
        if read_only {
            args.push("--read-only".into());
        }
        let no_new_privileges = sc["allowPrivilegeEscalation"] == Value::Bool(false);
        if no_new_privileges {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        if let Some(p) = pick("seccompProfile")
            && p["type"] != "RuntimeDefault"
        {
            return Err(format!(
                "container {name}: seccompProfile {p} is not supported (RuntimeDefault is)"
            ));
        }
        if let Some(limits) = c["resources"].get("limits") {
            let cpu = match &limits["cpu"] {
                Value::String(q) => Some(parse_cpu(q)?),
                Value::Number(n) => n.as_f64(),
                _ => None,
            };
            if let Some(cpus) = cpu {
                args.extend(["--cpus".into(), format!("{cpus}")]);
            }
            if let Some(mem) = limits["memory"].as_str() {
                args.extend(["--memory".into(), format!("{}", parse_bytes(mem)?)]);
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            known(e, "env[]", &["name", "value"])?;
            let k = e["name"].as_str().ok_or("env without a name")?;
            let v = e["value"].as_str().unwrap_or_default();
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            known(m, "volumeMounts[]", &["name", "mountPath", "readOnly"])?;
            let vname = m["name"].as_str().ok_or("a mount without a name")?;
            let (dir, ro_by_nature) = volumes
                .get(vname)
                .ok_or_else(|| format!("container {name} mounts {vname}, which is no volume"))?;
            let path = m["mountPath"].as_str().ok_or("a mount without mountPath")?;
            let ro = *ro_by_nature || m["readOnly"] == Value::Bool(true);
            args.extend([
                "-v".into(),
                format!("{}:{path}{}", dir.display(), if ro { ":ro" } else { "" }),
            ]);
        }
        let strings = |key: &str| -> Vec<String> {
            c[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let (command, cmd_args) = (strings("command"), strings("args"));
        if let Some(entry) = command.first() {
            args.extend(["--entrypoint".into(), entry.clone()]);
        }
        args.push(image);
        args.extend(command.into_iter().skip(1));
        args.extend(cmd_args);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&argv)
            .ok()
            .map_err(|e| format!("starting container {name} of pod {}: {e}", pod.name))?
            .to_owned();
        self.containers.push(id.clone());
        Ok(Started {
            name: name.to_owned(),
            id,
            kind,
            uid,
            gid,
            cap_add,
            cap_drop,
            read_only,
            no_new_privileges,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for id in self.containers.drain(..).rev() {
            let _ = docker(&["rm", "-f", "-v", &id]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// The user an image runs as when the spec names none (0 when the image names none).
fn image_uid(image: &str) -> Result<u64, String> {
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", image])
        .ok()?
        .to_owned();
    let uid = user.split(':').next().unwrap_or_default();
    if uid.is_empty() {
        return Ok(0);
    }
    uid.parse()
        .map_err(|_| format!("image {image} runs as user {user:?}, not a numeric UID"))
}

/// Every key of the template the runner acts on, or knows to be irrelevant to one node (labels,
/// annotations, scheduling requests, pull policy of local images); anything else is an error.
fn check_template(t: &Value) -> Result<(), String> {
    known(t, "template", &["metadata", "spec"])?;
    known(
        &t["metadata"],
        "metadata",
        &["name", "namespace", "labels", "annotations"],
    )?;
    let spec = &t["spec"];
    known(
        spec,
        "spec",
        &[
            "containers",
            "initContainers",
            "volumes",
            "securityContext",
            "serviceAccountName",
            "automountServiceAccountToken",
        ],
    )?;
    known(
        &spec["securityContext"],
        "spec.securityContext",
        &["runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"],
    )?;
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            let path = format!("spec.{list}[{}]", c["name"].as_str().unwrap_or("?"));
            let mut keys = vec![
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "env",
                "ports",
                "resources",
                "securityContext",
                "volumeMounts",
                "startupProbe",
                "readinessProbe",
                "livenessProbe",
            ];
            if list == "initContainers" {
                keys.push("restartPolicy");
                if c.get("restartPolicy").is_some_and(|p| p != "Always") {
                    return Err(format!("{path}.restartPolicy: only Always is supported"));
                }
            }
            known(c, &path, &keys)?;
            known(
                &c["securityContext"],
                &format!("{path}.securityContext"),
                &[
                    "runAsUser",
                    "runAsGroup",
                    "runAsNonRoot",
                    "readOnlyRootFilesystem",
                    "allowPrivilegeEscalation",
                    "privileged",
                    "capabilities",
                    "seccompProfile",
                ],
            )?;
            known(
                &c["securityContext"]["capabilities"],
                &format!("{path}.securityContext.capabilities"),
                &["add", "drop"],
            )?;
            known(
                &c["resources"],
                &format!("{path}.resources"),
                &["requests", "limits"],
            )?;
            for r in ["requests", "limits"] {
                known(
                    &c["resources"][r],
                    &format!("{path}.resources.{r}"),
                    &["cpu", "memory"],
                )?;
            }
            for p in c["ports"].as_array().into_iter().flatten() {
                known(
                    p,
                    &format!("{path}.ports[]"),
                    &["name", "containerPort", "protocol"],
                )?;
                if p.get("protocol").is_some_and(|p| p != "TCP") {
                    return Err(format!("{path}.ports[]: only TCP is supported"));
                }
            }
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let Some(p) = c.get(probe) else { continue };
                let ppath = format!("{path}.{probe}");
                known(
                    p,
                    &ppath,
                    &[
                        "httpGet",
                        "tcpSocket",
                        "periodSeconds",
                        "timeoutSeconds",
                        "failureThreshold",
                        "initialDelaySeconds",
                        "successThreshold",
                    ],
                )?;
                if let Some(h) = p.get("httpGet") {
                    known(h, &format!("{ppath}.httpGet"), &["path", "port", "scheme"])?;
                    if h.get("scheme").is_some_and(|s| s != "HTTP") {
                        return Err(format!("{ppath}.httpGet.scheme: only HTTP is supported"));
                    }
                } else if let Some(t) = p.get("tcpSocket") {
                    known(t, &format!("{ppath}.tcpSocket"), &["port"])?;
                } else {
                    return Err(format!(
                        "{ppath}: only httpGet and tcpSocket probes are supported"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `v` is absent, null, or a mapping with no key outside `allowed`.
fn known(v: &Value, path: &str, allowed: &[&str]) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::Object(m) => match m.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "{path}.{k}: the pod runner does not understand this field"
            )),
            None => Ok(()),
        },
        other => Err(format!("{path} is not a mapping: {other}")),
    }
}

/// A probe's port: a number or the name of one of the container's ports.
fn probe_port(c: &Value, port: &Value) -> Result<u16, String> {
    if let Some(p) = port.as_u64() {
        return u16::try_from(p).map_err(|_| format!("port {p} is out of range"));
    }
    let name = port
        .as_str()
        .ok_or("a probe port is neither number nor name")?;
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("probe port {name:?} names no port of the container"))
}

/// One probe, from the node to the pod's IP, as the kubelet does it: Ok when it succeeds.
pub fn probe_once(pod: &RunningPod, c: &Value, probe: &Value) -> Result<(), String> {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1));
    if let Some(h) = probe.get("httpGet") {
        let port = probe_port(c, &h["port"])?;
        let path = h["path"].as_str().unwrap_or("/");
        let (status, _) = http_get(&pod.ip, port, path, timeout)?;
        // The kubelet: 200 <= status < 400 is success.
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {path} on {}:{port}: HTTP {status}", pod.ip))
        }
    } else if let Some(t) = probe.get("tcpSocket") {
        let port = probe_port(c, &t["port"])?;
        let addr: SocketAddr = format!("{}:{port}", pod.ip).parse().unwrap();
        TcpStream::connect_timeout(&addr, timeout)
            .map(drop)
            .map_err(|e| format!("connect {addr}: {e}"))
    } else {
        Err(format!("unsupported probe {probe}"))
    }
}

/// Polls a probe until it passes; fails once `periodSeconds` × `failureThreshold` (the
/// kubelet's defaults 10 and 3) have passed without success, when the kubelet would restart or
/// never ready the container. It polls more often than every period, which only makes the
/// test quicker.
fn wait_probe(pod: &RunningPod, c: &Value, probe: &Value, which: &str) -> Result<(), String> {
    let period = probe["periodSeconds"].as_u64().unwrap_or(10);
    let failures = probe["failureThreshold"].as_u64().unwrap_or(3);
    crate::wait::poll(Duration::from_secs(period * failures), || {
        probe_once(pod, c, probe)
    })
    .map_err(|e| {
        format!(
            "{which} of {}/{} never passed: {}",
            pod.name,
            c["name"].as_str().unwrap_or("?"),
            e.unwrap_or_default()
        )
    })
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(
    ip: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout.max(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: kube-probe/1.33\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: no HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Kubernetes CPU quantities: "500m", "1", "0.5".
fn parse_cpu(q: &str) -> Result<f64, String> {
    let v = match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().map(|m| m / 1000.0),
        None => q.parse::<f64>(),
    };
    v.map_err(|_| format!("{q:?} is not a CPU quantity the runner understands"))
}

/// Kubernetes memory quantities with binary or decimal suffixes.
fn parse_bytes(q: &str) -> Result<u64, String> {
    for (suffix, mult) in [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n
                .parse::<u64>()
                .map(|n| n * mult)
                .map_err(|_| format!("{q:?} is not a memory quantity"));
        }
    }
    q.parse()
        .map_err(|_| format!("{q:?} is not a memory quantity the runner understands"))
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// The user, group and effective capabilities of a running container's main process, from
/// `/proc/<pid>/status` on the node: (uid, gid, CapEff bits).
pub fn process_identity(container_id: &str) -> Result<(u64, u64, u64), String> {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container_id])
        .ok()?
        .to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<&str, String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    let first = |s: &str| -> Result<u64, String> {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("unreadable id {s:?}"))
    };
    let uid = first(field("Uid:")?)?;
    let gid = first(field("Gid:")?)?;
    let cap = u64::from_str_radix(field("CapEff:")?, 16).map_err(|e| e.to_string())?;
    Ok((uid, gid, cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_errors_naming_their_path() {
        let t = json!({"metadata": {}, "spec": {"containers": [
            {"name": "a", "image": "a", "lifecycle": {"preStop": {}}}]}});
        let err = check_template(&t).unwrap_err();
        assert!(err.contains("spec.containers[a].lifecycle"), "{err}");
        let t = json!({"metadata": {}, "spec": {"hostNetwork": true, "containers": []}});
        assert!(check_template(&t).unwrap_err().contains("spec.hostNetwork"));
        let t = json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "a",
            "readinessProbe": {"exec": {"command": ["true"]}}}]}});
        assert!(check_template(&t).unwrap_err().contains("exec"));
    }

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_cpu("500m").unwrap(), 0.5);
        assert_eq!(parse_cpu("2").unwrap(), 2.0);
        assert_eq!(parse_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert!(parse_bytes("lots").is_err());
    }
}
