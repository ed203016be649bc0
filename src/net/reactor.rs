//! One mio event loop: its connections' sockets and read buffers, and the moving of bytes and
//! completions between them, each association's sans-IO [`Service`] and storage. Nothing of
//! DIMSE or the association lives here: the service decides, the reactor carries.
//!
//! Rules from mio's docs, kept here: drain reads and writes until `WouldBlock` (events are edge
//! triggered); expect spurious events; never register a socket twice. A connection whose
//! service does not want input (backpressure: its operations window is full, or a release
//! waits for outstanding responses) ignores readiness and is read again when that changes; it
//! then holds at most one read buffer of bytes beyond what its service took.
//!
//! Nothing here polls. Timers live in one heap (an entry per connection's earliest deadline;
//! entries made stale by later activity are skipped when they come up). Work (a store, or a
//! write of a streamed data set) that finds storage's queue full waits in its connection's one
//! `blocked` slot, and the connection asks storage to wake this reactor when a worker makes room
//! (`Storage::submit_or_notify`); the service queues all further work meanwhile, and none is
//! taken from it while the slot is full, so nothing is overwritten. A streamed data set's file
//! (`storage::StreamFile`) is made on its first chunk and kept by token until its store takes
//! it or the service discards it (then a worker frees it, never this thread unless storage's
//! queue is full at that moment). The pipeline's queue works the same way
//! (`Pipeline::push_or_notify`).
//!
//! TLS (PS3.15 B.12): a connection from the TLS listener has a rustls session in its `Io`
//! ([`super::tls::Session`]); reads take decrypted bytes from it (reading records from the
//! socket while it has none) and writes go through it, so everything above sees the same bytes
//! as on a plain socket. The handshake needs nothing of its own: it runs before the
//! A-ASSOCIATE-RQ, so ARTIM (running from the accept) drops a peer that never completes it, and
//! a failed handshake or a bad record is logged once with the peer and rustls's reason and the
//! connection closed after the alert.
//!
//! Responses: completions at hand are all handed to their services first, then each touched
//! connection is written once (one write per batch, not per response).
//!
//! Hand-off to the pipeline: each durable instance becomes an `Event::Stored` on this reactor's
//! bounded lock-free queue, and each association that stored something ends with an
//! `Event::Closed` after its last store completed: a connection whose transport is gone keeps
//! its slot (without a socket) until its in-flight stores are done, so the close never
//! overtakes an instance. A full queue parks events in a local overflow and pauses reading on
//! every connection of the reactor until the pipeline catches up; nothing is dropped.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::{Mailbox, Shared};
use crate::config::Unmatched;
use crate::dicom::tags;
use crate::dimse::command::status;
use crate::dimse::service::{Chunk, Service, ServiceEvent, StoreOutcome, StoreSubmission, Work};
use crate::handoff::{Arrival, AtTheDoor, Event as PipelineEvent};
use crate::storage::{FileMeta, Job, ReplyTo, StoreJob, StreamFile, WriteJob};
use crate::ul;
use std::sync::Arc;

/// How long a stopping reactor waits for room in its handoff queue for the events left in its
/// overflow ([`Reactor::hand_off_overflow_at_stop`]).
const STOP_HAND_OFF: Duration = Duration::from_secs(1);

pub const WAKER: Token = Token(usize::MAX);

/// Smallest read buffer; grown up to the largest PDU allowed in the connection's state.
const MIN_BUFFER: usize = 16 * 1024;

/// The socket side of a connection.
#[derive(Debug)]
struct Io {
    stream: TcpStream,
    peer: SocketAddr,
    /// The rustls session of a connection from the TLS listener.
    tls: Option<Box<super::tls::Session>>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

#[derive(Debug)]
struct Conn {
    /// `None` once the transport is closed, while stores handed out are still in flight.
    io: Option<Io>,
    peer: SocketAddr,
    generation: u64,
    svc: Service,
    /// Work storage's queue had no room for; no other is taken from `svc` while it is here.
    blocked: Option<Job>,
    /// The files of data sets being streamed to storage, by token.
    streams: Vec<(u64, Arc<StreamFile>)>,
    /// The deadline this connection has in the timer heap, if any.
    armed: Option<Instant>,
    /// On the reactor's list of connections to write after a batch of completions.
    touched: bool,
    /// On the reactor's list of connections waiting for room in storage's queue.
    listed_blocked: bool,
    /// The association's log line was written.
    logged: bool,
    /// The AE titles of a rejected A-ASSOCIATE-RQ, for its log line.
    rejected_aes: Option<(String, String)>,
    /// What the pipeline is told of each store in storage, by token, once it is durable.
    arrivals: Vec<(u64, Instant, Box<Arrival>)>,
    /// Bytes of this connection counted in the node-wide budget: (all, those held by stores).
    accounted: (usize, usize),
    /// On the reactor's list of connections waiting for room in the budget.
    listed_starved: bool,
    started: Instant,
    /// Node-wide association number, used by the pipeline's open-association counts.
    association: u64,
}

struct Reactor<'a> {
    id: usize,
    poll: Poll,
    mailbox: &'a Mailbox,
    /// Every reactor's mailbox, to wake those waiting for room in the budget.
    mailboxes: &'a [Mailbox],
    shared: &'a Shared,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    generation: u64,
    /// Events the pipeline queue had no room for, oldest first.
    overflow: VecDeque<PipelineEvent>,
    /// (deadline, connection, generation); stale entries are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Connections with a `blocked` store, waiting for room in storage's queue.
    blocked: Vec<usize>,
    /// Connections not read from while the node is over its memory budget.
    starved: Vec<usize>,
    rung: bool,
}

pub fn run(id: usize, poll: Poll, mailboxes: &[Mailbox], shared: &Shared) {
    let Some(mailbox) = mailboxes.get(id) else {
        return;
    };
    let mut r = Reactor {
        id,
        poll,
        mailbox,
        mailboxes,
        shared,
        conns: Vec::new(),
        free: Vec::new(),
        generation: 0,
        overflow: VecDeque::new(),
        timers: BinaryHeap::new(),
        blocked: Vec::new(),
        starved: Vec::new(),
        rung: false,
    };
    let mut events = Events::with_capacity(1024);
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            r.close_all();
            r.hand_off_overflow_at_stop();
            return;
        }
        if shared.draining.load(Ordering::Acquire)
            && r.conns.iter().all(Option::is_none)
            && r.overflow.is_empty()
            && r.mailbox.new_connections.is_empty()
        {
            return; // drained: every association of this reactor is done
        }
        let timeout = r.next_timeout();
        if let Err(e) = r.poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed");
            }
            continue;
        }
        let mut woke = false;
        for ev in events.iter() {
            if ev.token() == WAKER {
                woke = true;
                continue;
            }
            r.drive(ev.token().0, Instant::now());
        }
        if woke
            || !r.mailbox.completions.is_empty()
            || !r.mailbox.written.is_empty()
            || !r.mailbox.new_connections.is_empty()
        {
            r.mailbox.begin_drain();
            r.take_new_connections();
            r.take_completions();
            r.retry_waiting();
            r.flush_overflow();
        }
        r.fire_timers();
        if std::mem::take(&mut r.rung) {
            shared.handoff.ring(id);
        }
    }
}

impl Reactor<'_> {
    fn next_timeout(&self) -> Option<Duration> {
        let Reverse((t, _, _)) = self.timers.peek()?;
        Some(t.saturating_duration_since(Instant::now()))
    }

    fn take_new_connections(&mut self) {
        while let Some((std_stream, peer, over_tls)) = self.mailbox.new_connections.pop() {
            let mut stream = TcpStream::from_std(std_stream);
            let tls = if over_tls {
                let session = self
                    .shared
                    .tls
                    .as_ref()
                    .map(|c| super::tls::Session::new(c.load_full()));
                match session {
                    Some(Ok(s)) => Some(Box::new(s)),
                    Some(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "TLS session not made: closing");
                        self.forget_connection();
                        continue;
                    }
                    None => {
                        self.forget_connection();
                        continue;
                    }
                }
            } else {
                None
            };
            let idx = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(idx),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(%peer, error = %e, "register failed");
                self.free.push(idx);
                self.forget_connection();
                continue;
            }
            self.generation += 1;
            let now = Instant::now();
            self.conns[idx] = Some(Conn {
                io: Some(Io {
                    stream,
                    peer,
                    tls,
                    buf: Vec::new(),
                    start: 0,
                    end: 0,
                }),
                peer,
                generation: self.generation,
                svc: Service::new(now, &self.shared.service).with_peer_ip(peer.ip()),
                blocked: None,
                streams: Vec::new(),
                armed: None,
                touched: false,
                listed_blocked: false,
                logged: false,
                rejected_aes: None,
                accounted: (0, 0),
                arrivals: Vec::new(),
                listed_starved: false,
                started: now,
                association: self.shared.next_association.fetch_add(1, Ordering::Relaxed) + 1,
            });
            self.drive(idx, now);
        }
    }

    fn forget_connection(&self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        self.mailbox.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands every completion at hand to its service, then writes each touched connection once.
    fn take_completions(&mut self) {
        let mut touched: Vec<usize> = Vec::new();
        let now = Instant::now();
        while let Some(w) = self.mailbox.written.pop() {
            let idx = w.reply.connection;
            let Some(c) = conn_of(&mut self.conns, w.reply) else {
                continue;
            };
            c.svc.handle_written(now, w.token, w.bytes);
            if !c.touched {
                c.touched = true;
                touched.push(idx);
            }
        }
        while let Some(done) = self.mailbox.completions.pop() {
            let idx = done.reply.connection;
            let Some(c) = conn_of(&mut self.conns, done.reply) else {
                continue;
            };
            let arrival = c
                .arrivals
                .iter()
                .position(|(t, _, _)| *t == done.token)
                .map(|i| c.arrivals.swap_remove(i));
            let arrival = arrival.map(|(_, submitted, a)| {
                self.shared
                    .counters
                    .store_seconds
                    .observe(now.saturating_duration_since(submitted).as_secs_f64());
                a
            });
            let mut stored_event = None;
            let outcome = match done.result {
                Ok(stored) => {
                    self.shared.counters.stored(now, stored.bytes);
                    if let Some(mut a) = arrival {
                        // What the pipeline is told: the instance is durable, and where.
                        a.record.bytes = stored.bytes;
                        a.record.path = stored.path;
                        a.received_ms = stored.received_ms;
                        stored_event = Some(PipelineEvent::Stored {
                            arrival: a,
                            new: stored.new,
                        });
                    }
                    StoreOutcome::Stored {
                        bytes: stored.bytes,
                    }
                }
                Err(e) => {
                    let kind = e.kind.label();
                    self.shared.counters.store_error(kind);
                    tracing::error!(peer = %c.peer, kind, error = %e, "store failed: answering 0xA700");
                    StoreOutcome::Failed {
                        status: status::OUT_OF_RESOURCES,
                        comment: e.message,
                    }
                }
            };
            c.svc.handle_store_done(now, done.token, outcome);
            if !c.touched {
                c.touched = true;
                touched.push(idx);
            }
            // Before the connection is driven (and perhaps removed, which sends its Closed).
            if let Some(ev) = stored_event {
                self.push_event(ev);
            }
        }
        for idx in touched {
            if let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) {
                c.touched = false;
            }
            self.drive(idx, now);
        }
    }

    fn push_event(&mut self, ev: PipelineEvent) {
        // A close rings at once (it may trigger processing); instances ring once a backlog
        // builds, else the ingest thread's sweep takes them (handoff::RING_AT).
        if matches!(ev, PipelineEvent::Closed { .. })
            || self.shared.handoff.backlog(self.id) >= crate::handoff::RING_AT
        {
            self.rung = true;
        }
        if !self.overflow.is_empty() {
            self.overflow.push_back(ev);
        } else if let Err(ev) = self.shared.handoff.push(self.id, ev) {
            match self.shared.handoff.push_or_notify(self.id, ev) {
                Ok(()) => {}
                Err(ev) => {
                    tracing::debug!(reactor = self.id, "pipeline queue full: pausing reads");
                    self.overflow.push_back(ev);
                    self.rung = true;
                }
            }
        }
    }

    /// Moves parked events to the pipeline queue; when all went, resumes reading.
    fn flush_overflow(&mut self) {
        if self.overflow.is_empty() {
            return;
        }
        while let Some(ev) = self.overflow.pop_front() {
            if let Err(ev) = self.shared.handoff.push_or_notify(self.id, ev) {
                self.overflow.push_front(ev);
                self.rung = true;
                return;
            }
        }
        self.rung = true;
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            if self.conns[idx].is_some() {
                self.drive(idx, now);
            }
        }
    }

    /// At the node's stop, after [`Reactor::close_all`]: hands ingest what still waits in the
    /// overflow (acknowledged stores among them, and the closes just made), retrying for at
    /// most [`STOP_HAND_OFF`] while ingest makes room (it runs until this reactor has ended).
    /// What is left then is said to the handoff ([`Handoff::gave_up`]), so the node's stop
    /// does not say that every acknowledged store was published (a clean cluster leave would
    /// then need no takeover).
    ///
    /// [`Handoff::gave_up`]: crate::handoff::Handoff::gave_up
    fn hand_off_overflow_at_stop(&mut self) {
        let deadline = Instant::now() + STOP_HAND_OFF;
        while let Some(ev) = self.overflow.pop_front() {
            if let Err(ev) = self.shared.handoff.push(self.id, ev) {
                self.overflow.push_front(ev);
                self.shared.handoff.ring(self.id);
                if Instant::now() >= deadline {
                    break;
                }
                // Only at a stop, for at most STOP_HAND_OFF: no poll loop in normal running.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if !self.overflow.is_empty() {
            tracing::warn!(
                reactor = self.id,
                events = self.overflow.len(),
                "stopping with events ingest did not take: acknowledged stores among them are \
                 published at the next start"
            );
            self.shared.handoff.gave_up();
        }
    }

    /// After a wake, drives again the connections that waited for room: in storage's queue (a
    /// blocked store) or in the memory budget (not read from). Each once.
    fn retry_waiting(&mut self) {
        let now = Instant::now();
        let mut idxs = std::mem::take(&mut self.blocked);
        idxs.append(&mut self.starved);
        idxs.sort_unstable();
        idxs.dedup();
        for idx in idxs {
            if let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) {
                c.listed_blocked = false;
                c.listed_starved = false;
            }
            self.drive(idx, now);
        }
    }

    /// Brings the connection's share of the node-wide budget up to date; when that made room
    /// (or gave the overdraft back), wakes the reactors with connections waiting for it.
    fn account(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let budget = &self.shared.budget;
        let held = (c.svc.held_bytes(), c.svc.store_bytes());
        let mut freed = budget.adjust(c.accounted, held);
        c.accounted = held;
        if !c.svc.message_in_progress() || c.io.is_none() {
            freed |= budget.release_overdraft(super::budget::Budget::key(self.id, c.generation));
        }
        if freed {
            self.wake_starved();
        }
    }

    fn wake_starved(&self) {
        let bits = self.shared.budget.take_starved();
        if bits == 0 {
            return;
        }
        for (i, m) in self.mailboxes.iter().enumerate() {
            if bits & (1 << (i % 64)) != 0 {
                m.wake();
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, idx, generation))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self
                .conns
                .get_mut(idx)
                .and_then(Option::as_mut)
                .filter(|c| c.generation == generation && c.armed == Some(t))
            else {
                continue; // stale
            };
            c.armed = None;
            c.svc.handle_timeout(now);
            self.drive(idx, now);
        }
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            if let Some(c) = self.conns[idx].as_mut() {
                c.svc.abort(now, "node shutting down");
                if let Some(io) = c.io.as_mut() {
                    let _ = write_out(io, &mut c.svc);
                }
                self.close_transport(idx);
                self.remove(idx);
            }
        }
    }

    /// Runs a connection until it can make no more progress without new readiness, a
    /// completion or room in a queue; then re-arms its timer.
    fn drive(&mut self, idx: usize, now: Instant) {
        let shared = self.shared;
        let reactor = self.id;
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let mut closed = false;
        let mut starved = false;
        let mut freed = false;
        let key = super::budget::Budget::key(reactor, c.generation);
        loop {
            let cfg = &shared.service;
            // Input and storage until neither moves: a store answered at once (refused) frees
            // the window, so bytes already buffered (a pipelined A-RELEASE-RQ, say) must be
            // offered again before reading, or nothing would ever drive them.
            loop {
                let mut consumed = 0;
                if let Some(io) = c.io.as_mut() {
                    consumed = c.svc.handle_input(
                        now,
                        &io.buf[io.start..io.end],
                        cfg,
                        &shared.associations,
                    );
                    io.start += consumed;
                }
                let answered = submit_stores(c, shared, reactor, idx);
                let more = c.io.as_ref().is_some_and(|io| io.start < io.end);
                if !(more && c.svc.wants_read() && (consumed > 0 || answered > 0)) {
                    break;
                }
            }
            log_events(c, shared);
            let Some(io) = c.io.as_mut() else {
                break;
            };
            if let Err(e) = write_out(io, &mut c.svc) {
                c.svc.handle_transport_error(now, &e.to_string());
                closed = true;
                break;
            }
            if c.svc.is_closed() {
                // Over TLS, also the records rustls still holds must be out.
                let tls_pending = io.tls.as_ref().is_some_and(|t| t.wants_write());
                closed = (c.svc.transmit().is_empty() && !tls_pending)
                    || c.svc.state() == crate::assoc::State::Sta1;
                break;
            }
            if !c.svc.wants_read() {
                break;
            }
            if !self.overflow.is_empty() {
                c.svc.handle_read_paused(now);
                break;
            }
            // The budget sees what this connection holds now, not at the end of the drive
            // (one drive can read a whole message from a fast peer).
            let held = (c.svc.held_bytes(), c.svc.store_bytes());
            freed |= shared.budget.adjust(c.accounted, held);
            c.accounted = held;
            let in_progress = c.svc.message_in_progress();
            if !in_progress {
                // The overdraft covers one message: given back as soon as it is complete.
                freed |= shared.budget.release_overdraft(key);
            }
            if !shared.budget.may_read(key, in_progress)
                && !shared.budget.starve(reactor, key, in_progress)
            {
                starved = true; // woken when room is made
                c.svc.handle_read_paused(now);
                break;
            }
            match read_some(io, c.svc.max_receive_pdu(&shared.service)) {
                Ok((n, wire)) => {
                    if wire > 0 {
                        c.svc.handle_received(now, wire);
                    }
                    if n == 0 {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    if let Some(t) = io.tls.as_ref() {
                        log_tls_end(c.peer, t, &e);
                    }
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        c.svc.handle_transport_closed(now); // the peer closed: EOF
                    } else {
                        // A reset or another failure is not an orderly close (issue 11).
                        c.svc.handle_transport_error(now, &e.to_string());
                    }
                    closed = true;
                    break;
                }
            }
        }
        log_events(c, shared);
        if c.blocked.is_some() && !c.listed_blocked {
            c.listed_blocked = true;
            self.blocked.push(idx);
        }
        if starved && !c.listed_starved {
            c.listed_starved = true;
            self.starved.push(idx);
        }
        if closed {
            self.close_transport(idx);
        }
        self.arm(idx);
        if freed {
            self.wake_starved();
        }
        self.account(idx);
        self.remove_if_done(idx);
    }

    /// Puts the connection's next deadline in the heap unless an earlier one is there already.
    fn arm(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if c.io.is_none() {
            return; // no peer left to time out
        }
        if let Some(t) = c.svc.poll_timeout() {
            if c.armed.is_none_or(|a| t < a) {
                c.armed = Some(t);
                self.timers.push(Reverse((t, idx, c.generation)));
            }
        }
    }

    /// Closes the socket and gives back the connection's slots; the connection itself stays
    /// until its stores in flight are done.
    fn close_transport(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let Some(mut io) = c.io.take() else {
            return;
        };
        if let Some(t) = io.tls.as_mut() {
            t.close(&mut io.stream);
        }
        let _ = self.poll.registry().deregister(&mut io.stream);
        if c.svc.state() != crate::assoc::State::Sta1 {
            c.svc.handle_transport_closed(Instant::now());
        }
        match c.blocked.take() {
            Some(Job::Store(job)) => {
                // Never queued, never acknowledged: the peer is gone, so it is not stored.
                c.arrivals.retain(|(t, _, _)| *t != job.token);
                c.svc.handle_store_done(
                    Instant::now(),
                    job.token,
                    StoreOutcome::Failed {
                        status: status::OUT_OF_RESOURCES,
                        comment: "connection closed before storage had room".into(),
                    },
                );
            }
            Some(Job::Write(w)) => c.svc.handle_written(Instant::now(), w.token, w.bytes.len()),
            Some(Job::Discard(_)) | None => {}
        }
        if c.svc.holds_slot() {
            if let Some(n) = c.svc.negotiated() {
                self.shared
                    .associations
                    .release(&n.calling_ae, Some(c.peer.ip()));
            }
        }
        if c.svc.work_in_flight() == 0 {
            // Logged before the socket closes, so a peer that sees the close finds the line.
            log_association(c, self.shared);
            c.logged = true;
        }
        drop(io);
        self.forget_connection();
    }

    fn remove_if_done(&mut self, idx: usize) {
        let done = self
            .conns
            .get(idx)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.io.is_none() && c.svc.work_in_flight() == 0);
        if done {
            self.remove(idx);
        }
    }

    /// Forgets a connection whose transport is closed: logs it and tells the pipeline the
    /// association ended (after its last store).
    fn remove(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx).and_then(Option::take) else {
            return;
        };
        if !c.logged {
            log_association(&c, self.shared);
        }
        for (_, f) in c.streams {
            // Freed by a worker; only when storage's queue is full, here.
            let _ = self.shared.storage.try_submit(Job::Discard(f));
        }
        let budget = &self.shared.budget;
        let freed = budget.adjust(c.accounted, (0, 0))
            | budget.release_overdraft(super::budget::Budget::key(self.id, c.generation));
        if freed {
            self.wake_starved();
        }
        if c.svc.stats().submitted > 0 {
            self.push_event(PipelineEvent::Closed {
                association: c.association,
            });
        }
        self.free.push(idx);
    }
}

/// The connection a completion is for, unless it is gone (its slot empty or reused).
fn conn_of(conns: &mut [Option<Conn>], reply: ReplyTo) -> Option<&mut Conn> {
    conns
        .get_mut(reply.connection)
        .and_then(Option::as_mut)
        .filter(|c| c.generation == reply.generation)
}

/// Hands the service's work to storage while it has room. When one finds no room it waits in
/// the connection's `blocked` slot, and storage will wake this reactor when it makes room.
/// Returns how many stores were answered at once (refused) instead.
fn submit_stores(c: &mut Conn, shared: &Shared, reactor: usize, idx: usize) -> usize {
    let mut answered = 0;
    if let Some(job) = c.blocked.take() {
        if let Err(job) = shared.storage.submit_or_notify(reactor, job) {
            c.blocked = Some(job);
            return answered;
        }
    }
    let reply = ReplyTo {
        reactor,
        connection: idx,
        generation: c.generation,
    };
    while let Some(work) = c.svc.poll_work() {
        let job = match work {
            Work::Store(sub) => match store_job(c, shared, sub, reply) {
                Some(job) => Job::Store(job),
                None => {
                    answered += 1;
                    continue;
                }
            },
            Work::Write(chunk) => match write_job(c, shared, chunk, reply) {
                Some(job) => job,
                None => continue,
            },
            Work::Discard { token } => {
                if let Some(i) = c.streams.iter().position(|(t, _)| *t == token) {
                    let (_, f) = c.streams.swap_remove(i);
                    // Best effort: a full queue means the file is freed here instead.
                    let _ = shared.storage.try_submit(Job::Discard(f));
                }
                continue;
            }
        };
        // A small whole data set is appended here, with no hand-off to a storage worker.
        let job = match job {
            Job::Store(j) => match shared.storage.append_here(j) {
                Ok(()) => continue,
                Err(j) => Job::Store(j),
            },
            other => other,
        };
        let job = match shared.storage.try_submit(job) {
            Ok(()) => continue,
            Err(job) => job,
        };
        if let Err(job) = shared.storage.submit_or_notify(reactor, job) {
            c.blocked = Some(job);
            return answered;
        }
    }
    answered
}

/// The file meta of an instance this connection sends: besides its UIDs, who sent it to whom
/// (Calling and Called AE Titles, the requestor's address), kept so that sender rules hold
/// again for it when it is recovered after a restart.
fn file_meta(
    c: &Conn,
    sop_class_uid: String,
    sop_instance_uid: String,
    transfer_syntax_uid: &str,
) -> FileMeta {
    let n = c.svc.negotiated();
    FileMeta {
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid: transfer_syntax_uid.to_string(),
        source_ae_title: n.map(|n| n.calling_ae.clone()).unwrap_or_default(),
        receiving_ae_title: n.map(|n| n.called_ae.clone()).unwrap_or_default(),
        requestor_address: c.peer.ip().to_string(),
    }
}

/// The storage job for a chunk of a streamed data set; the first chunk makes its file. `None`
/// (the chunk counted as written) when there is no file for it: its store then fails.
fn write_job(c: &mut Conn, shared: &Shared, chunk: Chunk, reply: ReplyTo) -> Option<Job> {
    let Chunk {
        token,
        offset,
        bytes,
        begin,
    } = chunk;
    if let Some(b) = begin {
        let meta = file_meta(
            c,
            b.sop_class_uid,
            b.sop_instance_uid,
            b.transfer_syntax.uid,
        );
        if let Some(f) = shared.storage.stream(&meta) {
            c.streams.push((token, f));
        }
    }
    let Some(file) = c
        .streams
        .iter()
        .find(|(t, _)| *t == token)
        .map(|(_, f)| f.clone())
    else {
        c.svc.handle_written(Instant::now(), token, bytes.len());
        return None;
    };
    Some(Job::Write(WriteJob {
        reply,
        token,
        file,
        offset,
        bytes,
    }))
}

/// The storage job for a store the service handed out, or `None` when the node does not store
/// it: no input accepts it and `[patients] unmatched` is `refuse` (already answered 0x0124) or
/// `discard` (already answered 0x0000).
fn store_job(
    c: &mut Conn,
    shared: &Shared,
    sub: StoreSubmission,
    reply: ReplyTo,
) -> Option<StoreJob> {
    let StoreSubmission {
        token,
        request: req,
        streamed,
    } = sub;
    let file = streamed.and_then(|len| {
        let i = c.streams.iter().position(|(t, _)| *t == token)?;
        Some((c.streams.swap_remove(i).1, len))
    });
    if streamed.is_some() && file.is_none() {
        c.svc.handle_store_done(
            Instant::now(),
            token,
            StoreOutcome::Failed {
                status: status::OUT_OF_RESOURCES,
                comment: "streamed data set has no file".into(),
            },
        );
        return None;
    }
    let from = {
        let n = c.svc.negotiated();
        crate::handoff::Sender {
            calling_ae_title: n.map(|n| n.calling_ae.as_str()),
            called_ae_title: n.map(|n| n.called_ae.as_str()),
            address: Some(c.peer.ip()),
        }
    };
    let (key, record) = shared.door.describe(&req.routing, &from);
    let unmatched = shared.config.patients.unmatched;
    let incomplete = req.routing.is_incomplete();
    let door = crate::handoff::at_the_door(record.inputs, unmatched, incomplete);
    if door == AtTheDoor::Store && record.inputs == 0 && unmatched == Unmatched::Discard {
        tracing::info!(
            association = c.association,
            sop_instance_uid = %req.sop_instance_uid,
            "no input accepts this instance on what its scan saw, but the scan was partial (a streamed deflated data set): kept in _unmatched, not discarded"
        );
    }
    if door != AtTheDoor::Store {
        if let Some((f, _)) = file {
            let _ = shared.storage.try_submit(Job::Discard(f));
        }
        let outcome = if door == AtTheDoor::Discard {
            // Answered success, stored nowhere: counted here, logged once with the
            // association (`log_association`).
            shared.counters.discarded.fetch_add(1, Ordering::Relaxed);
            StoreOutcome::Discarded
        } else {
            // Logged as the service's `Refused` event, with the SOP Instance UID.
            StoreOutcome::Failed {
                status: status::NOT_AUTHORIZED,
                comment: "no input of this node accepts this instance".into(),
            }
        };
        c.svc.handle_store_done(Instant::now(), token, outcome);
        return None;
    }
    let text = |t| {
        req.routing
            .uid(t)
            .map(|u| String::from_utf8_lossy(u).into_owned())
    };
    let study_uid = text(tags::STUDY_INSTANCE_UID).filter(|s| !s.is_empty());
    let series_uid = text(tags::SERIES_INSTANCE_UID).filter(|s| !s.is_empty());
    let patient_id = req
        .routing
        .text(tags::PATIENT_ID)
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    let req = *req;
    c.arrivals.push((
        token,
        Instant::now(),
        Box::new(Arrival {
            association: c.association,
            key,
            record,
            received_ms: 0,
        }),
    ));
    Some(StoreJob {
        reply,
        token,
        meta: file_meta(
            c,
            req.sop_class_uid,
            req.sop_instance_uid,
            req.transfer_syntax.uid,
        ),
        patient_id,
        study_uid,
        series_uid,
        data_set: req.data_set,
        streamed: file,
    })
}

fn log_events(c: &mut Conn, shared: &Shared) {
    while let Some(ev) = c.svc.poll_event() {
        match ev {
            ServiceEvent::Established => {
                if let Some(n) = c.svc.negotiated() {
                    for ctx in &n.contexts {
                        tracing::debug!(
                            peer = %c.peer,
                            context = ctx.id,
                            abstract_syntax = %ctx.abstract_syntax,
                            transfer_syntax = ctx.transfer_syntax.keyword,
                            "presentation context accepted"
                        );
                    }
                }
            }
            ServiceEvent::Rejected {
                calling_ae,
                called_ae,
                rj,
            } => {
                shared
                    .counters
                    .rejected(rj.result.0, rj.source.0, rj.reason);
                // Logged once, by the association's own line (its outcome says why), with
                // the AE titles the request named.
                c.rejected_aes = Some((calling_ae, called_ae));
            }
            ServiceEvent::Refused {
                status,
                comment,
                sop_instance_uid,
            } => {
                shared.counters.failure(status);
                tracing::warn!(
                peer = %c.peer,
                status = format!("0x{status:04X}"),
                comment = %comment,
                sop_instance_uid = sop_instance_uid.as_deref().unwrap_or(""),
                "request refused"
                )
            }
        }
    }
}

fn log_association(c: &Conn, shared: &Shared) {
    let outcome = c.svc.outcome().unwrap_or("closed");
    shared.counters.association_ended(outcome);
    let (calling, called) = match (c.svc.negotiated(), &c.rejected_aes) {
        (_, Some((calling, called))) => (calling.as_str(), called.as_str()),
        (Some(n), None) => (n.calling_ae.as_str(), n.called_ae.as_str()),
        (None, None) => ("", ""),
    };
    let stats = c.svc.stats();
    shared
        .counters
        .remember(super::counters::RecentAssociation {
            ended_ms: crate::handoff::now_ms(),
            peer: c.peer.to_string(),
            calling_ae: calling.to_string(),
            called_ae: called.to_string(),
            instances: stats.instances,
            failures: stats.failures,
            bytes: stats.bytes,
            duration_ms: c.started.elapsed().as_millis() as u64,
            outcome: outcome.to_string(),
        });
    tracing::info!(
        peer = %c.peer,
        calling_ae = calling,
        called_ae = called,
        user = c.svc.negotiated().and_then(|n| n.user.as_deref()).unwrap_or(""),
        instances = stats.instances,
        failures = stats.failures,
        bytes = stats.bytes,
        duration_ms = c.started.elapsed().as_millis() as u64,
        outcome,
        "association"
    );
    if stats.discarded > 0 {
        tracing::info!(
            peer = %c.peer,
            calling_ae = calling,
            called_ae = called,
            discarded = stats.discarded,
            "instances no input accepts were answered success and discarded ([patients] unmatched = \"discard\")"
        );
    }
}

/// The one log line of a TLS connection that ended in error (a failed handshake, a bad
/// record) or was closed by the peer during the handshake.
fn log_tls_end(peer: SocketAddr, t: &super::tls::Session, e: &io::Error) {
    if super::tls::is_tls_error(e) {
        if t.is_handshaking() {
            tracing::warn!(%peer, reason = %e, "TLS handshake failed: closing");
        } else {
            tracing::warn!(%peer, reason = %e, "TLS error: closing");
        }
    } else if t.is_handshaking() {
        tracing::info!(%peer, reason = %e, "TLS handshake not completed: the peer closed the connection");
    }
}

/// Reads once into the buffer, which may hold PDUs of up to `max_pdu` bytes. `Ok((n, wire))`:
/// got `n` bytes for the service (0: would block, or the buffer is full of bytes the service
/// has not taken) and read `wire` bytes off the socket (over TLS, records, whose plaintext only
/// comes out whole: what `[limits] min_bytes_per_second` counts).
fn read_some(io: &mut Io, max_pdu: u32) -> io::Result<(usize, usize)> {
    let limit = max_pdu as usize + ul::PDU_HEADER_LEN;
    if io.start == io.end {
        io.start = 0;
        io.end = 0;
    }
    if io.buf.len() < MIN_BUFFER.min(limit) {
        io.buf.resize(MIN_BUFFER.min(limit), 0);
    }
    if io.end == io.buf.len() {
        if io.start > 0 {
            io.buf.copy_within(io.start..io.end, 0);
            io.end -= io.start;
            io.start = 0;
        } else if io.buf.len() < limit {
            let n = (io.buf.len() * 2).min(limit);
            io.buf.resize(n, 0);
        } else {
            // A full buffer the service has not taken (it waits for backpressure to lift).
            return Ok((0, 0));
        }
    }
    if let Some(t) = io.tls.as_mut() {
        let n = t.read_plaintext(&mut io.stream, &mut io.buf[io.end..])?;
        if let Some((version, suite, client_certificate)) = t.take_established() {
            tracing::debug!(
                peer = %io.peer,
                version,
                suite,
                client_certificate,
                "TLS established"
            );
        }
        io.end += n;
        return Ok((n, t.take_received()));
    }
    loop {
        match io.stream.read(&mut io.buf[io.end..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                io.end += n;
                return Ok((n, n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((0, 0)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes what the service has to send, until done or `WouldBlock`.
fn write_out(io: &mut Io, svc: &mut Service) -> io::Result<()> {
    let out = svc.transmit();
    if let Some(t) = io.tls.as_mut() {
        let taken = t.write_plaintext(&mut io.stream, out)?;
        out.drain(..taken);
        return Ok(());
    }
    let mut written = 0;
    let r = loop {
        if written == out.len() {
            break Ok(());
        }
        match io.stream.write(&out[written..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    out.drain(..written);
    r
}
