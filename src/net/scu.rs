//! The requestor side (SCU) over a blocking socket, for `dicomgate echo` and `dicomgate store`
//! and the pipeline's `dicom` exports: the same PDU layer, state machine and DIMSE assembly as
//! the node, driven synchronously. Both senders of Part-10 files (`dicomgate store` and the
//! `dicom` export) go through [`store_files`]: what is proposed, how each file is sent and what
//! its answer was is decided once, here; what a failure means is the caller's. Over TLS (PS3.15 B.12, the profile of [`super::tls`]) the
//! socket is wrapped in a `rustls::StreamOwned` ([`Transport`]) and the handshake completed
//! before the A-ASSOCIATE-RQ, so a refused certificate is reported as such.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::assoc::{Association, Event, Received, Timeouts};
use crate::dicom::implementation::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::dicom::part10::InstanceFile;
use crate::dicom::sop_class::{PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, VERIFICATION};
use crate::dicom::transfer_syntax::{self, DatasetEncoding};
use crate::dicom::uid::without_nul_pad;
use crate::dimse::command::{self, command_field, CommandSet};
use crate::dimse::{message, Assembler, Message};
use crate::ul::{
    self, ae_title_field, Associate, Item, PcResult, Pdu, PresentationContextRq, SubItem,
    DICOM_APPLICATION_CONTEXT,
};

/// The responses we wait for (C-STORE-RSP, C-ECHO-RSP) carry no data set; a peer that sends one
/// anyway gets this much buffered at most before the association is aborted (commands are
/// bounded by the assembler's own 64 KiB).
const MAX_RESPONSE_DATA_SET: usize = 1 << 20;

/// What can go wrong on the requestor side.
#[derive(Debug)]
pub enum ScuError {
    Io(io::Error),
    Rejected(ul::AssociateRj),
    Aborted(String),
    Protocol(String),
    NoContext(String),
    /// The TLS handshake failed (a certificate refused either way, no common suite, ...).
    Tls(String),
    /// We refused to go on: a request we will not send, or answers beyond our bounds.
    Refused(String),
}

/// What a C-FIND returned ([`Client::find_studies`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FindOutcome {
    /// The final response's status (0x0000: every match was sent).
    pub status: u16,
    pub matches: Vec<crate::dimse::query::StudyMatch>,
    /// Why each response identifier left out was.
    pub refused: Vec<String>,
}

/// The final response of a C-MOVE ([`Client::move_study`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOutcome {
    /// 0x0000 all sub-operations completed; 0xB000 some failed or warned; 0xA7xx, 0xA8xx,
    /// 0xCxxx failed; 0xFE00 cancelled (PS3.4 C.4.2.1.5).
    pub status: u16,
    pub remaining: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
    pub comment: Option<String>,
}

impl std::fmt::Display for ScuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScuError::Io(e) => write!(f, "I/O error: {e}"),
            ScuError::Rejected(rj) => write!(
                f,
                "association {}",
                crate::ul::describe_reject(rj.result.0, rj.source.0, rj.reason)
            ),
            ScuError::Aborted(w) => write!(f, "association aborted: {w}"),
            ScuError::Protocol(w) => write!(f, "protocol error: {w}"),
            ScuError::NoContext(w) => write!(f, "no accepted presentation context for {w}"),
            ScuError::Tls(w) => write!(f, "TLS: {w}"),
            ScuError::Refused(w) => write!(f, "refused: {w}"),
        }
    }
}

impl std::error::Error for ScuError {}

impl From<io::Error> for ScuError {
    fn from(e: io::Error) -> Self {
        ScuError::Io(e)
    }
}

/// Presentation contexts proposed in one A-ASSOCIATE-RQ at most: IDs are the odd numbers 1..255
/// (PS3.8 §9.3.2.2).
pub const MAX_PROPOSALS: usize = 128;

/// The peer's answer to one file of [`store_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Sent; the C-STORE-RSP's Status and Error Comment (PS3.4 B.2.3).
    Answered {
        status: u16,
        comment: Option<String>,
    },
    /// Not sent: the peer accepted no presentation context for its SOP class in its transfer
    /// syntax (the text names both).
    NotAccepted(String),
}

/// Why [`store_files`] stopped before every file was answered and every association released.
#[derive(Debug)]
pub enum StoreFilesError<E> {
    /// Associating, a C-STORE or the wait for its response failed.
    Scu(ScuError),
    /// Every file of an association was answered, but its A-RELEASE failed.
    Release(ScuError),
    /// The caller's `read` or `outcome` failed; the association (if any) was aborted.
    Caller(E),
}

/// Sends Part-10 files to the peer at `address` (HOST:PORT; over TLS when `opts.tls` is set),
/// each in its own transfer syntax: one presentation context per (SOP class, transfer syntax)
/// the files need, each proposing that one transfer syntax, [`MAX_PROPOSALS`] per association
/// (more need further associations, one after another, each released when its files are
/// answered).
///
/// `read` is called twice per file: once to plan the proposals, and again when the file's turn
/// comes, so one file is in memory at a time; `Ok(None)` leaves a file out (the caller says
/// why). `outcome` hears each file's answer, in the order sent; an `Err` from either ends the
/// send: the association is aborted and the error returned as [`StoreFilesError::Caller`].
/// Which statuses count as stored is the caller's to say (PS3.4 B.2.3: 0x0000 success,
/// 0xB000, 0xB006, 0xB007 warnings).
pub fn store_files<T, E>(
    address: &str,
    opts: &ScuOptions,
    files: &[T],
    mut read: impl FnMut(&T) -> Result<Option<InstanceFile>, E>,
    mut outcome: impl FnMut(&T, &InstanceFile, StoreOutcome) -> Result<(), E>,
) -> Result<(), StoreFilesError<E>> {
    let mut by_context: BTreeMap<(String, String), Vec<&T>> = BTreeMap::new();
    for f in files {
        if let Some(p) = read(f).map_err(StoreFilesError::Caller)? {
            by_context
                .entry((p.sop_class_uid, p.transfer_syntax_uid))
                .or_default()
                .push(f);
        }
    }
    let by_context: Vec<_> = by_context.into_iter().collect();
    for chunk in by_context.chunks(MAX_PROPOSALS) {
        let proposals: Vec<Proposal> = chunk
            .iter()
            .map(|((sop_class, ts), _)| Proposal {
                abstract_syntax: sop_class.clone(),
                transfer_syntaxes: vec![ts.clone()],
            })
            .collect();
        let mut client = Client::open(address, opts, &proposals).map_err(StoreFilesError::Scu)?;
        for &f in chunk.iter().flat_map(|(_, files)| files) {
            let sent = match read(f) {
                Err(e) => Err(StoreFilesError::Caller(e)),
                // Gone or changed since it was planned: left out, as at planning.
                Ok(None) => continue,
                Ok(Some(p)) => match client.store(
                    &p.sop_class_uid,
                    &p.sop_instance_uid,
                    &p.transfer_syntax_uid,
                    p.data_set(),
                ) {
                    Ok((status, comment)) => {
                        outcome(f, &p, StoreOutcome::Answered { status, comment })
                            .map_err(StoreFilesError::Caller)
                    }
                    Err(ScuError::NoContext(w)) => outcome(f, &p, StoreOutcome::NotAccepted(w))
                        .map_err(StoreFilesError::Caller),
                    Err(e) => Err(StoreFilesError::Scu(e)),
                },
            };
            if let Err(e) = sent {
                let _ = client.abort();
                return Err(e);
            }
        }
        client.release().map_err(StoreFilesError::Release)?;
    }
    Ok(())
}

/// A proposed presentation context: abstract syntax and transfer syntaxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ScuOptions {
    pub calling_ae: String,
    pub called_ae: String,
    pub max_pdu_length: u32,
    pub timeout: Duration,
    /// DICOM over TLS with this configuration ([`super::tls::client_config`]); `None` = plain
    /// TCP. Only [`Client::open`] uses it.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for ScuOptions {
    fn default() -> Self {
        ScuOptions {
            calling_ae: "DICOMGATE-SCU".into(),
            called_ae: "DICOMGATE".into(),
            max_pdu_length: 65_536,
            timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// The byte stream of a [`Client`] made by [`Client::open`]: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// The host part of HOST:PORT (`[v6]:port` without its brackets).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// An accepted context: (ID, abstract syntax, transfer syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// An established association as requestor, over a TCP socket or (in the simulator tests) any
/// blocking byte stream.
#[derive(Debug)]
pub struct Client<S = TcpStream> {
    stream: S,
    assoc: Association,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    assembler: Assembler,
    pub contexts: Vec<Context>,
    pub peer_max_pdu: u32,
    max_pdu: u32,
    message_id: u16,
    /// Operations we may have outstanding at once (PS3.7 D.3.3.3): 1 unless an asynchronous
    /// operations window was proposed and granted.
    pub operations_window: u16,
}

impl Client {
    /// Connects and negotiates; at most 128 proposals.
    pub fn connect(
        addr: impl ToSocketAddrs,
        opts: &ScuOptions,
        proposals: &[Proposal],
    ) -> Result<Client, ScuError> {
        Self::connect_windowed(addr, opts, proposals, 1)
    }

    /// As [`Client::connect`], proposing an asynchronous operations window of `window`
    /// outstanding operations we invoke (PS3.7 D.3.3.3; not proposed when 1). The granted size
    /// is in [`Client::operations_window`]: 1 when the acceptor ignores the proposal, as
    /// PS3.7 allows.
    pub fn connect_windowed(
        addr: impl ToSocketAddrs,
        opts: &ScuOptions,
        proposals: &[Proposal],
        window: u16,
    ) -> Result<Client, ScuError> {
        if opts.tls.is_some() {
            // Plain TCP only: a caller that set TLS must not get cleartext (Client::open).
            return Err(ScuError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is set: connect with Client::open",
            )));
        }
        let addr: SocketAddr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let stream = TcpStream::connect_timeout(&addr, opts.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.timeout))?;
        Client::handshake(stream, opts, proposals, window)
    }
}

impl Client<Transport> {
    /// Connects to HOST:PORT, over TLS when `opts.tls` is set (the server's certificate must
    /// chain to the configured CA and name HOST, an IP address or a DNS name), and negotiates.
    pub fn open(
        address: &str,
        opts: &ScuOptions,
        proposals: &[Proposal],
    ) -> Result<Client<Transport>, ScuError> {
        let addr: SocketAddr = address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let mut stream = TcpStream::connect_timeout(&addr, opts.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.timeout))?;
        stream.set_write_timeout(Some(opts.timeout))?;
        let transport = match &opts.tls {
            None => Transport::Plain(stream),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host_of(address).to_string())
                    .map_err(|e| ScuError::Tls(format!("{address}: not a server name ({e})")))?;
                let mut conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| ScuError::Tls(e.to_string()))?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut stream).map_err(|e| {
                        ScuError::Tls(format!("handshake with {address} failed: {e}"))
                    })?;
                }
                Transport::Tls(Box::new(rustls::StreamOwned::new(conn, stream)))
            }
        };
        Client::handshake(transport, opts, proposals, 1)
    }
}

impl<S: Read + Write> Client<S> {
    /// Negotiates over an already connected byte stream (what [`Client::connect_windowed`] does
    /// after connecting; the simulator tests pass an in-memory stream).
    pub fn handshake(
        stream: S,
        opts: &ScuOptions,
        proposals: &[Proposal],
        window: u16,
    ) -> Result<Client<S>, ScuError> {
        let now = Instant::now();
        let timeouts = Timeouts {
            artim: opts.timeout,
            idle: None,
            dimse: None,
        };
        let mut c = Client {
            stream,
            assoc: Association::requestor(now, timeouts),
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            assembler: Assembler::new(MAX_RESPONSE_DATA_SET),
            contexts: Vec::new(),
            peer_max_pdu: 0,
            max_pdu: opts.max_pdu_length,
            message_id: 0,
            operations_window: 1,
        };
        let items = proposals
            .iter()
            .take(MAX_PROPOSALS)
            .enumerate()
            .map(|(i, p)| {
                Item::PresentationContextRq(PresentationContextRq {
                    field: &[],
                    id: (2 * i + 1) as u8,
                    reserved: [0; 3],
                    abstract_syntax: p.abstract_syntax.as_bytes(),
                    transfer_syntaxes: p.transfer_syntaxes.iter().map(|t| t.as_bytes()).collect(),
                })
            });
        let mut all = vec![Item::ApplicationContext(DICOM_APPLICATION_CONTEXT)];
        all.extend(items);
        let mut user = vec![
            SubItem::MaximumLength(opts.max_pdu_length),
            SubItem::ImplementationClassUid(IMPLEMENTATION_CLASS_UID.as_bytes()),
        ];
        if window > 1 {
            // PS3.7 D.3.3.3: we invoke up to `window`, and perform none of the peer's.
            user.push(SubItem::AsynchronousOperationsWindow {
                max_invoked: window,
                max_performed: 1,
            });
        }
        user.push(SubItem::ImplementationVersionName(
            IMPLEMENTATION_VERSION_NAME.as_bytes(),
        ));
        all.push(Item::UserInformation(user));
        let rq = Pdu::AssociateRq(Associate {
            protocol_version: 1,
            called_ae: ae_title_field(&opts.called_ae),
            calling_ae: ae_title_field(&opts.calling_ae),
            items: all,
            reserved: Default::default(),
        });
        c.assoc
            .request(now, &rq)
            .map_err(|e| ScuError::Protocol(e.to_string()))?;
        c.flush()?;
        loop {
            let n = c.next_pdu(opts.max_pdu_length.max(1 << 20))?;
            let pdu =
                ul::decode(&c.buf[n.0..n.1]).map_err(|e| ScuError::Protocol(e.to_string()))?;
            match c.assoc.handle_pdu(Instant::now(), pdu) {
                Received::AssociateAc(ac_pdu) => {
                    c.peer_max_pdu = ac_pdu.maximum_length().unwrap_or(0);
                    for sub in ac_pdu.user_information() {
                        if let SubItem::AsynchronousOperationsWindow { max_invoked, .. } = sub {
                            // 0 = unlimited (PS3.7 D.3.3.3.1): bounded by what we proposed.
                            c.operations_window = match *max_invoked {
                                0 => window,
                                n => n.min(window),
                            }
                            .max(1);
                        }
                    }
                    for pc in ac_pdu.presentation_contexts_ac() {
                        if pc.result != PcResult::ACCEPTANCE {
                            continue;
                        }
                        let idx = (pc.id as usize).saturating_sub(1) / 2;
                        if let (Some(p), Some(ts)) = (proposals.get(idx), pc.transfer_syntax) {
                            c.contexts.push(Context {
                                id: pc.id,
                                abstract_syntax: p.abstract_syntax.clone(),
                                transfer_syntax: String::from_utf8_lossy(without_nul_pad(ts))
                                    .into_owned(),
                            });
                        }
                    }
                    c.flush()?;
                    return Ok(c);
                }
                _ => {
                    c.flush()?;
                    c.check_events()?;
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let out = self.assoc.transmit();
        self.stream.write_all(out)?;
        out.clear();
        Ok(())
    }

    /// Reads until one whole PDU is buffered; returns its byte range.
    fn next_pdu(&mut self, max: u32) -> Result<(usize, usize), ScuError> {
        loop {
            match ul::deframe(&self.buf[self.start..self.end], max) {
                Ok(ul::Status::Complete(n)) => {
                    let r = (self.start, self.start + n);
                    self.start += n;
                    return Ok(r);
                }
                Ok(ul::Status::Partial { needed }) => {
                    if self.start > 0 {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    if let Some(n) = needed {
                        if n > self.buf.len() {
                            self.buf.resize(n, 0);
                        }
                    }
                    if self.end == self.buf.len() {
                        self.buf.resize(self.buf.len() * 2, 0);
                    }
                    let n = self.stream.read(&mut self.buf[self.end..])?;
                    if n == 0 {
                        self.assoc.handle_transport_closed(Instant::now());
                        return Err(ScuError::Aborted("peer closed the connection".into()));
                    }
                    self.end += n;
                }
                Err(e) => {
                    self.assoc.handle_invalid_pdu(Instant::now(), e);
                    let _ = self.flush();
                    return Err(ScuError::Protocol(e.to_string()));
                }
            }
        }
    }

    fn check_events(&mut self) -> Result<(), ScuError> {
        while let Some(ev) = self.assoc.poll_event() {
            match ev {
                Event::Rejected(rj) => return Err(ScuError::Rejected(rj)),
                Event::AbortedByPeer(a) => {
                    return Err(ScuError::Aborted(format!(
                        "by the peer, {}",
                        crate::ul::describe_abort(a.source.0, a.reason.0)
                    )))
                }
                Event::ProviderAbort { why, .. } => return Err(ScuError::Aborted(why.into())),
                _ => {}
            }
        }
        Ok(())
    }

    /// Waits for the next complete DIMSE message.
    fn receive_message(&mut self) -> Result<Message, ScuError> {
        loop {
            let r = self.next_pdu(self.max_pdu)?;
            let buf = std::mem::take(&mut self.buf);
            let result = (|| {
                let pdu =
                    ul::decode(&buf[r.0..r.1]).map_err(|e| ScuError::Protocol(e.to_string()))?;
                let mut msg = None;
                if let Received::Data(p) = self.assoc.handle_pdu(Instant::now(), pdu) {
                    let ids: Vec<u8> = self.contexts.iter().map(|c| c.id).collect();
                    for pdv in p.pdvs() {
                        match self.assembler.push(pdv, |id| ids.contains(&id)) {
                            Ok(Some(m)) => msg = Some(m),
                            Ok(None) => {}
                            Err(e) => return Err(ScuError::Protocol(e.to_string())),
                        }
                    }
                }
                Ok(msg)
            })();
            self.buf = buf;
            self.flush()?;
            self.check_events()?;
            if let Some(m) = result? {
                return Ok(m);
            }
        }
    }

    fn next_message_id(&mut self) -> u16 {
        self.message_id = self.message_id.wrapping_add(1);
        self.message_id
    }

    /// C-ECHO; returns the status.
    pub fn echo(&mut self) -> Result<u16, ScuError> {
        let pc = self
            .contexts
            .iter()
            .find(|c| c.abstract_syntax == VERIFICATION)
            .map(|c| c.id)
            .ok_or_else(|| ScuError::NoContext("Verification".into()))?;
        let rq = CommandSet {
            command_field: command_field::C_ECHO_RQ,
            message_id: Some(self.next_message_id()),
            affected_sop_class_uid: Some(VERIFICATION.as_bytes().to_vec()),
            command_data_set_type: command::NO_DATA_SET,
            ..Default::default()
        };
        self.send_command(pc, &rq, None)?;
        let rsp = self.receive_message()?;
        Ok(rsp.command.status.unwrap_or(0xFFFF))
    }

    /// C-STORE of one data set on a context accepted for its SOP class and transfer syntax;
    /// returns the status and error comment.
    pub fn store(
        &mut self,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax_uid: &str,
        data_set: &[u8],
    ) -> Result<(u16, Option<String>), ScuError> {
        self.send_store(
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid,
            data_set,
        )?;
        let (_, status, comment) = self.receive_response()?;
        Ok((status, comment))
    }

    /// Sends a C-STORE-RQ without waiting for its response; returns its Message ID. With an
    /// operations window, up to [`Client::operations_window`] may be outstanding.
    pub fn send_store(
        &mut self,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax_uid: &str,
        data_set: &[u8],
    ) -> Result<u16, ScuError> {
        let pc = self
            .contexts
            .iter()
            .find(|c| {
                c.abstract_syntax == sop_class_uid && c.transfer_syntax == transfer_syntax_uid
            })
            .map(|c| c.id)
            .ok_or_else(|| {
                ScuError::NoContext(format!("{sop_class_uid} in {transfer_syntax_uid}"))
            })?;
        let message_id = self.next_message_id();
        let rq = CommandSet {
            command_field: command_field::C_STORE_RQ,
            message_id: Some(message_id),
            affected_sop_class_uid: Some(sop_class_uid.as_bytes().to_vec()),
            affected_sop_instance_uid: Some(sop_instance_uid.as_bytes().to_vec()),
            priority: Some(0),
            command_data_set_type: 0x0000,
            ..Default::default()
        };
        self.send_command(pc, &rq, Some(data_set))?;
        Ok(message_id)
    }

    /// Waits for the next response; returns the Message ID it answers, its status and its error
    /// comment.
    pub fn receive_response(&mut self) -> Result<(u16, u16, Option<String>), ScuError> {
        let rsp = self.receive_message()?;
        let comment = rsp
            .command
            .error_comment
            .map(|c| String::from_utf8_lossy(&c).into_owned());
        Ok((
            rsp.command.message_id_being_responded_to.unwrap_or(0),
            rsp.command.status.unwrap_or(0xFFFF),
            comment,
        ))
    }

    fn send_command(
        &mut self,
        pc: u8,
        rq: &CommandSet,
        data: Option<&[u8]>,
    ) -> Result<(), ScuError> {
        let mut cmd = Vec::with_capacity(256);
        command::encode(rq, &mut cmd);
        let max = self.peer_max_pdu;
        self.assoc
            .send_pdata(|out| {
                message::fragment(out, pc, true, &cmd, max);
                if let Some(d) = data {
                    message::fragment(out, pc, false, d, max);
                }
            })
            .map_err(|e| ScuError::Protocol(e.to_string()))?;
        self.flush()?;
        Ok(())
    }

    /// Past `deadline`: the association is aborted and `what` fails.
    fn within(&mut self, deadline: Option<Instant>, what: &str) -> Result<(), ScuError> {
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = self.assoc.abort(Instant::now());
            let _ = self.flush();
            return Err(ScuError::Refused(format!(
                "{what}: deadline passed; association aborted"
            )));
        }
        Ok(())
    }

    /// The context accepted for `abstract_syntax` and the encoding of its data sets.
    fn context_for(&self, abstract_syntax: &str) -> Result<(u8, DatasetEncoding), ScuError> {
        self.contexts
            .iter()
            .find(|c| c.abstract_syntax == abstract_syntax)
            .and_then(|c| {
                let ts = transfer_syntax::by_uid(c.transfer_syntax.as_bytes())?;
                Some((c.id, ts.encoding))
            })
            .ok_or_else(|| ScuError::NoContext(abstract_syntax.into()))
    }

    /// The next message, which must answer `message_id`; anything else aborts the association
    /// (PS3.7 §9.3: a response names its request).
    fn response_to(&mut self, message_id: u16) -> Result<Message, ScuError> {
        let m = self.receive_message()?;
        if m.command.message_id_being_responded_to != Some(message_id) {
            let _ = self.assoc.abort(Instant::now());
            let _ = self.flush();
            return Err(ScuError::Protocol(format!(
                "a response to message {:?} while message {message_id} was outstanding",
                m.command.message_id_being_responded_to
            )));
        }
        Ok(m)
    }

    /// C-FIND in the Patient Root Query/Retrieve Information Model at STUDY level (PS3.4
    /// C.4.1): the studies of `q`'s patient. At most `max_matches` pending responses are taken:
    /// one more and the association is aborted and the query fails (a peer that answers
    /// without end, or with everything it has, is cut off). A response identifier that cannot
    /// be read, names another patient or lacks a valid Study Instance UID is left out, with its
    /// reason in [`FindOutcome::refused`]. Each response is bounded in size by the requestor's
    /// assembler (1 MiB) and in time by the socket timeout; past `deadline` (checked at each
    /// response) the association is aborted and the query fails.
    pub fn find_studies(
        &mut self,
        q: &crate::dimse::query::StudyQuery,
        max_matches: usize,
        deadline: Option<Instant>,
    ) -> Result<FindOutcome, ScuError> {
        use crate::dimse::query;
        let (pc, enc) = self.context_for(PATIENT_ROOT_FIND)?;
        let identifier =
            query::study_find_identifier(q, enc).map_err(|e| ScuError::Refused(e.to_string()))?;
        let message_id = self.next_message_id();
        let rq = CommandSet {
            command_field: command_field::C_FIND_RQ,
            message_id: Some(message_id),
            affected_sop_class_uid: Some(PATIENT_ROOT_FIND.as_bytes().to_vec()),
            priority: Some(0),
            command_data_set_type: 0x0000,
            ..Default::default()
        };
        self.send_command(pc, &rq, Some(&identifier))?;
        let mut out = FindOutcome::default();
        let mut pending = 0usize;
        loop {
            let m = self.response_to(message_id)?;
            self.within(deadline, "C-FIND")?;
            let status = m.command.status.unwrap_or(0xFFFF);
            match status {
                // Pending (PS3.4 C.4.1.1.4): one match each.
                0xFF00 | 0xFF01 => {
                    pending += 1;
                    if pending > max_matches {
                        let _ = self.assoc.abort(Instant::now());
                        let _ = self.flush();
                        return Err(ScuError::Refused(format!(
                            "C-FIND: more than {max_matches} matches; association aborted"
                        )));
                    }
                    match m.data_set.as_deref() {
                        None => out
                            .refused
                            .push("a pending response without an identifier".into()),
                        Some(ds) => match query::read_study_match(ds, enc, &q.patient_id) {
                            Ok(s)
                                if out
                                    .matches
                                    .iter()
                                    .any(|x| x.study_instance_uid == s.study_instance_uid) =>
                            {
                                out.refused
                                    .push(format!("study {} named twice", s.study_instance_uid));
                            }
                            Ok(s) => out.matches.push(s),
                            Err(e) => out.refused.push(e.to_string()),
                        },
                    }
                }
                _ => {
                    out.status = status;
                    return Ok(out);
                }
            }
        }
    }

    /// C-MOVE of one study to `destination` (an AE title the peer knows the address of: PS3.4
    /// C.4.2), in the Patient Root model. Waits for the final response and returns its status
    /// and sub-operation counts (a final response may leave them out, PS3.4 C.4.2.1.6: then
    /// the last pending response's are taken, its remaining ones counted as completed); at most
    /// 65,536 pending responses are taken (the counts are 16-bit), more abort the association,
    /// as does passing `deadline`.
    pub fn move_study(
        &mut self,
        destination: &str,
        patient_id: &str,
        study_instance_uid: &str,
        deadline: Option<Instant>,
    ) -> Result<MoveOutcome, ScuError> {
        use crate::dimse::query;
        let (pc, enc) = self.context_for(PATIENT_ROOT_MOVE)?;
        let identifier = query::study_move_identifier(patient_id, study_instance_uid, enc)
            .map_err(|e| ScuError::Refused(e.to_string()))?;
        let message_id = self.next_message_id();
        let rq = CommandSet {
            command_field: command_field::C_MOVE_RQ,
            message_id: Some(message_id),
            affected_sop_class_uid: Some(PATIENT_ROOT_MOVE.as_bytes().to_vec()),
            priority: Some(0),
            command_data_set_type: 0x0000,
            retrieve: Some(Box::new(command::Retrieve {
                move_destination: Some(destination.trim().as_bytes().to_vec()),
                ..Default::default()
            })),
            ..Default::default()
        };
        self.send_command(pc, &rq, Some(&identifier))?;
        let mut pending = 0usize;
        let mut last_pending = [None; 4];
        loop {
            let m = self.response_to(message_id)?;
            self.within(deadline, "C-MOVE")?;
            let status = m.command.status.unwrap_or(0xFFFF);
            let counts = m
                .command
                .retrieve
                .as_ref()
                .map_or([None; 4], |r| r.suboperations);
            if status == 0xFF00 {
                last_pending = counts;
                pending += 1;
                if pending > 65_536 {
                    let _ = self.assoc.abort(Instant::now());
                    let _ = self.flush();
                    return Err(ScuError::Refused(
                        "C-MOVE: more than 65,536 pending responses; association aborted".into(),
                    ));
                }
                continue;
            }
            let [remaining, completed, failed, warning] = if counts.iter().any(Option::is_some) {
                counts
            } else {
                let [r, c, f, w] = last_pending;
                [
                    Some(0),
                    Some(c.unwrap_or(0).saturating_add(r.unwrap_or(0))),
                    f,
                    w,
                ]
            };
            return Ok(MoveOutcome {
                status,
                remaining: remaining.unwrap_or(0),
                completed: completed.unwrap_or(0),
                failed: failed.unwrap_or(0),
                warning: warning.unwrap_or(0),
                comment: m
                    .command
                    .error_comment
                    .map(|c| String::from_utf8_lossy(&c).into_owned()),
            });
        }
    }

    /// A-RELEASE and wait for the reply.
    pub fn release(mut self) -> Result<(), ScuError> {
        self.assoc
            .release_request()
            .map_err(|e| ScuError::Protocol(e.to_string()))?;
        self.flush()?;
        loop {
            let r = self.next_pdu(self.max_pdu)?;
            let pdu =
                ul::decode(&self.buf[r.0..r.1]).map_err(|e| ScuError::Protocol(e.to_string()))?;
            self.assoc.handle_pdu(Instant::now(), pdu);
            self.flush()?;
            while let Some(ev) = self.assoc.poll_event() {
                match ev {
                    Event::Released => return Ok(()),
                    Event::AbortedByPeer(_) | Event::ProviderAbort { .. } => {
                        return Err(ScuError::Aborted("during release".into()))
                    }
                    _ => {}
                }
            }
        }
    }

    /// A-ABORT and close.
    pub fn abort(mut self) -> Result<(), ScuError> {
        let _ = self.assoc.abort(Instant::now());
        self.flush()?;
        Ok(())
    }

    /// Raw access for tests: the socket.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }
}
