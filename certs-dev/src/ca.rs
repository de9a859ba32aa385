//! The developer CA: a root (10 years) and a signing intermediate (1 year) in the CA home.
//! It never touches the system trust store: the bundle file is handed to whatever needs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use identity::pem::PemError;
use identity::x509::{BACKDATE, TemplateError, from_offset, intermediate_params, root_params};
use identity::{BundleError, KeyType, TrustBundle, TrustDomain, bundle::root_trust_domain};
use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

use crate::files::{FilesError, KEY_MODE, PUBLIC_MODE, ensure_dir, read, write_atomic};

/// Why the dev CA cannot be created, loaded or rotated.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot find a data directory: set KITH_HOME or HOME")]
    NoDataDir,
    #[error(
        "the dev CA in {} is for trust domain {have}, not {want}; use another KITH_HOME (or --home) for {want}",
        home.display()
    )]
    OtherTrustDomain {
        home: PathBuf,
        have: TrustDomain,
        want: TrustDomain,
    },
    #[error(
        "{} holds {leftover} but no {ROOT_CRT}: an incomplete CA; move it away and run init again",
        home.display()
    )]
    Incomplete {
        home: PathBuf,
        leftover: &'static str,
    },
    #[error("no dev CA in {}: run `kith certs init` first", home.display())]
    Missing { home: PathBuf },
    #[error("{} has no spiffe:// URI SAN naming its trust domain", path.display())]
    NoTrustDomain { path: PathBuf },
    #[error("{what} does not parse as a CA certificate")]
    NotCa {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("failed to sign the {what}")]
    Sign {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{} is not a certificate", path.display())]
    NotCertificate {
        path: PathBuf,
        #[source]
        source: PemError,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not PEM", path.display())]
    NotPem { path: PathBuf },
    #[error("{} is not a PKCS#8 private key", path.display())]
    NotKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate does not parse")]
    Unparsable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// A key, serial or certificate template that could not be made.
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Files(#[from] FilesError),
}

type Result<T, E = CaError> = std::result::Result<T, E>;

pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 86_400);

const ROOT_CRT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CRT: &str = "intermediate.crt";
const INTERMEDIATE_KEY: &str = "intermediate.key";

/// A loaded development CA.
pub struct DevCa {
    pub home: PathBuf,
    pub trust_domain: TrustDomain,
    pub root: CertificateDer<'static>,
    pub root_not_after: SystemTime,
    pub intermediate: CertificateDer<'static>,
    pub intermediate_not_after: SystemTime,
    pub issuer: Issuer<'static, KeyPair>,
}

/// What `init` did.
pub enum Init {
    Created(DevCa),
    Existing(DevCa),
}

/// The CA home: `$KITH_HOME` when set (the caller passes it), else `<XDG data dir>/kith`.
pub fn default_home() -> Result<PathBuf> {
    dirs::data_dir()
        .map(|d| d.join("kith"))
        .ok_or(CaError::NoDataDir)
}

pub fn exists(home: &Path) -> bool {
    home.join(ROOT_CRT).exists()
}

/// Creates the CA in `home`, or keeps the one already there (when its trust domain matches).
pub fn init(home: &Path, td: &TrustDomain, key_type: KeyType) -> Result<Init> {
    if exists(home) {
        let ca = load(home)?;
        if &ca.trust_domain != td {
            return Err(CaError::OtherTrustDomain {
                home: home.to_owned(),
                have: ca.trust_domain,
                want: td.clone(),
            });
        }
        return Ok(Init::Existing(ca));
    }
    for leftover in [ROOT_KEY, INTERMEDIATE_CRT, INTERMEDIATE_KEY] {
        if home.join(leftover).exists() {
            return Err(CaError::Incomplete {
                home: home.to_owned(),
                leftover,
            });
        }
    }
    ensure_dir(home, Some(0o700))?;
    let now = SystemTime::now();
    let root_key = key_type.generate()?;
    let root_cn = format!("kith dev root {}", tag()?);
    let params = root_params(td, &root_cn, now - BACKDATE, now + ROOT_TTL)?;
    let root = params
        .self_signed(&root_key)
        .map_err(|source| CaError::Sign {
            what: "root",
            source,
        })?;
    // Key first: a root.crt without its key would be an unusable CA.
    write_atomic(
        &home.join(ROOT_KEY),
        key_pem(&root_key).as_bytes(),
        KEY_MODE,
    )?;
    write_atomic(&home.join(ROOT_CRT), root.pem().as_bytes(), PUBLIC_MODE)?;
    let root_issuer = Issuer::new(params, root_key);
    new_intermediate(
        home,
        td,
        &root_issuer,
        from_offset_cert(root.der())?,
        key_type,
    )?;
    Ok(Init::Created(load(home)?))
}

/// Loads the CA from `home`.
pub fn load(home: &Path) -> Result<DevCa> {
    if !exists(home) {
        return Err(CaError::Missing {
            home: home.to_owned(),
        });
    }
    let root = one_cert(&home.join(ROOT_CRT))?;
    let trust_domain = root_trust_domain(&root).ok_or_else(|| CaError::NoTrustDomain {
        path: home.join(ROOT_CRT),
    })?;
    let intermediate = one_cert(&home.join(INTERMEDIATE_CRT))?;
    let key = load_key(&home.join(INTERMEDIATE_KEY))?;
    let issuer = Issuer::from_ca_cert_der(&intermediate, key).map_err(|source| CaError::NotCa {
        what: INTERMEDIATE_CRT,
        source,
    })?;
    Ok(DevCa {
        home: home.to_owned(),
        trust_domain,
        root_not_after: from_offset_cert(&root)?,
        intermediate_not_after: from_offset_cert(&intermediate)?,
        root,
        intermediate,
        issuer,
    })
}

impl DevCa {
    pub fn bundle(&self) -> Result<TrustBundle> {
        Ok(TrustBundle::from_roots(
            self.trust_domain.clone(),
            vec![self.root.clone()],
        )?)
    }

    /// Makes a new signing intermediate under the root (when the old one has run out) and
    /// returns the reloaded CA. Leaves already issued keep their old intermediate in their chain.
    pub fn rotate_intermediate(self, key_type: KeyType) -> Result<DevCa> {
        let root_key = load_key(&self.home.join(ROOT_KEY))?;
        let root_issuer =
            Issuer::from_ca_cert_der(&self.root, root_key).map_err(|source| CaError::NotCa {
                what: ROOT_CRT,
                source,
            })?;
        new_intermediate(
            &self.home,
            &self.trust_domain,
            &root_issuer,
            self.root_not_after,
            key_type,
        )?;
        load(&self.home)
    }
}

fn new_intermediate(
    home: &Path,
    td: &TrustDomain,
    root: &Issuer<'_, KeyPair>,
    root_not_after: SystemTime,
    key_type: KeyType,
) -> Result<()> {
    let now = SystemTime::now();
    // A CA certificate never outlives the one that signed it.
    let not_after = (now + INTERMEDIATE_TTL).min(root_not_after);
    // Wiped from memory when dropped, once written.
    let key = Zeroizing::new(key_type.generate()?);
    let cn = format!("kith dev signer {}", tag()?);
    let params = intermediate_params(td, &cn, now - BACKDATE, not_after)?;
    let cert = params
        .signed_by(&*key, root)
        .map_err(|source| CaError::Sign {
            what: "intermediate",
            source,
        })?;
    write_atomic(
        &home.join(INTERMEDIATE_KEY),
        key_pem(&key).as_bytes(),
        KEY_MODE,
    )?;
    write_atomic(
        &home.join(INTERMEDIATE_CRT),
        cert.pem().as_bytes(),
        PUBLIC_MODE,
    )?;
    Ok(())
}

fn key_pem(key: &KeyPair) -> Zeroizing<String> {
    let der = Zeroizing::new(identity::x509::portable_pkcs8(key));
    identity::pem::encode_secret("PRIVATE KEY", der.secret_pkcs8_der())
}

fn one_cert(path: &Path) -> Result<CertificateDer<'static>> {
    let certs =
        identity::pem::certificates(&read(path)?).map_err(|source| CaError::NotCertificate {
            path: path.to_owned(),
            source,
        })?;
    certs
        .into_iter()
        .next()
        .ok_or_else(|| CaError::NoCertificate {
            path: path.to_owned(),
        })
}

fn load_key(path: &Path) -> Result<KeyPair> {
    let pem = Zeroizing::new(String::from_utf8(read(path)?).map_err(|_| CaError::NotPem {
        path: path.to_owned(),
    })?);
    KeyPair::from_pem(&pem).map_err(|source| CaError::NotKey {
        path: path.to_owned(),
        source,
    })
}

fn from_offset_cert(der: &CertificateDer<'_>) -> Result<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(CaError::Unparsable)?;
    Ok(from_offset(cert.validity().not_after.to_datetime()))
}

/// Eight hex characters that make each CA's names unique, so a leaf from another developer's
/// CA never chains to this one by name.
fn tag() -> Result<String> {
    let serial = identity::x509::random_serial()?;
    Ok(serial.to_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
