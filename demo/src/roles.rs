//! Who is who in the demo: the three registered workloads and the parts that log.

use identity::{SpiffeId, TrustDomain};

/// The three registered workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// The client: plaintext in, mTLS out to the api.
    Web,
    /// The backend's server side: mTLS in (web only), plaintext to the backend.
    Api,
    /// A registered workload of the same trust domain that the api's policy does not allow.
    Intruder,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Web, Workload::Api, Workload::Intruder];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Web => "web",
            Workload::Api => "api",
            Workload::Intruder => "intruder",
        }
    }

    pub fn id(self, td: &TrustDomain) -> SpiffeId {
        // Fixed, valid paths: parsing cannot fail.
        td.id_with_path(&format!("/{}", self.name()))
            .unwrap_or_else(|_| td.id())
    }
}

/// Who a log line or a child belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ca,
    Agent,
    Sidecar(Workload),
}

impl Role {
    /// A file name: `ca`, `agent`, `web-sidecar`, …
    pub fn slug(self) -> String {
        match self {
            Role::Ca => "ca".to_owned(),
            Role::Agent => "agent".to_owned(),
            Role::Sidecar(w) => format!("{}-sidecar", w.name()),
        }
    }

    /// For sentences: "the CA", "the web sidecar".
    pub fn title(self) -> String {
        match self {
            Role::Ca => "the CA".to_owned(),
            Role::Agent => "the agent".to_owned(),
            Role::Sidecar(w) => format!("the {} sidecar", w.name()),
        }
    }
}
