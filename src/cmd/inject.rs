//! `kith inject -f <manifest.yaml|->` (offline) and `kith inject serve` (the webhook).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use inject::manifest::{self, MAX_INPUT_BYTES};
use inject::metrics::Metrics;
use inject::server::{self, Limits, Webhook};
use inject::settings::{self, Cidr, Settings};
use inject::tls::{self, ReloadingCert};

use crate::process::{self, Threads};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  kith inject -f deploy.yaml | kubectl apply -f -\n  \
                  kubectl get deploy web -o yaml | kith inject -f - | kubectl apply -f -\n  \
                  kith inject serve --tls-cert tls.crt --tls-key tls.key"
)]
pub struct InjectArgs {
    #[command(subcommand)]
    command: Option<InjectCommand>,
    /// A manifest to inject (multi-document YAML), or - for standard input; the result goes to
    /// standard output
    #[arg(short = 'f', long = "filename")]
    filename: Option<PathBuf>,
    /// Inject every workload that does not opt out, not only those with kith.dev/inject: enabled
    /// (namespace labels are not visible offline)
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Debug, Subcommand)]
enum InjectCommand {
    /// Serve the mutating admission webhook (POST /mutate) over HTTPS, TLS 1.3
    Serve(ServeArgs),
}

/// What goes into the pods, for both modes.
#[derive(Debug, Args)]
struct SettingsArgs {
    /// The sidecar's image [default: ghcr.io/kith-dev/kith:<this version>]
    #[arg(long, env = "KITH_INJECT_IMAGE", global = true)]
    image: Option<String>,
    /// The capture init container's image; it must contain iptables, ip6tables and kith
    /// [default: ghcr.io/kith-dev/kith-init:<this version>]
    #[arg(long, env = "KITH_INJECT_INIT_IMAGE", global = true)]
    init_image: Option<String>,
    /// The CA the sidecars get their SVIDs from
    #[arg(long, env = "KITH_INJECT_CA_URL", default_value = settings::DEFAULT_CA_URL, global = true)]
    ca_url: String,
    /// Destinations that get mTLS (comma-separated or repeated)
    #[arg(long = "mesh-cidr", env = "KITH_INJECT_MESH_CIDR", value_delimiter = ',',
          default_value = settings::DEFAULT_MESH_CIDR, global = true)]
    mesh_cidr: Vec<Cidr>,
    /// The ConfigMap, in each pod's namespace, whose bundle.pem authenticates the CA
    #[arg(long, env = "KITH_INJECT_BUNDLE_CONFIGMAP", default_value = settings::DEFAULT_BUNDLE_CONFIGMAP, global = true)]
    bundle_configmap: String,
    /// The SHA-256 of the CA's PEM bundle (kith ca bundle | sha256sum): sidecars fetch the
    /// bundle from the CA and check it against this, and no namespace needs the ConfigMap
    #[arg(long, env = "KITH_INJECT_BUNDLE_SHA256", value_parser = settings::parse_pin, global = true)]
    bundle_sha256: Option<String>,
    /// The audience of the projected token (the CA's --k8s-audience)
    #[arg(long, env = "KITH_INJECT_AUDIENCE", default_value = settings::DEFAULT_AUDIENCE, global = true)]
    audience: String,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The serving certificate (PEM, leaf first); reloaded when it changes
    #[arg(long, env = "KITH_INJECT_TLS_CERT")]
    tls_cert: PathBuf,
    /// The serving certificate's private key (PEM); reloaded when it changes
    #[arg(long, env = "KITH_INJECT_TLS_KEY")]
    tls_key: PathBuf,
    /// Where to serve HTTPS
    #[arg(long, env = "KITH_INJECT_LISTEN", default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// Most connections at once; more are closed on accept
    #[arg(long, env = "KITH_INJECT_MAX_CONNECTIONS", default_value_t = 512)]
    max_connections: usize,
    /// How often the certificate files are checked for a change
    #[arg(long, env = "KITH_INJECT_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Log lines as text or JSON (stderr)
    #[arg(long, env = "KITH_INJECT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

impl SettingsArgs {
    fn resolve(&self) -> Settings {
        let image = self.image.clone().unwrap_or_else(settings::default_image);
        Settings {
            init_image: self
                .init_image
                .clone()
                .unwrap_or_else(settings::default_init_image),
            image,
            ca_url: self.ca_url.clone(),
            mesh_cidrs: self.mesh_cidr.clone(),
            bundle_configmap: self.bundle_configmap.clone(),
            bundle_sha256: self.bundle_sha256.clone(),
            audience: self.audience.clone(),
        }
    }
}

pub fn run(args: InjectArgs) -> ExitCode {
    let settings = args.settings.resolve();
    let result = match (args.command, args.filename) {
        (Some(InjectCommand::Serve(_)), None) if args.all => Err(anyhow::anyhow!(
            "--all is for -f: the webhook injects every pod its selectors send it"
        )),
        (Some(InjectCommand::Serve(serve)), None) => return run_serve(serve, settings),
        (Some(_), Some(_)) => Err(anyhow::anyhow!(
            "-f injects offline and serve runs the webhook; use one or the other"
        )),
        (None, Some(path)) => run_offline(&path, &settings, args.all),
        (None, None) => Err(anyhow::anyhow!(
            "say what to inject: kith inject -f <manifest.yaml|-> (or kith inject serve for the webhook)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_offline(path: &Path, settings: &Settings, all: bool) -> Result<()> {
    let input = read_input(path)?;
    let report = manifest::inject_manifests(&input, settings, all)?;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(report.output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // A reader that went away (`| head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        r => r.context("writing to standard output")?,
    }
    for (name, why) in &report.skipped {
        eprintln!("kith inject: left {name} alone: {}", why.describe());
    }
    for w in &report.warnings {
        eprintln!("kith inject: warning: {w}");
    }
    eprintln!(
        "kith inject: injected {} workload(s), left {} alone",
        report.injected.len(),
        report.skipped.len()
    );
    Ok(())
}

/// The whole input as text: at most [`MAX_INPUT_BYTES`], UTF-8.
fn read_input(path: &Path) -> Result<String> {
    let (name, reader): (String, Box<dyn Read>) = if path == Path::new("-") {
        ("standard input".into(), Box::new(std::io::stdin().lock()))
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        (path.display().to_string(), Box::new(file))
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_INPUT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {name}"))?;
    if bytes.len() > MAX_INPUT_BYTES {
        bail!(
            "{name} is larger than {} MiB; split the manifest and inject the parts",
            MAX_INPUT_BYTES / (1024 * 1024)
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{name} is not UTF-8 text (invalid byte at offset {}); YAML manifests are UTF-8",
            e.utf8_error().valid_up_to()
        )
    })
}

fn run_serve(args: ServeArgs, settings: Settings) -> ExitCode {
    process::init_logging(&args.log_format);
    let cert = match ReloadingCert::load(&args.tls_cert, &args.tls_key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: --tls-cert/--tls-key: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match tls::server_config(cert.clone()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match process::runtime(Threads::Two, 1) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    process::exit(&rt, serve_until_signal(args, settings, cert, tls), 1)
}

async fn serve_until_signal(
    args: ServeArgs,
    settings: Settings,
    cert: Arc<ReloadingCert>,
    tls: Arc<rustls::ServerConfig>,
) -> Result<()> {
    let signalled = process::on_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mesh: Vec<String> = settings
        .mesh_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(
        addr = %addr,
        image = %settings.image,
        init_image = %settings.init_image,
        ca_url = %settings.ca_url,
        mesh_cidrs = %mesh.join(","),
        bundle_configmap = %settings.bundle_configmap,
        audience = %settings.audience,
        tls = "1.3 only",
        "kith inject serving"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(cert.watch(args.reload_interval, shutdown.clone()));
    let webhook = Arc::new(Webhook {
        settings,
        metrics: Metrics::new(),
    });
    let limits = Limits {
        max_connections: args.max_connections,
        ..Limits::default()
    };
    let server = tokio::spawn(server::serve(
        listener,
        tls,
        webhook,
        limits,
        shutdown.clone(),
    ));
    signalled.cancelled().await;
    tracing::info!("shutting down: no new connections; open requests may finish");
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
