//! A running node: the start-up that wires storage, the pipeline, the reactors and the HTTP
//! endpoint together, and the handle that drains and stops it.
//!
//! Owns: the order of start-up (configuration and environment checks, the data directory's
//! lock, the listeners, storage and its recovery, the pipeline and its recovery, the reactors
//! and acceptors, the HTTP endpoint) and of stopping (drain, then cut, then join with a grace
//! period). Must never hold protocol, storage or pipeline logic of its own: each layer starts
//! itself; this module only connects them (the layers do not import each other's start-up, so
//! `net/` and `pipeline/` meet only through `handoff`).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::handoff::Handoff;
use crate::http;
use crate::net::{self, AssociationLimits, Mailbox, Shared};
use crate::pipeline::{self, Pipeline, Processor};
use crate::storage::Storage;

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    /// Where the plain listener listens; `None` when `[node] listen` is "" (TLS only).
    pub local_addr: Option<SocketAddr>,
    /// Where the TLS listener listens, if `[tls] listen` names one.
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    pipeline: Arc<Pipeline>,
    mailboxes: Arc<Vec<Mailbox>>,
    threads: Vec<JoinHandle<()>>,
    pipeline_shutdown: Arc<AtomicBool>,
    /// The `cluster` thread's own stop, set once every other thread has ended: a record
    /// queued by ingest at the last moment is still seen before it leaves the cluster.
    cluster_stop: Arc<AtomicBool>,
    /// Held until the node has stopped.
    _lock: crate::storage::DataDirLock,
    /// Where the HTTP endpoint listens, if `[http] listen` names one.
    pub http_addr: Option<SocketAddr>,
}

/// How long a stop waits for its threads once told to end (see `NodeHandle::stop`).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What a graceful stop ([`NodeHandle::drain`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the drain began.
    pub open_at_start: usize,
    /// Connections still open at the deadline, aborted.
    pub cut: usize,
    /// The pipeline was still busy at the deadline (processing or exports interrupted,
    /// resumed at the next start).
    pub pipeline_cut: bool,
}

impl NodeHandle {
    /// Stops accepting, aborts open associations and waits for the reactors.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// A graceful stop (SIGTERM): no new associations; open ones may finish, and the pipeline
    /// (processing, export) may go on, until both are done or `within` has passed; then what is
    /// left is cut as [`NodeHandle::shutdown`] does: associations get an A-ABORT (every store
    /// acknowledged so far stays durable), running processing has its process group killed and
    /// its batch resumes at the next start.
    pub fn drain(mut self, within: std::time::Duration) -> Drained {
        let deadline = std::time::Instant::now() + within;
        let open_at_start = self.shared.connections.load(Ordering::Acquire);
        self.shared.draining.store(true, Ordering::Release);
        self.unblock_accept();
        for m in self.mailboxes.iter() {
            m.wake();
        }
        tracing::info!(
            open_associations = open_at_start,
            drain_seconds = within.as_secs_f64(),
            "draining: no new associations; open ones and running processing may finish"
        );
        // Idle for a few checks in a row: an association's close may still trigger a claim.
        let mut idle_checks = 0;
        let pipeline_cut = loop {
            let idle = self.shared.reactors_running.load(Ordering::Acquire) == 0
                && self.pipeline.is_idle();
            idle_checks = if idle { idle_checks + 1 } else { 0 };
            if idle_checks >= 4 {
                break false;
            }
            if std::time::Instant::now() >= deadline {
                break !self.pipeline.is_idle();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let cut = self.shared.connections.load(Ordering::Acquire);
        if cut > 0 || pipeline_cut {
            tracing::warn!(
                associations_aborted = cut,
                pipeline_interrupted = pipeline_cut,
                "drain deadline reached: cutting what is left (interrupted batches resume at the next start)"
            );
        }
        self.stop();
        tracing::info!(
            associations_finished = open_at_start.saturating_sub(cut),
            associations_aborted = cut,
            "stopped"
        );
        Drained {
            open_at_start,
            cut,
            pipeline_cut,
        }
    }

    fn unblock_accept(&self) {
        for mut a in self.local_addr.into_iter().chain(self.tls_addr) {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let _ = TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1));
        }
    }

    /// Reads `[tls]`'s certificate, key and CA files again (SIGHUP): new TLS connections use
    /// them, open ones keep what they were made with. On an error the old ones stay.
    pub fn reload_tls(&self) -> Result<(), String> {
        let Some(current) = &self.shared.tls else {
            return Err("no [tls] listen: nothing to reload".into());
        };
        let cfg = net::tls::server_config(&self.shared.config.tls)?;
        current.store(cfg);
        Ok(())
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.pipeline_shutdown.store(true, Ordering::Release);
        for m in self.mailboxes.iter() {
            m.wake();
        }
        self.unblock_accept();
        if let Some(mut a) = self.http_addr {
            // Wakes the HTTP thread's accept, which then sees the flag.
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let _ = TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1));
        }
        // Threads end within moments of the flags, except one blocked on a peer (an export
        // waiting up to its I/O timeout on a silent downstream): past a grace period we stop
        // waiting. Nothing is lost: what was acknowledged is durable, and an export cut short
        // is retried at the next start (its marker was not written).
        let mut threads: Vec<JoinHandle<()>> = self.threads.drain(..).collect();
        threads.extend(self.take_watched());
        // The `cluster` thread last, told to stop once every other thread has ended, or when
        // only the time it needs to publish what is queued and leave is left of the grace,
        // whichever is first (a thread blocked on a peer must not keep it from leaving the
        // cluster). Its leave says "nothing to take over" only once ingest has ended having
        // seen every acknowledged store (`Outbox::producers_ended`, below), which it waits
        // for while it has time.
        let (cluster, threads): (Vec<_>, Vec<_>) = threads
            .into_iter()
            .partition(|t| t.thread().name() == Some("cluster"));
        let (cluster_stop, outbox) = (self.cluster_stop.clone(), self.pipeline.outbox().cloned());
        let producers = outbox.clone();
        let log = self.shared.storage.log().clone();
        let tell_cluster = move || {
            cluster_stop.store(true, Ordering::Release);
            if let Some(o) = &outbox {
                o.wake();
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // The thread being joined, for the warning (the review found it always blamed a
        // pipeline worker, when an HTTP connection could be the one).
        let joining = Arc::new(Mutex::new(String::new()));
        let now_joining = joining.clone();
        // The ingest threads first: each ends once its reactors have ended and it has taken
        // all they handed off, so then nothing is queued for publication any more (a thread
        // slow to end elsewhere, an owner's database round or an export, must not delay that).
        let (ingest, others): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| {
            t.thread()
                .name()
                .is_some_and(|n| n.starts_with(crate::pipeline::INGEST_THREAD))
        });
        let handoff = self.shared.handoff.clone();
        let joiner = std::thread::spawn(move || {
            let join = |t: JoinHandle<()>| {
                if let Ok(mut n) = now_joining.lock() {
                    *n = t.thread().name().unwrap_or("unnamed").to_string();
                }
                t.join().is_ok()
            };
            let mut ingest_ok = true;
            for t in ingest {
                ingest_ok &= join(t);
            }
            if let Some(o) = &producers {
                // A panicked ingest thread, or a reactor that gave events up, may have left an
                // acknowledged store unqueued: then the leave is one to take over.
                if ingest_ok && handoff.all_taken() {
                    o.producers_ended();
                } else {
                    tracing::warn!("ingest did not take every event at this stop: this node leaves the cluster as one to take over (its folder is published by another node)");
                }
            }
            for t in others {
                join(t);
            }
            // The others have ended: nothing releases log records any more.
            log.retry_releases_at_stop();
            let _ = tx.send(false);
            for t in cluster {
                if let Ok(mut n) = now_joining.lock() {
                    *n = "cluster".into();
                }
                let _ = t.join();
            }
            let _ = tx.send(true);
        });
        let deadline = std::time::Instant::now() + STOP_GRACE;
        let for_cluster =
            crate::cluster::outbox::STOP_PUBLISHING + std::time::Duration::from_secs(1);
        let _ = rx.recv_timeout(STOP_GRACE.saturating_sub(for_cluster));
        tell_cluster();
        let all = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(true) => break true,
                Ok(false) => continue,
                Err(_) => break false,
            }
        };
        if all {
            let _ = joiner.join();
        } else {
            let thread = joining.lock().map(|n| n.clone()).unwrap_or_default();
            tracing::warn!(
                grace_seconds = STOP_GRACE.as_secs(),
                thread,
                "a thread is still waiting on a peer (an export or an HTTP client): stopping without it (a batch it was exporting resumes at the next start)"
            );
        }
    }

    /// Blocks until the node stops (it stops only on shutdown).
    pub fn wait(mut self) {
        // Reactors and HTTP first: they end only when the node stops. The watched threads
        // (acceptors among them) stay where `/healthz` sees them until then (taken first, a dead pipeline
        // worker was reported healthy for the rest of the run).
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for t in self.take_watched() {
            let _ = t.join();
        }
    }

    /// The storage and pipeline threads and the acceptors, taken out of [`Shared::watched`] to
    /// be joined.
    fn take_watched(&self) -> Vec<JoinHandle<()>> {
        match self.shared.watched.lock() {
            Ok(mut w) => w.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        let watched = match self.shared.watched.lock() {
            Ok(w) => !w.is_empty(),
            Err(_) => true,
        };
        if !self.threads.is_empty() || watched {
            self.stop();
        }
    }
}

impl NodeHandle {
    /// The pipeline's counters (claimed, processed, exported, failed, expired batches).
    pub fn stats(&self) -> &pipeline::Stats {
        &self.pipeline.stats
    }
}

/// Binds the listener, starts storage, the pipeline, the reactors and the acceptor. A
/// configuration that cannot be used ([`Config::validate`], [`Config::check_environment`], the
/// TLS files) is an `InvalidInput` error holding the [`ConfigError`] (`dicomgate serve` gives it
/// the config file's name and line: [`crate::config::ConfigFile::locate`]).
pub fn start(config: Config) -> io::Result<NodeHandle> {
    start_with(config, None)
}

/// [`start`] with a Rust [`Processor`] instead of `[processing] command`.
pub fn start_with(
    mut config: Config,
    processor: Option<Arc<dyn Processor>>,
) -> io::Result<NodeHandle> {
    // A Config built in code: `[cluster]` gives the data directory, as `Config::from_toml` does.
    config
        .resolve_cluster_data_dir()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    config
        .validate()
        .and_then(|()| config.check_environment())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    net::tls::check_files(&config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, ConfigError(e)))?;
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    // Before anything reads or recovers the data directory: one node per directory.
    let lock = crate::storage::lock_data_dir(&config.node.data_dir)?;
    let listener = match config.node.listen {
        None => None, // TLS only (validate() made sure [tls] listen is set)
        Some(a) => Some(TcpListener::bind(a).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {a} ([node] listen): {e}"),
            )
        })?),
    };
    let http = if config.http.listen.trim().is_empty() {
        None
    } else {
        let l = TcpListener::bind(config.http.listen.trim()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {} ([http] listen): {e}: another dicomgate on this host? \
                     set [http] listen (or --http) to another address, or \"\" for none",
                    config.http.listen
                ),
            )
        })?;
        Some(l)
    };
    let tls_listener = if config.tls.enabled() {
        let l = TcpListener::bind(config.tls.listen.trim()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {} ([tls] listen): {e}", config.tls.listen),
            )
        })?;
        Some(l)
    } else {
        None
    };
    let tls_config = match &tls_listener {
        Some(_) => Some(arc_swap::ArcSwap::new(
            net::tls::server_config(&config.tls)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        )),
        None => None,
    };
    let tls_addr = match &tls_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let local_addr = match &listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let n = config.reactor_count();
    let (polls, mailboxes) = net::reactors(n)?;
    let (done, written, space) = net::storage_callbacks(&mailboxes);
    // `[cluster]`: a store is acknowledged only if this node was not taken over while cut
    // off from the cluster database (`cluster::fence`), checked once it is durable.
    let fence = config.cluster.as_ref().map(|c| {
        Arc::new(crate::cluster::fence::Fence::new(
            &c.data_dir(),
            std::time::Duration::from_secs(u64::from(c.lease_seconds)),
        ))
    });
    let done: crate::storage::OnDone = match &fence {
        None => done,
        Some(f) => {
            let f = f.clone();
            Arc::new(move |mut d: crate::storage::StoreDone| {
                if d.result.is_ok() {
                    if let Err(message) = f.check() {
                        d.result = Err(crate::storage::StoreError {
                            kind: crate::storage::StoreErrorKind::Fenced,
                            message,
                        });
                    }
                }
                done(d)
            })
        }
    };
    let pipeline_shutdown = Arc::new(AtomicBool::new(false));
    let cluster_stop = Arc::new(AtomicBool::new(false));
    let (storage, mut watched) = Storage::start(
        config.node.data_dir.clone(),
        &config.storage,
        done,
        written,
        space,
        pipeline_shutdown.clone(),
    )?;
    let handoff = Arc::new(Handoff::new(n, net::waker_of(&mailboxes)));
    // `[cluster]`: what the node acknowledges is published by the `cluster` thread (started
    // below, once recovery has queued what is pending on disk).
    let outbox = config
        .cluster
        .as_ref()
        .map(|c| crate::cluster::outbox::Outbox::new(c.max_unpublished as usize));
    let mut cluster_settings = None;
    // Started before the pipeline's recovery queues every pending instance, so that it
    // publishes while recovery goes on (the queue is bounded); watched by /healthz.
    if let (Some(outbox), Some(c)) = (&outbox, &config.cluster) {
        let settings = crate::cluster::outbox::Settings {
            fence: fence.clone(),
            database: crate::cluster::Database {
                conninfo: c.postgres.clone(),
                // Read and checked at start-up already (`net::tls::check_files`).
                tls: net::tls::cluster_client_config(c)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                password_file: c.password_file.clone(),
            },
            node_id: c.node_id.clone(),
            partitions: c.partitions,
            lease: std::time::Duration::from_secs(u64::from(c.lease_seconds)),
            shared_dir: c.shared_dir.clone(),
        };
        cluster_settings = Some(settings.clone());
        let (outbox, stop) = (outbox.clone(), cluster_stop.clone());
        tracing::info!(node_id = %c.node_id, shared_dir = %c.shared_dir.display(), "cluster: publishing to the cluster database");
        watched.push(
            std::thread::Builder::new()
                .name("cluster".into())
                .spawn(move || outbox.run(&settings, &stop))?,
        );
    }
    let (pipeline, pipeline_threads) = pipeline::start(
        &config,
        handoff.clone(),
        processor,
        storage.log().clone(),
        outbox.clone().zip(cluster_settings),
        pipeline_shutdown.clone(),
    )?;
    watched.extend(pipeline_threads);
    // Now the `cluster` thread can describe a dead node's instances: it may take one over.
    // And the recovery has queued what it found (the open associations a previous process
    // reported are deleted once that is published).
    if let Some(o) = &outbox {
        o.recovery_queued();
        o.set_foreign(Arc::new(pipeline::foreign::ForeignReader {
            pipeline: pipeline.clone(),
            node: config.node.clone(),
            own_dir: config.node.data_dir.clone(),
            own_log: storage.log().clone(),
        }));
    }
    let mut service = config.service_config(pipeline.wanted_tags.clone());
    // What the door checks, from outside the config: the users file and the peers' hosts,
    // both read once, here.
    let invalid = |e: crate::config::ConfigError| io::Error::new(io::ErrorKind::InvalidInput, e.0);
    service.policy.identity = config.user_directory().map_err(invalid)?;
    if config.node.check_peer_address {
        // Only then are the hosts needed (a peer that is only an export target may not resolve
        // yet: exports retry).
        service.policy.peers = Arc::new(config.resolve_peers().map_err(invalid)?);
    }
    if !storage.streams() {
        service.stream_above = usize::MAX;
    }
    let shared = Arc::new(Shared {
        local_addr,
        tls_addr,
        handoff,
        door: pipeline.clone(),
        next_association: AtomicU64::new(0),
        service,
        associations: AssociationLimits::new(
            config.limits.max_associations,
            config.limits.max_associations_per_calling_ae,
            config.limits.max_associations_per_address,
        ),
        connections: AtomicUsize::new(0),
        shutdown: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        reactors_running: AtomicUsize::new(n),
        watched: std::sync::Mutex::new(watched),
        counters: net::counters::Counters::default(),
        budget: net::budget::Budget::new(config.limits.max_buffered_bytes),
        storage,
        config,
        tls: tls_config,
        mailboxes: mailboxes.clone(),
    });
    let (mut threads, acceptors) = net::spawn(&shared, polls, listener, tls_listener)?;
    match shared.watched.lock() {
        Ok(mut w) => w.extend(acceptors),
        Err(poisoned) => poisoned.into_inner().extend(acceptors),
    }
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = http {
        let shared = Arc::new(http::Shared {
            net: shared.clone(),
            pipeline: pipeline.clone(),
            fence: fence.clone(),
        });
        threads.push(
            std::thread::Builder::new()
                .name("http".into())
                .spawn(move || http::serve(listener, shared, n))?,
        );
        if let Some(a) = http_addr {
            tracing::info!(listen = %a, "http serving /metrics /healthz /readyz");
        }
    }
    tracing::info!(
        listen = local_addr.map_or_else(|| "none (TLS only)".to_string(), |a| a.to_string()),
        ae_title = %shared.config.node.ae_title,
        reactors = n,
        data_dir = %shared.config.node.data_dir.display(),
        durability = ?shared.config.storage.durability,
        "dicomgate serving"
    );
    Ok(NodeHandle {
        local_addr,
        tls_addr,
        shared,
        pipeline,
        mailboxes,
        threads,
        pipeline_shutdown,
        cluster_stop,
        _lock: lock,
        http_addr,
    })
}
