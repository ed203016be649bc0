//! Part-10 files (PS3.10 §7.1): 128-byte preamble, `DICM`, the File Meta Information group we
//! build (explicit VR little endian), then the data set bytes exactly as received.

use crate::assoc::negotiation::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

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

fn element(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
    let padded = value.len() + value.len() % 2;
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(padded as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(padded as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    if value.len() % 2 == 1 {
        out.push(pad);
    }
}

/// Bytes of the Part-10 file of a data set of `data_set_len` bytes: [`header`] and the data set.
pub fn file_len(meta: &FileMeta, data_set_len: usize) -> u64 {
    (header(meta).len() + data_set_len) as u64
}

/// The preamble, `DICM` and the File Meta Information group.
pub fn header(meta: &FileMeta) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    element(&mut group, 0x0001, b"OB", &[0x00, 0x01], 0);
    element(&mut group, 0x0002, b"UI", meta.sop_class_uid.as_bytes(), 0);
    element(
        &mut group,
        0x0003,
        b"UI",
        meta.sop_instance_uid.as_bytes(),
        0,
    );
    element(
        &mut group,
        0x0010,
        b"UI",
        meta.transfer_syntax_uid.as_bytes(),
        0,
    );
    element(
        &mut group,
        0x0012,
        b"UI",
        IMPLEMENTATION_CLASS_UID.as_bytes(),
        0,
    );
    element(
        &mut group,
        0x0013,
        b"SH",
        IMPLEMENTATION_VERSION_NAME.as_bytes(),
        b' ',
    );
    if !meta.source_ae_title.is_empty() {
        element(
            &mut group,
            0x0016,
            b"AE",
            meta.source_ae_title.as_bytes(),
            b' ',
        );
    }
    if !meta.receiving_ae_title.is_empty() {
        element(
            &mut group,
            0x0018,
            b"AE",
            meta.receiving_ae_title.as_bytes(),
            b' ',
        );
    }
    if !meta.requestor_address.is_empty() {
        element(
            &mut group,
            0x0100,
            b"UI",
            IMPLEMENTATION_CLASS_UID.as_bytes(),
            0,
        );
        let info = [PEER_INFO, meta.requestor_address.as_bytes()].concat();
        element(&mut group, 0x0102, b"OB", &info, 0);
    }
    let mut out = Vec::with_capacity(128 + 4 + 12 + group.len());
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    element(
        &mut out,
        0x0000,
        b"UL",
        &(group.len() as u32).to_le_bytes(),
        0,
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
        use crate::dimse::{scan, tags};
        let enc = crate::assoc::transfer_syntax::by_uid(self.transfer_syntax_uid.as_bytes())
            .map(|t| t.encoding);
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
/// `dicom` export: [`crate::net::scu::store_files`]) and a folder export writes.
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
    let text = |v: &[u8]| String::from_utf8_lossy(crate::dimse::trim_padding(v)).into_owned();
    loop {
        if end.is_some_and(|e| pos >= e) {
            break;
        }
        let h = bytes.get(pos..pos + 8)?;
        let group = u16::from_le_bytes([h[0], h[1]]);
        if group != 0x0002 {
            break;
        }
        let elem = u16::from_le_bytes([h[2], h[3]]);
        let vr = [h[4], h[5]];
        let (len, hdr) = if matches!(&vr, b"OB" | b"OW" | b"UN" | b"UT" | b"SQ") {
            let l = bytes.get(pos + 8..pos + 12)?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([h[6], h[7]]) as usize, 8)
        };
        let v = bytes.get(pos + hdr..(pos + hdr).checked_add(len)?)?;
        match elem {
            0x0000 if end.is_none() && pos == 132 && v.len() == 4 => {
                let n = u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize;
                end = Some((pos + hdr + len).saturating_add(n));
            }
            0x0002 => out.sop_class_uid = text(v),
            0x0003 => out.sop_instance_uid = text(v),
            0x0010 => out.transfer_syntax_uid = text(v),
            0x0016 => out.source_ae_title = text(v).trim().to_string(),
            0x0018 => out.receiving_ae_title = text(v).trim().to_string(),
            0x0100 => ours = text(v) == IMPLEMENTATION_CLASS_UID,
            0x0102 if ours => {
                if let Some(a) = crate::dimse::trim_padding(v).strip_prefix(PEER_INFO) {
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
        element(
            &mut fake,
            0x0100,
            b"UI",
            IMPLEMENTATION_CLASS_UID.as_bytes(),
            0,
        );
        element(&mut fake, 0x0102, b"OB", b"peer=10.0.0.5", 0);
        forged.extend_from_slice(&fake);
        let p = parse(&forged).unwrap();
        assert_eq!(p.requestor_address, "", "a forged address was read");
        assert_eq!(p.data_set_offset, ds_at);
    }
}
