//! The Query/Retrieve requestor's messages for prior studies (PS3.4 Annex C): the identifiers of
//! a C-FIND at STUDY level and of a C-MOVE of one study, in the Patient Root Query/Retrieve
//! Information Model (PS3.4 C.6.1), and what is read from each C-FIND response's identifier.
//!
//! Owns: which keys are asked for and how a match is judged (a match must name the patient
//! asked about and carry a valid Study Instance UID). Pure: no sockets, no clocks; the
//! exchange itself is `net::scu`'s. A response identifier is read with the bounded routing
//! [`scan`], never a full parser: the identifiers come from a peer. The information models'
//! SOP classes are [`crate::dicom::sop_class`]'s.
#![forbid(unsafe_code)]

use crate::dicom::element;
use crate::dicom::scan;
use crate::dicom::tags::{
    MODALITIES_IN_STUDY, NUMBER_OF_STUDY_RELATED_INSTANCES, PATIENT_ID, QUERY_RETRIEVE_LEVEL,
    STUDY_DATE, STUDY_INSTANCE_UID,
};
use crate::dicom::transfer_syntax::DatasetEncoding;
use crate::dicom::uid::is_valid_uid;
use crate::dicom::vr::Vr;

/// The tags read from a C-FIND response identifier, sorted.
const RETURN_KEYS: &[u32] = &[
    STUDY_DATE,
    MODALITIES_IN_STUDY,
    PATIENT_ID,
    STUDY_INSTANCE_UID,
    NUMBER_OF_STUDY_RELATED_INSTANCES,
];

/// A C-FIND for one patient's studies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyQuery {
    /// The patient, matched by single value matching (PS3.4 C.2.2.2.1).
    pub patient_id: String,
    /// Studies on or after this date (YYYYMMDD), by range matching (C.2.2.2.5); `None`: any.
    pub since: Option<String>,
}

/// Why a query cannot be made safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The Patient ID is empty, or holds a character that C-FIND would read as a wildcard
    /// (`*`, `?`: PS3.4 C.2.2.2.4) or a value separator (`\`), so the query could match other
    /// patients.
    UnsafePatientId(String),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The ID itself is not written: messages end up in logs ([log] phi).
            QueryError::UnsafePatientId(_) => f.write_str(
                "the Patient ID is empty or holds *, ? or \\, which C-FIND would match as a \
                 pattern: not queried",
            ),
        }
    }
}

/// One study a C-FIND response names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyMatch {
    pub study_instance_uid: String,
    /// YYYYMMDD as the peer gave it (empty when it gave none).
    pub study_date: String,
    pub modalities: Vec<String>,
    /// Number of Study Related Instances, when the peer returned it.
    pub instances: Option<u32>,
}

/// Why a C-FIND response identifier is not a usable match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchError {
    /// The identifier could not be read (malformed, or beyond the scan's bounds).
    Unreadable(String),
    /// It names another patient than the one asked about.
    OtherPatient(String),
    /// No Study Instance UID, or not a valid UID (PS3.5 §9.1).
    BadStudyUid,
}

impl std::fmt::Display for MatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatchError::Unreadable(e) => write!(f, "unreadable identifier: {e}"),
            // The other patient's ID is not written: messages end up in logs ([log] phi).
            MatchError::OtherPatient(_) => f.write_str("a match for another patient"),
            MatchError::BadStudyUid => f.write_str("no valid Study Instance UID"),
        }
    }
}

fn safe_patient_id(id: &str) -> Result<&str, QueryError> {
    let t = id.trim();
    if t.is_empty() || t.contains(['*', '?', '\\']) {
        return Err(QueryError::UnsafePatientId(id.to_string()));
    }
    Ok(t)
}

/// Appends one element in `enc` (implicit or explicit VR little endian: the syntaxes we
/// propose for Query/Retrieve) with the one element writer.
fn put(out: &mut Vec<u8>, enc: DatasetEncoding, tag: u32, vr: Vr, value: &str) {
    element::put(out, enc, tag, vr, value.as_bytes());
}

/// The C-FIND identifier for `q` at STUDY level (PS3.4 C.6.1.2.2): Patient ID (the unique key
/// of the patient level above), Study Date (a range when `since`), and empty return keys for
/// the Study Instance UID (the level's unique key), Modalities in Study and Number of Study
/// Related Instances. Elements in ascending tag order (PS3.5 §7.1).
pub fn study_find_identifier(q: &StudyQuery, enc: DatasetEncoding) -> Result<Vec<u8>, QueryError> {
    let id = safe_patient_id(&q.patient_id)?;
    let mut out = Vec::with_capacity(128);
    let date = q
        .since
        .as_ref()
        .map(|d| format!("{d}-"))
        .unwrap_or_default();
    put(&mut out, enc, STUDY_DATE, Vr::DA, &date);
    put(&mut out, enc, QUERY_RETRIEVE_LEVEL, Vr::CS, "STUDY");
    put(&mut out, enc, MODALITIES_IN_STUDY, Vr::CS, "");
    put(&mut out, enc, PATIENT_ID, Vr::LO, id);
    put(&mut out, enc, STUDY_INSTANCE_UID, Vr::UI, "");
    put(&mut out, enc, NUMBER_OF_STUDY_RELATED_INSTANCES, Vr::IS, "");
    Ok(out)
}

/// The C-MOVE identifier for one study of one patient (PS3.4 C.6.1.2.2: the unique keys of
/// the patient and study levels).
pub fn study_move_identifier(
    patient_id: &str,
    study_instance_uid: &str,
    enc: DatasetEncoding,
) -> Result<Vec<u8>, QueryError> {
    let id = safe_patient_id(patient_id)?;
    let mut out = Vec::with_capacity(96);
    put(&mut out, enc, QUERY_RETRIEVE_LEVEL, Vr::CS, "STUDY");
    put(&mut out, enc, PATIENT_ID, Vr::LO, id);
    put(
        &mut out,
        enc,
        STUDY_INSTANCE_UID,
        Vr::UI,
        study_instance_uid,
    );
    Ok(out)
}

/// Reads one C-FIND response identifier (a pending response's data set) for `patient_id`.
pub fn read_study_match(
    identifier: &[u8],
    enc: DatasetEncoding,
    patient_id: &str,
) -> Result<StudyMatch, MatchError> {
    let values = scan::scan(identifier, enc, RETURN_KEYS)
        .map_err(|e| MatchError::Unreadable(e.to_string()))?;
    let text = |tag| values.text(tag).unwrap_or("").trim().to_string();
    let id = text(PATIENT_ID);
    // A peer may leave the key out of its answer; one that names another patient is wrong.
    if !id.is_empty() && id != patient_id.trim() {
        return Err(MatchError::OtherPatient(id));
    }
    let uid = text(STUDY_INSTANCE_UID);
    if !is_valid_uid(uid.as_bytes()) {
        return Err(MatchError::BadStudyUid);
    }
    let modalities = text(MODALITIES_IN_STUDY)
        .split('\\')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    Ok(StudyMatch {
        study_instance_uid: uid,
        study_date: text(STUDY_DATE),
        modalities,
        instances: text(NUMBER_OF_STUDY_RELATED_INSTANCES).parse().ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use DatasetEncoding::{ExplicitVrLittleEndian as Explicit, ImplicitVrLittleEndian as Implicit};

    fn q(id: &str) -> StudyQuery {
        StudyQuery {
            patient_id: id.into(),
            since: Some("20200101".into()),
        }
    }

    /// A Patient ID that C-FIND would match as a pattern (or an empty one, which matches
    /// every patient: PS3.4 C.2.2.2.3) is never sent: the query could fetch other patients'
    /// studies into this patient's batch.
    #[test]
    fn a_patient_id_with_wildcards_is_never_queried() {
        for id in ["", "  ", "PAT*", "P?T", "A\\B"] {
            assert!(
                matches!(
                    study_find_identifier(&q(id), Explicit),
                    Err(QueryError::UnsafePatientId(_))
                ),
                "{id:?}"
            );
            assert!(
                study_move_identifier(id, "1.2.3", Explicit).is_err(),
                "{id:?}"
            );
        }
    }

    /// The identifier we send reads back, in both encodings, with the keys we asked for; a
    /// response identifier for another patient, or without a valid study UID, is refused.
    #[test]
    fn identifiers_read_back_and_matches_are_checked() {
        for enc in [Explicit, Implicit] {
            let f = study_find_identifier(&q("PAT1"), enc).unwrap();
            assert_eq!(f.len() % 2, 0);
            let v = scan::scan(&f, enc, &[STUDY_DATE, QUERY_RETRIEVE_LEVEL, PATIENT_ID]).unwrap();
            assert_eq!(v.text(STUDY_DATE), Some("20200101-"));
            assert_eq!(v.text(QUERY_RETRIEVE_LEVEL).map(str::trim), Some("STUDY"));
            assert_eq!(v.text(PATIENT_ID).map(str::trim), Some("PAT1"));
            // A response: the same keys filled in.
            let mut r = Vec::new();
            put(&mut r, enc, STUDY_DATE, Vr::DA, "20210304");
            put(&mut r, enc, MODALITIES_IN_STUDY, Vr::CS, "CT\\SR");
            put(&mut r, enc, PATIENT_ID, Vr::LO, "PAT1");
            put(
                &mut r,
                enc,
                STUDY_INSTANCE_UID,
                Vr::UI,
                "1.2.826.0.1.3680043.10.77",
            );
            put(&mut r, enc, NUMBER_OF_STUDY_RELATED_INSTANCES, Vr::IS, "12");
            let m = read_study_match(&r, enc, "PAT1").unwrap();
            assert_eq!(m.study_instance_uid, "1.2.826.0.1.3680043.10.77");
            assert_eq!(m.study_date, "20210304");
            assert_eq!(m.modalities, vec!["CT", "SR"]);
            assert_eq!(m.instances, Some(12));
            assert_eq!(
                read_study_match(&r, enc, "PAT2"),
                Err(MatchError::OtherPatient("PAT1".into()))
            );
            let mut bad = Vec::new();
            put(&mut bad, enc, STUDY_INSTANCE_UID, Vr::UI, "1.2.x");
            assert_eq!(
                read_study_match(&bad, enc, "PAT1"),
                Err(MatchError::BadStudyUid)
            );
            assert!(matches!(
                read_study_match(&r[..r.len() - 3], enc, "PAT1"),
                Err(MatchError::Unreadable(_))
            ));
        }
    }
}
