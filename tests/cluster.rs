//! The cluster coordination core (src/cluster/, issue 15 part 1) against a real PostgreSQL:
//! each test starts its own server (Debian's `postgresql`: `initdb` and `pg_ctl` into a
//! temporary folder, listening on a Unix socket there only), and several coordinators play
//! the nodes. Leases run in database time; where a test lets one run out it sleeps past it
//! (nothing here asserts how long anything took).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure is a panic with its message

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dicomgate::cluster::{partition_of, ClusterError, Coordinator, Owned, Published};

/// A PostgreSQL server of its own, stopped (immediate) when dropped.
struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    socket_dir: PathBuf,
    as_postgres: bool,
    port: u16,
    /// Server options for a TCP listener with TLS ([`Postgres::start_tls`]).
    tls_opts: String,
    /// More server options (a synchronous standby's name: [`Postgres::start_with_sync_standby`]).
    extra_opts: String,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|b| b.join("initdb").is_file());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             `bash .ci/run` installs Debian's postgresql"
        )
    })
}

impl Postgres {
    fn start() -> Postgres {
        let pg = Postgres::init(5432);
        pg.start_again();
        pg
    }

    /// A server that also listens on 127.0.0.1 and 127.0.0.2 (a free port), with TLS by
    /// `pki`'s `server` certificate (it names 127.0.0.1 and localhost, not 127.0.0.2): TCP
    /// clients must use TLS, present a client certificate signed by `pki`'s `ca` and give the
    /// user's password (`hostssl ... scram-sha-256 clientcert=verify-ca`, `hostnossl ...
    /// reject`; the test sets the password); the Unix socket stays open to the test.
    fn start_tls(pki: &common::Pki) -> Postgres {
        let mut pg = Postgres::init(common::free_port());
        let dir = pg.socket_dir.clone();
        for (from, to) in [
            ("server.pem", "server.crt"),
            ("server.key", "server.key"),
            ("ca.pem", "root.crt"),
        ] {
            std::fs::copy(pki.path(from), dir.join(to)).unwrap();
        }
        // The server refuses a key file others can read; it must be its user's.
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        if pg.as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .args(["server.crt", "server.key", "root.crt"].map(|f| dir.join(f)))
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        std::fs::write(
            pg.data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.0/8 scram-sha-256 clientcert=verify-ca\n\
             hostnossl all all 127.0.0.0/8 reject\n",
        )
        .unwrap();
        pg.tls_opts = format!(
            "-c listen_addresses='127.0.0.1,127.0.0.2' -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c ssl_ca_file={}",
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            dir.join("root.crt").display()
        );
        pg.start_again();
        pg
    }

    /// A primary and its streaming standby, on Unix sockets of their own: the primary's
    /// commits wait for the standby (`synchronous_standby_names`, `synchronous_commit = on`,
    /// as docs/cluster.md asks of a deployment), so a commit a node saw is on the standby
    /// before the node hears of it. Returned once the standby streams synchronously.
    fn start_with_sync_standby() -> (Postgres, Postgres) {
        let mut primary = Postgres::init(5432);
        primary.extra_opts = "-c synchronous_standby_names=standby -c synchronous_commit=on".into();
        primary.start_again();
        let standby = primary.standby(&format!(
            "host={} port={}",
            primary.socket_dir.display(),
            primary.port
        ));
        assert!(
            common::wait_until(30, || primary.replicating("sync_state = 'sync'")),
            "the standby does not stream synchronously"
        );
        (primary, standby)
    }

    /// A primary and its asynchronous standby, which streams from it through a TCP proxy the
    /// test can cut: what the primary commits after [`Cuttable::cut`] never reaches the
    /// standby (as when a primary dies before its asynchronous standby received its last
    /// commits). Returned once the standby streams.
    fn start_with_cuttable_async_standby() -> (Postgres, Postgres, Cuttable) {
        let primary = Postgres::start();
        let link = Cuttable::new(&primary);
        let standby = primary.standby(&format!("host=127.0.0.1 port={}", link.port));
        assert!(
            common::wait_until(30, || primary.replicating("state = 'streaming'")),
            "the standby does not stream"
        );
        (primary, standby, link)
    }

    /// Whether this server replicates to the standby `standby` with `condition` on its
    /// `pg_stat_replication` row.
    fn replicating(&self, condition: &str) -> bool {
        self.client()
            .query_opt(
                &format!(
                    "SELECT 1 FROM pg_stat_replication \
                     WHERE application_name = 'standby' AND {condition}"
                ),
                &[],
            )
            .unwrap()
            .is_some()
    }

    /// Waits until `standby` has replayed everything this server (its primary) has written
    /// so far.
    fn wait_replayed_by(&self, standby: &Postgres) {
        let lsn: String = self
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        let replayed = || {
            standby
                .client()
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .unwrap()
                .get::<_, bool>(0)
        };
        assert!(
            common::wait_until(30, replayed),
            "the standby did not replay up to {lsn}"
        );
    }

    /// A streaming standby of this server, made by `pg_basebackup`, reaching it by
    /// `conninfo` (host and port) as `standby`; started.
    fn standby(&self, conninfo: &str) -> Postgres {
        let primary = self;
        let dir = tempfile::tempdir().unwrap();
        let standby = Postgres {
            socket_dir: dir.path().to_path_buf(),
            data: dir.path().join("data"),
            bin: primary.bin.clone(),
            _dir: dir,
            as_postgres: primary.as_postgres,
            port: 5432,
            tls_opts: String::new(),
            extra_opts: String::new(),
        };
        let chown = |path: &Path| {
            if primary.as_postgres {
                let ok = Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown to postgres failed");
            }
        };
        chown(&standby.socket_dir);
        let out = standby
            .command("pg_basebackup")
            .arg("-D")
            .arg(&standby.data)
            .arg("-h")
            .arg(&primary.socket_dir)
            .args(["-p", &primary.port.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(standby.data.join("standby.signal"), "").unwrap();
        let mut auto =
            std::fs::read_to_string(standby.data.join("postgresql.auto.conf")).unwrap_or_default();
        auto.push_str(&format!(
            "primary_conninfo = '{conninfo} user=postgres application_name=standby'\n"
        ));
        std::fs::write(standby.data.join("postgresql.auto.conf"), auto).unwrap();
        chown(&standby.data);
        standby.start_again();
        standby
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it takes writes).
    fn promote(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "promote"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl promote: {:?}", out);
    }

    /// Ends the server as a crash would (`pg_ctl stop -m immediate`: no shutdown checkpoint,
    /// connections cut).
    fn crash(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-m", "immediate", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop -m immediate: {:?}", out);
    }

    /// `initdb` into a new temporary folder; the server will use `port`.
    fn init(port: u16) -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses to run as root: then the server runs as Debian's postgres user, who
        // must own the folder.
        let as_postgres = rustix::process::geteuid().is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres failed");
        }
        let data = dir.path().join("data");
        let pg = Postgres {
            socket_dir: dir.path().to_path_buf(),
            data,
            bin,
            _dir: dir,
            as_postgres,
            port,
            tls_opts: String::new(),
            extra_opts: String::new(),
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// Starts the server (again, after [`Postgres::stop`]).
    fn start_again(&self) {
        let opts = if self.tls_opts.is_empty() {
            "-c listen_addresses=''"
        } else {
            self.tls_opts.as_str()
        };
        let opts = format!(
            "-k {} -p {} {opts} -c fsync=off -c max_connections=50 {}",
            self.socket_dir.display(),
            self.port,
            self.extra_opts
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-o", &opts, "-l"])
            .arg(self.socket_dir.join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.socket_dir.join("log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast: connections are cut, as in a restart or failover).
    fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-m", "fast", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {:?}", out);
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        )
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo(), postgres::NoTls).unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// A node that has joined (its first rebalance).
fn node(pg: &Postgres, id: &str, partitions: u32, lease: Duration) -> Coordinator {
    let mut c = Coordinator::connect(&pg.conninfo(), id, partitions, lease)
        .unwrap_or_else(|e| panic!("{id}: {e}"));
    c.rebalance().unwrap();
    c
}

fn record(node: &str, uid: &str, key: &[u8], received_ms: u64) -> Published {
    Published {
        node_id: node.into(),
        sop_instance_uid: uid.into(),
        grouping_key: key.to_vec(),
        study_uid: Some("1.2.3".into()),
        series_uid: Some("1.2.3.4".into()),
        location: format!("segments/0001.log@{received_ms}"),
        bytes: 1000,
        inputs: 1,
        received_ms,
        ..Published::default()
    }
}

/// Every partition's owner, from the table.
fn owners(pg: &Postgres) -> Vec<Option<String>> {
    pg.client()
        .query(
            "SELECT owner FROM dicomgate_partitions ORDER BY partition",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn counts(owners: &[Option<String>], ids: &[&str]) -> Vec<usize> {
    ids.iter()
        .map(|id| owners.iter().filter(|o| o.as_deref() == Some(*id)).count())
        .collect()
}

/// Every node rebalances (renewing its lease), twice round (enough for one to release what
/// another then takes).
fn settle(nodes: &mut [Coordinator]) {
    for _ in 0..2 {
        for n in nodes.iter_mut() {
            n.rebalance().unwrap();
        }
    }
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v
}

fn wait_past(lease: Duration) {
    std::thread::sleep(lease + Duration::from_millis(300));
}

#[test]
fn migrations_apply_once_when_nodes_start_together_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let conninfo = pg.conninfo();
    let joins: Vec<_> = (0..4)
        .map(|i| {
            let c = conninfo.clone();
            std::thread::spawn(move || {
                Coordinator::connect(&c, &format!("n{i}"), 64, Duration::from_secs(5))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for j in joins {
        j.join().unwrap().unwrap();
    }
    let mut c = pg.client();
    let versions: Vec<i32> = c
        .query("SELECT version FROM dicomgate_schema ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all: Vec<i32> = (1..=dicomgate::cluster::SCHEMA_VERSION).collect();
    assert_eq!(versions, all);
    let partitions: i64 = c
        .query_one("SELECT count(*) FROM dicomgate_partitions", &[])
        .unwrap()
        .get(0);
    assert_eq!(partitions, 64);
    c.execute(
        "INSERT INTO dicomgate_schema (version, name) VALUES (99, 'from the future')",
        &[],
    )
    .unwrap();
    match Coordinator::connect(&conninfo, "late", 64, Duration::from_secs(5)) {
        Err(ClusterError::SchemaTooNew { database: 99, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn a_node_configured_with_other_partitions_is_refused() {
    let pg = Postgres::start();
    node(&pg, "a", 256, Duration::from_secs(5));
    match Coordinator::connect(&pg.conninfo(), "b", 128, Duration::from_secs(5)) {
        Err(e @ ClusterError::PartitionsDiffer { .. }) => {
            let text = e.to_string();
            assert!(text.contains("256") && text.contains("128"), "{text}");
        }
        other => panic!("expected PartitionsDiffer, got {other:?}"),
    }
}

/// Three nodes share 16 partitions 6/5/5; a fourth joins and they move to 4 each, only the
/// moved partitions getting a new token; one stops rebalancing (its lease runs out) and the
/// others take its partitions once it has been gone two leases, while it is refused until it
/// renews; a clean leave hands partitions over at once.
#[test]
fn partitions_are_shared_evenly_and_move_when_a_node_joins_or_dies() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(2);
    let ids = ["a", "b", "c", "d"];
    let mut nodes: Vec<Coordinator> = ids[..3].iter().map(|id| node(&pg, id, 16, lease)).collect();
    settle(&mut nodes);
    let o = owners(&pg);
    assert!(o.iter().all(Option::is_some), "{o:?}");
    assert_eq!(sorted(counts(&o, &ids[..3])), vec![5, 5, 6]);
    let before: Vec<Owned> = nodes.iter_mut().flat_map(|n| n.owned().unwrap()).collect();

    nodes.push(node(&pg, "d", 16, lease));
    settle(&mut nodes);
    let o = owners(&pg);
    assert!(o.iter().all(Option::is_some), "{o:?}");
    assert_eq!(counts(&o, &ids), vec![4, 4, 4, 4]);
    let after: Vec<Owned> = nodes.iter_mut().flat_map(|n| n.owned().unwrap()).collect();
    let mut kept = 0;
    for a in &after {
        let was = before.iter().find(|b| b.partition == a.partition);
        match was {
            // Stayed with its owner: same token. Moved: a higher one.
            Some(b) if b.fencing == a.fencing => kept += 1,
            Some(b) => assert!(a.fencing > b.fencing, "{a:?} {b:?}"),
            None => unreachable!("every partition was owned before"),
        }
    }
    assert_eq!(kept, 12, "only the 4 partitions d took moved");

    // b stops rebalancing; the others go on. After one lease it still counts in the quotas
    // (it may have been a pause they all shared); after two, its partitions move.
    let mut b = nodes.remove(1);
    wait_past(lease);
    settle(&mut nodes);
    assert_eq!(
        counts(&owners(&pg), &ids),
        vec![4, 4, 4, 4],
        "moved after one lease"
    );
    wait_past(lease);
    settle(&mut nodes);
    let o = owners(&pg);
    assert!(o.iter().all(Option::is_some), "{o:?}");
    let c = counts(&o, &ids);
    assert_eq!(c[1], 0, "{c:?}");
    assert_eq!(sorted(vec![c[0], c[2], c[3]]), vec![5, 5, 6]);
    assert!(matches!(
        b.claim(
            Owned {
                partition: 0,
                fencing: 1
            },
            &[],
            "x"
        ),
        Err(ClusterError::Fenced { .. } | ClusterError::Invalid(_) | ClusterError::LeaseExpired)
    ));
    assert!(b.owned().unwrap().is_empty());
    // Back, it gets a share again once the others give some up.
    nodes.insert(1, b);
    settle(&mut nodes);
    assert_eq!(counts(&owners(&pg), &ids), vec![4, 4, 4, 4]);
    // A clean stop hands its partitions over without waiting for its lease.
    nodes[3].leave(true).unwrap();
    settle(&mut nodes[..3]);
    let c = counts(&owners(&pg), &ids);
    assert_eq!((sorted(c[..3].to_vec()), c[3]), (vec![5, 5, 6], 0));
}

/// Found in review: with every lease lapsed at once (a database failover longer than a
/// lease), the first node back took every partition, and the others' batches were adopted
/// and handed back. Recently expired nodes count in the quotas now: the first one back keeps
/// its share, and no partition changes owner or token.
#[test]
fn when_every_lease_lapsed_the_first_node_back_takes_only_its_share() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(1);
    let mut nodes: Vec<Coordinator> = ["a", "b", "c"]
        .iter()
        .map(|id| node(&pg, id, 16, lease))
        .collect();
    settle(&mut nodes);
    let before: Vec<Vec<Owned>> = nodes.iter_mut().map(|n| n.owned().unwrap()).collect();
    wait_past(lease);
    let first = nodes[0].rebalance().unwrap();
    assert_eq!(
        first, before[0],
        "the first node back took more than its share"
    );
    settle(&mut nodes);
    let after: Vec<Vec<Owned>> = nodes.iter_mut().map(|n| n.owned().unwrap()).collect();
    assert_eq!(after, before);
}

/// Issue 15: "a deposed owner's late claim is refused by the fencing token". Node a owns the
/// only partition, then stops renewing (as if paused by SIGSTOP) past its lease; b takes the
/// partition. When a wakes, renews and claims with the token it still holds, the claim is
/// refused, and b's claim takes every record once.
#[test]
fn a_deposed_owners_late_claim_is_refused_by_the_fencing_token() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(1);
    let mut a = node(&pg, "a", 1, lease);
    let mut b = node(&pg, "b", 1, lease);
    let held = a.rebalance().unwrap();
    assert_eq!(held.len(), 1, "a, first in order, gets the one partition");
    assert!(b.rebalance().unwrap().is_empty());
    let key = b"PAT-1".to_vec();
    let recs: Vec<Published> = (0..10)
        .map(|i| {
            record(
                if i % 2 == 0 { "a" } else { "b" },
                &format!("1.2.{i}"),
                &key,
                100 + i,
            )
        })
        .collect();
    a.publish(&recs[..5]).unwrap();
    b.publish(&recs[5..]).unwrap();

    wait_past(2 * lease); // a is paused, past its lease and the grace after it
    let taken = b.rebalance().unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].fencing > held[0].fencing, "{taken:?} {held:?}");

    // a wakes and renews (its rebalance gets it nothing: b has the one partition).
    assert!(a.rebalance().unwrap().is_empty());
    match a.claim(held[0], &key, "batch-a") {
        Err(ClusterError::Fenced { owner, fencing, .. }) => {
            assert_eq!(owner.as_deref(), Some("b"));
            assert_eq!(fencing, taken[0].fencing);
        }
        other => panic!("the deposed owner's claim went through: {other:?}"),
    }
    let got = b.claim(taken[0], &key, "batch-b").unwrap().unwrap();
    let mut uids: Vec<String> = got.iter().map(|r| r.sop_instance_uid.clone()).collect();
    uids.sort();
    let mut want: Vec<String> = recs.iter().map(|r| r.sop_instance_uid.clone()).collect();
    want.sort();
    assert_eq!(uids, want);
    assert!(b.claim(taken[0], &key, "batch-b2").unwrap().is_none());
    assert!(matches!(
        a.claim(held[0], &key, "batch-a2"),
        Err(ClusterError::Fenced { .. })
    ));
    let batches: i64 = pg
        .client()
        .query_one("SELECT count(*) FROM dicomgate_batches", &[])
        .unwrap()
        .get(0);
    assert_eq!(batches, 1);
    // An owner whose lease ran out is refused even before anyone took its partition.
    wait_past(lease);
    assert!(matches!(
        b.claim(taken[0], &key, "batch-b3"),
        Err(ClusterError::LeaseExpired)
    ));
}

/// A node counts its outbox's writes in the database in the transaction of each
/// (`dicomgate_nodes.commits`: publication rounds, open-association counts): a count that
/// falls below what the process saw (here set back by hand, as a restore or a failover to a
/// standby that lacked the last commits would) is found by the next renewal, round or
/// association write, once each; a count raised by another process of the same node id (a
/// deposed one still running) is no loss.
#[test]
fn a_database_that_lost_commits_is_found_by_the_next_renewal_round_or_association_write() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let key = b"PAT-REWIND".to_vec();
    let mut a = node(&pg, "a", 4, lease);
    assert_eq!(a.take_rewind(), None, "a new process has seen nothing");
    for i in 0..3 {
        a.publish(&[record("a", &format!("7.{i}"), &key, 1)])
            .unwrap();
    }
    let set_back = |to: i64| {
        pg.client()
            .execute(
                "UPDATE dicomgate_nodes SET commits = $1 WHERE node_id = 'a'",
                &[&to],
            )
            .unwrap();
    };
    set_back(1);
    a.rebalance().unwrap();
    assert_eq!(
        a.take_rewind(),
        Some(dicomgate::cluster::Rewind { saw: 3, holds: 1 })
    );
    assert_eq!(a.take_rewind(), None, "taken once");
    a.publish(&[record("a", "7.3", &key, 1)]).unwrap();
    a.rebalance().unwrap();
    assert_eq!(
        a.take_rewind(),
        None,
        "the count rose from where it was found"
    );
    // Found by a round too (the row lost entirely, as a restore from before the node joined
    // would: the rebalance makes it again with no rounds).
    pg.client()
        .execute("DELETE FROM dicomgate_nodes WHERE node_id = 'a'", &[])
        .unwrap();
    a.publish(&[record("a", "7.4", &key, 1)]).unwrap();
    assert_eq!(
        a.take_rewind(),
        None,
        "no row: nothing counted, nothing compared"
    );
    a.rebalance().unwrap();
    assert_eq!(
        a.take_rewind(),
        Some(dicomgate::cluster::Rewind { saw: 2, holds: 0 })
    );
    a.publish(&[record("a", "7.5", &key, 1)]).unwrap();
    set_back(0);
    a.publish(&[record("a", "7.6", &key, 1)]).unwrap();
    assert_eq!(
        a.take_rewind(),
        Some(dicomgate::cluster::Rewind { saw: 1, holds: 0 })
    );
    // An open-association write finds it too, and counts.
    a.set_associations(&[(key.clone(), 1)]).unwrap();
    assert_eq!(a.take_rewind(), None);
    set_back(0);
    a.set_associations(&[(key.clone(), 0)]).unwrap();
    assert_eq!(
        a.take_rewind(),
        Some(dicomgate::cluster::Rewind { saw: 2, holds: 0 })
    );
    a.clear_associations_except(&[]).unwrap();
    a.rebalance().unwrap();
    assert_eq!(a.take_rewind(), None, "the clear counted");
    set_back(0);
    a.clear_associations_except(&[]).unwrap();
    assert_eq!(
        a.take_rewind(),
        Some(dicomgate::cluster::Rewind { saw: 2, holds: 0 })
    );
    // Another process of node a publishing in between raises the count: no loss for either.
    let mut other = Coordinator::connect(&pg.conninfo(), "a", 4, lease).unwrap();
    for i in 0..3 {
        other
            .publish(&[record("a", &format!("7.1{i}"), &key, 1)])
            .unwrap();
        a.publish(&[record("a", &format!("7.2{i}"), &key, 1)])
            .unwrap();
        a.rebalance().unwrap();
    }
    assert_eq!(a.take_rewind(), None);
    assert_eq!(other.take_rewind(), None);
}

/// The reconcile after a rewind, at the database: `absent_rows` proposes this node's rows
/// published up to a number and not at a listed location (not a later one, not another
/// node's), and `forget_rows_at` deletes only those still at most that number (a re-send
/// since made its row pending again under a new number: it stays).
#[test]
fn the_rows_a_rewind_may_forget_are_this_nodes_up_to_the_number_read_and_unlisted() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let key = b"PAT-RECONCILE".to_vec();
    let mut a = node(&pg, "a", 4, lease);
    let mut b = node(&pg, "b", 4, lease);
    let at = |i: u64| record("a", &format!("6.{i}"), &key, i);
    a.publish(&[at(1), at(2), at(3)]).unwrap();
    b.publish(&[record("b", "6.9", &key, 9)]).unwrap();
    let through = a.own_max_seq().unwrap();
    a.publish(&[at(4)]).unwrap();
    let listed = at(1).location;
    let mut absent = a.absent_rows(through, &[listed.as_str()]).unwrap();
    absent.sort();
    assert_eq!(absent, [at(2).location, at(3).location]);
    // 6.3 is sent again (a new copy, so a new number) before the delete.
    let mut again = at(3);
    again.received_ms = 30; // at the same location
    a.publish(&[again]).unwrap();
    let gone = [at(2).location, at(3).location];
    let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
    assert_eq!(a.forget_rows_at(through, &gone).unwrap(), 1);
    let left: Vec<String> = pg
        .client()
        .query(
            "SELECT sop_instance_uid FROM dicomgate_instances ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["6.1", "6.3", "6.4", "6.9"]);
}

/// Claims of one key racing on two connections of its owner while a third publishes: every
/// record is claimed exactly once.
#[test]
fn racing_claims_of_one_key_take_each_record_exactly_once() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut owner = node(&pg, "a", 4, lease);
    let owned = owner.rebalance().unwrap();
    let key = b"PAT-RACE".to_vec();
    let p = partition_of(&key, 4);
    let tok = *owned.iter().find(|o| o.partition == p).unwrap();
    let publisher = {
        let conninfo = pg.conninfo();
        let key = key.clone();
        std::thread::spawn(move || {
            let mut c = Coordinator::connect(&conninfo, "b", 4, lease).unwrap();
            for chunk in 0..20u64 {
                let recs: Vec<Published> = (0..20)
                    .map(|i| record("b", &format!("2.{chunk}.{i}"), &key, chunk * 100 + i))
                    .collect();
                c.publish(&recs).unwrap();
            }
        })
    };
    let claimers: Vec<_> = (0..2)
        .map(|t| {
            let conninfo = pg.conninfo();
            let key = key.clone();
            std::thread::spawn(move || {
                let mut c = Coordinator::connect(&conninfo, "a", 4, lease).unwrap();
                let mut mine = Vec::new();
                for round in 0..60 {
                    if let Some(r) = c.claim(tok, &key, &format!("batch-{t}-{round}")).unwrap() {
                        mine.extend(r.into_iter().map(|r| r.sop_instance_uid));
                    }
                }
                mine
            })
        })
        .collect();
    publisher.join().unwrap();
    let mut all: Vec<String> = claimers
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    // What was published after the claimers stopped.
    for end in 0..10 {
        match owner.claim(tok, &key, &format!("batch-end-{end}")).unwrap() {
            Some(r) => all.extend(r.into_iter().map(|r| r.sop_instance_uid)),
            None => break,
        }
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, all.len(), "a record was claimed twice");
    assert_eq!(n, 400, "every record claimed");
}

#[test]
fn publication_is_idempotent_and_a_resent_instance_is_pending_again() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 1, lease);
    let mut b = node(&pg, "b", 1, lease);
    let tok = a.rebalance().unwrap()[0];
    let key = b"PAT-2".to_vec();
    let r = record("a", "1.9", &key, 500);
    assert_eq!(a.publish(std::slice::from_ref(&r)).unwrap(), 1);
    // Published again after a restart (the outbox does not know it got through): no change.
    assert_eq!(a.publish(std::slice::from_ref(&r)).unwrap(), 0);
    // The same instance acknowledged by b too, later.
    b.publish(&[record("b", "1.9", &key, 600)]).unwrap();
    let got = a.claim(tok, &key, "first").unwrap().unwrap();
    assert_eq!(got.len(), 1, "one per SOP Instance UID: {got:?}");
    assert_eq!((got[0].node_id.as_str(), got[0].received_ms), ("b", 600));
    assert_eq!(a.publish(std::slice::from_ref(&r)).unwrap(), 0);
    assert!(a.claim(tok, &key, "second").unwrap().is_none());
    // Re-sent to a later: a new row version, pending again.
    assert_eq!(a.publish(&[record("a", "1.9", &key, 900)]).unwrap(), 1);
    let again = a.claim(tok, &key, "third").unwrap().unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].received_ms, 900);
    // An older copy published late (another ingest thread, or recovery finding both copies of
    // a re-sent instance) never replaces the newer one, nor its claim.
    assert_eq!(a.publish(&[record("a", "1.9", &key, 800)]).unwrap(), 0);
    assert!(a.claim(tok, &key, "fourth").unwrap().is_none());
    // Within one round, the newest copy of an instance is the one published.
    a.publish(&[
        record("a", "2.1", &key, 5),
        record("a", "2.1", &key, 7),
        record("a", "2.1", &key, 6),
    ])
    .unwrap();
    let one = a.claim(tok, &key, "fifth").unwrap().unwrap();
    assert_eq!((one.len(), one[0].received_ms), (1, 7));
    // A key of another partition is refused by the claim.
    let mut c = node(&pg, "c", 1, lease);
    assert!(matches!(
        c.claim(
            Owned {
                partition: 7,
                fencing: 0
            },
            &key,
            "x"
        ),
        Err(ClusterError::Invalid(_))
    ));
}

/// Review of the owner side: an expiry claimed every pending row of the key, so an instance
/// published after the owner's last read (a node's backlog after an outage) was expired with
/// the patient, and deleted unprocessed. A claim now takes only the instances the owner's map
/// counted, each no newer than the copy it counted.
#[test]
fn an_expiry_claim_takes_only_the_copies_its_owner_counted() {
    use dicomgate::cluster::BatchKind;
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 1, lease);
    let mut b = node(&pg, "b", 1, lease);
    let tok = a.rebalance().unwrap()[0];
    let key = b"PAT-EXP".to_vec();
    a.publish(&[record("a", "3.1", &key, 100), record("a", "3.2", &key, 110)])
        .unwrap();
    // Published after the owner counted 3.1 (at 100) and 3.2: a new instance, and a newer
    // copy of 3.2 from another node.
    a.publish(&[record("a", "3.3", &key, 200)]).unwrap();
    b.publish(&[record("b", "3.2", &key, 210)]).unwrap();
    let got = a
        .claim_instances(
            tok,
            &key,
            "expired-1",
            BatchKind::ExpireDelete,
            &[("3.1", 100), ("3.2", 110)],
        )
        .unwrap()
        .unwrap();
    let mut took: Vec<(String, String, u64)> = got
        .iter()
        .map(|r| (r.node_id.clone(), r.sop_instance_uid.clone(), r.received_ms))
        .collect();
    took.sort();
    assert_eq!(
        took,
        [
            ("a".to_string(), "3.1".to_string(), 100),
            ("a".to_string(), "3.2".to_string(), 110)
        ]
    );
    let pending: Vec<(String, String)> = pg
        .client()
        .query(
            "SELECT node_id, sop_instance_uid FROM dicomgate_instances
             WHERE batch_id IS NULL ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        pending,
        [
            ("a".to_string(), "3.3".to_string()),
            ("b".to_string(), "3.2".to_string())
        ],
        "what the owner did not count stays pending"
    );
    // The batch keeps what it was claimed for (an adopting owner expires it, never runs it).
    assert_eq!(
        a.batch("expired-1").unwrap(),
        Some(("expire-delete".to_string(), "a".to_string()))
    );
    assert_eq!(
        a.unfinished(tok).unwrap(),
        [("expired-1".to_string(), BatchKind::ExpireDelete)]
    );
    // A processing claim takes the newest copy of each instance it names.
    let got = a
        .claim_instances(
            tok,
            &key,
            "batch-2",
            BatchKind::Process,
            &[("3.2", u64::MAX)],
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        got.iter()
            .map(|r| (r.node_id.as_str(), r.received_ms))
            .collect::<Vec<_>>(),
        [("b", 210)]
    );
}

/// Review of the owner side: `finished_here` read its first 1000 rows with no order, so 1000
/// copies a node kept (newer copies stored since) hid every other done row from release for
/// ever. It pages by (batch, SOP Instance UID) now.
#[test]
fn the_release_of_finished_copies_pages_past_the_copies_it_keeps() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 1, lease);
    let tok = a.rebalance().unwrap()[0];
    let key = b"PAT-PAGE".to_vec();
    let recs: Vec<Published> = (0..5)
        .map(|i| record("a", &format!("4.{i}"), &key, 100 + i))
        .collect();
    a.publish(&recs).unwrap();
    a.claim(tok, &key, "paged").unwrap().unwrap();
    a.set_stage(tok, "paged", "done").unwrap();
    let mut after = (String::new(), String::new());
    let mut pages = Vec::new();
    for _ in 0..10 {
        let page = a.finished_here((&after.0, &after.1), 2).unwrap();
        let Some((p, b)) = page.last() else { break };
        after = (b.clone(), p.sop_instance_uid.clone());
        pages.push(
            page.iter()
                .map(|(p, _)| p.sop_instance_uid.clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        pages,
        [vec!["4.0", "4.1"], vec!["4.2", "4.3"], vec!["4.4"]],
        "every done row, each once, none released"
    );
}

/// Found by the three-node test of this session (a done batch row left behind): two storing
/// nodes forgetting their rows of one done batch at the same moment each still saw the other's
/// rows (deleted, not yet committed) and left the batch row, for ever. Now each locks the done
/// batch rows it names first, so the second sees the first's deletion. 200 rounds of two racing
/// forgets leave no batch row.
#[test]
fn storing_nodes_that_forget_one_batch_at_once_leave_no_batch_row() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 1, lease);
    let tok = a.rebalance().unwrap()[0];
    let mut b = Coordinator::connect(&pg.conninfo(), "b", 1, lease).unwrap();
    for round in 0..200u64 {
        let key = format!("PAT-FORGET-{round}").into_bytes();
        let batch = format!("forget-{round}");
        let (ua, ub) = (format!("8.{round}.1"), format!("8.{round}.2"));
        a.publish(&[record("a", &ua, &key, 1)]).unwrap();
        b.publish(&[record("b", &ub, &key, 1)]).unwrap();
        assert_eq!(a.claim(tok, &key, &batch).unwrap().unwrap().len(), 2);
        a.set_stage(tok, &batch, "done").unwrap();
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let forget = |mut c: Coordinator, uid: String, batch: String| {
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                assert_eq!(c.forget(&[(uid, batch, 1)]).unwrap(), 1);
                c
            })
        };
        let (ta, tb) = (forget(a, ua, batch.clone()), forget(b, ub, batch.clone()));
        (a, b) = (ta.join().unwrap(), tb.join().unwrap());
    }
    let left: Vec<String> = pg
        .client()
        .query(
            "SELECT batch_id FROM dicomgate_batches ORDER BY batch_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(left.is_empty(), "{} batch rows left: {left:?}", left.len());
}

/// Review of the owner side: a row published before schema version 4 had no study date,
/// instance number or counts, and republishing it (at a restart) changed nothing, so the rules
/// read zeros for ever. Now they are filled in, and a claimed row keeps its claim.
#[test]
fn republication_fills_in_the_rule_fields_without_making_a_claimed_row_pending_again() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 1, lease);
    let tok = a.rebalance().unwrap()[0];
    let key = b"PAT-V4".to_vec();
    let old = record("a", "5.1", &key, 100);
    a.publish(&[old.clone(), record("a", "5.2", &key, 100)])
        .unwrap();
    a.claim_instances(
        tok,
        &key,
        "claimed-v3",
        dicomgate::cluster::BatchKind::Process,
        &[("5.1", u64::MAX)],
    )
    .unwrap()
    .unwrap();
    let filled = |uid: &str| Published {
        sop_instance_uid: uid.into(),
        study_date: Some("20261203".into()),
        instance_number: 7,
        images_in_acquisition: 2,
        number_of_slices: 3,
        ..old.clone()
    };
    a.publish(&[filled("5.1"), filled("5.2")]).unwrap();
    type Row = (String, Option<String>, i32, i32, i32, Option<String>);
    let rows: Vec<Row> = pg
        .client()
        .query(
            "SELECT sop_instance_uid, study_date, instance_number, images_in_acquisition,
                    number_of_slices, batch_id
             FROM dicomgate_instances ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let d = Some("20261203".to_string());
    assert_eq!(
        rows,
        [
            ("5.1".into(), d.clone(), 7, 2, 3, Some("claimed-v3".into())),
            ("5.2".into(), d, 7, 2, 3, None)
        ]
    );
}

#[test]
fn a_dead_owners_batches_are_adopted_and_its_late_stage_change_refused() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(1);
    let mut a = node(&pg, "a", 1, lease);
    let mut b = node(&pg, "b", 1, lease);
    let held = a.rebalance().unwrap()[0];
    let key = b"PAT-3".to_vec();
    a.publish(&[record("a", "3.1", &key, 1)]).unwrap();
    a.claim(held, &key, "batch-1").unwrap().unwrap();
    a.set_stage(held, "batch-1", "processing").unwrap();
    wait_past(2 * lease); // a dies
    let taken = b.rebalance().unwrap()[0];
    assert_eq!(b.adopt(taken).unwrap(), vec!["batch-1".to_string()]);
    assert!(b.adopt(taken).unwrap().is_empty(), "adopted once");
    a.rebalance().unwrap();
    assert!(matches!(
        a.set_stage(held, "batch-1", "done"),
        Err(ClusterError::Fenced { .. })
    ));
    b.set_stage(taken, "batch-1", "done").unwrap();
    assert_eq!(
        b.batch("batch-1").unwrap(),
        Some(("done".to_string(), "b".to_string()))
    );
}

/// Found in review: the token belonged to the node id, not the process. A node restarted under
/// its id (or paused and replaced by its supervisor) kept its partitions under the same token,
/// so the old process could still claim and move batches, and the new one could not adopt the
/// old one's unfinished batch. Joining now raises the tokens: the old process is refused
/// although the owner's name is its own, and the new one adopts its batch.
#[test]
fn a_restarted_node_fences_its_previous_process_and_adopts_its_batches() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut old = node(&pg, "a", 1, lease);
    let held = old.owned().unwrap()[0];
    let key = b"PAT-4".to_vec();
    old.publish(&[record("a", "4.1", &key, 1), record("a", "4.2", &key, 2)])
        .unwrap();
    old.claim(held, &key, "batch-old").unwrap().unwrap();
    old.publish(&[record("a", "4.3", &key, 3)]).unwrap();

    let mut new = node(&pg, "a", 1, lease); // the same id, a new process
    let now = new.owned().unwrap()[0];
    assert_eq!(now.partition, held.partition);
    assert!(now.fencing > held.fencing, "{now:?} {held:?}");
    assert_eq!(new.adopt(now).unwrap(), vec!["batch-old".to_string()]);
    match old.claim(held, &key, "batch-late") {
        Err(ClusterError::Fenced { owner, .. }) => assert_eq!(owner.as_deref(), Some("a")),
        other => panic!("the old process claimed: {other:?}"),
    }
    assert!(matches!(
        old.set_stage(held, "batch-old", "done"),
        Err(ClusterError::Fenced { .. })
    ));
    let rest = new.claim(now, &key, "batch-new").unwrap().unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].sop_instance_uid, "4.3");
}

/// A reconnection is the same incarnation (issue 15, "reconnect re-fences"): the `cluster`
/// thread made a new coordinator after every failed statement, whose first rebalance raised
/// the tokens of everything its node owned, fencing its own process, and made its own batches
/// adoptable (processed twice once the owner side claims). `Coordinator::reconnect` keeps what
/// the process joined: after its connection is cut, its tokens and claims stand.
#[test]
fn a_reconnection_is_the_same_incarnation_and_does_not_fence_itself() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 2, lease);
    let held = a.owned().unwrap();
    assert_eq!(held.len(), 2);
    let key = b"PAT-R".to_vec();
    let p = held
        .iter()
        .copied()
        .find(|o| o.partition == partition_of(&key, 2))
        .unwrap();
    a.publish(&[record("a", "9.1", &key, 1)]).unwrap();
    a.claim(p, &key, "batch-before").unwrap().unwrap();
    // The connection is cut (a database restart, a network drop).
    let cut = pg
        .client()
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .unwrap();
    assert_eq!(cut.len(), 1);
    assert!(a.rebalance().is_err(), "the cut connection still worked");
    a.reconnect(&dicomgate::cluster::Database::plain(&pg.conninfo()))
        .unwrap();
    assert_eq!(
        a.rebalance().unwrap(),
        held,
        "a reconnection raised the tokens"
    );
    a.set_stage(p, "batch-before", "done").unwrap();
    assert!(a.adopt(p).unwrap().is_empty());
    // A new process of the same node id still fences the old one (the rule reconnection
    // keeps apart from).
    let mut b = node(&pg, "a", 2, lease);
    assert!(b.owned().unwrap().iter().all(|o| o.fencing > p.fencing));
}

/// Found in review: a node above its quota released partitions whose batches it was still
/// processing, and the new owner adopted them while the old one went on. Only partitions with
/// no unfinished batch are handed over; a busy one goes once its batches are done.
#[test]
fn a_partition_with_an_unfinished_batch_is_not_handed_over() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut a = node(&pg, "a", 2, lease);
    let owned = a.owned().unwrap();
    assert_eq!(owned.len(), 2);
    // A key of each partition, each with a batch in flight.
    let keys: Vec<Vec<u8>> = (0..2u32)
        .map(|p| {
            (0..)
                .map(|i| format!("K{i}").into_bytes())
                .find(|k| partition_of(k, 2) == p)
                .unwrap()
        })
        .collect();
    for (i, k) in keys.iter().enumerate() {
        a.publish(&[record("a", &format!("5.{i}"), k, 1)]).unwrap();
        a.claim(owned[i], k, &format!("batch-{i}"))
            .unwrap()
            .unwrap();
    }
    let b = node(&pg, "b", 2, lease);
    let mut pair = vec![a, b];
    settle(&mut pair);
    let o = owners(&pg);
    assert_eq!(
        counts(&o, &["a", "b"]),
        vec![2, 0],
        "a busy partition moved: {o:?}"
    );
    // Partition 1's batch is done: now it can go.
    pair[0].set_stage(owned[1], "batch-1", "done").unwrap();
    settle(&mut pair);
    let o = owners(&pg);
    assert_eq!(o, vec![Some("a".to_string()), Some("b".to_string())]);
    let got = pair[1].owned().unwrap()[0];
    assert!(pair[1].adopt(got).unwrap().is_empty(), "nothing to adopt");
}

/// Found in review: the extra partitions of an uneven split went to the first nodes by id, so
/// a node "a" joining b (3 of 5) and c (2) took 2 where 1 is enough. They go to the nodes that
/// own the most now: one partition moves.
#[test]
fn a_join_moves_no_more_partitions_than_even_shares_need() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(30);
    let mut nodes: Vec<Coordinator> = ["b", "c"]
        .iter()
        .map(|id| node(&pg, id, 5, lease))
        .collect();
    settle(&mut nodes);
    let before = owners(&pg);
    assert_eq!(counts(&before, &["b", "c"]), vec![3, 2]);
    nodes.insert(0, node(&pg, "a", 5, lease));
    settle(&mut nodes);
    let after = owners(&pg);
    assert_eq!(counts(&after, &["a", "b", "c"]), vec![1, 2, 2]);
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    assert_eq!(moved, 1, "{before:?} -> {after:?}");
}

/// Whether `c` hears of another node's move within 5 s (the sender notifies right after its
/// change committed, so this is milliseconds).
fn hears_a_move(c: &mut Coordinator) -> bool {
    common::wait_until(5, || c.partitions_moved().unwrap())
}

/// A join, a give, a take and a clean leave are each heard by the other nodes (NOTIFY after
/// the commit), not by the node that moved (b's own take is still queued when b listens
/// next), and a rebalance that moved nothing is not heard.
#[test]
fn a_join_or_a_clean_leave_tells_the_other_nodes_to_rebalance_at_once() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(3600);
    let mut a = node(&pg, "a", 8, lease);
    assert!(
        a.partitions_moved().unwrap(),
        "the first call starts listening"
    );
    let mut b = Coordinator::connect(&pg.conninfo(), "b", 8, lease).unwrap();
    assert!(b.partitions_moved().unwrap());
    b.rebalance().unwrap(); // joins: takes nothing yet (a holds all 8, live)
    assert!(hears_a_move(&mut a), "a does not hear b's join");
    a.rebalance().unwrap(); // gives 4
    assert_eq!(counts(&owners(&pg), &["a", "b"]), vec![4, 0]);
    assert!(hears_a_move(&mut b), "b does not hear a's give");
    b.rebalance().unwrap(); // takes them
    assert_eq!(counts(&owners(&pg), &["a", "b"]), vec![4, 4]);
    assert!(hears_a_move(&mut a), "a does not hear b's take");
    a.rebalance().unwrap(); // nothing to move: no notification
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !b.partitions_moved().unwrap(),
        "a rebalance that moved nothing was heard"
    );
    a.leave(true).unwrap();
    assert!(hears_a_move(&mut b), "b does not hear a's leave");
    b.rebalance().unwrap();
    assert_eq!(counts(&owners(&pg), &["a", "b"]), vec![0, 8]);
}

/// On real nodes with a lease of an hour (a renewal every 20 minutes), a joining node gets its
/// share and a leaving node's partitions are taken at once: the others rebalance when they
/// hear of the move, not at their next renewal. Without that, each step below would wait 20
/// minutes.
#[test]
fn partitions_move_when_a_node_joins_or_leaves_not_at_the_next_renewal() {
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let toml = |id: &str| {
        cluster_toml(&pg, shared.path(), id).replace("lease_seconds = 2", "lease_seconds = 3600")
    };
    let dir = |id: &str| shared.path().join("nodes").join(id);
    let a = start_ready(&dir("a"), &toml("a"));
    assert!(
        common::wait_until(20, || counts(&owners(&pg), &["a"]) == vec![8]),
        "{:?}",
        owners(&pg)
    );
    let b = start_ready(&dir("b"), &toml("b"));
    assert!(
        common::wait_until(30, || counts(&owners(&pg), &["a", "b"]) == vec![4, 4]),
        "the join did not move partitions at once: {:?}\n{}",
        owners(&pg),
        b.log()
    );
    a.signal(rustix::process::Signal::TERM);
    assert!(
        common::wait_until(30, || counts(&owners(&pg), &["a", "b"]) == vec![0, 8]),
        "the leave's partitions were not taken at once: {:?}\n{}",
        owners(&pg),
        b.log()
    );
}

/// Takeover at the database (issue 15 item 2): a live node is never offered; a dead one is
/// offered once its lease ran out more than a lease ago, to one taker at a time; a node that
/// comes back during its takeover makes the taker's renewal and finish fail (so a later
/// death of it is taken over afresh, and its own clean leave is not overwritten); a node that
/// left having published everything is not offered at all.
#[test]
fn a_takeover_goes_to_one_taker_and_is_given_up_when_its_node_comes_back() {
    let pg = Postgres::start();
    let lease = Duration::from_secs(1);
    let mut x = node(&pg, "x", 8, lease);
    let mut y = node(&pg, "y", 8, lease);
    let mut z = node(&pg, "z", 8, lease);
    assert_eq!(y.next_takeover().unwrap(), None, "x is live");
    // x dies (its lease runs out, and a lease more).
    for _ in 0..3 {
        wait_past(lease / 2);
        y.rebalance().unwrap();
        z.rebalance().unwrap();
    }
    let t = y
        .next_takeover()
        .unwrap()
        .expect("x is dead: its takeover is offered");
    assert_eq!(t.node_id, "x");
    assert_eq!(z.next_takeover().unwrap(), None, "y holds it");
    assert!(y.renew_takeover(&t).unwrap());
    // x comes back mid-way: the hold is given up, and nothing is recorded.
    x.rebalance().unwrap();
    assert!(!y.renew_takeover(&t).unwrap());
    assert!(!y.finish_takeover(&t).unwrap());
    // x leaves cleanly with everything published: not offered, and y's late finish does not
    // change that.
    x.leave(true).unwrap();
    for _ in 0..3 {
        wait_past(lease / 2);
        y.rebalance().unwrap();
        z.rebalance().unwrap();
    }
    assert!(!y.finish_takeover(&t).unwrap());
    assert_eq!(y.next_takeover().unwrap(), None);
    assert_eq!(z.next_takeover().unwrap(), None);
    assert!(takeover_row(&pg, "x").0);
    // x joins and dies without publishing everything: offered again, and finished once.
    let mut x = node(&pg, "x", 8, lease);
    x.leave(false).unwrap();
    for _ in 0..3 {
        wait_past(lease / 2);
        y.rebalance().unwrap();
        z.rebalance().unwrap();
    }
    let t = z
        .next_takeover()
        .unwrap()
        .expect("offered after an unclean leave");
    assert!(z.finish_takeover(&t).unwrap());
    assert_eq!(y.next_takeover().unwrap(), None);
    assert_eq!(takeover_row(&pg, "x"), (true, None));
}

/// The rows node `node` published: SOP Instance UID → (location, bytes, batch_id).
fn published_rows(
    pg: &Postgres,
    node: &str,
) -> std::collections::BTreeMap<String, (String, i64, Option<String>)> {
    let Ok(mut c) = postgres::Client::connect(&pg.conninfo(), postgres::NoTls) else {
        return Default::default();
    };
    let Ok(rows) = c.query(
        "SELECT sop_instance_uid, location, bytes, batch_id FROM dicomgate_instances
         WHERE node_id = $1",
        &[&node],
    ) else {
        return Default::default(); // not migrated yet
    };
    rows.iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// A node's configuration in a cluster of `pg` and `shared` (8 partitions, 2 s leases; an
/// instance above 4096 bytes is its own file, a smaller one a segment-log record; patients
/// are evaluated after 600 s of quiet and not when their last association closes, so not in
/// these tests unless one sets a shorter time or turns that trigger on).
fn cluster_toml(pg: &Postgres, shared: &Path, node_id: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[storage]\ninline_max_bytes = 4096\n\
         [trigger]\nquiet_seconds = 600\non_association_close = false\n\
         [cluster]\npostgres = {:?}\nnode_id = {node_id:?}\nshared_dir = {:?}\npartitions = 8\n\
         lease_seconds = 2\n",
        pg.conninfo(),
        shared.display().to_string()
    )
}

/// Instance `i` of 5 patients, written into `dir`: even ones small (segment-log records under
/// [`cluster_toml`]), odd ones larger than `inline_max_bytes` (their own files).
fn mixed_instance(dir: &Path, i: u32) -> PathBuf {
    sized_instance(dir, i, i % 2 == 1)
}

/// Instances `from..to` of [`mixed_instance`], written into `dir`.
fn mixed_batch(dir: &Path, from: u32, to: u32) -> Vec<PathBuf> {
    (from..to).map(|i| mixed_instance(dir, i)).collect()
}

/// The SOP Instance UIDs of `files`.
fn sop_uids(files: &[PathBuf]) -> std::collections::BTreeSet<String> {
    files.iter().map(|p| common::sop_uid_of(p)).collect()
}

/// Instance `i` of [`mixed_instance`]'s patients, small or `large` as asked (a re-send across
/// `inline_max_bytes`).
fn sized_instance(dir: &Path, i: u32, large: bool) -> PathBuf {
    instance_of(dir, i, large, 5)
}

/// Instance `i` of patient `P<i mod patients>` (one study and series per patient), small or
/// `large`.
fn instance_of(dir: &Path, i: u32, large: bool, patients: u32) -> PathBuf {
    let p = i % patients;
    let (patient, study, series, sop) = (
        format!("P{p}"),
        format!("1.2.826.0.1.3680043.10.1.{p}"),
        format!("1.2.826.0.1.3680043.10.2.{p}"),
        format!("1.2.826.0.1.3680043.10.3.{i}"),
    );
    if !large {
        let f = common::write_instance(dir, &patient, &study, &series, &sop, i);
        // Its own name per size: a re-send must not overwrite the other file.
        let small = dir.join(format!("{sop}.small.dcm"));
        std::fs::rename(&f, &small).unwrap();
        return small;
    }
    let meta = dicomgate::storage::FileMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: sop.clone(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        ..Default::default()
    };
    let mut f = dicomgate::dicom::part10::header(&meta);
    f.extend_from_slice(&common::dataset(&patient, &study, &series, &sop, 8192));
    let path = dir.join(format!("{sop}.large.dcm"));
    std::fs::write(&path, f).unwrap();
    path
}

/// Every column of node `node`'s rows, as text, by SOP Instance UID.
fn full_rows(pg: &Postgres, node: &str) -> Vec<Vec<String>> {
    pg.client()
        .query(
            "SELECT sop_instance_uid, partition::text, encode(grouping_key, 'hex'),
                    coalesce(study_uid, ''), coalesce(series_uid, ''), location, bytes::text,
                    inputs::text, received_ms::text, coalesce(batch_id, '')
             FROM dicomgate_instances WHERE node_id = $1 ORDER BY sop_instance_uid",
            &[&node],
        )
        .unwrap()
        .iter()
        .map(|r| (0..10).map(|i| r.get::<_, String>(i)).collect())
        .collect()
}

/// The HTTP address the node's newest start logged.
fn http_of(node: &common::Node) -> String {
    let log = node.log();
    log.lines()
        .rev()
        .find_map(|l| l.split("http serving").nth(1)?.split("listen=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or_else(|| panic!("no http line\n{log}"))
        .to_string()
}

/// The node's `/api/status` cluster section.
fn cluster_status(node: &common::Node) -> serde_json::Value {
    let (_, body) = common::http_get(&http_of(node), "/api/status");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["cluster"].clone()
}

/// Whether the node answers `/readyz` with 200.
fn ready(node: &common::Node) -> bool {
    common::http_get(&http_of(node), "/readyz").0 == 200
}

/// A cluster node in `data_dir`, once ready: a new node folder acknowledges nothing before the
/// node's first renewal in the cluster database (`cluster::fence`), which `/readyz` waits for.
fn start_ready(data_dir: &Path, toml: &str) -> common::Node {
    let node = common::Node::start_with_data_dir(data_dir, toml);
    assert!(
        common::wait_until(20, || ready(&node)),
        "not ready: {}\n{}",
        common::http_get(&http_of(&node), "/readyz").1,
        node.log()
    );
    node
}

/// Issue 15 item 2, on a real node: every instance the node acknowledges is published to the
/// cluster database, with where its bytes are under the node's folder (small instances in the
/// segment log and large ones in their own files alike); while PostgreSQL is down (stopped
/// mid-load) the node goes on acknowledging, and publishes what it missed once the database is
/// back; instances acknowledged while the database was down and the node then killed (-9) are
/// published after the restart; the restart's republication of everything pending changes no
/// row (a row a batch claimed keeps its claim), and a re-sent instance is pending again.
#[test]
fn a_node_publishes_what_it_acknowledges_and_catches_up_after_the_database_restarts() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let node_dir = shared.path().join("nodes").join("a");
    let mut node = start_ready(&node_dir, &cluster_toml(&pg, shared.path(), "a"));
    let files = tempfile::tempdir().unwrap();
    let instance = |i: u32| mixed_instance(files.path(), i);
    let batch = |from: u32, to: u32| -> Vec<PathBuf> { (from..to).map(instance).collect() };
    assert!(
        storescu_status(&node, &batch(0, 10)).success(),
        "{}",
        node.log()
    );
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 10),
        "published: {:?}\n{}",
        published_rows(&pg, "a"),
        node.log()
    );
    for (uid, (location, bytes, _)) in published_rows(&pg, "a") {
        assert!(location.starts_with("patients/") && location.ends_with(&format!("{uid}.dcm")));
        assert!(bytes > 0);
    }
    // The large ones are files there; the small ones are not (they are in the log).
    let n: u32 = 1;
    let large = published_rows(&pg, "a")
        .into_iter()
        .find(|(uid, _)| uid.ends_with(&format!(".{n}")))
        .unwrap();
    assert!(node_dir.join(&large.1 .0).is_file(), "{large:?}");

    // The database goes away mid-load: stores are still acknowledged (locally durable), and
    // wait for publication.
    pg.stop();
    assert!(
        storescu_status(&node, &batch(10, 20)).success(),
        "{}",
        node.log()
    );
    assert!(
        wait_until(20, || cluster_status(&node)["unpublished"] == 10
            && cluster_status(&node)["connected"] == false),
        "{}",
        cluster_status(&node)
    );
    pg.start_again();
    assert!(
        wait_until(30, || published_rows(&pg, "a").len() == 20),
        "after the database came back: {} rows\n{}",
        published_rows(&pg, "a").len(),
        node.log()
    );

    // Acknowledged while the database is down, then the node is killed: published after the
    // restart (the node's storage is the outbox).
    pg.stop();
    assert!(
        storescu_status(&node, &batch(20, 24)).success(),
        "{}",
        node.log()
    );
    node.kill9();
    pg.start_again();

    // A batch (of another node, say) claimed one record of each kind; the restart's
    // republication of everything pending changes nothing and keeps the claims.
    let claimed = ["1.2.826.0.1.3680043.10.3.2", "1.2.826.0.1.3680043.10.3.3"];
    for uid in claimed {
        pg.client()
            .execute(
                "UPDATE dicomgate_instances SET batch_id = 'b-1' WHERE sop_instance_uid = $1",
                &[&uid],
            )
            .unwrap();
    }
    node.restart();
    assert!(
        wait_until(20, || cluster_status(&node)["published"] == 24
            && cluster_status(&node)["unpublished"] == 0),
        "{}\n{}",
        cluster_status(&node),
        node.log()
    );
    assert_eq!(cluster_status(&node)["connected"], true);
    assert_eq!(cluster_status(&node)["node_id"], "a");
    assert_eq!(published_rows(&pg, "a").len(), 24);
    let claim_of = |uid: &str| published_rows(&pg, "a").get(uid).and_then(|r| r.2.clone());
    for uid in claimed {
        assert_eq!(
            claim_of(uid).as_deref(),
            Some("b-1"),
            "{uid}\n{}",
            node.log()
        );
    }

    // A re-send replaces the instance: pending again.
    std::thread::sleep(Duration::from_millis(20)); // a newer modification time / record
    assert!(storescu_status(&node, &batch(2, 4)).success());
    assert!(
        wait_until(20, || claimed.iter().all(|u| claim_of(u).is_none())),
        "a re-sent instance kept its old claim\n{}",
        node.log()
    );
}

/// The row of node `node` in `dicomgate_nodes`: whether its last takeover (or clean leave)
/// covers its last lease, and who holds its takeover now.
fn takeover_row(pg: &Postgres, node: &str) -> (bool, Option<String>) {
    let r = pg
        .client()
        .query_one(
            "SELECT taken_over IS NOT DISTINCT FROM lease_until, takeover_by
             FROM dicomgate_nodes WHERE node_id = $1",
            &[&node],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// Issue 15 item 2's takeover: a node that acknowledged instances while the database was away
/// and then died (kill -9) has them published by another node, from its folder under the
/// shared folder (its segment-log records and its files alike), under its own id, once its
/// lease has run out for a lease; exactly the rows its own restart would publish (a claim on
/// them survives that restart's republication); not taken over twice for one death; and not
/// at all after a clean stop that had published everything.
#[test]
fn a_dead_nodes_unpublished_records_are_published_by_another_node() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let a_dir = shared.path().join("nodes").join("a");
    let mut a = start_ready(&a_dir, &cluster_toml(&pg, shared.path(), "a"));
    let files = tempfile::tempdir().unwrap();
    let batch = |from: u32, to: u32| mixed_batch(files.path(), from, to);
    assert!(storescu_status(&a, &batch(0, 4)).success(), "{}", a.log());
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 4),
        "{}",
        a.log()
    );
    // Acknowledged while the database is away; then the node dies for good.
    pg.stop();
    assert!(storescu_status(&a, &batch(4, 10)).success(), "{}", a.log());
    // Re-sent across inline_max_bytes: .6 (a log record) as a file, .7 (a file) as a record.
    std::thread::sleep(Duration::from_millis(20)); // a newer time than the first copies
    let resent = [
        sized_instance(files.path(), 6, true),
        sized_instance(files.path(), 7, false),
    ];
    assert!(storescu_status(&a, &resent).success(), "{}", a.log());
    a.kill9();
    let died_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    pg.start_again();
    assert_eq!(published_rows(&pg, "a").len(), 4);

    // a's folder is not there (the shared folder not mounted where b looks, say): b must not
    // count a's takeover as done with nothing published.
    let hidden = shared.path().join("a-elsewhere");
    std::fs::rename(&a_dir, &hidden).unwrap();
    let b_dir = shared.path().join("nodes").join("b");
    let b = start_ready(&b_dir, &cluster_toml(&pg, shared.path(), "b"));
    // Once a's lease has run out for a lease, b looks, and finds no folder (to fence, then to
    // list).
    assert!(
        wait_until(30, || b
            .log()
            .contains("cannot write the fence into a dead node's folder")),
        "{}",
        b.log()
    );
    assert!(!takeover_row(&pg, "a").0, "{}", b.log());
    std::fs::rename(&hidden, &a_dir).unwrap();
    assert!(
        wait_until(30, || published_rows(&pg, "a").len() == 10),
        "a's rows: {:?}\n{}",
        published_rows(&pg, "a"),
        b.log()
    );
    assert!(
        wait_until(10, || takeover_row(&pg, "a") == (true, None)),
        "{:?}\n{}",
        takeover_row(&pg, "a"),
        b.log()
    );
    for (uid, (location, bytes, _)) in published_rows(&pg, "a") {
        assert!(location.ends_with(&format!("{uid}.dcm")), "{location}");
        assert!(bytes > 0);
    }
    // Stored before a died, as a's records and files say (not when b read them).
    for r in pg
        .client()
        .query(
            "SELECT sop_instance_uid, received_ms FROM dicomgate_instances WHERE node_id = 'a'",
            &[],
        )
        .unwrap()
    {
        let (uid, at): (String, i64) = (r.get(0), r.get(1));
        assert!(
            at > 0 && at <= died_ms,
            "{uid}: received {at}, a died at {died_ms}"
        );
    }
    // The odd ones are files in a's folder, named where they are.
    let file_row = published_rows(&pg, "a")
        .into_iter()
        .find(|(uid, _)| uid.ends_with(".5"))
        .unwrap();
    assert!(a_dir.join(&file_row.1 .0).is_file(), "{file_row:?}");
    let taken = cluster_status(&b)["taken_over"].as_u64().unwrap();
    assert!(taken >= 6, "{}", cluster_status(&b));
    // Not again for the same death.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cluster_status(&b)["taken_over"].as_u64(), Some(taken));
    assert!(published_rows(&pg, "b").is_empty());

    // Those are the rows a's own restart publishes: claims on one record of each kind stay.
    let claimed = ["1.2.826.0.1.3680043.10.3.4", "1.2.826.0.1.3680043.10.3.5"];
    for uid in claimed {
        pg.client()
            .execute(
                "UPDATE dicomgate_instances SET batch_id = 'b-1'
                 WHERE node_id = 'a' AND sop_instance_uid = $1",
                &[&uid],
            )
            .unwrap();
    }
    let taken_rows = full_rows(&pg, "a");
    a.restart();
    // 10 instances, and an 11th record: the older copy of the one re-sent as a log record,
    // which recovery publishes before the newer.
    assert!(
        wait_until(20, || cluster_status(&a)["published"] == 11
            && cluster_status(&a)["unpublished"] == 0),
        "{}\n{}",
        cluster_status(&a),
        a.log()
    );
    // a's own republication found every row as b wrote it: not one column differs.
    assert_eq!(full_rows(&pg, "a"), taken_rows, "{}", a.log());
    // Every node's status shows the whole cluster (issue 15 item 5): both nodes live, all 8
    // partitions between them, what each published; the page (in a real browser) too.
    let both_live = || {
        let nodes = cluster_status(&b)["nodes"].clone();
        let rows = nodes.as_array().cloned().unwrap_or_default();
        rows.len() == 2
            && rows.iter().all(|n| n["live"] == true)
            && rows
                .iter()
                .map(|n| n["partitions"].as_i64().unwrap_or(0))
                .sum::<i64>()
                == 8
            && rows[0]["node_id"] == "a"
            && rows[0]["published"].as_i64() >= Some(11)
    };
    assert!(wait_until(20, both_live), "{}", cluster_status(&b));
    let dom = chromium_dom(&format!("http://{}/", http_of(&b)));
    let table = dom
        .split("<table id=\"cluster-nodes\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no cluster table\n{dom}"));
    for id in ["a", "b"] {
        assert!(
            table.contains(&format!("<td class=\"node\">{id}</td>")),
            "{table}"
        );
    }
    assert!(table.contains("live (lease"), "{table}");
    let rows = published_rows(&pg, "a");
    assert_eq!(rows.len(), 10);
    for uid in claimed {
        assert_eq!(rows[uid].2.as_deref(), Some("b-1"), "{uid}: {rows:?}");
    }

    // A clean stop with everything published: nobody takes a over.
    a.signal(rustix::process::Signal::TERM);
    assert!(a.wait_exit(20).is_some(), "{}", a.log());
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
    std::thread::sleep(Duration::from_secs(6)); // past two leases: b has looked
    assert_eq!(
        cluster_status(&b)["taken_over"].as_u64(),
        Some(taken),
        "{}",
        b.log()
    );
}

/// Issue 15 item 2: records left out of the full in-memory queue (here `max_unpublished = 2`,
/// while the database is down) were published only at the next start. Once the database has
/// taken the queue, the node now rescans its own folder and publishes what it left out, and a
/// clean stop then counts as having published everything (no takeover needed).
#[test]
fn records_left_out_of_a_full_queue_are_published_by_a_rescan() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let a_dir = shared.path().join("nodes").join("a");
    let toml = format!(
        "{}max_unpublished = 2\n",
        cluster_toml(&pg, shared.path(), "a")
    );
    let mut a = start_ready(&a_dir, &toml);
    let files = tempfile::tempdir().unwrap();
    let batch = |from: u32, to: u32| mixed_batch(files.path(), from, to);
    assert!(storescu_status(&a, &batch(0, 2)).success(), "{}", a.log());
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 2),
        "{}",
        a.log()
    );
    pg.stop();
    assert!(storescu_status(&a, &batch(2, 12)).success(), "{}", a.log());
    assert!(
        wait_until(20, || cluster_status(&a)["left_out"] == 8
            && cluster_status(&a)["unpublished"] == 2),
        "{}",
        cluster_status(&a)
    );
    pg.start_again();
    assert!(
        wait_until(30, || published_rows(&pg, "a").len() == 12),
        "{} rows: {:?}\n{}",
        published_rows(&pg, "a").len(),
        cluster_status(&a),
        a.log()
    );
    assert!(
        wait_until(10, || cluster_status(&a)["rescanned"] == 8),
        "{}",
        cluster_status(&a)
    );
    for (uid, (location, _, _)) in published_rows(&pg, "a") {
        assert!(
            location.starts_with("patients/") && location.ends_with(&format!("{uid}.dcm")),
            "{uid}: {location}"
        );
    }
    a.signal(rustix::process::Signal::TERM);
    assert!(a.wait_exit(20).is_some(), "{}", a.log());
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
}

/// TLS to the cluster database (issue 15; it was `NoTls` only), and the password from a file:
/// a server that takes TCP clients only over TLS with a client certificate of the test CA and
/// the user's password. A coordinator gets in only with `tls_ca`, a client certificate and the
/// right password file, and only when the server's certificate chains to that CA and names the
/// host it dialled; the server then sees the connection as TLS. A node configured so publishes
/// what it acknowledges, and says its link is TLS (status JSON, `/metrics`); a `tls_ca` that
/// cannot be read is refused at start-up naming the field.
#[test]
fn the_cluster_database_is_reached_over_tls_verified_against_tls_ca() {
    use common::*;
    let pki = Pki::new();
    let pg = Postgres::start_tls(&pki);
    let tcp = |host: &str| format!("host={host} port={} user=postgres dbname=postgres", pg.port);
    let tls = |ca: &str, client: bool| {
        let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
        dicomgate::net::tls::client_config(
            ["tls_ca", "tls_certificate", "tls_private_key"],
            &pki.path(ca),
            client.then_some((cert.as_path(), key.as_path())),
        )
        .unwrap()
    };
    // The password comes from a file (and a wrong one is refused).
    let secrets = tempfile::tempdir().unwrap();
    let (pw, wrong) = (secrets.path().join("pw"), secrets.path().join("wrong"));
    std::fs::write(&pw, "it's s3cret\n").unwrap();
    std::fs::write(&wrong, "not it\n").unwrap();
    pg.client()
        .batch_execute("ALTER USER postgres PASSWORD 'it''s s3cret'")
        .unwrap();
    let connect_with =
        |conninfo: &str, tls: Option<&std::sync::Arc<rustls::ClientConfig>>, password: &Path| {
            let db = dicomgate::cluster::Database {
                conninfo: conninfo.to_string(),
                tls: tls.cloned(),
                password_file: Some(password.to_path_buf()),
            };
            Coordinator::connect_to(&db, "a", 8, Duration::from_secs(2))
        };
    let connect = |conninfo: &str, tls: Option<&std::sync::Arc<rustls::ClientConfig>>| {
        connect_with(conninfo, tls, &pw)
    };
    let refused = |r: Result<Coordinator, ClusterError>| match r {
        Ok(mut c) => panic!("connected (TLS: {:?})", c.tls_in_use()),
        Err(e) => format!("{e:?}"),
    };
    // The server's own rules: no plain TCP, no TLS without a client certificate.
    let plain = refused(connect(&tcp("127.0.0.1"), None));
    assert!(plain.contains("no encryption"), "{plain}");
    let anonymous = refused(connect(&tcp("127.0.0.1"), Some(&tls("ca.pem", false))));
    assert!(anonymous.contains("certificate"), "{anonymous}");
    // Ours: the server's certificate must chain to tls_ca and name the host.
    let untrusted = refused(connect(&tcp("127.0.0.1"), Some(&tls("other-ca.pem", true))));
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
    let other_name = refused(connect(&tcp("127.0.0.2"), Some(&tls("ca.pem", true))));
    assert!(other_name.contains("NotValidForName"), "{other_name}");
    let bad_password = refused(connect_with(
        &tcp("127.0.0.1"),
        Some(&tls("ca.pem", true)),
        &wrong,
    ));
    assert!(
        bad_password.contains("password authentication failed"),
        "{bad_password}"
    );
    // No downgrade: a server that answers the TLS request with "no" (as a man in the middle
    // would) is refused, whatever sslmode says, rather than talked to in plain text.
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_port = fake.local_addr().unwrap().port();
    let answered = std::thread::spawn(move || {
        let mut n = 0;
        for conn in fake.incoming().take(2) {
            let mut conn = conn.unwrap();
            let mut request = [0u8; 8];
            std::io::Read::read_exact(&mut conn, &mut request).unwrap();
            assert_eq!(request[4..], [0x04, 0xd2, 0x16, 0x2f], "an SSLRequest");
            std::io::Write::write_all(&mut conn, b"N").unwrap();
            n += 1;
        }
        n
    });
    for mode in ["", " sslmode=prefer"] {
        let fake_db = format!("host=127.0.0.1 port={fake_port} user=postgres{mode}");
        let e = refused(connect(&fake_db, Some(&tls("ca.pem", true))));
        assert!(e.contains("server does not support TLS"), "{mode}: {e}");
    }
    assert_eq!(answered.join().unwrap(), 2);
    for host in ["127.0.0.1", "localhost"] {
        let mut c = connect(&tcp(host), Some(&tls("ca.pem", true)))
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(
            c.tls_in_use().unwrap(),
            "{host}: the server sees a plain connection"
        );
        c.rebalance().unwrap();
        c.leave(true).unwrap();
    }

    // A node, end to end.
    let shared = tempfile::tempdir().unwrap();
    let node_dir = shared.path().join("nodes").join("b");
    let toml = |ca: &str| {
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[trigger]\nquiet_seconds = 600\n\
             on_association_close = false\n\
             [cluster]\npostgres = {:?}\nnode_id = \"b\"\n\
             shared_dir = {:?}\npartitions = 8\nlease_seconds = 2\ntls_ca = {:?}\n\
             tls_certificate = {:?}\ntls_private_key = {:?}\npassword_file = {:?}\n",
            tcp("localhost"),
            shared.path().display().to_string(),
            pki.s(ca),
            pki.s("client.pem"),
            pki.s("client.key"),
            pw.display().to_string(),
        )
    };
    let node = start_ready(&node_dir, &toml("ca.pem"));
    let files = tempfile::tempdir().unwrap();
    let sent: Vec<PathBuf> = (0..3).map(|i| mixed_instance(files.path(), i)).collect();
    assert!(storescu_status(&node, &sent).success(), "{}", node.log());
    assert!(
        wait_until(20, || published_rows(&pg, "b").len() == 3),
        "published: {:?}\n{}",
        published_rows(&pg, "b"),
        node.log()
    );
    let status = cluster_status(&node);
    assert_eq!(status["tls"], true, "{status}");
    let (code, metrics) = http_get(&http_of(&node), "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l == "dicomgate_cluster_tls 1"),
        "{metrics}"
    );
    drop(node);

    let cfg = shared.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"127.0.0.1:0\"\n{}",
            toml("ca.pem").replace(&pki.s("ca.pem"), "/nonexistent/ca.pem")
        ),
    )
    .unwrap();
    let err = refused_at_start_up(&cfg);
    assert!(
        err.contains("cluster.tls_ca /nonexistent/ca.pem: cannot be read"),
        "{err}"
    );
}

/// A TCP port forwarding to the test server's Unix socket, which the test can cut: every
/// connection through it is shut down and new ones are closed at once (a node cut off from
/// the database, not from its senders or the shared folder).
struct Cuttable {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cuttable {
    fn new(pg: &Postgres) -> Cuttable {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let socket = pg.socket_dir.join(format!(".s.PGSQL.{}", pg.port));
        let open = std::sync::Arc::new(AtomicBool::new(true));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(unix) = std::os::unix::net::UnixStream::connect(&socket) else {
                    continue;
                };
                {
                    // Checked again under the lock `cut` drains: a connection accepted as
                    // the cut began is either drained by it or dropped here.
                    let mut conns = c.lock().unwrap();
                    if !o.load(Ordering::SeqCst) {
                        continue;
                    }
                    conns.push(tcp.try_clone().unwrap());
                }
                let (mut tr, mut tw) = (tcp.try_clone().unwrap(), tcp);
                let (mut ur, mut uw) = (unix.try_clone().unwrap(), unix);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut tr, &mut uw);
                    let _ = uw.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut ur, &mut tw);
                    let _ = tw.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Cuttable { port, open, conns }
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// New connections get through again.
    fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// `dicomgate store` to `node`: whether every store succeeded, and what it printed.
fn dicomgate_store(node: &common::Node, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["store", &format!("127.0.0.1:{}", node.port())])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issue 15's documented takeover gap, closed (`cluster::fence`): a node cut off from the
/// database (but not from its senders or the shared folder) goes on acknowledging; another
/// node takes it over two leases later, writing a fence into its folder before listing it;
/// from then on the cut-off node refuses stores (0xA700, kind "fenced"), so when it dies
/// before reaching the database again, every instance it acknowledged has been published
/// under its id, and none it refused was acknowledged. Without the fence, the stores after
/// the listing were acknowledged and published by nobody.
#[test]
fn a_node_taken_over_while_cut_off_from_the_database_acknowledges_nothing_more() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let proxy = Cuttable::new(&pg);
    let a_dir = shared.path().join("nodes").join("a");
    let a_toml = cluster_toml(&pg, shared.path(), "a").replace(&pg.conninfo(), &proxy.conninfo());
    let mut a = start_ready(&a_dir, &a_toml);
    let b = start_ready(
        &shared.path().join("nodes").join("b"),
        &cluster_toml(&pg, shared.path(), "b"),
    );
    let files = tempfile::tempdir().unwrap();
    let batch = |from: u32, to: u32| mixed_batch(files.path(), from, to);
    let uids = |from: u32, to: u32| sop_uids(&batch(from, to));
    let (ok, out) = dicomgate_store(&a, &batch(0, 2));
    assert!(ok, "{out}\n{}", a.log());
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 2),
        "{}",
        a.log()
    );

    proxy.cut();
    // Cut off: still acknowledged (durable locally), waiting for publication.
    let (ok, out) = dicomgate_store(&a, &batch(2, 4));
    assert!(ok, "{out}\n{}", a.log());
    assert!(
        wait_until(30, || takeover_row(&pg, "a").0),
        "no takeover: {:?}\n{}",
        takeover_row(&pg, "a"),
        b.log()
    );
    assert!(a_dir.join("cluster-fence").is_file());
    // Taken over: node a, alive but still cut off, acknowledges nothing more.
    let (ok, out) = dicomgate_store(&a, &batch(4, 6));
    assert!(!ok, "acknowledged after the takeover: {out}");
    assert!(out.contains("stored 0, failed 2"), "{out}");
    let (_, metrics) = http_get(&http_of(&a), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dicomgate_store_errors_total{kind=\"fenced\"} ")),
        "{metrics}"
    );
    // Not ready either, so that a load balancer sends its senders elsewhere.
    let (status, body) = http_get(&http_of(&a), "/readyz");
    assert!(status == 503 && body.contains("fenced"), "{status} {body}");
    a.kill9();

    // Every instance node a acknowledged is in the database (the takeover published it).
    let published: std::collections::BTreeSet<String> =
        published_rows(&pg, "a").into_keys().collect();
    assert_eq!(published, uids(0, 4), "{}", b.log());
}

/// Regression (flaky before: about 1 run in 4 of the test below): a clean stop left the
/// cluster as a node to take over whenever a thread other than ingest took more than a second
/// to end (the `owner` thread in a database round, a worker in an export). The `cluster`
/// thread is told to stop a second into the grace at the latest, and it left at once, before
/// ingest was known to have ended, so its leave could not say that everything was published.
/// Here a worker is held by a downstream that never answers, past the stop: the node still
/// leaves cleanly (its row says nobody need take it over), since ingest ended at once.
#[test]
fn a_clean_stop_leaves_the_cluster_cleanly_while_an_export_holds_a_worker() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in silent.incoming().take(4) {
            conns.push(c);
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_secs(120));
    });
    let toml = format!(
        "{}[[input]]\nname = \"all\"\nmin_instances = 2\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{silent_port}\"\nae_title = \"SILENT\"\n",
        cluster_toml(&pg, shared.path(), "a").replace("quiet_seconds = 600", "quiet_seconds = 1")
    );
    let mut a = Node::start_with_data_dir_and_node(
        &shared.path().join("nodes").join("a"),
        "drain_seconds = 1",
        &toml,
    );
    assert!(wait_until(20, || ready(&a)), "{}", a.log());
    let files = tempfile::tempdir().unwrap();
    // Two instances of each of 5 patients.
    let (ok, out) = dicomgate_store(&a, &mixed_batch(files.path(), 0, 10));
    assert!(ok, "{out}\n{}", a.log());
    assert!(
        wait_until(30, || accepted.load(std::sync::atomic::Ordering::SeqCst)),
        "the export never reached the downstream\n{}",
        a.log()
    );
    a.signal(rustix::process::Signal::TERM);
    assert!(a.wait_exit(30).is_some(), "{}", a.log());
    assert!(
        a.log().contains("a thread is still waiting on a peer"),
        "the export did not hold a worker past the grace, so this shows nothing\n{}",
        a.log()
    );
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
}

/// Cluster node `a` in `shared` with `drain_seconds = 1` and the debug build's fault-injection
/// switch `var` set to `value`, once ready.
fn node_with_switch(pg: &Postgres, shared: &Path, var: &str, value: &str) -> common::Node {
    let mut a = common::Node::start_with_data_dir_and_node(
        &shared.join("nodes").join("a"),
        "drain_seconds = 1",
        &cluster_toml(pg, shared, "a"),
    );
    a.restart_with_env(&[(var, value)]);
    assert!(common::wait_until(20, || ready(&a)), "{}", a.log());
    a
}

/// The other half of the fix above: ingest itself may end late, after the `cluster` thread
/// has been told to stop (1 s into the grace). Here a connection still open when the drain
/// ends (`drain_seconds = 1`) keeps a reactor running into the stop, and the debug build's
/// `DICOMGATE_TEST_SLOW_REACTOR_END_MS` makes it end 1.8 s later. The thread used to leave at
/// once, as a node to take over; it now publishes and renews until ingest has ended, then
/// leaves cleanly.
#[cfg_attr(
    not(debug_assertions),
    ignore = "needs the debug build's DICOMGATE_TEST_SLOW_REACTOR_END_MS"
)]
#[test]
fn a_clean_stop_waits_for_ingest_to_end_before_it_leaves_the_cluster() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let mut a = node_with_switch(
        &pg,
        shared.path(),
        "DICOMGATE_TEST_SLOW_REACTOR_END_MS",
        "1800",
    );
    let files = tempfile::tempdir().unwrap();
    let (ok, out) = dicomgate_store(&a, &mixed_batch(files.path(), 0, 4));
    assert!(ok, "{out}\n{}", a.log());
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 4),
        "{}",
        a.log()
    );
    // Open, silent: the drain ends with it still open.
    let _open = std::net::TcpStream::connect(a.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a.signal(rustix::process::Signal::TERM);
    assert!(a.wait_exit(30).is_some(), "{}", a.log());
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
}

/// Review of the sixteenth session: a reactor stopping with events parked in its overflow
/// (its handoff queue full) dropped them, acknowledged stores among them; ingest then drained
/// the queue, and the node left the cluster saying everything was published. Here ingest
/// stalls (the debug build's `DICOMGATE_TEST_INGEST_STALL_UNTIL_STOP_MS`) until the stop and
/// 300 ms more, so both reactors' queues (4096 events each) fill and overflow under 8
/// associations of tiny stores; the stop comes then. Now the stopping reactor hands its
/// overflow to ingest once there is room: the leave is clean, and every acknowledged store
/// is published.
#[cfg_attr(
    not(debug_assertions),
    ignore = "needs the debug build's DICOMGATE_TEST_INGEST_STALL_UNTIL_STOP_MS"
)]
#[test]
fn a_stopping_reactor_hands_its_overflow_to_ingest_and_every_acknowledged_store_is_published() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let mut a = node_with_switch(
        &pg,
        shared.path(),
        "DICOMGATE_TEST_INGEST_STALL_UNTIL_STOP_MS",
        "300",
    );
    let load = Command::new(env!("CARGO_BIN_EXE_dicomgate-loadgen"))
        .arg(format!("127.0.0.1:{}", a.port()))
        .args(["--associations", "8", "--instances", "1200", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stored = || -> u64 {
        http_get(&http_of(&a), "/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix("dicomgate_instances_stored_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // Both queues full and reading paused: the count holds still above 2 × 4096.
    let mut last = 0;
    assert!(
        wait_until(120, || {
            let now = stored();
            let still = now == last && now > 2 * 4096;
            last = now;
            std::thread::sleep(Duration::from_millis(500));
            still
        }),
        "stored {last}\n{}",
        a.log()
    );
    a.signal(rustix::process::Signal::TERM);
    let out = load.wait_with_output().unwrap();
    assert!(a.wait_exit(30).is_some(), "{}", a.log());
    let json = String::from_utf8_lossy(&out.stdout);
    let acknowledged: usize = json
        .split("\"instances\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("loadgen said: {json}"));
    assert!(acknowledged > 2 * 4096, "{json}");
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
    let mut published = 0;
    assert!(
        wait_until(10, || {
            published = published_rows(&pg, "a").len();
            published == acknowledged
        }),
        "{acknowledged} acknowledged, {published} published\n{}",
        a.log()
    );
}

/// Issue 15's two cases where nobody would take a node over (`cluster::fence`, its
/// `cluster-live` mark): a node started with a new folder while the cluster database is away
/// (the database does not know it yet), and one started again after a clean leave (its row
/// says everything is published). Either, cut off from the database, once acknowledged what
/// no other node would ever publish should it die before reaching the database. Now it
/// refuses stores (0xA700) and is not ready until its first renewal, and then acknowledges
/// and publishes them. A node restarted after a crash still acknowledges at once (it would be
/// taken over).
#[test]
fn a_node_cut_off_from_the_database_when_new_or_after_a_clean_leave_acknowledges_nothing_until_it_reaches_it(
) {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let proxy = Cuttable::new(&pg);
    let a_dir = shared.path().join("nodes").join("a");
    let a_toml = cluster_toml(&pg, shared.path(), "a").replace(&pg.conninfo(), &proxy.conninfo());
    let files = tempfile::tempdir().unwrap();
    let batch = |from: u32, to: u32| mixed_batch(files.path(), from, to);
    let uids = |from: u32, to: u32| sop_uids(&batch(from, to));
    let refused_until_connected = |a: &Node, from: u32, to: u32| {
        let (ok, out) = dicomgate_store(a, &batch(from, to));
        assert!(!ok, "acknowledged while cut off: {out}");
        assert!(
            out.contains(&format!("stored 0, failed {}", to - from)),
            "{out}"
        );
        let (status, body) = http_get(&http_of(a), "/readyz");
        assert!(
            status == 503 && body.contains("has not reached the cluster database"),
            "{status} {body}"
        );
        proxy.reopen();
        assert!(wait_until(20, || ready(a)), "{}", a.log());
        let (ok, out) = dicomgate_store(a, &batch(from, to));
        assert!(ok, "{out}\n{}", a.log());
    };

    // A new node folder, the database away.
    proxy.cut();
    let mut a = Node::start_with_data_dir(&a_dir, &a_toml);
    refused_until_connected(&a, 0, 2);
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 2),
        "{}",
        a.log()
    );

    // A clean leave with everything published (nobody takes a over), then a start with the
    // database away.
    assert!(a_dir.join("cluster-live").is_file());
    a.signal(rustix::process::Signal::TERM);
    assert!(a.wait_exit(20).is_some(), "{}", a.log());
    assert_eq!(takeover_row(&pg, "a"), (true, None), "{}", a.log());
    proxy.cut();
    a.restart();
    refused_until_connected(&a, 2, 4);
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 4),
        "{}",
        a.log()
    );

    // Killed (-9) instead, then started with the database away: acknowledged at once, as
    // before (another node would take it over, fencing it first), and published once the
    // database is back.
    a.kill9();
    proxy.cut();
    a.restart();
    let (ok, out) = dicomgate_store(&a, &batch(4, 6));
    assert!(ok, "refused after a crash: {out}\n{}", a.log());
    proxy.reopen();
    assert!(
        wait_until(20, || published_rows(&pg, "a").len() == 6),
        "{}",
        a.log()
    );
    let published: std::collections::BTreeSet<String> =
        published_rows(&pg, "a").into_keys().collect();
    assert_eq!(published, uids(0, 6));
}

/// Issue 15, "PostgreSQL with a replica": the cluster database's primary crashes in the
/// middle of a load and its synchronous standby is promoted. Two nodes, given both servers in
/// a multi-host connection string (`target_session_attrs=read-write`), acknowledge locally
/// while neither takes writes, then reach the promoted standby and go on there: the rows
/// published to the old primary are all there (the patients, complete only with them, are
/// processed), what was acknowledged meanwhile is published, and each of the 5 patients is
/// processed once with all 6 of its instances and exported byte-exact. (With an asynchronous
/// standby this test would pass as often as the standby had caught up when the primary died:
/// it shows that a failover works, not that a synchronous standby is needed.)
#[test]
fn a_database_failover_to_a_synchronous_standby_loses_no_published_row_and_processes_each_patient_once(
) {
    let (primary, standby) = Postgres::start_with_sync_standby();
    let both = either(&primary, &standby);
    let logs = outage_mid_load(
        &primary,
        &both,
        || {},
        || primary.crash(),
        || standby.promote(),
        &standby,
    );
    // Each node lost its connection and reached the promoted standby, which had every commit
    // it saw.
    for id in ["a", "b"] {
        let log = node_log_of(&logs, id);
        assert!(
            log.contains("connected to the cluster database again"),
            "node {id} never reconnected\n{logs}"
        );
        assert!(
            !log.contains(LOST_COMMITS),
            "node {id}: {LOST_COMMITS}?\n{logs}"
        );
    }
}

/// A failover to a standby that lost a patient's processing: the patient's first instance was
/// published and replicated, then (replication cut) its second arrived, and the patient was
/// claimed, processed, exported and done, and the node released its copies and forgot the
/// rows. The promoted standby has the first row again, pending, with no bytes behind it: left,
/// the patient would wait for ever for an instance nobody can read. The node's rescan after
/// the rewind finds its folder empty and forgets that row; the patient is not processed again.
#[test]
fn after_a_rewind_a_node_forgets_the_rows_of_copies_it_had_already_released() {
    use common::*;
    let (primary, standby, link) = Postgres::start_with_cuttable_async_standby();
    let both = either(&primary, &standby);
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (script, runs_log) = runs_script(tmp.path(), 0);
    let toml = format!(
        "{}[[input]]\nname = \"all\"\nmin_instances = 2\n\
         [processing]\ncommand = [\"sh\", {:?}, \"a\"]\ntimeout_seconds = 60\n\
         [[export]]\nkind = \"folder\"\npath = {:?}\n",
        cluster_toml(&primary, shared.path(), "a")
            .replace(&primary.conninfo(), &both)
            .replace("quiet_seconds = 600", "quiet_seconds = 1"),
        script.display().to_string(),
        tmp.path().join("export").display().to_string()
    );
    let dir = shared.path().join("nodes").join("a");
    let a = start_ready(&dir, &toml);
    let files = tempfile::tempdir().unwrap();
    let rows = |pg: &Postgres| -> i64 {
        pg.client()
            .query_one("SELECT count(*) FROM dicomgate_instances", &[])
            .unwrap()
            .get(0)
    };
    let first = mixed_instance(files.path(), 0);
    assert!(storescu_status(&a, &[first]).success(), "{}", a.log());
    assert!(wait_until(20, || rows(&primary) == 1), "{}", a.log());
    primary.wait_replayed_by(&standby);
    link.cut();
    let second = mixed_instance(files.path(), 5);
    assert!(storescu_status(&a, &[second]).success(), "{}", a.log());
    let runs = || runs_of(&std::fs::read_to_string(&runs_log).unwrap_or_default());
    let pending = || {
        dicomgate::storage::inventory::pending(&dir)
            .map(|(e, _)| e.len())
            .unwrap_or(usize::MAX)
    };
    assert!(
        wait_until(30, || runs().len() == 1
            && rows(&primary) == 0
            && pending() == 0),
        "runs {:?}, rows {}, pending {}\n{}",
        runs(),
        rows(&primary),
        pending(),
        a.log()
    );
    assert_eq!(runs()[0].uids.len(), 2);
    primary.crash();
    standby.promote();
    assert_eq!(rows(&standby), 1, "the standby has the first row, pending");
    assert!(
        wait_until(30, || rows(&standby) == 0),
        "rows on the promoted standby: {}\n{}",
        rows(&standby),
        a.log()
    );
    assert!(a.log().contains(LOST_COMMITS), "{}", a.log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(runs().len(), 1, "processed once\n{}", a.log());
}

/// A multi-host connection string to whichever of `primary` and `standby` takes writes (as
/// docs/cluster.md advises for a deployment with a standby).
fn either(primary: &Postgres, standby: &Postgres) -> String {
    format!(
        "host={},{} port={},{} user=postgres dbname=postgres target_session_attrs=read-write",
        primary.socket_dir.display(),
        standby.socket_dir.display(),
        primary.port,
        standby.port
    )
}

/// What a node logs when it finds that the database lost commits it saw.
const LOST_COMMITS: &str = "the cluster database lost commits this node saw";

/// Node `id`'s part of [`node_logs`]'s text.
fn node_log_of<'a>(logs: &'a str, id: &str) -> &'a str {
    logs.split("--- node ")
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no log of node {id}\n{logs}"))
}

/// A failover to an *asynchronous* standby that never received the rounds the nodes
/// published: its replication is cut once the nodes have joined, so the 15 rows published
/// before the primary crashes are not on it. Each node finds, at its first renewal there, that
/// the database holds fewer of its writes than it saw committed (`dicomgate_nodes.commits`),
/// and publishes again everything pending in its folder,
/// without a restart: every patient is processed once with all 6 instances. (Before this, the
/// lost rows came back only at a node's restart, and these patients never completed.)
#[test]
fn a_failover_to_a_standby_that_lost_published_rows_is_found_and_the_nodes_publish_them_again() {
    let (primary, standby, link) = Postgres::start_with_cuttable_async_standby();
    let both = either(&primary, &standby);
    let logs = outage_mid_load(
        &primary,
        &both,
        || {
            // The standby has the schema and the nodes' rows, and nothing after.
            primary.wait_replayed_by(&standby);
            link.cut();
        },
        || primary.crash(),
        || standby.promote(),
        &standby,
    );
    for id in ["a", "b"] {
        let log = node_log_of(&logs, id);
        assert!(
            log.contains(LOST_COMMITS),
            "node {id} found no loss\n{logs}"
        );
        assert!(
            log.contains("published a folder's pending instances (rescan)"),
            "node {id} did not rescan\n{logs}"
        );
    }
}

/// Issue 15 part 3, the owner side: three nodes on one database and one shared folder;
/// storescu (to two nodes) and pynetdicom (to the third) send 5 patients, each patient's
/// instances spread over all three nodes (small ones in segment logs, larger ones in files).
/// Each patient is processed once, by its partition's owner, with all its instances, and
/// exported to a downstream storescp byte-exact; then every node has released its copies (its
/// folder holds nothing pending) and the database has forgotten the rows and batches.
#[test]
fn a_patient_spread_over_three_nodes_is_processed_once_by_its_owner_with_all_its_instances() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let runs_log = tmp.path().join("runs.log");
    let script = tmp.path().join("process.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nn=$(find \"$DICOMGATE_INPUT_DIR\" -name '*.dcm' | wc -l)\n\
             echo \"$DICOMGATE_PATIENT_ID $n $DICOMGATE_BATCH_ID\" >> {runs_log:?}\n\
             cp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n"
        ),
    )
    .unwrap();
    let pacs_port = free_port();
    let pacs_dir = tmp.path().join("pacs");
    let _pacs = storescp(&pacs_dir, pacs_port, "PACS");
    let toml = |id: &str| {
        format!(
            "{}[[input]]\nname = \"all\"\nmin_instances = 6\n\
             [processing]\ncommand = [\"sh\", {:?}]\ntimeout_seconds = 60\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n",
            cluster_toml(&pg, shared.path(), id).replace("quiet_seconds = 600", "quiet_seconds = 1"),
            script.display().to_string()
        )
    };
    let ids = ["a", "b", "c"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| start_ready(&shared.path().join("nodes").join(id), &toml(id)))
        .collect();
    let logs = || node_logs(&nodes, &ids);
    let files = tempfile::tempdir().unwrap();
    let all = mixed_batch(files.path(), 0, 30);
    let to = |n: usize| -> Vec<PathBuf> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == n)
            .map(|(_, f)| f.clone())
            .collect()
    };
    // Sufficiency is by count (6 instances), not by timing: the pauses between the senders are
    // longer than `quiet_seconds`, so the owner evaluates every patient while it is still partial
    // (a slow CI machine once did so by chance) and must leave it collecting.
    let pause = || std::thread::sleep(Duration::from_millis(1500));
    assert!(storescu_status(&nodes[0], &to(0)).success(), "{}", logs());
    pause();
    assert!(storescu_status(&nodes[1], &to(1)).success(), "{}", logs());
    pause();
    let out = python()
        .arg(py_script("send.py"))
        .args([nodes[2].port().as_str(), "DICOMGATE"])
        .args(to(2))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.lines().count() == 10 && text.lines().all(|l| l.starts_with("0 ")),
        "pynetdicom: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let received = || files_under(&pacs_dir);
    assert!(
        wait_until(90, || received().len() == 30),
        "storescp got {}\nruns: {}\n{}",
        received().len(),
        std::fs::read_to_string(&runs_log).unwrap_or_default(),
        logs()
    );
    // Settled: nothing processed twice, each patient once with its 6 instances.
    std::thread::sleep(Duration::from_secs(3));
    let runs = std::fs::read_to_string(&runs_log).unwrap();
    let mut per_patient: Vec<(String, usize)> = runs
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (
                w.next().unwrap().to_string(),
                w.next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    per_patient.sort();
    let expected: Vec<(String, usize)> = (0..5).map(|p| (format!("P{p}"), 6)).collect();
    assert_eq!(per_patient, expected, "runs:\n{runs}\n{}", logs());
    let by_uid: std::collections::BTreeMap<String, PathBuf> = received()
        .into_iter()
        .map(|p| (sop_uid_of(&p), p))
        .collect();
    for f in &all {
        let got = by_uid.get(&sop_uid_of(f)).expect("instance delivered");
        assert_eq!(data_set_of(f), data_set_of(got), "{}", f.display());
    }
    // Every node released its copies, and the database forgot them.
    let pending = |id: &str| {
        dicomgate::storage::inventory::pending(&shared.path().join("nodes").join(id))
            .map(|(e, _)| e.len())
            .unwrap_or(usize::MAX)
    };
    let count = |sql: &str| -> i64 { pg.client().query_one(sql, &[]).unwrap().get(0) };
    assert!(
        wait_until(20, || {
            ids.iter().all(|id| pending(id) == 0)
                && count("SELECT count(*) FROM dicomgate_instances") == 0
                && count("SELECT count(*) FROM dicomgate_batches") == 0
        }),
        "pending: {:?}, rows {}, batches {}\n{}",
        ids.iter().map(|id| pending(id)).collect::<Vec<_>>(),
        count("SELECT count(*) FROM dicomgate_instances"),
        count("SELECT count(*) FROM dicomgate_batches"),
        logs()
    );
    // No batch left on any node.
    for id in ids {
        let batches = shared.path().join("nodes").join(id).join("batches");
        assert_eq!(
            std::fs::read_dir(&batches).map_or(0, |d| d.count()),
            0,
            "node {id}: {:?}",
            files_under(&batches)
        );
    }
}

/// A processing script in `dir` and the log it appends to: a line "start NODE BATCH PATIENT
/// NS UID..." (`NODE` is its first argument, `NS` the time in nanoseconds, then the SOP
/// Instance UIDs of its input), a pause of `sleep_s` seconds, a copy of its input to its
/// output, and a line "end NODE BATCH NS" ([`runs_of`] reads them).
fn runs_script(dir: &Path, sleep_s: u32) -> (PathBuf, PathBuf) {
    let runs_log = dir.join("runs.log");
    let script = dir.join("process.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\n\
             uids=$(find \"$DICOMGATE_INPUT_DIR\" -name '*.dcm' | sed 's|.*/||; s|[.]dcm$||' | sort | tr '\\n' ' ')\n\
             echo \"start $1 $DICOMGATE_BATCH_ID $DICOMGATE_PATIENT_ID $(date +%s%N) $uids\" >> {runs_log:?}\n\
             sleep {sleep_s}\n\
             cp -R \"$DICOMGATE_INPUT_DIR\"/. \"$DICOMGATE_OUTPUT_DIR\"/\n\
             echo \"end $1 $DICOMGATE_BATCH_ID $(date +%s%N)\" >> {runs_log:?}\n"
        ),
    )
    .unwrap();
    (script, runs_log)
}

/// The logs of `nodes` (named `ids`), one after the other.
fn node_logs(nodes: &[common::Node], ids: &[&str]) -> String {
    nodes
        .iter()
        .zip(ids)
        .map(|(n, id)| format!("--- node {id}\n{}", n.log()))
        .collect()
}

/// One run of the processing command, as [`runs_script`] logs it.
#[derive(Debug, Clone)]
struct Run {
    node: String,
    batch: String,
    patient: String,
    start_ns: u128,
    end_ns: Option<u128>,
    uids: std::collections::BTreeSet<String>,
}

/// The runs `log` holds (lines "start NODE BATCH PATIENT NS UID..." and "end NODE BATCH NS").
fn runs_of(log: &str) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for l in log.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.first() {
            Some(&"start") if w.len() >= 5 => runs.push(Run {
                node: w[1].into(),
                batch: w[2].into(),
                patient: w[3].into(),
                start_ns: w[4].parse().unwrap(),
                end_ns: None,
                uids: w[5..].iter().map(|u| u.to_string()).collect(),
            }),
            Some(&"end") if w.len() == 4 => {
                if let Some(r) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.node == w[1] && r.batch == w[2] && r.end_ns.is_none())
                {
                    r.end_ns = Some(w[3].parse().unwrap());
                }
            }
            _ => {}
        }
    }
    runs
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Issue 15, "what it must show": kill -9 of one node in the middle of the load. Three nodes
/// on one PostgreSQL and one shared folder; 10 patients × 6 instances (small ones in the
/// segment log, large ones in files), each patient's instances spread over the three nodes;
/// the first 5 patients by storescu and pynetdicom, the next 5 by pynetdicom one association per
/// instance, a sender failing over to the next node when one does not answer (a load
/// balancer). Once the first batch runs (its processing takes 2 s), its node is killed (-9)
/// while it holds that batch claimed and instances are still arriving. Then: the partitions
/// the dead node owned move to the others; the batch it was running is adopted and run by the
/// new owner from the instances in the nodes' folders (the dead one's included); every
/// instance is exported to a DCMTK storescp byte-exact; every instance was in exactly one
/// batch (claims are exactly once; an adopted batch keeps its id and its instances); no batch
/// ran on two live nodes at once (the dead node's run is the only one beside another). Then
/// the dead node is started again: it does not run the batch it held again (another node
/// adopted it), its folder keeps no batch, and it releases its copies of the finished
/// batches, so no row is left in the database but those of instances it stored and never
/// acknowledged.
#[test]
fn kill_9_of_a_node_mid_load_moves_its_partitions_and_its_batch_and_every_instance_is_exported_once(
) {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (script, runs_log) = runs_script(tmp.path(), 2);
    let pacs_port = free_port();
    let pacs_dir = tmp.path().join("pacs");
    let _pacs = storescp(&pacs_dir, pacs_port, "PACS");
    let toml = |id: &str| {
        format!(
            "{}[[input]]\nname = \"all\"\nmin_instances = 6\n\
             [processing]\ncommand = [\"sh\", {:?}, {id:?}]\ntimeout_seconds = 60\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n",
            cluster_toml(&pg, shared.path(), id).replace("quiet_seconds = 600", "quiet_seconds = 1"),
            script.display().to_string()
        )
    };
    let ids = ["a", "b", "c"];
    let mut nodes: Vec<Node> = ids
        .iter()
        .map(|id| start_ready(&shared.path().join("nodes").join(id), &toml(id)))
        .collect();
    let logs = |nodes: &[Node]| node_logs(nodes, &ids);
    let files = tempfile::tempdir().unwrap();
    let all: Vec<PathBuf> = (0..60)
        .map(|i| instance_of(files.path(), i, i % 2 == 1, 10))
        .collect();
    // Patients 0-4 (instances whose index mod 10 is below 5) first, the others during the kill.
    let share = |first: bool, n: usize| -> Vec<PathBuf> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| ((i % 10) < 5) == first && i % 3 == n)
            .map(|(_, f)| f.clone())
            .collect()
    };
    assert!(
        storescu_status(&nodes[0], &share(true, 0)).success(),
        "{}",
        logs(&nodes)
    );
    assert!(
        storescu_status(&nodes[1], &share(true, 1)).success(),
        "{}",
        logs(&nodes)
    );
    let out = python()
        .arg(py_script("send.py"))
        .args([nodes[2].port().as_str(), "DICOMGATE"])
        .args(share(true, 2))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.lines().count() == 10 && text.lines().all(|l| l.starts_with("0 ")),
        "pynetdicom: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The second half: one association per instance, failing over to the next node.
    let ports: Vec<String> = nodes.iter().map(|n| n.port()).collect();
    // Each file with the node that acknowledged it and the nodes that did not answer before.
    type Acked = Vec<(PathBuf, usize, Vec<usize>)>;
    let senders: Vec<std::thread::JoinHandle<Acked>> = (0..3)
        .map(|n| {
            let files = share(false, n);
            let ports = ports.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for f in files {
                    let mut refused = Vec::new();
                    let mut at = None;
                    'tries: for _round in 0..20 {
                        for k in 0..3 {
                            let node = (n + k) % 3;
                            let out = python()
                                .arg(py_script("send.py"))
                                .args([ports[node].as_str(), "DICOMGATE"])
                                .arg(&f)
                                .output()
                                .unwrap();
                            if String::from_utf8_lossy(&out.stdout).starts_with("0 ") {
                                at = Some(node);
                                break 'tries;
                            }
                            refused.push(node);
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    acked.push((f, at.expect("acknowledged by a node"), refused));
                }
                acked
            })
        })
        .collect();
    // The first batch to run: its node is killed while it runs (2 s) and the load goes on.
    let mut first: Option<Run> = None;
    assert!(
        wait_until(60, || {
            first = runs_of(&std::fs::read_to_string(&runs_log).unwrap_or_default())
                .into_iter()
                .next();
            first.is_some()
        }),
        "no batch ran\n{}",
        logs(&nodes)
    );
    let first = first.unwrap();
    let dead = ids.iter().position(|id| *id == first.node).unwrap();
    nodes[dead].kill9();
    let killed_ns = now_ns();
    // Its partitions move to the live nodes.
    let orphaned = || -> i64 {
        pg.client()
            .query_one(
                "SELECT count(*) FROM dicomgate_partitions WHERE owner IS NULL OR owner = $1",
                &[&ids[dead]],
            )
            .unwrap()
            .get(0)
    };
    assert!(
        wait_until(30, || orphaned() == 0),
        "partitions: {:?}\n{}",
        owners(&pg),
        logs(&nodes)
    );
    eprintln!(
        "partitions moved {:.1} s after the kill (lease_seconds = 2)",
        (now_ns() - killed_ns) as f64 / 1e9
    );
    let acked: Acked = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    // Every instance exported, byte-exact.
    let received = || files_under(&pacs_dir);
    let delivered = || -> std::collections::BTreeSet<String> {
        received().iter().map(|p| sop_uid_of(p)).collect()
    };
    assert!(
        wait_until(120, || delivered().len() == 60),
        "storescp got {}\nruns: {}\n{}",
        delivered().len(),
        std::fs::read_to_string(&runs_log).unwrap_or_default(),
        logs(&nodes)
    );
    let by_uid: std::collections::BTreeMap<String, PathBuf> = received()
        .into_iter()
        .map(|p| (sop_uid_of(&p), p))
        .collect();
    for f in &all {
        assert_eq!(
            data_set_of(f),
            data_set_of(&by_uid[&sop_uid_of(f)]),
            "{}",
            f.display()
        );
    }
    std::thread::sleep(Duration::from_secs(3)); // anything run twice would show by now
    let log = std::fs::read_to_string(&runs_log).unwrap();
    let runs = runs_of(&log);
    // Exactly-once claims: each batch id one set of instances; the batches' sets disjoint and
    // together every instance, 6 each.
    let mut batches: std::collections::BTreeMap<&str, &std::collections::BTreeSet<String>> =
        Default::default();
    for r in &runs {
        let had = batches.entry(r.batch.as_str()).or_insert(&r.uids);
        assert_eq!(
            *had, &r.uids,
            "batch {} ran with other instances\n{log}",
            r.batch
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (b, uids) in &batches {
        assert_eq!(uids.len(), 6, "batch {b}\n{log}");
        for u in uids.iter() {
            assert!(seen.insert(u.clone()), "{u} in two batches\n{log}");
        }
    }
    assert_eq!(seen, sop_uids(&all), "{log}");
    // The dead node's batch was adopted and run by another node after the kill; no batch ran
    // on two live nodes at once.
    assert!(
        runs.iter()
            .any(|r| r.batch == first.batch && r.node != first.node && r.start_ns > killed_ns),
        "batch {} was not run again after the kill\n{log}\n{}",
        first.batch,
        logs(&nodes)
    );
    for (i, x) in runs.iter().enumerate() {
        for y in &runs[i + 1..] {
            if x.batch != y.batch || x.node == y.node {
                continue;
            }
            let dead_one = x.node == ids[dead] || y.node == ids[dead];
            let overlap = |a: &Run, b: &Run| {
                a.start_ns < b.end_ns.unwrap_or(u128::MAX)
                    && b.start_ns < a.end_ns.unwrap_or(u128::MAX)
            };
            assert!(
                dead_one || !overlap(x, y),
                "batch {} ran on {} and {} at once\n{log}",
                x.batch,
                x.node,
                y.node
            );
            if dead_one {
                let live = if x.node == ids[dead] { y } else { x };
                assert!(live.start_ns > killed_ns, "{log}");
            }
        }
    }
    // The dead node comes back: it does not run its old batch again (adopted elsewhere), keeps
    // no batch, and releases its copies of what was finished.
    let before = runs.len();
    nodes[dead].restart();
    assert!(
        wait_until(20, || ready(&nodes[dead])),
        "{}",
        nodes[dead].log()
    );
    let in_doubt: std::collections::BTreeSet<String> = acked
        .iter()
        .filter(|(_, _, refused)| refused.contains(&dead))
        .map(|(f, _, _)| sop_uid_of(f))
        .collect();
    let left = || -> Vec<(String, String, Option<String>)> {
        pg.client()
            .query(
                "SELECT node_id, sop_instance_uid, batch_id FROM dicomgate_instances ORDER BY 1, 2",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    // Left at most: rows of instances the dead node stored but whose acknowledgement the
    // sender never got (it sent them elsewhere): pending, each already exported.
    let settled = || {
        left()
            .iter()
            .all(|(n, u, b)| n == ids[dead] && b.is_none() && in_doubt.contains(u))
    };
    assert!(
        wait_until(30, settled),
        "rows left: {:?}\nin doubt: {in_doubt:?}\n{}",
        left(),
        logs(&nodes)
    );
    let node_batches =
        |id: &str| files_under(&shared.path().join("nodes").join(id).join("batches"));
    assert!(
        wait_until(20, || ids.iter().all(|id| node_batches(id).is_empty())),
        "{:?}\n{}",
        ids.iter().map(|id| node_batches(id)).collect::<Vec<_>>(),
        logs(&nodes)
    );
    let after = runs_of(&std::fs::read_to_string(&runs_log).unwrap());
    assert_eq!(
        after.len(),
        before,
        "a run after the restart: {:?}\n{}",
        &after[before..],
        logs(&nodes)
    );
}

/// A cluster batch whose export failed lands in the owner's `failed/` with its reason and is
/// marked done, so the storing node releases its own copies: the batch's copies are then the
/// only ones. `dicomgate retry` runs it again (the cluster database says it is done, by this
/// node): it is exported, never taken for one another node holds and deleted.
#[test]
fn a_failed_cluster_batch_retried_after_its_copies_were_released_is_exported() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let pacs_port = free_port();
    let toml = format!(
        "{}[[input]]\nname = \"all\"\nmin_instances = 4\n\
         [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n\
         [outbox]\nattempts = 1\nfirst_delay_seconds = 0.1\nmax_delay_seconds = 0.2\n",
        cluster_toml(&pg, shared.path(), "a").replace("quiet_seconds = 600", "quiet_seconds = 1")
    );
    let dir = shared.path().join("nodes").join("a");
    let node = start_ready(&dir, &toml);
    let files = tempfile::tempdir().unwrap();
    // Patient P0's instances 0, 5, 10, 15: two in the segment log, two in files.
    let sent: Vec<PathBuf> = (0..4)
        .map(|i| mixed_instance(files.path(), i * 5))
        .collect();
    assert!(storescu_status(&node, &sent).success(), "{}", node.log());
    let failed = || files_under(&dir.join("failed"));
    let pending = || {
        dicomgate::storage::inventory::pending(&dir)
            .map(|(e, _)| e.len())
            .unwrap_or(usize::MAX)
    };
    assert!(
        wait_until(30, || !failed().is_empty() && pending() == 0),
        "failed: {:?}, pending {}\n{}",
        failed(),
        pending(),
        node.log()
    );
    let id = std::fs::read_dir(dir.join("failed"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .unwrap();
    let pacs = tempfile::tempdir().unwrap();
    let _pacs = storescp(pacs.path(), pacs_port, "PACS");
    assert!(wait_until(10, || std::net::TcpStream::connect((
        "127.0.0.1",
        pacs_port
    ))
    .is_ok()));
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["retry", "--http", &http_of(&node), &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(30, || files_under(pacs.path()).len() == 4),
        "delivered {:?}\n{}",
        files_under(pacs.path()),
        node.log()
    );
    for f in &sent {
        let got = files_under(pacs.path())
            .into_iter()
            .find(|p| sop_uid_of(p) == sop_uid_of(f))
            .expect("delivered");
        assert_eq!(data_set_of(f), data_set_of(&got));
    }
    assert!(
        wait_until(10, || files_under(&dir.join("batches")).is_empty()
            && failed().is_empty()),
        "{}",
        node.log()
    );
}

/// Review of the owner side: a batch claimed in the cluster database that this node was not
/// running (its Build job lost: a claim whose commit answer was lost and whose records went
/// back to collecting, a worker gone; or adopted ids thrown away) stayed claimed for ever, and
/// its partition could never be handed over. The owner's sweep (every 5 s) now runs every
/// unfinished batch of its partitions that is not here. Here such a claim is made by hand:
/// node "z" (not running) stored the instances in its folder, and the claim names node "a",
/// the owner, under its current token; "a" assembles, processes (router mode) and exports it.
#[test]
fn a_claimed_batch_its_owner_is_not_running_is_run_by_the_sweep() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}[[export]]\nkind = \"folder\"\npath = {:?}\n",
        cluster_toml(&pg, shared.path(), "a").replace("quiet_seconds = 600", "quiet_seconds = 1"),
        out_dir.path().display().to_string()
    );
    let node = start_ready(&shared.path().join("nodes").join("a"), &toml);
    let files = tempfile::tempdir().unwrap();
    let exported = || files_under(out_dir.path());
    // An instance of P1 through a's own feed and claim first: a has taken up its partitions
    // (the sweep that follows a change of them is behind), so only the periodic sweep is left
    // to find the claim below.
    assert!(storescu_status(&node, &[mixed_instance(files.path(), 1)]).success());
    assert!(wait_until(30, || exported().len() == 1), "{}", node.log());
    let key = b"P0".to_vec();
    let z = shared.path().join("nodes").join("z");
    let mut rows = Vec::new();
    let sent: Vec<PathBuf> = (0..3)
        .map(|i| sized_instance(files.path(), i * 5, true))
        .collect();
    for f in &sent {
        let uid = sop_uid_of(f);
        let rel = format!("p0/1/2/{uid}.dcm");
        let at = z.join("patients").join(&rel);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::copy(f, &at).unwrap();
        rows.push(Published {
            location: format!("patients/{rel}"),
            bytes: std::fs::metadata(&at).unwrap().len(),
            ..record("z", &uid, &key, 1000)
        });
    }
    let mut z_db = Coordinator::connect(&pg.conninfo(), "z", 8, Duration::from_secs(2)).unwrap();
    z_db.publish(&rows).unwrap();
    let part = partition_of(&key, 8) as i32;
    assert!(
        wait_until(20, || {
            pg.client()
                .query_one(
                    "SELECT owner = 'a' FROM dicomgate_partitions WHERE partition = $1",
                    &[&part],
                )
                .unwrap()
                .get::<_, Option<bool>>(0)
                == Some(true)
        }),
        "{}",
        node.log()
    );
    // Claimed under a's token, as a's own claim would be; no job runs it.
    let mut c = pg.client();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "UPDATE dicomgate_instances SET batch_id = 'lost-1' WHERE node_id = 'z'",
        &[],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO dicomgate_batches (batch_id, partition, grouping_key, owner, fencing, stage)
         SELECT 'lost-1', partition, $2, owner, fencing, 'claimed'
         FROM dicomgate_partitions WHERE partition = $1",
        &[&part, &key],
    )
    .unwrap();
    tx.commit().unwrap();
    assert!(
        wait_until(30, || exported().len() == 4),
        "exported {:?}\n{}",
        exported(),
        node.log()
    );
    for f in &sent {
        let got = exported()
            .into_iter()
            .find(|p| sop_uid_of(p) == sop_uid_of(f))
            .expect("exported");
        assert_eq!(data_set_of(f), data_set_of(&got));
    }
    assert!(
        wait_until(10, || z_db.batch("lost-1").unwrap().map(|b| b.0)
            == Some("done".to_string())),
        "{}",
        node.log()
    );
    // Only z may delete what z stored: its copies stay.
    assert_eq!(files_under(&z.join("patients")).len(), 3);
}

/// Issue 15, "what it must show": a deposed owner paused with SIGSTOP past its lease, then
/// resumed. Two nodes; patient P0's partition is owned by X; its batch is claimed on X and its
/// processing runs (4 s) when X is stopped. X's lease runs out, the other node Y takes the
/// partition, adopts the batch and runs and exports it (each node exports into its own
/// folder). Once that is under way X is resumed: its processing run has ended meanwhile, but
/// before exporting X asks the cluster database and finds the batch adopted: it deletes its
/// copies and exports nothing. Each instance is exported once (by Y), and X releases its own
/// copies once Y is done.
#[test]
fn a_deposed_owner_paused_past_its_lease_exports_nothing_of_the_batch_it_held() {
    use common::*;
    use rustix::process::Signal;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (script, runs_log) = runs_script(tmp.path(), 4);
    let out = |id: &str| tmp.path().join(format!("export-{id}"));
    let toml = |id: &str| {
        format!(
            "{}[[input]]\nname = \"all\"\nmin_instances = 6\n\
             [processing]\ncommand = [\"sh\", {:?}, {id:?}]\ntimeout_seconds = 60\n\
             [[export]]\nkind = \"folder\"\npath = {:?}\n",
            cluster_toml(&pg, shared.path(), id)
                .replace("quiet_seconds = 600", "quiet_seconds = 1"),
            script.display().to_string(),
            out(id).display().to_string()
        )
    };
    let ids = ["a", "b"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| start_ready(&shared.path().join("nodes").join(id), &toml(id)))
        .collect();
    let logs = || node_logs(&nodes, &ids);
    assert!(
        wait_until(30, || sorted(counts(&owners(&pg), &ids)) == [4, 4]),
        "{:?}",
        owners(&pg)
    );
    let part = partition_of(b"P0", 8) as usize;
    let x = ids
        .iter()
        .position(|id| owners(&pg)[part].as_deref() == Some(*id))
        .unwrap();
    let y = 1 - x;
    let files = tempfile::tempdir().unwrap();
    let p0: Vec<PathBuf> = (0..6)
        .map(|i| mixed_instance(files.path(), i * 5))
        .collect();
    assert!(storescu_status(&nodes[x], &p0).success(), "{}", logs());
    let runs = || runs_of(&std::fs::read_to_string(&runs_log).unwrap_or_default());
    let started_on = |node: &str| runs().into_iter().find(|r| r.node == node);
    assert!(
        wait_until(30, || started_on(ids[x]).is_some()),
        "{}",
        logs()
    );
    nodes[x].signal(Signal::STOP);
    let _resume = ContinueOnDrop(nodes[x].pid());
    let batch = started_on(ids[x]).unwrap().batch;
    assert!(
        wait_until(60, || started_on(ids[y]).is_some_and(|r| r.batch == batch)),
        "the batch was not adopted\nruns: {:?}\n{}",
        runs(),
        logs()
    );
    nodes[x].signal(Signal::CONT);
    let exported = |id: &str| files_under(&out(id));
    assert!(
        wait_until(30, || exported(ids[y]).len() == 6),
        "{:?}\n{}",
        exported(ids[y]),
        logs()
    );
    let x_batches = || files_under(&shared.path().join("nodes").join(ids[x]).join("batches"));
    assert!(
        wait_until(30, || x_batches().is_empty()),
        "{:?}\n{}",
        x_batches(),
        logs()
    );
    let count = |sql: &str| -> i64 { pg.client().query_one(sql, &[]).unwrap().get(0) };
    assert!(
        wait_until(30, || count("SELECT count(*) FROM dicomgate_instances")
            == 0),
        "{}",
        logs()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(exported(ids[x]), Vec::<PathBuf>::new(), "{}", logs());
    assert!(
        nodes[x].log().contains("another node adopted"),
        "{}",
        nodes[x].log()
    );
    for f in &p0 {
        let got = exported(ids[y])
            .into_iter()
            .find(|p| sop_uid_of(p) == sop_uid_of(f))
            .expect("exported");
        assert_eq!(data_set_of(f), data_set_of(&got));
    }
}

/// Sends SIGCONT to a process when dropped (a test that stopped a node never leaves it
/// stopped, whether it passed or panicked).
struct ContinueOnDrop(u32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        if let Some(p) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
        }
    }
}

/// Issue 15, "what it must show": PostgreSQL restarted mid-load with the owner side running.
/// Two nodes; 5 patients × 6 instances spread over both; half of each patient's instances
/// arrive, then the database stops and the other half arrive (acknowledged locally, waiting
/// for publication), then it starts again: every patient is processed once with its 6
/// instances, exported byte-exact, and nothing is left pending or in the database.
#[test]
fn the_database_restarted_mid_load_loses_nothing_and_each_patient_is_processed_once() {
    let pg = Postgres::start();
    outage_mid_load(
        &pg,
        &pg.conninfo(),
        || {},
        || pg.stop(),
        || {
            std::thread::sleep(Duration::from_secs(3)); // past the lease, while it is away
            pg.start_again();
        },
        &pg,
    );
}

/// The scenario of the three tests above: two nodes on `pg` (reached by `conninfo`), and once
/// both are ready, `started`; 5 patients × 6 instances spread over both; 3 of each patient's
/// arrive, once published `down` takes the database away, the other 3 arrive (acknowledged
/// locally), then `up` brings a database back, `after`: every patient is processed once with
/// its 6 instances, exported byte-exact, and nothing is left pending on the nodes or in
/// `after`. Returns the nodes' logs.
fn outage_mid_load(
    pg: &Postgres,
    conninfo: &str,
    started: impl FnOnce(),
    down: impl FnOnce(),
    up: impl FnOnce(),
    after: &Postgres,
) -> String {
    use common::*;
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (script, runs_log) = runs_script(tmp.path(), 0);
    let pacs_port = free_port();
    let pacs_dir = tmp.path().join("pacs");
    let _pacs = storescp(&pacs_dir, pacs_port, "PACS");
    let toml = |id: &str| {
        format!(
            "{}[[input]]\nname = \"all\"\nmin_instances = 6\n\
             [processing]\ncommand = [\"sh\", {:?}, {id:?}]\ntimeout_seconds = 60\n\
             [[export]]\nkind = \"dicom\"\naddress = \"127.0.0.1:{pacs_port}\"\nae_title = \"PACS\"\n",
            cluster_toml(pg, shared.path(), id)
                .replace(&pg.conninfo(), conninfo)
                .replace("quiet_seconds = 600", "quiet_seconds = 1"),
            script.display().to_string()
        )
    };
    let ids = ["a", "b"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| start_ready(&shared.path().join("nodes").join(id), &toml(id)))
        .collect();
    let logs = || node_logs(&nodes, &ids);
    started();
    let files = tempfile::tempdir().unwrap();
    let all = mixed_batch(files.path(), 0, 30);
    let part = |from: usize, to: usize, n: usize| -> Vec<PathBuf> {
        all[from..to]
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == n)
            .map(|(_, f)| f.clone())
            .collect()
    };
    for (n, node) in nodes.iter().enumerate() {
        assert!(
            storescu_status(node, &part(0, 15, n)).success(),
            "{}",
            logs()
        );
    }
    let published = |pg: &Postgres| -> i64 {
        pg.client()
            .query_one("SELECT count(*) FROM dicomgate_instances", &[])
            .unwrap()
            .get(0)
    };
    // Published before the outage (the failover's standby must have these rows).
    assert!(wait_until(20, || published(pg) == 15), "{}", logs());
    down();
    for (n, node) in nodes.iter().enumerate() {
        assert!(
            storescu_status(node, &part(15, 30, n)).success(),
            "{}",
            logs()
        );
    }
    up();
    let received = || files_under(&pacs_dir);
    assert!(
        wait_until(90, || received().len() == 30),
        "storescp got {}\nruns: {}\n{}",
        received().len(),
        std::fs::read_to_string(&runs_log).unwrap_or_default(),
        logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    let runs = runs_of(&std::fs::read_to_string(&runs_log).unwrap());
    assert!(
        runs.iter().all(|r| r.uids.len() == 6),
        "a patient processed without all 6 instances: {runs:?}\n{}",
        logs()
    );
    let mut patients: Vec<String> = runs.iter().map(|r| r.patient.clone()).collect();
    patients.sort();
    assert_eq!(
        patients,
        ["P0", "P1", "P2", "P3", "P4"],
        "each patient processed once\n{}",
        logs()
    );
    let by_uid: std::collections::BTreeMap<String, PathBuf> = received()
        .into_iter()
        .map(|p| (sop_uid_of(&p), p))
        .collect();
    for f in &all {
        assert_eq!(
            data_set_of(f),
            data_set_of(&by_uid[&sop_uid_of(f)]),
            "{}",
            f.display()
        );
    }
    let pending = |id: &str| {
        dicomgate::storage::inventory::pending(&shared.path().join("nodes").join(id))
            .map(|(e, _)| e.len())
            .unwrap_or(usize::MAX)
    };
    let count = |sql: &str| -> i64 { after.client().query_one(sql, &[]).unwrap().get(0) };
    assert!(
        wait_until(30, || ids.iter().all(|id| pending(id) == 0)
            && count("SELECT count(*) FROM dicomgate_instances") == 0),
        "pending {:?}, rows {}\n{}",
        ids.iter().map(|id| pending(id)).collect::<Vec<_>>(),
        count("SELECT count(*) FROM dicomgate_instances"),
        logs()
    );
    logs()
}

/// Found by `kill_9_of_a_node_mid_load_moves_its_partitions_and_its_batch_and_every_instance_is_exported_once`
/// (rows left pending for ever): a node restarted after another node had published and
/// processed its instances (a takeover) released its copies and forgot their rows at once,
/// and then its recovery's publication of those same copies, read from its folder before the
/// release, brought the rows back: pending instances with no bytes behind them. The release
/// now waits until what the recovery queued is published (`Outbox::release_gate`). Here the
/// other node is a bare coordinator that claims and finishes the batch by hand, and the debug
/// build's `DICOMGATE_TEST_OUTBOX_HOLD_MS` holds the restarted node's publication back 3 s, so
/// that its release (every second) would come first.
#[cfg_attr(
    not(debug_assertions),
    ignore = "needs the debug build's DICOMGATE_TEST_OUTBOX_HOLD_MS"
)]
#[test]
fn a_restarted_node_releases_its_processed_copies_only_once_its_recovery_is_published() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let (mut a, _y, dir) = processed_elsewhere_while_dead(&pg, shared.path());
    a.restart_with_env(&[("DICOMGATE_TEST_OUTBOX_HOLD_MS", "3000")]);
    std::thread::sleep(Duration::from_secs(4)); // past the hold
    assert!(
        wait_until(20, || instance_rows(&pg) == 0 && pending_in(&dir) == 0),
        "rows {}, pending {}\n{}",
        instance_rows(&pg),
        pending_in(&dir),
        a.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(instance_rows(&pg), 0, "no row came back\n{}", a.log());
}

/// The other case of the release gate: another node holds the takeover of the dead node (it
/// may still publish rounds from its listing), when the node comes back. The node releases
/// nothing until that hold has run out (three leases from the taker's last renewal; here 6 s):
/// at 3 s after the restart its copies are all still there, and they are released after.
/// (Without `Coordinator::being_taken_over` they were released within the first second.)
#[test]
fn a_node_back_while_another_holds_its_takeover_releases_nothing_until_the_hold_ran_out() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let (mut a, mut y, dir) = processed_elsewhere_while_dead(&pg, shared.path());
    // Offered once a's lease ran out more than a lease ago.
    let t = (0..20)
        .find_map(|_| {
            y.rebalance().unwrap();
            y.next_takeover().unwrap().or_else(|| {
                wait_past(Duration::from_secs(1));
                None
            })
        })
        .expect("a is dead: y takes it over");
    assert_eq!(t.node_id, "a");
    a.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pending_in(&dir),
        2,
        "released while y's hold runs\n{}",
        a.log()
    );
    assert!(
        wait_until(20, || instance_rows(&pg) == 0 && pending_in(&dir) == 0),
        "rows {}, pending {}\n{}",
        instance_rows(&pg),
        pending_in(&dir),
        a.log()
    );
}

/// Rows of instances in the cluster database.
fn instance_rows(pg: &Postgres) -> i64 {
    pg.client()
        .query_one("SELECT count(*) FROM dicomgate_instances", &[])
        .unwrap()
        .get(0)
}

/// Instances pending in a node's folder (`usize::MAX` when it cannot be read).
fn pending_in(dir: &Path) -> usize {
    dicomgate::storage::inventory::pending(dir)
        .map(|(e, _)| e.len())
        .unwrap_or(usize::MAX)
}

/// Node a stores P0's two instances and is killed; another node (a bare coordinator, y,
/// returned) takes a's partitions once a's lease has run out for a lease, and processes P0:
/// claimed, done. a's copies are still on its disk (its folder, returned).
fn processed_elsewhere_while_dead(
    pg: &Postgres,
    shared: &Path,
) -> (common::Node, Coordinator, PathBuf) {
    use common::*;
    let dir = shared.join("nodes").join("a");
    let mut a = start_ready(&dir, &cluster_toml(pg, shared, "a"));
    let files = tempfile::tempdir().unwrap();
    let p0: Vec<PathBuf> = [0, 5]
        .iter()
        .map(|&i| mixed_instance(files.path(), i))
        .collect();
    assert!(storescu_status(&a, &p0).success(), "{}", a.log());
    assert!(wait_until(20, || instance_rows(pg) == 2), "{}", a.log());
    a.kill9();
    let lease = Duration::from_secs(2);
    let mut y = Coordinator::connect(&pg.conninfo(), "y", 8, lease).unwrap();
    let part = partition_of(b"P0", 8);
    let tok = (0..20)
        .find_map(|_| {
            wait_past(lease / 2);
            y.rebalance()
                .unwrap()
                .into_iter()
                .find(|o| o.partition == part)
        })
        .expect("y takes P0's partition");
    assert_eq!(y.claim(tok, b"P0", "by-y").unwrap().unwrap().len(), 2);
    y.set_stage(tok, "by-y", "done").unwrap();
    assert_eq!(pending_in(&dir), 2, "a's copies are still on its disk");
    (a, y, dir)
}

/// Second review of the owner side: a node restarted (or resumed) while its batch's partition
/// belongs to another node that has not adopted the batch yet found the batch still named for
/// it, processed and exported it, and the new owner then ran it again. A batch whose
/// partition another node owns is that node's now: deleted here, not run. The other node is
/// made by hand (a live row, the partition under a new token) so that it never adopts.
#[test]
fn a_restarted_node_does_not_run_a_batch_whose_partition_another_node_owns_now() {
    use common::*;
    let pg = Postgres::start();
    let shared = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (script, runs_log) = runs_script(tmp.path(), 3);
    let out_dir = tmp.path().join("export");
    let toml = format!(
        "{}[[input]]\nname = \"all\"\nmin_instances = 2\n\
         [processing]\ncommand = [\"sh\", {:?}, \"a\"]\ntimeout_seconds = 60\n\
         [[export]]\nkind = \"folder\"\npath = {:?}\n",
        cluster_toml(&pg, shared.path(), "a").replace("quiet_seconds = 600", "quiet_seconds = 1"),
        script.display().to_string(),
        out_dir.display().to_string()
    );
    let dir = shared.path().join("nodes").join("a");
    let mut node = start_ready(&dir, &toml);
    let files = tempfile::tempdir().unwrap();
    let p0: Vec<PathBuf> = [0, 5]
        .iter()
        .map(|&i| mixed_instance(files.path(), i))
        .collect();
    assert!(storescu_status(&node, &p0).success(), "{}", node.log());
    let runs = || runs_of(&std::fs::read_to_string(&runs_log).unwrap_or_default());
    assert!(wait_until(30, || runs().len() == 1), "{}", node.log());
    node.kill9();
    let batch = runs()[0].batch.clone();
    assert!(dir.join("batches").join(&batch).is_dir());
    let part = partition_of(b"P0", 8) as i32;
    pg.client()
        .batch_execute(&format!(
            "INSERT INTO dicomgate_nodes (node_id, lease_until)
                 VALUES ('y', statement_timestamp() + interval '1 hour');
             UPDATE dicomgate_partitions SET owner = 'y', fencing = fencing + 1
                 WHERE partition = {part};"
        ))
        .unwrap();
    node.restart();
    assert!(
        wait_until(30, || !dir.join("batches").join(&batch).exists()),
        "{}",
        node.log()
    );
    assert!(
        node.log().contains("another node adopted"),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_secs(4)); // a run would have started, and ended
    assert_eq!(runs().len(), 1, "{:?}\n{}", runs(), node.log());
    assert!(files_under(&out_dir).is_empty(), "{}", node.log());
    // The storing node (a) keeps its copies: the batch is not done.
    assert_eq!(
        dicomgate::storage::inventory::pending(&dir)
            .unwrap()
            .0
            .len(),
        2,
        "{}",
        node.log()
    );
}

/// Nodes `ids` on one database and shared folder, with the "last association closed" trigger
/// alone (`quiet_seconds = 0`) and [`runs_script`] as processing, once the partitions are
/// shared evenly; with the index of the node that owns patient P0's partition.
struct CloseCluster {
    pg: Postgres,
    /// The nodes' folders (kept while they run).
    _shared: tempfile::TempDir,
    tmp: tempfile::TempDir,
    nodes: Vec<common::Node>,
    ids: Vec<&'static str>,
    runs_log: PathBuf,
    owner: usize,
}

impl CloseCluster {
    fn start(ids: &[&'static str]) -> CloseCluster {
        let pg = Postgres::start();
        let shared = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (script, runs_log) = runs_script(tmp.path(), 0);
        let nodes: Vec<common::Node> = ids
            .iter()
            .map(|id| {
                let toml = format!(
                    "{}[processing]\ncommand = [\"sh\", {:?}, {id:?}]\ntimeout_seconds = 60\n",
                    cluster_toml(&pg, shared.path(), id).replace(
                        "quiet_seconds = 600\non_association_close = false",
                        "quiet_seconds = 0\non_association_close = true",
                    ),
                    script.display().to_string()
                );
                start_ready(&shared.path().join("nodes").join(id), &toml)
            })
            .collect();
        let even = if ids.len() == 3 {
            vec![2, 3, 3]
        } else {
            vec![4, 4]
        };
        assert!(
            common::wait_until(30, || sorted(counts(&owners(&pg), ids)) == even),
            "{:?}",
            owners(&pg)
        );
        let part = partition_of(b"P0", 8) as usize;
        let owner = ids
            .iter()
            .position(|id| owners(&pg)[part].as_deref() == Some(*id))
            .unwrap();
        CloseCluster {
            pg,
            _shared: shared,
            tmp,
            nodes,
            ids: ids.to_vec(),
            runs_log,
            owner,
        }
    }

    fn logs(&self) -> String {
        node_logs(&self.nodes, &self.ids)
    }

    fn runs(&self) -> Vec<Run> {
        runs_of(&std::fs::read_to_string(&self.runs_log).unwrap_or_default())
    }

    /// Instances `from..to` of patient P0 (small ones).
    fn p0(&self, from: u32, to: u32) -> Vec<PathBuf> {
        (from..to)
            .map(|i| instance_of(self.tmp.path(), i, false, 1))
            .collect()
    }

    /// hold.py on node `n`: sends `first`, prints SENT and holds its association open until
    /// [`CloseCluster::go`], then sends `rest` and releases.
    fn hold(&self, n: usize, first: &[PathBuf], rest: &[PathBuf]) -> std::process::Child {
        let mut child = common::python()
            .arg(common::py_script("hold.py"))
            .args([self.nodes[n].port().as_str(), "DICOMGATE"])
            .arg(self.tmp.path().join("go"))
            .arg(first.len().to_string())
            .args(first)
            .args(rest)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "SENT", "{}", self.logs());
        child
    }

    fn go(&self) {
        std::fs::write(self.tmp.path().join("go"), b"").unwrap();
    }

    /// Rows published for P0.
    fn published(&self) -> i64 {
        self.pg
            .client()
            .query_one(
                "SELECT count(*) FROM dicomgate_instances WHERE grouping_key = $1",
                &[&b"P0".as_slice()],
            )
            .unwrap()
            .get(0)
    }

    /// P0's instances 0..4: two sent by hold.py to node `h`, which keeps its association open,
    /// two by storescu to node `x`; returns them once all four are published and nothing was
    /// processed a while after.
    fn held_open(&self, h: usize, x: usize) -> (Vec<PathBuf>, std::process::Child) {
        let files = self.p0(0, 4);
        let hold = self.hold(h, &files[0..2], &[]);
        assert!(common::storescu_status(&self.nodes[x], &files[2..4]).success());
        assert!(
            common::wait_until(20, || self.published() == 4),
            "{}",
            self.logs()
        );
        std::thread::sleep(Duration::from_secs(3));
        assert!(self.runs().is_empty(), "{:?}\n{}", self.runs(), self.logs());
        (files, hold)
    }

    /// Asserts that P0 was processed once, on node `n`, with exactly `files`.
    fn processed_once(&self, n: usize, files: &[PathBuf]) {
        let runs = self.settled_runs();
        assert_eq!(runs.len(), 1, "{runs:?}\n{}", self.logs());
        assert_eq!(runs[0].node, self.ids[n], "{runs:?}");
        assert_eq!(runs[0].uids, sop_uids(files), "{}", self.logs());
    }

    /// Waits for one run of P0 and a while more; returns every run.
    fn settled_runs(&self) -> Vec<Run> {
        assert!(
            common::wait_until(40, || !self.runs().is_empty()),
            "never processed\n{}",
            self.logs()
        );
        std::thread::sleep(Duration::from_secs(3));
        self.runs()
    }
}

/// Issue 15 item 3: the "last association closed" trigger across nodes. Patient P0 arrives
/// at three nodes; an association at a node that does not own P0's partition stays open while
/// the associations to the two others (the owner among them) close: nothing is processed.
/// Once it closes, P0's owner processes it once, with all its instances.
#[test]
fn the_last_association_closed_at_any_node_triggers_the_patients_owner_once_every_node_closed() {
    use common::*;
    let c = CloseCluster::start(&["a", "b", "c"]);
    let (x, h) = (c.owner, (c.owner + 1) % 3);
    let y = 3 - x - h;
    let files = c.p0(0, 6);
    let mut hold = c.hold(h, &files[0..2], &files[4..6]);
    assert!(storescu_status(&c.nodes[x], &files[2..3]).success());
    assert!(storescu_status(&c.nodes[y], &files[3..4]).success());
    // Long enough for every node's reports and the owner's reads (every 200 ms).
    assert!(wait_until(20, || c.published() == 4), "{}", c.logs());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        c.runs().is_empty(),
        "processed while an association at node {} was open: {:?}\n{}",
        c.ids[h],
        c.runs(),
        c.logs()
    );
    c.go();
    assert!(hold.wait().unwrap().success());
    c.processed_once(x, &files);
}

/// Issue 15 item 3: the open associations of a dead node count as closed once it was taken
/// over (what it acknowledged is published by then). The node holding P0's last open
/// association is killed (-9): once its lease has run out and another node took it over, P0's
/// owner processes it, with the dead node's instances read from its folder.
#[test]
fn an_association_open_at_a_node_killed_counts_as_closed_once_the_node_was_taken_over() {
    let mut c = CloseCluster::start(&["a", "b"]);
    let (x, h) = (c.owner, 1 - c.owner);
    let (files, mut hold) = c.held_open(h, x);
    c.nodes[h].kill9();
    let _ = hold.kill();
    let _ = hold.wait();
    c.processed_once(x, &files);
}

/// Issue 15 item 3: a partition's new owner evaluates the patients it takes over that have no
/// association open. P0's owner is killed (-9) while an association at the other node is open;
/// that association closes before the partition has moved (nobody owns it to see the close):
/// the node that takes the partition over processes P0, with the dead owner's instances.
#[test]
fn a_partitions_new_owner_evaluates_a_patient_whose_last_association_closed_between_owners() {
    use common::*;
    let mut c = CloseCluster::start(&["a", "b"]);
    let (x, h) = (c.owner, 1 - c.owner);
    let files = c.p0(0, 6);
    let mut hold = c.hold(h, &files[0..2], &files[4..6]);
    assert!(storescu_status(&c.nodes[x], &files[2..4]).success());
    assert!(wait_until(20, || c.published() == 4), "{}", c.logs());
    c.nodes[x].kill9();
    c.go();
    assert!(hold.wait().unwrap().success());
    let part = partition_of(b"P0", 8) as usize;
    assert!(
        owners(&c.pg)[part].as_deref() != Some(c.ids[h]),
        "the partition moved before the association closed: the test shows nothing"
    );
    c.processed_once(h, &files);
}

/// Issue 15 item 3, found while building the trigger: a patient sent in one short association
/// (over before its owner looked at the open associations, every 200 ms) to a node that does
/// not own it is processed too: instances its owner reads with no association open count as
/// closed.
#[test]
fn a_patient_sent_in_one_short_association_to_a_node_that_does_not_own_it_is_processed() {
    use common::*;
    let c = CloseCluster::start(&["a", "b"]);
    let (x, h) = (c.owner, 1 - c.owner);
    let files = c.p0(0, 3);
    assert!(storescu_status(&c.nodes[h], &files).success());
    c.processed_once(x, &files);
}

/// Issue 15 item 3: a node's new process reports none of the associations its killed process
/// had open (it deletes its node's rows first). The node holding P0's last open association is
/// killed (-9) and started again at once, before its lease runs out: P0's owner then processes
/// P0 (the row the dead process left would keep it open for as long as the node lives).
#[test]
fn a_restarted_node_reports_none_of_the_associations_its_killed_process_had_open() {
    let mut c = CloseCluster::start(&["a", "b"]);
    let (x, h) = (c.owner, 1 - c.owner);
    let (files, mut hold) = c.held_open(h, x);
    c.nodes[h].restart();
    let _ = hold.kill();
    let _ = hold.wait();
    c.processed_once(x, &files);
}
