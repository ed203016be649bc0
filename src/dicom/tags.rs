//! The tags the crate names (PS3.6, as `group << 16 | element`), and [`ROUTING`], the tags the
//! node reads from every data set. Tags named by users (`[[input]]` rules, `group_by`) are
//! looked up by keyword in [`super::dictionary`] instead. Owns nothing else; no I/O.
#![forbid(unsafe_code)]

pub const SOP_CLASS_UID: u32 = 0x0008_0016;
pub const SOP_INSTANCE_UID: u32 = 0x0008_0018;
pub const STUDY_DATE: u32 = 0x0008_0020;
pub const QUERY_RETRIEVE_LEVEL: u32 = 0x0008_0052;
pub const MODALITY: u32 = 0x0008_0060;
pub const MODALITIES_IN_STUDY: u32 = 0x0008_0061;
pub const SERIES_DESCRIPTION: u32 = 0x0008_103E;
pub const PATIENT_NAME: u32 = 0x0010_0010;
pub const PATIENT_ID: u32 = 0x0010_0020;
pub const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
pub const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
pub const SERIES_NUMBER: u32 = 0x0020_0011;
pub const ACQUISITION_NUMBER: u32 = 0x0020_0012;
pub const INSTANCE_NUMBER: u32 = 0x0020_0013;
pub const IMAGES_IN_ACQUISITION: u32 = 0x0020_1002;
pub const NUMBER_OF_STUDY_RELATED_INSTANCES: u32 = 0x0020_1208;
pub const NUMBER_OF_FRAMES: u32 = 0x0028_0008;
pub const NUMBER_OF_SLICES: u32 = 0x0054_0081;
pub const PIXEL_DATA: u32 = 0x7FE0_0010;

/// Item, Item Delimitation Item and Sequence Delimitation Item (PS3.5 §7.5): no VR in any
/// encoding, a 32-bit length.
pub const ITEM: u32 = 0xFFFE_E000;
pub const ITEM_DELIMITATION_ITEM: u32 = 0xFFFE_E00D;
pub const SEQUENCE_DELIMITATION_ITEM: u32 = 0xFFFE_E0DD;

/// File Meta Information elements (PS3.10 §7.1, group 0002; always explicit VR little endian).
pub mod file_meta {
    pub const GROUP_LENGTH: u32 = 0x0002_0000;
    pub const INFORMATION_VERSION: u32 = 0x0002_0001;
    pub const MEDIA_STORAGE_SOP_CLASS_UID: u32 = 0x0002_0002;
    pub const MEDIA_STORAGE_SOP_INSTANCE_UID: u32 = 0x0002_0003;
    pub const TRANSFER_SYNTAX_UID: u32 = 0x0002_0010;
    pub const IMPLEMENTATION_CLASS_UID: u32 = 0x0002_0012;
    pub const IMPLEMENTATION_VERSION_NAME: u32 = 0x0002_0013;
    pub const SOURCE_APPLICATION_ENTITY_TITLE: u32 = 0x0002_0016;
    pub const RECEIVING_APPLICATION_ENTITY_TITLE: u32 = 0x0002_0018;
    pub const PRIVATE_INFORMATION_CREATOR_UID: u32 = 0x0002_0100;
    pub const PRIVATE_INFORMATION: u32 = 0x0002_0102;
}

/// The routing tags collected from every stored instance, sorted.
pub const ROUTING: &[u32] = &[
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_DATE,
    MODALITY,
    SERIES_DESCRIPTION,
    PATIENT_NAME,
    PATIENT_ID,
    STUDY_INSTANCE_UID,
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    ACQUISITION_NUMBER,
    INSTANCE_NUMBER,
    IMAGES_IN_ACQUISITION,
    NUMBER_OF_SLICES,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Each constant is the standard's tag of its keyword (dicom-dictionary-std).
    #[test]
    fn tags_match_the_dictionary() {
        let pairs = [
            (SOP_CLASS_UID, "SOPClassUID"),
            (SOP_INSTANCE_UID, "SOPInstanceUID"),
            (STUDY_DATE, "StudyDate"),
            (QUERY_RETRIEVE_LEVEL, "QueryRetrieveLevel"),
            (MODALITY, "Modality"),
            (MODALITIES_IN_STUDY, "ModalitiesInStudy"),
            (SERIES_DESCRIPTION, "SeriesDescription"),
            (PATIENT_NAME, "PatientName"),
            (PATIENT_ID, "PatientID"),
            (STUDY_INSTANCE_UID, "StudyInstanceUID"),
            (SERIES_INSTANCE_UID, "SeriesInstanceUID"),
            (SERIES_NUMBER, "SeriesNumber"),
            (ACQUISITION_NUMBER, "AcquisitionNumber"),
            (INSTANCE_NUMBER, "InstanceNumber"),
            (IMAGES_IN_ACQUISITION, "ImagesInAcquisition"),
            (
                NUMBER_OF_STUDY_RELATED_INSTANCES,
                "NumberOfStudyRelatedInstances",
            ),
            (NUMBER_OF_FRAMES, "NumberOfFrames"),
            (NUMBER_OF_SLICES, "NumberOfSlices"),
            (PIXEL_DATA, "PixelData"),
            (file_meta::GROUP_LENGTH, "FileMetaInformationGroupLength"),
            (file_meta::INFORMATION_VERSION, "FileMetaInformationVersion"),
            (
                file_meta::MEDIA_STORAGE_SOP_CLASS_UID,
                "MediaStorageSOPClassUID",
            ),
            (
                file_meta::MEDIA_STORAGE_SOP_INSTANCE_UID,
                "MediaStorageSOPInstanceUID",
            ),
            (file_meta::TRANSFER_SYNTAX_UID, "TransferSyntaxUID"),
            (
                file_meta::IMPLEMENTATION_CLASS_UID,
                "ImplementationClassUID",
            ),
            (
                file_meta::IMPLEMENTATION_VERSION_NAME,
                "ImplementationVersionName",
            ),
            (
                file_meta::SOURCE_APPLICATION_ENTITY_TITLE,
                "SourceApplicationEntityTitle",
            ),
            (
                file_meta::RECEIVING_APPLICATION_ENTITY_TITLE,
                "ReceivingApplicationEntityTitle",
            ),
            (
                file_meta::PRIVATE_INFORMATION_CREATOR_UID,
                "PrivateInformationCreatorUID",
            ),
            (file_meta::PRIVATE_INFORMATION, "PrivateInformation"),
        ];
        for (tag, keyword) in pairs {
            assert_eq!(
                super::super::dictionary::keyword_tag(keyword).map(|t| t.0),
                Ok(tag),
                "{keyword}"
            );
        }
        let mut sorted = ROUTING.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, ROUTING);
    }
}
