//! `kith certs`: a local development CA for SPIFFE X509-SVIDs, mkcert-style. It keeps a root
//! and a signing intermediate in the CA home and issues, inspects and verifies X509-SVIDs.
//! It never touches the system trust store.
//!
//! Exit codes: 0 success, 1 a certificate is not valid (`verify`), 2 usage or I/O error.

mod ca;
mod files;
mod inspect;
mod issue;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use identity::pem::PemError;
use identity::{
    BundleError, KeyType, SpiffeId, SvidError, TrustBundle, TrustDomain, verify_x509_svid,
};
use serde_json::json;

pub use ca::CaError;
pub use files::FilesError;
pub use issue::{Format, IssueError};

/// Why a `kith certs` command failed (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("certificate {index}: {reason}")]
    Inspect { index: usize, reason: String },
    #[error("{} is not a trust bundle", path.display())]
    NotBundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("{} is not a valid credential bundle", path.display())]
    NotCredentialBundle {
        path: PathBuf,
        #[source]
        source: SvidError,
    },
    #[error("{} is not a certificate", path.display())]
    NotCertificate {
        path: PathBuf,
        #[source]
        source: PemError,
    },
}

type Result<T, E = CertsError> = std::result::Result<T, E>;

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Where the dev CA lives [default: $XDG_DATA_HOME/kith, i.e. ~/.local/share/kith]
    #[arg(long, env = "KITH_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the dev CA (root 10 years, signing intermediate 1 year); keeps an existing one
    Init {
        #[arg(long, default_value = "example.org", value_parser = parse_td)]
        trust_domain: TrustDomain,
        #[arg(long, default_value = "p256", value_parser = parse_key_type)]
        key_type: KeyType,
        #[arg(long)]
        json: bool,
    },
    /// Issue a leaf X509-SVID (creates the dev CA on first use)
    Issue {
        /// The SPIFFE ID, e.g. spiffe://example.org/ns/default/sa/web
        #[arg(value_parser = parse_id)]
        spiffe_id: SpiffeId,
        /// Extra DNS SAN (repeatable)
        #[arg(long)]
        dns: Vec<String>,
        /// Extra IP SAN (repeatable)
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Lifetime, e.g. 1h, 24h, 30d (capped by the signing intermediate)
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Output directory
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Base name of the files [default: the last segment of the SPIFFE ID's path]
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Pem)]
        format: Format,
        #[arg(long, default_value = "p256", value_parser = parse_key_type)]
        key_type: KeyType,
        #[arg(long)]
        json: bool,
    },
    /// Show a certificate (PEM with one or many, or DER) and its X509-SVID verdict
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify an X509-SVID chain against a trust bundle; prints the SPIFFE ID
    Verify {
        /// The chain: leaf first, then intermediates (PEM)
        chain: PathBuf,
        /// Trust bundle: PEM roots or the SPIFFE bundle format (JSON)
        #[arg(long)]
        bundle: PathBuf,
        /// Require this exact SPIFFE ID
        #[arg(long, value_parser = parse_id)]
        id: Option<SpiffeId>,
        /// Verify as of this time (RFC 3339) instead of now
        #[arg(long, value_parser = parse_rfc3339)]
        at: Option<SystemTime>,
        /// Trust domain of a PEM bundle whose roots do not name it
        #[arg(long, value_parser = parse_td)]
        trust_domain: Option<TrustDomain>,
        #[arg(long)]
        json: bool,
    },
    /// Print the dev CA's directory and trust domain
    Home {
        #[arg(long)]
        json: bool,
    },
}

/// Runs `kith certs …` and returns the process exit code.
pub fn run(args: CertsArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", identity::report::chain(&e));
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: CertsArgs) -> Result<ExitCode> {
    let home = match args.home {
        Some(h) => h,
        None => ca::default_home()?,
    };
    match args.command {
        CertsCommand::Init {
            trust_domain,
            key_type,
            json,
        } => {
            let (ca, created) = match ca::init(&home, &trust_domain, key_type)? {
                ca::Init::Created(ca) => (ca, true),
                ca::Init::Existing(ca) => (ca, false),
            };
            if json {
                print_json(&json!({
                    "created": created,
                    "home": ca.home,
                    "trust_domain": ca.trust_domain,
                    "root": ca.home.join("root.crt"),
                    "root_not_after": issue::rfc3339(ca.root_not_after),
                    "intermediate_not_after": issue::rfc3339(ca.intermediate_not_after),
                }));
            } else {
                let verb = if created {
                    "created a new"
                } else {
                    "kept the existing"
                };
                println!(
                    "{verb} dev CA for trust domain {} in {}",
                    ca.trust_domain,
                    home.display()
                );
                println!(
                    "  root          {}  (until {})",
                    home.join("root.crt").display(),
                    issue::rfc3339(ca.root_not_after)
                );
                println!(
                    "  intermediate  {}  (until {})",
                    home.join("intermediate.crt").display(),
                    issue::rfc3339(ca.intermediate_not_after)
                );
                println!(
                    "the system trust store was not touched; hand root.crt to what should trust it"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Issue {
            spiffe_id,
            dns,
            ip,
            ttl,
            out,
            name,
            format,
            key_type,
            json,
        } => {
            let first_dns = dns.first().filter(|d| !d.starts_with('*')).cloned();
            let req = issue::Request {
                id: spiffe_id,
                dns,
                ips: ip,
                ttl,
                out,
                name,
                format,
                key_type,
            };
            let issued = issue::issue(&home, req)?;
            if json {
                print_json(&issued);
            } else {
                print!("{}", issue::render(&issued, format, first_dns.as_deref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Inspect { file, json } => {
            let certs = read_chain(&file)?;
            let now = SystemTime::now();
            let infos = certs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    inspect::inspect(c, now).map_err(|reason| CertsError::Inspect {
                        index: i + 1,
                        reason,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if json {
                print_json(&infos);
            } else {
                print!("{}", inspect::render(&infos));
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Verify {
            chain,
            bundle,
            id,
            at,
            trust_domain,
            json,
        } => {
            let certs = read_chain(&chain)?;
            let td = trust_domain.or_else(|| id.as_ref().map(SpiffeId::trust_domain));
            let bundle = TrustBundle::parse(td, &files::read(&bundle)?).map_err(|source| {
                CertsError::NotBundle {
                    path: bundle.clone(),
                    source,
                }
            })?;
            let now = at.unwrap_or_else(SystemTime::now);
            let outcome = verify_x509_svid(&certs, &bundle, now)
                .map_err(|e| (e.detailed_reason(), e.to_string()))
                .and_then(|got| match &id {
                    Some(want) if want != &got => Err((
                        "unexpected_id".to_owned(),
                        format!("spiffe id is {got}, expected {want}"),
                    )),
                    _ => Ok(got),
                });
            match outcome {
                Ok(got) => {
                    if json {
                        print_json(&json!({"valid": true, "spiffe_id": got}));
                    } else {
                        println!("{got}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err((reason, message)) => {
                    if json {
                        print_json(&json!({"valid": false, "reason": reason, "message": message}));
                    } else {
                        eprintln!("invalid: {reason}: {message}");
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
        CertsCommand::Home { json } => {
            let ca = ca::exists(&home).then(|| ca::load(&home)).transpose()?;
            let td = ca.as_ref().map(|c| c.trust_domain.to_string());
            if json {
                print_json(&json!({"home": home, "exists": ca.is_some(), "trust_domain": td}));
            } else {
                match td {
                    Some(td) => println!("{}  (trust domain {td})", home.display()),
                    None => println!("{}  (no dev CA yet: run `kith certs init`)", home.display()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Certificates from a PEM or DER file, or from a SPIFFE credential bundle (key, then chain;
/// the key must belong to the leaf).
fn read_chain(path: &std::path::Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    let bytes = files::read(path)?;
    match identity::pem::certificates(&bytes) {
        Ok(certs) => Ok(certs),
        Err(PemError::NotACertificate {
            found: "private key",
        }) if bytes.starts_with(b"-----BEGIN PRIVATE KEY-----")
            && bytes.windows(17).any(|w| w == b"BEGIN CERTIFICATE") =>
        {
            let svid = identity::Svid::from_credential_bundle(&bytes).map_err(|source| {
                CertsError::NotCredentialBundle {
                    path: path.to_owned(),
                    source,
                }
            })?;
            Ok(svid.chain().to_vec())
        }
        Err(source) => Err(CertsError::NotCertificate {
            path: path.to_owned(),
            source,
        }),
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode json: {e}"),
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(s).map_err(|e| e.to_string())
}

fn parse_td(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse()
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(identity::x509::from_offset)
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-01-31T12:00:00Z): {e}"))
}
