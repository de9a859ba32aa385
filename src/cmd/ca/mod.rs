//! `kith ca …`: `serve` runs the CA; the other commands talk to a running CA over its admin
//! socket (found through `--data-dir` or `--admin-socket`), except `audit verify`, which can
//! also read a stopped CA's database directly.

use std::process::ExitCode;

use anyhow::{Context, Result};
use hyper::Method;
use serde_json::{Value, json};

use ca::admin_client::AdminClient;

pub use self::flags::CaArgs;
use self::flags::*;
use self::output::{print_json, print_roots, secs, table, waiting_line};
use self::serve::serve;
use crate::process::{self, Threads};

mod flags;
mod output;
mod serve;

pub fn run(args: CaArgs) -> ExitCode {
    // One thread for accepting, admin, metrics and maintenance; API connections run on their
    // own per-core runtimes (`api::serve`) and the store's writer on its own thread.
    let rt = match process::runtime(Threads::One, 2) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    process::exit(&rt, run_inner(args), 2)
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
