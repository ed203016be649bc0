//! Transfer syntaxes a store can keep without decoding pixel data (PS3.5 §10 and Annex A).
//!
//! We keep dataset bytes exactly as received, so every encapsulated syntax is accepted: its
//! dataset is explicit VR little endian and only the pixel data fragments are compressed. The
//! table is checked against dicom-dictionary-std's UID constants by a unit test.
//!
//! Owns the table and how each syntax encodes its data set ([`DatasetEncoding`]); negotiation,
//! the scan, the Part-10 files and the configuration ask it. No I/O.
#![forbid(unsafe_code)]

/// How the dataset (not the pixel data) of a transfer syntax is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetEncoding {
    ImplicitVrLittleEndian,
    ExplicitVrLittleEndian,
    ExplicitVrBigEndian,
    /// Explicit VR little endian compressed with raw deflate (PS3.5 §A.5).
    DeflatedExplicitVrLittleEndian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferSyntax {
    pub uid: &'static str,
    pub keyword: &'static str,
    pub encoding: DatasetEncoding,
}

/// Whether `ts` may be lossy (PS3.5 Annex A: JPEG baseline/extended and the retired lossy
/// processes, JPEG-LS near-lossless, JPEG 2000 (lossy-capable), JPEG 2000 part 2, the MPEG
/// and HEVC video syntaxes, high-throughput JPEG 2000, JPEG XL). A sender offering one of these
/// beside a lossless syntax may be offering to compress lossily on the fly.
pub fn is_lossy(ts: &TransferSyntax) -> bool {
    let Some(n) = ts.uid.strip_prefix("1.2.840.10008.1.2.4.") else {
        return false;
    };
    matches!(
        n,
        "50" | "51"
            | "52"
            | "53"
            | "54"
            | "55"
            | "56"
            | "59"
            | "60"
            | "61"
            | "62"
            | "63"
            | "64"
            | "81"
            | "91"
            | "93"
            | "100"
            | "101"
            | "102"
            | "103"
            | "104"
            | "105"
            | "106"
            | "107"
            | "108"
            | "112"
            | "203"
    )
}

/// Whether `ts` is one of the native (uncompressed, unencapsulated) encodings of PS3.5 §A.1–A.3:
/// implicit VR little endian, explicit VR little endian, explicit VR big endian.
pub fn is_native(ts: &TransferSyntax) -> bool {
    matches!(
        ts.uid,
        "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2.2"
    )
}

use DatasetEncoding::*;

macro_rules! ts {
    ($uid:expr, $kw:expr, $enc:expr) => {
        TransferSyntax {
            uid: $uid,
            keyword: $kw,
            encoding: $enc,
        }
    };
}

pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// Every transfer syntax we accept.
pub const TRANSFER_SYNTAXES: &[TransferSyntax] = &[
    ts!(
        "1.2.840.10008.1.2",
        "ImplicitVRLittleEndian",
        ImplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.1",
        "ExplicitVRLittleEndian",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.1.98",
        "EncapsulatedUncompressedExplicitVRLittleEndian",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.1.99",
        "DeflatedExplicitVRLittleEndian",
        DeflatedExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.2",
        "ExplicitVRBigEndian",
        ExplicitVrBigEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.50",
        "JPEGBaseline8Bit",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.51",
        "JPEGExtended12Bit",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.52",
        "JPEGExtended35",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.53",
        "JPEGSpectralSelectionNonHierarchical68",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.54",
        "JPEGSpectralSelectionNonHierarchical79",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.55",
        "JPEGFullProgressionNonHierarchical1012",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.56",
        "JPEGFullProgressionNonHierarchical1113",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.57",
        "JPEGLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.58",
        "JPEGLosslessNonHierarchical15",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.59",
        "JPEGExtendedHierarchical1618",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.60",
        "JPEGExtendedHierarchical1719",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.61",
        "JPEGSpectralSelectionHierarchical2022",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.62",
        "JPEGSpectralSelectionHierarchical2123",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.63",
        "JPEGFullProgressionHierarchical2426",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.64",
        "JPEGFullProgressionHierarchical2527",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.65",
        "JPEGLosslessHierarchical28",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.66",
        "JPEGLosslessHierarchical29",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.70",
        "JPEGLosslessSV1",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.80",
        "JPEGLSLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.81",
        "JPEGLSNearLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.90",
        "JPEG2000Lossless",
        ExplicitVrLittleEndian
    ),
    ts!("1.2.840.10008.1.2.4.91", "JPEG2000", ExplicitVrLittleEndian),
    ts!(
        "1.2.840.10008.1.2.4.92",
        "JPEG2000MCLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.93",
        "JPEG2000MC",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.100",
        "MPEG2MPML",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.100.1",
        "MPEG2MPMLF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.101",
        "MPEG2MPHL",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.101.1",
        "MPEG2MPHLF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.102",
        "MPEG4HP41",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.102.1",
        "MPEG4HP41F",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.103",
        "MPEG4HP41BD",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.103.1",
        "MPEG4HP41BDF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.104",
        "MPEG4HP422D",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.104.1",
        "MPEG4HP422DF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.105",
        "MPEG4HP423D",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.105.1",
        "MPEG4HP423DF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.106",
        "MPEG4HP42STEREO",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.106.1",
        "MPEG4HP42STEREOF",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.107",
        "HEVCMP51",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.108",
        "HEVCM10P51",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.110",
        "JPEGXLLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.111",
        "JPEGXLJPEGRecompression",
        ExplicitVrLittleEndian
    ),
    ts!("1.2.840.10008.1.2.4.112", "JPEGXL", ExplicitVrLittleEndian),
    ts!(
        "1.2.840.10008.1.2.4.201",
        "HTJ2KLossless",
        ExplicitVrLittleEndian
    ),
    ts!(
        "1.2.840.10008.1.2.4.202",
        "HTJ2KLosslessRPCL",
        ExplicitVrLittleEndian
    ),
    ts!("1.2.840.10008.1.2.4.203", "HTJ2K", ExplicitVrLittleEndian),
    ts!("1.2.840.10008.1.2.5", "RLELossless", ExplicitVrLittleEndian),
    ts!(
        "1.2.840.10008.1.2.8.1",
        "DeflatedImageFrameCompression",
        ExplicitVrLittleEndian
    ),
];

/// Looks up a transfer syntax by UID (a trailing NUL pad is ignored).
pub fn by_uid(uid: &[u8]) -> Option<&'static TransferSyntax> {
    let uid = super::uid::without_nul_pad(uid);
    TRANSFER_SYNTAXES.iter().find(|t| t.uid.as_bytes() == uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transfer_syntax_uid_is_well_formed_and_found() {
        for ts in TRANSFER_SYNTAXES {
            assert!(ts.uid.starts_with("1.2.840.10008.1."), "{}", ts.uid);
            assert!(super::super::uid::is_valid_uid(ts.uid.as_bytes()));
            assert_eq!(by_uid(ts.uid.as_bytes()), Some(ts));
        }
        assert_eq!(
            by_uid(b"1.2.840.10008.1.2.1\0").map(|t| t.keyword),
            Some("ExplicitVRLittleEndian")
        );
        assert_eq!(by_uid(b"1.2.840.10008.1.1"), None);
    }

    #[test]
    #[allow(deprecated)] // EXPLICIT_VR_BIG_ENDIAN is retired in the standard, still sent in practice
    fn uids_match_dicom_dictionary_std_constants() {
        use dicom_dictionary_std::uids as u;
        let pairs = [
            (u::IMPLICIT_VR_LITTLE_ENDIAN, "ImplicitVRLittleEndian"),
            (u::EXPLICIT_VR_LITTLE_ENDIAN, "ExplicitVRLittleEndian"),
            (u::EXPLICIT_VR_BIG_ENDIAN, "ExplicitVRBigEndian"),
            (
                u::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                "DeflatedExplicitVRLittleEndian",
            ),
            (u::JPEG_BASELINE8_BIT, "JPEGBaseline8Bit"),
            (u::JPEG_LOSSLESS_SV1, "JPEGLosslessSV1"),
            (u::JPEGLS_LOSSLESS, "JPEGLSLossless"),
            (u::JPEG2000_LOSSLESS, "JPEG2000Lossless"),
            (u::RLE_LOSSLESS, "RLELossless"),
            (u::HTJ2K_LOSSLESS, "HTJ2KLossless"),
            (u::HEVCMP51, "HEVCMP51"),
            (u::MPEG4HP41, "MPEG4HP41"),
        ];
        for (uid, kw) in pairs {
            assert_eq!(by_uid(uid.as_bytes()).map(|t| t.keyword), Some(kw), "{uid}");
        }
    }
}
