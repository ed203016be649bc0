//! A bounded scan of a data set's top level (PS3.5 §7): finds the values of a few wanted tags and
//! checks that every element fits in what remains, without decoding values or pixel data.
//!
//! Owns: the only parse of untrusted data set bytes on the hot path. It never recurses (nesting is
//! an explicit stack bounded by [`MAX_NESTING`]), never allocates by a declared length (only the
//! wanted values, each at most [`MAX_VALUE_LEN`] bytes, are copied), and never panics. Sequences
//! of undefined length are walked item by item; explicit-VR UN of undefined length switches to
//! implicit VR little endian inside, as PS3.5 §6.2.2 says. dicom-rs's full parser allocates by
//! declared length and overflows its stack on deep nesting, so it is kept off this path.
//! Explicit-VR length fields follow the one VR table ([`Vr::has_4_byte_length`]).
#![forbid(unsafe_code)]

use super::element::UNDEFINED_LENGTH as UNDEFINED;
use super::tags::{
    ITEM, ITEM_DELIMITATION_ITEM as ITEM_DELIMITATION,
    SEQUENCE_DELIMITATION_ITEM as SEQUENCE_DELIMITATION,
};
use super::transfer_syntax::DatasetEncoding;
use super::vr::{trim_padding, Vr};

/// Deepest nesting of undefined-length sequences and items we walk. Real objects nest a few
/// levels (SR trees reach ~10-20); 10,000 nested sequences from a hostile peer get a failure status.
pub const MAX_NESTING: usize = 128;
/// Longest value of a wanted tag we copy. Routing values are UIDs (≤ 64), LO (≤ 64 chars), PN (3 ×
/// 64 chars) and short numbers; a longer one is not a valid routing value.
pub const MAX_VALUE_LEN: usize = 1024;
/// How much of a deflated data set we inflate to scan it: the routing tags sit in the first few
/// kilobytes; 4 MiB bounds a deflate bomb.
pub const MAX_INFLATE: usize = 4 << 20;

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
    /// The scan stopped (a prefix, [`Scanner::finish_partial`]) before it could tell whether
    /// some wanted tag is there: a missing value may only be missing from what was scanned.
    incomplete: bool,
}

impl Scanned {
    /// Whether a wanted value that is missing may be beyond what was scanned (a streamed
    /// deflated data set is scanned on what its first bytes inflate to). Routing on such
    /// values must not act as if the element were absent where that would lose data.
    pub fn is_incomplete(&self) -> bool {
        self.incomplete
    }

    pub fn raw(&self, tag: u32) -> Option<&[u8]> {
        self.values
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    }

    /// A text value with its padding (trailing spaces and NULs, leading spaces) removed.
    pub fn text(&self, tag: u32) -> Option<&str> {
        let v = self.raw(tag)?;
        std::str::from_utf8(trim_padding(v))
            .ok()
            .map(|s| s.trim_start())
    }

    /// A UID value: the bytes without the trailing NUL pad.
    pub fn uid(&self, tag: u32) -> Option<&[u8]> {
        self.raw(tag).map(trim_padding)
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

/// The u16 at `p` of `buf` in the data set's byte order (`le`: little endian), if it is there.
fn read_u16(buf: &[u8], p: usize, le: bool) -> Option<u16> {
    let b: [u8; 2] = buf.get(p..p.checked_add(2)?)?.try_into().ok()?;
    Some(if le {
        u16::from_le_bytes(b)
    } else {
        u16::from_be_bytes(b)
    })
}

/// The u32 at `p` of `buf` in the data set's byte order, if it is there.
fn read_u32(buf: &[u8], p: usize, le: bool) -> Option<u32> {
    let b: [u8; 4] = buf.get(p..p.checked_add(4)?)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

/// Scans `data` in the given encoding; `wanted` lists tags as `group << 16 | element`.
pub fn scan(data: &[u8], enc: DatasetEncoding, wanted: &[u32]) -> Result<Scanned, ScanError> {
    if enc == DatasetEncoding::DeflatedExplicitVrLittleEndian {
        return scan_deflated(data, wanted, true);
    }
    let mut s = Scanner::new(enc, wanted);
    s.feed(data)?;
    s.finish()
}

/// The deflated encoding (PS3.5 §A.5): inflates at most [`MAX_INFLATE`] bytes and scans them.
/// `complete` is false when `data` is only the first part of the stream (a data set streamed to
/// storage): running out of input is then the end of what can be scanned, not an error.
pub fn scan_deflated(data: &[u8], wanted: &[u32], complete: bool) -> Result<Scanned, ScanError> {
    let (inflated, whole) = inflate_prefix(data, complete)?;
    let mut s = Scanner::new(DatasetEncoding::ExplicitVrLittleEndian, wanted);
    // An error before the cut is an error either way; running out is not, when cut on purpose.
    s.feed(&inflated)?;
    if whole {
        s.finish()
    } else {
        Ok(s.finish_partial())
    }
}

/// Inflates at most [`MAX_INFLATE`] bytes of a raw deflate stream (PS3.5 §A.5). Returns the
/// bytes and whether the whole stream fit. When `complete` is false, input that ends before the
/// stream does is a prefix, not a cut-short stream.
fn inflate_prefix(data: &[u8], complete: bool) -> Result<(Vec<u8>, bool), ScanError> {
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
            if !complete {
                return Ok((out, false));
            }
            // No progress with room to spare: the stream is cut short.
            return Err(ScanError::Inflate);
        }
    }
}

/// Longest piece one step needs whole: an explicit-VR header (12 bytes) and a wanted value.
pub const MAX_STEP: usize = 12 + MAX_VALUE_LEN;

/// The resumable top-level scan: fed a data set in pieces of any size (the PDVs of a data set
/// streamed to storage), it finds what [`scan`] finds on the whole, holding at most
/// [`MAX_STEP`] bytes between pieces (an element header or a wanted value cut by a piece's end)
/// and skipping every other value without looking at it.
#[derive(Debug, Clone)]
pub struct Scanner<W: AsRef<[u32]>> {
    implicit: bool,
    big_endian: bool,
    wanted: W,
    out: Scanned,
    stack: Vec<Ctx>,
    /// Offset in the data set of the next byte not yet consumed.
    pos: u64,
    /// Bytes of a value still to skip, and the element they belong to (tag, offset, whether it
    /// is a wanted value too long to keep).
    skip: u64,
    skipping: (u32, u64, bool),
    /// Bytes from `pos` on that one step needed whole and the last piece cut.
    carry: Vec<u8>,
    failed: Option<ScanError>,
    /// The highest top-level tag whose header was consumed: wanted tags below it that were not
    /// found are absent (top-level tags ascend, PS3.5 §7.1).
    reached: Option<u32>,
}

/// What one step did with the bytes at the scan's position.
enum Step {
    /// Not enough bytes for the next header (or wanted value) yet.
    NeedMore,
    /// Consumed this many bytes; then skip this many more (a value that runs past the bytes at
    /// hand).
    Consumed(usize, u64),
}

/// What a step does when `buf` ends before what it needs (at `start`): more input, or the
/// error of a data set that ends there (`eof`).
fn need_more(eof: bool, start: usize) -> Result<Step, ScanError> {
    if eof {
        Err(ScanError::Truncated { offset: start })
    } else {
        Ok(Step::NeedMore)
    }
}

impl<W: AsRef<[u32]>> Scanner<W> {
    /// A scan of a data set in the given encoding (a deflated one is scanned as the explicit VR
    /// little endian it inflates to: the caller inflates).
    pub fn new(enc: DatasetEncoding, wanted: W) -> Scanner<W> {
        let (implicit, big_endian) = match enc {
            DatasetEncoding::ImplicitVrLittleEndian => (true, false),
            DatasetEncoding::ExplicitVrBigEndian => (false, true),
            DatasetEncoding::ExplicitVrLittleEndian
            | DatasetEncoding::DeflatedExplicitVrLittleEndian => (false, false),
        };
        Scanner {
            implicit,
            big_endian,
            wanted,
            out: Scanned {
                values: Vec::new(),
                big_endian,
                incomplete: false,
            },
            stack: Vec::new(),
            pos: 0,
            skip: 0,
            skipping: (0, 0, false),
            carry: Vec::new(),
            failed: None,
            reached: None,
        }
    }

    /// Bytes the scan holds between pieces: the carry and the values found (at most one of
    /// each wanted tag).
    pub fn held(&self) -> usize {
        self.carry.capacity() + self.out.values.iter().map(|(_, v)| v.len()).sum::<usize>()
    }

    /// Scans the next piece of the data set. After an error every later piece is ignored and
    /// [`Scanner::finish`] returns the error.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), ScanError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.feed_inner(data);
        if let Err(e) = r {
            self.failed = Some(e);
            self.carry = Vec::new();
        }
        r
    }

    fn feed_inner(&mut self, mut data: &[u8]) -> Result<(), ScanError> {
        loop {
            if self.skip > 0 {
                let k = (data.len() as u64).min(self.skip);
                self.skip -= k;
                self.pos += k;
                data = &data[k as usize..];
                if self.skip > 0 {
                    return Ok(());
                }
                if self.skipping.2 {
                    return Err(ScanError::ValueTooLong {
                        tag: self.skipping.0,
                    });
                }
            }
            if data.is_empty() {
                return Ok(());
            }
            if self.carry.is_empty() {
                match self.step(data, false)? {
                    Step::NeedMore => {
                        self.carry.extend_from_slice(data);
                        return Ok(());
                    }
                    Step::Consumed(n, skip) => {
                        data = &data[n..];
                        self.pos += n as u64;
                        self.skip = skip;
                    }
                }
            } else {
                let old = self.carry.len();
                let take = data.len().min(MAX_STEP.saturating_sub(old).max(1));
                let mut carry = std::mem::take(&mut self.carry);
                carry.extend_from_slice(&data[..take]);
                let step = self.step(&carry, false)?;
                match step {
                    Step::NeedMore => {
                        self.carry = carry;
                        data = &data[take..];
                        if data.is_empty() {
                            return Ok(());
                        }
                    }
                    Step::Consumed(n, skip) => {
                        self.pos += n as u64;
                        self.skip = skip;
                        if n >= old {
                            data = &data[n - old..];
                        } else {
                            carry.drain(..n);
                            self.carry = carry;
                            data = &data[take..];
                        }
                    }
                }
            }
        }
    }

    /// The end of the data set: the values found, or why the data set cannot be understood.
    pub fn finish(mut self) -> Result<Scanned, ScanError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.skip > 0 {
            let (tag, offset, _) = self.skipping;
            return Err(ScanError::ElementPastEnd {
                tag,
                offset: offset as usize,
            });
        }
        let mut carry = std::mem::take(&mut self.carry);
        while !carry.is_empty() {
            match self.step(&carry, true)? {
                Step::Consumed(n, 0) => {
                    carry.drain(..n);
                    self.pos += n as u64;
                }
                Step::Consumed(..) | Step::NeedMore => {
                    // `step` at the end reports what is missing as an error.
                    return Err(ScanError::Truncated {
                        offset: self.pos as usize,
                    });
                }
            }
        }
        if !self.stack.is_empty() {
            return Err(ScanError::Truncated {
                offset: self.pos as usize,
            });
        }
        Ok(self.out)
    }

    /// The values found so far, for input cut short on purpose (a bounded inflate); marked
    /// [`Scanned::is_incomplete`] when a wanted tag not found lies at or beyond where the scan
    /// stopped (it may come later in the data set).
    pub fn finish_partial(self) -> Scanned {
        let mut out = self.out;
        let reached = self.reached;
        out.incomplete = self
            .wanted
            .as_ref()
            .iter()
            .any(|w| out.values.iter().all(|(t, _)| t != w) && reached.is_none_or(|r| *w >= r));
        out
    }

    /// A value of `len` bytes after a header of `header` bytes of the element (`tag`, at
    /// `start`) that begins a step's `buf` of `buf_len` bytes, not kept: consumed as far as
    /// `buf` holds it, the rest skipped. `too_long`: a wanted value longer than
    /// [`MAX_VALUE_LEN`], an error once it is known to be whole.
    fn value(
        &mut self,
        buf_len: usize,
        eof: bool,
        (tag, start): (u32, usize),
        header: usize,
        len: u32,
        too_long: bool,
    ) -> Result<Step, ScanError> {
        let end = header as u64 + len as u64;
        if end <= buf_len as u64 {
            if too_long {
                return Err(ScanError::ValueTooLong { tag });
            }
            Ok(Step::Consumed(end as usize, 0))
        } else if eof {
            Err(ScanError::ElementPastEnd { tag, offset: start })
        } else {
            self.skipping = (tag, start as u64, too_long);
            Ok(Step::Consumed(buf_len, end - buf_len as u64))
        }
    }

    /// One header (with its value when it is wanted or fits) at the start of `buf`, which
    /// begins at `self.pos`. `eof`: nothing follows `buf`, so what is missing is an error.
    fn step(&mut self, buf: &[u8], eof: bool) -> Result<Step, ScanError> {
        let start = self.pos as usize;
        let short = || need_more(eof, start);
        let (implicit_here, le) = match self.stack.last() {
            Some(Ctx::Seq { implicit_le: true }) | Some(Ctx::Item { implicit_le: true }) => {
                (true, true)
            }
            _ => (self.implicit, !self.big_endian),
        };
        let u16_at = |p: usize| read_u16(buf, p, le);
        let u32_at = |p: usize| read_u32(buf, p, le);
        let (Some(group), Some(elem)) = (u16_at(0), u16_at(2)) else {
            return short();
        };
        let tag = (group as u32) << 16 | elem as u32;
        let value = |this: &mut Scanner<W>, header: usize, len: u32, too_long: bool| {
            this.value(buf.len(), eof, (tag, start), header, len, too_long)
        };
        match self.stack.last().copied() {
            Some(Ctx::Seq { implicit_le }) => {
                // PS3.5 §7.5: items and the sequence delimiter, with a 4-byte length, no VR.
                let Some(len) = u32_at(4) else {
                    return short();
                };
                return match tag {
                    ITEM if len == UNDEFINED => {
                        if self.stack.len() >= MAX_NESTING {
                            return Err(ScanError::NestingTooDeep);
                        }
                        self.stack.push(Ctx::Item { implicit_le });
                        Ok(Step::Consumed(8, 0))
                    }
                    ITEM => value(self, 8, len, false),
                    SEQUENCE_DELIMITATION => {
                        self.stack.pop();
                        Ok(Step::Consumed(8, 0))
                    }
                    _ => Err(ScanError::UnexpectedDelimiter { tag, offset: start }),
                };
            }
            Some(Ctx::Item { .. }) if tag == ITEM_DELIMITATION => {
                if u32_at(4).is_none() {
                    return short();
                }
                self.stack.pop();
                return Ok(Step::Consumed(8, 0));
            }
            _ => {}
        }
        if group == 0xFFFE {
            return Err(ScanError::UnexpectedDelimiter { tag, offset: start });
        }
        let top_level = self.stack.is_empty();
        let r = self.element(buf, eof, tag, start, implicit_here, le);
        if top_level && matches!(r, Ok(Step::Consumed(..))) {
            self.reached = Some(self.reached.map_or(tag, |t| t.max(tag)));
        }
        r
    }

    /// One element header (and its value, when wanted) at the start of `buf`: the part of
    /// [`Scanner::step`] after items and delimiters.
    fn element(
        &mut self,
        buf: &[u8],
        eof: bool,
        tag: u32,
        start: usize,
        implicit_here: bool,
        le: bool,
    ) -> Result<Step, ScanError> {
        let short = || need_more(eof, start);
        let u16_at = |p: usize| read_u16(buf, p, le);
        let u32_at = |p: usize| read_u32(buf, p, le);
        let value = |this: &mut Scanner<W>, header: usize, len: u32, too_long: bool| {
            this.value(buf.len(), eof, (tag, start), header, len, too_long)
        };
        // An element header (PS3.5 §7.1.2 explicit, §7.1.3 implicit).
        let (len, vr, header) = if implicit_here {
            let Some(len) = u32_at(4) else {
                return short();
            };
            (len, None, 8)
        } else {
            let Some(vr) = buf.get(4..6) else {
                return short();
            };
            let vr = [vr[0], vr[1]];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(ScanError::BadVr { tag, offset: start });
            }
            if Vr(vr).has_4_byte_length() {
                let Some(len) = u32_at(8) else {
                    return short();
                };
                (len, Some(vr), 12)
            } else {
                let Some(len) = u16_at(6) else {
                    return short();
                };
                (len as u32, Some(vr), 8)
            }
        };
        if len == UNDEFINED {
            // Only SQ, UN (a sequence in implicit VR LE, PS3.5 §6.2.2) and encapsulated pixel
            // data (OB/OW) may have undefined length; in implicit VR it means SQ.
            let inner_implicit = match vr {
                None => implicit_here,
                Some(v) if &v == b"SQ" || &v == b"OB" || &v == b"OW" => false,
                Some(v) if &v == b"UN" => true,
                Some(_) => return Err(ScanError::BadVr { tag, offset: start }),
            };
            if self.stack.len() >= MAX_NESTING {
                return Err(ScanError::NestingTooDeep);
            }
            self.stack.push(Ctx::Seq {
                implicit_le: inner_implicit || implicit_here && le,
            });
            return Ok(Step::Consumed(header, 0));
        }
        if self.stack.is_empty() && self.wanted.as_ref().contains(&tag) {
            if len as usize > MAX_VALUE_LEN {
                return value(self, header, len, true);
            }
            if self.out.values.iter().any(|(t, _)| *t == tag) {
                // A repeat (top-level tags must ascend, PS3.5 §7.1): the first is the value;
                // keeping every copy would let a data set of repeats grow without bound.
                return value(self, header, len, false);
            }
            let end = header + len as usize;
            let Some(v) = buf.get(header..end) else {
                return if eof {
                    Err(ScanError::ElementPastEnd { tag, offset: start })
                } else {
                    Ok(Step::NeedMore)
                };
            };
            self.out.values.push((tag, v.to_vec()));
            return Ok(Step::Consumed(end, 0));
        }
        value(self, header, len, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DatasetEncoding::*;

    use crate::dicom::tags::{PATIENT_ID, SOP_INSTANCE_UID as SOP_INSTANCE};

    fn el_explicit(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        let tag = u32::from(g) << 16 | u32::from(e);
        super::super::element::put(out, ExplicitVrLittleEndian, tag, Vr(*vr), v);
    }

    /// An undefined-length sequence (0008,1115) with one undefined-length item holding a
    /// Patient ID that must not be taken for the top-level one.
    fn nested_patient_id(d: &mut Vec<u8>) {
        d.extend_from_slice(&[
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el_explicit(d, 0x0010, 0x0020, b"LO", b"INNER ");
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }

    #[test]
    fn finds_top_level_values_and_skips_nested_ones() {
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3\0");
        nested_patient_id(&mut d);
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

    fn scan_in_pieces(
        d: &[u8],
        enc: DatasetEncoding,
        wanted: &[u32],
        cuts: &[usize],
    ) -> Result<Scanned, ScanError> {
        let mut s = Scanner::new(enc, wanted);
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&d.len())) {
            let c = c.clamp(at, d.len());
            if s.feed(&d[at..c]).is_err() {
                break;
            }
            assert!(s.held() <= 2 * MAX_STEP, "holds {} bytes", s.held());
            at = c;
        }
        s.finish()
    }

    /// A data set streamed to storage is scanned piece by piece as its PDVs arrive: wherever
    /// the pieces are cut, the result is the one-piece scan's (values or error).
    #[test]
    fn scan_in_pieces_equals_scan_of_the_whole() {
        let mut cases: Vec<(Vec<u8>, DatasetEncoding)> = Vec::new();
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3\0");
        nested_patient_id(&mut d);
        el_explicit(&mut d, 0x0010, 0x0010, b"PN", &[b'N'; 200]);
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"PAT1");
        el_explicit(&mut d, 0x0020, 0x000D, b"UI", &[b'1'; 1100]); // wanted, too long
        cases.push((d.clone(), ExplicitVrLittleEndian));
        d.truncate(d.len() - 1100 - 12);
        el_explicit(&mut d, 0x7FE0, 0x0010, b"OW", &[7; 3000]);
        cases.push((d.clone(), ExplicitVrLittleEndian));
        // Encapsulated pixel data: an undefined-length OB of items.
        let mut e = d[..d.len() - 3012].to_vec();
        e.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        for n in [0u32, 40, 700] {
            e.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            e.extend_from_slice(&n.to_le_bytes());
            e.extend(std::iter::repeat_n(9u8, n as usize));
        }
        e.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        cases.push((e.clone(), ExplicitVrLittleEndian));
        for cut in [1, 7, 12, 300, e.len() - 5] {
            cases.push((e[..e.len() - cut].to_vec(), ExplicitVrLittleEndian)); // truncated
        }
        let mut imp = Vec::new();
        imp.extend_from_slice(&[0x10, 0x00, 0x20, 0x00, 4, 0, 0, 0]);
        imp.extend_from_slice(b"ABCD");
        imp.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, 0, 1, 0, 0]);
        imp.extend(std::iter::repeat_n(1u8, 256));
        cases.push((imp, ImplicitVrLittleEndian));
        cases.push((
            vec![0x00, 0x54, 0x00, 0x81, b'U', b'S', 0, 2, 0x01, 0x02],
            ExplicitVrBigEndian,
        ));
        cases.push((
            vec![0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0],
            ExplicitVrLittleEndian,
        ));
        cases.push((
            vec![0x10, 0x00, 0x20, 0x00, b'l', b'o', 0, 0],
            ExplicitVrLittleEndian,
        ));
        let wanted = [
            SOP_INSTANCE,
            0x0010_0010,
            PATIENT_ID,
            0x0020_000D,
            0x0054_0081,
        ];
        for (d, enc) in &cases {
            let whole = scan(d, *enc, &wanted);
            for cut in 0..=d.len() {
                assert_eq!(
                    scan_in_pieces(d, *enc, &wanted, &[cut]),
                    whole,
                    "cut at {cut}"
                );
            }
            let bytes: Vec<usize> = (1..d.len()).collect();
            assert_eq!(
                scan_in_pieces(d, *enc, &wanted, &bytes),
                whole,
                "byte by byte"
            );
            let threes: Vec<usize> = (1..d.len()).step_by(3).collect();
            assert_eq!(
                scan_in_pieces(d, *enc, &wanted, &threes),
                whole,
                "in threes"
            );
        }
    }

    /// The first part of a deflated stream scans as far as it inflates (a streamed data set's
    /// first bytes); the same bytes as a whole stream are cut short (an error).
    #[test]
    fn deflated_prefix_scans_what_it_holds() {
        use std::io::Write;
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"DEFL");
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        el_explicit(&mut d, 0x7FE0, 0x0010, b"OB", &noise);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&d).unwrap();
        let z = enc.finish().unwrap();
        let prefix = &z[..z.len() / 2];
        let s = scan_deflated(prefix, &[PATIENT_ID], false).unwrap();
        assert_eq!(s.text(PATIENT_ID), Some("DEFL"));
        assert_eq!(
            scan_deflated(prefix, &[PATIENT_ID], true),
            Err(ScanError::Inflate)
        );
    }

    /// Review of issue 14, defect D5: a deflated prefix scanned only up to where it inflates
    /// told nobody that a wanted tag beyond it was unknown rather than absent, so
    /// `unmatched = "discard"` dropped an instance that the tag might have routed. The scan is
    /// marked incomplete exactly when a wanted tag not found lies at or past where it stopped.
    #[test]
    fn deflated_prefix_says_when_a_wanted_tag_may_lie_beyond_it() {
        use std::io::Write;
        const BODY_PART: u32 = 0x0018_0015;
        const ACCESSION: u32 = 0x0008_0050;
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0010, 0x0020, b"LO", b"DEFL");
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        el_explicit(&mut d, 0x0011, 0x0010, b"OB", &noise);
        el_explicit(&mut d, 0x0018, 0x0015, b"CS", b"HEAD");
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&d).unwrap();
        let z = enc.finish().unwrap();
        let prefix = &z[..z.len() / 2];
        // Body Part Examined is beyond the prefix: unknown.
        let s = scan_deflated(prefix, &[PATIENT_ID, BODY_PART], false).unwrap();
        assert_eq!(s.text(PATIENT_ID), Some("DEFL"));
        assert_eq!(s.text(BODY_PART), None);
        assert!(s.is_incomplete());
        // Accession Number would come before Patient ID, which was passed: absent, known.
        let s = scan_deflated(prefix, &[ACCESSION, PATIENT_ID], false).unwrap();
        assert!(!s.is_incomplete());
        // The whole stream: complete, the value found.
        let s = scan_deflated(&z, &[PATIENT_ID, BODY_PART], false).unwrap();
        assert_eq!(s.text(BODY_PART), Some("HEAD"));
        assert!(!s.is_incomplete());
    }

    /// A data set of one wanted tag repeated (a hostile peer streaming gigabytes of it) keeps
    /// one value, not every copy: the scan's memory does not grow with the data set.
    #[test]
    fn repeated_wanted_tag_is_kept_once() {
        let mut one = Vec::new();
        el_explicit(&mut one, 0x0010, 0x0020, b"LO", &[b'P'; 1000]);
        let mut s = Scanner::new(ExplicitVrLittleEndian, &[PATIENT_ID][..]);
        for _ in 0..10_000 {
            s.feed(&one).unwrap();
        }
        assert!(s.held() < 4 * MAX_STEP, "holds {} bytes", s.held());
        let found = s.finish().unwrap();
        assert_eq!(found.raw(PATIENT_ID).map(<[u8]>::len), Some(1000));
    }
}
