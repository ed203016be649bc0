//! A bounded scan of a data set's top level (PS3.5 §7): finds the values of a few wanted tags and
//! checks that every element fits in what remains, without decoding values or pixel data.
//!
//! Owns: the only parse of untrusted data set bytes on the hot path. It never recurses (nesting is
//! an explicit stack bounded by [`MAX_NESTING`]), never allocates by a declared length (only the
//! wanted values, each at most [`MAX_VALUE_LEN`] bytes, are copied), and never panics. Sequences
//! of undefined length are walked item by item; explicit-VR UN of undefined length switches to
//! implicit VR little endian inside, as PS3.5 §6.2.2 says. dicom-rs's full parser allocates by
//! declared length and overflows its stack on deep nesting, so it is kept off this path.

use crate::assoc::DatasetEncoding;

/// Deepest nesting of undefined-length sequences and items we walk. Real objects nest a few
/// levels (SR trees reach ~10-20); 10,000 nested sequences from a hostile peer get a failure status.
pub const MAX_NESTING: usize = 128;
/// Longest value of a wanted tag we copy. Routing values are UIDs (≤ 64), LO (≤ 64 chars), PN (3 ×
/// 64 chars) and short numbers; a longer one is not a valid routing value.
pub const MAX_VALUE_LEN: usize = 1024;
/// How much of a deflated data set we inflate to scan it: the routing tags sit in the first few
/// kilobytes; 4 MiB bounds a deflate bomb.
pub const MAX_INFLATE: usize = 4 << 20;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;

/// Why a data set cannot be understood. Answered with a C-STORE status 0xC000 (PS3.4 B.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// The data ends inside an element header or an undefined-length sequence.
    Truncated {
        offset: usize,
    },
    /// An element's declared length runs past the end of its container.
    ElementPastEnd {
        tag: u32,
        offset: usize,
    },
    NestingTooDeep,
    /// An item or delimitation tag where an element must be, or the reverse.
    UnexpectedDelimiter {
        tag: u32,
        offset: usize,
    },
    /// An explicit VR that is not two upper-case letters, or undefined length on a VR that
    /// cannot have it.
    BadVr {
        tag: u32,
        offset: usize,
    },
    ValueTooLong {
        tag: u32,
    },
    /// The deflated stream is corrupt.
    Inflate,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |t: &u32| format!("({:04X},{:04X})", t >> 16, t & 0xFFFF);
        match self {
            ScanError::Truncated { offset } => write!(f, "data set truncated at byte {offset}"),
            ScanError::ElementPastEnd { tag, offset } => {
                write!(
                    f,
                    "element {} at byte {offset} longer than what remains",
                    t(tag)
                )
            }
            ScanError::NestingTooDeep => write!(f, "sequences nested deeper than {MAX_NESTING}"),
            ScanError::UnexpectedDelimiter { tag, offset } => {
                write!(f, "unexpected {} at byte {offset}", t(tag))
            }
            ScanError::BadVr { tag, offset } => write!(f, "bad VR for {} at byte {offset}", t(tag)),
            ScanError::ValueTooLong { tag } => write!(f, "value of {} too long", t(tag)),
            ScanError::Inflate => f.write_str("deflated data set cannot be inflated"),
        }
    }
}

impl std::error::Error for ScanError {}

/// The wanted top-level values found, in the order met.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scanned {
    values: Vec<(u32, Vec<u8>)>,
    big_endian: bool,
}

impl Scanned {
    pub fn raw(&self, tag: u32) -> Option<&[u8]> {
        self.values
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    }

    /// A text value with its padding (trailing spaces and NULs, leading spaces) removed.
    pub fn text(&self, tag: u32) -> Option<&str> {
        let v = self.raw(tag)?;
        std::str::from_utf8(super::trim_padding(v))
            .ok()
            .map(|s| s.trim_start())
    }

    /// A UID value: the bytes without the trailing NUL pad.
    pub fn uid(&self, tag: u32) -> Option<&[u8]> {
        self.raw(tag).map(super::trim_padding)
    }

    /// A US value in the data set's byte order.
    pub fn us(&self, tag: u32) -> Option<u16> {
        match self.raw(tag)? {
            [a, b, ..] if self.big_endian => Some(u16::from_be_bytes([*a, *b])),
            [a, b, ..] => Some(u16::from_le_bytes([*a, *b])),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Ctx {
    /// Inside an undefined-length sequence: items or the sequence delimiter come next.
    Seq { implicit_le: bool },
    /// Inside an undefined-length item: elements or the item delimiter come next.
    Item { implicit_le: bool },
}

fn vr_has_4_byte_length(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// Scans `data` in the given encoding; `wanted` lists tags as `group << 16 | element`.
pub fn scan(data: &[u8], enc: DatasetEncoding, wanted: &[u32]) -> Result<Scanned, ScanError> {
    match enc {
        DatasetEncoding::DeflatedExplicitVrLittleEndian => {
            let (inflated, complete) = inflate_prefix(data)?;
            scan_plain(&inflated, false, false, wanted, !complete)
        }
        DatasetEncoding::ImplicitVrLittleEndian => scan_plain(data, true, false, wanted, false),
        DatasetEncoding::ExplicitVrLittleEndian => scan_plain(data, false, false, wanted, false),
        DatasetEncoding::ExplicitVrBigEndian => scan_plain(data, false, true, wanted, false),
    }
}

/// Inflates at most [`MAX_INFLATE`] bytes of a raw deflate stream (PS3.5 §A.5). Returns the
/// bytes and whether the whole stream fit.
fn inflate_prefix(data: &[u8]) -> Result<(Vec<u8>, bool), ScanError> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).clamp(4096, MAX_INFLATE));
    loop {
        if out.len() == out.capacity() {
            if out.len() >= MAX_INFLATE {
                return Ok((out, false));
            }
            out.reserve(out.len().min(MAX_INFLATE - out.len()));
        }
        let consumed = d.total_in() as usize;
        let produced = d.total_out();
        let input = data.get(consumed..).unwrap_or(&[]);
        // FlushDecompress::None: with Finish, miniz treats the first call as one-shot and fails
        // when the output does not fit at once.
        let status = d
            .decompress_vec(input, &mut out, FlushDecompress::None)
            .map_err(|_| ScanError::Inflate)?;
        if status == Status::StreamEnd {
            return Ok((out, true));
        }
        let stalled = d.total_out() == produced && d.total_in() as usize == consumed;
        if stalled && out.len() < out.capacity() {
            // No progress with room to spare: the stream is cut short.
            return Err(ScanError::Inflate);
        }
    }
}

fn scan_plain(
    data: &[u8],
    implicit: bool,
    big_endian: bool,
    wanted: &[u32],
    partial_ok: bool,
) -> Result<Scanned, ScanError> {
    let mut out = Scanned {
        values: Vec::new(),
        big_endian,
    };
    let mut stack: Vec<Ctx> = Vec::new();
    let mut pos = 0usize;
    let u16_at = |p: usize, le: bool| -> Option<u16> {
        let b = data.get(p..p + 2)?;
        Some(if le {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        })
    };
    let u32_at = |p: usize, le: bool| -> Option<u32> {
        let b = data.get(p..p + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    loop {
        if pos == data.len() {
            if stack.is_empty() {
                return Ok(out);
            }
            return end_early(out, pos, partial_ok);
        }
        let (implicit_here, le) = match stack.last() {
            Some(Ctx::Seq { implicit_le: true }) | Some(Ctx::Item { implicit_le: true }) => {
                (true, true)
            }
            _ => (implicit, !big_endian),
        };
        let (Some(group), Some(elem)) = (u16_at(pos, le), u16_at(pos + 2, le)) else {
            return end_early(out, pos, partial_ok);
        };
        let tag = (group as u32) << 16 | elem as u32;
        let start = pos;
        match stack.last().copied() {
            Some(Ctx::Seq { implicit_le }) => {
                // PS3.5 §7.5: items and the sequence delimiter, with a 4-byte length, no VR.
                let Some(len) = u32_at(pos + 4, le) else {
                    return end_early(out, pos, partial_ok);
                };
                pos += 8;
                match tag {
                    ITEM if len == UNDEFINED => {
                        if stack.len() >= MAX_NESTING {
                            return Err(ScanError::NestingTooDeep);
                        }
                        stack.push(Ctx::Item { implicit_le });
                    }
                    ITEM => {
                        pos = skip(data, pos, len, tag, start, partial_ok)?;
                    }
                    SEQUENCE_DELIMITATION => {
                        stack.pop();
                    }
                    _ => return Err(ScanError::UnexpectedDelimiter { tag, offset: start }),
                }
                continue;
            }
            Some(Ctx::Item { .. }) if tag == ITEM_DELIMITATION => {
                if u32_at(pos + 4, le).is_none() {
                    return end_early(out, pos, partial_ok);
                }
                pos += 8;
                stack.pop();
                continue;
            }
            _ => {}
        }
        if group == 0xFFFE {
            return Err(ScanError::UnexpectedDelimiter { tag, offset: start });
        }
        // An element header (PS3.5 §7.1.2 explicit, §7.1.3 implicit).
        let (len, vr, header) = if implicit_here {
            let Some(len) = u32_at(pos + 4, le) else {
                return end_early(out, pos, partial_ok);
            };
            (len, None, 8)
        } else {
            let Some(vr) = data.get(pos + 4..pos + 6) else {
                return end_early(out, pos, partial_ok);
            };
            let vr = [vr[0], vr[1]];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(ScanError::BadVr { tag, offset: start });
            }
            if vr_has_4_byte_length(vr) {
                let Some(len) = u32_at(pos + 8, le) else {
                    return end_early(out, pos, partial_ok);
                };
                (len, Some(vr), 12)
            } else {
                let Some(len) = u16_at(pos + 6, le) else {
                    return end_early(out, pos, partial_ok);
                };
                (len as u32, Some(vr), 8)
            }
        };
        pos += header;
        if len == UNDEFINED {
            // Only SQ, UN (a sequence in implicit VR LE, PS3.5 §6.2.2) and encapsulated pixel
            // data (OB/OW) may have undefined length; in implicit VR it means SQ.
            let inner_implicit = match vr {
                None => implicit_here,
                Some(v) if &v == b"SQ" || &v == b"OB" || &v == b"OW" => false,
                Some(v) if &v == b"UN" => true,
                Some(_) => return Err(ScanError::BadVr { tag, offset: start }),
            };
            if stack.len() >= MAX_NESTING {
                return Err(ScanError::NestingTooDeep);
            }
            stack.push(Ctx::Seq {
                implicit_le: inner_implicit || implicit_here && le,
            });
            continue;
        }
        let end = skip(data, pos, len, tag, start, partial_ok)?;
        if stack.is_empty() && wanted.contains(&tag) {
            if len as usize > MAX_VALUE_LEN {
                return Err(ScanError::ValueTooLong { tag });
            }
            if let Some(v) = data.get(pos..end) {
                out.values.push((tag, v.to_vec()));
            }
        }
        pos = end;
    }
}

/// The data ends inside a header at `pos`: the values found so far when the input was cut short
/// on purpose (a bounded inflate), an error otherwise.
fn end_early(out: Scanned, pos: usize, partial_ok: bool) -> Result<Scanned, ScanError> {
    if partial_ok {
        Ok(out)
    } else {
        Err(ScanError::Truncated { offset: pos })
    }
}

/// The end of a value of `len` bytes starting at `pos`, checked against the data.
fn skip(
    data: &[u8],
    pos: usize,
    len: u32,
    tag: u32,
    start: usize,
    partial_ok: bool,
) -> Result<usize, ScanError> {
    let end = pos.saturating_add(len as usize);
    if end <= data.len() {
        Ok(end)
    } else if partial_ok {
        Ok(data.len())
    } else {
        Err(ScanError::ElementPastEnd { tag, offset: start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DatasetEncoding::*;

    fn el_explicit(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if vr_has_4_byte_length(*vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(v);
    }

    const PATIENT_ID: u32 = 0x0010_0020;
    const SOP_INSTANCE: u32 = 0x0008_0018;

    #[test]
    fn finds_top_level_values_and_skips_nested_ones() {
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3\0");
        // An undefined-length sequence with one undefined-length item holding a PatientID that
        // must not be taken for the top-level one.
        d.extend_from_slice(&[
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"INNER ");
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"PAT1");
        el_explicit(&mut d, 0x7FE0, 0x0010, b"OW", &[0; 16]);
        let s = scan(&d, ExplicitVrLittleEndian, &[PATIENT_ID, SOP_INSTANCE]).unwrap();
        assert_eq!(s.text(PATIENT_ID), Some("PAT1"));
        assert_eq!(s.uid(SOP_INSTANCE), Some(&b"1.2.3"[..]));
    }

    #[test]
    fn element_longer_than_what_remains_is_refused() {
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"PAT1");
        d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0, 0, 0, 0x40]);
        assert!(matches!(
            scan(&d, ExplicitVrLittleEndian, &[]),
            Err(ScanError::ElementPastEnd {
                tag: 0x7FE0_0010,
                ..
            })
        ));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut d = Vec::new();
        for _ in 0..10_000 {
            d.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert_eq!(
            scan(&d, ImplicitVrLittleEndian, &[]),
            Err(ScanError::NestingTooDeep)
        );
    }

    #[test]
    fn implicit_and_big_endian() {
        let mut d = Vec::new();
        d.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, 4, 0, 0, 0]);
        d.extend_from_slice(b"ABCD");
        let s = scan(&d, ImplicitVrLittleEndian, &[PATIENT_ID]).unwrap();
        assert_eq!(s.text(PATIENT_ID), Some("ABCD"));
        let be = [0x00, 0x54, 0x00, 0x81, b'U', b'S', 0, 2, 0x01, 0x02];
        let s = scan(&be, ExplicitVrBigEndian, &[0x0054_0081]).unwrap();
        assert_eq!(s.us(0x0054_0081), Some(0x0102));
    }

    #[test]
    fn deflated_is_inflated_with_a_bound() {
        use std::io::Write;
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"DEFL");
        el_explicit(&mut d, 0x7FE0, 0x0010, b"OB", &vec![0u8; 8 << 20]);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&d).unwrap();
        let z = enc.finish().unwrap();
        let s = scan(&z, DeflatedExplicitVrLittleEndian, &[PATIENT_ID]).unwrap();
        assert_eq!(s.text(PATIENT_ID), Some("DEFL"));
        assert_eq!(
            scan(b"not deflate at all", DeflatedExplicitVrLittleEndian, &[]),
            Err(ScanError::Inflate)
        );
    }

    #[test]
    fn truncated_header_and_stray_delimiters() {
        assert_eq!(
            scan(&[0x10, 0x00, 0x20], ExplicitVrLittleEndian, &[]),
            Err(ScanError::Truncated { offset: 0 })
        );
        assert!(matches!(
            scan(
                &[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0],
                ExplicitVrLittleEndian,
                &[]
            ),
            Err(ScanError::UnexpectedDelimiter { .. })
        ));
        assert!(matches!(
            scan(
                &[0x10, 0x00, 0x20, 0x00, b'l', b'o', 0, 0],
                ExplicitVrLittleEndian,
                &[]
            ),
            Err(ScanError::BadVr { .. })
        ));
    }
}
