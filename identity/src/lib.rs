//! kith's identity core: SPIFFE IDs and trust domains, SVIDs and trust bundles, X509-SVID
//! verification, JWT-SVIDs and the renewal schedule. Every other kith crate stands on this one.

pub mod bundle;
pub mod digest;
pub mod files;
pub mod jwt;
pub mod kx;
pub mod mesh;
pub mod pem;
pub mod refresh;
pub mod report;
pub mod spiffe_id;
pub mod svid;
pub mod tls;
pub mod verify;
#[cfg(feature = "workload-client")]
pub mod workload_client;
pub mod x509;

pub use bundle::{BundleError, JwtAuthority, TrustBundle};
pub use refresh::{Jitter, RefreshPolicy, refresh_at};
pub use spiffe_id::{IdError, SpiffeId, TrustDomain};
pub use svid::{Svid, SvidError};
pub use verify::{NotSvid, VerifyError, check_svid_leaf, verdict_window, verify_x509_svid};
pub use x509::KeyType;
