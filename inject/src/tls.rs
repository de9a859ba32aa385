//! The webhook's serving certificate: loaded from PEM files, TLS 1.3 only (ring), and reloaded
//! when the files change, as they do when cert-manager or an operator renews the Secret. A
//! reload that fails keeps the certificate in use.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use identity::tls::{Current, HotCert, Kx};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{cert} and {key} do not go together: {reason}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The certificate and key files, and what was last loaded from them.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<HotCert>,
    /// The bytes behind `current`, to tell a change from a re-read.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Loads the pair once; an error here is a configuration error to report at start.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let certified = certified_key(cert, key, &cert_pem, &key_pem)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Arc::new(HotCert::new(certified)),
            loaded: Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Loads the files again if their contents changed. `Ok(true)` when a new certificate is in
    /// use; on error the old one stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = (read(&self.cert)?, read(&self.key)?);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let certified = certified_key(&self.cert, &self.key, &cert_pem, &key_pem)?;
        self.current.store(certified);
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Checks the files every `every` until `shutdown`.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one")
                }
            }
        }
    }

    /// The certificate in use: its chain, leaf first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().key.cert.clone()
    }

    /// What the TLS configuration serves: the certificate in use, swapped by `reload`.
    pub fn resolver(&self) -> Arc<HotCert> {
        self.current.clone()
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// TLS 1.3 only (the workspace builds rustls without TLS 1.2; the kube-apiserver speaks 1.3),
/// ring with its default key-exchange groups, HTTP/2 and HTTP/1.1 offered.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = identity::tls::server_builder(Kx::Wide)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(cert.resolver());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

fn certified_key(
    cert: &Path,
    key: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Current, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        reason: format!("no usable private key ({e})"),
    })?;
    let certified = CertifiedKey::from_der(chain, private, &identity::tls::provider_with(Kx::Wide))
        .map_err(|e| TlsError::Key {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    Current::from_leaf(Arc::new(certified)).ok_or_else(|| TlsError::Pem {
        path: cert.to_owned(),
        reason: "the certificate's validity does not parse".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let (c, k, der) = integration::pki::write_tls_pair(dir, &[name]);
        (c, k, der.to_vec())
    }

    #[test]
    fn a_changed_pair_is_picked_up_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, first) = write_pair(dir.path(), "a.example");
        let cert = ReloadingCert::load(&c, &k).unwrap();
        assert!(!cert.reload().unwrap(), "nothing changed");
        let (_, _, second) = write_pair(dir.path(), "b.example");
        assert!(cert.reload().unwrap());
        assert_eq!(cert.chain()[0].as_ref(), second.as_slice());
        assert_ne!(first, second);

        // A key that does not match (a half-written rotation) keeps the certificate in use.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let err = cert.reload().unwrap_err();
        assert!(err.to_string().contains("do not go together"), "{err}");
        assert_eq!(cert.chain()[0].as_ref(), second.as_slice());
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, _) = write_pair(dir.path(), "a.example");
        let missing = dir.path().join("missing.crt");
        let err = ReloadingCert::load(&missing, &k).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");
        std::fs::write(&c, "not pem").unwrap();
        let err = ReloadingCert::load(&c, &k).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let (c, _, _) = write_pair(dir.path(), "a.example");
        std::fs::write(&k, "not pem").unwrap();
        let err = ReloadingCert::load(&c, &k).unwrap_err();
        assert!(err.to_string().contains("no usable private key"), "{err}");
    }
}
