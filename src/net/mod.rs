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
pub mod counters;
pub mod reactor;
pub mod scu;
pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_queue::SegQueue;

use crate::config::Config;
use crate::handoff::{Door, Handoff};
use crate::storage::{OnDone, OnSpace, OnWritten, Storage, StoreDone, Written};

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
    /// Set by [`crate::node::NodeHandle::drain`]: the acceptor stops, and each reactor ends once its last
    /// association is done.
    pub draining: AtomicBool,
    /// Reactor threads still running.
    pub reactors_running: AtomicUsize,
    /// The storage and pipeline threads (segment log, storage workers, flush threads, ingest,
    /// checker, outbox, pipeline workers) and the acceptors: `/healthz` answers 503 once one of
    /// them has ended while the node runs (an acceptor, while it is not draining). Joined by
    /// [`crate::node::NodeHandle`]'s stop.
    pub watched: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// What `/metrics` and the status page report.
    pub counters: counters::Counters,
    /// The queues to ingest.
    pub handoff: Arc<Handoff>,
    /// The rules, as the door asks them (the pipeline's).
    pub door: Arc<dyn Door>,
    pub next_association: AtomicU64,
    /// The TLS listener's rustls configuration, when `[tls] listen` is set; replaced whole by
    /// [`crate::node::NodeHandle::reload_tls`] (new connections get the new one).
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

/// One mio `Poll` per reactor, each with the [`Mailbox`] through which the acceptor, storage
/// and the pipeline reach it.
pub fn reactors(n: usize) -> io::Result<(Vec<mio::Poll>, Arc<Vec<Mailbox>>)> {
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
    Ok((polls, Arc::new(boxes)))
}

/// How storage reaches the reactors: a store's outcome and a streamed write's completion go
/// to the mailbox of the reactor that asked (and wake it); room in storage's queue wakes every
/// reactor whose bit (`id % 64`) asked for it.
pub fn storage_callbacks(mailboxes: &Arc<Vec<Mailbox>>) -> (OnDone, OnWritten, OnSpace) {
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
    let mb = mailboxes.clone();
    let space = Arc::new(move |bits: u64| {
        for (i, m) in mb.iter().enumerate() {
            if bits & (1 << (i % 64)) != 0 {
                m.wake();
            }
        }
    });
    (done, written, space)
}

/// Wakes reactor `r` (the hand-off's "your queue has room" callback).
pub fn waker_of(mailboxes: &Arc<Vec<Mailbox>>) -> Arc<dyn Fn(usize) + Send + Sync> {
    let mb = mailboxes.clone();
    Arc::new(move |r: usize| {
        if let Some(m) = mb.get(r) {
            m.wake();
        }
    })
}

/// Threads started together.
pub type Threads = Vec<JoinHandle<()>>;

/// Starts a reactor thread per `polls` entry (pinned to a core each, round robin) and an
/// acceptor thread per listener given (`tls`: the TLS one), and returns (reactors,
/// acceptors). The threads end when [`Shared::shutdown`] is set (or, draining, once their
/// associations are done; acceptors at once).
pub fn spawn(
    shared: &Arc<Shared>,
    polls: Vec<mio::Poll>,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
) -> io::Result<(Threads, Threads)> {
    let mut threads = Vec::new();
    let mut acceptors = Vec::new();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for (i, poll) in polls.into_iter().enumerate() {
        let shared = shared.clone();
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
                    // Its ingest thread is told too (it ends only after its reactors).
                    struct Running<'a>(&'a Shared, usize);
                    impl Drop for Running<'_> {
                        fn drop(&mut self) {
                            self.0.reactors_running.fetch_sub(1, Ordering::AcqRel);
                            self.0.handoff.reactor_ended(self.1);
                        }
                    }
                    let _running = Running(&shared, i);
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
                    let mailboxes = shared.mailboxes.clone();
                    reactor::run(i, poll, &mailboxes, &shared);
                    // Test-only, debug builds only: with DICOMGATE_TEST_SLOW_REACTOR_END_MS=N,
                    // a reactor ended by the stop (not by a drain) takes N ms more to end, so
                    // that ingest (which ends after its reactors) ends late (tests/cluster.rs).
                    #[cfg(debug_assertions)]
                    if let Some(ms) = std::env::var("DICOMGATE_TEST_SLOW_REACTOR_END_MS")
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|_| shared.shutdown.load(Ordering::Acquire))
                    {
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    }
                })?,
        );
    }
    if let Some(listener) = listener {
        let shared = shared.clone();
        acceptors.push(
            std::thread::Builder::new()
                .name("acceptor".into())
                .spawn(move || accept_loop(listener, false, &shared.mailboxes, &shared))?,
        );
    }
    if let Some(listener) = tls_listener {
        if let Some(a) = shared.tls_addr {
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
        acceptors.push(
            std::thread::Builder::new()
                .name("acceptor-tls".into())
                .spawn(move || accept_loop(listener, true, &shared.mailboxes, &shared))?,
        );
    }
    Ok((threads, acceptors))
}

/// Accepts connections from `listener` (the TLS one when `tls`) and hands them to reactors.
fn accept_loop(listener: TcpListener, tls: bool, mailboxes: &[Mailbox], shared: &Shared) {
    // Test-only fault injection, in debug builds only (as DICOMGATE_TEST_END_REACTOR): with
    // DICOMGATE_TEST_END_ACCEPTOR set, the plain acceptor ends at once, so tests/health.rs can
    // see `/healthz` report it.
    #[cfg(debug_assertions)]
    if !tls && std::env::var_os("DICOMGATE_TEST_END_ACCEPTOR").is_some() {
        tracing::warn!(
            "DICOMGATE_TEST_END_ACCEPTOR: the acceptor ends now (test-only fault injection)"
        );
        return;
    }
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
