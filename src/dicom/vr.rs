//! Value Representations (PS3.5 §6.2, Table 6.2-1): the one VR table of the crate, with what
//! every reader and writer of elements needs from it: whether the VR's explicit-VR length field
//! is 4 bytes (PS3.5 §7.1.2), the byte a value is padded with to even length (PS3.5 §6.2),
//! whether it holds text, and the size of one binary value.
//!
//! Owns the table and nothing else; no I/O. Every scanner, writer and oracle asks this table:
//! there must never be a second list of VRs in the crate (there were four, two of them missing
//! OD, OF, OL, OV, SV, UC, UR and UV).
#![forbid(unsafe_code)]

/// A VR as it appears in an explicit-VR element header: two bytes. Unknown VRs stay
/// representable (a peer sends anything); [`Vr::info`] says which ones the standard defines.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vr(pub [u8; 2]);

impl std::fmt::Debug for Vr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.iter().all(u8::is_ascii_graphic) {
            write!(f, "Vr({}{})", self.0[0] as char, self.0[1] as char)
        } else {
            write!(f, "Vr({:#04x}, {:#04x})", self.0[0], self.0[1])
        }
    }
}

/// One row of PS3.5 Table 6.2-1, with the element structure of PS3.5 §7.1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VrInfo {
    pub vr: Vr,
    /// The standard's name of the VR.
    pub name: &'static str,
    /// In explicit VR: two reserved bytes and a 32-bit Value Length (PS3.5 §7.1.2, Table 7.1-1);
    /// otherwise a 16-bit Value Length (Table 7.1-2).
    pub long_length: bool,
    /// A character string (PS3.5 §6.2: the VRs padded with a space, and UI): what a text
    /// pattern can be compared with.
    pub text: bool,
    /// The byte that pads a value to even length (PS3.5 §6.2): a space for character strings,
    /// NUL for UI and OB (and any other binary VR, whose values are of even size anyway).
    pub pad: u8,
    /// Bytes in one value of a binary VR (AT 4, FD 8, OW 2, ...); 1 for character strings,
    /// OB, UN and SQ.
    pub unit: u8,
}

macro_rules! vr_table {
    ($($code:ident $name:literal long=$long:literal text=$text:literal pad=$pad:literal unit=$unit:literal;)*) => {
        impl Vr {
            $(
                #[doc = $name]
                pub const $code: Vr = {
                    let b = stringify!($code).as_bytes();
                    Vr([b[0], b[1]])
                };
            )*
        }

        /// PS3.5 Table 6.2-1 (2024 edition): every VR the standard defines, in alphabetical
        /// order.
        pub const TABLE: &[VrInfo] = &[
            $(VrInfo {
                vr: Vr::$code,
                name: $name,
                long_length: $long,
                text: $text,
                pad: $pad,
                unit: $unit,
            },)*
        ];
    };
}

vr_table! {
    AE "Application Entity" long=false text=true pad=b' ' unit=1;
    AS "Age String" long=false text=true pad=b' ' unit=1;
    AT "Attribute Tag" long=false text=false pad=0 unit=4;
    CS "Code String" long=false text=true pad=b' ' unit=1;
    DA "Date" long=false text=true pad=b' ' unit=1;
    DS "Decimal String" long=false text=true pad=b' ' unit=1;
    DT "Date Time" long=false text=true pad=b' ' unit=1;
    FD "Floating Point Double" long=false text=false pad=0 unit=8;
    FL "Floating Point Single" long=false text=false pad=0 unit=4;
    IS "Integer String" long=false text=true pad=b' ' unit=1;
    LO "Long String" long=false text=true pad=b' ' unit=1;
    LT "Long Text" long=false text=true pad=b' ' unit=1;
    OB "Other Byte" long=true text=false pad=0 unit=1;
    OD "Other Double" long=true text=false pad=0 unit=8;
    OF "Other Float" long=true text=false pad=0 unit=4;
    OL "Other Long" long=true text=false pad=0 unit=4;
    OV "Other 64-bit Very Long" long=true text=false pad=0 unit=8;
    OW "Other Word" long=true text=false pad=0 unit=2;
    PN "Person Name" long=false text=true pad=b' ' unit=1;
    SH "Short String" long=false text=true pad=b' ' unit=1;
    SL "Signed Long" long=false text=false pad=0 unit=4;
    SQ "Sequence of Items" long=true text=false pad=0 unit=1;
    SS "Signed Short" long=false text=false pad=0 unit=2;
    ST "Short Text" long=false text=true pad=b' ' unit=1;
    SV "Signed 64-bit Very Long" long=true text=false pad=0 unit=8;
    TM "Time" long=false text=true pad=b' ' unit=1;
    UC "Unlimited Characters" long=true text=true pad=b' ' unit=1;
    UI "Unique Identifier (UID)" long=false text=true pad=0 unit=1;
    UL "Unsigned Long" long=false text=false pad=0 unit=4;
    UN "Unknown" long=true text=false pad=0 unit=1;
    UR "Universal Resource Identifier or Universal Resource Locator (URI/URL)" long=true text=true pad=b' ' unit=1;
    US "Unsigned Short" long=false text=false pad=0 unit=2;
    UT "Unlimited Text" long=true text=true pad=b' ' unit=1;
    UV "Unsigned 64-bit Very Long" long=true text=false pad=0 unit=8;
}

/// [`TABLE`]'s index + 1 of each pair of upper-case letters (0: not a standard VR), built at
/// compile time from the table, so that a lookup on the scan's hot path is one load.
const INDEX: [u8; 26 * 26] = {
    let mut index = [0u8; 26 * 26];
    let mut i = 0;
    while i < TABLE.len() {
        let [a, b] = TABLE[i].vr.0;
        index[(a - b'A') as usize * 26 + (b - b'A') as usize] = i as u8 + 1;
        i += 1;
    }
    index
};

impl Vr {
    /// The standard's row for this VR, `None` for a VR the standard does not define.
    pub fn info(self) -> Option<&'static VrInfo> {
        let [a, b] = self.0;
        if !a.is_ascii_uppercase() || !b.is_ascii_uppercase() {
            return None;
        }
        let i = INDEX[(a - b'A') as usize * 26 + (b - b'A') as usize];
        TABLE.get(usize::from(i).checked_sub(1)?)
    }

    /// Whether an explicit-VR element of this VR has two reserved bytes and a 32-bit length
    /// (PS3.5 §7.1.2): true for OB, OD, OF, OL, OV, OW, SQ, SV, UC, UN, UR, UT, UV, and for
    /// every VR the table does not know ("for all other VRs"; PS3.5 §6.2 adds that VRs defined
    /// later take this form, so a reader that applies it to an unknown VR stays in step).
    pub fn has_4_byte_length(self) -> bool {
        self.info().is_none_or(|i| i.long_length)
    }

    /// The byte that pads a value of this VR to even length (PS3.5 §6.2); NUL when unknown.
    pub fn padding(self) -> u8 {
        self.info().map_or(0, |i| i.pad)
    }

    /// Whether the VR is a character string (PS3.5 §6.2), UI included.
    pub fn is_text(self) -> bool {
        self.info().is_some_and(|i| i.text)
    }

    /// The VR of a two-letter name ("UR"); `None` when it is not one the standard defines.
    pub fn by_name(name: &str) -> Option<Vr> {
        let b: [u8; 2] = name.as_bytes().try_into().ok()?;
        Vr(b).info().map(|i| i.vr)
    }
}

/// A value without its padding: trailing spaces and NULs (PS3.5 §6.2: text is padded with a
/// space, UIDs with a NUL).
pub fn trim_padding(v: &[u8]) -> &[u8] {
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |p| p + 1);
    &v[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is PS3.5 Table 6.2-1: 34 VRs, sorted, each found by its bytes; exactly the 21
    /// VRs PS3.5 §7.1.2 lists have a 16-bit length in explicit VR.
    #[test]
    fn the_table_is_ps3_5_table_6_2_1() {
        assert_eq!(TABLE.len(), 34);
        assert!(TABLE.windows(2).all(|w| w[0].vr < w[1].vr), "sorted");
        for row in TABLE {
            assert_eq!(row.vr.info(), Some(row));
            let name = std::str::from_utf8(&row.vr.0).unwrap();
            assert_eq!(Vr::by_name(name), Some(row.vr));
        }
        let short: Vec<&str> = TABLE
            .iter()
            .filter(|r| !r.long_length)
            .map(|r| std::str::from_utf8(&r.vr.0).unwrap())
            .collect();
        assert_eq!(
            short.join(" "),
            "AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US"
        );
        for v in ["OD", "OF", "OL", "OV", "SV", "UC", "UR", "UV", "OB", "UT"] {
            assert!(Vr::by_name(v).unwrap().has_4_byte_length(), "{v}");
        }
        assert!(!Vr::UI.has_4_byte_length());
        assert!(Vr(*b"ZZ").has_4_byte_length(), "unknown VRs: PS3.5 §7.1.2");
        assert_eq!(Vr(*b"ZZ").info(), None);
        assert_eq!(Vr([0xFF, 0x00]).info(), None);
        assert_eq!(Vr::by_name("U"), None);
        assert_eq!(format!("{:?}", Vr::UR), "Vr(UR)");
    }

    /// Character strings are padded with a space, UI and binary VRs with NUL (PS3.5 §6.2); every
    /// VR of the table is one dicom-core (the dictionary's VRs) knows by the same name.
    #[test]
    fn text_and_padding_per_ps3_5_6_2() {
        assert_eq!(Vr::UI.padding(), 0);
        assert_eq!(Vr::OB.padding(), 0);
        assert_eq!(Vr::UR.padding(), b' ');
        assert_eq!(Vr::LO.padding(), b' ');
        for row in TABLE {
            assert_eq!(
                row.text,
                row.pad == b' ' || row.vr == Vr::UI,
                "{:?}",
                row.vr
            );
            let name = std::str::from_utf8(&row.vr.0).unwrap();
            let theirs: dicom_core::VR = name.parse().unwrap();
            assert_eq!(theirs.to_string(), name);
        }
        assert_eq!(trim_padding(b"AB \0"), b"AB");
        assert_eq!(trim_padding(b"  "), b"");
    }
}
