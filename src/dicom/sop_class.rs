//! SOP classes (PS3.4) the node names, and which abstract syntaxes count as storage: the
//! generated table of Storage SOP classes ([`super::storage_sop_classes`]), the standard's other
//! UIDs, and vendors' private classes. Owns these rules; negotiation and the configuration's
//! checks ask them. No I/O.
#![forbid(unsafe_code)]

use super::storage_sop_classes::STORAGE_SOP_CLASSES;
use super::uid::{is_valid_uid, without_nul_pad, DICOM_UID_ROOT};

/// Verification SOP Class, PS3.4 Annex A.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// CT Image Storage, PS3.4 B.5.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Patient Root Query/Retrieve Information Model - FIND (PS3.4 C.6.1.1.2).
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
/// Patient Root Query/Retrieve Information Model - MOVE (PS3.4 C.6.1.1.3).
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";

/// Is this a storage SOP class of the standard (the generated table is sorted by UID bytes)?
/// A trailing NUL pad is ignored.
pub fn is_storage_sop_class(uid: &[u8]) -> bool {
    let uid = without_nul_pad(uid);
    STORAGE_SOP_CLASSES
        .binary_search_by(|(u, _)| u.as_bytes().cmp(uid))
        .is_ok()
}

/// Is this a UID under the standard's root that is not a storage SOP class of our table: a
/// query/retrieve model, a Meta SOP class (1.2.840.10008.5.1.1.9), a well-known SOP instance
/// (1.2.840.10008.1.20.1.1), a service class, a transfer syntax, the application context,
/// Verification, ... (or a storage class newer than our table, which we cannot tell apart).
pub fn is_standard_non_storage_uid(uid: &[u8]) -> bool {
    let uid = without_nul_pad(uid);
    uid.starts_with(DICOM_UID_ROOT) && !is_storage_sop_class(uid)
}

/// Is this abstract syntax one that `[node] accept_unknown_sop_classes` takes for storage: a
/// syntactically valid UID (PS3.5 §9.1, [`super::uid`]) outside the standard's root
/// `1.2.840.10008.` (every standard UID that is no storage SOP class of our table is something
/// else: see [`is_standard_non_storage_uid`]). A vendor's private SOP class (Siemens CSA
/// Non-Image Storage, 1.3.12.2.1107.5.9.1) is.
pub fn is_unknown_sop_class(uid: &[u8]) -> bool {
    let uid = without_nul_pad(uid);
    is_valid_uid(uid) && !is_standard_non_storage_uid(uid)
}

#[cfg(test)]
mod tests {
    use super::*;
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
            assert!(uid.is_some_and(|u| is_storage_sop_class(u.as_bytes())));
        }
        for (uid, kw) in [
            (VERIFICATION, "Verification"),
            (CT_IMAGE_STORAGE, "CTImageStorage"),
            (
                PATIENT_ROOT_FIND,
                "PatientRootQueryRetrieveInformationModelFind",
            ),
            (
                PATIENT_ROOT_MOVE,
                "PatientRootQueryRetrieveInformationModelMove",
            ),
        ] {
            assert_eq!(
                StandardSopClassDictionary.by_uid(uid).map(|e| e.alias),
                Some(kw)
            );
        }
        assert!(is_storage_sop_class(b"1.2.840.10008.5.1.4.1.1.2\0"));
        assert!(is_standard_non_storage_uid(VERIFICATION.as_bytes()));
        assert!(is_unknown_sop_class(b"1.3.12.2.1107.5.9.1"));
        assert!(!is_unknown_sop_class(PATIENT_ROOT_FIND.as_bytes()));
    }
}
