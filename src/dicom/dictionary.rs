//! The standard's data dictionary, by keyword (PS3.6, through dicom-dictionary-std): what
//! `[[input]]` rules and `[patients] group_by` name tags by. Shared by the configuration's
//! checks and the rules' compiler. Owns nothing; no I/O.
#![forbid(unsafe_code)]

/// The tag `keyword` names (group << 16 | element) and whether its VR holds text (a value a
/// `match` pattern can be compared with).
pub fn keyword_tag(keyword: &str) -> Result<(u32, bool), String> {
    use dicom_core::dictionary::DataDictionary;
    let e = dicom_dictionary_std::StandardDataDictionary
        .by_name(keyword)
        .ok_or_else(|| format!("unknown tag keyword {keyword:?}"))?;
    let tag = match e.tag {
        dicom_core::dictionary::TagRange::Single(t) => t,
        _ => return Err(format!("{keyword} names a tag range, not one tag")),
    };
    // Text by the one VR table; a relaxed VR dicom-core knows but the table does not cannot be
    // text.
    let text = super::vr::Vr::by_name(e.vr.relaxed().to_string()).is_some_and(|v| v.is_text());
    Ok(((tag.0 as u32) << 16 | tag.1 as u32, text))
}

/// Whether `keyword` names a data element in the standard dictionary (dicom-dictionary-std's,
/// the one `[[input]]` rules compile with).
pub fn is_tag_keyword(keyword: &str) -> bool {
    use dicom_core::dictionary::DataDictionary;
    dicom_dictionary_std::StandardDataDictionary
        .by_name(keyword)
        .is_some()
}

/// ": did you mean PatientID?" for a keyword the dictionary does not know, naming the nearest
/// keyword it does; "" when nothing is near.
///
/// dicom-dictionary-std can look a keyword up but cannot list its keywords, so the candidates
/// are what a typo most often is: the keyword with the case of up to three letters changed
/// (`PatientId`, `patientid`, `StudyInstanceUid`), or one edit away (a letter or digit inserted,
/// deleted, replaced, or two neighbours swapped: `SeriesDescripton`, `Modaltiy`). Of those the
/// dictionary knows, the nearest by Damerau-Levenshtein distance (strsim) wins, case ignored
/// first, then exact; ties go to the first in that order.
pub fn did_you_mean(keyword: &str) -> String {
    const MAX_CHARS: usize = 64;
    let chars: Vec<char> = keyword.chars().collect();
    if chars.is_empty() || chars.len() > MAX_CHARS || !keyword.is_ascii() {
        return String::new();
    }
    let mut found: Vec<String> = Vec::new();
    let mut consider = |c: Vec<char>| {
        let c: String = c.into_iter().collect();
        if is_tag_keyword(&c) && !found.contains(&c) {
            found.push(c);
        }
    };
    // Case changes of up to three letters.
    let letters: Vec<usize> = (0..chars.len())
        .filter(|&i| chars[i].is_ascii_alphabetic())
        .collect();
    let flip = |c: &mut Vec<char>, i: usize| {
        c[i] = if c[i].is_ascii_uppercase() {
            c[i].to_ascii_lowercase()
        } else {
            c[i].to_ascii_uppercase()
        }
    };
    for (x, &a) in letters.iter().enumerate() {
        let mut c = chars.clone();
        flip(&mut c, a);
        consider(c.clone());
        for (y, &b) in letters.iter().enumerate().skip(x + 1) {
            let mut d = c.clone();
            flip(&mut d, b);
            consider(d.clone());
            for &z in &letters[y + 1..] {
                let mut e = d.clone();
                flip(&mut e, z);
                consider(e);
            }
        }
    }
    // One edit away.
    let alphabet = ('A'..='Z').chain('a'..='z').chain('0'..='9');
    for i in 0..=chars.len() {
        if i < chars.len() {
            let mut c = chars.clone();
            c.remove(i);
            consider(c);
        }
        if i + 1 < chars.len() {
            let mut c = chars.clone();
            c.swap(i, i + 1);
            consider(c);
        }
        for a in alphabet.clone() {
            let mut c = chars.clone();
            c.insert(i, a);
            consider(c);
            if i < chars.len() {
                let mut c = chars.clone();
                c[i] = a;
                consider(c);
            }
        }
    }
    let lower = keyword.to_ascii_lowercase();
    found
        .into_iter()
        .min_by_key(|c| {
            (
                strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase()),
                strsim::damerau_levenshtein(keyword, c),
            )
        })
        .map(|c| format!(": did you mean {c}?"))
        .unwrap_or_default()
}
