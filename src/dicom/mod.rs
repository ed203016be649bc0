//! What the DICOM standard defines and several layers share (architecture.md's `dicom/`), one
//! definition of each:
//!
//! - [`vr`]: the one VR table (PS3.5 Table 6.2-1: explicit-VR length field, padding, text) and
//!   [`vr::trim_padding`];
//! - [`element`]: the one data element writer (PS3.5 §7.1), any data set encoding;
//! - [`tags`]: the tags the crate names, and the routing tags;
//! - [`dictionary`]: the standard's data dictionary by keyword (for tags users name);
//! - [`uid`]: the one UID rule (PS3.5 §9.1);
//! - [`transfer_syntax`]: the transfer syntaxes we store and how each encodes its data set;
//! - [`sop_class`] (with the generated [`storage_sop_classes`]): the SOP classes we name and
//!   which abstract syntaxes count as storage;
//! - [`implementation`]: our Implementation Class UID and Version Name;
//! - [`scan`]: the bounded routing scan of a data set's top level, the only parse of a peer's
//!   data set bytes on the hot path;
//! - [`part10`]: the Part-10 file's meta group, written and read back.
//!
//! Pure: no sockets, no files, no clocks, no unsafe. It imports no other module of the crate
//! (every layer may import it, it imports none of them), and it must never hand a peer's bytes
//! to a full parser.
#![forbid(unsafe_code)]

pub mod dictionary;
pub mod element;
pub mod implementation;
pub mod part10;
pub mod scan;
pub mod sop_class;
pub mod storage_sop_classes;
pub mod tags;
pub mod transfer_syntax;
pub mod uid;
pub mod vr;

/// The civil (proleptic Gregorian) date of day `days` since 1970-01-01, as (year, month, day):
/// what a DA value (PS3.5 Table 6.2-1, YYYYMMDD) of that day holds. Howard Hinnant's
/// `civil_from_days`.
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The modules of the crate each file names by a `crate::` path outside its test module
/// (`file:line: module`), for the tests that hold modules to their place in the layering.
#[cfg(test)]
pub(crate) fn crate_paths_outside_tests(files: &[std::path::PathBuf]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            // Not the literal itself, or this very line would be found.
            for (at, m) in line.match_indices(concat!("crate", "::")) {
                let module = line[at + m.len()..]
                    .split(|c: char| !c.is_ascii_lowercase() && c != '_')
                    .next()
                    .unwrap_or("");
                out.push((format!("{}:{}", path.display(), i + 1), module.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The module's promise: every layer may import it, it imports none of them (so it can
    /// never be part of an import circle). Its sources outside their test modules name no
    /// other module of the crate.
    #[test]
    fn dicom_imports_no_other_module_of_the_crate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/dicom");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() >= 11, "{files:?}");
        for (at, module) in super::crate_paths_outside_tests(&files) {
            assert_eq!(module, "dicom", "{at}");
        }
    }
}
