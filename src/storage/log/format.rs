//! The segment log's on-disk format, version 2 (docs/segment-log.md is the reference): segment
//! headers, instance records and release entries, encoded and decoded. Pure: no files, no
//! clocks; decoding never trusts a length it has not bounded by the bytes at hand, never
//! panics, and allocates at most the record it returns (recovery reads whatever is on disk).
//!
//! All integers are little endian. Checksums are CRC32C (Castagnoli), as in ext4, iSCSI and
//! Kafka's record batches.
#![forbid(unsafe_code)]

/// Format version written in every segment header. Version 2 added record kind 2 (the
/// requestor's Called AE Title and address); version 1 segments, whose records are all kind 1,
/// are still read. A build that knows only version 1 moves a version 2 segment aside (it never
/// mistakes a record it cannot read for a torn tail).
pub const VERSION: u32 = 2;
/// The oldest segment version still read.
pub const OLDEST_VERSION: u32 = 1;
/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DGSEGLOG";
/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// First bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"DGR1";
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Records start at multiples of this.
pub const ALIGN: usize = 8;
/// Bytes of one release entry in a segment's `.done` file.
pub const RELEASE_LEN: usize = 16;
/// Record kind: one stored instance (format version 1: no Called AE Title, no address).
pub const KIND_INSTANCE_V1: u8 = 1;
/// Record kind: one stored instance, with the requestor's Called AE Title and address.
pub const KIND_INSTANCE: u8 = 2;

/// A segment file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    pub segment_bytes: u64,
    pub created_ms: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header, if `b` starts with a valid one of this version.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        let h = b.get(..SEGMENT_HEADER_LEN).ok_or(FormatError::Truncated)?;
        if h[..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if u32_at(h, 60) != crc32c::crc32c(&h[..60]) {
            return Err(FormatError::BadChecksum);
        }
        let version = u32_at(h, 8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(FormatError::UnknownVersion(version));
        }
        Ok(SegmentHeader {
            seq: u64_at(h, 16),
            segment_bytes: u64_at(h, 24),
            created_ms: u64_at(h, 32),
        })
    }
}

/// Why bytes are not a valid header, record or entry. At the end of a segment's valid records
/// this is the torn (or never written) tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    Truncated,
    BadMagic,
    BadChecksum,
    UnknownVersion(u32),
    /// A record of another segment (a recycled segment's old contents).
    WrongSegment,
    BadLength,
    BadField(&'static str),
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::Truncated => f.write_str("truncated"),
            FormatError::BadMagic => f.write_str("bad magic"),
            FormatError::BadChecksum => f.write_str("checksum mismatch"),
            FormatError::UnknownVersion(v) => write!(f, "unknown format version {v}"),
            FormatError::WrongSegment => f.write_str("record of another segment"),
            FormatError::BadLength => f.write_str("bad length"),
            FormatError::BadField(w) => write!(f, "bad field: {w}"),
        }
    }
}

impl std::error::Error for FormatError {}

/// What an instance record holds besides the data set: enough to rebuild its Part-10 file and
/// its place under `patients/`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub source_ae_title: String,
    pub patient_id: Vec<u8>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub received_ms: u64,
    /// The Called AE Title the instance was sent to (empty: not kept, a kind 1 record).
    pub receiving_ae_title: String,
    /// The requestor's IP address (empty: not kept).
    pub requestor_address: String,
}

/// A decoded instance record, borrowing its data set from the bytes it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub meta: InstanceMeta,
    pub data_set: &'a [u8],
    /// Bytes the record takes in the segment, padding included.
    pub stride: usize,
}

/// Bytes an instance record takes in a segment (header, body, padding).
pub fn record_stride(meta: &InstanceMeta, data_set_len: usize) -> usize {
    let body = body_len(meta, data_set_len);
    (RECORD_HEADER_LEN + body).div_ceil(ALIGN) * ALIGN
}

fn body_len(meta: &InstanceMeta, data_set_len: usize) -> usize {
    1 + [
        meta.sop_class_uid.len(),
        meta.sop_instance_uid.len(),
        meta.transfer_syntax_uid.len(),
        meta.source_ae_title.len(),
        meta.patient_id.len(),
        meta.study_uid.as_ref().map_or(0, String::len),
        meta.series_uid.as_ref().map_or(0, String::len),
        meta.receiving_ae_title.len(),
        meta.requestor_address.len(),
    ]
    .iter()
    .map(|l| 2 + l)
    .sum::<usize>()
        + 8
        + 4
        + data_set_len
}

/// The body (everything after the header) of an instance record; its checksum can be computed
/// before the record's place in the log is known. Fields longer than 65,535 bytes are refused
/// (UIDs are at most 64, AE titles 16, a Patient ID 64).
pub fn encode_body(
    meta: &InstanceMeta,
    data_set: &[u8],
    out: &mut Vec<u8>,
) -> Result<u32, FormatError> {
    let start = out.len();
    out.reserve(body_len(meta, data_set.len()));
    out.push(KIND_INSTANCE);
    let fields: [&[u8]; 9] = [
        meta.sop_class_uid.as_bytes(),
        meta.sop_instance_uid.as_bytes(),
        meta.transfer_syntax_uid.as_bytes(),
        meta.source_ae_title.as_bytes(),
        &meta.patient_id,
        meta.study_uid.as_deref().unwrap_or("").as_bytes(),
        meta.series_uid.as_deref().unwrap_or("").as_bytes(),
        meta.receiving_ae_title.as_bytes(),
        meta.requestor_address.as_bytes(),
    ];
    for f in fields {
        let n = u16::try_from(f.len()).map_err(|_| FormatError::BadField("field too long"))?;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(f);
    }
    out.extend_from_slice(&meta.received_ms.to_le_bytes());
    let n = u32::try_from(data_set.len()).map_err(|_| FormatError::BadLength)?;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(data_set);
    Ok(crc32c::crc32c(&out[start..]))
}

/// The header of a record whose body (of `body_len` bytes, checksum `body_crc`) goes into
/// segment `seq`.
pub fn encode_header(
    seq: u64,
    body_len: usize,
    body_crc: u32,
) -> Result<[u8; RECORD_HEADER_LEN], FormatError> {
    let total = u32::try_from(RECORD_HEADER_LEN + body_len).map_err(|_| FormatError::BadLength)?;
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&RECORD_MAGIC);
    h[4..8].copy_from_slice(&total.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Zero padding after a record of `len` bytes up to the next record boundary.
pub fn padding(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN - len
}

/// The record header at the start of `b`, if valid for segment `seq`: the record's total
/// length (header + body, no padding) and its body checksum.
pub fn decode_header(b: &[u8], seq: u64) -> Result<(usize, u32), FormatError> {
    let h = b.get(..RECORD_HEADER_LEN).ok_or(FormatError::Truncated)?;
    if h[..4] != RECORD_MAGIC {
        return Err(FormatError::BadMagic);
    }
    if u32_at(h, 20) != crc32c::crc32c(&h[..20]) {
        return Err(FormatError::BadChecksum);
    }
    if u64_at(h, 8) != seq {
        return Err(FormatError::WrongSegment);
    }
    let total = u32_at(h, 4) as usize;
    if total < RECORD_HEADER_LEN + 1 {
        return Err(FormatError::BadLength);
    }
    Ok((total, u32_at(h, 16)))
}

/// Decodes the record at the start of `b` (a segment's bytes from a record boundary), checking
/// both checksums and that it belongs to segment `seq`.
pub fn decode_record(b: &[u8], seq: u64) -> Result<Record<'_>, FormatError> {
    let (total, body_crc) = decode_header(b, seq)?;
    let body = b
        .get(RECORD_HEADER_LEN..total)
        .ok_or(FormatError::Truncated)?;
    if crc32c::crc32c(body) != body_crc {
        return Err(FormatError::BadChecksum);
    }
    let mut r = Cursor { b: body, pos: 0 };
    let kind = r.take(1)?[0];
    if kind != KIND_INSTANCE && kind != KIND_INSTANCE_V1 {
        return Err(FormatError::BadField("record kind"));
    }
    let text = |r: &mut Cursor<'_>, what| -> Result<String, FormatError> {
        let n = usize::from(r.u16()?);
        String::from_utf8(r.take(n)?.to_vec()).map_err(|_| FormatError::BadField(what))
    };
    let sop_class_uid = text(&mut r, "SOP Class UID")?;
    let sop_instance_uid = text(&mut r, "SOP Instance UID")?;
    let transfer_syntax_uid = text(&mut r, "Transfer Syntax UID")?;
    let source_ae_title = text(&mut r, "source AE title")?;
    let n = usize::from(r.u16()?);
    let patient_id = r.take(n)?.to_vec();
    let study_uid = Some(text(&mut r, "Study Instance UID")?).filter(|s| !s.is_empty());
    let series_uid = Some(text(&mut r, "Series Instance UID")?).filter(|s| !s.is_empty());
    let (receiving_ae_title, requestor_address) = if kind == KIND_INSTANCE {
        (
            text(&mut r, "Called AE Title")?,
            text(&mut r, "requestor address")?,
        )
    } else {
        (String::new(), String::new())
    };
    let received_ms = r.u64()?;
    let n = r.u32()? as usize;
    let data_set = r.take(n)?;
    if r.pos != body.len() {
        return Err(FormatError::BadLength);
    }
    Ok(Record {
        meta: InstanceMeta {
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid,
            source_ae_title,
            patient_id,
            study_uid,
            series_uid,
            received_ms,
            receiving_ae_title,
            requestor_address,
        },
        data_set,
        stride: total + padding(total),
    })
}

/// Decodes records from `b` (a segment's bytes after its header) until the first invalid one:
/// the valid records with their offsets (relative to `b`), and where the valid part ends.
pub fn scan_records(b: &[u8], seq: u64) -> (Vec<(usize, Record<'_>)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        match decode_record(&b[pos..], seq) {
            Ok(r) => {
                let stride = r.stride;
                out.push((pos, r));
                pos += stride;
            }
            Err(_) => break,
        }
    }
    (out, pos.min(b.len()))
}

/// One release entry of segment `seq`: the record at `offset` is done.
pub fn encode_release(seq: u64, offset: u64) -> [u8; RELEASE_LEN] {
    let mut e = [0u8; RELEASE_LEN];
    e[..8].copy_from_slice(&offset.to_le_bytes());
    e[8..12].copy_from_slice(b"DONE");
    let mut c = [0u8; 20];
    c[..8].copy_from_slice(&seq.to_le_bytes());
    c[8..20].copy_from_slice(&e[..12]);
    e[12..16].copy_from_slice(&crc32c::crc32c(&c).to_le_bytes());
    e
}

/// The offsets a `.done` file of segment `seq` releases. Bytes that are not an entry of `seq`
/// are passed over one at a time, not taken as the end: a flush of the file that failed may
/// have lost entries in the middle (they read as zeros after a restart, and the releases were
/// written again after them), and a write cut short (a full disk) leaves part of an entry that
/// shifts every later one. An entry is only taken whole, with its magic and its checksum over
/// `seq` and the offset.
pub fn decode_releases(b: &[u8], seq: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(e) = b.get(pos..pos + RELEASE_LEN) {
        let offset = u64_at(e, 0);
        if encode_release(seq, offset) == *e {
            out.push(offset);
            pos += RELEASE_LEN;
        } else {
            pos += 1;
        }
    }
    out
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).ok_or(FormatError::BadLength)?;
        let s = self.b.get(self.pos..end).ok_or(FormatError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64_at(self.take(8)?, 0))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// An encoded record: header, body and padding, ready to write.
pub fn encode_record(
    seq: u64,
    meta: &InstanceMeta,
    data_set: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; RECORD_HEADER_LEN];
    let crc = encode_body(meta, data_set, &mut out)?;
    let body = out.len() - RECORD_HEADER_LEN;
    out[..RECORD_HEADER_LEN].copy_from_slice(&encode_header(seq, body, crc)?);
    out.resize(out.len() + padding(out.len()), 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(i: u32) -> InstanceMeta {
        InstanceMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{i}"),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            source_ae_title: "SCANNER".into(),
            patient_id: b"PAT^1".to_vec(),
            study_uid: Some("1.2.3".into()),
            series_uid: i.is_multiple_of(2).then(|| "1.2.3.4".into()),
            received_ms: 1_700_000_000_000 + u64::from(i),
            receiving_ae_title: "DICOMGATE".into(),
            requestor_address: if i.is_multiple_of(3) {
                "10.1.2.3".into()
            } else {
                String::new()
            },
        }
    }

    /// Segments written by format version 1 hold kind 1 records (no Called AE Title, no
    /// address): they are still read, with those two empty.
    #[test]
    fn a_version_1_record_still_decodes() {
        let m = meta(4);
        let mut body = vec![KIND_INSTANCE_V1];
        for f in [
            m.sop_class_uid.as_bytes(),
            m.sop_instance_uid.as_bytes(),
            m.transfer_syntax_uid.as_bytes(),
            m.source_ae_title.as_bytes(),
            &m.patient_id,
            m.study_uid.as_deref().unwrap_or("").as_bytes(),
            m.series_uid.as_deref().unwrap_or("").as_bytes(),
        ] {
            body.extend_from_slice(&(f.len() as u16).to_le_bytes());
            body.extend_from_slice(f);
        }
        body.extend_from_slice(&m.received_ms.to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"abc");
        let mut rec = encode_header(9, body.len(), crc32c::crc32c(&body))
            .unwrap()
            .to_vec();
        rec.extend_from_slice(&body);
        let r = decode_record(&rec, 9).unwrap();
        assert_eq!(r.data_set, b"abc");
        assert_eq!(r.meta.receiving_ae_title, "");
        assert_eq!(r.meta.requestor_address, "");
        assert_eq!(
            r.meta,
            InstanceMeta {
                receiving_ae_title: String::new(),
                requestor_address: String::new(),
                ..m
            }
        );
        // And a version 1 segment header is still accepted.
        let mut h = SegmentHeader {
            seq: 9,
            segment_bytes: 1 << 20,
            created_ms: 5,
        }
        .encode();
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SegmentHeader::decode(&h).unwrap().seq, 9);
        h[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&h),
            Err(FormatError::UnknownVersion(3))
        ));
    }

    #[test]
    fn record_round_trips_and_its_stride_is_aligned() {
        for i in 0..20u32 {
            let ds: Vec<u8> = (0..i * 13).map(|x| x as u8).collect();
            let rec = encode_record(7, &meta(i), &ds).unwrap();
            assert_eq!(rec.len() % ALIGN, 0);
            assert_eq!(rec.len(), record_stride(&meta(i), ds.len()));
            let r = decode_record(&rec, 7).unwrap();
            assert_eq!(r.meta, meta(i));
            assert_eq!(r.data_set, &ds[..]);
            assert_eq!(r.stride, rec.len());
            assert_eq!(decode_record(&rec, 8), Err(FormatError::WrongSegment));
        }
    }

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let h = SegmentHeader {
            seq: 42,
            segment_bytes: 64 << 20,
            created_ms: 5,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::BadChecksum));
        assert_eq!(
            SegmentHeader::decode(&[0u8; 64]),
            Err(FormatError::BadMagic)
        );
    }

    /// Recovery's core: a segment whose last record is cut at every byte offset keeps exactly
    /// the records before it; a flipped byte anywhere in the last record drops only it.
    #[test]
    fn last_record_cut_at_every_offset_keeps_the_ones_before() {
        let mut seg = Vec::new();
        let mut ends = Vec::new();
        for i in 0..4u32 {
            seg.extend_from_slice(&encode_record(3, &meta(i), &[i as u8; 100]).unwrap());
            ends.push(seg.len());
        }
        let last_start = ends[2];
        let rec_len = decode_header(&seg[last_start..], 3).unwrap().0;
        for cut in last_start..=seg.len() {
            let (recs, end) = scan_records(&seg[..cut], 3);
            // Whole once its last byte is there (the padding after it carries nothing).
            let whole = cut >= last_start + rec_len;
            assert_eq!(recs.len(), if whole { 4 } else { 3 }, "cut at {cut}");
            assert_eq!(end, if whole { cut } else { last_start });
        }
        // Every byte of the record (not its padding) is covered by a checksum.
        for flip in last_start..last_start + rec_len {
            let mut s = seg.clone();
            s[flip] ^= 0x40;
            assert_eq!(scan_records(&s, 3).0.len(), 3, "flip at {flip}");
        }
        // A zeroed (pre-allocated) tail ends the scan cleanly.
        let mut z = seg.clone();
        z.extend_from_slice(&[0u8; 4096]);
        assert_eq!(scan_records(&z, 3).0.len(), 4);
    }

    #[test]
    fn releases_round_trip_and_a_torn_entry_ends_them() {
        let mut b = Vec::new();
        for off in [64u64, 200, 4096] {
            b.extend_from_slice(&encode_release(9, off));
        }
        assert_eq!(decode_releases(&b, 9), [64, 200, 4096]);
        assert!(
            decode_releases(&b, 10).is_empty(),
            "another segment's entries"
        );
        assert_eq!(decode_releases(&b[..40], 9), [64, 200]);
    }

    /// Issue 10 ("a failed `.done` flush"): entries written again after a hole (lost with a
    /// failed flush: zeros after a restart) or after part of an entry (a write cut short) were
    /// never read, because the first bad entry ended the file.
    #[test]
    fn releases_after_a_hole_or_a_torn_entry_are_still_read() {
        let mut b = encode_release(9, 64).to_vec();
        b.extend_from_slice(&[0u8; 2 * RELEASE_LEN]); // lost with a failed flush
        b.extend_from_slice(&encode_release(9, 200)); // written again
        b.extend_from_slice(&encode_release(9, 4096)[..7]); // cut short
        b.extend_from_slice(&encode_release(9, 4096)); // written again
        b.extend_from_slice(&encode_release(8, 300)); // not this segment's
        assert_eq!(decode_releases(&b, 9), [64, 200, 4096]);
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        let mut rec = encode_record(1, &meta(1), b"abcd").unwrap();
        // Declare a 4 GiB record: the body is not there.
        rec[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c::crc32c(&rec[..20]);
        rec[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_record(&rec, 1), Err(FormatError::Truncated));
    }
}
