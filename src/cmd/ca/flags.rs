//! `kith ca`'s commands and flags (each also a `KITH_CA_*` variable where a deployment sets it).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use ca::config::ServeArgs;

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub(super) command: CaCommand,
}

#[derive(Debug, Args, Clone)]
pub(super) struct Target {
    /// The CA's data directory (its admin socket lives there)
    #[arg(
        long,
        env = "KITH_CA_DATA_DIR",
        default_value = "/var/lib/kith-ca",
        global = true
    )]
    pub(super) data_dir: PathBuf,
    /// The admin socket, if not <data-dir>/admin.sock
    #[arg(long, env = "KITH_CA_ADMIN_SOCKET", global = true)]
    pub(super) admin_socket: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub(super) json: bool,
}

#[derive(Debug, Subcommand)]
pub(super) enum CaCommand {
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
pub(super) enum StoreCommand {
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
pub(super) enum TokenCommand {
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
pub(super) enum EntryCommand {
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
pub(super) enum NodeCommand {
    List,
    /// Refuse this node and everything under it from now on
    Evict {
        spiffe_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum UpstreamCommand {
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
pub(super) enum RootCommand {
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
pub(super) enum AuditCommand {
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

pub(super) fn parse_head(s: &str) -> Result<ca::store::AuditHead, String> {
    ca::store::AuditHead::parse(s)
}
