//! One mio event loop: its connections, their read buffers, and the glue from bytes to the
//! association machine, DIMSE and storage.
//!
//! A connection stops reading (backpressure) while its outstanding stores reach the negotiated
//! operations window or while the storage queue refuses its next job; it then holds at most one
//! PDU beyond what it has handed on. Read buffers are allocated once per connection, sized to the
//! largest PDU the connection may receive, and reused.
//!
//! Hand-off to the pipeline: each durable instance becomes an `Event::Stored` on this reactor's
//! bounded lock-free queue, and each association that stored something ends with an
//! `Event::Closed` — after its last store completed, even if the connection went away first,
//! so the close never overtakes an instance. A full queue parks events in a local overflow and
//! pauses reading on every connection of the reactor until the pipeline catches up; nothing is
//! dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::{Mailbox, Shared};
use crate::assoc::{negotiate, Association, Event, Negotiated, Outcome, Received, State};
use crate::config::Unmatched;
use crate::dimse::command::{self, response_to, status, CommandSet};
use crate::dimse::{self, message, tags, Action, Assembler};
use crate::pipeline::{Arrival, Event as PipelineEvent};
use crate::storage::{FileMeta, ReplyTo, StoreDone, StoreJob};
use crate::ul::{self, reject_reason, AbortReason, AssociateRj, Pdu, RejectResult, RejectSource};

pub const WAKER: Token = Token(usize::MAX);

/// Smallest read buffer; grown up to the largest PDU allowed in the connection's state.
const MIN_BUFFER: usize = 16 * 1024;

#[derive(Debug, Default)]
struct Stats {
    instances: u64,
    bytes: u64,
    failures: u64,
}

/// The socket side of a connection.
#[derive(Debug)]
struct Io {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The peer closed its side (or the socket failed).
    eof: bool,
}

/// A response waiting for its store to finish.
#[derive(Debug)]
struct PendingStore {
    token: u64,
    pc: u8,
    request: CommandSet,
}

#[derive(Debug)]
struct Conn {
    io: Io,
    peer: SocketAddr,
    generation: u64,
    assoc: Association,
    negotiated: Option<Negotiated>,
    holds_slot: bool,
    assembler: Assembler,
    pending: VecDeque<PendingStore>,
    blocked: Option<StoreJob>,
    release_pending: bool,
    next_token: u64,
    started: Instant,
    stats: Stats,
    outcome: Option<String>,
    /// Node-wide association number, used by the pipeline's open-association counts.
    association: u64,
    /// Store jobs handed to storage.
    submitted: u64,
}

impl Conn {
    fn paused(&self) -> bool {
        let window = self
            .negotiated
            .as_ref()
            .map_or(1, |n| n.max_operations_performed as usize);
        self.blocked.is_some() || self.pending.len() >= window || self.release_pending
    }
}

struct Reactor<'a> {
    id: usize,
    poll: Poll,
    mailbox: &'a Mailbox,
    shared: &'a Shared,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    generation: u64,
    /// Events the pipeline queue had no room for, oldest first.
    overflow: VecDeque<PipelineEvent>,
    /// Associations whose connection is gone while stores are still in flight: how many.
    orphans: HashMap<u64, usize>,
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
        shared,
        conns: Vec::new(),
        free: Vec::new(),
        generation: 0,
        overflow: VecDeque::new(),
        orphans: HashMap::new(),
        rung: false,
    };
    let mut events = Events::with_capacity(1024);
    loop {
        if shared.shutdown.load(Ordering::Acquire) {
            r.close_all();
            return;
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
            let idx = ev.token().0;
            r.drive(idx, Instant::now());
        }
        if woke || !r.mailbox.completions.is_empty() || !r.mailbox.new_connections.is_empty() {
            r.mailbox.wake_pending.store(false, Ordering::Release);
            r.take_new_connections();
            r.take_completions();
        }
        r.retry_blocked();
        r.flush_overflow();
        r.fire_timers();
        if std::mem::take(&mut r.rung) {
            shared.pipeline.ring(id);
        }
    }
}

impl Reactor<'_> {
    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut blocked = false;
        for c in self.conns.iter().flatten() {
            blocked |= c.blocked.is_some();
            if let Some(t) = c.assoc.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let mut d = next.map(|t| t.saturating_duration_since(now));
        if blocked || !self.overflow.is_empty() {
            // The storage queue has no "space free" signal; retry soon.
            d = Some(d.map_or(Duration::from_millis(1), |x| {
                x.min(Duration::from_millis(1))
            }));
        }
        d
    }

    fn take_new_connections(&mut self) {
        while let Some((std_stream, peer)) = self.mailbox.new_connections.pop() {
            let mut stream = TcpStream::from_std(std_stream);
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
                io: Io {
                    stream,
                    buf: Vec::new(),
                    start: 0,
                    end: 0,
                    eof: false,
                },
                peer,
                generation: self.generation,
                assoc: Association::acceptor(now, self.shared.timeouts),
                negotiated: None,
                holds_slot: false,
                assembler: Assembler::new(self.shared.config.limits.max_message_bytes),
                pending: VecDeque::new(),
                blocked: None,
                release_pending: false,
                next_token: 0,
                started: now,
                stats: Stats::default(),
                outcome: None,
                association: self.shared.next_association.fetch_add(1, Ordering::Relaxed) + 1,
                submitted: 0,
            });
            self.drive(idx, now);
        }
    }

    fn forget_connection(&self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
        self.mailbox.live.fetch_sub(1, Ordering::Relaxed);
    }

    fn take_completions(&mut self) {
        while let Some(mut done) = self.mailbox.completions.pop() {
            let idx = done.reply.connection;
            let now = Instant::now();
            let association = done.arrival.as_ref().map(|a| a.association);
            if let (Some(arrival), Ok(stored)) = (done.arrival.take(), &done.result) {
                let new = stored.new;
                self.push_event(PipelineEvent::Stored { arrival, new });
            }
            let live = self
                .conns
                .get_mut(idx)
                .and_then(Option::as_mut)
                .filter(|c| c.generation == done.reply.generation);
            match live {
                Some(c) => {
                    complete_store(c, done, now);
                    self.drive(idx, now);
                }
                None => {
                    // The connection went away; the instance is stored (and handed on) all
                    // the same. The association's close follows its last store.
                    if let Some(a) = association {
                        self.orphan_store_done(a);
                    }
                }
            }
        }
    }

    fn orphan_store_done(&mut self, association: u64) {
        if let Some(n) = self.orphans.get_mut(&association) {
            *n -= 1;
            if *n == 0 {
                self.orphans.remove(&association);
                self.push_event(PipelineEvent::Closed { association });
            }
        }
    }

    fn push_event(&mut self, ev: PipelineEvent) {
        // A close rings at once (it may trigger processing); instances ring once a backlog
        // builds, else the ingest thread's sweep takes them (pipeline::RING_AT).
        if matches!(ev, PipelineEvent::Closed { .. })
            || self.shared.pipeline.backlog(self.id) >= crate::pipeline::RING_AT
        {
            self.rung = true;
        }
        if !self.overflow.is_empty() {
            self.overflow.push_back(ev);
        } else if let Err(ev) = self.shared.pipeline.push(self.id, ev) {
            tracing::debug!(reactor = self.id, "pipeline queue full: pausing reads");
            self.overflow.push_back(ev);
        }
    }

    /// Moves parked events to the pipeline queue; when all went, resumes reading.
    fn flush_overflow(&mut self) {
        if self.overflow.is_empty() {
            return;
        }
        while let Some(ev) = self.overflow.pop_front() {
            if let Err(ev) = self.shared.pipeline.push(self.id, ev) {
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

    fn retry_blocked(&mut self) {
        for idx in 0..self.conns.len() {
            let Some(c) = self.conns[idx].as_mut() else {
                continue;
            };
            if let Some(job) = c.blocked.take() {
                if let Err(job) = self.shared.storage.try_submit(job) {
                    c.blocked = Some(job);
                } else {
                    self.drive(idx, Instant::now());
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            let due = self.conns[idx]
                .as_ref()
                .and_then(|c| c.assoc.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                if let Some(c) = self.conns[idx].as_mut() {
                    c.assoc.handle_timeout(now);
                }
                self.drive(idx, now);
            }
        }
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            if let Some(c) = self.conns[idx].as_mut() {
                let _ = c.assoc.abort(now);
                let _ = flush(c);
                c.outcome
                    .get_or_insert_with(|| "aborted: node shutting down".into());
                self.remove(idx);
            }
        }
    }

    /// Runs a connection until it can make no more progress without new readiness.
    fn drive(&mut self, idx: usize, now: Instant) {
        let shared = self.shared;
        let reply_base = (self.id, idx);
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        loop {
            process_input(c, shared, reply_base, now);
            handle_events(c, now);
            if flush(c).is_err() {
                c.assoc.handle_transport_closed(now);
                handle_events(c, now);
                break;
            }
            if c.assoc.state() == State::Sta1 || c.assoc.wants_close() || c.io.eof {
                break;
            }
            if c.paused() || !self.overflow.is_empty() {
                break;
            }
            match read_some(c, shared) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    c.io.eof = true;
                    c.assoc.handle_transport_closed(now);
                    handle_events(c, now);
                    break;
                }
            }
        }
        let done = c.assoc.state() == State::Sta1
            || (c.assoc.wants_close() && c.assoc.transmit().is_empty());
        if done {
            self.remove(idx);
        }
    }

    fn remove(&mut self, idx: usize) {
        let Some(mut c) = self.conns.get_mut(idx).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.io.stream);
        if c.holds_slot {
            if let Some(n) = &c.negotiated {
                self.shared.associations.release(&n.calling_ae);
            }
        }
        log_association(&c);
        if c.submitted > 0 {
            let in_flight = c.pending.len() - usize::from(c.blocked.is_some());
            if in_flight == 0 {
                self.push_event(PipelineEvent::Closed {
                    association: c.association,
                });
            } else {
                self.orphans.insert(c.association, in_flight);
            }
        }
        self.free.push(idx);
        self.forget_connection();
    }
}

fn log_association(c: &Conn) {
    let outcome = c.outcome.as_deref().unwrap_or("closed");
    let (calling, called) = c
        .negotiated
        .as_ref()
        .map_or(("", ""), |n| (n.calling_ae.as_str(), n.called_ae.as_str()));
    tracing::info!(
        peer = %c.peer,
        calling_ae = calling,
        called_ae = called,
        instances = c.stats.instances,
        failures = c.stats.failures,
        bytes = c.stats.bytes,
        duration_ms = c.started.elapsed().as_millis() as u64,
        outcome,
        "association"
    );
}

/// The largest PDU length the connection may receive in its state: an A-ASSOCIATE-RQ before
/// negotiation, our advertised Maximum Length after.
fn pdu_limit(c: &Conn, shared: &Shared) -> u32 {
    if c.negotiated.is_some() {
        shared.config.limits.max_pdu_length
    } else {
        shared.config.limits.max_associate_length
    }
}

/// Reads once into the buffer. `Ok(true)`: got bytes; `Ok(false)`: would block.
fn read_some(c: &mut Conn, shared: &Shared) -> io::Result<bool> {
    let limit = pdu_limit(c, shared) as usize + ul::PDU_HEADER_LEN;
    let io = &mut c.io;
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
            // A full buffer of complete PDUs waiting behind backpressure; stop reading.
            return Ok(false);
        }
    }
    loop {
        match io.stream.read(&mut io.buf[io.end..]) {
            Ok(0) => {
                io.eof = true;
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(n) => {
                io.end += n;
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes what the association has to send, until done or `WouldBlock`.
fn flush(c: &mut Conn) -> io::Result<()> {
    let out = c.assoc.transmit();
    let mut written = 0;
    let r = loop {
        if written == out.len() {
            break Ok(());
        }
        match c.io.stream.write(&out[written..]) {
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

/// Parses and handles every complete PDU in the buffer while the connection is not paused. The
/// buffer is moved out while PDUs borrow from it, and put back after.
fn process_input(c: &mut Conn, shared: &Shared, reply_base: (usize, usize), now: Instant) {
    let buf = std::mem::take(&mut c.io.buf);
    process_buffered(c, &buf, shared, reply_base, now);
    c.io.buf = buf;
}

fn process_buffered(
    c: &mut Conn,
    buf: &[u8],
    shared: &Shared,
    reply_base: (usize, usize),
    now: Instant,
) {
    while !c.paused() && c.io.start < c.io.end && !c.assoc.wants_close() {
        let max = pdu_limit(c, shared);
        let data = &buf[c.io.start..c.io.end];
        let n = match ul::deframe(data, max) {
            Ok(ul::Status::Complete(n)) => n,
            Ok(ul::Status::Partial { .. }) => return,
            Err(e) => {
                tracing::debug!(peer = %c.peer, error = %e, "bad PDU header");
                c.outcome = Some(format!("protocol error: {e}"));
                c.assoc.handle_invalid_pdu(now, e);
                c.io.start = c.io.end;
                return;
            }
        };
        c.assoc.touch(now);
        let (start, end) = (c.io.start, c.io.start + n);
        c.io.start = end;
        let pdu = match ul::decode(&buf[start..end]) {
            Ok(p) => p,
            Err(e) => {
                c.outcome = Some(format!("protocol error: {e}"));
                c.assoc.handle_invalid_pdu(now, e);
                c.io.start = c.io.end;
                return;
            }
        };
        if let Pdu::Abort(a) = &pdu {
            c.outcome = Some(format!(
                "aborted by peer (source {}, reason {})",
                a.source.0, a.reason.0
            ));
        }
        match c.assoc.handle_pdu(now, pdu) {
            Received::AssociateRq(rq) => on_associate_rq(c, shared, &rq, now),
            Received::Data(p) => {
                for pdv in p.pdvs() {
                    let Some(neg) = c.negotiated.as_ref() else {
                        break;
                    };
                    match c.assembler.push(pdv, |id| neg.context(id).is_some()) {
                        Ok(Some(msg)) => on_message(c, shared, msg, reply_base, now),
                        Ok(None) => {}
                        Err(e) => {
                            c.outcome = Some(format!("aborted: {e}"));
                            c.assoc.abort_protocol(now, e.abort_reason(), e.describe());
                            break;
                        }
                    }
                }
                c.assoc.set_message_in_progress(c.assembler.in_progress());
            }
            Received::AssociateAc(_) | Received::Nothing => {}
        }
    }
}

fn on_associate_rq(c: &mut Conn, shared: &Shared, rq: &ul::Associate<'_>, now: Instant) {
    let outcome = negotiate(rq, &shared.policy);
    let rj = match outcome {
        Outcome::Accept { ac, negotiated } => {
            if shared.associations.try_acquire(&negotiated.calling_ae) {
                c.holds_slot = true;
                c.negotiated = Some(negotiated);
                let _ = c.assoc.accept(now, &ac);
                return;
            }
            c.negotiated = Some(negotiated);
            AssociateRj {
                result: RejectResult::TRANSIENT,
                source: RejectSource::SERVICE_PROVIDER_PRESENTATION,
                reason: reject_reason::LOCAL_LIMIT_EXCEEDED,
            }
        }
        Outcome::Reject(rj) => rj,
    };
    c.outcome = Some(format!(
        "rejected (result {}, source {}, reason {})",
        rj.result.0, rj.source.0, rj.reason
    ));
    tracing::info!(
        peer = %c.peer,
        calling_ae = ul::ae_title_str(&rq.calling_ae).unwrap_or("<invalid>"),
        called_ae = ul::ae_title_str(&rq.called_ae).unwrap_or("<invalid>"),
        result = rj.result.0,
        source = rj.source.0,
        reason = rj.reason,
        "association rejected"
    );
    let _ = c.assoc.reject(now, rj);
}

fn send_response(c: &mut Conn, pc: u8, response: &CommandSet) {
    let max = c.negotiated.as_ref().map_or(16384, |n| n.peer_max_pdu);
    let mut cmd = Vec::with_capacity(160);
    command::encode(response, &mut cmd);
    let _ = c
        .assoc
        .send_pdata(|out| message::fragment(out, pc, true, &cmd, max));
}

fn on_message(
    c: &mut Conn,
    shared: &Shared,
    msg: dimse::Message,
    (reactor, connection): (usize, usize),
    now: Instant,
) {
    // The action owns what it needs, so the context is only borrowed while it is decided.
    let Some(action) = c
        .negotiated
        .as_ref()
        .and_then(|n| n.context(msg.presentation_context_id))
        .map(|ctx| dimse::handle(msg, ctx, &shared.pipeline.wanted_tags))
    else {
        return;
    };
    match action {
        Action::Respond { pc, response } => {
            if response.status != Some(status::SUCCESS) {
                c.stats.failures += 1;
                tracing::warn!(
                    peer = %c.peer,
                    status = format!("0x{:04X}", response.status.unwrap_or(0)),
                    comment = %String::from_utf8_lossy(response.error_comment.as_deref().unwrap_or(b"")),
                    "request refused"
                );
            }
            send_response(c, pc, &response);
        }
        Action::Abort(why) => {
            c.outcome = Some(format!("aborted: {why}"));
            c.assoc
                .abort_protocol(now, AbortReason::UNEXPECTED_PDU_PARAMETER, why);
        }
        Action::Store(req) => {
            let (key, record) = shared.pipeline.describe(&req.routing);
            if record.inputs == 0 && shared.config.patients.unmatched == Unmatched::Refuse {
                c.stats.failures += 1;
                tracing::warn!(
                    peer = %c.peer,
                    sop_instance_uid = %req.sop_instance_uid,
                    "no [[input]] accepts this instance: refused with 0x0124"
                );
                let response = response_to(
                    &req.command,
                    status::NOT_AUTHORIZED,
                    Some("no input of this node accepts this instance"),
                );
                send_response(c, req.presentation_context_id, &response);
                return;
            }
            let arrival = Some(Box::new(Arrival {
                association: c.association,
                key,
                record,
            }));
            let token = c.next_token;
            c.next_token += 1;
            let text = |t| {
                req.routing
                    .uid(t)
                    .map(|u| String::from_utf8_lossy(u).into_owned())
            };
            let job = StoreJob {
                reply: ReplyTo {
                    reactor,
                    connection,
                    generation: c.generation,
                },
                token,
                meta: FileMeta {
                    sop_class_uid: req.sop_class_uid,
                    sop_instance_uid: req.sop_instance_uid,
                    transfer_syntax_uid: req.transfer_syntax.uid.to_string(),
                    source_ae_title: c
                        .negotiated
                        .as_ref()
                        .map(|n| n.calling_ae.clone())
                        .unwrap_or_default(),
                },
                patient_id: req
                    .routing
                    .text(tags::PATIENT_ID)
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec(),
                study_uid: text(tags::STUDY_INSTANCE_UID).filter(|s| !s.is_empty()),
                series_uid: text(tags::SERIES_INSTANCE_UID).filter(|s| !s.is_empty()),
                data_set: req.data_set,
                arrival,
            };
            c.submitted += 1;
            c.pending.push_back(PendingStore {
                token,
                pc: req.presentation_context_id,
                request: req.command,
            });
            if let Err(job) = shared.storage.try_submit(job) {
                c.blocked = Some(job);
            }
        }
    }
}

fn complete_store(c: &mut Conn, done: StoreDone, now: Instant) {
    let Some(pos) = c.pending.iter().position(|p| p.token == done.token) else {
        return;
    };
    let Some(p) = c.pending.remove(pos) else {
        return;
    };
    let response = match &done.result {
        Ok(stored) => {
            c.stats.instances += 1;
            c.stats.bytes += stored.bytes;
            response_to(&p.request, status::SUCCESS, None)
        }
        Err(e) => {
            c.stats.failures += 1;
            tracing::error!(peer = %c.peer, error = %e, "store failed: answering 0xA700");
            response_to(&p.request, status::OUT_OF_RESOURCES, Some(e))
        }
    };
    c.assoc.touch(now);
    send_response(c, p.pc, &response);
    if c.pending.is_empty() && c.release_pending {
        c.release_pending = false;
        let _ = c.assoc.release_response(now);
    }
}

fn handle_events(c: &mut Conn, now: Instant) {
    while let Some(ev) = c.assoc.poll_event() {
        match ev {
            Event::ReleaseRequested => {
                if c.pending.is_empty() && c.blocked.is_none() {
                    let _ = c.assoc.release_response(now);
                } else {
                    c.release_pending = true;
                }
                c.outcome.get_or_insert_with(|| "released".into());
            }
            Event::AbortedByPeer(a) => {
                c.outcome = Some(format!(
                    "aborted by peer (source {}, reason {})",
                    a.source.0, a.reason.0
                ));
            }
            Event::ProviderAbort { sent, why } => {
                if c.outcome.is_none() || sent.is_some() && why != "transport connection closed" {
                    c.outcome = Some(format!("aborted: {why}"));
                }
            }
            Event::Released | Event::Accepted | Event::Rejected(_) | Event::Closed => {}
        }
    }
}
