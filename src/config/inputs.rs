//! `[[input]]` sections as plain data (the rules' configuration) and their start-up checks: the
//! pipeline's rules (`pipeline::rules`) compile what these checks passed. Owns nothing else;
//! no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::dicom::dictionary::keyword_tag;

/// The input folder of instances kept although no `[[input]]` accepts them.
pub const UNMATCHED_INPUT: &str = "_unmatched";

/// At most 64 inputs: an instance's accepting inputs are a bit set in a u64.
pub const MAX_INPUTS: usize = 64;

/// A pattern or a list of patterns (TOML string or array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Patterns {
    One(String),
    Any(Vec<String>),
}

/// Where a series' expected size comes from, when a batch must hold whole series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Completeness {
    /// Images in Acquisition (0020,1002).
    ImagesInAcquisition,
    /// Number of Slices (0054,0081).
    NumberOfSlices,
    /// The highest Instance Number (0020,0013) seen, as Orthanc does: complete when the count
    /// reaches it.
    InstanceNumber,
}

/// One `[[input]]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, Patterns>,
    #[serde(default)]
    pub required_tags: Vec<String>,
    #[serde(default = "one")]
    pub min_instances: u32,
    #[serde(default)]
    pub min_series: u32,
    #[serde(default)]
    pub max_series: Option<u32>,
    #[serde(default)]
    pub single_series: bool,
    #[serde(default)]
    pub single_study_date: bool,
    #[serde(default)]
    pub completeness: Option<Completeness>,
    /// Calling AE Title patterns the requestor must match (as `match` values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae: Option<Patterns>,
    /// Called AE Title patterns the association must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_ae: Option<Patterns>,
    /// CIDR blocks the requestor's address must be in (any of them); empty = any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer: Vec<String>,
    /// The group of alternative inputs this one belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<String>,
    /// `received` (default): instances senders send, chosen by the rules above. `priors`: the
    /// patient's earlier studies, fetched by Query/Retrieve (see [`PriorsConfig`]).
    #[serde(default, skip_serializing_if = "InputKind::is_received")]
    pub kind: InputKind,
    /// With `kind = "priors"` (see [`PriorsConfig`], which [`InputConfig::priors`] resolves
    /// these to): the `[[peer]]` that is the Query/Retrieve SCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_studies: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modalities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// What an input takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    #[default]
    Received,
    Priors,
}

impl InputKind {
    pub fn is_received(&self) -> bool {
        *self == InputKind::Received
    }
}

/// A `priors` input's settings (issue 14 item 6): when a patient first arrives, its earlier
/// studies are asked of `qr_peer` (C-FIND, Patient Root, STUDY level, by Patient ID) and
/// retrieved (C-MOVE to `move_destination`); the patient is not sufficient until they are in,
/// or `timeout_seconds` passed (then it goes on without them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorsConfig {
    /// The `[[peer]]` (name) that is the Query/Retrieve SCP.
    pub qr_peer: String,
    /// The AE title the Q/R SCP sends retrieved instances to (it must know our address under
    /// it); `None`: `[node] ae_title`.
    pub move_destination: Option<String>,
    /// At most this many prior studies, the newest first (by Study Date).
    pub max_studies: u32,
    /// Only studies at most this many days old (by Study Date); 0 = any age.
    pub max_age_days: u32,
    /// Only studies whose Modalities in Study holds one of these; [] = any (a study whose
    /// peer returns no Modalities in Study is kept).
    pub modalities: Vec<String>,
    /// How long, from the patient's first arrival, the node keeps trying (a Q/R peer that is
    /// down is retried); then the patient goes on without the priors not yet in.
    pub timeout_seconds: u64,
}

impl InputConfig {
    /// The `priors` settings with their defaults (max_studies 5, max_age_days 0 = any,
    /// modalities [] = any, timeout_seconds 600).
    pub fn priors(&self) -> PriorsConfig {
        PriorsConfig {
            qr_peer: self.qr_peer.clone().unwrap_or_default(),
            move_destination: self.move_destination.clone(),
            max_studies: self.max_studies.unwrap_or(5),
            max_age_days: self.max_age_days.unwrap_or(0),
            modalities: self.modalities.clone().unwrap_or_default(),
            timeout_seconds: self.timeout_seconds.unwrap_or(600),
        }
    }

    pub(crate) fn sets_priors_fields(&self) -> bool {
        self.qr_peer.is_some()
            || self.move_destination.is_some()
            || self.max_studies.is_some()
            || self.max_age_days.is_some()
            || self.modalities.is_some()
            || self.timeout_seconds.is_some()
    }
}

fn one() -> u32 {
    1
}

impl InputConfig {
    /// The input used when the config has none: accepts every instance.
    pub fn accept_all() -> InputConfig {
        InputConfig {
            name: "all".into(),
            matches: BTreeMap::new(),
            required_tags: Vec::new(),
            min_instances: 1,
            min_series: 0,
            max_series: None,
            single_series: false,
            single_study_date: false,
            completeness: None,
            calling_ae: None,
            called_ae: None,
            peer: Vec::new(),
            one_of: None,
            kind: InputKind::Received,
            qr_peer: None,
            move_destination: None,
            max_studies: None,
            max_age_days: None,
            modalities: None,
            timeout_seconds: None,
        }
    }
}

/// A `peer` CIDR block of an input's sender rules; a bare address is a block of one.
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    let t = s.trim();
    t.parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .ok()
}

/// The patterns of a sender rule (`calling_ae`, `called_ae`): each, after a leading `!`, trimmed
/// (AE titles are compared without their insignificant spaces, PS3.5 AE VR) and 1 to 16
/// characters other than `*`, printable ASCII without a backslash. Returns (negated, pattern).
pub fn ae_patterns(
    input: &str,
    field: &str,
    p: &Option<Patterns>,
) -> Result<Vec<(bool, Vec<u8>)>, String> {
    let Some(p) = p else {
        return Ok(Vec::new());
    };
    let list = match p {
        Patterns::One(p) => std::slice::from_ref(p),
        Patterns::Any(v) => v.as_slice(),
    };
    let pats: Vec<(bool, Vec<u8>)> = list
        .iter()
        .map(|p| match p.strip_prefix('!') {
            Some(rest) => (true, rest.as_bytes().trim_ascii().to_vec()),
            None => (false, p.as_bytes().trim_ascii().to_vec()),
        })
        .collect();
    if pats.is_empty() {
        return Err(format!(
            "input {input:?}: {field} = []: give at least one pattern"
        ));
    }
    for (negated, glob) in &pats {
        let literal = glob.iter().filter(|&&b| b != b'*').count();
        let printable = glob
            .iter()
            .all(|&b| (0x20..0x7F).contains(&b) && b != b'\\');
        if glob.is_empty() || literal > 16 || !printable {
            return Err(format!(
                "input {input:?}: {field} pattern {:?} is not an AE title pattern: 1 to 16 \
                 printable characters other than a backslash ('*' and '?' are wildcards, a \
                 leading '!' negates)",
                format!(
                    "{}{}",
                    if *negated { "!" } else { "" },
                    String::from_utf8_lossy(glob)
                )
            ));
        }
    }
    Ok(pats)
}

/// Refuses `[[input]]` sections the rules cannot compile, naming the input and the field: bad
/// or repeated names, `max_series < min_series`, unknown or non-text keywords, an empty
/// `one_of`, bad sender rules, the priors input's own rules (issue 14), more than 64 inputs.
pub fn check_inputs(inputs: &[InputConfig]) -> Result<(), String> {
    if inputs.len() > MAX_INPUTS {
        return Err(format!("at most {MAX_INPUTS} [[input]] sections"));
    }
    for (i, c) in inputs.iter().enumerate() {
        if c.name.is_empty()
            || !c
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "input name {:?}: use letters, digits, '-' and '_' (it names a folder)",
                c.name
            ));
        }
        if inputs[..i].iter().any(|o| o.name == c.name) {
            return Err(format!("two inputs named {:?}", c.name));
        }
        if c.max_series.is_some_and(|m| m < c.min_series) {
            return Err(format!("input {}: max_series < min_series", c.name));
        }
        for kw in c.matches.keys() {
            let (_, text) = keyword_tag(kw).map_err(|e| format!("input {}: {e}", c.name))?;
            if !text {
                return Err(format!(
                    "input {}: {kw} is not a text element; only text values can be matched",
                    c.name
                ));
            }
        }
        for kw in &c.required_tags {
            keyword_tag(kw).map_err(|e| format!("input {}: {e}", c.name))?;
        }
        ae_patterns(&c.name, "calling_ae", &c.calling_ae)?;
        ae_patterns(&c.name, "called_ae", &c.called_ae)?;
        for b in &c.peer {
            if parse_cidr(b).is_none() {
                return Err(format!(
                    "input {:?}: peer {b:?} is not a CIDR block (e.g. \"10.0.0.0/8\", \
                     \"2001:db8::/32\") or an address",
                    c.name
                ));
            }
        }
        if c.one_of.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return Err(format!("input {:?}: one_of must name a group", c.name));
        }
        if c.kind == InputKind::Received && c.sets_priors_fields() {
            return Err(format!(
                "input {:?}: qr_peer, move_destination, max_studies, max_age_days, \
                 modalities and timeout_seconds belong to kind = \"priors\"",
                c.name
            ));
        }
        if c.kind == InputKind::Priors {
            if inputs[..i].iter().any(|o| o.kind == InputKind::Priors) {
                return Err(format!(
                    "input {:?}: only one input may be kind = \"priors\"",
                    c.name
                ));
            }
            if !c.matches.is_empty()
                || !c.required_tags.is_empty()
                || c.calling_ae.is_some()
                || c.called_ae.is_some()
                || !c.peer.is_empty()
                || c.one_of.is_some()
                || c.completeness.is_some()
                || c.min_series > 0
                || c.max_series.is_some()
                || c.single_series
                || c.single_study_date
                || c.min_instances != 1
            {
                return Err(format!(
                    "input {:?}: a kind = \"priors\" input takes what its retrieval brings; \
                     remove match, required_tags, sender rules, one_of and the count rules",
                    c.name
                ));
            }
            let pc = c.priors();
            if pc.qr_peer.trim().is_empty() {
                return Err(format!(
                    "input {:?}: kind = \"priors\" needs qr_peer, the name of the [[peer]] \
                     that is the Query/Retrieve SCP",
                    c.name
                ));
            }
            if let Some(d) = &pc.move_destination {
                let t = d.trim();
                if t.is_empty()
                    || t.len() > 16
                    || t.bytes()
                        .any(|b| b == b'\\' || b.is_ascii_control() || !b.is_ascii())
                {
                    return Err(format!(
                        "input {:?}: move_destination = {d:?} is not an AE title (1 to 16 \
                         characters, no backslash or control character: PS3.5 Table 6.2-1)",
                        c.name
                    ));
                }
            }
            if pc.max_studies == 0 {
                return Err(format!(
                    "input {:?}: max_studies must be at least 1",
                    c.name
                ));
            }
            if pc.timeout_seconds == 0 || pc.timeout_seconds > 30 * 86_400 {
                return Err(format!(
                    "input {:?}: timeout_seconds = {}: use 1 to 2592000 (30 days)",
                    c.name, pc.timeout_seconds
                ));
            }
            if pc.max_age_days > 100 * 366 {
                return Err(format!(
                    "input {:?}: max_age_days = {}: at most 36600; 0 = any age",
                    c.name, pc.max_age_days
                ));
            }
        }
    }
    Ok(())
}
