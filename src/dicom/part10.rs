//! Part-10 files (PS3.10 §7.1): 128-byte preamble, `DICM`, the File Meta Information group we
//! build (explicit VR little endian), then the data set bytes exactly as received; and the
//! bounded reader of such a file's meta group.
//!
//! Owns the meta group's layout (what we write, and what we believe when we read one back: our
//! Private Information only under our Implementation Class UID, nothing past the group length).
//! Pure: works on bytes, never on files; never panics on any input.
#![forbid(unsafe_code)]

use super::element::put;
use super::implementation::IMPLEMENTATION_CLASS_UID;
use super::implementation::IMPLEMENTATION_VERSION_NAME;
use super::tags::file_meta as t;
use super::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian as META;
use super::vr::{trim_padding, Vr};

/// What the file meta group records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Source AE Title (0002,0016): the Calling AE Title of the association that sent it.
    pub source_ae_title: String,
    /// Receiving AE Title (0002,0018): the Called AE Title it was sent to.
    pub receiving_ae_title: String,
    /// The requestor's IP address (empty: unknown), kept as Private Information (0002,0102)
    /// under our Implementation Class UID as its creator (0002,0100): a `peer` rule is checked
    /// against it again when the instance is recovered after a restart.
    pub requestor_address: String,
}

/// The prefix of the Private Information (0002,0102) we write.
const PEER_INFO: &[u8] = b"peer=";

/// Bytes of the Part-10 file of a data set of `data_set_len` bytes: [`header`] and the data set.
pub fn file_len(meta: &FileMeta, data_set_len: usize) -> u64 {
    (header(meta).len() + data_set_len) as u64
}

/// The preamble, `DICM` and the File Meta Information group (PS3.10 §7.1).
pub fn header(meta: &FileMeta) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    let g = &mut group;
    put(g, META, t::INFORMATION_VERSION, Vr::OB, &[0x00, 0x01]);
    let class = meta.sop_class_uid.as_bytes();
    put(g, META, t::MEDIA_STORAGE_SOP_CLASS_UID, Vr::UI, class);
    let instance = meta.sop_instance_uid.as_bytes();
    put(g, META, t::MEDIA_STORAGE_SOP_INSTANCE_UID, Vr::UI, instance);
    let ts = meta.transfer_syntax_uid.as_bytes();
    put(g, META, t::TRANSFER_SYNTAX_UID, Vr::UI, ts);
    let ours = IMPLEMENTATION_CLASS_UID.as_bytes();
    put(g, META, t::IMPLEMENTATION_CLASS_UID, Vr::UI, ours);
    let version = IMPLEMENTATION_VERSION_NAME.as_bytes();
    put(g, META, t::IMPLEMENTATION_VERSION_NAME, Vr::SH, version);
    if !meta.source_ae_title.is_empty() {
        let ae = meta.source_ae_title.as_bytes();
        put(g, META, t::SOURCE_APPLICATION_ENTITY_TITLE, Vr::AE, ae);
    }
    if !meta.receiving_ae_title.is_empty() {
        let ae = meta.receiving_ae_title.as_bytes();
        put(g, META, t::RECEIVING_APPLICATION_ENTITY_TITLE, Vr::AE, ae);
    }
    if !meta.requestor_address.is_empty() {
        put(g, META, t::PRIVATE_INFORMATION_CREATOR_UID, Vr::UI, ours);
        let info = [PEER_INFO, meta.requestor_address.as_bytes()].concat();
        put(g, META, t::PRIVATE_INFORMATION, Vr::OB, &info);
    }
    let mut out = Vec::with_capacity(128 + 4 + 12 + group.len());
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    let group_len = u32::try_from(group.len()).unwrap_or(u32::MAX);
    put(
        &mut out,
        META,
        t::GROUP_LENGTH,
        Vr::UL,
        &group_len.to_le_bytes(),
    );
    out.extend_from_slice(&group);
    out
}

/// A Part-10 file read back: its meta values and where the data set starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFile {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Source Application Entity Title (0002,0016): the Calling AE Title that sent it to us.
    pub source_ae_title: String,
    /// Receiving AE Title (0002,0018): the Called AE Title it was sent to (empty: not kept).
    pub receiving_ae_title: String,
    /// The requestor's IP address from our Private Information (empty: not kept).
    pub requestor_address: String,
    pub data_set_offset: usize,
}

impl ParsedFile {
    /// The SOP Class and Instance UIDs the data set itself carries (found by the bounded scan),
    /// falling back to the file meta's. A requestor must name the instance it sends, and some
    /// files' meta disagrees with their data set (pydicom's rtplan.dcm and rtdose.dcm).
    pub fn data_set_sop_uids(&self, file: &[u8]) -> (String, String) {
        use super::{scan, tags};
        let enc =
            super::transfer_syntax::by_uid(self.transfer_syntax_uid.as_bytes()).map(|t| t.encoding);
        let found = enc.and_then(|enc| {
            let ds = file.get(self.data_set_offset..)?;
            scan::scan(ds, enc, &[tags::SOP_CLASS_UID, tags::SOP_INSTANCE_UID]).ok()
        });
        let get = |tag, fallback: &String| {
            found
                .as_ref()
                .and_then(|s| s.uid(tag))
                .filter(|u| !u.is_empty())
                .map(|u| String::from_utf8_lossy(u).into_owned())
                .unwrap_or_else(|| fallback.clone())
        };
        (
            get(tags::SOP_CLASS_UID, &self.sop_class_uid),
            get(tags::SOP_INSTANCE_UID, &self.sop_instance_uid),
        )
    }
}

/// A whole Part-10 file in memory, named as its data set names itself
/// ([`ParsedFile::data_set_sop_uids`]): what the requestor sends (`dicomgate store`, the
/// `dicom` export, through `net::scu::store_files`) and a folder export writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFile {
    pub bytes: Vec<u8>,
    pub data_set_offset: usize,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// From the file meta (empty when the meta has none).
    pub transfer_syntax_uid: String,
}

impl InstanceFile {
    /// `None` unless `bytes` is a Part-10 file ([`parse`]).
    pub fn parse(bytes: Vec<u8>) -> Option<InstanceFile> {
        let meta = parse(&bytes)?;
        let (sop_class_uid, sop_instance_uid) = meta.data_set_sop_uids(&bytes);
        Some(InstanceFile {
            data_set_offset: meta.data_set_offset,
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid: meta.transfer_syntax_uid,
            bytes,
        })
    }

    /// The data set's bytes, as stored.
    pub fn data_set(&self) -> &[u8] {
        self.bytes.get(self.data_set_offset..).unwrap_or_default()
    }
}

/// Reads the File Meta Information of a Part-10 file (bounded: the group length is checked
/// against the file). Used by `dicomgate store` and the tests.
pub fn parse(bytes: &[u8]) -> Option<ParsedFile> {
    if bytes.get(128..132)? != b"DICM" {
        return None;
    }
    let mut pos = 132;
    let mut out = ParsedFile {
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        transfer_syntax_uid: String::new(),
        source_ae_title: String::new(),
        receiving_ae_title: String::new(),
        requestor_address: String::new(),
        data_set_offset: 0,
    };
    let mut ours = false;
    // Where the group ends by its File Meta Information Group Length (0002,0000), when the file
    // has one (ours always do): elements of group 0002 after it belong to the data set, which
    // a peer sent, and must not be read as our meta (found in review: a data set starting with
    // (0002,0102) could forge the requestor address a `peer` rule is checked against after a
    // restart). Files without it (other writers') are read while the group lasts.
    let mut end: Option<usize> = None;
    let text = |v: &[u8]| String::from_utf8_lossy(trim_padding(v)).into_owned();
    loop {
        if end.is_some_and(|e| pos >= e) {
            break;
        }
        let h = bytes.get(pos..pos + 8)?;
        let group = u16::from_le_bytes([h[0], h[1]]);
        if group != 0x0002 {
            break;
        }
        let tag = 0x0002_0000 | u32::from(u16::from_le_bytes([h[2], h[3]]));
        let vr = [h[4], h[5]];
        let (len, hdr) = if Vr(vr).has_4_byte_length() {
            let l = bytes.get(pos + 8..pos + 12)?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([h[6], h[7]]) as usize, 8)
        };
        let v = bytes.get(pos + hdr..(pos + hdr).checked_add(len)?)?;
        match tag {
            t::GROUP_LENGTH if end.is_none() && pos == 132 && v.len() == 4 => {
                let n = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize;
                end = Some((pos + hdr + len).saturating_add(n));
            }
            t::MEDIA_STORAGE_SOP_CLASS_UID => out.sop_class_uid = text(v),
            t::MEDIA_STORAGE_SOP_INSTANCE_UID => out.sop_instance_uid = text(v),
            t::TRANSFER_SYNTAX_UID => out.transfer_syntax_uid = text(v),
            t::SOURCE_APPLICATION_ENTITY_TITLE => out.source_ae_title = text(v).trim().to_string(),
            t::RECEIVING_APPLICATION_ENTITY_TITLE => {
                out.receiving_ae_title = text(v).trim().to_string()
            }
            t::PRIVATE_INFORMATION_CREATOR_UID => ours = text(v) == IMPLEMENTATION_CLASS_UID,
            t::PRIVATE_INFORMATION if ours => {
                if let Some(a) = trim_padding(v).strip_prefix(PEER_INFO) {
                    out.requestor_address = String::from_utf8_lossy(a).into_owned();
                }
            }
            _ => {}
        }
        pos += hdr + len;
    }
    out.data_set_offset = pos;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parses_back() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            source_ae_title: "SCU".into(),
            receiving_ae_title: "DICOMGATE".into(),
            requestor_address: "fe80::1".into(),
        };
        let mut f = header(&meta);
        let ds_at = f.len();
        f.extend_from_slice(&[0x10, 0, 0x20, 0, b'L', b'O', 2, 0, b'A', b'B']);
        let p = parse(&f).unwrap();
        assert_eq!(p.sop_class_uid, meta.sop_class_uid);
        assert_eq!(p.sop_instance_uid, "1.2.3");
        assert_eq!(p.receiving_ae_title, "DICOMGATE");
        assert_eq!(p.requestor_address, "fe80::1");
        assert_eq!(p.transfer_syntax_uid, meta.transfer_syntax_uid);
        assert_eq!(p.data_set_offset, ds_at);
        assert_eq!(ds_at % 2, 0);
    }

    /// Found in review: group 0002 elements at the start of a data set (a peer's bytes) were
    /// read as our meta, so a peer could forge the requestor address a `peer` rule is checked
    /// against after a restart; the group length bounds the meta.
    #[test]
    fn group_0002_elements_in_the_data_set_are_not_read_as_meta() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            ..FileMeta::default()
        };
        let mut forged = header(&FileMeta {
            requestor_address: String::new(),
            ..meta.clone()
        });
        let ds_at = forged.len();
        let mut fake = Vec::new();
        let ours = IMPLEMENTATION_CLASS_UID.as_bytes();
        put(
            &mut fake,
            META,
            t::PRIVATE_INFORMATION_CREATOR_UID,
            Vr::UI,
            ours,
        );
        put(
            &mut fake,
            META,
            t::PRIVATE_INFORMATION,
            Vr::OB,
            b"peer=10.0.0.5",
        );
        forged.extend_from_slice(&fake);
        let p = parse(&forged).unwrap();
        assert_eq!(p.requestor_address, "", "a forged address was read");
        assert_eq!(p.data_set_offset, ds_at);
    }

    /// Issue 11 (regression): `parse` read a 16-bit length for every VR but OB, OW, UN, UT and
    /// SQ, so a file meta holding (0002,0026) Source Presentation Address (VR UR, a 32-bit
    /// length per PS3.5 §7.1.2) was misread: the data set was taken to start inside it.
    #[test]
    fn a_ur_source_presentation_address_in_the_file_meta_is_read_with_its_4_byte_length() {
        let el2 = |out: &mut Vec<u8>, e: u16, vr: &[u8; 2], v: &[u8]| {
            out.extend_from_slice(&[0x02, 0x00]);
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(vr);
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
            out.extend_from_slice(v);
        };
        let mut group = Vec::new();
        el2(&mut group, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        el2(&mut group, 0x0003, b"UI", b"1.2.3\0");
        el2(&mut group, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        let url = b"dicom://modality.example:104";
        group.extend_from_slice(&[0x02, 0x00, 0x26, 0x00, b'U', b'R', 0, 0]);
        group.extend_from_slice(&(url.len() as u32).to_le_bytes());
        group.extend_from_slice(url);
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        el2(&mut f, 0x0000, b"UL", &(group.len() as u32).to_le_bytes());
        f.extend_from_slice(&group);
        let ds_at = f.len();
        f.extend_from_slice(&[0x10, 0, 0x20, 0, b'L', b'O', 4, 0, b'P', b'A', b'T', b'1']);
        let p = parse(&f).unwrap();
        assert_eq!(p.transfer_syntax_uid, "1.2.840.10008.1.2.1");
        assert_eq!(
            p.data_set_offset, ds_at,
            "the data set starts after the UR element"
        );
    }
}
