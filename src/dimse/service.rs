//! The acceptor's per-association DIMSE service (PS3.7 §9.1, §9.3.1 C-STORE, §9.3.5 C-ECHO; the
//! asynchronous operations window of PS3.7 D.3.3.3), on top of the PS3.8 association machine.
//! Sans-IO, in the style of quinn-proto's `Connection`.
//!
//! Owns, for one association: the [`Association`] state machine, negotiation's outcome, the
//! message [`Assembler`], the C-STORE requests waiting to be handed to storage (a queue, never a
//! single slot), the stores handed out and not yet answered, the operations window, and release
//! gating (the A-RELEASE-RP waits for the last outstanding response). Must never touch a socket,
//! a file or a clock: time comes in as `now`.
//!
//! Inputs: [`Service::handle_input`] (received bytes), [`Service::handle_store_done`] (storage's
//! answer for a store handed out), [`Service::handle_timeout`], [`Service::handle_transport_closed`],
//! [`Service::abort`]. After any input, poll in this order:
//! 1. [`Service::poll_store`] until `None` while storage has room: each store handed out must
//!    get exactly one `handle_store_done`, whatever happens to the connection;
//! 2. [`Service::transmit`]: write it and `drain(..n)` what was written. Responses to every
//!    completion handled since the last write go out together (one write per batch);
//! 3. [`Service::poll_event`] until `None` (things to log);
//! 4. [`Service::poll_timeout`] to re-arm the timer; [`Service::wants_read`] to decide whether to
//!    read more; [`Service::is_closed`] to close the transport once `transmit` is empty.
//!
//! Backpressure: the service stops taking PDUs (`handle_input` consumes no more and `wants_read`
//! is false) while its outstanding stores (waiting plus handed out) reach the negotiated window,
//! or a release is pending. A PDU is always handled whole: every message it completes is queued,
//! so a P-DATA-TF holding many C-STOREs can exceed the window by at most what one PDU of the
//! negotiated maximum length carries; nothing is dropped or overwritten.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Instant;

use super::command::{self, response_to, status, CommandSet};
use super::{handle, message, Action, Assembler, StoreRequest};
use crate::assoc::{
    negotiate, AcceptorPolicy, Association, Event, Negotiated, Outcome, Received, State, Timeouts,
};
use crate::ul::{self, reject_reason, AbortReason, AssociateRj, Pdu, RejectResult, RejectSource};

/// What the service needs from configuration; shared by every association of a node.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub policy: AcceptorPolicy,
    pub timeouts: Timeouts,
    /// Sorted tags to scan from every data set; must include [`super::tags::ROUTING`].
    pub wanted_tags: Vec<u32>,
    /// Largest data set accepted in one message.
    pub max_message_bytes: usize,
    /// Largest PDU accepted after negotiation (what we advertise).
    pub max_pdu_length: u32,
    /// Largest A-ASSOCIATE-RQ accepted.
    pub max_associate_length: u32,
}

/// A C-STORE handed to the host for storage.
#[derive(Debug)]
pub struct StoreSubmission {
    /// Pass back to [`Service::handle_store_done`].
    pub token: u64,
    pub request: Box<StoreRequest>,
}

/// Storage's answer to one [`StoreSubmission`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Durable: answer success (0x0000).
    Stored { bytes: u64 },
    /// Not stored: answer with this failure status and comment (e.g. 0xA700, or 0x0124 when no
    /// input accepts the instance).
    Failed { status: u16, comment: String },
}

/// Things worth logging; the service never logs itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
    /// The association was accepted.
    Established,
    /// The A-ASSOCIATE-RQ was rejected.
    Rejected {
        calling_ae: String,
        called_ae: String,
        rj: AssociateRj,
    },
    /// A request was answered with a failure status.
    Refused {
        status: u16,
        comment: String,
        sop_instance_uid: Option<String>,
    },
}

/// Counters of one association.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServiceStats {
    /// Instances stored (success answered or answerable).
    pub instances: u64,
    pub bytes: u64,
    /// Requests answered with a failure status.
    pub failures: u64,
    /// Stores handed to the host.
    pub submitted: u64,
}

/// A store handed out, waiting for its outcome.
#[derive(Debug)]
struct InFlight {
    token: u64,
    pc: u8,
    request: CommandSet,
    /// Its data set's size, held until storage answers.
    bytes: usize,
}

/// The acceptor side of one association: see the module doc for the polling order.
#[derive(Debug)]
pub struct Service {
    assoc: Association,
    negotiated: Option<Negotiated>,
    holds_slot: bool,
    assembler: Assembler,
    /// Decided stores not yet handed out, oldest first.
    waiting: VecDeque<StoreSubmission>,
    /// Handed out, not yet done; answered in completion order (PS3.7 D.3.3.3 lets responses
    /// come in any order within the window).
    in_flight: Vec<InFlight>,
    // Invariant: true only in Sta8 with outstanding stores; cleared when the A-RELEASE-RP goes.
    release_pending: bool,
    next_token: u64,
    // Invariant: the sum of the data set sizes in `waiting` and `in_flight`.
    held: usize,
    stats: ServiceStats,
    outcome: Option<String>,
    events: VecDeque<ServiceEvent>,
}

impl Service {
    /// A new acceptor whose transport connection was just accepted (PS3.8 Sta2, ARTIM running).
    pub fn new(now: Instant, cfg: &ServiceConfig) -> Service {
        Service {
            assoc: Association::acceptor(now, cfg.timeouts),
            negotiated: None,
            holds_slot: false,
            assembler: Assembler::new(cfg.max_message_bytes),
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
            release_pending: false,
            next_token: 0,
            held: 0,
            stats: ServiceStats::default(),
            outcome: None,
            events: VecDeque::new(),
        }
    }

    // ---- inputs -----------------------------------------------------------------------

    /// Handles the complete PDUs at the start of `buf` while the service takes input; returns
    /// how many bytes it consumed (the rest is a partial PDU or waits for backpressure to lift).
    /// `admit` is asked once, for an acceptable A-ASSOCIATE-RQ, whether the calling AE title may
    /// have another association; a `true` means the caller holds a slot to release when the
    /// association ends ([`Service::holds_slot`]).
    pub fn handle_input(
        &mut self,
        now: Instant,
        buf: &[u8],
        cfg: &ServiceConfig,
        admit: &mut dyn FnMut(&str) -> bool,
    ) -> usize {
        let mut pos = 0;
        while self.takes_input() && pos < buf.len() {
            let max = self.max_receive_pdu(cfg);
            let n = match ul::deframe(&buf[pos..], max) {
                Ok(ul::Status::Complete(n)) => n,
                Ok(ul::Status::Partial { .. }) => break,
                Err(e) => {
                    self.outcome = Some(format!("protocol error: {e}"));
                    self.assoc.handle_invalid_pdu(now, e);
                    pos = buf.len();
                    break;
                }
            };
            let bytes = &buf[pos..pos + n];
            pos += n;
            match ul::decode(bytes) {
                Ok(pdu) => self.handle_pdu(now, pdu, cfg, admit),
                Err(e) => {
                    self.outcome = Some(format!("protocol error: {e}"));
                    self.assoc.handle_invalid_pdu(now, e);
                    pos = buf.len();
                }
            }
            self.drain_assoc_events(now);
        }
        pos
    }

    fn handle_pdu(
        &mut self,
        now: Instant,
        pdu: Pdu<'_>,
        cfg: &ServiceConfig,
        admit: &mut dyn FnMut(&str) -> bool,
    ) {
        if let Pdu::Abort(a) = &pdu {
            self.outcome = Some(format!(
                "aborted by peer (source {}, reason {})",
                a.source.0, a.reason.0
            ));
        }
        match self.assoc.handle_pdu(now, pdu) {
            Received::AssociateRq(rq) => self.on_associate_rq(now, &rq, cfg, admit),
            Received::Data(p) => {
                // Every PDV of the PDU, whatever backpressure says: a message it completes is
                // queued, never parked in a slot a later one could overwrite.
                for pdv in p.pdvs() {
                    let Some(neg) = self.negotiated.as_ref() else {
                        break;
                    };
                    match self.assembler.push(pdv, |id| neg.context(id).is_some()) {
                        Ok(Some(msg)) => self.on_message(now, msg, cfg),
                        Ok(None) => {}
                        Err(e) => {
                            self.outcome = Some(format!("aborted: {e}"));
                            self.assoc
                                .abort_protocol(now, e.abort_reason(), e.describe());
                        }
                    }
                    if self.assoc.wants_close()
                        || matches!(self.assoc.state(), State::Sta1 | State::Sta13)
                    {
                        break; // aborted: the rest of the PDU is not looked at
                    }
                }
                self.assoc
                    .set_message_in_progress(self.assembler.in_progress());
            }
            Received::AssociateAc(_) | Received::Nothing => {}
        }
    }

    fn on_associate_rq(
        &mut self,
        now: Instant,
        rq: &ul::Associate<'_>,
        cfg: &ServiceConfig,
        admit: &mut dyn FnMut(&str) -> bool,
    ) {
        let rj = match negotiate(rq, &cfg.policy) {
            Outcome::Accept { ac, negotiated } => {
                if admit(&negotiated.calling_ae) {
                    self.holds_slot = true;
                    self.negotiated = Some(negotiated);
                    let _ = self.assoc.accept(now, &ac);
                    self.events.push_back(ServiceEvent::Established);
                    return;
                }
                self.negotiated = Some(negotiated);
                AssociateRj {
                    result: RejectResult::TRANSIENT,
                    source: RejectSource::SERVICE_PROVIDER_PRESENTATION,
                    reason: reject_reason::LOCAL_LIMIT_EXCEEDED,
                }
            }
            Outcome::Reject(rj) => rj,
        };
        self.outcome = Some(format!(
            "rejected (result {}, source {}, reason {})",
            rj.result.0, rj.source.0, rj.reason
        ));
        self.events.push_back(ServiceEvent::Rejected {
            calling_ae: ul::ae_title_str(&rq.calling_ae)
                .unwrap_or("<invalid>")
                .to_string(),
            called_ae: ul::ae_title_str(&rq.called_ae)
                .unwrap_or("<invalid>")
                .to_string(),
            rj,
        });
        let _ = self.assoc.reject(now, rj);
    }

    fn on_message(&mut self, now: Instant, msg: message::Message, cfg: &ServiceConfig) {
        let Some(action) = self
            .negotiated
            .as_ref()
            .and_then(|n| n.context(msg.presentation_context_id))
            .map(|ctx| handle(msg, ctx, &cfg.wanted_tags))
        else {
            return;
        };
        match action {
            Action::Respond { pc, response } => {
                if response.status != Some(status::SUCCESS) {
                    self.refused(&response);
                }
                self.send_response(pc, &response);
            }
            Action::Abort(why) => {
                self.outcome = Some(format!("aborted: {why}"));
                self.assoc
                    .abort_protocol(now, AbortReason::UNEXPECTED_PDU_PARAMETER, why);
            }
            Action::Store(request) => {
                let token = self.next_token;
                self.next_token += 1;
                self.held += request.data_set.len();
                self.waiting.push_back(StoreSubmission { token, request });
            }
        }
    }

    /// Storage's outcome for the store handed out as `token`: queues its response, and the
    /// A-RELEASE-RP when it was the last one a pending release waited for. An unknown token is
    /// ignored.
    pub fn handle_store_done(&mut self, now: Instant, token: u64, outcome: StoreOutcome) {
        let Some(pos) = self.in_flight.iter().position(|p| p.token == token) else {
            return;
        };
        let p = self.in_flight.swap_remove(pos);
        self.held -= p.bytes;
        let response = match outcome {
            StoreOutcome::Stored { bytes } => {
                self.stats.instances += 1;
                self.stats.bytes += bytes;
                response_to(&p.request, status::SUCCESS, None)
            }
            StoreOutcome::Failed { status, comment } => {
                let r = response_to(&p.request, status, Some(&comment));
                self.refused(&r);
                r
            }
        };
        self.assoc.touch(now);
        self.send_response(p.pc, &response);
        self.maybe_release(now);
    }

    /// The timer returned by [`Service::poll_timeout`] is due (or may be; early calls are
    /// harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.assoc.poll_timeout().is_some_and(|t| t <= now) {
            self.assoc.handle_timeout(now);
            self.drain_assoc_events(now);
        }
    }

    /// The transport connection closed or failed (PS3.8 Evt17).
    pub fn handle_transport_closed(&mut self, now: Instant) {
        self.assoc.handle_transport_closed(now);
        self.drain_assoc_events(now);
    }

    /// A local A-ABORT (the node is stopping).
    pub fn abort(&mut self, now: Instant, why: &str) {
        if self.assoc.abort(now).is_ok() {
            self.outcome
                .get_or_insert_with(|| format!("aborted: {why}"));
        }
        self.drain_assoc_events(now);
    }

    // ---- outputs ----------------------------------------------------------------------

    /// The next store to hand to storage. Call only while storage has room; a store taken here
    /// is the host's until it calls [`Service::handle_store_done`] for its token.
    pub fn poll_store(&mut self) -> Option<StoreSubmission> {
        let s = self.waiting.pop_front()?;
        self.in_flight.push(InFlight {
            token: s.token,
            pc: s.request.presentation_context_id,
            request: s.request.command.clone(),
            bytes: s.request.data_set.len(),
        });
        self.stats.submitted += 1;
        Some(s)
    }

    /// Bytes to send, in order; remove what was written with `drain(..n)`.
    pub fn transmit(&mut self) -> &mut Vec<u8> {
        self.assoc.transmit()
    }

    pub fn poll_event(&mut self) -> Option<ServiceEvent> {
        self.events.pop_front()
    }

    /// When [`Service::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.assoc.poll_timeout()
    }

    /// Whether the host should read more bytes from the peer.
    pub fn wants_read(&self) -> bool {
        self.takes_input()
    }

    /// True once the transport should be closed, after `transmit` has been written.
    pub fn is_closed(&self) -> bool {
        self.assoc.state() == State::Sta1 || self.assoc.wants_close()
    }

    /// Stores handed out and not yet done. The host keeps the association's context until this
    /// is zero, even after the transport closed.
    pub fn stores_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Stores decided but not yet handed out.
    pub fn stores_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Data set bytes this association holds in memory: the message being assembled, and the
    /// stores waiting for or handed to storage until storage answers (the node-wide budget,
    /// `[limits] max_buffered_bytes`, counts these).
    pub fn held_bytes(&self) -> usize {
        self.held + self.assembler.buffered()
    }

    /// The part of [`Service::held_bytes`] held by stores (waiting for storage or in it).
    pub fn store_bytes(&self) -> usize {
        self.held
    }

    /// True while a message is partly received.
    pub fn message_in_progress(&self) -> bool {
        self.assembler.in_progress()
    }

    /// The largest PDU to accept in the current state: the A-ASSOCIATE-RQ bound before
    /// negotiation, our advertised Maximum Length after.
    pub fn max_receive_pdu(&self, cfg: &ServiceConfig) -> u32 {
        if self.negotiated.is_some() {
            cfg.max_pdu_length
        } else {
            cfg.max_associate_length
        }
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Whether `admit` granted a slot that must be released when the association ends.
    pub fn holds_slot(&self) -> bool {
        self.holds_slot
    }

    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// How the association ended (or why it is ending), for the log.
    pub fn outcome(&self) -> Option<&str> {
        self.outcome.as_deref()
    }

    pub fn state(&self) -> State {
        self.assoc.state()
    }

    // ---- internals --------------------------------------------------------------------

    fn takes_input(&self) -> bool {
        if self.assoc.wants_close() || self.assoc.state() == State::Sta1 || self.release_pending {
            return false;
        }
        if self.assoc.state() == State::Sta13 {
            // Awaiting the transport close: PDUs are discarded (Table 9-10), so read on to see
            // the close.
            return true;
        }
        let window = self
            .negotiated
            .as_ref()
            .map_or(1, |n| usize::from(n.max_operations_performed.max(1)));
        self.waiting.len() + self.in_flight.len() < window
    }

    fn outstanding(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    fn refused(&mut self, response: &CommandSet) {
        self.stats.failures += 1;
        self.events.push_back(ServiceEvent::Refused {
            status: response.status.unwrap_or(0),
            comment: String::from_utf8_lossy(response.error_comment.as_deref().unwrap_or(b""))
                .into_owned(),
            sop_instance_uid: response
                .affected_sop_instance_uid
                .as_deref()
                .map(|u| String::from_utf8_lossy(super::trim_padding(u)).into_owned()),
        });
    }

    fn send_response(&mut self, pc: u8, response: &CommandSet) {
        let max = self.negotiated.as_ref().map_or(16384, |n| n.peer_max_pdu);
        let mut cmd = Vec::with_capacity(160);
        command::encode(response, &mut cmd);
        // Not allowed once the association is gone (aborted, closed): nobody to answer.
        let _ = self
            .assoc
            .send_pdata(|out| message::fragment(out, pc, true, &cmd, max));
    }

    fn maybe_release(&mut self, now: Instant) {
        if self.release_pending && self.outstanding() == 0 {
            self.release_pending = false;
            let _ = self.assoc.release_response(now);
        }
    }

    fn drain_assoc_events(&mut self, now: Instant) {
        while let Some(ev) = self.assoc.poll_event() {
            match ev {
                Event::ReleaseRequested => {
                    self.outcome.get_or_insert_with(|| "released".into());
                    if self.outstanding() == 0 {
                        let _ = self.assoc.release_response(now);
                    } else {
                        self.release_pending = true;
                    }
                }
                Event::AbortedByPeer(a) => {
                    self.outcome = Some(format!(
                        "aborted by peer (source {}, reason {})",
                        a.source.0, a.reason.0
                    ));
                }
                Event::ProviderAbort { sent, why } => {
                    if self.outcome.is_none()
                        || sent.is_some() && why != "transport connection closed"
                    {
                        self.outcome = Some(format!("aborted: {why}"));
                    }
                }
                Event::Released | Event::Accepted | Event::Rejected(_) | Event::Closed => {}
            }
        }
        if self.assoc.wants_close() || matches!(self.assoc.state(), State::Sta1 | State::Sta13) {
            // Nobody will read the answers: stores not yet handed out are dropped (they were
            // never acknowledged); those handed out still complete and are accounted for.
            for w in self.waiting.drain(..) {
                self.held -= w.request.data_set.len();
            }
            self.release_pending = false;
        }
    }
}
