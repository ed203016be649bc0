//! Scale-out coordination on PostgreSQL (issue 15, part 1): the schema and its migrations,
//! node leases, patient partitions owned under fencing tokens, instance records published
//! idempotently, and batch claims as transactions that check the claimer's token.
//!
//! Owns: every statement dicomgate sends to the cluster database, and the rules that make
//! them safe when nodes pause, die or race (below). Must never touch instance bytes (they stay
//! in each node's segment log and files on the shared folder), hold a transaction open across
//! anything but its own statements, or trust a node's clock: every lease is in database time
//! (`statement_timestamp()`), so nodes with skewed clocks still agree on who is live.
//!
//! **Wired into the node so far:** `[cluster]` gives the node its folder under the shared
//! folder, and [`outbox`] publishes every instance it acknowledges, renews its lease, and
//! takes over a dead node's unpublished records ([`Coordinator::next_takeover`]), fencing
//! it first so that, if it is alive but cut off, it acknowledges nothing more ([`fence`]). The
//! owner side (`pipeline::owner`) feeds the owned partitions' rows into the patient map and
//! claims, adopts and finishes batches through [`Coordinator::claim_instances`],
//! [`Coordinator::adopt`], [`Coordinator::unfinished`] and [`Coordinator::set_stage`]. What
//! remains of issue 15 is in `docs/cluster.md`.
//!
//! The connection is plain, or TLS with `[cluster] tls_ca` ([`Coordinator::connect_to`]: the
//! server's certificate verified against that CA and the connection's `host` name, rustls
//! with the node's TLS profile).
//!
//! # The rules
//!
//! - **Leases.** A node is live while its `dicomgate_nodes.lease_until` is in the future
//!   (`statement_timestamp()`, the database's clock). [`Coordinator::rebalance`] is the
//!   heartbeat: it renews the lease and rebalances in one transaction, so a node that is live
//!   is one that rebalances (a node that only renewed could hold a quota it never takes). A
//!   node whose lease ran out (paused with SIGSTOP, cut off from the database) cannot claim,
//!   and by the time it renewed its partitions may have moved.
//! - **Incarnations.** The first rebalance of a [`Coordinator`] raises the token of every
//!   partition its node id still owns: a previous process under the same id (restarted, or
//!   paused and replaced by systemd) holds older tokens and is fenced off, and its unfinished
//!   batches are adopted ([`Coordinator::adopt`]) by the new one.
//! - **Partitions.** A grouping key belongs to partition `digest(key) mod partitions`
//!   ([`partition_of`]); `partitions` is fixed when the cluster is made (kept in
//!   `dicomgate_settings`; a node configured otherwise is refused). Each partition has at most
//!   one owner, and a fencing token that grows by one at every change of owner.
//! - **Rebalance** runs in one transaction holding every partition row `FOR UPDATE`, so
//!   rebalances and claims are serialized on the rows they read. Quotas are even shares among
//!   the *members*: live nodes and nodes whose lease ran out less than a lease ago (so when every
//!   lease lapsed at once, a database failover say, the first node back takes its own share and
//!   not everything). The `partitions mod members` extra partitions go to the members that own
//!   the most already, so a join or a death moves no more partitions than even shares need. A
//!   node above its quota releases its highest partitions that have no unfinished batch (a
//!   busy one waits until its batches are done, so a batch is never adopted from a live owner
//!   still processing it); a node below takes the lowest partitions that are free or whose
//!   owner is not live, raising their tokens. A dead node's partitions are taken once it has
//!   dropped out of the members, within two leases of its last renewal. With a stable set of
//!   nodes, every partition has one live owner and the shares are even after every node has
//!   rebalanced twice.
//! - **Claims** ([`Coordinator::claim`]) are one transaction: the partition row is read
//!   `FOR SHARE` (so a takeover, which updates that row, waits for the claim or the claim for
//!   it) and must name this node with the token the claimer holds; the claimer's lease must
//!   still run; then every pending record of the key is marked with the batch id
//!   (`UPDATE ... WHERE batch_id IS NULL`, so two claims of one key never both take a record:
//!   under READ COMMITTED the second re-checks each row after the first commits). A deposed
//!   owner that has not noticed yet holds an older token and is refused
//!   ([`ClusterError::Fenced`]), so two nodes never both claim one record.
//! - **Publication** ([`Coordinator::publish`]) is idempotent by (node, SOP Instance UID): a
//!   record published again unchanged is one row, and a re-send of an instance replaces its row
//!   and makes it pending again (as a late arrival starts a new batch on one node).
//! - **Batches of a dead or replaced owner** are adopted by the partition's new owner
//!   ([`Coordinator::adopt`]): every batch of the partition not done and claimed under an older
//!   token is re-tokened to the adopter; stage changes ([`Coordinator::set_stage`]) are fenced
//!   the same way, so the old owner, if it wakes, can no longer move them. Processing is
//!   therefore at least once across the death of its node (the old process may have run it
//!   before it was cut off), exactly once otherwise.
//! - **Stuck peers.** Each connection ends a transaction left idle, and a wait on a lock, after
//!   half a lease, and a statement after a lease; a connection whose peer vanished is given up
//!   by TCP keepalives within about a lease. Such failures are [`ClusterError::is_retryable`].

pub mod fence;
pub mod outbox;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, GenericClient, NoTls};
use sha2::{Digest, Sha256};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 6;

/// Versioned migrations, applied in order; each is applied once, in the transaction that
/// records it. Never edit one that shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "coordination",
        include_str!("migrations/0001_coordination.sql"),
    ),
    (2, "takeover", include_str!("migrations/0002_takeover.sql")),
    (
        3,
        "node status",
        include_str!("migrations/0003_node_status.sql"),
    ),
    (
        4,
        "owner side",
        include_str!("migrations/0004_owner_side.sql"),
    ),
    (
        5,
        "open associations",
        include_str!("migrations/0005_open_associations.sql"),
    ),
    (
        6,
        "outbox commit count",
        include_str!("migrations/0006_commits.sql"),
    ),
];

/// Largest partition count (a partition is a row; more gain nothing at any realistic node
/// count and make each rebalance read more rows).
pub use crate::config::MAX_PARTITIONS;

/// What can go wrong talking to the cluster database.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// The database could not be reached, or a statement failed.
    Database(postgres::Error),
    /// The database holds a schema newer than this build knows.
    SchemaTooNew { database: i32, build: i32 },
    /// The cluster was made with another partition count than this node's.
    PartitionsDiffer { cluster: u32, configured: u32 },
    /// This node's lease has run out: it must renew it ([`Coordinator::rebalance`]) first.
    LeaseExpired,
    /// The partition is not this node's under this token any more (or never was).
    Fenced {
        partition: u32,
        owner: Option<String>,
        fencing: i64,
    },
    /// A value given to the coordinator is not acceptable (named in the text).
    Invalid(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Database(e) => write!(f, "cluster database: {e}"),
            ClusterError::SchemaTooNew { database, build } => write!(
                f,
                "the cluster database's schema is version {database}, newer than this build's \
                 {build}: upgrade this node"
            ),
            ClusterError::PartitionsDiffer {
                cluster,
                configured,
            } => write!(
                f,
                "the cluster was made with {cluster} partitions, this node is configured with \
                 {configured}: every node must use the same partitions"
            ),
            ClusterError::LeaseExpired => {
                write!(f, "this node's cluster lease has run out: renew it first")
            }
            ClusterError::Fenced {
                partition,
                owner,
                fencing,
            } => write!(
                f,
                "partition {partition} is not this node's under this token (owner {}, token \
                 {fencing})",
                owner.as_deref().unwrap_or("none")
            ),
            ClusterError::Invalid(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for ClusterError {}

impl ClusterError {
    /// Worth trying again as it was (after reconnecting, for a lost connection): a deadlock or
    /// serialization failure, a lock or statement timeout, a connection closed.
    pub fn is_retryable(&self) -> bool {
        use postgres::error::SqlState;
        match self {
            ClusterError::Database(e) => {
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        [
                            SqlState::T_R_DEADLOCK_DETECTED,
                            SqlState::T_R_SERIALIZATION_FAILURE,
                            SqlState::LOCK_NOT_AVAILABLE,
                            SqlState::QUERY_CANCELED,
                            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        ]
                        .contains(c)
                    })
            }
            _ => false,
        }
    }
}

impl From<postgres::Error> for ClusterError {
    fn from(e: postgres::Error) -> Self {
        ClusterError::Database(e)
    }
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// The partition a grouping key belongs to: the first 8 bytes of its SHA-256, big-endian, mod
/// `partitions` (the same digest names the patient's folder). `partitions` 0 is taken as 1.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let d = Sha256::digest(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// A partition this node owns, with the fencing token it owns it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owned {
    pub partition: u32,
    pub fencing: i64,
}

/// What a cluster batch was claimed for, kept as its first stage in `dicomgate_batches`, so
/// that an owner adopting it runs it as it was claimed (an expired patient is never processed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Processed and exported (stage `claimed`).
    Process,
    /// Expired, its instances deleted by the nodes that stored them (stage `expire-delete`).
    ExpireDelete,
    /// Expired, its instances moved to the owner's `expired/` (stage `expire-move`).
    ExpireMove,
}

impl BatchKind {
    /// The stage a batch of this kind is claimed in.
    pub fn stage(self) -> &'static str {
        match self {
            BatchKind::Process => "claimed",
            BatchKind::ExpireDelete => "expire-delete",
            BatchKind::ExpireMove => "expire-move",
        }
    }

    /// The kind of a batch not done, by its stage (`None`: `done`, or no stage of a kind).
    pub fn of_stage(stage: &str) -> Option<BatchKind> {
        [
            BatchKind::Process,
            BatchKind::ExpireDelete,
            BatchKind::ExpireMove,
        ]
        .into_iter()
        .find(|k| k.stage() == stage)
    }
}

/// One instance record as a node publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The node that acknowledged it (whose segment log or files hold it).
    pub node_id: String,
    pub sop_instance_uid: String,
    pub grouping_key: Vec<u8>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    /// Where its bytes are, relative to that node's folder under the shared folder.
    pub location: String,
    pub bytes: u64,
    /// Bit i: `[[input]]` i accepts it.
    pub inputs: u64,
    pub received_ms: u64,
    /// What the rules read besides the UIDs (`patients::InstanceRecord`'s fields of the same
    /// names), so that a partition's owner decides as the storing node would have.
    pub study_date: Option<String>,
    pub instance_number: u32,
    pub images_in_acquisition: u32,
    pub number_of_slices: u32,
}

pub use crate::config::check_node_id;

/// One node's connection to the cluster database.
pub struct Coordinator {
    client: Client,
    node_id: String,
    partitions: u32,
    lease: Duration,
    /// This process has joined (its first rebalance raised the tokens of what its node id
    /// owned: see [`Coordinator::rebalance`]).
    joined: bool,
    /// The lease its last committed rebalance set (database time).
    lease_until: Option<std::time::SystemTime>,
    /// This connection has run `LISTEN` ([`Coordinator::partitions_moved`]).
    listening: bool,
    /// This node's count of the writes its outbox committed (`dicomgate_nodes.commits`:
    /// publication rounds, open-association counts), as its last write or renewal read it
    /// (`None` before the first).
    commits: Option<i64>,
    /// The database was found to have lost commits this process saw, not yet taken
    /// ([`Coordinator::take_rewind`]).
    rewind: Option<Rewind>,
}

/// The cluster database holds fewer of this node's outbox writes (publication rounds,
/// open-association counts) than this process saw committed: it lost commits (a failover to a
/// standby that had not received them, a restore from a backup). What those wrote must be
/// written again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    /// The count this process last saw committed.
    pub saw: i64,
    /// The count the database holds now (before this write's own, when a write found it).
    pub holds: i64,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Applies every migration the database lacks, in one transaction under an advisory lock (so
/// nodes starting at once apply each once). Returns the schema version now in place.
pub fn migrate(client: &mut Client) -> Result<i32> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('dicomgate_schema'))",
        &[],
    )?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS dicomgate_schema (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let have: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM dicomgate_schema",
            &[],
        )?
        .get(0);
    if have > SCHEMA_VERSION {
        return Err(ClusterError::SchemaTooNew {
            database: have,
            build: SCHEMA_VERSION,
        });
    }
    for (version, name, sql) in MIGRATIONS {
        if *version > have {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO dicomgate_schema (version, name) VALUES ($1, $2)",
                &[version, name],
            )?;
        }
    }
    tx.commit()?;
    Ok(SCHEMA_VERSION.max(have))
}

/// A connection to `db` set up for a node with leases of `lease`: timeouts, keepalives, and
/// the session's limits on idle transactions, lock waits and statements.
fn open_client(db: &Database, lease: Duration) -> Result<Client> {
    let mut config: postgres::Config = db.conninfo.parse()?;
    if let Some(path) = &db.password_file {
        config.password(crate::config::read_password_file(path).map_err(ClusterError::Invalid)?);
    }
    // A node that stops answering (paused, cut off) must not hold others' locks for the
    // hours TCP takes to notice: its connection is given up within a lease, a transaction
    // it leaves open is ended by the server, and nobody waits on a lock for longer than
    // half a lease (the caller retries: `ClusterError::is_retryable`).
    config
        // A connection attempt ends within 3 s (at most a lease): a node stopping must not
        // wait longer for a database that does not answer.
        .connect_timeout(lease.min(Duration::from_secs(3)))
        .tcp_user_timeout(lease)
        .keepalives(true)
        .keepalives_idle((lease / 2).max(Duration::from_secs(1)))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3);
    let mut client = match &db.tls {
        None => config.connect(NoTls)?,
        Some(tls) => {
            config.ssl_mode(postgres::config::SslMode::Require);
            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                tls.as_ref().clone(),
            ))?
        }
    };
    let half = (lease / 2).as_millis().max(1);
    client.batch_execute(&format!(
        "SET idle_in_transaction_session_timeout = {half};
             SET lock_timeout = {half};
             SET statement_timeout = {}",
        lease.as_millis().max(1)
    ))?;
    Ok(client)
}

/// How to reach the cluster database: the connection string, TLS (`[cluster] tls_ca`), and
/// where the password is (`[cluster] password_file`). Its `Debug` shows no secret.
#[derive(Clone)]
pub struct Database {
    pub conninfo: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub password_file: Option<std::path::PathBuf>,
}

impl Database {
    /// A plain connection with what `conninfo` says.
    pub fn plain(conninfo: &str) -> Database {
        Database {
            conninfo: conninfo.to_string(),
            tls: None,
            password_file: None,
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("conninfo", &crate::config::redact_password(&self.conninfo))
            .field("tls", &self.tls.is_some())
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl Coordinator {
    /// Connects (`conninfo`: a libpq connection string, e.g. `host=/run/postgresql
    /// dbname=dicomgate user=dicomgate`), migrates, and makes or checks the partition table.
    /// Does not join: the first [`Coordinator::rebalance`] does.
    pub fn connect(
        conninfo: &str,
        node_id: &str,
        partitions: u32,
        lease: Duration,
    ) -> Result<Coordinator> {
        Coordinator::connect_to(&Database::plain(conninfo), node_id, partitions, lease)
    }

    /// [`Coordinator::connect`] to `db`: over TLS when it has a TLS configuration
    /// (`[cluster] tls_ca`): then the connection must be TLS whatever `sslmode` says (a
    /// server that answers the TLS request with "no" is refused, not talked to in plain
    /// text; `sslmode=disable` with `tls_ca` is refused at start-up), and rustls verifies the
    /// server's certificate chain against the CA and its subjectAltName against the
    /// connection's `host` (libpq's `verify-full`, less its fallback to the CN).
    /// With a password file, the password is read from it now (a rotated password is used
    /// from the next connection on).
    pub fn connect_to(
        db: &Database,
        node_id: &str,
        partitions: u32,
        lease: Duration,
    ) -> Result<Coordinator> {
        check_node_id(node_id).map_err(ClusterError::Invalid)?;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(ClusterError::Invalid(format!(
                "partitions {partitions}: use 1 to {MAX_PARTITIONS}"
            )));
        }
        if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
            return Err(ClusterError::Invalid(format!(
                "lease of {lease:?}: use 1 s to 1 h"
            )));
        }
        let mut client = open_client(db, lease)?;
        migrate(&mut client)?;
        let mut c = Coordinator {
            client,
            node_id: node_id.to_string(),
            partitions,
            lease,
            joined: false,
            lease_until: None,
            listening: false,
            commits: None,
            rewind: None,
        };
        c.ensure_partitions()?;
        Ok(c)
    }

    /// A new connection to `db` for this coordinator, after its connection failed (the
    /// database restarted, the network dropped it, a statement timed out), as the same
    /// incarnation: what it joined stays joined, so its next rebalance does not raise the
    /// tokens of the partitions it owns (that fences a *previous process* of its node id, not
    /// this one; re-tokening at every reconnection would also make it adopt its own batches
    /// in flight, processing them twice). The schema is checked again (the database may have
    /// been restored).
    pub fn reconnect(&mut self, db: &Database) -> Result<()> {
        let mut client = open_client(db, self.lease)?;
        migrate(&mut client)?;
        self.client = client;
        self.listening = false;
        self.ensure_partitions()
    }

    /// Whether this connection to the database is TLS, as the server sees it
    /// (`pg_stat_ssl`).
    pub fn tls_in_use(&mut self) -> Result<bool> {
        Ok(self
            .client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )?
            .get(0))
    }

    /// The lease this node's last committed rebalance set, in database time (`None` before
    /// the first).
    pub fn lease_until(&self) -> Option<std::time::SystemTime> {
        self.lease_until
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The first node fixes the partition count and makes the rows; later ones must agree.
    fn ensure_partitions(&mut self) -> Result<()> {
        let mut tx = self.client.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('dicomgate_partitions'))",
            &[],
        )?;
        let n = self.partitions.to_string();
        tx.execute(
            "INSERT INTO dicomgate_settings (name, value) VALUES ('partitions', $1)
             ON CONFLICT (name) DO NOTHING",
            &[&n],
        )?;
        let cluster: String = tx
            .query_one(
                "SELECT value FROM dicomgate_settings WHERE name = 'partitions'",
                &[],
            )?
            .get(0);
        if cluster != n {
            return Err(ClusterError::PartitionsDiffer {
                cluster: cluster.parse().unwrap_or(0),
                configured: self.partitions,
            });
        }
        tx.execute(
            "INSERT INTO dicomgate_partitions (partition)
             SELECT generate_series(0, $1 - 1) ON CONFLICT (partition) DO NOTHING",
            &[&(self.partitions as i32)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Ends this node's lease at once and gives up its partitions (a clean stop): the others
    /// take them at their next rebalance without waiting for the lease to run out. Their
    /// unfinished batches are adopted by the new owners (so stop processing first).
    ///
    /// `published_all`: this node published every record it holds (nothing is queued, nothing
    /// was left out). Then nobody needs to take it over ([`Coordinator::next_takeover`]) until
    /// it has come back and died; otherwise another node publishes its records from its
    /// folder once its lease has run out for a lease.
    pub fn leave(&mut self, published_all: bool) -> Result<()> {
        let mut tx = self.client.transaction()?;
        tx.execute(
            "UPDATE dicomgate_partitions SET owner = NULL, since = statement_timestamp()
             WHERE owner = $1",
            &[&self.node_id],
        )?;
        tx.execute(
            "UPDATE dicomgate_nodes SET lease_until = statement_timestamp() - make_interval(secs => $2),
                 taken_over = CASE WHEN $3 THEN statement_timestamp() - make_interval(secs => $2)
                                   ELSE taken_over END
             WHERE node_id = $1",
            &[&self.node_id, &self.lease.as_secs_f64(), &published_all],
        )?;
        tx.commit()?;
        self.notify_moved();
        Ok(())
    }

    /// Tells the other nodes that this one moved partitions ([`Coordinator::partitions_moved`]),
    /// after the change committed and in a statement of its own: a full notification queue
    /// (PostgreSQL's is server-wide) or a server that refuses NOTIFY must not fail a renewal
    /// or a leave, only make the others wait for their next renewal.
    fn notify_moved(&mut self) {
        if let Err(e) = self.client.execute(
            "SELECT pg_notify('dicomgate_partitions', $1)",
            &[&self.node_id],
        ) {
            tracing::debug!(error = %e, "cluster: could not tell the other nodes of a partition move");
        }
    }

    /// Whether another node moved partitions since the last call (it joined, left, or its
    /// rebalance gave or took some): then this node should rebalance now, not at its next
    /// renewal, so that what a join or a clean leave frees is taken at once. Each such change,
    /// once committed, sends `NOTIFY dicomgate_partitions` with its node id (PostgreSQL's
    /// LISTEN/NOTIFY; [`Coordinator::notify_moved`]). The first call on a connection starts listening and answers true
    /// (what moved before is not known). It waits a millisecond at most for what the
    /// connection has received.
    pub fn partitions_moved(&mut self) -> Result<bool> {
        if !self.listening {
            self.client.batch_execute("LISTEN dicomgate_partitions")?;
            self.listening = true;
            return Ok(true);
        }
        let mut moved = false;
        let mut pending = self.client.notifications();
        // `iter()` polls the connection once without letting the client's runtime read the
        // socket, so on an idle connection it finds only what an earlier statement already
        // read; a timeout of a millisecond gives the runtime its turn.
        let mut it = pending.timeout_iter(std::time::Duration::from_millis(1));
        while let Some(n) = it.next()? {
            moved |= n.payload() != self.node_id;
        }
        Ok(moved)
    }

    /// The live nodes, sorted by id.
    pub fn live_nodes(&mut self) -> Result<Vec<String>> {
        Ok(self
            .client
            .query(
                "SELECT node_id FROM dicomgate_nodes WHERE lease_until > statement_timestamp()
                 ORDER BY node_id",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The partitions this node owns now, with their tokens.
    pub fn owned(&mut self) -> Result<Vec<Owned>> {
        owned_by(&mut self.client, &self.node_id)
    }

    /// Renews this node's lease (live until `statement_timestamp() + lease`, database time),
    /// moves its share of the partitions toward its quota (see the module doc), and returns what
    /// it owns afterwards, all in one transaction. Call it every third of a lease or so: it is
    /// the heartbeat too, so a node that does not rebalance is not live.
    ///
    /// The first call of a [`Coordinator`] joins: it raises the token of every partition this
    /// node id still owns, so that a previous process under the same id (restarted, or paused
    /// and replaced) is fenced off, and its unfinished batches can be adopted.
    pub fn rebalance(&mut self) -> Result<Vec<Owned>> {
        let me = self.node_id.clone();
        let lease = self.lease.as_secs_f64();
        let mut tx = self.client.transaction()?;
        let rows = tx.query(
            "SELECT partition, owner FROM dicomgate_partitions ORDER BY partition FOR UPDATE",
            &[],
        )?;
        // Not live before this renewal (new, restarted after its lease ran out, or back from a
        // pause or a cut): it joins, which changes every quota even when it takes nothing yet.
        let was_live = tx
            .query_opt(
                "SELECT lease_until > statement_timestamp() FROM dicomgate_nodes
                 WHERE node_id = $1",
                &[&me],
            )?
            .is_some_and(|r| r.get::<_, bool>(0));
        let renewed = tx.query_one(
            "INSERT INTO dicomgate_nodes (node_id, lease_until)
             VALUES ($1, statement_timestamp() + make_interval(secs => $2))
             ON CONFLICT (node_id) DO UPDATE SET lease_until = EXCLUDED.lease_until
             RETURNING lease_until, commits",
            &[&me, &lease],
        )?;
        let (lease_until, commits): (std::time::SystemTime, i64) = (renewed.get(0), renewed.get(1));
        if !self.joined {
            tx.execute(
                "UPDATE dicomgate_partitions SET fencing = fencing + 1 WHERE owner = $1",
                &[&me],
            )?;
        }
        // Members: nodes live, or whose lease ran out less than a lease ago. Quotas count them
        // all, so that when every lease lapsed at once (a database failover, a pause of the
        // whole site) the first node back takes its own share, not everything; only live
        // nodes may own.
        let members: Vec<(String, bool)> = tx
            .query(
                "SELECT node_id, lease_until > statement_timestamp() FROM dicomgate_nodes
                 WHERE lease_until > statement_timestamp() - make_interval(secs => $1)
                 ORDER BY node_id",
                &[&lease],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let owners: Vec<Option<String>> = rows.iter().map(|r| r.get(1)).collect();
        let partition = |i: &usize| -> i32 { rows[*i].get(0) };
        let mut moved = !was_live;
        match plan(&me, &members, &owners) {
            Move::Give { mine, n } => {
                let mine: Vec<i32> = mine.iter().map(partition).collect();
                // Hand over only partitions with no unfinished batch: the new owner would
                // adopt one while this node still processes it. Busy ones go once their
                // batches are done.
                let busy: Vec<i32> = tx
                    .query(
                        "SELECT DISTINCT partition FROM dicomgate_batches
                         WHERE partition = ANY($1) AND stage <> 'done'",
                        &[&mine],
                    )?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let give: Vec<i32> = mine
                    .iter()
                    .rev()
                    .filter(|p| !busy.contains(p))
                    .take(n)
                    .copied()
                    .collect();
                tx.execute(
                    "UPDATE dicomgate_partitions SET owner = NULL, since = statement_timestamp()
                     WHERE partition = ANY($1) AND owner = $2",
                    &[&give, &me],
                )?;
                moved |= !give.is_empty();
            }
            Move::Take(free) => {
                let take: Vec<i32> = free.iter().map(partition).collect();
                tx.execute(
                    "UPDATE dicomgate_partitions
                     SET owner = $2, fencing = fencing + 1, since = statement_timestamp()
                     WHERE partition = ANY($1)",
                    &[&take, &me],
                )?;
                moved = true;
            }
            Move::Keep => {}
        }
        let owned = owned_by(&mut tx, &me)?;
        tx.commit()?;
        self.joined = true;
        self.lease_until = Some(lease_until);
        self.saw_commits(commits, commits);
        if moved {
            self.notify_moved();
        }
        Ok(owned)
    }

    /// Publishes records in one statement (one round trip, however many records); returns how
    /// many rows were written (new or replaced). Idempotent by (node, SOP Instance UID): a row
    /// already there unchanged is not written (a batch's claim on it stays), and a row is only
    /// replaced by a copy stored at the same time or later (`received_ms`), so an older copy
    /// published after a newer one (two ingest threads, or recovery finding both copies of a
    /// re-sent instance) never takes its place. Within `records`, the newest copy of each
    /// instance is the one sent.
    pub fn publish(&mut self, records: &[Published]) -> Result<u64> {
        let mut newest: std::collections::HashMap<(&str, &str), &Published> =
            std::collections::HashMap::with_capacity(records.len());
        for r in records {
            let k = (r.node_id.as_str(), r.sop_instance_uid.as_str());
            match newest.get(&k) {
                Some(have) if have.received_ms > r.received_ms => {}
                _ => {
                    newest.insert(k, r);
                }
            }
        }
        let n = newest.len();
        let mut cols = PublishColumns::with_capacity(n);
        for r in newest.into_values() {
            cols.node.push(r.node_id.as_str());
            cols.uid.push(r.sop_instance_uid.as_str());
            cols.part
                .push(partition_of(&r.grouping_key, self.partitions) as i32);
            cols.key.push(r.grouping_key.as_slice());
            cols.study.push(r.study_uid.as_deref());
            cols.series.push(r.series_uid.as_deref());
            cols.loc.push(r.location.as_str());
            cols.bytes.push(to_i64(r.bytes, "bytes")?);
            cols.inputs.push(r.inputs as i64);
            cols.received.push(to_i64(r.received_ms, "received_ms")?);
            cols.date.push(r.study_date.as_deref());
            cols.number.push(clamp_i32(r.instance_number));
            cols.images.push(clamp_i32(r.images_in_acquisition));
            cols.slices.push(clamp_i32(r.number_of_slices));
        }
        if cols.node.is_empty() {
            return Ok(0);
        }
        let c = &cols;
        // A row changed by this publication is pending again with a new `seq` (the owner's
        // feed reads by it); one unchanged is not written at all. Only the fields the rules
        // read differing (a row published before schema version 4 had them, republished
        // at a restart) are filled in without making it pending again.
        // The round is counted in the same statement (so in the same commit): the count
        // falling below what this process saw means the database lost commits
        // ([`Coordinator::take_rewind`]). `NULL` when this node has no row yet (it has not
        // joined: nothing to compare). A takeover's rounds count as the taker's.
        let row = self.client.query_one(
            &"WITH written AS (
             INSERT INTO dicomgate_instances (node_id, sop_instance_uid, partition, grouping_key,
                 study_uid, series_uid, location, bytes, inputs, received_ms, study_date,
                 instance_number, images_in_acquisition, number_of_slices)
             SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bytea[],
                 $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                 $11::text[], $12::integer[], $13::integer[], $14::integer[])
             ON CONFLICT (node_id, sop_instance_uid) DO UPDATE SET
                 partition = EXCLUDED.partition, grouping_key = EXCLUDED.grouping_key,
                 study_uid = EXCLUDED.study_uid, series_uid = EXCLUDED.series_uid,
                 location = EXCLUDED.location, bytes = EXCLUDED.bytes,
                 inputs = EXCLUDED.inputs, received_ms = EXCLUDED.received_ms,
                 study_date = EXCLUDED.study_date, instance_number = EXCLUDED.instance_number,
                 images_in_acquisition = EXCLUDED.images_in_acquisition,
                 number_of_slices = EXCLUDED.number_of_slices,
                 batch_id = CASE WHEN {CHANGED} THEN NULL ELSE dicomgate_instances.batch_id END,
                 seq = CASE WHEN {CHANGED} THEN nextval('dicomgate_instances_seq')
                       ELSE dicomgate_instances.seq END
             WHERE EXCLUDED.received_ms >= dicomgate_instances.received_ms
               AND ({CHANGED}
                 OR (dicomgate_instances.study_date, dicomgate_instances.instance_number,
                     dicomgate_instances.images_in_acquisition,
                     dicomgate_instances.number_of_slices)
                    IS DISTINCT FROM (EXCLUDED.study_date, EXCLUDED.instance_number,
                     EXCLUDED.images_in_acquisition, EXCLUDED.number_of_slices))
             RETURNING 1),
             counted AS (UPDATE dicomgate_nodes SET commits = commits + 1
                 WHERE node_id = $15 RETURNING commits)
             SELECT (SELECT count(*) FROM written), (SELECT commits FROM counted)"
                .replace(
                    "{CHANGED}",
                    "(dicomgate_instances.partition, dicomgate_instances.grouping_key,
                    dicomgate_instances.study_uid, dicomgate_instances.series_uid,
                    dicomgate_instances.location, dicomgate_instances.bytes,
                    dicomgate_instances.inputs, dicomgate_instances.received_ms)
                 IS DISTINCT FROM (EXCLUDED.partition, EXCLUDED.grouping_key,
                    EXCLUDED.study_uid, EXCLUDED.series_uid, EXCLUDED.location,
                    EXCLUDED.bytes, EXCLUDED.inputs, EXCLUDED.received_ms)",
                ),
            &[
                &c.node,
                &c.uid,
                &c.part,
                &c.key,
                &c.study,
                &c.series,
                &c.loc,
                &c.bytes,
                &c.inputs,
                &c.received,
                &c.date,
                &c.number,
                &c.images,
                &c.slices,
                &self.node_id,
            ],
        )?;
        let (written, counted): (i64, Option<i64>) = (row.get(0), row.get(1));
        if let Some(after) = counted {
            self.saw_commits(after - 1, after);
        }
        Ok(written as u64)
    }

    /// Counts an outbox write in its transaction `tx` (see [`Coordinator::publish`]): the
    /// count after it, for [`Coordinator::saw_commits`] once `tx` committed.
    fn count_commit(tx: &mut postgres::Transaction<'_>, me: &str) -> Result<Option<i64>> {
        Ok(tx
            .query_opt(
                "UPDATE dicomgate_nodes SET commits = commits + 1 WHERE node_id = $1
                 RETURNING commits",
                &[&me],
            )?
            .map(|r| r.get(0)))
    }

    /// What a write or a renewal read of this node's commit count: the database held `before`
    /// of its writes (before the write's own), and holds `after` now. Fewer than this process
    /// saw committed: the database lost commits (a [`Rewind`]). Two processes of one node id
    /// (a deposed one not yet stopped) only ever raise the count, so neither sees it fall.
    fn saw_commits(&mut self, before: i64, after: i64) {
        if let Some(saw) = self.commits.filter(|&saw| before < saw) {
            let r = self.rewind.get_or_insert(Rewind { saw, holds: before });
            r.saw = r.saw.max(saw);
            r.holds = r.holds.min(before);
        }
        self.commits = Some(after);
    }

    /// The database lost commits this process saw (found by the last write or renewal), if it
    /// did since the last call: every record published in the rounds it lost must be
    /// published again, and its open-association counts written again.
    pub fn take_rewind(&mut self) -> Option<Rewind> {
        self.rewind.take()
    }

    /// Claims every pending record of `key` as batch `batch_id` (to be processed), if this node
    /// owns the key's partition under `owned.fencing` and its lease runs. `Ok(None)`: nothing
    /// pending. The records come back one per SOP Instance UID (the newest, when two nodes
    /// acknowledged the same instance; the older copies are marked with the batch too, and so
    /// are done with it).
    pub fn claim(
        &mut self,
        owned: Owned,
        key: &[u8],
        batch_id: &str,
    ) -> Result<Option<Vec<Published>>> {
        self.claim_rows(owned, key, batch_id, BatchKind::Process, None)
    }

    /// [`claim`](Coordinator::claim) of only these instances of `key` (SOP Instance UID, and
    /// the newest `received_ms` of a copy to take): what the owner's patient map claimed. A
    /// record published since the owner last read (a new instance, a newer copy) stays
    /// pending: an expiry never takes an instance its owner did not see, and a batch holds
    /// what its rules counted.
    pub fn claim_instances(
        &mut self,
        owned: Owned,
        key: &[u8],
        batch_id: &str,
        kind: BatchKind,
        instances: &[(&str, u64)],
    ) -> Result<Option<Vec<Published>>> {
        self.claim_rows(owned, key, batch_id, kind, Some(instances))
    }

    fn claim_rows(
        &mut self,
        owned: Owned,
        key: &[u8],
        batch_id: &str,
        kind: BatchKind,
        instances: Option<&[(&str, u64)]>,
    ) -> Result<Option<Vec<Published>>> {
        if partition_of(key, self.partitions) != owned.partition {
            return Err(ClusterError::Invalid(format!(
                "the key belongs to partition {}, not {}",
                partition_of(key, self.partitions),
                owned.partition
            )));
        }
        let me = self.node_id.clone();
        let mut tx = self.client.transaction()?;
        check_owner(&mut tx, &me, owned)?;
        let rows = match instances {
            None => tx.query(
                &format!(
                    "UPDATE dicomgate_instances SET batch_id = $3
                     WHERE partition = $1 AND grouping_key = $2 AND batch_id IS NULL
                     RETURNING {PUBLISHED_COLUMNS}"
                ),
                &[&(owned.partition as i32), &key, &batch_id],
            )?,
            Some(list) => {
                let uid: Vec<&str> = list.iter().map(|i| i.0).collect();
                let newest: Vec<i64> = list
                    .iter()
                    .map(|i| i64::try_from(i.1).unwrap_or(i64::MAX))
                    .collect();
                tx.query(
                    &format!(
                        "UPDATE dicomgate_instances i SET batch_id = $3
                         FROM unnest($4::text[], $5::bigint[]) AS s(uid, newest)
                         WHERE i.partition = $1 AND i.grouping_key = $2 AND i.batch_id IS NULL
                           AND i.sop_instance_uid = s.uid AND i.received_ms <= s.newest
                         RETURNING {}",
                        columns_of("i")
                    ),
                    &[&(owned.partition as i32), &key, &batch_id, &uid, &newest],
                )?
            }
        };
        if rows.is_empty() {
            tx.rollback()?;
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO dicomgate_batches (batch_id, partition, grouping_key, owner, fencing,
                 stage)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &batch_id,
                &(owned.partition as i32),
                &key,
                &me,
                &owned.fencing,
                &kind.stage(),
            ],
        )
        .map_err(|e| {
            if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                ClusterError::Invalid(format!("batch id {batch_id} is already used"))
            } else {
                ClusterError::Database(e)
            }
        })?;
        tx.commit()?;
        Ok(Some(newest_per_uid(
            rows.iter().map(published_of).collect(),
        )))
    }

    /// The records of batch `batch_id` (one per SOP Instance UID, the newest copy), to
    /// rebuild an adopted batch whose previous owner held its files.
    pub fn batch_records(&mut self, batch_id: &str) -> Result<Vec<Published>> {
        let rows = self.client.query(
            &format!("SELECT {PUBLISHED_COLUMNS} FROM dicomgate_instances WHERE batch_id = $1"),
            &[&batch_id],
        )?;
        Ok(newest_per_uid(rows.iter().map(published_of).collect()))
    }

    /// The owner's feed (issue 15 part 3): at most `limit` pending records of `partitions`
    /// whose publication number is above `after`, in that order, each with its number. A
    /// transaction that took a smaller number can commit after one that took a larger, so a
    /// reader that only moves forward may miss a record: read from 0 again now and then.
    pub fn pending_records(
        &mut self,
        partitions: &[u32],
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Published)>> {
        let parts: Vec<i32> = partitions.iter().map(|&p| p as i32).collect();
        let rows = self.client.query(
            &format!(
                "SELECT seq, {PUBLISHED_COLUMNS} FROM dicomgate_instances
                 WHERE partition = ANY($1) AND batch_id IS NULL AND seq > $2
                 ORDER BY seq LIMIT $3"
            ),
            &[&parts, &after, &limit],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), published_at(r, 1)))
            .collect())
    }

    /// At most `limit` of this node's records whose batch is done (processed and exported, or
    /// expired, by whichever node owned it), each with its batch, in (batch, SOP Instance UID)
    /// order after `after` (`("", "")`: from the first): the copies this node may release from
    /// its own storage, and then [`Coordinator::forget`]. Paged so that records kept (a newer
    /// copy is stored here) never hide the ones after them.
    pub fn finished_here(
        &mut self,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<(Published, String)>> {
        let rows = self.client.query(
            &format!(
                "SELECT i.batch_id, {} FROM dicomgate_instances i
                 JOIN dicomgate_batches b ON b.batch_id = i.batch_id
                 WHERE i.node_id = $1 AND b.stage = 'done'
                   AND (i.batch_id, i.sop_instance_uid) > ($3, $4)
                 ORDER BY i.batch_id, i.sop_instance_uid LIMIT $2",
                columns_of("i")
            ),
            &[&self.node_id, &limit, &after.0, &after.1],
        )?;
        Ok(rows
            .iter()
            .map(|r| (published_at(r, 1), r.get::<_, String>(0)))
            .collect())
    }

    /// Deletes this node's rows of `released` (SOP Instance UID, batch, `received_ms`), each
    /// only while it is still that copy in that batch (a re-send published meanwhile made it
    /// pending again: it stays), then the done batches no row names any more. Returns the rows
    /// deleted.
    pub fn forget(&mut self, released: &[(String, String, u64)]) -> Result<u64> {
        let uid: Vec<&str> = released.iter().map(|r| r.0.as_str()).collect();
        let batch: Vec<&str> = released.iter().map(|r| r.1.as_str()).collect();
        let received: Vec<i64> = released
            .iter()
            .map(|r| to_i64(r.2, "received_ms"))
            .collect::<Result<_>>()?;
        // READ COMMITTED whatever the database's default: the last statement must see what
        // a forgetter that held the lock before committed.
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::ReadCommitted)
            .start()?;
        // Every storing node of a batch forgets its own rows, and the last one deletes the
        // batch. Without this lock two of them at once each still see the other's rows (its
        // deletion not yet committed) and both leave the batch row, for ever. Locked in one
        // order (no deadlock between forgetters); only done batches, which nothing else
        // changes.
        let mut batches: Vec<&str> = batch.clone();
        batches.sort_unstable();
        batches.dedup();
        tx.execute(
            "SELECT 1 FROM dicomgate_batches WHERE batch_id = ANY($1) AND stage = 'done'
             ORDER BY batch_id FOR UPDATE",
            &[&batches],
        )?;
        let n = tx.execute(
            "DELETE FROM dicomgate_instances i USING unnest($2::text[], $3::text[], $4::bigint[])
                 AS r(uid, batch, received)
             WHERE i.node_id = $1 AND i.sop_instance_uid = r.uid AND i.batch_id = r.batch
               AND i.received_ms = r.received",
            &[&self.node_id, &uid, &batch, &received],
        )?;
        // Every done batch no row names, not only these: a re-send's publication makes a
        // row of a done batch pending again (it leaves the batch), and when that was the
        // batch's last row nothing else would delete it.
        // (Those another forgetter holds are its to delete: skipped, never waited for, so two
        // forgetters never wait on each other here.)
        tx.execute(
            "DELETE FROM dicomgate_batches WHERE batch_id IN (
                 SELECT b.batch_id FROM dicomgate_batches b WHERE b.stage = 'done'
                   AND NOT EXISTS (SELECT 1 FROM dicomgate_instances i
                                   WHERE i.batch_id = b.batch_id)
                 FOR UPDATE SKIP LOCKED)",
            &[],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Whether another node holds the takeover of this node (its hold not yet run out): it may
    /// still publish rounds of this node's records from a listing made before this node came
    /// back, so this node must not release copies meanwhile (`Outbox::release_gate`).
    pub fn being_taken_over(&mut self) -> Result<bool> {
        Ok(self
            .client
            .query_one(
                "SELECT coalesce((SELECT takeover_by IS NOT NULL
                                         AND takeover_until > statement_timestamp()
                                  FROM dicomgate_nodes WHERE node_id = $1), false)",
                &[&self.node_id],
            )?
            .get(0))
    }

    /// The largest publication number (`seq`) of this node's rows (0 when none).
    pub fn own_max_seq(&mut self) -> Result<i64> {
        Ok(self
            .client
            .query_one(
                "SELECT coalesce(max(seq), 0) FROM dicomgate_instances WHERE node_id = $1",
                &[&self.node_id],
            )?
            .get(0))
    }

    /// The locations of this node's rows numbered at most `through_seq` that are not in
    /// `present` (after a rewind: candidates for rows whose copies this node had released,
    /// `cluster::outbox`).
    pub fn absent_rows(&mut self, through_seq: i64, present: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .client
            .query(
                "SELECT i.location FROM dicomgate_instances i
                 WHERE i.node_id = $1 AND i.seq <= $2
                   AND NOT EXISTS (SELECT 1 FROM unnest($3::text[]) AS p(location)
                                   WHERE p.location = i.location)",
                &[&self.node_id, &through_seq, &present],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Deletes this node's rows at `locations` numbered at most `through_seq` (a row made
    /// pending again since, by a re-send, has a larger number and stays); returns how many.
    /// The batches those rows made up lose them (a batch left with none has nothing to run).
    pub fn forget_rows_at(&mut self, through_seq: i64, locations: &[&str]) -> Result<u64> {
        if locations.is_empty() {
            return Ok(0);
        }
        Ok(self.client.execute(
            "DELETE FROM dicomgate_instances
             WHERE node_id = $1 AND seq <= $2 AND location = ANY($3)",
            &[&self.node_id, &through_seq, &locations],
        )?)
    }

    /// Takes over the batches of `owned.partition` that are not done and were claimed (or last
    /// adopted) under an older token: their previous owner lost the partition. Returns their
    /// ids, oldest claim first.
    pub fn adopt(&mut self, owned: Owned) -> Result<Vec<String>> {
        let me = self.node_id.clone();
        let mut tx = self.client.transaction()?;
        check_owner(&mut tx, &me, owned)?;
        let mut ids: Vec<(String, i64)> = tx
            .query(
                "UPDATE dicomgate_batches SET owner = $2, fencing = $3
                 WHERE partition = $1 AND stage <> 'done' AND fencing < $3
                 RETURNING batch_id, extract(epoch from claimed_at)::float8::bigint",
                &[&(owned.partition as i32), &me, &owned.fencing],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit()?;
        ids.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        Ok(ids.into_iter().map(|(id, _)| id).collect())
    }

    /// Moves batch `batch_id` of `owned.partition` to `stage` (`"done"` ends it), if this node
    /// still holds the batch under `owned.fencing`.
    pub fn set_stage(&mut self, owned: Owned, batch_id: &str, stage: &str) -> Result<()> {
        let me = self.node_id.clone();
        let mut tx = self.client.transaction()?;
        check_owner(&mut tx, &me, owned)?;
        let n = tx.execute(
            "UPDATE dicomgate_batches SET stage = $4
             WHERE batch_id = $1 AND partition = $2 AND owner = $3 AND fencing = $5",
            &[
                &batch_id,
                &(owned.partition as i32),
                &me,
                &stage,
                &owned.fencing,
            ],
        )?;
        if n == 0 {
            return Err(ClusterError::Invalid(format!(
                "batch {batch_id} is not this node's under token {} in partition {}",
                owned.fencing, owned.partition
            )));
        }
        tx.commit()?;
        Ok(())
    }

    /// The batches of `owned.partition` this node holds under `owned.fencing` that are not
    /// done, with what they were claimed for, oldest claim first: what the owner must be
    /// running (after [`adopt`](Coordinator::adopt), also its previous owners' batches).
    pub fn unfinished(&mut self, owned: Owned) -> Result<Vec<(String, BatchKind)>> {
        let rows = self.client.query(
            "SELECT batch_id, stage FROM dicomgate_batches
             WHERE partition = $1 AND owner = $2 AND fencing = $3 AND stage <> 'done'
             ORDER BY claimed_at, batch_id",
            &[&(owned.partition as i32), &self.node_id, &owned.fencing],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let stage: String = r.get(1);
                Some((r.get(0), BatchKind::of_stage(&stage)?))
            })
            .collect())
    }

    /// The stage of batch `batch_id`, the node that holds it, and the node that owns its
    /// partition now (`None`: nobody, between two owners), if the batch exists.
    pub fn batch_holder(
        &mut self,
        batch_id: &str,
    ) -> Result<Option<(String, String, Option<String>)>> {
        Ok(self
            .client
            .query_opt(
                "SELECT b.stage, b.owner, p.owner FROM dicomgate_batches b
                 LEFT JOIN dicomgate_partitions p ON p.partition = b.partition
                 WHERE b.batch_id = $1",
                &[&batch_id],
            )?
            .map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// The stage of batch `batch_id` and the node that holds it, if it exists.
    pub fn batch(&mut self, batch_id: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .client
            .query_opt(
                "SELECT stage, owner FROM dicomgate_batches WHERE batch_id = $1",
                &[&batch_id],
            )?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// Deletes this node's open-association rows but those of `keep` (what this process
    /// wrote): what a previous process reported died with it.
    pub fn clear_associations_except(&mut self, keep: &[Vec<u8>]) -> Result<()> {
        let mut tx = self.client.transaction()?;
        tx.execute(
            "DELETE FROM dicomgate_associations
             WHERE node_id = $1 AND NOT (grouping_key = ANY($2::bytea[]))",
            &[&self.node_id, &keep],
        )?;
        let counted = Coordinator::count_commit(&mut tx, &self.node_id)?;
        tx.commit()?;
        if let Some(after) = counted {
            self.saw_commits(after - 1, after);
        }
        Ok(())
    }

    /// Writes how many associations are open at this node per grouping key (each key once;
    /// 0 deletes its row), in one transaction.
    pub fn set_associations(&mut self, open: &[(Vec<u8>, u32)]) -> Result<()> {
        let (mut keys, mut parts, mut counts, mut closed) = (vec![], vec![], vec![], vec![]);
        for (key, n) in open {
            if *n == 0 {
                closed.push(key.clone());
            } else {
                keys.push(key.clone());
                parts.push(partition_of(key, self.partitions) as i32);
                counts.push(i32::try_from(*n).unwrap_or(i32::MAX));
            }
        }
        let mut tx = self.client.transaction()?;
        if !closed.is_empty() {
            tx.execute(
                "DELETE FROM dicomgate_associations
                 WHERE node_id = $1 AND grouping_key = ANY($2::bytea[])",
                &[&self.node_id, &closed],
            )?;
        }
        if !keys.is_empty() {
            tx.execute(
                "INSERT INTO dicomgate_associations (node_id, grouping_key, partition, open)
                 SELECT $1, k, p, n FROM unnest($2::bytea[], $3::integer[], $4::integer[])
                     AS s(k, p, n)
                 ON CONFLICT (node_id, grouping_key) DO UPDATE SET open = excluded.open",
                &[&self.node_id, &keys, &parts, &counts],
            )?;
        }
        let counted = Coordinator::count_commit(&mut tx, &self.node_id)?;
        tx.commit()?;
        if let Some(after) = counted {
            self.saw_commits(after - 1, after);
        }
        Ok(())
    }

    /// The grouping keys of `partitions` with an association open at a node that is live, or
    /// dead but not yet taken over (what it acknowledged may not all be published yet: see
    /// [`Coordinator::next_takeover`]). The rows of a node that left with everything published,
    /// or whose takeover finished, count as closed.
    pub fn open_keys(&mut self, partitions: &[u32]) -> Result<Vec<Vec<u8>>> {
        let parts: Vec<i32> = partitions.iter().map(|&p| p as i32).collect();
        Ok(self
            .client
            .query(
                "SELECT DISTINCT a.grouping_key FROM dicomgate_associations a
                 JOIN dicomgate_nodes n ON n.node_id = a.node_id
                 WHERE a.partition = ANY($1)
                   AND (n.lease_until > statement_timestamp()
                        OR n.taken_over IS DISTINCT FROM n.lease_until)",
                &[&parts],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Every pending record of the patients `keys`, each with its publication number.
    pub fn pending_of(&mut self, keys: &[Vec<u8>]) -> Result<Vec<(i64, Published)>> {
        let parts: Vec<i32> = keys
            .iter()
            .map(|k| partition_of(k, self.partitions) as i32)
            .collect();
        let rows = self.client.query(
            &format!(
                "SELECT seq, {PUBLISHED_COLUMNS} FROM dicomgate_instances
                 WHERE partition = ANY($2) AND grouping_key = ANY($1::bytea[])
                   AND batch_id IS NULL"
            ),
            &[&keys, &parts],
        )?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), published_at(r, 1)))
            .collect())
    }

    /// Writes this node's publication figures into its row, for every node's status page
    /// ([`Coordinator::nodes`]).
    pub fn report(&mut self, published: u64, unpublished: u64, lag_ms: u64) -> Result<()> {
        self.client.execute(
            "UPDATE dicomgate_nodes SET published = $2, unpublished = $3, lag_ms = $4
             WHERE node_id = $1",
            &[
                &self.node_id,
                &to_i64(published, "published")?,
                &to_i64(unpublished, "unpublished")?,
                &to_i64(lag_ms, "lag")?,
            ],
        )?;
        Ok(())
    }

    /// Every node of the cluster (live or not), with its partitions and what it last
    /// reported, by id.
    pub fn nodes(&mut self) -> Result<Vec<NodeRow>> {
        Ok(self
            .client
            .query(
                "SELECT n.node_id, n.lease_until > statement_timestamp(),
                        (extract(epoch FROM n.lease_until - statement_timestamp()) * 1000)::bigint,
                        (SELECT count(*) FROM dicomgate_partitions p WHERE p.owner = n.node_id),
                        n.published, n.unpublished, n.lag_ms
                 FROM dicomgate_nodes n ORDER BY n.node_id",
                &[],
            )?
            .iter()
            .map(|r| NodeRow {
                node_id: r.get(0),
                live: r.get(1),
                lease_left_ms: r.get(2),
                partitions: r.get(3),
                published: r.get(4),
                unpublished: r.get(5),
                lag_ms: r.get(6),
            })
            .collect())
    }

    /// Takes on the publication of a dead node's records, if one needs it: a node (not this
    /// one) whose lease ran out more than a lease ago (its partitions have moved), whose
    /// records were not taken over since (its `taken_over` is not its `lease_until`), and
    /// which no live taker is working on. This node then holds that work for
    /// [`TAKEOVER_LEASES`] leases, renewed by [`Coordinator::renew_takeover`]; should it die,
    /// another node takes the work once that ran out. The publication itself is idempotent, so
    /// two takers (one paused past its hold) cost time, never a wrong row.
    pub fn next_takeover(&mut self) -> Result<Option<Takeover>> {
        let lease = self.lease.as_secs_f64();
        let hold = lease * f64::from(TAKEOVER_LEASES);
        let row = self.client.query_opt(
            "UPDATE dicomgate_nodes
             SET takeover_by = $1, takeover_until = statement_timestamp() + make_interval(secs => $3)
             WHERE node_id = (
                 SELECT node_id FROM dicomgate_nodes
                 WHERE node_id <> $1
                   AND lease_until < statement_timestamp() - make_interval(secs => $2)
                   AND taken_over IS DISTINCT FROM lease_until
                   AND (takeover_until IS NULL OR takeover_until < statement_timestamp())
                 ORDER BY lease_until, node_id
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             RETURNING node_id, lease_until",
            &[&self.node_id, &lease, &hold],
        )?;
        Ok(row.map(|r| Takeover {
            node_id: r.get(0),
            lease_until: r.get(1),
        }))
    }

    /// Extends this node's hold on `t` (every third of a lease while it works); false when it
    /// is no longer this node's to do: another node took it after the hold ran out, or the
    /// dead node came back (renewed its lease, so it publishes its own). Stop then.
    pub fn renew_takeover(&mut self, t: &Takeover) -> Result<bool> {
        let hold = self.lease.as_secs_f64() * f64::from(TAKEOVER_LEASES);
        let n = self.client.execute(
            "UPDATE dicomgate_nodes
             SET takeover_until = statement_timestamp() + make_interval(secs => $3)
             WHERE node_id = $1 AND takeover_by = $2 AND lease_until = $4",
            &[&t.node_id, &self.node_id, &hold, &t.lease_until],
        )?;
        Ok(n == 1)
    }

    /// Records that `t`'s records are all published: the node is not taken over again until
    /// it has come back (renewed its lease) and died again. False (nothing recorded) when the
    /// hold is no longer this node's or the node came back meanwhile: a later death of it
    /// must be taken over afresh.
    pub fn finish_takeover(&mut self, t: &Takeover) -> Result<bool> {
        let n = self.client.execute(
            "UPDATE dicomgate_nodes
             SET taken_over = $3, takeover_by = NULL, takeover_until = NULL
             WHERE node_id = $1 AND takeover_by = $2 AND lease_until = $3",
            &[&t.node_id, &self.node_id, &t.lease_until],
        )?;
        Ok(n == 1)
    }
}

/// The columns a [`Published`] is read from, in [`published_at`]'s order.
const PUBLISHED_COLUMNS: &str = "node_id, sop_instance_uid, grouping_key, study_uid, \
    series_uid, location, bytes, inputs, received_ms, study_date, instance_number, \
    images_in_acquisition, number_of_slices";

/// [`PUBLISHED_COLUMNS`], each of table alias `alias`.
fn columns_of(alias: &str) -> String {
    PUBLISHED_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`publish`](Coordinator::publish)'s columns, one array each.
struct PublishColumns<'a> {
    node: Vec<&'a str>,
    uid: Vec<&'a str>,
    part: Vec<i32>,
    key: Vec<&'a [u8]>,
    study: Vec<Option<&'a str>>,
    series: Vec<Option<&'a str>>,
    loc: Vec<&'a str>,
    bytes: Vec<i64>,
    inputs: Vec<i64>,
    received: Vec<i64>,
    date: Vec<Option<&'a str>>,
    number: Vec<i32>,
    images: Vec<i32>,
    slices: Vec<i32>,
}

impl PublishColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        PublishColumns {
            node: Vec::with_capacity(n),
            uid: Vec::with_capacity(n),
            part: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
            study: Vec::with_capacity(n),
            series: Vec::with_capacity(n),
            loc: Vec::with_capacity(n),
            bytes: Vec::with_capacity(n),
            inputs: Vec::with_capacity(n),
            received: Vec::with_capacity(n),
            date: Vec::with_capacity(n),
            number: Vec::with_capacity(n),
            images: Vec::with_capacity(n),
            slices: Vec::with_capacity(n),
        }
    }
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn published_of(r: &postgres::Row) -> Published {
    published_at(r, 0)
}

/// A [`Published`] from [`PUBLISHED_COLUMNS`], starting at column `at`.
fn published_at(r: &postgres::Row, at: usize) -> Published {
    let n = |i: usize| r.get::<_, i32>(at + i).max(0) as u32;
    Published {
        node_id: r.get(at),
        sop_instance_uid: r.get(at + 1),
        grouping_key: r.get(at + 2),
        study_uid: r.get(at + 3),
        series_uid: r.get(at + 4),
        location: r.get(at + 5),
        bytes: r.get::<_, i64>(at + 6).max(0) as u64,
        inputs: r.get::<_, i64>(at + 7) as u64,
        received_ms: r.get::<_, i64>(at + 8).max(0) as u64,
        study_date: r.get(at + 9),
        instance_number: n(10),
        images_in_acquisition: n(11),
        number_of_slices: n(12),
    }
}

/// One record per SOP Instance UID: the newest copy (two nodes acknowledged it).
fn newest_per_uid(mut records: Vec<Published>) -> Vec<Published> {
    {
        records.sort_by(|a, b| {
            (
                a.sop_instance_uid.as_str(),
                std::cmp::Reverse(a.received_ms),
            )
                .cmp(&(
                    b.sop_instance_uid.as_str(),
                    std::cmp::Reverse(b.received_ms),
                ))
        });
        records.dedup_by(|later, first| later.sop_instance_uid == first.sop_instance_uid);
    }
    records
}

/// One node of the cluster as the database knows it ([`Coordinator::nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRow {
    pub node_id: String,
    /// Its lease runs (database time).
    pub live: bool,
    /// Milliseconds until its lease runs out (negative: since it ran out).
    pub lease_left_ms: i64,
    /// Partitions it owns.
    pub partitions: i64,
    /// As it reported at its last renewal ([`Coordinator::report`]): records published,
    /// records waiting, and the age of the oldest waiting (ms).
    pub published: i64,
    pub unpublished: i64,
    pub lag_ms: i64,
}

/// How many leases a taker holds a takeover before another node may do it instead (renewed
/// every third of a lease while it works).
pub const TAKEOVER_LEASES: u32 = 3;

/// A dead node whose records this node publishes from that node's folder
/// ([`Coordinator::next_takeover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub node_id: String,
    /// The dead node's `lease_until` when it was taken on: the death this takeover is for.
    pub lease_until: std::time::SystemTime,
}

/// What one rebalance of `me` changes ([`plan`]).
#[derive(Debug, PartialEq, Eq)]
enum Move {
    /// Hand over `n` of `me`'s partitions (`mine`: indexes into `owners`, in partition order),
    /// the last first: it owns more than its quota.
    Give {
        mine: Vec<usize>,
        n: usize,
    },
    /// Take these partitions (indexes into `owners`): free, or owned by a node not live.
    Take(Vec<usize>),
    Keep,
}

/// `me`'s rebalance among `members` (id, live; sorted by id), given each partition's owner:
/// give what is above its quota, or take free partitions (unowned, or owned by a node whose
/// lease ran out) up to it. Only live nodes may own; quotas count every member.
fn plan(me: &str, members: &[(String, bool)], owners: &[Option<String>]) -> Move {
    let live = |n: &str| members.iter().any(|(m, l)| m == n && *l);
    let quota = quota_of(me, members, owners);
    let mine: Vec<usize> = (0..owners.len())
        .filter(|&i| owners[i].as_deref() == Some(me))
        .collect();
    if mine.len() > quota {
        let n = mine.len() - quota;
        return Move::Give { mine, n };
    }
    let mine = mine.len();
    if mine < quota {
        // Unowned partitions and those of nodes no longer members first; a member in its
        // grace (lease ran out less than a lease ago) may still come back to them.
        let member = |n: &str| members.iter().any(|(m, _)| m == n);
        let (mut free, grace): (Vec<usize>, Vec<usize>) = owners
            .iter()
            .enumerate()
            .filter(|(_, o)| match o {
                Some(o) => o != me && !live(o),
                None => true,
            })
            .map(|(i, _)| i)
            .partition(|&i| owners[i].as_deref().is_none_or(|o| !member(o)));
        free.extend(grace);
        free.truncate(quota - mine);
        if !free.is_empty() {
            return Move::Take(free);
        }
    }
    Move::Keep
}

/// `me`'s quota among `members` (sorted by id) of `owners.len()` partitions: an even share,
/// the `partitions mod members` extra ones going to the members that own the most now (ties by
/// id), so that no more partitions move than the even shares require. While fewer members
/// than that hold more than the even share, any member may take one extra: otherwise, when
/// the members that the order names took their shares before the others caught up, the last
/// free partition would wait a whole renewal interval for the member the order names at the
/// end (as a dead node's partitions did: 2⅔ leases, not 2⅓).
fn quota_of(me: &str, members: &[(String, bool)], owners: &[Option<String>]) -> usize {
    let (p, n) = (owners.len(), members.len().max(1));
    let owned = |m: &str| owners.iter().filter(|o| o.as_deref() == Some(m)).count();
    let mut order: Vec<(usize, &str)> = members
        .iter()
        .map(|(m, _)| (owned(m), m.as_str()))
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let named = order.iter().take(p % n).any(|(_, m)| *m == me);
    let above = order.iter().filter(|(o, _)| *o > p / n).count();
    p / n + usize::from(named || above < p % n)
}

/// The partitions `node` owns, with their tokens, in partition order.
fn owned_by(c: &mut impl GenericClient, node: &str) -> Result<Vec<Owned>> {
    Ok(c.query(
        "SELECT partition, fencing FROM dicomgate_partitions WHERE owner = $1
             ORDER BY partition",
        &[&node],
    )?
    .iter()
    .map(|r| Owned {
        partition: r.get::<_, i32>(0) as u32,
        fencing: r.get(1),
    })
    .collect())
}

/// Inside a claim or a stage change: the partition row, read `FOR SHARE` (a takeover waits
/// for this transaction, or this one for it), must name `me` with `owned.fencing`, and `me`'s
/// lease must still run.
fn check_owner(tx: &mut postgres::Transaction<'_>, me: &str, owned: Owned) -> Result<()> {
    let row = tx.query_opt(
        "SELECT owner, fencing FROM dicomgate_partitions WHERE partition = $1 FOR SHARE",
        &[&(owned.partition as i32)],
    )?;
    let Some(row) = row else {
        return Err(ClusterError::Invalid(format!(
            "partition {} does not exist",
            owned.partition
        )));
    };
    let (owner, fencing): (Option<String>, i64) = (row.get(0), row.get(1));
    if owner.as_deref() != Some(me) || fencing != owned.fencing {
        return Err(ClusterError::Fenced {
            partition: owned.partition,
            owner,
            fencing,
        });
    }
    let live: bool = tx
        .query_one(
            "SELECT coalesce((SELECT lease_until > statement_timestamp() FROM dicomgate_nodes
                              WHERE node_id = $1), false)",
            &[&me],
        )?
        .get(0);
    if !live {
        return Err(ClusterError::LeaseExpired);
    }
    Ok(())
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| ClusterError::Invalid(format!("{what} {v} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_the_digest_mod_the_partition_count() {
        // SHA-256("") begins e3b0c44298fc1c14.
        assert_eq!(
            partition_of(b"", 1 << 16),
            (0xe3b0_c442_98fc_1c14u64 % 65_536) as u32
        );
        assert_eq!(partition_of(b"anything", 1), 0);
        assert_eq!(partition_of(b"anything", 0), 0);
        // Spread: 64 partitions, 6,400 keys, none more than twice its share.
        let mut counts = vec![0u32; 64];
        for i in 0..6_400u32 {
            counts[partition_of(format!("PAT{i}").as_bytes(), 64) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50 && c < 200), "{counts:?}");
    }

    /// One rebalance of `me` as [`Coordinator::rebalance`] applies [`plan`] (no batch busy).
    fn rebalance_once(me: &str, members: &[(String, bool)], owners: &mut [Option<String>]) {
        match plan(me, members, owners) {
            Move::Give { mine, n } => {
                for &i in mine.iter().rev().take(n) {
                    owners[i] = None;
                }
            }
            Move::Take(free) => {
                for i in free {
                    owners[i] = Some(me.to_string());
                }
            }
            Move::Keep => {}
        }
    }

    fn shares(owners: &[Option<String>], members: &[(String, bool)]) -> Vec<usize> {
        members
            .iter()
            .map(|(m, _)| owners.iter().filter(|o| o.as_deref() == Some(m)).count())
            .collect()
    }

    fn nodes(ids: &[&str]) -> Vec<(String, bool)> {
        ids.iter().map(|m| (m.to_string(), true)).collect()
    }

    #[test]
    fn a_dead_nodes_partitions_are_all_taken_in_one_renewal_interval() {
        // perf/cluster.py: a node killed after four held 64 of 256 each; once it left the
        // members, the survivors' first rebalances (n2, n1, n0 in that order) each took 21 and
        // left one partition free: the extra share went to the member owning the most at each
        // turn, n1 by then, which had already had its turn. It waited a third of a lease more.
        let mut owners: Vec<Option<String>> =
            (0..256).map(|i| Some(format!("n{}", i / 64))).collect();
        let members = nodes(&["n0", "n1", "n2"]);
        for me in ["n2", "n1", "n0"] {
            rebalance_once(me, &members, &mut owners);
        }
        assert!(owners
            .iter()
            .all(|o| o.as_deref().is_some_and(|o| o != "n3")));
        let mut s = shares(&owners, &members);
        s.sort();
        assert_eq!(s, vec![85, 85, 86]);
    }

    #[test]
    fn rebalances_in_any_order_share_every_partition_evenly() {
        // Every member rebalancing once per interval (a renewal, lease/3), in shuffled orders:
        // a new cluster (nothing owned) and a dead node's share are taken within one interval,
        // a join (one node owned everything: it gives, the others take) within two, any uneven
        // start within three; then every partition has a live owner, shares differ by at most
        // one, and another interval moves nothing. (The rule before the fix above needed two,
        // three, two and three.)
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        for p in [1usize, 7, 8, 64, 256, 257] {
            for n in 1..=5usize {
                let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
                let members: Vec<(String, bool)> = ids.iter().map(|m| (m.clone(), true)).collect();
                for (start, intervals) in [(0, 1), (1, 2), (2, 1), (3, 3)] {
                    for _ in 0..20 {
                        let mut owners: Vec<Option<String>> = (0..p)
                            .map(|i| match start {
                                0 => None,
                                1 => Some(ids[0].clone()),
                                2 if i % (n + 1) == n => Some("dead".into()),
                                2 => Some(ids[i % (n + 1)].clone()),
                                _ => Some(ids[next() % n].clone()),
                            })
                            .collect();
                        let mut order = ids.clone();
                        for _ in 0..intervals {
                            for i in (1..order.len()).rev() {
                                order.swap(i, next() % (i + 1));
                            }
                            for me in &order {
                                rebalance_once(me, &members, &mut owners);
                            }
                        }
                        let case = format!("{p} partitions, {n} members, start {start}");
                        assert!(
                            owners
                                .iter()
                                .all(|o| o.as_ref().is_some_and(|o| ids.contains(o))),
                            "{case}: {owners:?}"
                        );
                        let s = shares(&owners, &members);
                        let (lo, hi) = (s.iter().min(), s.iter().max());
                        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{case}: {s:?}");
                        let settled = owners.clone();
                        for me in &order {
                            rebalance_once(me, &members, &mut owners);
                        }
                        assert_eq!(
                            owners, settled,
                            "{case}: a settled cluster moved partitions"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn node_ids_that_name_a_folder_safely_are_accepted() {
        for ok in ["a", "node-1", "gw_2.site", &"x".repeat(64)] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_node_id(bad).is_err(), "{bad}");
        }
    }
}
