//! The only code that touches sockets: the acceptor, one mio reactor per core, and the blocking
//! requestor used by `dicomgate echo` / `store`.
//!
//! DICOM over TLS (`[tls]`, [`tls`]) is a second listener with its own acceptor thread; its
//! connections go to the same reactors, counted against the same `max_connections`,
//! associations limits and memory budget, with a rustls session between the socket and the
//! association's bytes (sans-IO, in the reactor's loop; the handshake runs under ARTIM).
//!
//! Connections are spread by one acceptor thread that hands each accepted socket to the reactor
//! with the fewest connections over a lock-free queue and wakes it with a `mio::Waker`. We chose
//! this over one SO_REUSEPORT listener per reactor because the kernel's hash spreads few, long
//! DICOM associations unevenly (two busy modalities can land on one core), while the acceptor
//! balances by live count; accepting is not the bottleneck for associations that each carry
//! hundreds of instances.
//!
//! Rules from mio's docs, kept here: drain reads and writes until `WouldBlock` (events are edge
//! triggered); expect spurious events; never register a socket twice; a paused connection
//! (backpressure) ignores readiness and is read again when it resumes.

pub mod budget;
pub mod http;
pub mod reactor;
pub mod scu;
pub mod status;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_queue::SegQueue;

use crate::config::{Config, ConfigError};
use crate::pipeline::{self, Pipeline, Processor};
use crate::storage::{Storage, StoreDone, Written};

/// Counts associations against `max_associations`, `max_associations_per_calling_ae` and
/// `max_associations_per_address`. Taken once when an association is accepted and once when it
/// ends, never per PDU; the per-AE and per-address maps are the one lock in net/, held for two
/// hash-map updates.
#[derive(Debug)]
pub struct AssociationLimits {
    total: AtomicUsize,
    per: Mutex<PerKey>,
    max_total: usize,
    max_per_ae: usize,
    max_per_address: usize,
}

#[derive(Debug, Default)]
struct PerKey {
    ae: HashMap<String, usize>,
    address: HashMap<IpAddr, usize>,
}

/// One requestor address, whichever way it reached us: an IPv4 peer on a dual-stack socket
/// arrives IPv4-mapped (`::ffff:a.b.c.d`) and is counted as `a.b.c.d`.
fn address_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl AssociationLimits {
    pub fn new(max_total: usize, max_per_ae: usize, max_per_address: usize) -> Self {
        AssociationLimits {
            total: AtomicUsize::new(0),
            per: Mutex::new(PerKey::default()),
            max_total,
            max_per_ae,
            max_per_address,
        }
    }

    /// Takes a slot for `calling_ae` from `peer`, or says no.
    pub fn try_acquire(&self, calling_ae: &str, peer: Option<IpAddr>) -> bool {
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        let mut m = self.per.lock().unwrap_or_else(|p| p.into_inner());
        let ae = m.ae.get(calling_ae).copied().unwrap_or(0);
        let addr = peer.map_or(0, |ip| {
            m.address.get(&address_key(ip)).copied().unwrap_or(0)
        });
        if ae >= self.max_per_ae || addr >= self.max_per_address {
            drop(m);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        *m.ae.entry(calling_ae.to_string()).or_insert(0) += 1;
        if let Some(ip) = peer {
            *m.address.entry(address_key(ip)).or_insert(0) += 1;
        }
        true
    }

    /// Gives back a slot taken for the same AE title and address.
    pub fn release(&self, calling_ae: &str, peer: Option<IpAddr>) {
        let mut m = self.per.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.ae.get_mut(calling_ae) {
            *n -= 1;
            if *n == 0 {
                m.ae.remove(calling_ae);
            }
        }
        if let Some(ip) = peer.map(address_key) {
            if let Some(n) = m.address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.address.remove(&ip);
                }
            }
        }
        drop(m);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn active(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl crate::assoc::Slots for AssociationLimits {
    fn try_acquire(&self, calling_ae: &str, peer: Option<IpAddr>) -> bool {
        AssociationLimits::try_acquire(self, calling_ae, peer)
    }
    fn release(&self, calling_ae: &str, peer: Option<IpAddr>) {
        AssociationLimits::release(self, calling_ae, peer)
    }
}

/// What the reactors share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    /// The address the plain DICOM listener is bound to (`[node] listen` with its port
    /// resolved); `None` when TLS only.
    pub local_addr: Option<SocketAddr>,
    /// The address the TLS listener is bound to, if any.
    pub tls_addr: Option<SocketAddr>,
    /// What every association's DIMSE service is configured with.
    pub service: crate::dimse::service::ServiceConfig,
    pub storage: Storage,
    /// Data set bytes held in memory, node-wide (`[limits] max_buffered_bytes`).
    pub budget: budget::Budget,
    pub associations: AssociationLimits,
    pub connections: AtomicUsize,
    pub shutdown: AtomicBool,
    /// Set by [`NodeHandle::drain`]: the acceptor stops, and each reactor ends once its last
    /// association is done.
    pub draining: AtomicBool,
    /// Reactor threads still running.
    pub reactors_running: AtomicUsize,
    /// The storage and pipeline threads (segment log, storage workers, flush threads, ingest,
    /// checker, outbox, pipeline workers): `/healthz` answers 503 once one of them has ended
    /// while the node runs. Joined by [`NodeHandle`]'s stop.
    pub watched: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// What `/metrics` reports.
    pub counters: http::Counters,
    pub pipeline: Arc<Pipeline>,
    pub next_association: AtomicU64,
    /// The TLS listener's rustls configuration, when `[tls] listen` is set; replaced whole by
    /// [`NodeHandle::reload_tls`] (new connections get the new one).
    pub tls: Option<arc_swap::ArcSwap<rustls::ServerConfig>>,
    /// Every reactor's mailbox, by reactor number (for `/metrics`' connections per reactor).
    pub mailboxes: Arc<Vec<Mailbox>>,
}

/// A reactor's inbox: new sockets from the acceptor and finished stores from storage.
#[derive(Debug)]
pub struct Mailbox {
    /// Accepted sockets: (socket, peer, over TLS).
    pub new_connections: SegQueue<(TcpStream, SocketAddr, bool)>,
    pub completions: SegQueue<StoreDone>,
    /// Writes of streamed data sets done.
    pub written: SegQueue<Written>,
    /// Set when a wake is already pending, so a burst of completions costs one wake-up.
    pub wake_pending: crate::wakeflag::WakeFlag,
    pub waker: mio::Waker,
    pub live: AtomicUsize,
}

impl Mailbox {
    /// Called by the reactor before it empties its queues (see [`crate::wakeflag`]).
    pub fn begin_drain(&self) {
        self.wake_pending.begin_drain();
    }

    pub fn wake(&self) {
        if self.wake_pending.notify() {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "reactor wake-up failed");
            }
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    /// Where the plain listener listens; `None` when `[node] listen` is "" (TLS only).
    pub local_addr: Option<SocketAddr>,
    /// Where the TLS listener listens, if `[tls] listen` names one.
    pub tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    mailboxes: Arc<Vec<Mailbox>>,
    threads: Vec<JoinHandle<()>>,
    pipeline_shutdown: Arc<AtomicBool>,
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
                && self.shared.pipeline.is_idle();
            idle_checks = if idle { idle_checks + 1 } else { 0 };
            if idle_checks >= 4 {
                break false;
            }
            if std::time::Instant::now() >= deadline {
                break !self.shared.pipeline.is_idle();
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
        let cfg = tls::server_config(&self.shared.config.tls)?;
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
        let (tx, rx) = std::sync::mpsc::channel();
        // The thread being joined, for the warning (the review found it always blamed a
        // pipeline worker, when an HTTP connection could be the one).
        let joining = Arc::new(Mutex::new(String::new()));
        let now_joining = joining.clone();
        let joiner = std::thread::spawn(move || {
            for t in threads {
                if let Ok(mut n) = now_joining.lock() {
                    *n = t.thread().name().unwrap_or("unnamed").to_string();
                }
                let _ = t.join();
            }
            let _ = tx.send(());
        });
        match rx.recv_timeout(STOP_GRACE) {
            Ok(()) => {
                let _ = joiner.join();
            }
            Err(_) => {
                let thread = joining.lock().map(|n| n.clone()).unwrap_or_default();
                tracing::warn!(
                    grace_seconds = STOP_GRACE.as_secs(),
                    thread,
                    "a thread is still waiting on a peer (an export or an HTTP client): stopping without it (a batch it was exporting resumes at the next start)"
                );
            }
        }
    }

    /// Blocks until the node stops (it stops only on shutdown).
    pub fn wait(mut self) {
        // Reactors, acceptors and HTTP first: they end only when the node stops. The watched
        // threads stay where `/healthz` sees them until then (taken first, a dead pipeline
        // worker was reported healthy for the rest of the run).
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for t in self.take_watched() {
            let _ = t.join();
        }
    }

    /// The storage and pipeline threads, taken out of [`Shared::watched`] to be joined.
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
        &self.shared.pipeline.stats
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
pub fn start_with(config: Config, processor: Option<Arc<dyn Processor>>) -> io::Result<NodeHandle> {
    config
        .validate()
        .and_then(|()| config.check_environment())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tls::check_files(&config)
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
            tls::server_config(&config.tls)
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
    let mut polls = Vec::with_capacity(n);
    let mut boxes = Vec::with_capacity(n);
    for _ in 0..n {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), reactor::WAKER)?;
        boxes.push(Mailbox {
            new_connections: SegQueue::new(),
            completions: SegQueue::new(),
            written: SegQueue::new(),
            wake_pending: crate::wakeflag::WakeFlag::new(),
            waker,
            live: AtomicUsize::new(0),
        });
        polls.push(poll);
    }
    let mailboxes = Arc::new(boxes);
    let mb = mailboxes.clone();
    let done = Arc::new(move |d: StoreDone| {
        if let Some(m) = mb.get(d.reply.reactor) {
            m.completions.push(d);
            m.wake();
        }
    });
    let mb = mailboxes.clone();
    let written = Arc::new(move |w: Written| {
        if let Some(m) = mb.get(w.reply.reactor) {
            m.written.push(w);
            m.wake();
        }
    });
    // Room in storage's queue: wake every reactor whose bit (id % 64) asked.
    let mb = mailboxes.clone();
    let space = Arc::new(move |bits: u64| {
        for (i, m) in mb.iter().enumerate() {
            if bits & (1 << (i % 64)) != 0 {
                m.wake();
            }
        }
    });
    let pipeline_shutdown = Arc::new(AtomicBool::new(false));
    let (storage, mut watched) = Storage::start(
        config.node.data_dir.clone(),
        &config.storage,
        done,
        written,
        space,
        pipeline_shutdown.clone(),
    )?;
    let mb = mailboxes.clone();
    let room = Arc::new(move |r: usize| {
        if let Some(m) = mb.get(r) {
            m.wake();
        }
    });
    let (pipeline, pipeline_threads) = pipeline::start(
        &config,
        n,
        processor,
        storage.log().clone(),
        room,
        pipeline_shutdown.clone(),
    )?;
    watched.extend(pipeline_threads);
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
        pipeline,
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
        counters: http::Counters::default(),
        budget: budget::Budget::new(config.limits.max_buffered_bytes),
        storage,
        config,
        tls: tls_config,
        mailboxes: mailboxes.clone(),
    });
    let mut threads = Vec::new();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for (i, poll) in polls.into_iter().enumerate() {
        let shared = shared.clone();
        let mailboxes = mailboxes.clone();
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        threads.push(
            std::thread::Builder::new()
                .name(format!("reactor-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    // Counted down however the reactor ends (a panic included), so a drain never
                    // waits for a reactor that is gone.
                    struct Running<'a>(&'a AtomicUsize);
                    impl Drop for Running<'_> {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    let _running = Running(&shared.reactors_running);
                    // Test-only fault injection, compiled into debug builds only (the ones the
                    // tests run; a release build has no such switch): with
                    // DICOMGATE_TEST_END_REACTOR=N, reactor N ends as soon as it starts, so
                    // tests/health.rs can see `/healthz` report a reactor that has died.
                    #[cfg(debug_assertions)]
                    if std::env::var("DICOMGATE_TEST_END_REACTOR")
                        .ok()
                        .and_then(|v| v.parse::<usize>().ok())
                        == Some(i)
                    {
                        tracing::warn!(reactor = i, "DICOMGATE_TEST_END_REACTOR: this reactor ends now (test-only fault injection)");
                        return;
                    }
                    reactor::run(i, poll, &mailboxes, &shared);
                })?,
        );
    }
    if let Some(listener) = listener {
        let shared = shared.clone();
        let mailboxes = mailboxes.clone();
        threads.push(
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || accept_loop(listener, false, &mailboxes, &shared))?,
        );
    }
    if let Some(listener) = tls_listener {
        if let Some(a) = tls_addr {
            tracing::info!(
                listen = %a,
                client_certificate = if shared.config.tls.client_ca.as_os_str().is_empty() {
                    "not asked for"
                } else {
                    "required"
                },
                "DICOM TLS listener (TLS 1.2/1.3, PS3.15 B.12 BCP 195 profile)"
            );
        }
        let shared = shared.clone();
        let mailboxes = mailboxes.clone();
        threads.push(
            std::thread::Builder::new()
                .name("acceptor-tls".into())
                .spawn(move || accept_loop(listener, true, &mailboxes, &shared))?,
        );
    }
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = http {
        let shared = shared.clone();
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
        mailboxes,
        threads,
        pipeline_shutdown,
        _lock: lock,
        http_addr,
    })
}

/// Accepts connections from `listener` (the TLS one when `tls`) and hands them to reactors.
fn accept_loop(listener: TcpListener, tls: bool, mailboxes: &[Mailbox], shared: &Shared) {
    let mut refused_logged = false;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.shutdown.load(Ordering::Acquire)
                    || shared.draining.load(Ordering::Acquire)
                {
                    return;
                }
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if shared.shutdown.load(Ordering::Acquire) || shared.draining.load(Ordering::Acquire) {
            return; // the listener closes with this thread: no new associations
        }
        // Taken before the socket is set up, in one step: the plain and the TLS acceptor
        // share the count, so two of them never both take the last slot.
        let max = shared.config.limits.max_connections;
        if let Err(open) =
            shared
                .connections
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
        {
            if !refused_logged {
                tracing::warn!(%peer, open, tls, "max_connections reached: closing new connections");
                refused_logged = true;
            }
            continue; // dropped: closed at once
        }
        refused_logged = false;
        if stream
            .set_nodelay(true)
            .and(stream.set_nonblocking(true))
            .is_err()
        {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let Some((_, m)) = mailboxes
            .iter()
            .enumerate()
            .min_by_key(|(_, m)| m.live.load(Ordering::Relaxed))
        else {
            return;
        };
        m.live.fetch_add(1, Ordering::Relaxed);
        m.new_connections.push((stream, peer, tls));
        m.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::AssociationLimits;
    use std::net::IpAddr;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    /// `max_associations_per_address`: an address's count is its own, an IPv4-mapped IPv6
    /// requestor counts as its IPv4 address, a refused slot takes nothing, and a released one
    /// is free again.
    #[test]
    fn slots_are_counted_per_requestor_address() {
        let l = AssociationLimits::new(10, 10, 2);
        assert!(l.try_acquire("A", ip("10.0.0.1")));
        assert!(l.try_acquire("B", ip("::ffff:10.0.0.1")));
        assert!(
            !l.try_acquire("C", ip("10.0.0.1")),
            "third from one address"
        );
        assert!(
            !l.try_acquire("C", ip("::ffff:10.0.0.1")),
            "the same address"
        );
        assert!(l.try_acquire("C", ip("10.0.0.2")), "another address");
        assert!(
            l.try_acquire("D", None),
            "an unknown address is not counted"
        );
        assert_eq!(l.active(), 4, "the refusals took no slot");
        l.release("B", ip("::ffff:10.0.0.1"));
        assert!(
            l.try_acquire("E", ip("10.0.0.1")),
            "released, then free again"
        );
        assert!(!l.try_acquire("F", ip("10.0.0.1")));
    }
}
