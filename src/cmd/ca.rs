//! `kith ca …`: `serve` runs the CA; the other commands talk to a running CA over its admin
//! socket (found through `--data-dir` or `--admin-socket`), except `audit verify`, which can
//! also read a stopped CA's database directly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use ca::admin_client::AdminClient;
use ca::config::{Config, ServeArgs};
use ca::server::{Listeners, start};

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Args, Clone)]
struct Target {
    /// The CA's data directory (its admin socket lives there)
    #[arg(
        long,
        env = "KITH_CA_DATA_DIR",
        default_value = "/var/lib/kith-ca",
        global = true
    )]
    data_dir: PathBuf,
    /// The admin socket, if not <data-dir>/admin.sock
    #[arg(long, env = "KITH_CA_ADMIN_SOCKET", global = true)]
    admin_socket: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Run the CA
    Serve(Box<ServeArgs>),
    /// Join tokens for node attestation
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Registration entries: which workload IDs a node may obtain
    Entry {
        #[command(subcommand)]
        command: EntryCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Attested nodes
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Print the trust bundle
    Bundle {
        #[arg(long, default_value = "pem", value_parser = ["pem", "spiffe"])]
        format: String,
        #[command(flatten)]
        target: Target,
    },
    /// Signers and their expiry, counts, time to outage
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Roots: their phases, the rollover and what it waits for
    Root {
        #[command(subcommand)]
        command: RootCommand,
        #[command(flatten)]
        target: Target,
    },
    /// The operator's upstream CA (with --upstream-cert/--upstream-key)
    Upstream {
        #[command(subcommand)]
        command: UpstreamCommand,
        #[command(flatten)]
        target: Target,
    },
    /// The audit log, chained by a MAC keyed from the KEK
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        target: Target,
    },
    /// The CA's database
    Store {
        #[command(subcommand)]
        command: StoreCommand,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a stopped SQLite CA (--data-dir) into an empty PostgreSQL database: keys (still
    /// sealed), tokens, entries, nodes, certificates and the audit chain as is; then verify the
    /// copy. Start the replicas with --store and the same KEK afterwards
    Migrate {
        /// The PostgreSQL connection string
        #[arg(long, value_name = "postgres://…")]
        to: String,
        /// The CA's key-encryption key file (or KITH_CA_KEK, else <data-dir>.kek)
        #[arg(long, env = "KITH_CA_KEK_FILE")]
        kek_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a one-time join token and print the `kith agent run` line for the host
    Create {
        /// Node name: the node's ID becomes spiffe://<td>/kith/node/<name>
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        parent: String,
        /// type:value, e.g. unix:uid:1000 or docker:label:app=web (repeatable). Types: unix:uid,
        /// unix:gid, unix:user, unix:group, unix:path (only together with unix:uid or unix:gid),
        /// docker:label, docker:image, docker:image_id, docker:name
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        dns: Vec<String>,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    List,
    /// Refuse this node and everything under it from now on
    Evict {
        spiffe_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum UpstreamCommand {
    /// Take a new upstream certificate and key: its root is published now, and signing
    /// switches to it once every caller holds it (as in a root rollover)
    Replace {
        /// The new upstream certificate, then its issuers up to the root (PEM)
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM, PKCS#8)
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum RootCommand {
    /// Each root with its phase (published, active, retiring), what the switch waits for
    Status,
    /// Start a rollover now: publish a successor root (the switch still waits until every
    /// caller holds it)
    Rotate {
        /// Also switch signing to the new root at once, without waiting for callers
        #[arg(long)]
        now: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    List {
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Prove the chain is intact, or point at the first broken row (exit 1). On a stopped CA
    /// this reads the database directly and needs the CA's key-encryption key (the chain is a
    /// MAC keyed by it): --kek-file or KITH_CA_KEK, else <data-dir>.kek if it exists
    Verify {
        /// A head written down earlier (`kith ca audit head`): fail unless the chain still
        /// contains that row unchanged, which catches deleted newest rows
        #[arg(long, value_name = "SEQ:HASH", value_parser = parse_head)]
        expect_head: Option<ca::store::AuditHead>,
        /// The CA's key-encryption key file, for checking a stopped CA's database
        #[arg(long, env = "KITH_CA_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// With every replica stopped: the PostgreSQL connection string to check instead of
        /// <data-dir>/kith-ca.db
        #[arg(long, env = "KITH_CA_STORE")]
        store: Option<String>,
    },
    /// Print the newest row's sequence number and MAC as SEQ:HASH (`--json`: {"seq","hash"});
    /// keep it somewhere else and pass it to `verify --expect-head` later
    Head,
}

fn parse_head(s: &str) -> Result<ca::store::AuditHead, String> {
    ca::store::AuditHead::parse(s)
}

pub fn run(args: CaArgs) -> ExitCode {
    // One thread for accepting, admin, metrics and maintenance; API connections run on their
    // own per-core runtimes (`api::serve`) and the store's writer on its own thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run_inner(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}",
                e.chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
            );
            ExitCode::from(2)
        }
    }
}

async fn run_inner(args: CaArgs) -> Result<ExitCode> {
    match args.command {
        CaCommand::Serve(serve_args) => serve(*serve_args).await,
        CaCommand::Token { command, target } => {
            let admin = client(&target);
            match command {
                TokenCommand::Create { name, ttl } => {
                    let name = match name {
                        Some(n) => n,
                        None => format!("node-{}", &ca::store::hex(&random_bytes()?)[..8]),
                    };
                    let v = admin
                        .call(
                            Method::POST,
                            "/tokens",
                            Some(json!({"name": name, "ttl_seconds": ttl.as_secs()})),
                        )
                        .await?;
                    if target.json {
                        print_json(&v);
                    } else {
                        println!(
                            "join token for {} (id {}, expires in {}):",
                            v["spiffe_id"].as_str().unwrap_or_default(),
                            v["id"].as_str().unwrap_or_default(),
                            humantime::format_duration(ttl)
                        );
                        println!();
                        // The token goes in the environment: in argv every local user
                        // could read it (`kith agent run` refuses --join-token).
                        println!(
                            "  KITH_JOIN_TOKEN={} kith agent run --ca {} --bundle-sha256 {}",
                            v["token"].as_str().unwrap_or_default(),
                            v["ca_url"].as_str().unwrap_or_default(),
                            v["bundle_sha256"].as_str().unwrap_or_default()
                        );
                        println!();
                        println!("it works once; run that line on the host");
                    }
                }
                TokenCommand::List => {
                    let v = admin.call(Method::GET, "/tokens", None).await?;
                    table(
                        &v,
                        target.json,
                        &["id", "name", "expires_at", "used_at", "revoked_at"],
                    );
                }
                TokenCommand::Revoke { id } => {
                    let v = admin
                        .call(Method::DELETE, &format!("/tokens/{id}"), None)
                        .await?;
                    if target.json {
                        print_json(&v)
                    } else {
                        println!("revoked token {id}")
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Entry { command, target } => {
            let admin = client(&target);
            match command {
                EntryCommand::Create {
                    id,
                    parent,
                    selectors,
                    ttl,
                    dns,
                } => {
                    let body = json!({"spiffe_id": id, "parent_id": parent, "selectors": selectors, "ttl_seconds": ttl.map(|t| t.as_secs()), "dns": dns});
                    let v = admin.call(Method::POST, "/entries", Some(body)).await?;
                    if target.json {
                        print_json(&v)
                    } else {
                        println!(
                            "created entry {} for {}",
                            v["id"].as_str().unwrap_or_default(),
                            id
                        )
                    }
                }
                EntryCommand::List => {
                    let v = admin.call(Method::GET, "/entries", None).await?;
                    table(
                        &v,
                        target.json,
                        &["id", "spiffe_id", "parent_id", "selectors", "ttl"],
                    );
                }
                EntryCommand::Show { id } => print_json(
                    &admin
                        .call(Method::GET, &format!("/entries/{id}"), None)
                        .await?,
                ),
                EntryCommand::Delete { id } => {
                    let v = admin
                        .call(Method::DELETE, &format!("/entries/{id}"), None)
                        .await?;
                    if target.json {
                        print_json(&v)
                    } else {
                        println!("deleted entry {id}")
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Node { command, target } => {
            let admin = client(&target);
            match command {
                NodeCommand::List => {
                    let v = admin.call(Method::GET, "/nodes", None).await?;
                    table(
                        &v,
                        target.json,
                        &["spiffe_id", "attested_at", "last_issued_at", "evicted_at"],
                    );
                }
                NodeCommand::Evict { spiffe_id } => {
                    let v = admin
                        .call(
                            Method::POST,
                            "/nodes/evict",
                            Some(json!({"spiffe_id": spiffe_id})),
                        )
                        .await?;
                    if target.json {
                        print_json(&v)
                    } else {
                        println!(
                            "evicted {spiffe_id}: its SVIDs and everything it asks for are refused from now on"
                        )
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Bundle { format, target } => {
            let admin = client(&target);
            if format == "pem" {
                print!("{}", admin.call_text("/bundle?format=pem").await?);
            } else {
                print_json(&admin.call(Method::GET, "/bundle", None).await?);
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Status { target } => {
            let v = client(&target).call(Method::GET, "/status", None).await?;
            if target.json {
                print_json(&v);
            } else {
                println!(
                    "trust domain  {}",
                    v["trust_domain"].as_str().unwrap_or_default()
                );
                for s in v["signers"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "signer        {} ({}), expires in {}",
                        s["id"].as_str().unwrap_or_default(),
                        s["state"].as_str().unwrap_or_default(),
                        secs(&s["expires_in_seconds"])
                    );
                }
                println!(
                    "root          expires in {}",
                    secs(&v["root_expires_in_seconds"])
                );
                println!(
                    "time to outage {} (cause: {}: {})",
                    secs(&v["time_to_outage_seconds"]),
                    v["time_to_outage_cause"].as_str().unwrap_or_default(),
                    v["time_to_outage_detail"].as_str().unwrap_or_default()
                );
                if let Some(line) = waiting_line(&v["rollover"]["waiting"]) {
                    println!("root rollover {line}");
                }
                if let Some(w) = v["rollover"]["warning"].as_str() {
                    println!("WARNING       {w}");
                }
                println!("counts        {}", v["counts"]);
                if let Some(st) = v["store"].as_object() {
                    let kind = st.get("kind").and_then(Value::as_str).unwrap_or("unknown");
                    let health = match st.get("healthy").and_then(Value::as_bool) {
                        Some(true) => "healthy".to_owned(),
                        Some(false) => format!(
                            "UNREACHABLE ({})",
                            st.get("error").and_then(Value::as_str).unwrap_or_default()
                        ),
                        None => "unknown".to_owned(),
                    };
                    match st.get("target").and_then(Value::as_str) {
                        Some(t) => println!(
                            "store         {kind} {t}, {health}, this replica {}",
                            st.get("replica")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                        ),
                        None => println!("store         {kind}, {health}"),
                    }
                }
                for l in v["replicas"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "lease         {} held by {} on {} since {}",
                        l["name"].as_str().unwrap_or_default(),
                        l["replica"].as_str().unwrap_or_default(),
                        l["host"].as_str().unwrap_or_default(),
                        l["since"]
                    );
                }
                if let Some(h) = v["audit_head"].as_object() {
                    println!(
                        "audit head    {}:{}",
                        h["seq"],
                        h["hash"].as_str().unwrap_or_default()
                    );
                }
                if let Some(d) = v["disk"].as_object() {
                    let mib = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0) >> 20;
                    println!(
                        "disk          {}: {} MiB free of {} MiB, reserve {} MiB{}",
                        d.get("state").and_then(Value::as_str).unwrap_or("unknown"),
                        mib("free_bytes"),
                        mib("total_bytes"),
                        mib("reserve_bytes"),
                        d.get("message")
                            .and_then(Value::as_str)
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Upstream { command, target } => {
            let UpstreamCommand::Replace { cert, key } = command;
            let cert_pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read {}", key.display()))?;
            let v = client(&target)
                .call(
                    Method::POST,
                    "/upstream/replace",
                    Some(json!({"cert_pem": cert_pem, "key_pem": key_pem})),
                )
                .await?;
            if target.json {
                print_json(&v);
            } else {
                println!(
                    "published the new upstream {} in the bundle; signing switches to it once every caller holds it. Point --upstream-cert/--upstream-key at the new files before the next restart.",
                    v["root"].as_str().unwrap_or_default()
                );
                print_roots(&v["roots"]);
            }
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Root { command, target } => {
            let admin = client(&target);
            let v = match command {
                RootCommand::Status => admin.call(Method::GET, "/roots", None).await?,
                RootCommand::Rotate { now } => {
                    admin
                        .call(Method::POST, "/roots/rotate", Some(json!({"now": now})))
                        .await?
                }
            };
            if target.json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let view = if v["outcome"].is_string() {
                let root = v["root"].as_str().unwrap_or("-");
                match v["outcome"].as_str().unwrap_or_default() {
                    "published" => println!(
                        "published successor root {root} in the bundle; signing switches to it once every caller holds it (see below)"
                    ),
                    "switched" if v["forced"] == true => println!(
                        "switched signing to root {root} WITHOUT waiting. Risk: a caller that has not yet fetched the new bundle cannot verify certificates issued from now on (nor the CA's own) until it renews or fetches the bundle again; the old root stays in the bundle, so certificates already issued keep working."
                    ),
                    "switched" => println!("switched signing to root {root}"),
                    "waiting" => println!(
                        "a successor root is already published and waiting; use --now to switch at once"
                    ),
                    _ => println!("nothing to do"),
                }
                &v["roots"]
            } else {
                &v
            };
            print_roots(view);
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Store {
            command: StoreCommand::Migrate { to, kek_file },
            target,
        } => {
            if !ca::store::postgres::is_url(&to) {
                anyhow::bail!("--to must be a postgres:// connection string");
            }
            let (kek, _) = ca::seal::Kek::find(
                kek_file.as_deref(),
                ca::config::kek_from_env().as_deref(),
                &target.data_dir,
            )?;
            ca::migrate::to_postgres(&target.data_dir, &kek, &to).await?;
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Audit { command, target } => match command {
            AuditCommand::List { after, limit } => {
                let v = client(&target)
                    .call(
                        Method::GET,
                        &format!("/audit?after={after}&limit={limit}"),
                        None,
                    )
                    .await?;
                table(
                    &v,
                    target.json,
                    &["seq", "at", "action", "subject", "outcome"],
                );
                Ok(ExitCode::SUCCESS)
            }
            AuditCommand::Verify {
                expect_head,
                kek_file,
                store,
            } => {
                let path = match &expect_head {
                    Some(h) => format!("/audit/verify?expect={h}"),
                    None => "/audit/verify".to_owned(),
                };
                // Works on a stopped CA too: read the database directly when the socket is absent.
                let v = match client(&target).call(Method::GET, &path, None).await {
                    Ok(v) => v,
                    Err(ca::admin_client::AdminError::Connect { .. }) => {
                        let (kek, _) = ca::seal::Kek::find(
                            kek_file.as_deref(),
                            ca::config::kek_from_env().as_deref(),
                            &target.data_dir,
                        )?;
                        match store.as_deref().filter(|s| *s != "sqlite") {
                            Some(url) => {
                                use ca::store::Store as _;
                                let pg = ca::store::postgres::PgStore::open(
                                    url,
                                    kek.audit_key(),
                                    "audit-verify",
                                )
                                .await?;
                                serde_json::to_value(pg.verify_audit(expect_head.as_ref()).await?)?
                            }
                            None => {
                                let ro = ca::store::sqlite::SqliteStore::open_read_only(
                                    &target.data_dir,
                                )?;
                                serde_json::to_value(
                                    ro.verify_audit(&kek.audit_key(), expect_head.as_ref())?,
                                )?
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                };
                let intact = v["first_broken"].is_null();
                if target.json {
                    print_json(&v);
                } else if intact {
                    let head = v["head"]
                        .as_object()
                        .map(|h| {
                            format!(
                                ", head {}:{}",
                                h["seq"],
                                h["hash"].as_str().unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                    let legacy = match v["legacy_rows"].as_i64() {
                        Some(n) if n > 0 => format!(
                            " ({n} of them from before the chain was keyed, checked as plain SHA-256)"
                        ),
                        _ => String::new(),
                    };
                    println!("audit chain intact: {} rows{legacy}{head}", v["rows"]);
                } else {
                    println!(
                        "audit chain BROKEN at row {}: {}",
                        v["first_broken"],
                        v["detail"].as_str().unwrap_or_default()
                    );
                }
                Ok(if intact {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            AuditCommand::Head => {
                let head = match client(&target).call(Method::GET, "/audit/head", None).await {
                    Ok(v) => Some(serde_json::from_value::<ca::store::AuditHead>(v)?),
                    Err(ca::admin_client::AdminError::Connect { .. }) => {
                        ca::store::sqlite::SqliteStore::open_read_only(&target.data_dir)?
                            .audit_head()?
                    }
                    Err(e) => return Err(e.into()),
                };
                let head = head.context("the audit log has no rows yet")?;
                if target.json {
                    print_json(&serde_json::to_value(&head)?);
                } else {
                    println!("{head}");
                }
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let cfg = Config::resolve(args)?;
    crate::process::init_logging(&cfg.log_format);
    ca::server::prepare_data_dir(&cfg)?;
    let api = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let metrics = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (metrics)", cfg.metrics_listen))?;
    let admin = ca::admin::bind(&cfg.admin_socket).with_context(|| {
        format!(
            "cannot bind the admin socket {}",
            cfg.admin_socket.display()
        )
    })?;
    let shutdown = CancellationToken::new();
    let running = start(
        &cfg,
        Listeners {
            api,
            metrics,
            admin,
        },
        shutdown.clone(),
    )
    .await?;
    crate::process::wait_for_signal().await;
    tracing::info!("shutting down: no new connections; open requests may finish (up to 10s)");
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(10), running.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some requests did not finish within 10s");
    }
    let _ = std::fs::remove_file(&cfg.admin_socket);
    Ok(ExitCode::SUCCESS)
}

fn client(target: &Target) -> AdminClient {
    let path = target
        .admin_socket
        .clone()
        .unwrap_or_else(|| target.data_dir.join("admin.sock"));
    AdminClient::new(&path)
}

fn random_bytes() -> Result<[u8; 8]> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("random number generator failed"))?;
    Ok(b)
}

/// `kith ca root status` as text.
fn print_roots(v: &Value) {
    let mode = if v["mode"] == "upstream" {
        "upstream (an operator's CA signs kith's intermediates; kith cannot roll it)".to_owned()
    } else {
        format!(
            "self-rooted; a successor is made at {}% of a root's life",
            (v["rollover_at"].as_f64().unwrap_or(0.5) * 100.0).round()
        )
    };
    println!("mode           {mode}");
    let now =
        v["outage_at"].as_i64().unwrap_or(0) - v["time_to_outage_seconds"].as_i64().unwrap_or(0);
    for r in v["roots"].as_array().cloned().unwrap_or_default() {
        let phase = r["phase"].as_str().unwrap_or_default();
        let extra = match phase {
            "retiring" => format!(
                ", leaves the bundle at {} (its last leaf's end)",
                r["until"].as_i64().and_then(rfc3339).unwrap_or_default()
            ),
            "published" => ", in the bundle, not signing yet".to_owned(),
            _ => String::new(),
        };
        println!(
            "root           {} {:<9} ends {} (in {}){}\n               sha256 {}",
            r["id"].as_str().unwrap_or_default(),
            phase,
            r["not_after"]
                .as_i64()
                .and_then(rfc3339)
                .unwrap_or_default(),
            secs(&json!(r["not_after"].as_i64().unwrap_or(0) - now)),
            extra,
            r["sha256"].as_str().unwrap_or_default(),
        );
    }
    match waiting_line(&v["waiting"]) {
        Some(line) => println!("switch         {line}"),
        None => {
            if let Some(due) = v["successor_due_at"].as_i64() {
                println!("next rollover  {}", rfc3339(due).unwrap_or_default());
            }
        }
    }
    if let Some(w) = v["warning"].as_str() {
        println!("WARNING        {w}");
    }
    println!(
        "time to outage {} (cause: {}: {})",
        secs(&v["time_to_outage_seconds"]),
        v["time_to_outage_cause"].as_str().unwrap_or_default(),
        v["time_to_outage_detail"].as_str().unwrap_or_default()
    );
}

/// What a waiting switch waits for, in words.
fn waiting_line(w: &Value) -> Option<String> {
    let deadline = w["deadline"].as_i64().and_then(rfc3339).unwrap_or_default();
    match w["waiting_for"].as_str()? {
        "propagation" => Some(format!(
            "waits for the new bundle to reach every caller (the longest SVID TTL) until {}; switches at the latest at {deadline}",
            w["until"].as_i64().and_then(rfc3339).unwrap_or_default()
        )),
        "callers" => {
            let callers: Vec<String> = w["callers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            Some(format!(
                "waits for {} caller(s) that renewed without reporting the new root: {}; switches at the latest at {deadline}",
                callers.len(),
                callers.join(", ")
            ))
        }
        _ => None,
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn secs(v: &Value) -> String {
    match v.as_i64() {
        Some(s) if s >= 0 => humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
        Some(s) => format!(
            "EXPIRED {} ago",
            humantime::format_duration(Duration::from_secs(s.unsigned_abs()))
        ),
        None => "-".into(),
    }
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-07T02:38:42Z`).
fn rfc3339(unix: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// A plain table of selected columns (times as RFC 3339), or the JSON as is.
fn table(v: &Value, json: bool, columns: &[&str]) {
    if json {
        return print_json(v);
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("(none)");
        return;
    }
    let cell = |row: &Value, c: &str| match &row[c] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        // Time columns (`at`, `*_at`) are Unix seconds on the wire; people read RFC 3339.
        Value::Number(n) if c == "at" || c.ends_with("_at") => n
            .as_i64()
            .and_then(rfc3339)
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in &rows {
        println!("{}", line(columns.iter().map(|c| cell(r, c)).collect()));
    }
}
