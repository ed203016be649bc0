//! Bounded readers and length-patching writers for the Upper Layer wire format.
//!
//! Owns: the only byte-level cursor the PDU parser uses. Every nested, length-prefixed structure
//! (PDU body, item, sub-item, PDV) is read through [`Reader::sub`], so an inner length can never
//! read past its parent (rustls `codec.rs` style). Must never allocate by a declared length.

/// A cursor over borrowed bytes. Reads are big endian, as every Upper Layer field is
/// (PS3.8 §9.3.1: "multi-byte fields shall be encoded with the most significant byte first").
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    pub fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn is_empty(&self) -> bool {
        self.left() == 0
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub fn array<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|b| b[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array::<2>().map(|b| u16::from_be_bytes(*b))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array::<4>().map(|b| u32::from_be_bytes(*b))
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub fn sub(&mut self, n: usize) -> Option<Reader<'a>> {
        self.take(n).map(Reader::new)
    }
}

/// Writes a big-endian length placeholder of `W` bytes and patches it when the content is done
/// (rustls `LengthPrefixedBuffer` style).
#[derive(Debug)]
pub struct LengthPrefix {
    at: usize,
    width: usize,
}

impl LengthPrefix {
    pub fn u16(out: &mut Vec<u8>) -> Self {
        let at = out.len();
        out.extend_from_slice(&[0, 0]);
        LengthPrefix { at, width: 2 }
    }

    pub fn u32(out: &mut Vec<u8>) -> Self {
        let at = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        LengthPrefix { at, width: 4 }
    }

    /// Patches the length of everything written after the placeholder. Fails when the content is
    /// longer than the field can say.
    pub fn finish(self, out: &mut [u8]) -> Result<(), EncodeError> {
        let len = out.len() - self.at - self.width;
        match self.width {
            2 => {
                let v = u16::try_from(len).map_err(|_| EncodeError::TooLong)?;
                out[self.at..self.at + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {
                let v = u32::try_from(len).map_err(|_| EncodeError::TooLong)?;
                out[self.at..self.at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Ok(())
    }
}

/// What can go wrong when encoding our own PDUs: a field longer than its length prefix allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    TooLong,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field longer than its length prefix allows")
    }
}

impl std::error::Error for EncodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_reader_cannot_read_past_parent() {
        let bytes = [0u8, 4, 1, 2, 3, 4, 5, 6];
        let mut r = Reader::new(&bytes);
        let n = r.u16().unwrap() as usize;
        let mut inner = r.sub(n).unwrap();
        assert_eq!(inner.take(5), None);
        assert_eq!(inner.u32(), Some(0x01020304));
        assert!(inner.is_empty());
        assert_eq!(r.rest(), &[5, 6]);
        assert!(r.sub(3).is_none());
    }

    #[test]
    fn length_prefix_patches_and_refuses_overflow() {
        let mut out = vec![9];
        let lp = LengthPrefix::u16(&mut out);
        out.extend_from_slice(b"abc");
        lp.finish(&mut out).unwrap();
        assert_eq!(out, [9, 0, 3, b'a', b'b', b'c']);
        let mut big = Vec::new();
        let lp = LengthPrefix::u16(&mut big);
        big.resize(70_000, 0);
        assert_eq!(lp.finish(&mut big), Err(EncodeError::TooLong));
    }
}
