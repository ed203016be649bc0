//! Associations (PS3.8 §9.2): the Table 9-10 state machine for both sides, ARTIM and the node's
//! idle/DIMSE timers, and acceptor-side negotiation.
//!
//! Owns: association state and what is agreed in A-ASSOCIATE. Pure: no sockets, no clocks (time
//! is passed in as `Instant`), no unsafe. Must never block, and never act on a PDU the table does
//! not allow in the current state.
#![forbid(unsafe_code)]

pub mod identity;
pub mod machine;
pub mod negotiation;
pub mod storage_sop_classes;
pub mod transfer_syntax;

pub use machine::{Association, Event, NotAllowed, Received, Role, State, Timeouts};
pub use negotiation::{
    negotiate_from, AcceptedContext, AcceptorPolicy, KnownPeers, Negotiated, Outcome, Slots,
};
pub use transfer_syntax::{DatasetEncoding, TransferSyntax};

#[cfg(test)]
mod tests {
    use super::storage_sop_classes::STORAGE_SOP_CLASSES;
    use dicom_core::dictionary::{UidDictionary, UidType};
    use dicom_dictionary_std::StandardSopClassDictionary;

    /// The generated table is checked against dicom-dictionary-std at test time: every entry is
    /// a standard SOP class with that keyword, whose name says Storage.
    #[test]
    fn storage_sop_classes_match_dicom_dictionary_std() {
        assert!(STORAGE_SOP_CLASSES.len() > 150);
        for (uid, keyword) in STORAGE_SOP_CLASSES {
            let e = StandardSopClassDictionary
                .by_uid(uid)
                .unwrap_or_else(|| panic!("{uid}"));
            assert_eq!(e.alias, *keyword);
            assert_eq!(e.r#type, UidType::SopClass);
            assert!(e.name.contains("Storage"), "{}", e.name);
            assert!(!e.name.contains("Commitment"));
        }
        let mut sorted = STORAGE_SOP_CLASSES.to_vec();
        sorted.sort();
        assert_eq!(
            sorted, STORAGE_SOP_CLASSES,
            "binary search needs byte order"
        );
        for kw in [
            "CTImageStorage",
            "MRImageStorage",
            "RTPlanStorage",
            "ComprehensiveSRStorage",
        ] {
            let uid = StandardSopClassDictionary.by_keyword(kw).map(|e| e.uid);
            assert!(uid.is_some_and(|u| super::negotiation::is_storage_sop_class(u.as_bytes())));
        }
    }
}
