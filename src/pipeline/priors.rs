//! Prior studies by Query/Retrieve (issue 14 item 6): the `kind = "priors"` input.
//!
//! When a patient first arrives, the priors thread asks the input's `qr_peer` for the
//! patient's studies (C-FIND, Patient Root, STUDY level, by Patient ID), leaves out the studies
//! the patient's batch already holds, filters by age and modality, keeps the newest
//! `max_studies`, and retrieves each (C-MOVE to `move_destination`, our own AE title by
//! default). The Q/R peer sends the instances back over ordinary C-STORE associations to the
//! node's listener; at the door, an instance whose Study Instance UID is one being retrieved for
//! its patient joins the priors input (and no other). The patient is not sufficient until the
//! retrieval finished and every instance the C-MOVEs reported completed is in the batch, or
//! `timeout_seconds` (from the first arrival) passed: then it goes on without what is missing
//! (logged). A Q/R peer that is down or fails is retried with backoff until then. A patient
//! with no prior study goes on at once.
//!
//! Owns: the study → patient routing table (read by the reactors at the door through an
//! `ArcSwap` snapshot, never a lock), each patient's retrieval state, and its record in
//! `DATA_DIR/priors/` (written before any C-MOVE, so a restart routes instances already
//! retrieved the same way and resumes an unfinished retrieval). Must never block the
//! checker or a reactor on the network: the network is the priors thread's alone.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use super::now_ms;
use super::rules::PriorsConfig;
use crate::dicom::sop_class::{PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE};
use crate::dimse::query::StudyQuery;
use crate::net::scu::{Client, Proposal, ScuOptions};

/// Matches taken from one C-FIND at most (more: the peer is cut off and the query retried).
const MAX_MATCHES: usize = 1000;
/// Routing entries of patients claimed this long ago are dropped.
const ROUTE_KEEP_MS: u64 = 24 * 3600 * 1000;

/// Where a patient's retrieval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asking or retrieving (or waiting to retry).
    Retrieving,
    /// Every C-MOVE finished; `expected` instances were reported completed.
    Done,
    /// The peer has no earlier study (after the filters).
    None,
    /// `timeout_seconds` passed first: the patient goes on without what is missing.
    TimedOut,
    /// The Patient ID cannot be queried safely (empty, or holds `*`, `?` or `\`).
    Unqueryable,
}

/// One patient's retrieval, as kept in `DATA_DIR/priors/<patient folder>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The grouping key (Patient ID) in hex: its exact bytes.
    key_hex: String,
    /// The same, as UTF-8 (lossy), for people and logs.
    patient_id: String,
    /// Tells this batch's retrieval from an earlier one of the same patient (a retrieval
    /// that ends after its batch was claimed must not write into the next one's entry).
    generation: u64,
    began_ms: u64,
    /// Study Instance UIDs of the batch's own (non-prior) instances, noted as they arrive.
    #[serde(default)]
    current: Vec<String>,
    phase: Phase,
    /// Study Instance UIDs being retrieved.
    studies: Vec<String>,
    /// Sub-operations the C-MOVEs reported completed.
    expected: u32,
    attempts: u32,
    last_error: Option<String>,
}

/// The priors input of a node.
pub struct Priors {
    pub config: PriorsConfig,
    /// The priors input's bit.
    pub bit: u64,
    peer_ae: String,
    peer_address: String,
    calling_ae: String,
    move_destination: String,
    /// Study Instance UID → (grouping key, when added).
    routes: ArcSwap<HashMap<String, (Vec<u8>, u64)>>,
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
    queue: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    dir: PathBuf,
    next_generation: std::sync::atomic::AtomicU64,
    /// `[log] phi`: whether log lines show the Patient ID (see [`super::Who`]).
    phi: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl std::fmt::Debug for Priors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Priors")
            .field("peer", &self.peer_address)
            .field("bit", &self.bit)
            .finish_non_exhaustive()
    }
}

impl Priors {
    /// The priors input of `config`, if it has one, with its records loaded from
    /// `DATA_DIR/priors/` (before the patients are recovered, so their prior instances route
    /// as they did).
    pub fn load(
        config: &crate::config::Config,
        rules: &super::Rules,
    ) -> io::Result<Option<Priors>> {
        let Some(bit) = rules.priors else {
            return Ok(None);
        };
        let Some(input) = config
            .inputs
            .iter()
            .find(|i| i.kind == super::rules::InputKind::Priors)
        else {
            return Ok(None);
        };
        let pc = input.priors();
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let peer = config
            .peers
            .iter()
            .find(|p| p.name == pc.qr_peer)
            .ok_or_else(|| {
                invalid(format!(
                    "input {:?}: qr_peer = {:?} names no [[peer]]",
                    input.name, pc.qr_peer
                ))
            })?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let dir = config.node.data_dir.join("priors");
        std::fs::create_dir_all(&dir)?;
        let p = Priors {
            phi: config.log.phi,
            move_destination: pc
                .move_destination
                .clone()
                .unwrap_or_else(|| config.node.ae_title.trim().to_string()),
            config: pc,
            bit,
            peer_ae: peer.ae_title.trim().to_string(),
            peer_address: peer.address.clone(),
            calling_ae: config.node.ae_title.trim().to_string(),
            routes: ArcSwap::from_pointee(HashMap::new()),
            entries: Mutex::new(HashMap::new()),
            queue: tx,
            rx,
            dir,
            next_generation: std::sync::atomic::AtomicU64::new(now_ms()),
        };
        let mut routes = HashMap::new();
        for e in std::fs::read_dir(&p.dir)? {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let entry: Entry = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable priors record left in place");
                    continue;
                }
            };
            let Some(key) = unhex(&entry.key_hex) else {
                tracing::warn!(path = %path.display(), "priors record without a valid key left in place");
                continue;
            };
            for s in &entry.studies {
                routes.insert(s.clone(), (key.clone(), now_ms()));
            }
            if entry.phase == Phase::Retrieving {
                let _ = p.queue.send(key.clone());
            }
            p.lock().insert(key, entry);
        }
        p.routes.store(Arc::new(routes));
        Ok(Some(p))
    }

    /// How log lines name the patient `patient_id` ([`super::Who`]).
    /// How log lines name the patient of `key` (its digest, the ID only with `[log] phi`).
    fn who(&self, key: &[u8]) -> super::Who {
        super::Who::new(key, self.phi)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The priors input's bit when `study_uid` is being (or was) retrieved for `key`: such an
    /// instance joins the priors input and no other. Lock-free (the reactors call it).
    pub fn route(&self, key: &[u8], study_uid: Option<&str>) -> Option<u64> {
        let uid = study_uid?;
        let routes = self.routes.load();
        routes
            .get(uid)
            .filter(|(k, _)| k.as_slice() == key)
            .map(|_| self.bit)
    }

    /// A patient has an instance (of `study_uid`) that is not a prior: the first time, its
    /// retrieval begins; the study is noted as the batch's own either way, so that it is never
    /// fetched as a prior.
    pub fn note_patient(&self, key: &[u8], study_uid: Option<&str>) {
        let mut m = self.lock();
        if let Some(e) = m.get_mut(key) {
            if let Some(s) = study_uid {
                if !e.current.iter().any(|c| c == s) && e.current.len() < 64 {
                    e.current.push(s.to_string());
                }
            }
            return;
        }
        let entry = Entry {
            key_hex: hex(key),
            patient_id: String::from_utf8_lossy(key).into_owned(),
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            began_ms: now_ms(),
            current: study_uid.map(str::to_string).into_iter().collect(),
            phase: Phase::Retrieving,
            studies: Vec::new(),
            expected: 0,
            attempts: 0,
            last_error: None,
        };
        // Not written yet (ingest must not wait for a disk flush): until its studies are known
        // there is nothing a restart could lose, since recovery notes every patient again.
        m.insert(key.to_vec(), entry);
        drop(m);
        let _ = self.queue.send(key.to_vec());
    }

    /// After recovery: retrieval records of patients with nothing pending (their batch was
    /// claimed before a crash removed the record) go, so a next arrival asks again.
    pub fn prune(&self, has_patient: impl Fn(&[u8]) -> bool) {
        let mut m = self.lock();
        let gone: Vec<Vec<u8>> = m.keys().filter(|k| !has_patient(k)).cloned().collect();
        for k in gone {
            m.remove(&k);
            let _ = std::fs::remove_file(self.path(&k));
        }
    }

    /// Whether the priors let `key`'s batch go, given `have` instances of the priors input in
    /// it; `Err` says what it waits for.
    pub fn gate(&self, key: &[u8], have: u32) -> Result<(), String> {
        let mut m = self.lock();
        let Some(e) = m.get_mut(key) else {
            drop(m);
            self.note_patient(key, None); // recovered without a record: ask now
            return Err("priors: not asked yet".into());
        };
        let waiting = match e.phase {
            Phase::Retrieving => true,
            Phase::Done => have < e.expected,
            Phase::None | Phase::TimedOut | Phase::Unqueryable => false,
        };
        if !waiting {
            return Ok(());
        }
        if now_ms()
            >= e.began_ms
                .saturating_add(self.config.timeout_seconds * 1000)
        {
            // The timeout holds whatever is missing: the retrieval, or instances a C-MOVE
            // reported but that never reached this patient's batch.
            let who = self.who(key);
            tracing::warn!(
                patient = %who.digest, patient_id = who.id,
                phase = ?e.phase,
                have,
                expected = e.expected,
                last_error = e.last_error.as_deref().unwrap_or(""),
                "priors: timed out ({} s): the patient goes on without the priors not yet in",
                self.config.timeout_seconds
            );
            e.phase = Phase::TimedOut;
            let e = e.clone();
            self.persist(key, &e);
            return Ok(());
        }
        Err(match (e.phase, &e.last_error) {
            (Phase::Done, _) => format!("priors: {have} of {} retrieved instances in", e.expected),
            (_, None) => format!("priors: retrieving from {}", self.peer_address),
            (_, Some(err)) => format!(
                "priors: retrieving from {} (attempt {} failed: {err})",
                self.peer_address, e.attempts
            ),
        })
    }

    /// The batch of `key` was claimed, for processing or expiry: its retrieval record goes (a
    /// later batch of the patient asks again). Its routes stay a day, so instances of a C-MOVE still under way join the
    /// priors input rather than another.
    pub fn claimed(&self, key: &[u8]) {
        let mut m = self.lock();
        let finished = match m.remove(key) {
            Some(e) => {
                let _ = std::fs::remove_file(self.path(key));
                e.phase != Phase::Retrieving && e.phase != Phase::TimedOut
            }
            None => false,
        };
        drop(m);
        let now = now_ms();
        let routes = self.routes.load();
        // A finished retrieval's studies route nothing more (a later re-send of one of them is
        // an ordinary arrival); a timed-out one's keep routing for a day, for its C-MOVEs
        // still under way.
        if finished && routes.values().any(|(k, _)| k.as_slice() == key)
            || routes
                .values()
                .any(|(_, added)| now.saturating_sub(*added) > ROUTE_KEEP_MS)
        {
            self.routes.rcu(|r| {
                let mut r = HashMap::clone(r);
                r.retain(|_, (k, added)| {
                    !(finished && k.as_slice() == key)
                        && now.saturating_sub(*added) <= ROUTE_KEEP_MS
                });
                r
            });
        }
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        self.dir
            .join(format!("{}.json", crate::storage::patient_dir_name(key)))
    }

    /// Writes `e` durably (a temporary file, fsync, rename, fsync of the folder). Called with
    /// the entries' lock held, so a claim that removes the record cannot be overtaken by a
    /// write of it; a failure is logged (the retrieval goes on; a restart asks again).
    fn persist(&self, key: &[u8], e: &Entry) {
        let path = self.path(key);
        let tmp = path.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(e)
            .map_err(io::Error::other)
            .and_then(|bytes| {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(&self.dir)?.sync_all()
            });
        if let Err(err) = r {
            let who = self.who(key);
            tracing::warn!(patient = %who.digest, patient_id = who.id, error = %err, "could not write the priors record");
        }
    }

    /// Updates `key`'s entry with `f` and writes it, if it is still the retrieval of
    /// `generation` (not claimed meanwhile, not a later batch's).
    fn update(&self, key: &[u8], generation: u64, f: impl FnOnce(&mut Entry)) -> bool {
        let mut m = self.lock();
        let Some(e) = m.get_mut(key).filter(|e| e.generation == generation) else {
            return false;
        };
        f(e);
        let e = e.clone();
        self.persist(key, &e);
        true
    }

    fn add_routes(&self, key: &[u8], studies: &[String]) {
        let now = now_ms();
        self.routes.rcu(|r| {
            let mut r = HashMap::clone(r);
            for s in studies {
                r.insert(s.clone(), (key.to_vec(), now));
            }
            r
        });
    }
}

/// The study UIDs of `key`'s batch that did not come as priors.
type CurrentStudies<'a> = &'a (dyn Fn(&[u8]) -> Vec<String> + Send + Sync);

/// The priors thread: runs each patient's retrieval, retrying a failed one with backoff
/// (5 s doubling to 60 s) until its timeout; `evaluate(key)` asks the checker to look at the
/// patient again whenever its retrieval changed phase.
pub fn run(
    p: &Priors,
    current: CurrentStudies<'_>,
    evaluate: &(dyn Fn(Vec<u8>) + Send + Sync),
    shutdown: &AtomicBool,
) {
    // (due ms, key) of retrievals waiting to be tried again.
    let mut later: Vec<(u64, Vec<u8>)> = Vec::new();
    while !shutdown.load(Ordering::Acquire) {
        let now = now_ms();
        let due = later.iter().position(|(t, _)| *t <= now);
        let key = match due {
            Some(i) => later.swap_remove(i).1,
            None => match p.rx.recv_timeout(Duration::from_millis(250)) {
                Ok(k) => k,
                Err(_) => continue,
            },
        };
        let Some(e) = p.lock().get(&key).cloned() else {
            continue; // claimed meanwhile
        };
        let deadline = e.began_ms + p.config.timeout_seconds * 1000;
        if e.phase == Phase::Done && now >= deadline {
            // Done but perhaps not all in: the checker's gate lets it go now (the timeout).
            evaluate(key);
            continue;
        }
        if e.phase != Phase::Retrieving {
            continue;
        }
        let g = e.generation;
        if now >= deadline {
            if p.update(&key, g, |e| e.phase = Phase::TimedOut) {
                let who = p.who(&key);
                tracing::warn!(
                    patient = %who.digest, patient_id = who.id,
                    attempts = e.attempts,
                    last_error = e.last_error.as_deref().unwrap_or(""),
                    "priors: timed out ({} s): the patient goes on without the priors not yet in",
                    p.config.timeout_seconds
                );
                evaluate(key);
            }
            continue;
        }
        let mut own = current(&key);
        own.extend(e.current.iter().cloned());
        let outcome = retrieve(p, &key, &e, &own, deadline, shutdown);
        let (changed, why) = match outcome {
            Ok(Outcome::Unqueryable(why)) => {
                let who = p.who(&key);
                tracing::warn!(patient = %who.digest, patient_id = who.id, "priors: {why}");
                (
                    p.update(&key, g, |e| e.phase = Phase::Unqueryable),
                    "unqueryable",
                )
            }
            Ok(Outcome::Nothing) => {
                let who = p.who(&key);
                tracing::info!(patient = %who.digest, patient_id = who.id, peer = %p.peer_address, "priors: no earlier study");
                (p.update(&key, g, |e| e.phase = Phase::None), "none")
            }
            Ok(Outcome::Moved { studies, completed }) => {
                let who = p.who(&key);
                tracing::info!(
                    patient = %who.digest, patient_id = who.id,
                    peer = %p.peer_address,
                    studies = studies.len(),
                    instances = completed,
                    "priors: retrieved"
                );
                let done = p.update(&key, g, |e| {
                    e.phase = Phase::Done;
                    e.expected = completed;
                    e.studies = studies;
                });
                if done {
                    // Looked at again at the timeout, in case not all of them arrive.
                    later.push((deadline, key.clone()));
                }
                (done, "done")
            }
            Err(err) => {
                let attempts = e.attempts + 1;
                let delay = (5_000u64 << (attempts - 1).min(4)).min(60_000);
                let who = p.who(&key);
                tracing::warn!(
                    patient = %who.digest, patient_id = who.id,
                    peer = %p.peer_address,
                    attempt = attempts,
                    retry_in_s = delay / 1000,
                    error = %err,
                    "priors: retrieval failed; retrying"
                );
                if p.update(&key, g, |e| {
                    e.attempts = attempts;
                    e.last_error = Some(err);
                }) {
                    later.push(((now_ms() + delay).min(deadline), key.clone()));
                }
                (false, "retry")
            }
        };
        if changed {
            evaluate(key);
        } else if why != "retry" {
            tracing::debug!(patient = %p.who(&key).digest, "priors: the batch was claimed during its retrieval; result dropped");
        }
    }
}

enum Outcome {
    Unqueryable(String),
    Nothing,
    Moved {
        studies: Vec<String>,
        completed: u32,
    },
}

/// Studies on or after this date (YYYYMMDD) for `max_age_days` (0: any).
fn since(max_age_days: u32, now_ms: u64) -> Option<String> {
    if max_age_days == 0 {
        return None;
    }
    let days = (now_ms / 86_400_000).saturating_sub(u64::from(max_age_days)) as i64;
    let (y, m, d) = crate::dicom::civil_date(days);
    Some(format!("{y:04}{m:02}{d:02}"))
}

/// One attempt of retrieval `e`: C-FIND, choose, route, C-MOVE each chosen study, all before
/// `deadline_ms` (each response is checked against it, and the socket timeout is what is left).
fn retrieve(
    p: &Priors,
    key: &[u8],
    e: &Entry,
    current: &[String],
    deadline_ms: u64,
    shutdown: &AtomicBool,
) -> Result<Outcome, String> {
    let patient_id = e.patient_id.as_str();
    // C-FIND without a Specific Character Set means the default repertoire (PS3.5 6.1.2.1):
    // a key that is not printable ASCII cannot be asked for as it is.
    if !key.iter().all(|b| (0x20..0x7F).contains(b)) {
        return Ok(Outcome::Unqueryable(
            "the Patient ID is not plain ASCII: not queried".into(),
        ));
    }
    let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
    let deadline = std::time::Instant::now() + left;
    let q = StudyQuery {
        patient_id: patient_id.to_string(),
        since: since(p.config.max_age_days, now_ms()),
    };
    if let Err(e) = crate::dimse::query::study_find_identifier(
        &q,
        crate::dicom::transfer_syntax::DatasetEncoding::ExplicitVrLittleEndian,
    ) {
        return Ok(Outcome::Unqueryable(e.to_string()));
    }
    let proposals: Vec<Proposal> = [PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE]
        .iter()
        .map(|a| Proposal {
            abstract_syntax: (*a).into(),
            transfer_syntaxes: vec![
                crate::dicom::transfer_syntax::EXPLICIT_VR_LITTLE_ENDIAN.into(),
                crate::dicom::transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN.into(),
            ],
        })
        .collect();
    let opts = ScuOptions {
        calling_ae: p.calling_ae.clone(),
        called_ae: p.peer_ae.clone(),
        // A C-MOVE may send no pending response for minutes: wait as long as the timeout lets.
        timeout: left.max(Duration::from_secs(5)),
        ..Default::default()
    };
    let who = format!("{}@{}", p.peer_ae, p.peer_address);
    let mut c =
        Client::open(&p.peer_address, &opts, &proposals).map_err(|e| format!("{who}: {e}"))?;
    let found = c
        .find_studies(&q, MAX_MATCHES, Some(deadline))
        .map_err(|e| format!("{who}: C-FIND: {e}"))?;
    if found.status != 0x0000 {
        let _ = c.release();
        return Err(format!(
            "{who}: C-FIND ended with status 0x{:04X}",
            found.status
        ));
    }
    for why in &found.refused {
        let pat = p.who(key);
        tracing::warn!(patient = %pat.digest, patient_id = pat.id, peer = %who, "priors: a C-FIND match left out: {why}");
    }
    let wanted = &p.config.modalities;
    let mut chosen: Vec<_> = found
        .matches
        .into_iter()
        .filter(|m| !current.contains(&m.study_instance_uid))
        .filter(|m| {
            wanted.is_empty()
                || m.modalities.is_empty()
                || m.modalities.iter().any(|x| wanted.contains(x))
        })
        .collect();
    // Newest first; a study without a date last.
    chosen.sort_by(|a, b| b.study_date.cmp(&a.study_date));
    chosen.truncate(p.config.max_studies as usize);
    if chosen.is_empty() {
        let _ = c.release();
        return Ok(Outcome::Nothing);
    }
    let studies: Vec<String> = chosen.into_iter().map(|m| m.study_instance_uid).collect();
    // Routed (and written down) before the first C-MOVE: the instances may arrive before its
    // first response does.
    if !p.update(key, e.generation, |e| e.studies = studies.clone()) {
        let _ = c.release();
        return Err("the batch was claimed meanwhile".into());
    }
    p.add_routes(key, &studies);
    let mut completed = 0u32;
    for s in &studies {
        if shutdown.load(Ordering::Acquire) {
            let _ = c.abort();
            return Err("node stopping".into());
        }
        let m = c
            .move_study(&p.move_destination, patient_id, s, Some(deadline))
            .map_err(|e| format!("{who}: C-MOVE of {s}: {e}"))?;
        match m.status {
            // Success, or warning: some sub-operations failed or warned (PS3.4 C.4.2.1.5).
            0x0000 | 0xB000 => {
                if m.failed > 0 {
                    let pat = p.who(key);
                    tracing::warn!(patient = %pat.digest, patient_id = pat.id, study = %s, failed = m.failed, "priors: some instances of a study were not retrieved");
                }
                completed += u32::from(m.completed) + u32::from(m.warning);
            }
            st => {
                let _ = c.release();
                return Err(format!(
                    "{who}: C-MOVE of {s} to {} failed with status 0x{st:04X}{}",
                    p.move_destination,
                    m.comment.map(|c| format!(" ({c})")).unwrap_or_default()
                ));
            }
        }
    }
    let _ = c.release();
    Ok(Outcome::Moved { studies, completed })
}

#[cfg(test)]
mod tests {
    use super::since;

    #[test]
    fn since_is_the_civil_date_max_age_days_ago() {
        assert_eq!(since(0, 0), None);
        // 2026-12-01T12:00Z is day 20788 since 1970-01-01.
        let ms = 20_788 * 86_400_000 + 43_200_000;
        assert_eq!(since(1, ms).as_deref(), Some("20261130"));
        assert_eq!(since(365, ms).as_deref(), Some("20251201"));
        assert_eq!(since(20_788, ms).as_deref(), Some("19700101"));
    }
}
