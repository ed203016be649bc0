//! The acceptor's per-association DIMSE service (PS3.7 §9.1, §9.3.1 C-STORE, §9.3.5 C-ECHO; the
//! asynchronous operations window of PS3.7 D.3.3.3), on top of the PS3.8 association machine.
//! Sans-IO, in the style of quinn-proto's `Connection`.
//!
//! Owns, for one association: the [`Association`] state machine, negotiation's outcome, the
//! message [`Assembler`], the work waiting to be handed to storage (a queue, never a single
//! slot), the stores handed out and not yet answered, the data sets being streamed to storage,
//! the operations window, and release gating (the A-RELEASE-RP waits for the last outstanding
//! response). Must never touch a socket, a file or a clock: time comes in as `now`.
//!
//! Inputs: [`Service::handle_input`] (received bytes), [`Service::handle_store_done`] (storage's
//! answer for a store handed out), [`Service::handle_written`] (a chunk of a streamed data set
//! was written), [`Service::handle_timeout`], [`Service::handle_transport_closed`],
//! [`Service::abort`]. After any input, poll in this order:
//! 1. [`Service::poll_work`] until `None` while storage has room: each store handed out must
//!    get exactly one `handle_store_done` and each write one `handle_written`, whatever happens
//!    to the connection;
//! 2. [`Service::transmit`]: write it and `drain(..n)` what was written. Responses to every
//!    completion handled since the last write go out together (one write per batch);
//! 3. [`Service::poll_event`] until `None` (things to log);
//! 4. [`Service::poll_timeout`] to re-arm the timer; [`Service::wants_read`] to decide whether to
//!    read more; [`Service::is_closed`] to close the transport once `transmit` is empty.
//!
//! Streaming: a C-STORE data set that grows past `stream_above` stops being buffered. Its
//! command is checked at once ([`super::store_header`]); its bytes are scanned as they arrive by
//! the resumable [`Scanner`] (a deflated one: its first bytes, inflated) and handed out as
//! [`Work::Write`] chunks of about [`STREAM_CHUNK`]; when the data set is complete, valid and
//! every chunk written, it becomes a [`Work::Store`] like any other; otherwise it is answered
//! with a failure status and its file is discarded ([`Work::Discard`]). Any other message that
//! grows that large is read and dropped, then answered as it would be.
//!
//! Backpressure: the service stops taking PDUs (`handle_input` consumes no more and `wants_read`
//! is false) while its outstanding operations (stores waiting or handed out, streamed data sets
//! waiting for their writes) reach the negotiated window, while [`STREAM_WINDOW`] bytes of
//! streamed data are on their way to disk, or while a release is pending. A PDU is always
//! handled whole: every message it completes is queued, so a P-DATA-TF holding many C-STOREs
//! can exceed the window by at most what one PDU of the negotiated maximum length carries;
//! nothing is dropped or overwritten.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Instant;

use super::command::{self, response_to, status, CommandSet};
use super::{handle, message, Action, Assembled, Assembler, Context, StoreHeader, StoreRequest};
use crate::assoc::{
    negotiate_from, AcceptedContext, AcceptorPolicy, Association, Event, Negotiated, Outcome,
    Received, Slots, State, Timeouts,
};
use crate::config::{Config, STREAM_ABOVE_MIN};
use crate::dicom::scan::{self, ScanError, Scanned, Scanner};
use crate::dicom::transfer_syntax::{DatasetEncoding, TransferSyntax};
use crate::dicom::vr::trim_padding;
use crate::ul::{self, AbortReason, AssociateRj, Pdu};

/// What the service needs from configuration; shared by every association of a node.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub policy: AcceptorPolicy,
    pub timeouts: Timeouts,
    /// Sorted tags to scan from every data set; must include [`crate::dicom::tags::ROUTING`].
    pub wanted_tags: Vec<u32>,
    /// Largest data set accepted in one message.
    pub max_message_bytes: usize,
    /// Largest PDU accepted after negotiation (what we advertise).
    pub max_pdu_length: u32,
    /// Largest A-ASSOCIATE-RQ accepted.
    pub max_associate_length: u32,
    /// A C-STORE data set that grows past this many bytes is streamed to storage as it arrives
    /// ([`Work::Write`]) instead of being held whole; `usize::MAX`: never.
    pub stream_above: usize,
    /// `[limits] min_bytes_per_second`: the slowest average, over each [`MIN_RATE_WINDOW`]
    /// inside a PDU or message, a peer may send at; 0: no minimum.
    pub min_bytes_per_second: u64,
}

impl Config {
    /// What every association's DIMSE service is configured with; `wanted_tags` are the tags
    /// to scan from each data set (sorted here).
    /// Data sets larger than `max(inline_max_bytes, STREAM_ABOVE_MIN)` are streamed to storage.
    pub fn service_config(&self, mut wanted_tags: Vec<u32>) -> ServiceConfig {
        wanted_tags.sort_unstable();
        wanted_tags.dedup();
        ServiceConfig {
            policy: self.acceptor_policy(),
            timeouts: self.timeouts(),
            wanted_tags,
            max_message_bytes: self.limits.max_message_bytes,
            max_pdu_length: self.limits.max_pdu_length,
            max_associate_length: self.limits.max_associate_length,
            // Larger than what goes to the log (those are held whole and appended), and not
            // so small that every modest image pays for chunked writes.
            stream_above: self.storage.inline_max_bytes.max(STREAM_ABOVE_MIN),
            min_bytes_per_second: self.limits.min_bytes_per_second,
        }
    }
}

/// What DIMSE needs of a negotiated presentation context.
fn dimse_context(ctx: &AcceptedContext) -> Context<'_> {
    Context {
        abstract_syntax: &ctx.abstract_syntax,
        transfer_syntax: ctx.transfer_syntax,
    }
}

/// The window over which `min_bytes_per_second` is averaged. Long enough that a peer on a
/// congested link is judged on its rate, not on one TCP retransmission timeout (which starts
/// at 1 s and doubles); short enough that a peer dripping bytes into a message holds its
/// association slot for at most two windows.
pub const MIN_RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Windows in a row the node may pause a peer's reading before the peer is judged on its average
/// since the message began (a pause lets peers that hold half-received messages in the memory
/// budget go unjudged; after a minute, a peer that brought little is cut off all the same).
pub const MAX_PAUSED_WINDOWS: u32 = 6;

/// The window in which the peer's rate is being measured: it began at `start`, when `base`
/// bytes had been received.
#[derive(Debug, Clone, Copy)]
struct RateWindow {
    start: Instant,
    base: u64,
    /// The node paused reading during the window (its own backpressure): not judged.
    paused: bool,
    /// When receiving began, and the bytes received then.
    began: Instant,
    began_base: u64,
    /// Windows in a row the node paused reading.
    paused_windows: u32,
}

/// Bytes of a streamed data set gathered into one [`Work::Write`].
pub const STREAM_CHUNK: usize = 256 << 10;
/// Bytes of streamed data sets an association may have on their way to disk (handed out or
/// waiting) before it stops taking input.
pub const STREAM_WINDOW: usize = 4 * STREAM_CHUNK;

/// Work for the host, from [`Service::poll_work`]. For one token, every `Write` comes before
/// its `Store` or `Discard`.
#[derive(Debug)]
pub enum Work {
    /// Store this instance; answer with [`Service::handle_store_done`].
    Store(StoreSubmission),
    /// Write these bytes of a streamed data set; answer with [`Service::handle_written`].
    Write(Chunk),
    /// The streamed data set of `token` will not be stored: forget what was written of it. No
    /// answer.
    Discard { token: u64 },
}

/// Bytes of a data set streamed to storage.
#[derive(Debug)]
pub struct Chunk {
    pub token: u64,
    /// Where `bytes` go in the data set.
    pub offset: u64,
    pub bytes: Vec<u8>,
    /// With the first chunk of a data set (offset 0): what its file's meta information needs.
    pub begin: Option<Box<StreamBegin>>,
}

/// What a streamed data set's file is made with before its data set is known.
#[derive(Debug, Clone)]
pub struct StreamBegin {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: &'static TransferSyntax,
}

/// A C-STORE handed to the host for storage.
#[derive(Debug)]
pub struct StoreSubmission {
    /// Pass back to [`Service::handle_store_done`].
    pub token: u64,
    pub request: Box<StoreRequest>,
    /// For a data set streamed to storage (its `Write`s all done, `request.data_set` empty):
    /// its length.
    pub streamed: Option<u64>,
}

/// Storage's answer to one [`StoreSubmission`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Durable: answer success (0x0000).
    Stored { bytes: u64 },
    /// Not stored: answer with this failure status and comment (e.g. 0xA700, or 0x0124 when no
    /// input accepts the instance).
    Failed { status: u16, comment: String },
    /// Not stored on purpose, yet answered success (0x0000): the host's configuration says
    /// instances nobody wants are discarded (`[patients] unmatched = "discard"`).
    Discarded,
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
    /// Stores answered success without being stored ([`StoreOutcome::Discarded`]).
    pub discarded: u64,
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

/// How a streamed data set is scanned as it arrives.
#[derive(Debug)]
enum StreamScan {
    Plain(Scanner<Vec<u32>>),
    /// Deflated: scanned once, on what the stream's first bytes inflate to.
    Deflated(Result<Scanned, ScanError>),
}

/// What becomes of a streamed data set.
#[derive(Debug)]
enum Sink {
    /// Written to storage in chunks, stored when complete and valid.
    Store {
        header: Box<StoreHeader>,
        scan: StreamScan,
        /// Bytes gathered for the next chunk.
        buf: Vec<u8>,
    },
    /// Read and dropped; at its end, this response goes.
    Refuse(CommandSet),
    /// Not a C-STORE: read and dropped, then the command is handled as if its data set were
    /// empty (its answer never depends on it).
    Other(CommandSet),
}

/// A data set being streamed, or streamed and waiting for its last writes.
#[derive(Debug)]
struct Stream {
    token: u64,
    pc: u8,
    sink: Sink,
    /// Bytes handed out as chunks so far.
    offset: u64,
    /// Chunk bytes not yet written (waiting or handed out).
    unwritten: usize,
    /// The whole data set arrived.
    received: bool,
    /// Complete and valid: queued as a store once `unwritten` is zero.
    ready: Option<Box<StoreRequest>>,
}

/// The acceptor side of one association: see the module doc for the polling order.
#[derive(Debug)]
pub struct Service {
    assoc: Association,
    /// The requestor's address, for `[node] check_peer_address`; `None` when not given.
    peer_ip: Option<std::net::IpAddr>,
    negotiated: Option<Negotiated>,
    holds_slot: bool,
    assembler: Assembler,
    /// Work not yet handed out, oldest first.
    waiting: VecDeque<Work>,
    /// How many of `waiting` are stores.
    waiting_stores: usize,
    /// Streamed data sets not yet stored or forgotten; at most one is being received.
    streams: Vec<Stream>,
    // Invariant: the sum of `unwritten` over `streams` (also counted in `held`).
    stream_bytes: usize,
    /// Handed out, not yet done; answered in completion order (PS3.7 D.3.3.3 lets responses
    /// come in any order within the window).
    in_flight: Vec<InFlight>,
    // Invariant: true only in Sta8 with outstanding stores; cleared when the A-RELEASE-RP goes.
    release_pending: bool,
    next_token: u64,
    // Invariant: the sum of the data set sizes of the stores in `waiting` and `in_flight`, plus
    // `stream_bytes`.
    held: usize,
    stats: ServiceStats,
    outcome: Option<String>,
    events: VecDeque<ServiceEvent>,
    /// `ServiceConfig::min_bytes_per_second`.
    min_bytes_per_second: u64,
    /// Bytes received from the peer ([`Service::handle_received`]).
    received: u64,
    /// Bytes of an incomplete PDU wait in the host's buffer (seen by the last `handle_input`).
    partial_pdu: bool,
    // Invariant: Some exactly while the minimum rate is on, the association is established
    // and a PDU or message is partly received.
    rate: Option<RateWindow>,
}

impl Service {
    /// A new acceptor whose transport connection was just accepted (PS3.8 Sta2, ARTIM running).
    pub fn new(now: Instant, cfg: &ServiceConfig) -> Service {
        Service {
            assoc: Association::acceptor(now, cfg.timeouts),
            peer_ip: None,
            negotiated: None,
            holds_slot: false,
            assembler: Assembler::new(cfg.max_message_bytes),
            waiting: VecDeque::new(),
            waiting_stores: 0,
            streams: Vec::new(),
            stream_bytes: 0,
            in_flight: Vec::new(),
            release_pending: false,
            next_token: 0,
            held: 0,
            stats: ServiceStats::default(),
            outcome: None,
            events: VecDeque::new(),
            min_bytes_per_second: cfg.min_bytes_per_second,
            received: 0,
            partial_pdu: false,
            rate: None,
        }
    }

    /// The transport's remote address, which known-peer checks compare (set before input).
    pub fn with_peer_ip(mut self, ip: std::net::IpAddr) -> Service {
        self.peer_ip = Some(ip);
        self
    }

    // ---- inputs -----------------------------------------------------------------------

    /// Handles the complete PDUs at the start of `buf` while the service takes input; returns
    /// how many bytes it consumed (the rest is a partial PDU or waits for backpressure to lift).
    /// `slots` is asked once, for an A-ASSOCIATE-RQ that passes the cheap checks, for a slot for
    /// the calling AE title (before any user identity is verified); one kept by an accepted
    /// association is the caller's to release when it ends ([`Service::holds_slot`]).
    pub fn handle_input(
        &mut self,
        now: Instant,
        buf: &[u8],
        cfg: &ServiceConfig,
        slots: &dyn Slots,
    ) -> usize {
        let mut pos = 0;
        self.partial_pdu = false;
        while self.takes_input() && pos < buf.len() {
            let max = self.max_receive_pdu(cfg);
            let n = match ul::deframe(&buf[pos..], max) {
                Ok(ul::Status::Complete(n)) => n,
                Ok(ul::Status::Partial { .. }) => {
                    self.partial_pdu = true;
                    break;
                }
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
                Ok(pdu) => self.handle_pdu(now, pdu, cfg, slots),
                Err(e) => {
                    self.outcome = Some(format!("protocol error: {e}"));
                    self.assoc.handle_invalid_pdu(now, e);
                    pos = buf.len();
                }
            }
            self.drain_assoc_events(now);
        }
        // Bytes left over while input is not taken are a PDU waiting, not one arriving.
        self.partial_pdu &= self.takes_input();
        self.update_rate_window(now);
        pos
    }

    /// `n` more bytes arrived from the peer (before they are offered to `handle_input`); they
    /// count towards `[limits] min_bytes_per_second`.
    pub fn handle_received(&mut self, now: Instant, n: usize) {
        self.received = self.received.saturating_add(n as u64);
        self.update_rate_window(now);
    }

    /// The host paused reading from this connection for reasons of its own (the node-wide
    /// memory budget, a full pipeline queue): the current rate window is not judged.
    pub fn handle_read_paused(&mut self, _now: Instant) {
        if let Some(w) = self.rate.as_mut() {
            w.paused = true;
        }
    }

    fn handle_pdu(&mut self, now: Instant, pdu: Pdu<'_>, cfg: &ServiceConfig, slots: &dyn Slots) {
        if let Pdu::Abort(a) = &pdu {
            self.outcome = Some(format!(
                "aborted by peer {}",
                ul::describe_abort(a.source.0, a.reason.0)
            ));
        }
        match self.assoc.handle_pdu(now, pdu) {
            Received::AssociateRq(rq) => self.on_associate_rq(now, &rq, cfg, slots),
            Received::Data(p) => {
                // Every PDV of the PDU, whatever backpressure says: a message it completes is
                // queued, never parked in a slot a later one could overwrite.
                for pdv in p.pdvs() {
                    let Some(neg) = self.negotiated.as_ref() else {
                        break;
                    };
                    match self.assembler.push_pdv(pdv, |id| neg.context(id).is_some()) {
                        Ok(Assembled::Message(msg)) => self.on_message(now, msg, cfg),
                        Ok(Assembled::Pending) => {
                            if self.assembler.buffered() > cfg.stream_above {
                                self.begin_stream(cfg);
                            }
                        }
                        Ok(Assembled::Streamed { data, last }) => {
                            self.stream_data(now, data, last, cfg)
                        }
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
        slots: &dyn Slots,
    ) {
        let (rj, why) = match negotiate_from(rq, &cfg.policy, self.peer_ip, now, slots) {
            Outcome::Accept { ac, negotiated } => {
                self.holds_slot = true;
                self.negotiated = Some(negotiated);
                let r = self.assoc.accept(now, &ac);
                self.must(now, r);
                self.events.push_back(ServiceEvent::Established);
                return;
            }
            Outcome::Reject(rj, why) => (rj, why),
        };
        let described = ul::describe_reject(rj.result.0, rj.source.0, rj.reason);
        self.outcome = Some(match why {
            Some(why) => format!("{described}: {why}"),
            None => described,
        });
        self.events.push_back(ServiceEvent::Rejected {
            calling_ae: ul::ae_title_str(&rq.calling_ae)
                .unwrap_or("<invalid>")
                .to_string(),
            called_ae: ul::ae_title_str(&rq.called_ae)
                .unwrap_or("<invalid>")
                .to_string(),
            rj,
        });
        let r = self.assoc.reject(now, rj);
        self.must(now, r);
    }

    /// A primitive the service only calls where PS3.8 Table 9-10 allows it. Were one refused
    /// (a defect of ours), the association is not left half-way: it is aborted and its outcome
    /// names the defect (issue 11: such results were discarded).
    fn must(&mut self, now: Instant, r: Result<(), crate::assoc::NotAllowed>) {
        if let Err(e) = r {
            self.outcome = Some(format!("aborted: internal error: {e}"));
            let _ = self.assoc.abort(now); // not allowed only where nothing is open
        }
    }

    fn on_message(&mut self, now: Instant, msg: message::Message, cfg: &ServiceConfig) {
        let Some(action) = self
            .negotiated
            .as_ref()
            .and_then(|n| n.context(msg.presentation_context_id))
            .map(|ctx| handle(msg, dimse_context(ctx), &cfg.wanted_tags))
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
                self.queue_store(StoreSubmission {
                    token,
                    request,
                    streamed: None,
                });
            }
        }
    }

    fn queue_store(&mut self, s: StoreSubmission) {
        self.waiting_stores += 1;
        self.waiting.push_back(Work::Store(s));
    }

    /// The data set in progress passed `stream_above`: from here on it goes to storage in
    /// chunks as it arrives (a C-STORE that passes the command checks), or is read and dropped.
    fn begin_stream(&mut self, cfg: &ServiceConfig) {
        let Some((pc, command, first)) = self.assembler.begin_stream() else {
            return;
        };
        let token = self.next_token;
        self.next_token += 1;
        let ctx = self.negotiated.as_ref().and_then(|n| n.context(pc));
        let sink = match ctx {
            Some(ctx) if command.command_field == command::command_field::C_STORE_RQ => {
                match super::store_header(pc, command, dimse_context(ctx)) {
                    Ok(header) => {
                        let enc = header.transfer_syntax.encoding;
                        let scan = if enc == DatasetEncoding::DeflatedExplicitVrLittleEndian {
                            StreamScan::Deflated(scan::scan_deflated(
                                &first,
                                &cfg.wanted_tags,
                                false,
                            ))
                        } else {
                            StreamScan::Plain(Scanner::new(enc, cfg.wanted_tags.clone()))
                        };
                        match scan {
                            // Not understood already: nothing of it is written.
                            StreamScan::Deflated(Err(e)) => Sink::Refuse(response_to(
                                &header.command,
                                status::CANNOT_UNDERSTAND,
                                Some(&e.to_string()),
                            )),
                            scan => Sink::Store {
                                header: Box::new(header),
                                scan,
                                buf: Vec::with_capacity(STREAM_CHUNK),
                            },
                        }
                    }
                    Err(refusal) => Sink::Refuse(refusal),
                }
            }
            _ => Sink::Other(command),
        };
        self.streams.push(Stream {
            token,
            pc,
            sink,
            offset: 0,
            unwritten: 0,
            received: false,
            ready: None,
        });
        self.add_stream_bytes(&first, false);
    }

    /// The next bytes of the data set being streamed.
    fn stream_data(&mut self, now: Instant, data: &[u8], last: bool, cfg: &ServiceConfig) {
        self.add_stream_bytes(data, last);
        if last {
            self.end_stream(now, cfg);
        }
    }

    /// Scans and gathers `data` into the receiving stream's chunk; hands the chunk out when it
    /// is full or the data set ends.
    fn add_stream_bytes(&mut self, data: &[u8], last: bool) {
        let Some(i) = self.streams.iter().rposition(|s| !s.received) else {
            return;
        };
        let st = &mut self.streams[i];
        let Sink::Store { header, scan, buf } = &mut st.sink else {
            return;
        };
        if let StreamScan::Plain(s) = scan {
            if let Err(e) = s.feed(data) {
                // Not understood: nothing more is written; answered at the end.
                let refusal = response_to(
                    &header.command,
                    status::CANNOT_UNDERSTAND,
                    Some(&e.to_string()),
                );
                st.sink = Sink::Refuse(refusal);
                self.discard(i);
                return;
            }
        }
        // Chunks of about STREAM_CHUNK, without copying twice when a piece is that big.
        let mut data = data;
        while !data.is_empty() || last && !buf.is_empty() {
            let room = STREAM_CHUNK.saturating_sub(buf.len());
            let take = data.len().min(room);
            buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if buf.len() < STREAM_CHUNK && !(last && data.is_empty()) {
                break;
            }
            let bytes = std::mem::replace(buf, Vec::with_capacity(STREAM_CHUNK.min(data.len())));
            let begin = (st.offset == 0).then(|| {
                Box::new(StreamBegin {
                    sop_class_uid: header.sop_class_uid.clone(),
                    sop_instance_uid: header.sop_instance_uid.clone(),
                    transfer_syntax: header.transfer_syntax,
                })
            });
            let n = bytes.len();
            self.waiting.push_back(Work::Write(Chunk {
                token: st.token,
                offset: st.offset,
                bytes,
                begin,
            }));
            st.offset += n as u64;
            st.unwritten += n;
            self.stream_bytes += n;
            self.held += n;
            if data.is_empty() {
                break;
            }
        }
    }

    /// The streamed data set is complete: decide, and answer now unless it waits for its writes.
    fn end_stream(&mut self, now: Instant, cfg: &ServiceConfig) {
        let Some(i) = self.streams.iter().rposition(|s| !s.received) else {
            return;
        };
        self.streams[i].received = true;
        let pc = self.streams[i].pc;
        let sink = std::mem::replace(
            &mut self.streams[i].sink,
            Sink::Refuse(CommandSet::default()),
        );
        match sink {
            Sink::Store { header, scan, .. } => {
                let scanned = match scan {
                    StreamScan::Plain(s) => s.finish(),
                    StreamScan::Deflated(r) => r,
                };
                let decided = match scanned {
                    Ok(scanned) => super::store_request(*header, scanned, Vec::new()),
                    Err(e) => Err(response_to(
                        &header.command,
                        status::CANNOT_UNDERSTAND,
                        Some(&e.to_string()),
                    )),
                };
                match decided {
                    Ok(request) => {
                        self.streams[i].ready = Some(request);
                        self.stream_progress(i);
                    }
                    Err(refusal) => {
                        self.discard(i);
                        self.refused(&refusal);
                        self.send_response(pc, &refusal);
                        self.forget_if_done(i);
                    }
                }
            }
            Sink::Refuse(refusal) => {
                self.refused(&refusal);
                self.send_response(pc, &refusal);
                self.forget_if_done(i);
            }
            Sink::Other(command) => {
                self.forget_if_done(i);
                let msg = message::Message {
                    presentation_context_id: pc,
                    command,
                    data_set: Some(Vec::new()),
                };
                self.on_message(now, msg, cfg);
            }
        }
    }

    /// Stops writing stream `i`: its chunks not yet handed out are dropped, and the host is
    /// told to forget the rest.
    fn discard(&mut self, i: usize) {
        let token = self.streams[i].token;
        let mut dropped = 0;
        self.waiting.retain(|w| match w {
            Work::Write(c) if c.token == token => {
                dropped += c.bytes.len();
                false
            }
            _ => true,
        });
        let st = &mut self.streams[i];
        st.unwritten -= dropped;
        self.stream_bytes -= dropped;
        self.held -= dropped;
        if st.offset > 0 {
            self.waiting.push_back(Work::Discard { token });
        }
    }

    /// A complete, valid stream whose writes are all done becomes a store.
    fn stream_progress(&mut self, i: usize) {
        let st = &mut self.streams[i];
        if st.unwritten > 0 || st.ready.is_none() {
            return;
        }
        let (token, streamed) = (st.token, st.offset);
        if let Some(request) = st.ready.take() {
            self.streams.swap_remove(i);
            self.queue_store(StoreSubmission {
                token,
                request,
                streamed: Some(streamed),
            });
        }
    }

    /// Forgets stream `i` once it is complete, not to be stored, and nothing of it is on its
    /// way to disk.
    fn forget_if_done(&mut self, i: usize) {
        let st = &self.streams[i];
        if st.received && st.ready.is_none() && st.unwritten == 0 {
            self.streams.swap_remove(i);
        }
    }

    /// Storage wrote `bytes` of the streamed data set `token` (or failed to: storage reports
    /// that when the store is asked for). An unknown token is ignored.
    pub fn handle_written(&mut self, _now: Instant, token: u64, bytes: usize) {
        let Some(i) = self.streams.iter().position(|s| s.token == token) else {
            return;
        };
        let n = bytes.min(self.streams[i].unwritten);
        self.streams[i].unwritten -= n;
        self.stream_bytes -= n;
        self.held -= n;
        if self.streams[i].ready.is_some() {
            self.stream_progress(i);
        } else {
            self.forget_if_done(i);
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
            StoreOutcome::Discarded => {
                self.stats.discarded += 1;
                response_to(&p.request, status::SUCCESS, None)
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
        self.judge_rate(now);
        self.update_rate_window(now);
    }

    /// The transport connection closed or failed (PS3.8 Evt17).
    pub fn handle_transport_closed(&mut self, now: Instant) {
        self.assoc.handle_transport_closed(now);
        self.drain_assoc_events(now);
    }

    /// The transport failed (a reset, a write error): as [`Service::handle_transport_closed`],
    /// and unless the association had already ended (released or aborted), its outcome says
    /// so with `error`, not as a close.
    pub fn handle_transport_error(&mut self, now: Instant, error: &str) {
        let ended = self
            .outcome
            .as_deref()
            .is_some_and(|o| o.starts_with("released"))
            || matches!(self.assoc.state(), State::Sta1 | State::Sta13);
        if !ended {
            self.outcome = Some(format!("aborted: transport error: {error}"));
        }
        self.handle_transport_closed(now);
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

    /// The next work to hand to storage. Call only while storage has room; a store taken here
    /// is the host's until it calls [`Service::handle_store_done`] for its token, a write until
    /// [`Service::handle_written`].
    pub fn poll_work(&mut self) -> Option<Work> {
        let w = self.waiting.pop_front()?;
        if let Work::Store(s) = &w {
            self.waiting_stores -= 1;
            self.in_flight.push(InFlight {
                token: s.token,
                pc: s.request.presentation_context_id,
                request: s.request.command.clone(),
                bytes: s.request.data_set.len(),
            });
            self.stats.submitted += 1;
        }
        Some(w)
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
        let rate = self.rate.map(|w| w.start + MIN_RATE_WINDOW);
        match (self.assoc.poll_timeout(), rate) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        }
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
        self.waiting_stores
    }

    /// Work handed out and not yet answered: stores, and streams with writes not yet done. The
    /// host keeps the association's context until this is zero.
    pub fn work_in_flight(&self) -> usize {
        self.in_flight.len() + self.streams.iter().filter(|s| s.unwritten > 0).count()
    }

    /// Work waiting to be handed out (stores, writes, discards).
    pub fn work_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Data set bytes this association holds in memory: the message being assembled, and the
    /// stores waiting for or handed to storage until storage answers (the node-wide budget,
    /// `[limits] max_buffered_bytes`, counts these).
    pub fn held_bytes(&self) -> usize {
        self.held + self.assembler.buffered() + self.gathering()
    }

    /// Memory taken for the next chunk of the stream being received, and by its scan.
    fn gathering(&self) -> usize {
        self.streams
            .iter()
            .map(|s| match &s.sink {
                Sink::Store { buf, scan, .. } => {
                    buf.capacity()
                        + match scan {
                            StreamScan::Plain(s) => s.held(),
                            StreamScan::Deflated(_) => 0,
                        }
                }
                _ => 0,
            })
            .sum()
    }

    /// The part of [`Service::held_bytes`] that storage will free without more input: stores
    /// and streamed chunks waiting for storage or in it.
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

    /// Whether negotiation took a slot (from `handle_input`'s `slots`) that must be released when the
    /// association ends.
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

    /// A PDU or a DIMSE message is partly received on an established association: the time
    /// in which `[limits] min_bytes_per_second` applies.
    fn receiving(&self) -> bool {
        matches!(self.assoc.state(), State::Sta6 | State::Sta7 | State::Sta8)
            && !self.assoc.wants_close()
            && (self.partial_pdu || self.assembler.in_progress())
    }

    /// Starts a rate window when receiving begins, drops it when receiving ends, and marks it
    /// paused while the service does not take input (its own backpressure).
    fn update_rate_window(&mut self, now: Instant) {
        if self.min_bytes_per_second == 0 || !self.receiving() {
            self.rate = None;
            return;
        }
        let paused = !self.takes_input();
        match self.rate.as_mut() {
            Some(w) => w.paused |= paused,
            None => {
                self.rate = Some(RateWindow {
                    start: now,
                    base: self.received,
                    paused,
                    began: now,
                    began_base: self.received,
                    paused_windows: 0,
                })
            }
        }
    }

    /// At the end of a rate window: a peer that sent less than `min_bytes_per_second` on
    /// average over it, while the node was reading all along, is aborted (A-ABORT, service
    /// provider, reason not specified: PS3.8 Table 9-26 has no reason for it); otherwise the
    /// next window begins.
    fn judge_rate(&mut self, now: Instant) {
        let Some(w) = self.rate else {
            return;
        };
        if !self.receiving() {
            self.rate = None; // aborted or closing meanwhile: nothing to judge
            return;
        }
        let elapsed = now.saturating_duration_since(w.start);
        if elapsed < MIN_RATE_WINDOW {
            return;
        }
        let wanted_over = |d: std::time::Duration| {
            (u128::from(self.min_bytes_per_second) * d.as_millis() / 1000) as u64
        };
        let paused_windows = if w.paused { w.paused_windows + 1 } else { 0 };
        // A window the node paused is not judged, unless it paused this peer for a minute:
        // then the peer's average since receiving began is.
        let (got, over) = if !w.paused {
            (self.received - w.base, elapsed)
        } else if paused_windows >= MAX_PAUSED_WINDOWS {
            (
                self.received - w.began_base,
                now.saturating_duration_since(w.began),
            )
        } else {
            (u64::MAX, elapsed)
        };
        if got < wanted_over(over) {
            self.rate = None;
            self.assoc.abort_protocol(
                now,
                AbortReason::NOT_SPECIFIED,
                "sender too slow inside a message",
            );
            self.drain_assoc_events(now);
            self.outcome = Some(format!(
                "aborted: sender too slow inside a message ({got} bytes in {:.1} s; \
                 [limits] min_bytes_per_second = {})",
                over.as_secs_f64(),
                self.min_bytes_per_second
            ));
            return;
        }
        self.rate = Some(RateWindow {
            start: now,
            base: self.received,
            paused: !self.takes_input(),
            began: w.began,
            began_base: w.began_base,
            paused_windows,
        });
    }

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
        self.outstanding() < window && self.stream_bytes + self.gathering() < STREAM_WINDOW
    }

    /// Operations not yet answered: stores waiting or handed out, and streamed data sets that
    /// wait for their last writes.
    fn outstanding(&self) -> usize {
        self.waiting_stores
            + self.in_flight.len()
            + self.streams.iter().filter(|s| s.ready.is_some()).count()
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
                .map(|u| String::from_utf8_lossy(trim_padding(u)).into_owned()),
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
            let r = self.assoc.release_response(now);
            self.must(now, r);
        }
    }

    fn drain_assoc_events(&mut self, now: Instant) {
        while let Some(ev) = self.assoc.poll_event() {
            match ev {
                Event::ReleaseRequested => {
                    self.outcome.get_or_insert_with(|| "released".into());
                    if self.outstanding() == 0 {
                        let r = self.assoc.release_response(now);
                        self.must(now, r);
                    } else {
                        self.release_pending = true;
                    }
                }
                Event::AbortedByPeer(a) => {
                    self.outcome = Some(format!(
                        "aborted by peer {}",
                        ul::describe_abort(a.source.0, a.reason.0)
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
            // Nobody will read the answers: stores and writes not yet handed out are dropped
            // (never acknowledged); those handed out still complete and are accounted for.
            // Every stream is forgotten (the host is told), once its writes in flight are done.
            let mut kept = VecDeque::new();
            for w in self.waiting.drain(..) {
                match w {
                    Work::Store(s) => self.held -= s.request.data_set.len(),
                    Work::Write(c) => {
                        if let Some(st) = self.streams.iter_mut().find(|s| s.token == c.token) {
                            st.unwritten -= c.bytes.len();
                        }
                        self.stream_bytes -= c.bytes.len();
                        self.held -= c.bytes.len();
                    }
                    d @ Work::Discard { .. } => kept.push_back(d),
                }
            }
            self.waiting = kept;
            self.waiting_stores = 0;
            for st in &mut self.streams {
                let told = self
                    .waiting
                    .iter()
                    .any(|w| matches!(w, Work::Discard { token } if *token == st.token));
                if st.offset > 0
                    && !told
                    && (st.ready.is_some() || matches!(st.sink, Sink::Store { .. }))
                {
                    self.waiting.push_back(Work::Discard { token: st.token });
                }
                st.ready = None;
                st.received = true;
                st.sink = Sink::Refuse(CommandSet::default());
            }
            self.streams.retain(|s| s.unwritten > 0);
            self.assembler.reset();
            self.release_pending = false;
        }
    }
}
