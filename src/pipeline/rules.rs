//! Sufficiency rules: the declarative `[[input]]` sections (Dicomnode's inputs).
//!
//! Owns: deciding which inputs accept one instance (from its top-level values, on the reactor,
//! before anything is stored) and whether a batch [`Snapshot`] satisfies every input. Pure: no
//! I/O, no clocks.
//!
//! Matching: `match` maps a tag keyword to a pattern or a list of patterns. A pattern matches the
//! element's whole text value (padding removed), exactly and case-sensitively, with `*` for any
//! run of characters and `?` for one (bytes: one character in single-byte character sets); a
//! `*` or `?` in the value is an ordinary character. A leading `!` negates. A list holds when any of its
//! positive patterns matches (or it has none) and none of its negated ones does. A missing
//! element matches no positive pattern and every negated one. `required_tags` must be present
//! with a non-empty value. Only elements with text VRs can be matched (checked at start-up).
//!
//! Sender rules: `calling_ae` and `called_ae` match the association's Calling AE Title and
//! Called AE Title (PS3.8 §7.1.1.3, §7.1.1.4; leading and trailing spaces removed, from the
//! titles and from the patterns) with the same patterns, lists and `!`; `peer` lists CIDR blocks (IPv4 or IPv6, a bare address is one host)
//! the requestor's address must fall in (an IPv4-mapped IPv6 address counts as its IPv4 one).
//! They are given to [`Rules::accepting`] as a plain [`Sender`], so rules know no network
//! type. Storage keeps all three with each instance (Source and Receiving AE Titles, the
//! requestor's address), so an instance recovered after a restart is matched as it was when it
//! was stored. A sender rule whose value is not known (an instance stored by a build that kept
//! only the Calling AE Title) does not hold: an instance is never routed to an input it was not
//! shown to belong to.
//!
//! Alternative inputs: inputs naming the same `one_of` group form a group that is satisfied when
//! any one of them is; a batch is sufficient when every group and every ungrouped input is.

use std::net::IpAddr;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

pub use crate::config::{Completeness, InputConfig, InputKind, Patterns, PriorsConfig, MAX_INPUTS};
use crate::dicom::dictionary::keyword_tag;
use crate::dicom::scan::Scanned;
use crate::patients::Snapshot;

/// Who sent an instance (defined with the hand-off, where reactors fill it in).
pub use crate::handoff::Sender;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    negated: bool,
    glob: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Input {
    config: InputConfig,
    matches: Vec<(u32, Vec<Pattern>)>,
    required: Vec<u32>,
    /// Sender rules; empty = none.
    calling_ae: Vec<Pattern>,
    called_ae: Vec<Pattern>,
    peer: Vec<ipnet::IpNet>,
}

fn patterns(p: &Patterns) -> Vec<Pattern> {
    let list = match p {
        Patterns::One(p) => std::slice::from_ref(p),
        Patterns::Any(v) => v.as_slice(),
    };
    list.iter()
        .map(|p| match p.strip_prefix('!') {
            Some(rest) => Pattern {
                negated: true,
                glob: rest.as_bytes().to_vec(),
            },
            None => Pattern {
                negated: false,
                glob: p.as_bytes().to_vec(),
            },
        })
        .collect()
}

/// Whether a pattern list holds for `v`: any positive pattern matches (or there is none) and no
/// negated one does. `None` (element missing) matches no positive pattern and every negated one.
fn list_holds(pats: &[Pattern], v: Option<&[u8]>) -> bool {
    let mut any_positive = false;
    let mut positive_hit = false;
    for p in pats {
        let hit = v.is_some_and(|v| glob_match(&p.glob, v));
        if p.negated {
            if hit {
                return false;
            }
        } else {
            any_positive = true;
            positive_hit |= hit;
        }
    }
    !any_positive || positive_hit
}

/// A sender rule's patterns, as `config::ae_patterns` checked and trimmed them.
fn ae_patterns(input: &str, field: &str, p: &Option<Patterns>) -> Result<Vec<Pattern>, String> {
    Ok(crate::config::ae_patterns(input, field, p)?
        .into_iter()
        .map(|(negated, glob)| Pattern { negated, glob })
        .collect())
}

/// `peer` CIDR blocks, as `config::check_inputs` checked them.
fn cidrs(input: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    list.iter()
        .map(|c| {
            crate::config::parse_cidr(c)
                .ok_or_else(|| format!("input {input:?}: peer {c:?} is not a CIDR block"))
        })
        .collect()
}

/// Whether `address` is in one of `blocks` (an IPv4-mapped IPv6 address as its IPv4 one).
fn in_blocks(blocks: &[ipnet::IpNet], address: IpAddr) -> bool {
    let a = address.to_canonical();
    blocks.iter().any(|b| b.contains(&a))
}

/// The compiled rules.
#[derive(Debug, Clone)]
pub struct Rules {
    inputs: Vec<Input>,
    /// Every tag the rules read, for the reactor's scan.
    pub tags: Vec<u32>,
    /// The bit of the `priors` input, if there is one: it takes only what its retrieval brings
    /// (never by rules), and its sufficiency is the retrieval's ([`super::priors`]).
    pub priors: Option<u64>,
}

/// Whether `pat` matches all of `text`: `*` any run of bytes (none included), `?` one byte,
/// anything else itself. `text` is peer bytes (an element value, bounded by the scan's
/// `MAX_VALUE_LEN`); `pat` comes from the config.
///
/// Iterative, no recursion, O(len(pat) × len(text)) at worst: the classic greedy match that
/// remembers only the last `*` seen. A `*` in the pattern is always a wildcard, tested before
/// the literal comparison (comparing first took a `*` in the text for the pattern's `*` and
/// lost the backtracking point: `A*B` did not match `A*XB`, issue 11). Going back to the last
/// star alone is enough: whatever an earlier star would absorb, the last one can absorb too,
/// since everything between them already matched.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // (pattern index just after the last `*`, text index that star's run ends at)
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match (pat.get(p), text.get(t)) {
            (Some(b'*'), _) => {
                p += 1;
                star = Some((p, t));
            }
            (Some(&c), Some(&x)) if c == b'?' || c == x => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // The last star absorbs one more byte; retry the rest of the pattern there.
                Some((sp, st)) => {
                    p = sp;
                    t = st + 1;
                    star = Some((sp, t));
                }
                None => return false,
            },
        }
    }
    pat.get(p..)
        .is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

impl Input {
    /// The sender rules: each one given holds for `from`; one whose value is unknown does not.
    fn sender_holds(&self, from: &Sender<'_>) -> bool {
        let ae = |pats: &[Pattern], v: Option<&str>| {
            pats.is_empty() || v.is_some_and(|v| list_holds(pats, Some(v.trim().as_bytes())))
        };
        ae(&self.calling_ae, from.calling_ae_title)
            && ae(&self.called_ae, from.called_ae_title)
            && (self.peer.is_empty() || from.address.is_some_and(|a| in_blocks(&self.peer, a)))
    }
}

impl Rules {
    /// Compiles `[[input]]` sections; none = one input accepting everything.
    pub fn compile(inputs: &[InputConfig]) -> Result<Rules, String> {
        let configs = if inputs.is_empty() {
            vec![InputConfig::accept_all()]
        } else {
            inputs.to_vec()
        };
        // The configuration's checks (config::check_inputs) first: what passes them compiles.
        crate::config::check_inputs(&configs)?;
        let mut tags = Vec::new();
        let mut compiled = Vec::new();
        for c in &configs {
            let mut matches = Vec::new();
            for (kw, pats) in &c.matches {
                let (tag, _) = keyword_tag(kw).map_err(|e| format!("input {}: {e}", c.name))?;
                tags.push(tag);
                matches.push((tag, patterns(pats)));
            }
            let mut required = Vec::new();
            for kw in &c.required_tags {
                let (tag, _) = keyword_tag(kw).map_err(|e| format!("input {}: {e}", c.name))?;
                tags.push(tag);
                required.push(tag);
            }
            compiled.push(Input {
                config: c.clone(),
                matches,
                required,
                calling_ae: ae_patterns(&c.name, "calling_ae", &c.calling_ae)?,
                called_ae: ae_patterns(&c.name, "called_ae", &c.called_ae)?,
                peer: cidrs(&c.name, &c.peer)?,
            });
        }
        tags.sort_unstable();
        tags.dedup();
        let priors = configs
            .iter()
            .position(|c| c.kind == InputKind::Priors)
            .map(|i| 1u64 << i);
        Ok(Rules {
            inputs: compiled,
            tags,
            priors,
        })
    }

    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|i| i.config.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The inputs that accept an instance with these top-level values from `from`, as a bit set.
    pub fn accepting(&self, values: &Scanned, from: &Sender<'_>) -> u64 {
        let mut bits = 0u64;
        for (i, input) in self.inputs.iter().enumerate() {
            if input.config.kind == InputKind::Priors {
                continue; // only its retrieval routes instances to it
            }
            let matched = input.matches.iter().all(|(tag, pats)| {
                let v = values
                    .raw(*tag)
                    .map(|v| crate::dicom::vr::trim_padding(v).trim_ascii_start());
                list_holds(pats, v)
            });
            let present = input.required.iter().all(|t| {
                values
                    .raw(*t)
                    .is_some_and(|v| !crate::dicom::vr::trim_padding(v).is_empty())
            });
            if matched && present && input.sender_holds(from) {
                bits |= 1 << i;
            }
        }
        bits
    }

    /// The bit of the input named `name`, if there is one.
    pub fn input_bit(&self, name: &str) -> Option<u64> {
        self.inputs
            .iter()
            .position(|i| i.config.name == name)
            .map(|i| 1u64 << i)
    }

    /// Whether `s` satisfies every ungrouped input and every `one_of` group (one of its inputs);
    /// `Err` names the first that is not satisfied and why (logged when a trigger finds a
    /// patient not yet sufficient).
    pub fn sufficient(&self, s: &Snapshot) -> Result<(), String> {
        // (group, satisfied, why its members are not), in the order groups first appear.
        let mut groups: Vec<(&str, bool, Vec<String>)> = Vec::new();
        for (i, input) in self.inputs.iter().enumerate() {
            if input.config.kind == InputKind::Priors {
                continue; // the retrieval decides (super::priors)
            }
            let r = self.input_sufficient(i, input, s);
            match input.config.one_of.as_deref() {
                None => r?,
                Some(g) => {
                    let at = match groups.iter().position(|(n, _, _)| *n == g) {
                        Some(at) => at,
                        None => {
                            groups.push((g, false, Vec::new()));
                            groups.len() - 1
                        }
                    };
                    if let Some(entry) = groups.get_mut(at) {
                        match r {
                            Ok(()) => entry.1 = true,
                            Err(why) => entry.2.push(why),
                        }
                    }
                }
            }
        }
        match groups.into_iter().find(|(_, ok, _)| !ok) {
            Some((g, _, why)) => Err(format!(
                "group {g}: none of its inputs is satisfied ({})",
                why.join("; ")
            )),
            None => Ok(()),
        }
    }

    /// Whether `s` satisfies input `i` on its own: the walk of [`Rules::explain`]
    /// (`Rules::findings`), stopped at the first rule that does not hold.
    fn input_sufficient(&self, i: usize, input: &Input, s: &Snapshot) -> Result<(), String> {
        let mut failed = None;
        self.findings(i, s, |f| {
            if f.holds() {
                ControlFlow::Continue(())
            } else {
                failed = Some(f.to_string());
                ControlFlow::Break(())
            }
        });
        match failed {
            Some(w) => Err(format!("input {}: {w}", input.config.name)),
            None => Ok(()),
        }
    }

    /// Every input's progress against its rules for `s` (each on its own: whether the patient
    /// is sufficient, `one_of` groups included, is [`Rules::sufficient`]'s answer), in words (the status page's
    /// "ct: 40 of 100 instances; single_series: ok"): each rule the input sets, whether it holds
    /// now and what it counted. The same evaluation as [`Rules::sufficient`], not stopped at the
    /// first rule that fails; per-series completeness findings are capped at
    /// [`MAX_SERIES_EXPLAINED`] per input, the rest summed up in one line.
    pub fn explain(&self, s: &Snapshot) -> Vec<InputProgress> {
        let mut out = Vec::with_capacity(self.inputs.len());
        for (i, input) in self.inputs.iter().enumerate() {
            let c = &input.config;
            let mut p = InputProgress {
                input: c.name.clone(),
                one_of: c.one_of.clone(),
                instances: 0,
                min_instances: c.min_instances.max(1),
                sufficient: true,
                rules: Vec::new(),
            };
            if c.kind == InputKind::Priors {
                // Its count only: whether the retrieval lets the batch go is the priors'
                // (super::priors), told in the checker's "not sufficient" reason.
                p.min_instances = 0;
                p.instances = s
                    .series
                    .iter()
                    .map(|x| x.per_input.get(i).copied().unwrap_or(0))
                    .sum();
                out.push(p);
                continue;
            }
            let (mut series_done, mut series_left, mut series_told) = (0u32, 0u32, 0usize);
            self.findings(i, s, |f| {
                let holds = f.holds();
                p.sufficient &= holds;
                match f {
                    Finding::Instances { have, .. } => p.instances = have,
                    Finding::SeriesComplete { .. } => {
                        if holds {
                            series_done += 1;
                            return ControlFlow::Continue(());
                        }
                        series_left += 1;
                        if series_told >= MAX_SERIES_EXPLAINED {
                            return ControlFlow::Continue(());
                        }
                        series_told += 1;
                    }
                    _ => {}
                }
                p.rules.push(RuleProgress {
                    rule: f.rule().into(),
                    holds,
                    text: if holds && f.says_ok() {
                        "ok".into()
                    } else {
                        f.to_string()
                    },
                });
                ControlFlow::Continue(())
            });
            if c.completeness.is_some() {
                let untold = series_left as usize - series_told;
                p.rules.push(RuleProgress {
                    rule: "completeness".into(),
                    holds: series_left == 0,
                    text: if untold > 0 {
                        format!(
                            "{series_done} of {} series complete ({untold} more incomplete not listed)",
                            series_done + series_left
                        )
                    } else {
                        format!("{series_done} of {} series complete", series_done + series_left)
                    },
                });
            }
            out.push(p);
        }
        out
    }

    /// Walks input `i`'s rules over `s`, in the order [`Rules::sufficient`] reports them,
    /// handing each finding to `f` until it breaks. Only the rules the input sets are visited
    /// (an unset rule cannot fail).
    fn findings<'s>(
        &self,
        i: usize,
        s: &'s Snapshot,
        mut f: impl FnMut(Finding<'s>) -> ControlFlow<()>,
    ) {
        let Some(input) = self.inputs.get(i) else {
            return;
        };
        let c = &input.config;
        let series: Vec<_> = s
            .series
            .iter()
            .filter(|x| x.per_input.get(i).copied().unwrap_or(0) > 0)
            .collect();
        let count: u32 = series
            .iter()
            .map(|x| x.per_input.get(i).copied().unwrap_or(0))
            .sum();
        let n = series.len() as u32;
        macro_rules! visit {
            ($finding:expr) => {
                if f($finding).is_break() {
                    return;
                }
            };
        }
        visit!(Finding::Instances {
            have: count,
            need: c.min_instances.max(1),
        });
        if c.min_series > 0 {
            visit!(Finding::MinSeries {
                have: n,
                need: c.min_series,
            });
        }
        if let Some(max) = c.max_series {
            visit!(Finding::MaxSeries { have: n, max });
        }
        if c.single_series {
            visit!(Finding::SingleSeries { have: n });
        }
        if c.single_study_date {
            visit!(Finding::SingleStudyDate {
                dates: s.study_dates.get(i).map_or(0, Vec::len),
            });
        }
        if let Some(kind) = c.completeness {
            for x in &series {
                let expected = match kind {
                    Completeness::ImagesInAcquisition => x.images_in_acquisition,
                    Completeness::NumberOfSlices => x.number_of_slices,
                    Completeness::InstanceNumber => x.max_instance_number,
                };
                visit!(Finding::SeriesComplete {
                    series_uid: x.series_uid.as_deref(),
                    have: x.per_input.get(i).copied().unwrap_or(0),
                    expected,
                });
            }
        }
    }
}

/// At most this many incomplete series are named per input in [`Rules::explain`].
pub const MAX_SERIES_EXPLAINED: usize = 5;

/// What one rule of one input found in a snapshot (see [`Rules::findings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finding<'s> {
    /// `min_instances`: instances the input accepted.
    Instances { have: u32, need: u32 },
    /// `min_series`.
    MinSeries { have: u32, need: u32 },
    /// `max_series`.
    MaxSeries { have: u32, max: u32 },
    /// `single_series`.
    SingleSeries { have: u32 },
    /// `single_study_date`: distinct Study Dates seen.
    SingleStudyDate { dates: usize },
    /// `completeness`, per series: `expected` 0 = the data does not say.
    SeriesComplete {
        series_uid: Option<&'s str>,
        have: u32,
        expected: u32,
    },
}

impl Finding<'_> {
    fn holds(&self) -> bool {
        match *self {
            Finding::Instances { have, need } | Finding::MinSeries { have, need } => have >= need,
            Finding::MaxSeries { have, max } => have <= max,
            Finding::SingleSeries { have } => have <= 1,
            Finding::SingleStudyDate { dates } => dates <= 1,
            Finding::SeriesComplete { have, expected, .. } => expected != 0 && have >= expected,
        }
    }

    /// The config field the finding checks.
    fn rule(&self) -> &'static str {
        match self {
            Finding::Instances { .. } => "min_instances",
            Finding::MinSeries { .. } => "min_series",
            Finding::MaxSeries { .. } => "max_series",
            Finding::SingleSeries { .. } => "single_series",
            Finding::SingleStudyDate { .. } => "single_study_date",
            Finding::SeriesComplete { .. } => "completeness",
        }
    }

    /// Whether a holding finding reads better as "ok" than as its counts.
    fn says_ok(&self) -> bool {
        matches!(
            self,
            Finding::SingleSeries { .. } | Finding::SingleStudyDate { .. }
        )
    }
}

impl std::fmt::Display for Finding<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Finding::Instances { have, need } => write!(f, "{have} of {need} instances"),
            Finding::MinSeries { have, need } => write!(f, "{have} of {need} series"),
            Finding::MaxSeries { have, max } => write!(f, "{have} series, at most {max} allowed"),
            Finding::SingleSeries { have } => write!(f, "{have} series, one required"),
            Finding::SingleStudyDate { dates } => {
                if dates > 1 {
                    write!(f, "more than one study date")
                } else {
                    write!(f, "one study date")
                }
            }
            Finding::SeriesComplete {
                series_uid,
                have,
                expected,
            } => {
                write!(f, "series {} has {have} of ", series_uid.unwrap_or("?"))?;
                if expected == 0 {
                    write!(f, "unknown expected instances")
                } else {
                    write!(f, "{expected} expected instances")
                }
            }
        }
    }
}

/// One input's progress against its rules ([`Rules::explain`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputProgress {
    /// The `[[input]]` name.
    pub input: String,
    /// Its `one_of` group: the group is satisfied when any one of its inputs is.
    #[serde(default)]
    pub one_of: Option<String>,
    /// Instances the input accepted, and `min_instances`.
    pub instances: u32,
    pub min_instances: u32,
    /// Every rule of the input holds.
    pub sufficient: bool,
    /// The rules the input sets, in the order they are checked.
    pub rules: Vec<RuleProgress>,
}

impl InputProgress {
    /// In words: "ct: 40 of 100 instances; single_series: ok" ("ct (one of g): ..." for an
    /// input of a `one_of` group).
    pub fn summary(&self) -> String {
        let mut out = self.input.clone();
        if let Some(g) = &self.one_of {
            out.push_str(&format!(" (one of {g})"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            out.push_str(if i == 0 { ": " } else { "; " });
            if r.rule != "min_instances" {
                out.push_str(&r.rule);
                out.push_str(": ");
            }
            out.push_str(&r.text);
        }
        out
    }
}

/// One rule of one input ([`InputProgress`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleProgress {
    /// The config field (`min_instances`, `max_series`, `completeness`, ...).
    pub rule: std::borrow::Cow<'static, str>,
    pub holds: bool,
    /// What was counted, in words ("40 of 100 instances"), or "ok".
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patients::{InstanceRecord, Snapshot};
    use std::sync::Arc;

    fn input(toml_text: &str) -> InputConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn scanned(pairs: &[(u32, &str)]) -> Scanned {
        // Build an explicit VR LE data set and scan it, so tests go through the real scanner.
        let mut ds = Vec::new();
        let mut sorted = pairs.to_vec();
        sorted.sort();
        for (tag, v) in sorted {
            let mut v = v.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(b' ');
            }
            ds.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
            ds.extend_from_slice(&(tag as u16).to_le_bytes());
            ds.extend_from_slice(b"LO");
            ds.extend_from_slice(&(v.len() as u16).to_le_bytes());
            ds.extend_from_slice(&v);
        }
        let tags: Vec<u32> = pairs.iter().map(|p| p.0).collect();
        crate::dicom::scan::scan(
            &ds,
            crate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian,
            &tags,
        )
        .unwrap()
    }

    /// A requestor no sender rule is written for.
    const ANY: Sender<'static> = Sender {
        calling_ae_title: Some("ANY"),
        called_ae_title: Some("DICOMGATE"),
        address: None,
    };

    const MODALITY: u32 = 0x0008_0060;
    const SERIES_DESCRIPTION: u32 = 0x0008_103E;
    const BODY_PART: u32 = 0x0018_0015;

    #[test]
    fn globs() {
        assert!(glob_match(b"CT", b"CT"));
        assert!(!glob_match(b"CT", b"CTX"));
        assert!(glob_match(b"C?", b"CT"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"AX*", b"AX 3mm"));
        assert!(glob_match(b"*SCOUT*", b"a SCOUT b"));
        assert!(!glob_match(b"*SCOUT*", b"a SCOU b"));
        assert!(glob_match(b"a*b*c", b"aXbYbZc"));
        assert!(!glob_match(b"a*b*c", b"aXbYbZ"));
    }

    /// Issue 11 (5): the literal branch was tried before `*`, so a `*` in the text was taken as
    /// matching the pattern's `*` literally and the star's backtracking point was never set.
    #[test]
    fn glob_star_backtracks_past_a_literal_match() {
        assert!(glob_match(b"A*B", b"A*XB"));
        assert!(glob_match(b"*X", b"**X"));
        assert!(glob_match(b"*SCOUT*", b"* SCOUT"));
        assert!(glob_match(b"?*b", b"**b"));
        assert!(!glob_match(b"A*B", b"A*X"));
    }

    /// Issue 11 (5): `!*SCOUT*` let a scout through when its description held a `*`.
    #[test]
    fn negated_scout_pattern_refuses_a_description_containing_a_star() {
        let rules = Rules::compile(&[input(
            r#"name = "ct"
               match = { SeriesDescription = ["AX*", "!*SCOUT*"] }"#,
        )])
        .unwrap();
        for description in ["AX SCOUT*2", "AX SCOUT**", "AX *SCOUT*1"] {
            let v = scanned(&[(SERIES_DESCRIPTION, description)]);
            assert_eq!(rules.accepting(&v, &ANY), 0, "{description:?} was accepted");
        }
        // And the positive pattern still takes a description with a `*` after its prefix.
        for description in ["AX 3mm", "AX* 3mm"] {
            let v = scanned(&[(SERIES_DESCRIPTION, description)]);
            assert_eq!(rules.accepting(&v, &ANY), 1, "{description:?} was refused");
        }
    }

    /// An independent oracle: the textbook dynamic programme over (pattern prefix, text prefix),
    /// iterative, no backtracking at all. `m[i][j]`: `pat[..i]` matches `text[..j]`.
    fn dp_match(pat: &[u8], text: &[u8]) -> bool {
        let w = text.len() + 1;
        let mut m = vec![false; (pat.len() + 1) * w];
        m[0] = true;
        for i in 1..=pat.len() {
            for j in 0..=text.len() {
                m[i * w + j] = match pat[i - 1] {
                    b'*' => m[(i - 1) * w + j] || (j > 0 && m[i * w + j - 1]),
                    c => j > 0 && (c == b'?' || c == text[j - 1]) && m[(i - 1) * w + j - 1],
                };
            }
        }
        m[pat.len() * w + text.len()]
    }

    /// Every string over `alphabet` up to `max_len` long.
    fn all_strings(alphabet: &[u8], max_len: usize) -> Vec<Vec<u8>> {
        let mut out = vec![Vec::new()];
        let mut layer = vec![Vec::new()];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for s in &layer {
                for &c in alphabet {
                    let mut t: Vec<u8> = s.clone();
                    t.push(c);
                    next.push(t);
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    /// Property: the matcher agrees with the oracle on every pattern and every text up to five
    /// symbols over an alphabet holding both wildcards as text too (exhaustive, so no seed), and
    /// on seeded random longer ones.
    #[test]
    fn glob_agrees_with_a_dynamic_programming_oracle() {
        let alphabet = b"ab*?";
        let strings = all_strings(alphabet, 5);
        for pat in &strings {
            for text in &strings {
                assert_eq!(
                    glob_match(pat, text),
                    dp_match(pat, text),
                    "pattern {:?} text {:?}",
                    String::from_utf8_lossy(pat),
                    String::from_utf8_lossy(text)
                );
            }
        }
        // xorshift64, fixed seed: longer inputs with several stars.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut gen = |len: u64| -> Vec<u8> {
                let n = next() % len;
                (0..n).map(|_| alphabet[(next() % 4) as usize]).collect()
            };
            let (pat, text) = (gen(12), gen(24));
            assert_eq!(
                glob_match(&pat, &text),
                dp_match(&pat, &text),
                "pattern {:?} text {:?}",
                String::from_utf8_lossy(&pat),
                String::from_utf8_lossy(&text)
            );
        }
    }

    #[test]
    fn match_lists_negation_and_required_tags() {
        let rules = Rules::compile(&[
            input(
                r#"name = "ct"
                     match = { Modality = "CT", SeriesDescription = ["AX*", "COR*", "!*SCOUT*"] }"#,
            ),
            input(
                r#"name = "not_mr"
                     match = { Modality = "!MR" }
                     required_tags = ["BodyPartExamined"]"#,
            ),
        ])
        .unwrap();
        assert_eq!(rules.tags, vec![MODALITY, SERIES_DESCRIPTION, BODY_PART]);
        let a = scanned(&[(MODALITY, "CT"), (SERIES_DESCRIPTION, "AX 3mm")]);
        assert_eq!(rules.accepting(&a, &ANY), 0b01);
        let b = scanned(&[
            (MODALITY, "CT"),
            (SERIES_DESCRIPTION, "AX SCOUT"),
            (BODY_PART, "HEAD"),
        ]);
        assert_eq!(rules.accepting(&b, &ANY), 0b10);
        let c = scanned(&[(MODALITY, "MR"), (BODY_PART, "HEAD")]);
        assert_eq!(rules.accepting(&c, &ANY), 0);
        // Missing element: no positive match, every negation holds.
        let d = scanned(&[(BODY_PART, "HEAD")]);
        assert_eq!(rules.accepting(&d, &ANY), 0b10);
        // Required tag present but empty.
        let e = scanned(&[(MODALITY, "CT"), (BODY_PART, "")]);
        assert_eq!(rules.accepting(&e, &ANY), 0);
    }

    fn from<'a>(calling: &'a str, called: &'a str, address: &str) -> Sender<'a> {
        Sender {
            calling_ae_title: Some(calling),
            called_ae_title: Some(called),
            address: Some(address.parse().unwrap()),
        }
    }

    /// Issue 14: `peer` CIDR blocks, IPv4 and IPv6, with prefixes 0 and full length, a bare
    /// address, host bits set, and an IPv4-mapped IPv6 peer taken as its IPv4 address.
    #[test]
    fn peer_cidr_blocks() {
        let rules = Rules::compile(&[
            input(
                r#"name = "lan"
                     peer = ["10.1.0.0/16", "2001:db8:1::/48"]"#,
            ),
            input(
                r#"name = "any4"
                     peer = ["0.0.0.0/0"]"#,
            ),
            input(
                r#"name = "any6"
                     peer = ["::/0"]"#,
            ),
            input(
                r#"name = "host"
                     peer = ["192.168.7.9/32", "2001:db8::5/128", "10.9.9.9"]"#,
            ),
            input(
                r#"name = "hostbits"
                     peer = ["172.16.5.4/12"]"#,
            ),
        ])
        .unwrap();
        let v = scanned(&[(MODALITY, "CT")]);
        let bits = |a: &str| rules.accepting(&v, &from("X", "Y", a));
        assert_eq!(bits("10.1.200.3"), 0b00011);
        assert_eq!(bits("10.2.0.1"), 0b00010);
        assert_eq!(bits("2001:db8:1:ffff::1"), 0b00101);
        assert_eq!(bits("2001:db8:2::1"), 0b00100);
        assert_eq!(bits("192.168.7.9"), 0b01010);
        assert_eq!(bits("192.168.7.8"), 0b00010);
        assert_eq!(bits("2001:db8::5"), 0b01100);
        assert_eq!(bits("2001:db8::6"), 0b00100);
        assert_eq!(bits("10.9.9.9"), 0b01010);
        assert_eq!(bits("172.31.255.255"), 0b10010);
        assert_eq!(bits("172.32.0.0"), 0b00010);
        // An IPv4 client on a dual-stack listener.
        assert_eq!(bits("::ffff:10.1.0.1"), 0b00011);
        // No IPv6 block matches an IPv4 client, an IPv4-mapped one included (README says so).
        let mapped = Rules::compile(&[input("name = \"m\"\npeer = [\"::ffff:0:0/96\"]")]).unwrap();
        assert_eq!(mapped.accepting(&v, &from("X", "Y", "::ffff:10.1.0.1")), 0);
        assert_eq!(mapped.accepting(&v, &from("X", "Y", "10.1.0.1")), 0);
        // Not known (recovered from disk): no peer rule holds.
        let unknown = Sender {
            address: None,
            ..from("X", "Y", "10.1.0.1")
        };
        assert_eq!(rules.accepting(&v, &unknown), 0);
        for bad in ["10.0.0.0/33", "::/129", "10.0.0", "x"] {
            let e =
                Rules::compile(&[input(&format!("name = \"a\"\npeer = [{bad:?}]"))]).unwrap_err();
            assert!(e.contains("peer") && e.contains(bad), "{e}");
        }
    }

    /// Issue 14: Calling and Called AE Title rules use the `match` patterns, `!` included; an
    /// unknown AE title holds no rule.
    #[test]
    fn calling_and_called_ae_title_rules() {
        let rules = Rules::compile(&[
            input(
                r#"name = "ct1"
                     calling_ae = ["CT*", "!CT_TEST"]"#,
            ),
            input(
                r#"name = "to_gate2"
                     called_ae = "GATE2""#,
            ),
            input(
                r#"name = "both"
                     calling_ae = "MR?"
                     called_ae = "!GATE2""#,
            ),
        ])
        .unwrap();
        let v = scanned(&[(MODALITY, "CT")]);
        let bits =
            |calling: &str, called: &str| rules.accepting(&v, &from(calling, called, "127.0.0.1"));
        assert_eq!(bits("CT_SCANNER", "GATE"), 0b001);
        assert_eq!(bits("CT_TEST", "GATE"), 0b000);
        assert_eq!(bits("CT_TEST", "GATE2"), 0b010);
        assert_eq!(bits("MR1", "GATE"), 0b100);
        assert_eq!(bits("MR1", "GATE2"), 0b010);
        assert_eq!(
            bits(" CT1 ", "GATE"),
            0b001,
            "AE title padding is not significant"
        );
        // Nor in a pattern (review of issue 14, low item a): " GATE2 " matched no title.
        let padded = Rules::compile(&[input(
            r#"name = "p"
                 called_ae = [" GATE2 "]
                 calling_ae = "! MR1""#,
        )])
        .unwrap();
        assert_eq!(padded.accepting(&v, &from("CT1", "GATE2", "127.0.0.1")), 1);
        assert_eq!(padded.accepting(&v, &from("MR1", "GATE2", "127.0.0.1")), 0);
        assert!(Rules::compile(&[input("name = \"p\"\ncalling_ae = \"  \"")]).is_err());
        let unknown = Sender {
            calling_ae_title: None,
            called_ae_title: None,
            address: None,
        };
        assert_eq!(rules.accepting(&v, &unknown), 0);
        assert_eq!(rules.input_bit("both"), Some(0b100));
        assert_eq!(rules.input_bit("nope"), None);
    }

    /// Issue 14 (5): alternative inputs: a group is satisfied by any one of its inputs; every
    /// group and every ungrouped input must be.
    #[test]
    fn one_of_groups() {
        let rules = Rules::compile(&[
            input(
                r#"name = "ct"
                     one_of = "anatomy"
                     min_instances = 2"#,
            ),
            input(
                r#"name = "mr"
                     one_of = "anatomy""#,
            ),
            input(r#"name = "plan""#),
        ])
        .unwrap();
        // bit 0 ct, bit 1 mr, bit 2 plan
        let plan = rec("p", "d", 0b100, 1, 0);
        let ct = |n| rec("c", "d", 0b001, n, 0);
        let mr = rec("m", "d", 0b010, 1, 0);
        assert!(rules
            .sufficient(&Snapshot::of(std::slice::from_ref(&plan)))
            .unwrap_err()
            .contains("group anatomy"));
        assert!(rules
            .sufficient(&Snapshot::of(&[plan.clone(), ct(1)]))
            .is_err());
        assert!(rules
            .sufficient(&Snapshot::of(&[plan.clone(), ct(1), ct(2)]))
            .is_ok());
        assert!(rules
            .sufficient(&Snapshot::of(&[plan.clone(), mr.clone()]))
            .is_ok());
        assert!(rules
            .sufficient(&Snapshot::of(&[mr.clone(), ct(1), ct(2)]))
            .unwrap_err()
            .contains("input plan"));
        assert!(Rules::compile(&[input("name = \"a\"\none_of = \" \"")]).is_err());
        // Explained input by input, each naming its group; the patient is sufficient though
        // one input of the group is not.
        let recs = [plan.clone(), mr.clone()];
        let p = rules.explain(&Snapshot::of(&recs));
        assert_eq!(p[0].summary(), "ct (one of anatomy): 0 of 2 instances");
        assert_eq!(p[1].summary(), "mr (one of anatomy): 1 of 1 instances");
        assert!(!p[0].sufficient && p[1].sufficient && p[2].sufficient);
    }

    #[test]
    fn config_errors() {
        assert!(Rules::compile(&[input(
            r#"name = "x"
            match = { NoSuchKeyword = "1" }"#
        )])
        .unwrap_err()
        .contains("unknown tag keyword"));
        assert!(Rules::compile(&[input(
            r#"name = "x"
            match = { Rows = "1" }"#
        )])
        .unwrap_err()
        .contains("not a text element"));
        assert!(Rules::compile(&[input(r#"name = "../x""#)]).is_err());
        assert!(Rules::compile(&[input(r#"name = "a""#), input(r#"name = "a""#)]).is_err());
    }

    fn rec(series: &str, date: &str, inputs: u64, number: u32, iia: u32) -> InstanceRecord {
        InstanceRecord {
            sop_instance_uid: "1".into(),
            study_uid: Some("1.2".into()),
            series_uid: Some(Arc::from(series)),
            study_date: Some(Arc::from(date)),
            path: Default::default(),
            bytes: 1,
            inputs,
            instance_number: number,
            images_in_acquisition: iia,
            number_of_slices: 0,
        }
    }

    #[test]
    fn sufficiency() {
        let rules = Rules::compile(&[input(
            r#"name = "ct"
               min_instances = 3
               min_series = 1
               max_series = 2
               single_study_date = true"#,
        )])
        .unwrap();
        let mut recs = vec![rec("1", "20260101", 1, 1, 0), rec("1", "20260101", 1, 2, 0)];
        assert!(rules
            .sufficient(&Snapshot::of(&recs))
            .unwrap_err()
            .contains("2 of 3"));
        recs.push(rec("2", "20260101", 1, 1, 0));
        assert!(rules.sufficient(&Snapshot::of(&recs)).is_ok());
        // An instance the input does not accept does not count.
        recs.push(rec("3", "20260101", 0, 1, 0));
        assert!(rules.sufficient(&Snapshot::of(&recs)).is_ok());
        recs.push(rec("3", "20260101", 1, 1, 0));
        assert!(rules
            .sufficient(&Snapshot::of(&recs))
            .unwrap_err()
            .contains("at most 2"));
        recs.truncate(3);
        recs.push(rec("2", "20260102", 1, 2, 0));
        assert!(rules
            .sufficient(&Snapshot::of(&recs))
            .unwrap_err()
            .contains("study date"));
    }

    /// The explanation is the checker's evaluation: for every snapshot, an input is explained
    /// sufficient exactly when `sufficient` finds nothing wrong with it, and the first rule
    /// explained as failing is the one `sufficient` names.
    #[test]
    fn explain_agrees_with_sufficient() {
        let rules = Rules::compile(&[
            input(
                r#"name = "ct"
                   min_instances = 3
                   max_series = 1
                   single_series = true"#,
            ),
            input(
                r#"name = "s"
                   completeness = "instance_number""#,
            ),
        ])
        .unwrap();
        let mut recs = vec![rec("1", "d", 1, 1, 0)];
        let p = rules.explain(&Snapshot::of(&recs));
        assert_eq!(
            p[0].summary(),
            "ct: 1 of 3 instances; max_series: 1 series, at most 1 allowed; single_series: ok"
        );
        assert_eq!(
            p[1].summary(),
            "s: 0 of 1 instances; completeness: 0 of 0 series complete"
        );
        assert!(!p[0].sufficient && !p[1].sufficient);
        assert_eq!(
            rules.sufficient(&Snapshot::of(&recs)).unwrap_err(),
            "input ct: 1 of 3 instances"
        );
        recs.push(rec("1", "d", 1, 2, 0));
        recs.push(rec("1", "d", 3, 4, 0));
        let p = rules.explain(&Snapshot::of(&recs));
        assert!(p[0].sufficient, "{p:?}");
        assert_eq!(p[0].instances, 3);
        assert_eq!(
            p[1].summary(),
            "s: 1 of 1 instances; completeness: series 1 has 1 of 4 expected instances; completeness: 0 of 1 series complete"
        );
        assert_eq!(
            rules.sufficient(&Snapshot::of(&recs)).unwrap_err(),
            "input s: series 1 has 1 of 4 expected instances"
        );
        recs.push(rec("2", "d", 1, 1, 0));
        let p = rules.explain(&Snapshot::of(&recs));
        assert_eq!(p[0].summary(), "ct: 4 of 3 instances; max_series: 2 series, at most 1 allowed; single_series: 2 series, one required");
        assert_eq!(
            rules.sufficient(&Snapshot::of(&recs)).unwrap_err(),
            "input ct: 2 series, at most 1 allowed"
        );
    }

    /// A patient with many incomplete series is explained in bounded space.
    #[test]
    fn explain_names_a_bounded_number_of_series() {
        let rules = Rules::compile(&[input(
            r#"name = "s"
               completeness = "images_in_acquisition""#,
        )])
        .unwrap();
        let recs: Vec<_> = (0..50).map(|i| rec(&i.to_string(), "d", 1, 1, 2)).collect();
        let p = rules.explain(&Snapshot::of(&recs));
        assert_eq!(p[0].rules.len(), 1 + MAX_SERIES_EXPLAINED + 1, "{p:?}");
        assert_eq!(
            p[0].rules.last().unwrap().text,
            "0 of 50 series complete (45 more incomplete not listed)"
        );
    }

    #[test]
    fn completeness_from_the_data() {
        let by_number = Rules::compile(&[input(
            r#"name = "s"
               completeness = "instance_number""#,
        )])
        .unwrap();
        let mut recs = vec![rec("1", "d", 1, 1, 0), rec("1", "d", 1, 3, 0)];
        assert!(by_number.sufficient(&Snapshot::of(&recs)).is_err());
        recs.push(rec("1", "d", 1, 2, 0));
        assert!(by_number.sufficient(&Snapshot::of(&recs)).is_ok());
        let by_iia = Rules::compile(&[input(
            r#"name = "s"
               completeness = "images_in_acquisition""#,
        )])
        .unwrap();
        assert!(by_iia
            .sufficient(&Snapshot::of(&recs))
            .unwrap_err()
            .contains("unknown"));
        let recs = vec![rec("1", "d", 1, 1, 2), rec("1", "d", 1, 2, 2)];
        assert!(by_iia.sufficient(&Snapshot::of(&recs)).is_ok());
    }

    #[test]
    fn no_inputs_accepts_everything() {
        let rules = Rules::compile(&[]).unwrap();
        assert_eq!(rules.accepting(&scanned(&[(MODALITY, "XA")]), &ANY), 1);
        assert!(rules.sufficient(&Snapshot::default()).is_err());
        assert!(rules
            .sufficient(&Snapshot::of(&[rec("1", "d", 1, 0, 0)]))
            .is_ok());
    }
}
