//! Acceptor-side A-ASSOCIATE negotiation (PS3.8 §9.3.2-9.3.4, PS3.7 Annex D.3.3): from a
//! received A-ASSOCIATE-RQ and our policy, either the A-ASSOCIATE-AC to send plus the negotiated
//! presentation contexts, or the A-ASSOCIATE-RJ.

use super::storage_sop_classes::STORAGE_SOP_CLASSES;
use super::transfer_syntax::{self, TransferSyntax};
use crate::ul::{
    ae_title_str, reject_reason, uid_bytes, Associate, AssociateRj, Item, PcResult, Pdu,
    PresentationContextAc, RejectResult, RejectSource, SubItem, DICOM_APPLICATION_CONTEXT,
};

/// Verification SOP Class, PS3.4 Annex A.
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";
/// Our implementation class UID (PS3.7 D.3.3.2), under the UUID-derived root 2.25.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.186117930467893426514372609848271207512";
/// Our implementation version name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DICOMGATE_", env!("CARGO_PKG_VERSION"));

/// Is this a storage SOP class we accept? (the generated table is sorted by UID bytes)
pub fn is_storage_sop_class(uid: &[u8]) -> bool {
    let uid = uid_bytes(uid);
    STORAGE_SOP_CLASSES
        .binary_search_by(|(u, _)| u.as_bytes().cmp(uid))
        .is_ok()
}

/// What we accept, from config.
#[derive(Debug, Clone)]
pub struct AcceptorPolicy {
    pub ae_title: String,
    /// Accept any called AE title, not only ours.
    pub accept_any_called_ae: bool,
    /// When set, only these calling AE titles may associate.
    pub calling_ae_allow: Option<Vec<String>>,
    /// The maximum P-DATA-TF length we advertise (what we can receive).
    pub max_pdu_length: u32,
    /// Our limit on outstanding operations the peer may invoke on us (PS3.7 D.3.3.3).
    pub max_operations_performed: u16,
    /// Transfer syntaxes in order of preference; among proposed ones not listed here the
    /// requestor's order decides.
    pub transfer_syntax_preference: Vec<&'static TransferSyntax>,
    /// Keep the sender's encoding: when the requestor's first proposed syntax that we can
    /// store is compressed (encapsulated or deflated), it is chosen, and the preference list
    /// decides only among uncompressed ones. `false`: the preference list always goes first.
    pub keep_sender_encoding: bool,
    /// Bound on presentation context items in one request.
    pub max_presentation_contexts: usize,
}

/// One accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: &'static TransferSyntax,
}

/// The outcome of a successful negotiation, kept for the life of the association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub calling_ae: String,
    pub called_ae: String,
    pub contexts: Vec<AcceptedContext>,
    /// The peer's maximum P-DATA-TF length; 0 = no limit (PS3.8 D.1.1).
    pub peer_max_pdu: u32,
    /// How many operations the peer may have outstanding on us.
    pub max_operations_performed: u16,
    pub peer_implementation_class_uid: String,
    pub peer_implementation_version_name: String,
}

impl Negotiated {
    pub fn context(&self, id: u8) -> Option<&AcceptedContext> {
        self.contexts.iter().find(|c| c.id == id)
    }
}

#[derive(Debug)]
pub enum Outcome {
    /// The encoded A-ASSOCIATE-AC and what was agreed.
    Accept {
        ac: Vec<u8>,
        negotiated: Negotiated,
    },
    Reject(AssociateRj),
}

fn rj(result: RejectResult, source: RejectSource, reason: u8) -> Outcome {
    Outcome::Reject(AssociateRj {
        result,
        source,
        reason,
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(uid_bytes(b)).trim().to_string()
}

/// Negotiates one A-ASSOCIATE-RQ.
pub fn negotiate(rq: &Associate<'_>, policy: &AcceptorPolicy) -> Outcome {
    use RejectResult as R;
    use RejectSource as S;
    // PS3.8 §9.3.2: only bit 0 (protocol version 1) is tested.
    if rq.protocol_version & 1 == 0 {
        return rj(
            R::PERMANENT,
            S::SERVICE_PROVIDER_ACSE,
            reject_reason::PROTOCOL_VERSION_NOT_SUPPORTED,
        );
    }
    if rq.application_context().map(uid_bytes) != Some(DICOM_APPLICATION_CONTEXT) {
        return rj(
            R::PERMANENT,
            S::SERVICE_USER,
            reject_reason::APPLICATION_CONTEXT_NAME_NOT_SUPPORTED,
        );
    }
    let called = ae_title_str(&rq.called_ae);
    let called_ok = match called {
        Some(c) => policy.accept_any_called_ae || c == policy.ae_title,
        None => false,
    };
    if !called_ok {
        return rj(
            R::PERMANENT,
            S::SERVICE_USER,
            reject_reason::CALLED_AE_TITLE_NOT_RECOGNIZED,
        );
    }
    let calling = ae_title_str(&rq.calling_ae);
    let calling_ok = match (calling, &policy.calling_ae_allow) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(c), Some(allow)) => allow.iter().any(|a| a == c),
    };
    if !calling_ok {
        return rj(
            R::PERMANENT,
            S::SERVICE_USER,
            reject_reason::CALLING_AE_TITLE_NOT_RECOGNIZED,
        );
    }
    if rq.presentation_contexts_rq().count() > policy.max_presentation_contexts {
        return rj(
            R::PERMANENT,
            S::SERVICE_USER,
            reject_reason::NO_REASON_GIVEN,
        );
    }

    let mut seen = [false; 256];
    let mut ac_items = vec![Item::ApplicationContext(DICOM_APPLICATION_CONTEXT)];
    let mut contexts = Vec::new();
    for pc in rq.presentation_contexts_rq() {
        let dup = std::mem::replace(&mut seen[pc.id as usize], true);
        let abstract_ok = uid_bytes(pc.abstract_syntax) == VERIFICATION_SOP_CLASS.as_bytes()
            || is_storage_sop_class(pc.abstract_syntax);
        let (result, ts) = if dup || pc.id % 2 == 0 {
            (PcResult::NO_REASON, None)
        } else if !abstract_ok {
            (PcResult::ABSTRACT_SYNTAX_NOT_SUPPORTED, None)
        } else {
            match choose_transfer_syntax(&pc.transfer_syntaxes, policy) {
                Some(ts) => (PcResult::ACCEPTANCE, Some(ts)),
                None => (PcResult::TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
            }
        };
        if let Some(ts) = ts {
            contexts.push(AcceptedContext {
                id: pc.id,
                abstract_syntax: text(pc.abstract_syntax),
                transfer_syntax: ts,
            });
        }
        ac_items.push(Item::PresentationContextAc(PresentationContextAc {
            id: pc.id,
            result,
            // Not significant when rejected (PS3.8 §9.3.3.2), but DCMTK expects the sub-item.
            transfer_syntax: Some(
                ts.map(|t| t.uid.as_bytes())
                    .unwrap_or(transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN.as_bytes()),
            ),
        }));
    }

    let mut peer_max_pdu = 0;
    let mut ops = 1u16;
    let mut peer_impl_uid = String::new();
    let mut peer_version = String::new();
    let mut user = vec![
        SubItem::MaximumLength(policy.max_pdu_length),
        SubItem::ImplementationClassUid(IMPLEMENTATION_CLASS_UID.as_bytes()),
    ];
    let mut roles = Vec::new();
    for sub in rq.user_information() {
        match sub {
            SubItem::MaximumLength(n) => peer_max_pdu = *n,
            SubItem::ImplementationClassUid(u) => peer_impl_uid = text(u),
            SubItem::ImplementationVersionName(v) => peer_version = text(v),
            SubItem::AsynchronousOperationsWindow { max_invoked, .. } => {
                // PS3.7 D.3.3.3: the peer's invoked operations are the ones we perform; 0 means
                // unlimited, which we bound by our own maximum. We invoke none on it.
                ops = if *max_invoked == 0 {
                    policy.max_operations_performed
                } else {
                    (*max_invoked).min(policy.max_operations_performed)
                }
                .max(1);
                user.push(SubItem::AsynchronousOperationsWindow {
                    max_invoked: ops,
                    max_performed: 1,
                });
            }
            SubItem::RoleSelection {
                sop_class_uid,
                scu_role,
                ..
            } => {
                // PS3.7 D.3.3.4: the requestor may be SCU (we are SCP for storage and
                // verification); we never take the SCU role, so the SCP role is refused.
                roles.push(SubItem::RoleSelection {
                    sop_class_uid,
                    scu_role: *scu_role,
                    scp_role: 0,
                });
            }
            // User identity (PS3.7 D.3.3.7): we do not authenticate, so no AC sub-item is sent,
            // which the standard allows; the requestor decides whether to go on. SOP class
            // extended and common extended negotiation are not supported and so not answered.
            _ => {}
        }
    }
    user.extend(roles);
    user.push(SubItem::ImplementationVersionName(
        IMPLEMENTATION_VERSION_NAME.as_bytes(),
    ));
    ac_items.push(Item::UserInformation(user));
    let ac = Pdu::AssociateAc(Associate {
        protocol_version: 1,
        called_ae: rq.called_ae,
        calling_ae: rq.calling_ae,
        items: ac_items,
    });
    let mut bytes = Vec::new();
    if ac.encode(&mut bytes).is_err() {
        return rj(
            R::PERMANENT,
            S::SERVICE_USER,
            reject_reason::NO_REASON_GIVEN,
        );
    }
    Outcome::Accept {
        ac: bytes,
        negotiated: Negotiated {
            calling_ae: calling.unwrap_or_default().to_string(),
            called_ae: called.unwrap_or_default().to_string(),
            contexts,
            peer_max_pdu,
            max_operations_performed: ops,
            peer_implementation_class_uid: peer_impl_uid,
            peer_implementation_version_name: peer_version,
        },
    }
}

/// The transfer syntax of one presentation context (PS3.8 §9.3.2.2: the requestor lists its
/// syntaxes in its order of preference; the acceptor picks one). By default the sender's
/// encoding is kept: its first proposed syntax that we can store wins when it is compressed
/// (a sender that can decompress would otherwise do so one hop before us, and the stored file
/// would no longer be what the modality made); among uncompressed ones our preference list
/// decides, then the requestor's order. With `keep_sender_encoding = false` the preference
/// list always goes first.
fn choose_transfer_syntax(
    proposed: &[&[u8]],
    policy: &AcceptorPolicy,
) -> Option<&'static TransferSyntax> {
    let known: Vec<&'static TransferSyntax> = proposed
        .iter()
        .filter_map(|p| transfer_syntax::by_uid(p))
        .collect();
    if policy.keep_sender_encoding {
        if let Some(first) = known.first().filter(|t| !transfer_syntax::is_native(t)) {
            if !transfer_syntax::is_lossy(first) {
                return Some(first);
            }
            // A lossy syntax first: taken only when nothing lossless is proposed beside it
            // (then the sender holds lossy data); else we would have it compress lossily on
            // the fly. A lossless compressed one keeps a compression, in the sender's order.
            if let Some(lossless) = known
                .iter()
                .find(|t| !transfer_syntax::is_native(t) && !transfer_syntax::is_lossy(t))
            {
                return Some(lossless);
            }
            if !known.iter().any(|t| transfer_syntax::is_native(t)) {
                return Some(first);
            }
        }
    }
    let candidates: Vec<&'static TransferSyntax> = if policy.keep_sender_encoding {
        known
            .iter()
            .copied()
            .filter(|t| transfer_syntax::is_native(t))
            .collect()
    } else {
        known.clone()
    };
    policy
        .transfer_syntax_preference
        .iter()
        .find(|pref| candidates.iter().any(|k| k.uid == pref.uid))
        .copied()
        .or_else(|| candidates.first().copied())
        .or_else(|| known.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assoc::transfer_syntax::by_uid;
    use crate::ul::{ae_title_field, decode, PresentationContextRq};

    fn policy() -> AcceptorPolicy {
        AcceptorPolicy {
            ae_title: "GATE".into(),
            accept_any_called_ae: false,
            calling_ae_allow: None,
            max_pdu_length: 65536,
            max_operations_performed: 8,
            transfer_syntax_preference: vec![
                by_uid(b"1.2.840.10008.1.2.1").unwrap(),
                by_uid(b"1.2.840.10008.1.2").unwrap(),
            ],
            keep_sender_encoding: true,
            max_presentation_contexts: 128,
        }
    }

    fn rq<'a>(
        called: &str,
        calling: &str,
        pcs: Vec<PresentationContextRq<'a>>,
        user: Vec<SubItem<'a>>,
    ) -> Associate<'a> {
        let mut items = vec![Item::ApplicationContext(DICOM_APPLICATION_CONTEXT)];
        items.extend(pcs.into_iter().map(Item::PresentationContextRq));
        items.push(Item::UserInformation(user));
        Associate {
            protocol_version: 1,
            called_ae: ae_title_field(called),
            calling_ae: ae_title_field(calling),
            items,
        }
    }

    fn pc<'a>(id: u8, abs: &'a str, ts: &[&'a str]) -> PresentationContextRq<'a> {
        PresentationContextRq {
            id,
            reserved: [0; 3],
            abstract_syntax: abs.as_bytes(),
            transfer_syntaxes: ts.iter().map(|t| t.as_bytes()).collect(),
        }
    }

    fn rejected(o: Outcome) -> (u8, u8, u8) {
        match o {
            Outcome::Reject(r) => (r.result.0, r.source.0, r.reason),
            Outcome::Accept { .. } => panic!("accepted"),
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    #[test]
    fn ae_titles_application_context_and_version() {
        let p = policy();
        assert_eq!(
            rejected(negotiate(&rq("OTHER", "SCU", vec![], vec![]), &p)),
            (1, 1, 7)
        );
        let mut any = p.clone();
        any.accept_any_called_ae = true;
        assert!(matches!(
            negotiate(&rq("OTHER", "SCU", vec![], vec![]), &any),
            Outcome::Accept { .. }
        ));
        let mut allow = p.clone();
        allow.calling_ae_allow = Some(vec!["CT1".into()]);
        assert_eq!(
            rejected(negotiate(&rq("GATE", "CT2", vec![], vec![]), &allow)),
            (1, 1, 3)
        );
        assert!(matches!(
            negotiate(&rq("GATE", "CT1", vec![], vec![]), &allow),
            Outcome::Accept { .. }
        ));
        let mut r = rq("GATE", "SCU", vec![], vec![]);
        r.calling_ae = [b' '; 16]; // all spaces: not an AE title
        assert_eq!(rejected(negotiate(&r, &p)), (1, 1, 3));
        let mut r = rq("GATE", "SCU", vec![], vec![]);
        r.protocol_version = 2;
        assert_eq!(rejected(negotiate(&r, &p)), (1, 2, 2));
        let mut r = rq("GATE", "SCU", vec![], vec![]);
        r.items[0] = Item::ApplicationContext(b"1.2.3");
        assert_eq!(rejected(negotiate(&r, &p)), (1, 1, 2));
    }

    #[test]
    fn contexts_transfer_syntax_preference_and_results() {
        let r = rq(
            "GATE",
            "SCU",
            vec![
                pc(1, CT, &["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),
                pc(3, CT, &["1.2.840.10008.1.2.4.90"]),
                pc(5, "1.2.840.10008.5.1.4.1.2.1.1", &["1.2.840.10008.1.2"]), // a C-FIND model
                pc(7, CT, &["1.2.3.4"]),
                pc(7, CT, &["1.2.840.10008.1.2"]), // duplicate ID
                pc(9, VERIFICATION_SOP_CLASS, &["1.2.840.10008.1.2"]),
            ],
            vec![],
        );
        let Outcome::Accept { ac, negotiated } = negotiate(&r, &policy()) else {
            panic!()
        };
        let ts: Vec<_> = negotiated
            .contexts
            .iter()
            .map(|c| (c.id, c.transfer_syntax.uid))
            .collect();
        assert_eq!(
            ts,
            vec![
                (1, "1.2.840.10008.1.2.1"),
                (3, "1.2.840.10008.1.2.4.90"),
                (9, "1.2.840.10008.1.2")
            ]
        );
        let crate::ul::Pdu::AssociateAc(ac) = decode(&ac).unwrap() else {
            panic!()
        };
        let results: Vec<_> = ac
            .presentation_contexts_ac()
            .map(|p| (p.id, p.result.0))
            .collect();
        assert_eq!(
            results,
            vec![(1, 0), (3, 0), (5, 3), (7, 4), (7, 2), (9, 0)]
        );
        assert_eq!(ac.maximum_length(), Some(65536));
    }

    /// Issue 16: a context proposing [RLE Lossless, explicit LE, implicit LE] was accepted as
    /// explicit LE and one proposing [JPEG 2000 Lossless, implicit LE] as implicit LE, so
    /// senders that can decompress did (DCMTK dcmsend sent an RLE image 42× larger). The
    /// requestor's first syntax is kept when it is compressed; the preference list decides
    /// among uncompressed ones; `keep_sender_encoding = false` is the old rule.
    #[test]
    fn transfer_syntax_choice_keeps_the_senders_compression() {
        const RLE: &str = "1.2.840.10008.1.2.5";
        const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
        const EXPLICIT: &str = "1.2.840.10008.1.2.1";
        const IMPLICIT: &str = "1.2.840.10008.1.2";
        let choose = |keep: bool, ts: &[&str]| {
            let mut p = policy();
            p.keep_sender_encoding = keep;
            let b: Vec<&[u8]> = ts.iter().map(|t| t.as_bytes()).collect();
            choose_transfer_syntax(&b, &p).map(|t| t.uid)
        };
        assert_eq!(choose(true, &[RLE, EXPLICIT, IMPLICIT]), Some(RLE));
        assert_eq!(choose(true, &[J2K_LOSSLESS, IMPLICIT]), Some(J2K_LOSSLESS));
        assert_eq!(choose(true, &[IMPLICIT, EXPLICIT]), Some(EXPLICIT));
        assert_eq!(
            choose(true, &[EXPLICIT, RLE]),
            Some(EXPLICIT),
            "the sender prefers it"
        );
        assert_eq!(
            choose(true, &["1.2.3.4", RLE, EXPLICIT]),
            Some(RLE),
            "unknown ones skipped"
        );
        assert_eq!(choose(false, &[RLE, EXPLICIT, IMPLICIT]), Some(EXPLICIT));
        assert_eq!(choose(false, &[J2K_LOSSLESS, IMPLICIT]), Some(IMPLICIT));
        assert_eq!(choose(true, &["1.2.3.4"]), None);
        // Never asked to compress lossily on the fly: a lossy first choice is taken only alone.
        const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
        const J2K: &str = "1.2.840.10008.1.2.4.91";
        assert_eq!(choose(true, &[JPEG_BASELINE, EXPLICIT]), Some(EXPLICIT));
        assert_eq!(
            choose(true, &[J2K, J2K_LOSSLESS, EXPLICIT]),
            Some(J2K_LOSSLESS)
        );
        assert_eq!(choose(true, &[JPEG_BASELINE]), Some(JPEG_BASELINE));
    }

    #[test]
    fn window_roles_and_limits() {
        let r = rq(
            "GATE",
            "SCU",
            vec![pc(1, CT, &["1.2.840.10008.1.2"])],
            vec![
                SubItem::MaximumLength(16384),
                SubItem::AsynchronousOperationsWindow {
                    max_invoked: 0,
                    max_performed: 0,
                },
                SubItem::RoleSelection {
                    sop_class_uid: CT.as_bytes(),
                    scu_role: 1,
                    scp_role: 1,
                },
                SubItem::UserIdentityRq {
                    identity_type: 1,
                    positive_response_requested: 1,
                    primary: b"u",
                    secondary: b"",
                },
            ],
        );
        let Outcome::Accept { ac, negotiated } = negotiate(&r, &policy()) else {
            panic!()
        };
        assert_eq!(negotiated.peer_max_pdu, 16384);
        assert_eq!(negotiated.max_operations_performed, 8);
        let crate::ul::Pdu::AssociateAc(ac) = decode(&ac).unwrap() else {
            panic!()
        };
        let ui = ac.user_information();
        assert!(ui.contains(&SubItem::AsynchronousOperationsWindow {
            max_invoked: 8,
            max_performed: 1
        }));
        assert!(ui.contains(&SubItem::RoleSelection {
            sop_class_uid: CT.as_bytes(),
            scu_role: 1,
            scp_role: 0
        }));
        assert!(!ui
            .iter()
            .any(|s| matches!(s, SubItem::UserIdentityAc { .. })));
        let many: Vec<_> = (0..129)
            .map(|i| pc((2 * i + 1) as u8, CT, &["1.2.840.10008.1.2"]))
            .collect();
        assert_eq!(
            rejected(negotiate(&rq("GATE", "SCU", many, vec![]), &policy())),
            (1, 1, 1)
        );
    }
}
