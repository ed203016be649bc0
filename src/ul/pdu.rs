//! The seven PDUs of PS3.8 §9.3 and every A-ASSOCIATE item and user-information sub-item of
//! PS3.8 Annex D and PS3.7 Annex D.3.3, as views borrowing from the received bytes.
//!
//! Decoding allocates only for the lists inside an A-ASSOCIATE PDU (presentation contexts, transfer
//! syntaxes, sub-items), each entry at least 4 bytes of input, so allocation is bounded by the PDU's
//! length and never by a declared count. A P-DATA-TF is validated in place and its PDVs are
//! iterated without allocation. Reserved fields are "sent with a value 00H but not tested to
//! this value when received" (PS3.8 §9.3.1): decoding does not test them and keeps them as
//! received; a PDU we build has them zero (`Default`).
//!
//! Decode → encode is byte-exact for every PDU [`decode`] accepts: everything a PDU holds is
//! either kept (the reserved fields of every PDU, item and sub-item; unknown items, unknown
//! user-information sub-items, PS3.7 D.3.3; the bytes a rejected presentation context carries,
//! which are not significant; the reserved tail of a SOP class common extended negotiation
//! sub-item) or refused (a presentation context item whose variable field is not what PS3.8
//! §9.3.2.2 and §9.3.3.2 say it consists of). `fuzzing::pdu_decode` checks this on every input
//! it decodes.

use super::codec::{EncodeError, LengthPrefix, Reader};
use super::codes::{
    item_type, AbortReason, AbortSource, PcResult, PduType, RejectResult, RejectSource,
};

/// Length of the PDU header: type (1), reserved (1), length (4). PS3.8 §9.3.1.
pub const PDU_HEADER_LEN: usize = 6;

/// Why received bytes are not a valid PDU. Each maps to the A-ABORT reason the acceptor sends
/// (PS3.8 §9.3.8, Table 9-26), see [`PduError::abort_reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduError {
    /// The PDU type is none of the seven (reason 1, unrecognized-PDU).
    UnrecognizedPdu(u8),
    /// A length field runs past its parent, or a fixed-size field is short (reason 6).
    Truncated(&'static str),
    /// A field's value is not one the standard allows (reason 6).
    InvalidValue(&'static str),
    /// A mandatory parameter is missing or appears where it may not (reason 5).
    UnexpectedParameter(&'static str),
    /// The declared PDU length is above what we accept in this state (reason 6).
    TooLong { declared: u32, max: u32 },
}

impl PduError {
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            PduError::UnrecognizedPdu(_) => AbortReason::UNRECOGNIZED_PDU,
            PduError::UnexpectedParameter(_) => AbortReason::UNEXPECTED_PDU_PARAMETER,
            PduError::Truncated(_) | PduError::InvalidValue(_) | PduError::TooLong { .. } => {
                AbortReason::INVALID_PDU_PARAMETER_VALUE
            }
        }
    }
}

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PduError::UnrecognizedPdu(t) => write!(f, "unrecognized PDU type 0x{t:02x}"),
            PduError::Truncated(what) => write!(f, "truncated {what}"),
            PduError::InvalidValue(what) => write!(f, "invalid {what}"),
            PduError::UnexpectedParameter(what) => write!(f, "unexpected or missing {what}"),
            PduError::TooLong { declared, max } => {
                write!(f, "PDU length {declared} above the maximum {max}")
            }
        }
    }
}

impl std::error::Error for PduError {}

/// One decoded PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu<'a> {
    AssociateRq(Associate<'a>),
    AssociateAc(Associate<'a>),
    AssociateRj(AssociateRj),
    PDataTf(PDataTf<'a>),
    ReleaseRq(Release),
    ReleaseRp(Release),
    Abort(Abort),
}

impl Pdu<'static> {
    /// An A-RELEASE-RQ as we send it (reserved fields 00H).
    pub const RELEASE_RQ: Pdu<'static> = Pdu::ReleaseRq(Release::ZERO);
    /// An A-RELEASE-RP as we send it (reserved fields 00H).
    pub const RELEASE_RP: Pdu<'static> = Pdu::ReleaseRp(Release::ZERO);
}

impl Pdu<'_> {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::AssociateRq(_) => PduType::A_ASSOCIATE_RQ,
            Pdu::AssociateAc(_) => PduType::A_ASSOCIATE_AC,
            Pdu::AssociateRj(_) => PduType::A_ASSOCIATE_RJ,
            Pdu::PDataTf(_) => PduType::P_DATA_TF,
            Pdu::ReleaseRq(_) => PduType::A_RELEASE_RQ,
            Pdu::ReleaseRp(_) => PduType::A_RELEASE_RP,
            Pdu::Abort(_) => PduType::A_ABORT,
        }
    }
}

/// The body shared by A-ASSOCIATE-RQ (PS3.8 §9.3.2) and A-ASSOCIATE-AC (§9.3.3). In an AC the AE
/// title fields are reserved and carry the RQ's values back; they are not tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Associate<'a> {
    pub protocol_version: u16,
    pub called_ae: [u8; 16],
    pub calling_ae: [u8; 16],
    /// Variable items in the order received; unknown item types are kept as [`Item::Unknown`] so
    /// that a decode-encode round trip is byte-exact, and ignored by negotiation (PS3.8 §9.3.1).
    pub items: Vec<Item<'a>>,
    /// The reserved fields, as received (zero when we build one).
    pub reserved: AssociateReserved<'a>,
}

/// The reserved fields of an A-ASSOCIATE-RQ or -AC (PS3.8 Tables 9-11 and 9-17: sent as 00H,
/// not tested), as received, so that re-encoding is byte-exact; all 00H ([`Default`]) in one we
/// build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AssociateReserved<'a> {
    /// Byte 2, the PDU header's.
    pub header: u8,
    /// Bytes 9-10, after the protocol version.
    pub after_version: [u8; 2],
    /// Bytes 43-74.
    pub tail: [u8; 32],
    /// The variable items as received (bytes 75 on) when a reserved byte of an item header or of
    /// a user information sub-item header in them is not 00H: re-encoded as received, as a
    /// presentation context's `field` is (negotiation reads [`Associate::items`], never this).
    /// Empty otherwise, and in one we build. Whoever changes the items of a decoded PDU empties
    /// it.
    pub items: &'a [u8],
}

/// A-ASSOCIATE variable item, PS3.8 §9.3.2.1 .. §9.3.3.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    ApplicationContext(&'a [u8]),
    PresentationContextRq(PresentationContextRq<'a>),
    PresentationContextAc(PresentationContextAc<'a>),
    UserInformation(Vec<SubItem<'a>>),
    Unknown { item_type: u8, data: &'a [u8] },
}

/// Presentation context item of an A-ASSOCIATE-RQ, PS3.8 §9.3.2.2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentationContextRq<'a> {
    pub id: u8,
    /// The three reserved bytes after the ID, as received (never tested, PS3.8 §9.3.2.2; DCMTK
    /// sends 0xFF in the second), kept so that re-encoding is byte-exact. Zero when we build one.
    pub reserved: [u8; 3],
    pub abstract_syntax: &'a [u8],
    pub transfer_syntaxes: Vec<&'a [u8]>,
    /// The variable field as received when it is not the form PS3.8 §9.3.2.2 gives (one
    /// abstract syntax sub-item, then transfer syntax sub-items only, each with a 00H reserved
    /// byte): a sub-item of another type (ignored, as unknown items are: §9.3.1), the abstract
    /// syntax not first, or a sub-item's reserved byte not 00H. Kept so that re-encoding is
    /// byte-exact. Empty otherwise (and when we build one).
    pub field: &'a [u8],
}

/// Presentation context item of an A-ASSOCIATE-AC, PS3.8 §9.3.3.2. The transfer syntax sub-item
/// is not significant when the result is not acceptance, and some peers omit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentationContextAc<'a> {
    pub id: u8,
    /// Bytes 6 and 8 of the item (reserved, PS3.8 Table 9-18: not tested), as received; zero
    /// when we build one.
    pub reserved: [u8; 2],
    pub result: PcResult,
    pub transfer_syntax: Option<&'a [u8]>,
    /// The variable field as received when it is neither empty nor exactly one transfer
    /// syntax sub-item with a 00H reserved byte: not significant when the result is not
    /// acceptance (PS3.8 §9.3.3.2), or an accepted context's one transfer syntax beside
    /// sub-items of other types (ignored, §9.3.1) or with a reserved byte that is not 00H. Kept
    /// and re-encoded as received. Empty otherwise (and when we build one).
    pub not_significant: &'a [u8],
}

/// User information sub-items, PS3.8 Annex D.1 and PS3.7 Annex D.3.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubItem<'a> {
    /// D.1: maximum length of the P-DATA-TF PDUs the sender can receive; 0 means no limit.
    MaximumLength(u32),
    ImplementationClassUid(&'a [u8]),
    /// PS3.7 D.3.3.3.
    AsynchronousOperationsWindow {
        max_invoked: u16,
        max_performed: u16,
    },
    /// PS3.7 D.3.3.4.
    RoleSelection {
        sop_class_uid: &'a [u8],
        scu_role: u8,
        scp_role: u8,
    },
    ImplementationVersionName(&'a [u8]),
    /// PS3.7 D.3.3.5.
    SopClassExtended {
        sop_class_uid: &'a [u8],
        info: &'a [u8],
    },
    /// PS3.7 D.3.3.6.
    SopClassCommonExtended {
        sop_class_uid: &'a [u8],
        service_class_uid: &'a [u8],
        related_general_sop_classes: Vec<&'a [u8]>,
        /// Bytes after the related general SOP class list (reserved, PS3.7 D.3.3.6: not
        /// tested), kept so that re-encoding is byte-exact. Empty when we build one.
        reserved: &'a [u8],
    },
    /// PS3.7 D.3.3.7.1.
    UserIdentityRq {
        identity_type: u8,
        positive_response_requested: u8,
        primary: &'a [u8],
        secondary: &'a [u8],
    },
    /// PS3.7 D.3.3.7.2.
    UserIdentityAc {
        server_response: &'a [u8],
    },
    Unknown {
        item_type: u8,
        data: &'a [u8],
    },
}

/// A-ASSOCIATE-RJ, PS3.8 §9.3.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssociateRj {
    pub result: RejectResult,
    pub source: RejectSource,
    pub reason: u8,
    /// Bytes 2 (the PDU header's) and 7 (reserved, PS3.8 Table 9-21: not tested), as
    /// received; zero when we build one.
    pub reserved: [u8; 2],
}

/// A-ABORT, PS3.8 §9.3.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    pub source: AbortSource,
    pub reason: AbortReason,
    /// Bytes 2 (the PDU header's), 7 and 8 (reserved, PS3.8 Table 9-26: not tested), as
    /// received; zero when we build one.
    pub reserved: [u8; 3],
}

/// A-RELEASE-RQ or -RP, PS3.8 §9.3.6 and §9.3.7: nothing but reserved fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Release {
    /// Bytes 2 (the PDU header's) and 7-10 (PS3.8 Tables 9-24 and 9-25: not tested), as
    /// received; zero when we build one ([`Release::ZERO`]).
    pub reserved: [u8; 5],
}

impl Release {
    pub const ZERO: Release = Release { reserved: [0; 5] };
}

/// P-DATA-TF, PS3.8 §9.3.5: a list of presentation data values, validated at decode time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PDataTf<'a> {
    body: &'a [u8],
    /// Byte 2, the PDU header's (reserved, PS3.8 Table 9-22), as received.
    header_reserved: u8,
}

/// One presentation data value item, PS3.8 §9.3.5.1 and Annex E.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdv<'a> {
    pub presentation_context_id: u8,
    /// Message control header: bit 0 set = command, bit 1 set = last fragment (PS3.8 E.2).
    pub message_control_header: u8,
    pub data: &'a [u8],
}

impl Pdv<'_> {
    pub fn is_command(&self) -> bool {
        self.message_control_header & 0x01 != 0
    }
    pub fn is_last(&self) -> bool {
        self.message_control_header & 0x02 != 0
    }
}

impl<'a> PDataTf<'a> {
    fn parse(body: &'a [u8], header_reserved: u8) -> Result<Self, PduError> {
        let mut r = Reader::new(body);
        if r.is_empty() {
            // PS3.8 §9.3.5: "one or more" PDV items.
            return Err(PduError::UnexpectedParameter(
                "PDV item (P-DATA-TF is empty)",
            ));
        }
        while !r.is_empty() {
            let len = r.u32().ok_or(PduError::Truncated("PDV item length"))? as usize;
            if len < 2 {
                return Err(PduError::InvalidValue("PDV item length (below 2)"));
            }
            let mut pdv = r.sub(len).ok_or(PduError::Truncated("PDV item"))?;
            let id = pdv.u8().ok_or(PduError::Truncated("PDV item"))?;
            if id % 2 == 0 {
                return Err(PduError::InvalidValue("presentation context ID (even)"));
            }
            let mch = pdv.u8().ok_or(PduError::Truncated("PDV item"))?;
            if mch & 0xFC != 0 {
                return Err(PduError::InvalidValue("message control header"));
            }
        }
        Ok(PDataTf {
            body,
            header_reserved,
        })
    }

    /// The PDVs in order. The structure was validated when the PDU was decoded.
    pub fn pdvs(&self) -> PdvIter<'a> {
        PdvIter {
            r: Reader::new(self.body),
        }
    }

    /// The raw PDV list, for encoding.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The PDU header's reserved byte, as received.
    pub fn header_reserved(&self) -> u8 {
        self.header_reserved
    }
}

/// Iterator over the PDVs of a validated P-DATA-TF.
#[derive(Debug, Clone)]
pub struct PdvIter<'a> {
    r: Reader<'a>,
}

impl<'a> Iterator for PdvIter<'a> {
    type Item = Pdv<'a>;
    fn next(&mut self) -> Option<Pdv<'a>> {
        let len = self.r.u32()? as usize;
        let mut pdv = self.r.sub(len)?;
        let presentation_context_id = pdv.u8()?;
        let message_control_header = pdv.u8()?;
        Some(Pdv {
            presentation_context_id,
            message_control_header,
            data: pdv.rest(),
        })
    }
}

/// Decodes exactly one PDU: `bytes` holds its 6-byte header and the whole body, nothing more.
pub fn decode(bytes: &[u8]) -> Result<Pdu<'_>, PduError> {
    let mut r = Reader::new(bytes);
    let pdu_type = r.u8().ok_or(PduError::Truncated("PDU header"))?;
    let header = r.u8().ok_or(PduError::Truncated("PDU header"))?;
    let len = r.u32().ok_or(PduError::Truncated("PDU header"))? as usize;
    let mut body = r.sub(len).ok_or(PduError::Truncated("PDU body"))?;
    if !r.is_empty() {
        return Err(PduError::InvalidValue("PDU length (bytes after the PDU)"));
    }
    match PduType(pdu_type) {
        PduType::A_ASSOCIATE_RQ => Ok(Pdu::AssociateRq(parse_associate(&mut body, true, header)?)),
        PduType::A_ASSOCIATE_AC => Ok(Pdu::AssociateAc(parse_associate(&mut body, false, header)?)),
        PduType::A_ASSOCIATE_RJ => {
            let f = fixed4(&mut body)?;
            Ok(Pdu::AssociateRj(AssociateRj {
                result: RejectResult(f[1]),
                source: RejectSource(f[2]),
                reason: f[3],
                reserved: [header, f[0]],
            }))
        }
        PduType::P_DATA_TF => Ok(Pdu::PDataTf(PDataTf::parse(body.rest(), header)?)),
        PduType::A_RELEASE_RQ => fixed4(&mut body).map(|f| Pdu::ReleaseRq(Release::of(header, f))),
        PduType::A_RELEASE_RP => fixed4(&mut body).map(|f| Pdu::ReleaseRp(Release::of(header, f))),
        PduType::A_ABORT => {
            let f = fixed4(&mut body)?;
            Ok(Pdu::Abort(Abort {
                source: AbortSource(f[2]),
                reason: AbortReason(f[3]),
                reserved: [header, f[0], f[1]],
            }))
        }
        _ => Err(PduError::UnrecognizedPdu(pdu_type)),
    }
}

impl Release {
    fn of(header: u8, body: &[u8; 4]) -> Release {
        let [a, b, c, d] = *body;
        Release {
            reserved: [header, a, b, c, d],
        }
    }
}

fn fixed4<'a>(body: &mut Reader<'a>) -> Result<&'a [u8; 4], PduError> {
    if body.left() != 4 {
        return Err(PduError::InvalidValue("PDU length (fixed-size PDU)"));
    }
    body.array::<4>().ok_or(PduError::Truncated("PDU body"))
}

fn parse_associate<'a>(
    r: &mut Reader<'a>,
    is_rq: bool,
    header: u8,
) -> Result<Associate<'a>, PduError> {
    let protocol_version = r.u16().ok_or(PduError::Truncated("protocol version"))?;
    // PS3.8 §9.3.2: only bit 0 (version 1) is tested, and by negotiation, which answers an
    // unsupported version with A-ASSOCIATE-RJ (ACSE, protocol-version-not-supported).
    let after_version = *r
        .array::<2>()
        .ok_or(PduError::Truncated("A-ASSOCIATE header"))?;
    let called_ae = *r
        .array::<16>()
        .ok_or(PduError::Truncated("called AE title"))?;
    let calling_ae = *r
        .array::<16>()
        .ok_or(PduError::Truncated("calling AE title"))?;
    let tail = *r
        .array::<32>()
        .ok_or(PduError::Truncated("A-ASSOCIATE header"))?;
    let variable_field = r.rest();
    // A reserved byte of an item or user information sub-item header that is not 00H: the
    // variable field is re-encoded as received (`AssociateReserved::items`).
    let mut reserved_set = false;
    let mut items = Vec::new();
    let (mut app_ctx, mut user_info) = (0, 0);
    while !r.is_empty() {
        let t = r.u8().ok_or(PduError::Truncated("item header"))?;
        reserved_set |= r.u8().ok_or(PduError::Truncated("item header"))? != 0;
        let len = r.u16().ok_or(PduError::Truncated("item length"))? as usize;
        let mut body = r
            .sub(len)
            .ok_or(PduError::Truncated("item (length runs past PDU)"))?;
        let item = match t {
            item_type::APPLICATION_CONTEXT => {
                app_ctx += 1;
                Item::ApplicationContext(body.rest())
            }
            item_type::PRESENTATION_CONTEXT_RQ if is_rq => {
                Item::PresentationContextRq(parse_pc_rq(&mut body)?)
            }
            item_type::PRESENTATION_CONTEXT_AC if !is_rq => {
                Item::PresentationContextAc(parse_pc_ac(&mut body)?)
            }
            item_type::USER_INFORMATION => {
                user_info += 1;
                Item::UserInformation(parse_user_info(&mut body, &mut reserved_set)?)
            }
            _ => Item::Unknown {
                item_type: t,
                data: body.rest(),
            },
        };
        items.push(item);
    }
    if app_ctx != 1 {
        return Err(PduError::UnexpectedParameter("application context item"));
    }
    if user_info > 1 {
        return Err(PduError::UnexpectedParameter(
            "user information item (repeated)",
        ));
    }
    Ok(Associate {
        protocol_version,
        called_ae,
        calling_ae,
        items,
        reserved: AssociateReserved {
            header,
            after_version,
            tail,
            items: if reserved_set { variable_field } else { &[] },
        },
    })
}

/// A sub-item's header: its type and its reserved byte (PS3.8 §9.3.2.2.1: not tested).
#[derive(Debug, Clone, Copy)]
struct SubItemHeader {
    item_type: u8,
    reserved: u8,
}

/// Reads a sub-item header (type, reserved, 2-byte length) and its body.
fn sub_item<'a>(r: &mut Reader<'a>) -> Result<(SubItemHeader, Reader<'a>), PduError> {
    let item_type = r.u8().ok_or(PduError::Truncated("sub-item header"))?;
    let reserved = r.u8().ok_or(PduError::Truncated("sub-item header"))?;
    let len = r.u16().ok_or(PduError::Truncated("sub-item length"))? as usize;
    let body = r
        .sub(len)
        .ok_or(PduError::Truncated("sub-item (length runs past item)"))?;
    Ok((
        SubItemHeader {
            item_type,
            reserved,
        },
        body,
    ))
}

fn parse_pc_rq<'a>(r: &mut Reader<'a>) -> Result<PresentationContextRq<'a>, PduError> {
    let id = r
        .u8()
        .ok_or(PduError::Truncated("presentation context ID"))?;
    let reserved = *r
        .array::<3>()
        .ok_or(PduError::Truncated("presentation context item"))?;
    // PS3.8 §9.3.2.2: "The variable field shall consist of one Abstract Syntax Sub-Item followed
    // by one or more Transfer Syntax Sub-Items." A sub-item of another type is ignored, as
    // unknown items are (§9.3.1; DCMTK and dcm4che do the same): refusing it cost a real peer its
    // whole association. Such a field is kept as received (`field`), so re-encoding is exact.
    let whole = r.rest();
    let mut abstract_syntax = None;
    let mut transfer_syntaxes = Vec::new();
    let mut canonical = true;
    let mut first = true;
    while !r.is_empty() {
        let (h, body) = sub_item(r)?;
        canonical &= h.reserved == 0;
        match h.item_type {
            item_type::ABSTRACT_SYNTAX if abstract_syntax.is_some() => {
                return Err(PduError::UnexpectedParameter("abstract syntax (repeated)"))
            }
            item_type::ABSTRACT_SYNTAX => {
                canonical &= first;
                abstract_syntax = Some(body.rest());
            }
            item_type::TRANSFER_SYNTAX => {
                canonical &= !first;
                transfer_syntaxes.push(body.rest());
            }
            _ => canonical = false,
        }
        first = false;
    }
    let Some(abstract_syntax) = abstract_syntax else {
        return Err(PduError::UnexpectedParameter("abstract syntax sub-item"));
    };
    if transfer_syntaxes.is_empty() {
        return Err(PduError::UnexpectedParameter("transfer syntax sub-item"));
    }
    let field = if canonical { &[][..] } else { whole };
    Ok(PresentationContextRq {
        id,
        reserved,
        abstract_syntax,
        transfer_syntaxes,
        field,
    })
}

fn parse_pc_ac<'a>(r: &mut Reader<'a>) -> Result<PresentationContextAc<'a>, PduError> {
    let id = r
        .u8()
        .ok_or(PduError::Truncated("presentation context ID"))?;
    let reserved_6 = r
        .u8()
        .ok_or(PduError::Truncated("presentation context item"))?;
    let result = PcResult(
        r.u8()
            .ok_or(PduError::Truncated("presentation context result"))?,
    );
    let reserved_8 = r
        .u8()
        .ok_or(PduError::Truncated("presentation context item"))?;
    // PS3.8 §9.3.3.2: "The variable field shall consist of one Transfer Syntax Sub-Item";
    // when the result is not acceptance it "shall not be significant and its value shall not
    // be tested". A field that is not exactly one transfer syntax sub-item is kept as received
    // (`not_significant`); an accepted context takes its one transfer syntax sub-item from it,
    // other sub-items ignored (§9.3.1), and is refused only without one, or with two.
    let field = r.rest();
    let mut syntaxes = Vec::new();
    let (mut others, mut reserved_set) = (false, false);
    while !r.is_empty() {
        match sub_item(r) {
            Ok((h, body)) if h.item_type == item_type::TRANSFER_SYNTAX => {
                // A reserved byte that is not 00H: the field is kept as received.
                reserved_set |= h.reserved != 0;
                syntaxes.push(body.rest());
            }
            Ok(_) => others = true,
            Err(e) if result == PcResult::ACCEPTANCE => return Err(e),
            Err(_) => {
                others = true;
                break;
            }
        }
    }
    let one = (syntaxes.len() == 1 && !others).then(|| syntaxes[0]);
    let (transfer_syntax, not_significant) = match (one, result == PcResult::ACCEPTANCE) {
        (Some(ts), _) if !reserved_set => (Some(ts), &[][..]),
        (Some(ts), _) => (Some(ts), field),
        (None, true) if syntaxes.len() == 1 => (Some(syntaxes[0]), field),
        (None, true) => {
            return Err(PduError::UnexpectedParameter(
                "transfer syntax sub-item (an accepted presentation context holds exactly one)",
            ))
        }
        (None, false) => (None, field),
    };
    Ok(PresentationContextAc {
        id,
        reserved: [reserved_6, reserved_8],
        result,
        transfer_syntax,
        not_significant,
    })
}

fn uid_with_u16_len<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<&'a [u8], PduError> {
    let n = r.u16().ok_or(PduError::Truncated(what))? as usize;
    r.take(n).ok_or(PduError::Truncated(what))
}

/// The sub-items of a user information item; `reserved_set` is set when a sub-item's reserved
/// byte is not 00H.
fn parse_user_info<'a>(
    r: &mut Reader<'a>,
    reserved_set: &mut bool,
) -> Result<Vec<SubItem<'a>>, PduError> {
    let mut out = Vec::new();
    while !r.is_empty() {
        let (h, mut b) = sub_item(r)?;
        *reserved_set |= h.reserved != 0;
        let t = h.item_type;
        let sub = match t {
            item_type::MAXIMUM_LENGTH => {
                if b.left() != 4 {
                    return Err(PduError::InvalidValue("maximum length sub-item length"));
                }
                SubItem::MaximumLength(b.u32().ok_or(PduError::Truncated("maximum length"))?)
            }
            item_type::IMPLEMENTATION_CLASS_UID => SubItem::ImplementationClassUid(b.rest()),
            item_type::ASYNCHRONOUS_OPERATIONS_WINDOW => {
                if b.left() != 4 {
                    return Err(PduError::InvalidValue(
                        "asynchronous operations window length",
                    ));
                }
                SubItem::AsynchronousOperationsWindow {
                    max_invoked: b.u16().ok_or(PduError::Truncated("operations window"))?,
                    max_performed: b.u16().ok_or(PduError::Truncated("operations window"))?,
                }
            }
            item_type::SCP_SCU_ROLE_SELECTION => {
                let sop_class_uid = uid_with_u16_len(&mut b, "role selection UID")?;
                let scu_role = b.u8().ok_or(PduError::Truncated("SCU role"))?;
                let scp_role = b.u8().ok_or(PduError::Truncated("SCP role"))?;
                if !b.is_empty() {
                    return Err(PduError::InvalidValue("role selection sub-item length"));
                }
                SubItem::RoleSelection {
                    sop_class_uid,
                    scu_role,
                    scp_role,
                }
            }
            item_type::IMPLEMENTATION_VERSION_NAME => SubItem::ImplementationVersionName(b.rest()),
            item_type::SOP_CLASS_EXTENDED_NEGOTIATION => SubItem::SopClassExtended {
                sop_class_uid: uid_with_u16_len(&mut b, "extended negotiation UID")?,
                info: b.rest(),
            },
            item_type::SOP_CLASS_COMMON_EXTENDED_NEGOTIATION => {
                let sop_class_uid = uid_with_u16_len(&mut b, "common extended SOP class UID")?;
                let service_class_uid = uid_with_u16_len(&mut b, "service class UID")?;
                let n = b
                    .u16()
                    .ok_or(PduError::Truncated("related general SOP classes"))?;
                let mut rel = b
                    .sub(n as usize)
                    .ok_or(PduError::Truncated("related general SOP classes"))?;
                let mut related_general_sop_classes = Vec::new();
                while !rel.is_empty() {
                    related_general_sop_classes
                        .push(uid_with_u16_len(&mut rel, "related general SOP class UID")?);
                }
                // Reserved bytes may follow (PS3.7 D.3.3.6); they are not tested.
                SubItem::SopClassCommonExtended {
                    sop_class_uid,
                    service_class_uid,
                    related_general_sop_classes,
                    reserved: b.rest(),
                }
            }
            item_type::USER_IDENTITY_RQ => {
                let identity_type = b.u8().ok_or(PduError::Truncated("user identity type"))?;
                let positive_response_requested =
                    b.u8().ok_or(PduError::Truncated("user identity"))?;
                let primary = uid_with_u16_len(&mut b, "user identity primary field")?;
                let secondary = uid_with_u16_len(&mut b, "user identity secondary field")?;
                if !b.is_empty() {
                    return Err(PduError::InvalidValue("user identity sub-item length"));
                }
                SubItem::UserIdentityRq {
                    identity_type,
                    positive_response_requested,
                    primary,
                    secondary,
                }
            }
            item_type::USER_IDENTITY_AC => {
                let server_response = uid_with_u16_len(&mut b, "user identity server response")?;
                if !b.is_empty() {
                    return Err(PduError::InvalidValue("user identity AC sub-item length"));
                }
                SubItem::UserIdentityAc { server_response }
            }
            _ => SubItem::Unknown {
                item_type: t,
                data: b.rest(),
            },
        };
        out.push(sub);
    }
    Ok(out)
}

impl Associate<'_> {
    /// Presentation contexts of an RQ, in order.
    pub fn presentation_contexts_rq(&self) -> impl Iterator<Item = &PresentationContextRq<'_>> {
        self.items.iter().filter_map(|i| match i {
            Item::PresentationContextRq(pc) => Some(pc),
            _ => None,
        })
    }

    /// Presentation contexts of an AC, in order.
    pub fn presentation_contexts_ac(&self) -> impl Iterator<Item = &PresentationContextAc<'_>> {
        self.items.iter().filter_map(|i| match i {
            Item::PresentationContextAc(pc) => Some(pc),
            _ => None,
        })
    }

    pub fn application_context(&self) -> Option<&[u8]> {
        self.items.iter().find_map(|i| match i {
            Item::ApplicationContext(a) => Some(*a),
            _ => None,
        })
    }

    pub fn user_information(&self) -> &[SubItem<'_>] {
        self.items
            .iter()
            .find_map(|i| match i {
                Item::UserInformation(s) => Some(s.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The maximum P-DATA-TF length the sender can receive; `None` when not stated, `Some(0)`
    /// when it has no limit (PS3.8 D.1.1).
    pub fn maximum_length(&self) -> Option<u32> {
        self.user_information().iter().find_map(|s| match s {
            SubItem::MaximumLength(n) => Some(*n),
            _ => None,
        })
    }
}

// ---- encoding ----------------------------------------------------------------------------

fn header(out: &mut Vec<u8>, t: PduType, reserved: u8) -> LengthPrefix {
    out.push(t.0);
    out.push(reserved);
    LengthPrefix::u32(out)
}

fn put_sub(out: &mut Vec<u8>, t: u8, data: &[u8]) -> Result<(), EncodeError> {
    out.push(t);
    out.push(0);
    let n = u16::try_from(data.len()).map_err(|_| EncodeError::TooLong)?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

fn put_u16_prefixed(out: &mut Vec<u8>, data: &[u8]) -> Result<(), EncodeError> {
    let n = u16::try_from(data.len()).map_err(|_| EncodeError::TooLong)?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

impl Pdu<'_> {
    /// Appends this PDU's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let r = self.encode_inner(out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    /// The PDU header's reserved byte (byte 2).
    fn header_reserved(&self) -> u8 {
        match self {
            Pdu::AssociateRq(a) | Pdu::AssociateAc(a) => a.reserved.header,
            Pdu::AssociateRj(rj) => rj.reserved[0],
            Pdu::PDataTf(p) => p.header_reserved,
            Pdu::ReleaseRq(r) | Pdu::ReleaseRp(r) => r.reserved[0],
            Pdu::Abort(a) => a.reserved[0],
        }
    }

    fn encode_inner(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let lp = header(out, self.pdu_type(), self.header_reserved());
        match self {
            Pdu::AssociateRq(a) | Pdu::AssociateAc(a) => encode_associate(a, out)?,
            Pdu::AssociateRj(rj) => {
                out.extend_from_slice(&[rj.reserved[1], rj.result.0, rj.source.0, rj.reason])
            }
            Pdu::PDataTf(p) => out.extend_from_slice(p.body),
            Pdu::ReleaseRq(r) | Pdu::ReleaseRp(r) => out.extend_from_slice(&r.reserved[1..]),
            Pdu::Abort(a) => {
                out.extend_from_slice(&[a.reserved[1], a.reserved[2], a.source.0, a.reason.0])
            }
        }
        lp.finish(out)
    }
}

fn encode_associate(a: &Associate<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.extend_from_slice(&a.protocol_version.to_be_bytes());
    out.extend_from_slice(&a.reserved.after_version);
    out.extend_from_slice(&a.called_ae);
    out.extend_from_slice(&a.calling_ae);
    out.extend_from_slice(&a.reserved.tail);
    if !a.reserved.items.is_empty() {
        out.extend_from_slice(a.reserved.items);
        return Ok(());
    }
    for item in &a.items {
        match item {
            Item::ApplicationContext(uid) => put_sub(out, item_type::APPLICATION_CONTEXT, uid)?,
            Item::PresentationContextRq(pc) => {
                out.extend_from_slice(&[item_type::PRESENTATION_CONTEXT_RQ, 0]);
                let lp = LengthPrefix::u16(out);
                out.extend_from_slice(&[pc.id]);
                out.extend_from_slice(&pc.reserved);
                if pc.field.is_empty() {
                    put_sub(out, item_type::ABSTRACT_SYNTAX, pc.abstract_syntax)?;
                    for ts in &pc.transfer_syntaxes {
                        put_sub(out, item_type::TRANSFER_SYNTAX, ts)?;
                    }
                } else {
                    out.extend_from_slice(pc.field);
                }
                lp.finish(out)?;
            }
            Item::PresentationContextAc(pc) => {
                out.extend_from_slice(&[item_type::PRESENTATION_CONTEXT_AC, 0]);
                let lp = LengthPrefix::u16(out);
                out.extend_from_slice(&[pc.id, pc.reserved[0], pc.result.0, pc.reserved[1]]);
                if !pc.not_significant.is_empty() {
                    out.extend_from_slice(pc.not_significant);
                } else if let Some(ts) = pc.transfer_syntax {
                    put_sub(out, item_type::TRANSFER_SYNTAX, ts)?;
                }
                lp.finish(out)?;
            }
            Item::UserInformation(subs) => {
                out.extend_from_slice(&[item_type::USER_INFORMATION, 0]);
                let lp = LengthPrefix::u16(out);
                for s in subs {
                    encode_sub_item(s, out)?;
                }
                lp.finish(out)?;
            }
            Item::Unknown { item_type, data } => put_sub(out, *item_type, data)?,
        }
    }
    Ok(())
}

fn encode_sub_item(s: &SubItem<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    use item_type as t;
    let begin = |out: &mut Vec<u8>, ty: u8| {
        out.extend_from_slice(&[ty, 0]);
        LengthPrefix::u16(out)
    };
    match s {
        SubItem::MaximumLength(n) => put_sub(out, t::MAXIMUM_LENGTH, &n.to_be_bytes()),
        SubItem::ImplementationClassUid(u) => put_sub(out, t::IMPLEMENTATION_CLASS_UID, u),
        SubItem::ImplementationVersionName(v) => put_sub(out, t::IMPLEMENTATION_VERSION_NAME, v),
        SubItem::AsynchronousOperationsWindow {
            max_invoked,
            max_performed,
        } => {
            let mut b = [0u8; 4];
            b[..2].copy_from_slice(&max_invoked.to_be_bytes());
            b[2..].copy_from_slice(&max_performed.to_be_bytes());
            put_sub(out, t::ASYNCHRONOUS_OPERATIONS_WINDOW, &b)
        }
        SubItem::RoleSelection {
            sop_class_uid,
            scu_role,
            scp_role,
        } => {
            let lp = begin(out, t::SCP_SCU_ROLE_SELECTION);
            put_u16_prefixed(out, sop_class_uid)?;
            out.extend_from_slice(&[*scu_role, *scp_role]);
            lp.finish(out)
        }
        SubItem::SopClassExtended {
            sop_class_uid,
            info,
        } => {
            let lp = begin(out, t::SOP_CLASS_EXTENDED_NEGOTIATION);
            put_u16_prefixed(out, sop_class_uid)?;
            out.extend_from_slice(info);
            lp.finish(out)
        }
        SubItem::SopClassCommonExtended {
            sop_class_uid,
            service_class_uid,
            related_general_sop_classes,
            reserved,
        } => {
            let lp = begin(out, t::SOP_CLASS_COMMON_EXTENDED_NEGOTIATION);
            put_u16_prefixed(out, sop_class_uid)?;
            put_u16_prefixed(out, service_class_uid)?;
            let rel = LengthPrefix::u16(out);
            for uid in related_general_sop_classes {
                put_u16_prefixed(out, uid)?;
            }
            rel.finish(out)?;
            out.extend_from_slice(reserved);
            lp.finish(out)
        }
        SubItem::UserIdentityRq {
            identity_type,
            positive_response_requested,
            primary,
            secondary,
        } => {
            let lp = begin(out, t::USER_IDENTITY_RQ);
            out.extend_from_slice(&[*identity_type, *positive_response_requested]);
            put_u16_prefixed(out, primary)?;
            put_u16_prefixed(out, secondary)?;
            lp.finish(out)
        }
        SubItem::UserIdentityAc { server_response } => {
            let lp = begin(out, t::USER_IDENTITY_AC);
            put_u16_prefixed(out, server_response)?;
            lp.finish(out)
        }
        SubItem::Unknown { item_type, data } => put_sub(out, *item_type, data),
    }
}

/// Appends the header of a P-DATA-TF PDU holding one PDV of `data_len` bytes, followed by the PDV
/// header; the caller appends the data. The hot path for sending responses: no temporary PDU.
pub fn put_pdata_header(out: &mut Vec<u8>, pc_id: u8, mch: u8, data_len: u32) {
    out.extend_from_slice(&[PduType::P_DATA_TF.0, 0]);
    out.extend_from_slice(&(data_len + 6).to_be_bytes());
    out.extend_from_slice(&(data_len + 2).to_be_bytes());
    out.extend_from_slice(&[pc_id, mch]);
}
