//! `kith certs issue`: a leaf X509-SVID from the dev CA, written as PEM files or in the SPIFFE
//! filesystem-delivery layout.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use identity::x509::{BACKDATE, TemplateError, portable_pkcs8, svid_params};
use identity::{
    KeyType, SpiffeId, Svid, SvidError, TrustBundle, TrustDomain, VerifyError, verify_x509_svid,
};
use serde::Serialize;

use crate::ca::{self, CaError, DevCa, Init};
use crate::files::{FilesError, KEY_MODE, PUBLIC_MODE, ensure_dir, write_atomic};

/// Why a leaf could not be issued: a flag to change, the dev CA, or a file.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("--ttl must be at least 1m (got {0})")]
    Ttl(humantime::FormattedDuration),
    #[error("--name {0:?} is not a usable file name")]
    Name(String),
    #[error(
        "{id} is outside the dev CA's trust domain {ca}; issue an ID under spiffe://{ca}/ or use another KITH_HOME for {}",
        id.trust_domain()
    )]
    OutsideTrustDomain { id: SpiffeId, ca: TrustDomain },
    #[error("failed to sign the leaf")]
    Sign(#[source] rcgen::Error),
    #[error("issued certificate is not a valid X509-SVID (this is a bug)")]
    NotSvid(#[source] SvidError),
    #[error("issued certificate does not verify (this is a bug)")]
    DoesNotVerify(#[source] VerifyError),
    /// The key or certificate template could not be made.
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Files(#[from] FilesError),
}

type Result<T, E = IssueError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// <name>.crt (leaf + intermediate), <name>.key, bundle.crt
    #[default]
    Pem,
    /// The SPIFFE Filesystem Delivery layout: credential-bundle.private-key.pem and
    /// <trust-domain>.spiffe-trust-bundle.pem
    SpiffeFs,
}

pub struct Request {
    pub id: SpiffeId,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub ttl: Duration,
    pub out: PathBuf,
    pub name: Option<String>,
    pub format: Format,
    pub key_type: KeyType,
}

#[derive(Serialize)]
pub struct Issued {
    pub spiffe_id: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub files: Files,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Serialize)]
pub struct Files {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

pub fn issue(home: &Path, req: Request) -> Result<Issued> {
    let mut notes = Vec::new();
    if req.ttl < Duration::from_secs(60) {
        return Err(IssueError::Ttl(humantime::format_duration(req.ttl)));
    }
    let name = match &req.name {
        Some(n) => n.clone(),
        None => default_name(&req.id),
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(IssueError::Name(name));
    }
    // Check the output directory before making keys, so a bad --out fails fast.
    ensure_dir(&req.out, None)?;

    let mut ca = match ca::exists(home) {
        true => ca::load(home)?,
        false => {
            let td = req.id.trust_domain();
            let (Init::Created(ca) | Init::Existing(ca)) = ca::init(home, &td, KeyType::P256)?;
            notes.push(format!(
                "created a dev CA for trust domain {td} in {} (first use)",
                home.display()
            ));
            ca
        }
    };
    if !req.id.is_member_of(&ca.trust_domain) {
        return Err(IssueError::OutsideTrustDomain {
            id: req.id,
            ca: ca.trust_domain,
        });
    }

    let now = SystemTime::now();
    let mut not_after = now + req.ttl;
    if ca.intermediate_not_after <= not_after {
        // The signer would not cover the leaf: make a fresh one if the root allows it.
        if ca.intermediate_not_after < now + Duration::from_secs(86_400) {
            ca = ca.rotate_intermediate(KeyType::P256)?;
            notes.push("the signing intermediate was about to expire; made a new one".into());
        }
        if ca.intermediate_not_after < not_after {
            not_after = ca.intermediate_not_after;
            notes.push(format!(
                "ttl shortened to end with the signing intermediate ({})",
                rfc3339(not_after)
            ));
        }
    }

    // Wiped from memory when dropped; the Svid keeps its own (wiped) copy.
    let key = zeroize::Zeroizing::new(req.key_type.generate()?);
    let params = svid_params(&req.id, &req.dns, &req.ips, now - BACKDATE, not_after)?;
    let serial = params
        .serial_number
        .as_ref()
        .map(|s| hex_colon(&s.to_bytes()))
        .unwrap_or_default();
    let leaf = params
        .signed_by(&*key, &ca.issuer)
        .map_err(IssueError::Sign)?;
    let chain = vec![leaf.der().clone(), ca.intermediate.clone()];
    let svid = Svid::new(chain, portable_pkcs8(&key)).map_err(IssueError::NotSvid)?;
    // Validate what we made exactly as a peer would before handing it out.
    let bundle = ca.bundle()?;
    verify_x509_svid(svid.chain(), &bundle, now).map_err(IssueError::DoesNotVerify)?;

    let files = write(&req, &name, &svid, &ca, &bundle)?;
    Ok(Issued {
        spiffe_id: req.id.to_string(),
        serial,
        not_before: rfc3339(now - BACKDATE),
        not_after: rfc3339(not_after),
        files,
        notes,
    })
}

fn write(
    req: &Request,
    name: &str,
    svid: &Svid,
    ca: &DevCa,
    bundle: &TrustBundle,
) -> Result<Files> {
    let bundle_pem = bundle.to_pem();
    match req.format {
        Format::Pem => {
            let crt = req.out.join(format!("{name}.crt"));
            let key = req.out.join(format!("{name}.key"));
            let bundle = req.out.join("bundle.crt");
            write_atomic(&key, svid.key_pem().as_bytes(), KEY_MODE)?;
            write_atomic(&crt, svid.chain_pem().as_bytes(), PUBLIC_MODE)?;
            write_atomic(&bundle, bundle_pem.as_bytes(), PUBLIC_MODE)?;
            Ok(Files {
                certificate: Some(crt),
                key,
                bundle,
            })
        }
        Format::SpiffeFs => {
            let cred = req.out.join("credential-bundle.private-key.pem");
            let bundle = req
                .out
                .join(format!("{}.spiffe-trust-bundle.pem", ca.trust_domain));
            write_atomic(&cred, svid.to_credential_bundle().as_bytes(), KEY_MODE)?;
            write_atomic(&bundle, bundle_pem.as_bytes(), PUBLIC_MODE)?;
            Ok(Files {
                certificate: None,
                key: cred,
                bundle,
            })
        }
    }
}

/// The last path segment (`spiffe://td/ns/default/sa/web` → `web`).
fn default_name(id: &SpiffeId) -> String {
    id.segments().last().unwrap_or("svid").to_owned()
}

/// A human summary with the files and one-liners to try them.
pub fn render(issued: &Issued, req_format: Format, dns_name: Option<&str>) -> String {
    let mut s = String::new();
    for note in &issued.notes {
        s.push_str(&format!("note: {note}\n"));
    }
    s.push_str(&format!(
        "issued {}  (valid until {}, serial {})\n",
        issued.spiffe_id, issued.not_after, issued.serial
    ));
    let f = &issued.files;
    let d = |p: &Path| p.display().to_string();
    match (req_format, &f.certificate) {
        (Format::Pem, Some(crt)) => {
            s.push_str(&format!(
                "  certificate  {}  (leaf + intermediate)\n",
                d(crt)
            ));
            s.push_str(&format!("  private key  {}  (0600)\n", d(&f.key)));
            s.push_str(&format!("  trust bundle {}\n\n", d(&f.bundle)));
            s.push_str("try it:\n");
            s.push_str(&format!("  kith certs inspect {}\n", d(crt)));
            s.push_str(&format!(
                "  openssl verify -CAfile {} -untrusted {} {}\n",
                d(&f.bundle),
                d(crt),
                d(crt)
            ));
            s.push_str(&format!(
                "  openssl s_server -accept 8443 -www -tls1_3 -cert {} -cert_chain {} -key {} -CAfile {} -Verify 1\n",
                d(crt),
                d(crt),
                d(&f.key),
                d(&f.bundle)
            ));
            if let Some(host) = dns_name {
                s.push_str(&format!(
                    "  curl --cacert {} --cert {} --key {} https://{host}:8443/\n",
                    d(&f.bundle),
                    d(crt),
                    d(&f.key)
                ));
            }
        }
        _ => {
            s.push_str(&format!(
                "  credential bundle {}  (key + chain, 0600)\n",
                d(&f.key)
            ));
            s.push_str(&format!("  trust bundle      {}\n\n", d(&f.bundle)));
            if let Some(dir) = f.key.parent() {
                s.push_str(&format!(
                    "point workloads at it: export SPIFFE_CREDENTIAL_FOLDER={}\n",
                    d(dir)
                ));
            }
        }
    }
    s
}

pub fn rfc3339(t: SystemTime) -> String {
    identity::x509::to_offset(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn hex_colon(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
