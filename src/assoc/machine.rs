//! The association state machine of PS3.8 §9.2, Table 9-10, for both the acceptor and the
//! requestor side. Sans-IO (quinn-proto style): inputs are `handle_*(now, ..)` and the local
//! primitives; outputs are the bytes in [`Association::transmit`], [`Association::poll_event`],
//! [`Association::poll_timeout`] and [`Association::wants_close`].
//!
//! Poll in this order after every input: drain `transmit()` to the socket, then `poll_event()`
//! until `None`, then re-arm the timer from `poll_timeout()`; close the transport when
//! `wants_close()` and then call `handle_transport_closed`.
//!
//! States and events keep the standard's numbers (Sta1..Sta13, Evt1..Evt19) so the code can be
//! read against the table. A local primitive that the table does not allow in the current state
//! is a bug in the caller and answers [`NotAllowed`] without changing state; every PDU a peer can
//! send maps to an event the table defines.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ul::{Abort, AbortReason, AbortSource, Associate, AssociateRj, PDataTf, Pdu, PduError};

/// PS3.8 Table 9-10 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Idle.
    Sta1,
    /// Transport connection open, awaiting A-ASSOCIATE-RQ PDU.
    Sta2,
    /// Awaiting local A-ASSOCIATE response primitive.
    Sta3,
    /// Awaiting transport connection opening to complete.
    Sta4,
    /// Awaiting A-ASSOCIATE-AC or -RJ PDU.
    Sta5,
    /// Association established and ready for data transfer.
    Sta6,
    /// Awaiting A-RELEASE-RP PDU.
    Sta7,
    /// Awaiting local A-RELEASE response primitive.
    Sta8,
    /// Release collision requestor side; awaiting A-RELEASE response primitive.
    Sta9,
    /// Release collision acceptor side; awaiting A-RELEASE-RP PDU.
    Sta10,
    /// Release collision requestor side; awaiting A-RELEASE-RP PDU.
    Sta11,
    /// Release collision acceptor side; awaiting A-RELEASE response primitive.
    Sta12,
    /// Awaiting transport connection close indication.
    Sta13,
}

/// Which side of the association this machine plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Requestor,
    Acceptor,
}

/// PS3.8 Table 9-9 events that come from the peer or the transport. Variant names keep the
/// standard's event numbers, hence the shared prefix.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evt {
    Evt2TransportConfirm,
    Evt3AssociateAc,
    Evt4AssociateRj,
    Evt5TransportIndication,
    Evt6AssociateRq,
    Evt10PData,
    Evt12ReleaseRq,
    Evt13ReleaseRp,
    Evt16Abort,
    Evt17TransportClosed,
    Evt18ArtimExpired,
    Evt19InvalidPdu,
}

/// What the machine tells its user (the A-ASSOCIATE, A-RELEASE, A-ABORT and A-P-ABORT
/// indications and confirmations of PS3.8 §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// AE-3: our A-ASSOCIATE-RQ was accepted (requestor).
    Accepted,
    /// AE-4: our A-ASSOCIATE-RQ was rejected (requestor).
    Rejected(AssociateRj),
    /// AR-2 / AR-8: the peer asks to release; answer with `release_response` once every
    /// outstanding response has been sent.
    ReleaseRequested,
    /// AR-3 / AR-10: our release request was confirmed.
    Released,
    /// AA-3: the peer sent A-ABORT.
    AbortedByPeer(Abort),
    /// AA-4 / AA-8: the association ended abnormally on our side (A-P-ABORT indication), with
    /// the A-ABORT we sent, if any.
    ProviderAbort {
        sent: Option<Abort>,
        why: &'static str,
    },
    /// The association reached Sta1; nothing more will happen.
    Closed,
}

/// A local primitive called in a state where Table 9-10 does not define it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAllowed {
    pub state: State,
    pub primitive: &'static str,
}

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} not allowed in {:?}", self.primitive, self.state)
    }
}

impl std::error::Error for NotAllowed {}

/// What an input PDU hands to the user, borrowed from the receive buffer.
#[derive(Debug)]
pub enum Received<'a> {
    Nothing,
    /// AE-6: an acceptable A-ASSOCIATE-RQ; answer with `accept` or `reject` (Sta3).
    AssociateRq(Associate<'a>),
    /// AE-3: the A-ASSOCIATE-AC for our request.
    AssociateAc(Associate<'a>),
    /// DT-2 / AR-6: presentation data.
    Data(PDataTf<'a>),
}

/// Timer durations. ARTIM is PS3.8 §9.1.5; `idle` and `dimse` are the node's own bounds on an
/// established association (no PDU for `idle`; no progress inside a message for `dimse`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub artim: Duration,
    pub idle: Option<Duration>,
    pub dimse: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            artim: Duration::from_secs(30),
            idle: Some(Duration::from_secs(300)),
            dimse: Some(Duration::from_secs(60)),
        }
    }
}

impl crate::config::Config {
    /// The association timers of `[limits]` (0 seconds: that timer off).
    pub fn timeouts(&self) -> Timeouts {
        let opt = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Timeouts {
            artim: Duration::from_secs(self.limits.artim_seconds),
            idle: opt(self.limits.idle_seconds),
            dimse: opt(self.limits.dimse_seconds),
        }
    }
}

/// One association, either side.
#[derive(Debug)]
pub struct Association {
    role: Role,
    state: State,
    timeouts: Timeouts,
    // Invariant: Some only in Sta2, Sta5 and Sta13 (ARTIM of PS3.8 §9.1.5; we also bound Sta5).
    artim: Option<Instant>,
    last_activity: Instant,
    message_in_progress: bool,
    transmit: Vec<u8>,
    events: VecDeque<Event>,
    close: bool,
}

impl Association {
    /// A requestor in Sta1.
    pub fn requestor(now: Instant, timeouts: Timeouts) -> Self {
        Self::new(Role::Requestor, now, timeouts)
    }

    /// An acceptor whose transport connection was just accepted: Evt5, AE-5 → Sta2.
    pub fn acceptor(now: Instant, timeouts: Timeouts) -> Self {
        let mut a = Self::new(Role::Acceptor, now, timeouts);
        a.event(now, Evt::Evt5TransportIndication, Detail::None);
        a
    }

    fn new(role: Role, now: Instant, timeouts: Timeouts) -> Self {
        Association {
            role,
            state: State::Sta1,
            timeouts,
            artim: None,
            last_activity: now,
            message_in_progress: false,
            transmit: Vec::new(),
            events: VecDeque::new(),
            close: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes to send, in order. The caller removes what it wrote (`drain(..n)`).
    pub fn transmit(&mut self) -> &mut Vec<u8> {
        &mut self.transmit
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True once the transport should be closed (after `transmit` has been written).
    pub fn wants_close(&self) -> bool {
        self.close
    }

    /// Tells the machine whether a DIMSE message is partly received, which arms the DIMSE timer
    /// instead of the idle timer.
    pub fn set_message_in_progress(&mut self, in_progress: bool) {
        self.message_in_progress = in_progress;
    }

    /// Records that the association made progress (bytes received or a response produced).
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// The next deadline at which `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Sta1 {
            return None;
        }
        let idle = if matches!(self.state, State::Sta6 | State::Sta7 | State::Sta8) {
            let d = if self.message_in_progress {
                self.timeouts.dimse
            } else {
                self.timeouts.idle
            };
            d.map(|d| self.last_activity + d)
        } else {
            None
        };
        match (self.artim, idle) {
            (Some(a), Some(i)) => Some(a.min(i)),
            (a, i) => a.or(i),
        }
    }

    /// Evt18 (ARTIM expired) or the idle/DIMSE timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.artim.is_some_and(|t| now >= t) {
            if self.state == State::Sta5 {
                // Our bound on awaiting A-ASSOCIATE-AC: treated like a local abort, and the
                // A-ABORT it sends is reported (issue 11: it was reported as none).
                let sent = self.aa1(now, AbortSource::SERVICE_USER, AbortReason::NOT_SPECIFIED);
                self.events.push_back(Event::ProviderAbort {
                    sent: Some(sent),
                    why: "no A-ASSOCIATE response before the ARTIM timeout",
                });
            } else {
                self.event(now, Evt::Evt18ArtimExpired, Detail::None);
            }
        } else if self.poll_timeout().is_some_and(|t| now >= t) && self.artim.is_none() {
            // Idle or stalled association: the node aborts it (A-ABORT, service-provider).
            let why = if self.message_in_progress {
                "DIMSE timeout: no progress inside a message"
            } else {
                "idle timeout: no PDU"
            };
            let sent = self.aa8(now, AbortReason::NOT_SPECIFIED);
            self.events.push_back(Event::ProviderAbort { sent, why });
        }
    }

    /// Evt17: the transport connection closed (or failed).
    pub fn handle_transport_closed(&mut self, now: Instant) {
        self.event(now, Evt::Evt17TransportClosed, Detail::None);
    }

    /// A received PDU: Evt3, 4, 6, 10, 12, 13 or 16.
    pub fn handle_pdu<'a>(&mut self, now: Instant, pdu: Pdu<'a>) -> Received<'a> {
        self.last_activity = now;
        let evt = match &pdu {
            Pdu::AssociateRq(_) => Evt::Evt6AssociateRq,
            Pdu::AssociateAc(_) => Evt::Evt3AssociateAc,
            Pdu::AssociateRj(_) => Evt::Evt4AssociateRj,
            Pdu::PDataTf(_) => Evt::Evt10PData,
            Pdu::ReleaseRq(_) => Evt::Evt12ReleaseRq,
            Pdu::ReleaseRp(_) => Evt::Evt13ReleaseRp,
            Pdu::Abort(_) => Evt::Evt16Abort,
        };
        let before = self.state;
        let detail = match &pdu {
            Pdu::AssociateRj(rj) => Detail::Rj(*rj),
            Pdu::Abort(a) => Detail::Abort(*a),
            _ => Detail::None,
        };
        self.event(now, evt, detail);
        let after = self.state;
        match pdu {
            Pdu::AssociateRq(rq) if before == State::Sta2 && after == State::Sta3 => {
                Received::AssociateRq(rq)
            }
            Pdu::AssociateAc(ac) if before == State::Sta5 && after == State::Sta6 => {
                Received::AssociateAc(ac)
            }
            Pdu::PDataTf(p)
                if matches!(
                    (before, after),
                    (State::Sta6, State::Sta6) | (State::Sta7, State::Sta7)
                ) =>
            {
                Received::Data(p)
            }
            _ => Received::Nothing,
        }
    }

    /// Evt19: bytes that are not a valid PDU.
    pub fn handle_invalid_pdu(&mut self, now: Instant, err: PduError) {
        self.event(
            now,
            Evt::Evt19InvalidPdu,
            Detail::Invalid(err.abort_reason()),
        );
    }

    /// The DIMSE layer found a protocol violation inside P-DATA (PS3.7 §9.1, PS3.8 §9.3.5):
    /// the association is aborted by the provider with the given reason (AA-8).
    pub fn abort_protocol(&mut self, now: Instant, reason: AbortReason, why: &'static str) {
        if matches!(self.state, State::Sta1 | State::Sta4 | State::Sta13) {
            return;
        }
        let sent = self.aa8(now, reason);
        self.events.push_back(Event::ProviderAbort { sent, why });
    }

    // ---- local primitives -------------------------------------------------------------

    /// Evt1 + Evt2 for a requestor whose transport is already connected: AE-1, AE-2 → Sta5.
    pub fn request(&mut self, now: Instant, rq: &Pdu<'_>) -> Result<(), NotAllowed> {
        if self.role != Role::Requestor || self.state != State::Sta1 {
            return Err(self.not_allowed("A-ASSOCIATE request"));
        }
        self.state = State::Sta4; // AE-1
        self.event(now, Evt::Evt2TransportConfirm, Detail::None);
        self.send(rq);
        self.artim = Some(now + self.timeouts.artim);
        Ok(())
    }

    /// Evt7, AE-7: send the A-ASSOCIATE-AC (already encoded by negotiation) → Sta6.
    pub fn accept(&mut self, now: Instant, ac: &[u8]) -> Result<(), NotAllowed> {
        if self.state != State::Sta3 {
            return Err(self.not_allowed("A-ASSOCIATE response (accept)"));
        }
        self.transmit.extend_from_slice(ac);
        self.state = State::Sta6;
        self.last_activity = now;
        Ok(())
    }

    /// Evt8, AE-8: send the A-ASSOCIATE-RJ, start ARTIM → Sta13.
    pub fn reject(&mut self, now: Instant, rj: AssociateRj) -> Result<(), NotAllowed> {
        if self.state != State::Sta3 {
            return Err(self.not_allowed("A-ASSOCIATE response (reject)"));
        }
        self.send(&Pdu::AssociateRj(rj));
        self.enter_sta13(now);
        Ok(())
    }

    /// Evt9, DT-1 / AR-7: the P-DATA-TF bytes are appended by `write`, which gets the transmit
    /// buffer. Allowed in Sta6 and Sta8.
    pub fn send_pdata(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), NotAllowed> {
        if !matches!(self.state, State::Sta6 | State::Sta8) {
            return Err(self.not_allowed("P-DATA request"));
        }
        write(&mut self.transmit);
        Ok(())
    }

    /// Evt11, AR-1: send A-RELEASE-RQ → Sta7.
    pub fn release_request(&mut self) -> Result<(), NotAllowed> {
        if self.state != State::Sta6 {
            return Err(self.not_allowed("A-RELEASE request"));
        }
        self.send(&Pdu::RELEASE_RQ);
        self.state = State::Sta7;
        Ok(())
    }

    /// Evt14: AR-4 (Sta8, Sta12) or AR-9 (Sta9).
    pub fn release_response(&mut self, now: Instant) -> Result<(), NotAllowed> {
        match self.state {
            State::Sta8 | State::Sta12 => {
                self.send(&Pdu::RELEASE_RP);
                self.enter_sta13(now);
            }
            State::Sta9 => {
                self.send(&Pdu::RELEASE_RP);
                self.state = State::Sta11;
            }
            _ => return Err(self.not_allowed("A-RELEASE response")),
        }
        Ok(())
    }

    /// Evt15: A-ABORT request by the local user. AA-2 in Sta4, AA-1 in Sta3 and Sta5..Sta12.
    pub fn abort(&mut self, now: Instant) -> Result<(), NotAllowed> {
        match self.state {
            State::Sta4 => self.aa2(),
            State::Sta3
            | State::Sta5
            | State::Sta6
            | State::Sta7
            | State::Sta8
            | State::Sta9
            | State::Sta10
            | State::Sta11
            | State::Sta12 => {
                self.aa1(now, AbortSource::SERVICE_USER, AbortReason::NOT_SPECIFIED);
            }
            _ => return Err(self.not_allowed("A-ABORT request")),
        }
        Ok(())
    }

    // ---- Table 9-10 -------------------------------------------------------------------

    fn event(&mut self, now: Instant, evt: Evt, detail: Detail) {
        use Evt::*;
        use State::*;
        let invalid_reason = match detail {
            Detail::Invalid(r) => Some(r),
            _ => None,
        };
        match (self.state, evt) {
            (Sta1, Evt5TransportIndication) => {
                // AE-5: issue transport connection response, start ARTIM.
                self.state = Sta2;
                self.artim = Some(now + self.timeouts.artim);
            }
            (Sta4, Evt2TransportConfirm) => self.state = Sta5, // AE-2 (request() sends the RQ)
            (Sta2, Evt6AssociateRq) => {
                // AE-6: stop ARTIM, issue A-ASSOCIATE indication. Acceptability is judged by the
                // user (negotiation), which answers with accept (Evt7) or reject (Evt8).
                self.artim = None;
                self.state = Sta3;
            }
            (Sta5, Evt3AssociateAc) => {
                // AE-3: issue A-ASSOCIATE confirmation (accept).
                self.artim = None;
                self.state = Sta6;
                self.events.push_back(Event::Accepted);
            }
            (Sta5, Evt4AssociateRj) => {
                // AE-4: issue A-ASSOCIATE confirmation (reject), close transport.
                if let Detail::Rj(rj) = detail {
                    self.events.push_back(Event::Rejected(rj));
                }
                self.close_and_enter_sta1();
            }
            (
                Sta2,
                Evt3AssociateAc | Evt4AssociateRj | Evt10PData | Evt12ReleaseRq | Evt13ReleaseRp,
            ) => {
                // AA-1: a PDU other than A-ASSOCIATE-RQ while awaiting one.
                self.aa1(
                    now,
                    AbortSource::SERVICE_PROVIDER,
                    AbortReason::UNEXPECTED_PDU,
                );
            }
            (Sta2, Evt19InvalidPdu) => {
                self.aa1(
                    now,
                    AbortSource::SERVICE_PROVIDER,
                    invalid_reason.unwrap_or(AbortReason::NOT_SPECIFIED),
                );
            }
            // AA-2: stop ARTIM, close transport.
            (Sta2 | Sta13, Evt16Abort | Evt18ArtimExpired) => self.aa2(),
            (Sta2, Evt17TransportClosed) | (Sta13, Evt17TransportClosed) => {
                // AA-5 (Sta2) and AR-5 (Sta13): stop ARTIM.
                self.artim = None;
                self.enter_sta1();
            }
            (Sta6, Evt10PData) | (Sta7, Evt10PData) => {} // DT-2 / AR-6: P-DATA indication
            (Sta6, Evt12ReleaseRq) => {
                // AR-2: issue A-RELEASE indication.
                self.state = Sta8;
                self.events.push_back(Event::ReleaseRequested);
            }
            (Sta7, Evt12ReleaseRq) => {
                // AR-8: release collision.
                self.events.push_back(Event::ReleaseRequested);
                self.state = if self.role == Role::Requestor {
                    Sta9
                } else {
                    Sta10
                };
            }
            (Sta7 | Sta11, Evt13ReleaseRp) => {
                // AR-3: issue A-RELEASE confirmation, close transport.
                self.events.push_back(Event::Released);
                self.close_and_enter_sta1();
            }
            (Sta10, Evt13ReleaseRp) => {
                // AR-10: issue A-RELEASE confirmation.
                self.events.push_back(Event::Released);
                self.state = Sta12;
            }
            (
                Sta13,
                Evt3AssociateAc | Evt4AssociateRj | Evt10PData | Evt12ReleaseRq | Evt13ReleaseRp,
            ) => {} // AA-6: ignore
            (Sta13, Evt6AssociateRq | Evt19InvalidPdu) => {
                // AA-7: send A-ABORT PDU.
                let reason = invalid_reason.unwrap_or(AbortReason::UNEXPECTED_PDU);
                self.send(&Pdu::Abort(Abort {
                    source: AbortSource::SERVICE_PROVIDER,
                    reason,
                    reserved: [0; 3],
                }));
            }
            (Sta3 | Sta5 | Sta6 | Sta7 | Sta8 | Sta9 | Sta10 | Sta11 | Sta12, Evt16Abort) => {
                // AA-3: issue A-ABORT (or A-P-ABORT) indication, close transport.
                if let Detail::Abort(a) = detail {
                    self.events.push_back(Event::AbortedByPeer(a));
                }
                self.close_and_enter_sta1();
            }
            (
                Sta3 | Sta5 | Sta6 | Sta7 | Sta8 | Sta9 | Sta10 | Sta11 | Sta12,
                Evt17TransportClosed,
            ) => {
                // AA-4: issue A-P-ABORT indication.
                self.artim = None;
                self.events.push_back(Event::ProviderAbort {
                    sent: None,
                    why: "transport connection closed",
                });
                self.enter_sta1();
            }
            (Sta3 | Sta5 | Sta6 | Sta7 | Sta8 | Sta9 | Sta10 | Sta11 | Sta12, _) => {
                // AA-8: unexpected or invalid PDU. Send A-ABORT (service-provider source), issue
                // A-P-ABORT indication, start ARTIM.
                let reason = invalid_reason.unwrap_or(AbortReason::UNEXPECTED_PDU);
                let sent = self.aa8(now, reason);
                self.events.push_back(Event::ProviderAbort {
                    sent,
                    why: if invalid_reason.is_some() {
                        "invalid PDU"
                    } else {
                        "unexpected PDU"
                    },
                });
            }
            // Sta1 and Sta4 have no transport a PDU could arrive on; the remaining pairs cannot
            // occur (a transport indication on an open transport).
            (Sta1 | Sta4, _) | (Sta2 | Sta13, _) => {}
        }
    }

    /// AA-1: send A-ABORT, (re)start ARTIM → Sta13.
    fn aa1(&mut self, now: Instant, source: AbortSource, reason: AbortReason) -> Abort {
        let a = Abort {
            source,
            reason,
            reserved: [0; 3],
        };
        self.send(&Pdu::Abort(a));
        self.enter_sta13(now);
        a
    }

    /// AA-2: stop ARTIM, close transport → Sta1.
    fn aa2(&mut self) {
        self.artim = None;
        self.close_and_enter_sta1();
    }

    /// AA-8: send A-ABORT (service-provider source), start ARTIM → Sta13.
    fn aa8(&mut self, now: Instant, reason: AbortReason) -> Option<Abort> {
        let a = Abort {
            source: AbortSource::SERVICE_PROVIDER,
            reason,
            reserved: [0; 3],
        };
        self.send(&Pdu::Abort(a));
        self.enter_sta13(now);
        Some(a)
    }

    fn enter_sta13(&mut self, now: Instant) {
        self.state = State::Sta13;
        self.artim = Some(now + self.timeouts.artim);
    }

    fn close_and_enter_sta1(&mut self) {
        self.close = true;
        self.enter_sta1();
    }

    fn enter_sta1(&mut self) {
        self.artim = None;
        self.state = State::Sta1;
        self.events.push_back(Event::Closed);
    }

    fn send(&mut self, pdu: &Pdu<'_>) {
        // Our own PDUs are built from bounded config and negotiation; an encode error would mean
        // a field over 64 KiB, which config validation rules out. Abort rather than send garbage.
        if pdu.encode(&mut self.transmit).is_err() {
            self.close = true;
        }
    }

    fn not_allowed(&self, primitive: &'static str) -> NotAllowed {
        NotAllowed {
            state: self.state,
            primitive,
        }
    }
}

/// What an event carries besides its number.
#[derive(Debug, Clone, Copy)]
enum Detail {
    None,
    Invalid(AbortReason),
    Rj(AssociateRj),
    Abort(Abort),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ul::{decode, AssociateRj, RejectResult, RejectSource};

    fn t0() -> Instant {
        Instant::now()
    }

    fn rq_bytes() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/pynetdicom_associate_rq.bin"
        ))
        .unwrap()
    }

    fn sent(a: &mut Association) -> Vec<Pdu<'static>> {
        let bytes = std::mem::take(a.transmit());
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = 6 + u32::from_be_bytes(rest[2..6].try_into().unwrap()) as usize;
            // Only fixed-size PDUs are inspected here; leak to get 'static views in tests.
            let leaked: &'static [u8] = Box::leak(rest[..n].to_vec().into_boxed_slice());
            out.push(decode(leaked).unwrap());
            rest = &rest[n..];
        }
        out
    }

    fn established(now: Instant) -> Association {
        let mut a = Association::acceptor(now, Timeouts::default());
        let rq = rq_bytes();
        assert!(matches!(
            a.handle_pdu(now, decode(&rq).unwrap()),
            Received::AssociateRq(_)
        ));
        assert_eq!(a.state(), State::Sta3);
        a.accept(now, &[0x02, 0, 0, 0, 0, 0]).unwrap();
        a.transmit().clear();
        assert_eq!(a.state(), State::Sta6);
        a
    }

    fn abort_of(pdus: &[Pdu<'_>]) -> Abort {
        match pdus {
            [Pdu::Abort(a)] => *a,
            other => panic!("expected one A-ABORT, got {other:?}"),
        }
    }

    #[test]
    fn acceptor_release_path() {
        let now = t0();
        let mut a = established(now);
        assert!(matches!(
            a.handle_pdu(now, Pdu::RELEASE_RQ),
            Received::Nothing
        ));
        assert_eq!(a.state(), State::Sta8); // AR-2
        assert_eq!(a.poll_event(), Some(Event::ReleaseRequested));
        // P-DATA may still be sent in Sta8 (AR-7).
        a.send_pdata(|o| o.push(0)).unwrap();
        a.transmit().clear();
        a.release_response(now).unwrap(); // AR-4
        assert_eq!(sent(&mut a), vec![Pdu::RELEASE_RP]);
        assert_eq!(a.state(), State::Sta13);
        a.handle_transport_closed(now); // AR-5
        assert_eq!(a.state(), State::Sta1);
    }

    #[test]
    fn unexpected_pdus_in_sta2_get_a_abort_source_2_reason_2() {
        let now = t0();
        for pdu in [Pdu::RELEASE_RQ, Pdu::RELEASE_RP] {
            let mut a = Association::acceptor(now, Timeouts::default());
            a.handle_pdu(now, pdu);
            let ab = abort_of(&sent(&mut a));
            assert_eq!(ab.source, AbortSource::SERVICE_PROVIDER);
            assert_eq!(ab.reason, AbortReason::UNEXPECTED_PDU);
            assert_eq!(a.state(), State::Sta13); // AA-1
        }
    }

    #[test]
    fn unexpected_pdus_in_sta6_get_aa8() {
        let now = t0();
        let rq = rq_bytes();
        for pdu in [
            decode(&rq).unwrap(),
            Pdu::RELEASE_RP,
            Pdu::AssociateRj(AssociateRj {
                result: RejectResult::PERMANENT,
                source: RejectSource::SERVICE_USER,
                reason: 1,
                reserved: [0; 2],
            }),
        ] {
            let mut a = established(now);
            a.handle_pdu(now, pdu);
            let ab = abort_of(&sent(&mut a));
            assert_eq!(
                (ab.source, ab.reason),
                (AbortSource::SERVICE_PROVIDER, AbortReason::UNEXPECTED_PDU)
            );
            assert_eq!(a.state(), State::Sta13);
            assert!(matches!(
                a.poll_event(),
                Some(Event::ProviderAbort { sent: Some(_), .. })
            ));
        }
    }

    #[test]
    fn invalid_pdu_gets_the_reason_of_its_error() {
        let now = t0();
        let mut a = established(now);
        a.handle_invalid_pdu(now, PduError::UnrecognizedPdu(9));
        assert_eq!(
            abort_of(&sent(&mut a)).reason,
            AbortReason::UNRECOGNIZED_PDU
        );
        let mut a = established(now);
        a.handle_invalid_pdu(
            now,
            PduError::TooLong {
                declared: 1,
                max: 0,
            },
        );
        assert_eq!(
            abort_of(&sent(&mut a)).reason,
            AbortReason::INVALID_PDU_PARAMETER_VALUE
        );
    }

    #[test]
    fn artim_closes_a_silent_connection_and_a_lingering_one() {
        let now = t0();
        let mut a = Association::acceptor(now, Timeouts::default());
        let deadline = a.poll_timeout().unwrap();
        assert_eq!(deadline, now + Duration::from_secs(30));
        a.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(a.state(), State::Sta2);
        a.handle_timeout(deadline); // Evt18, AA-2
        assert_eq!(a.state(), State::Sta1);
        assert!(a.wants_close());
        // After a reject, ARTIM bounds the wait for the peer to close.
        let mut a = Association::acceptor(now, Timeouts::default());
        a.handle_pdu(now, decode(&rq_bytes()).unwrap());
        a.reject(
            now,
            AssociateRj {
                result: RejectResult::PERMANENT,
                source: RejectSource::SERVICE_USER,
                reason: 7,
                reserved: [0; 2],
            },
        )
        .unwrap();
        assert_eq!(a.state(), State::Sta13);
        a.handle_timeout(now + Duration::from_secs(31));
        assert_eq!(a.state(), State::Sta1);
    }

    #[test]
    fn idle_and_dimse_timers_abort_established_associations() {
        let now = t0();
        let mut a = established(now);
        assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(300)));
        a.set_message_in_progress(true);
        assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(60)));
        a.handle_timeout(now + Duration::from_secs(60));
        assert_eq!(
            abort_of(&sent(&mut a)).source,
            AbortSource::SERVICE_PROVIDER
        );
        assert_eq!(a.state(), State::Sta13);
    }

    #[test]
    fn peer_abort_closes_from_any_association_state() {
        let now = t0();
        let ab = Abort {
            source: AbortSource::SERVICE_USER,
            reason: AbortReason::NOT_SPECIFIED,
            reserved: [0; 3],
        };
        let mut a = established(now);
        a.handle_pdu(now, Pdu::Abort(ab)); // AA-3
        assert_eq!(a.state(), State::Sta1);
        assert_eq!(a.poll_event(), Some(Event::AbortedByPeer(ab)));
        assert!(a.transmit().is_empty());
        let mut a = Association::acceptor(now, Timeouts::default());
        a.handle_pdu(now, Pdu::Abort(ab)); // Sta2: AA-2
        assert_eq!(a.state(), State::Sta1);
    }

    #[test]
    fn release_collision_both_sides() {
        let now = t0();
        // Acceptor that requested release, then receives the peer's request: Sta10, Sta12.
        let mut a = established(now);
        a.release_request().unwrap();
        a.transmit().clear();
        a.handle_pdu(now, Pdu::RELEASE_RQ);
        assert_eq!(a.state(), State::Sta10); // AR-8, acceptor
        a.handle_pdu(now, Pdu::RELEASE_RP);
        assert_eq!(a.state(), State::Sta12); // AR-10
        a.release_response(now).unwrap(); // AR-4
        assert_eq!(a.state(), State::Sta13);
        // Requestor: Sta9 → Sta11 → Sta1.
        let mut r = Association::requestor(now, Timeouts::default());
        r.request(now, &Pdu::RELEASE_RQ).unwrap();
        r.transmit().clear();
        assert_eq!(r.state(), State::Sta5);
        r.handle_pdu(
            now,
            decode(
                &std::fs::read(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/vectors/pynetdicom_associate_ac.bin"
                ))
                .unwrap(),
            )
            .unwrap(),
        );
        assert_eq!(r.state(), State::Sta6);
        r.release_request().unwrap();
        r.handle_pdu(now, Pdu::RELEASE_RQ);
        assert_eq!(r.state(), State::Sta9);
        r.release_response(now).unwrap(); // AR-9
        assert_eq!(r.state(), State::Sta11);
        r.handle_pdu(now, Pdu::RELEASE_RP); // AR-3
        assert_eq!(r.state(), State::Sta1);
    }

    /// Issue 11: ARTIM expiring in Sta5 (no A-ASSOCIATE-AC/RJ) sends an A-ABORT, and the event
    /// said none was sent.
    #[test]
    fn artim_in_sta5_reports_the_a_abort_it_sends() {
        let now = t0();
        let mut r = Association::requestor(now, Timeouts::default());
        r.request(now, &Pdu::RELEASE_RQ).unwrap();
        r.transmit().clear();
        assert_eq!(r.state(), State::Sta5);
        let t = r.poll_timeout().unwrap();
        r.handle_timeout(t);
        let ab = abort_of(&sent(&mut r));
        assert_eq!(ab.source, AbortSource::SERVICE_USER);
        assert_eq!(
            r.poll_event(),
            Some(Event::ProviderAbort {
                sent: Some(ab),
                why: "no A-ASSOCIATE response before the ARTIM timeout",
            })
        );
    }

    #[test]
    fn requestor_rejected_and_local_primitives_checked() {
        let now = t0();
        let mut r = Association::requestor(now, Timeouts::default());
        assert!(r.accept(now, &[]).is_err());
        assert!(r.release_request().is_err());
        r.request(now, &Pdu::RELEASE_RQ).unwrap();
        let rj = AssociateRj {
            result: RejectResult::PERMANENT,
            source: RejectSource::SERVICE_USER,
            reason: 7,
            reserved: [0; 2],
        };
        r.handle_pdu(now, Pdu::AssociateRj(rj)); // AE-4
        assert_eq!(r.state(), State::Sta1);
        assert_eq!(r.poll_event(), Some(Event::Rejected(rj)));
        assert!(r.send_pdata(|_| {}).is_err());
    }

    #[test]
    fn sta13_ignores_pdus_and_answers_a_new_request_with_an_abort() {
        let now = t0();
        let mut a = established(now);
        a.abort(now).unwrap(); // AA-1
        assert_eq!(abort_of(&sent(&mut a)).source, AbortSource::SERVICE_USER);
        a.handle_pdu(now, Pdu::RELEASE_RQ); // AA-6
        assert!(a.transmit().is_empty());
        a.handle_pdu(now, decode(&rq_bytes()).unwrap()); // AA-7
        abort_of(&sent(&mut a));
        assert_eq!(a.state(), State::Sta13);
    }

    /// PS3.8 Table 9-10, acceptor side: every reachable acceptor state × every event a peer or
    /// the transport can cause (Evt3, 4, 6, 10, 12, 13, 16, 17, 18, 19), checking the next state
    /// and what is sent (in the style of pynetdicom's test_fsm.py).
    #[test]
    fn table_9_10_acceptor_states_by_events() {
        use State::*;
        #[derive(Debug, PartialEq, Clone, Copy)]
        enum Out {
            Nothing,
            Abort(u8, u8),
        }
        let reach = |s: State, now: Instant| -> Association {
            let mut a = Association::acceptor(now, Timeouts::default());
            let rq = rq_bytes();
            if s != Sta2 {
                a.handle_pdu(now, decode(&rq).unwrap());
            }
            if matches!(s, Sta6 | Sta7 | Sta8 | Sta10 | Sta12 | Sta13) {
                a.accept(now, &[]).unwrap();
            }
            match s {
                Sta7 => a.release_request().unwrap(),
                Sta8 => drop(a.handle_pdu(now, Pdu::RELEASE_RQ)),
                Sta10 | Sta12 => {
                    a.release_request().unwrap();
                    a.handle_pdu(now, Pdu::RELEASE_RQ);
                    if s == Sta12 {
                        a.handle_pdu(now, Pdu::RELEASE_RP);
                    }
                }
                Sta13 => a.abort(now).unwrap(),
                _ => {}
            }
            assert_eq!(a.state(), s, "could not reach {s:?}");
            a.transmit().clear();
            while a.poll_event().is_some() {}
            a
        };
        let states = [Sta2, Sta3, Sta6, Sta7, Sta8, Sta10, Sta12, Sta13];
        let assoc_states = [Sta3, Sta6, Sta7, Sta8, Sta10, Sta12];
        let aa8 = (Sta13, Out::Abort(2, 2));
        // Expected (next state, output) for each event and state.
        let expect = |evt: &str, s: State| -> (State, Out) {
            let in_assoc = assoc_states.contains(&s);
            match (evt, s) {
                // Evt3 / Evt4: A-ASSOCIATE-AC / -RJ received.
                ("ac" | "rj", Sta2) => (Sta13, Out::Abort(2, 2)), // AA-1
                ("ac" | "rj", Sta13) => (Sta13, Out::Nothing),    // AA-6
                ("ac" | "rj", _) => aa8,
                // Evt6: A-ASSOCIATE-RQ received.
                ("rq", Sta2) => (Sta3, Out::Nothing), // AE-6
                ("rq", Sta13) => (Sta13, Out::Abort(2, 2)), // AA-7
                ("rq", _) => aa8,
                // Evt10: P-DATA-TF received.
                ("pdata", Sta2) => (Sta13, Out::Abort(2, 2)),
                ("pdata", Sta6) => (Sta6, Out::Nothing), // DT-2
                ("pdata", Sta7) => (Sta7, Out::Nothing), // AR-6
                ("pdata", Sta13) => (Sta13, Out::Nothing),
                ("pdata", _) => aa8,
                // Evt12: A-RELEASE-RQ received.
                ("relrq", Sta2) => (Sta13, Out::Abort(2, 2)),
                ("relrq", Sta6) => (Sta8, Out::Nothing), // AR-2
                ("relrq", Sta7) => (Sta10, Out::Nothing), // AR-8, acceptor
                ("relrq", Sta13) => (Sta13, Out::Nothing),
                ("relrq", _) => aa8,
                // Evt13: A-RELEASE-RP received.
                ("relrp", Sta2) => (Sta13, Out::Abort(2, 2)),
                ("relrp", Sta7) => (Sta1, Out::Nothing), // AR-3
                ("relrp", Sta10) => (Sta12, Out::Nothing), // AR-10
                ("relrp", Sta13) => (Sta13, Out::Nothing),
                ("relrp", _) => aa8,
                // Evt16, Evt17: A-ABORT received, transport closed (AA-2/3, AA-4/5, AR-5).
                ("abort" | "closed", _) => (Sta1, Out::Nothing),
                // Evt18: ARTIM expired, only running in Sta2 and Sta13 (AA-2).
                ("artim", Sta2 | Sta13) => (Sta1, Out::Nothing),
                ("artim", s) => (s, Out::Nothing),
                // Evt19: invalid PDU (here an unrecognized PDU type).
                ("invalid", Sta13) => (Sta13, Out::Abort(2, 1)), // AA-7
                ("invalid", _) if in_assoc || s == Sta2 => (Sta13, Out::Abort(2, 1)),
                _ => unreachable!(),
            }
        };
        let rq = rq_bytes();
        let ac = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/pynetdicom_associate_ac.bin"
        ))
        .unwrap();
        let pdata = [4u8, 0, 0, 0, 0, 6, 0, 0, 0, 2, 1, 3];
        let rj = AssociateRj {
            result: RejectResult::PERMANENT,
            source: RejectSource::SERVICE_USER,
            reason: 1,
            reserved: [0; 2],
        };
        let mut checked = 0;
        for evt in [
            "ac", "rj", "rq", "pdata", "relrq", "relrp", "abort", "closed", "artim", "invalid",
        ] {
            for &s in &states {
                let now = t0();
                let mut a = reach(s, now);
                match evt {
                    "ac" => drop(a.handle_pdu(now, decode(&ac).unwrap())),
                    "rj" => drop(a.handle_pdu(now, Pdu::AssociateRj(rj))),
                    "rq" => drop(a.handle_pdu(now, decode(&rq).unwrap())),
                    "pdata" => drop(a.handle_pdu(now, decode(&pdata).unwrap())),
                    "relrq" => drop(a.handle_pdu(now, Pdu::RELEASE_RQ)),
                    "relrp" => drop(a.handle_pdu(now, Pdu::RELEASE_RP)),
                    "abort" => drop(a.handle_pdu(
                        now,
                        Pdu::Abort(Abort {
                            source: AbortSource::SERVICE_USER,
                            reason: AbortReason::NOT_SPECIFIED,
                            reserved: [0; 3],
                        }),
                    )),
                    "closed" => a.handle_transport_closed(now),
                    // ARTIM is 30 s; the idle timer (300 s) must not fire in this check.
                    "artim" => a.handle_timeout(now + Duration::from_secs(31)),
                    _ => a.handle_invalid_pdu(now, PduError::UnrecognizedPdu(0x42)),
                }
                let out = match sent(&mut a).as_slice() {
                    [] => Out::Nothing,
                    [Pdu::Abort(ab)] => Out::Abort(ab.source.0, ab.reason.0),
                    other => panic!("{evt} in {s:?} sent {other:?}"),
                };
                assert_eq!((a.state(), out), expect(evt, s), "{evt} in {s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 80);
    }
}
