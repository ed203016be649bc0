//! The C-STORE load generator behind `dicomgate bench` and `dicomgate-loadgen`: N associations at
//! once (one thread each) keep a Storage SCP busy with in-memory instances — synthetic CT data
//! sets of a chosen size spread over P patients × S series, or the Part-10 files of a folder.
//! With `--window W` each association proposes an asynchronous operations window (PS3.7
//! D.3.3.3) and keeps up to W C-STOREs outstanding when the SCP grants it. It measures
//! instances/s, MB/s and the C-STORE latency distribution (request sent → response received;
//! hdrhistogram, µs), and samples the totals once a second for a live progress line and the
//! throughput plot of [`report`].
//!
//! Owns no sockets: it drives [`crate::net::scu::Client`], the node's blocking requestor. Data
//! sets are built before the clock starts and only their few header bytes are rewritten between
//! instances, so the generator costs little more than the socket writes: the receiver, not the
//! sender, is what gets measured. It drives any Storage SCP (dicomgate, DCMTK storescp, dicom-rs,
//! pynetdicom, Orthanc): `perf/compare.py` runs the same load against each. Its command line and
//! its JSON keys (`instances`, `instances_per_s`, `mb_per_s`, `latency_us.p50/p99`) are kept as
//! they are: scripts depend on them.

pub mod report;
pub mod synthetic;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::dicom::sop_class::CT_IMAGE_STORAGE;
use crate::dicom::transfer_syntax::EXPLICIT_VR_LITTLE_ENDIAN;
use crate::net::scu::{Client, Proposal, ScuOptions};
use synthetic::{ct_header, CtInstance};

/// What to send, where and how (the command line of both tools).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// HOST:PORT of the Storage SCP.
    pub address: String,
    /// The SCP's AE title (the called AE).
    #[arg(long, default_value = "DICOMGATE")]
    pub called: String,
    /// Our AE title (the calling AE).
    #[arg(long, default_value = "LOADGEN")]
    pub calling: String,
    /// Concurrent associations (one thread each).
    #[arg(long, default_value_t = 4)]
    pub associations: usize,
    /// Instances per association (with --from-dir: default = the folder's files shared out).
    #[arg(long)]
    pub instances: Option<usize>,
    /// Pixel data bytes per synthetic instance (512x512x16-bit CT slice = 524288).
    #[arg(long, default_value_t = 512)]
    pub pixel_bytes: usize,
    /// Number of Frames written in each synthetic instance (the pixel bytes are the total).
    #[arg(long, default_value_t = 1)]
    pub frames: usize,
    /// Distinct patients over all instances.
    #[arg(long, default_value_t = 16)]
    pub patients: usize,
    /// Series per patient and association.
    #[arg(long, default_value_t = 1)]
    pub series: usize,
    /// Send the Part-10 files of this folder (recursively) instead of synthetic instances.
    #[arg(long)]
    pub from_dir: Option<PathBuf>,
    /// Outstanding C-STOREs per association (asynchronous operations window; 1 = none).
    #[arg(long, default_value_t = 1)]
    pub window: u16,
    /// Maximum PDU length we receive (and propose).
    #[arg(long, default_value_t = 65536)]
    pub max_pdu: u32,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct Summary {
    pub associations: usize,
    /// The smallest operations window an association was granted (0 when nothing was stored).
    pub window: u16,
    pub instances: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Every C-STORE's latency, µs.
    pub latency: Histogram<u64>,
    /// Instances/s and bytes/s in each second of the run, in order (the last one over the
    /// part of a second it covers).
    pub per_second: Vec<(f64, f64)>,
    /// Why associations failed (one line each); empty when all succeeded.
    pub errors: Vec<String>,
}

impl Summary {
    pub fn failed(&self) -> bool {
        !self.errors.is_empty()
    }

    pub fn instances_per_s(&self) -> f64 {
        self.instances as f64 / self.seconds.max(1e-9)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e6
    }

    /// The latency at quantile `q`, µs.
    pub fn quantile(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }

    /// The one-line result (`dicomgate-loadgen` without `--json`).
    pub fn line(&self) -> String {
        format!(
            "associations={} window={} instances={} bytes={} seconds={:.3} instances_per_s={:.0} MB_per_s={:.1} latency_us_p50={} p99={} p99.9={} max={}",
            self.associations,
            self.window,
            self.instances,
            self.bytes,
            self.seconds,
            self.instances_per_s(),
            self.mb_per_s(),
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            self.latency.max()
        )
    }

    /// The JSON result (`--json`; its keys are kept for scripts).
    pub fn json(&self) -> String {
        format!(
            "{{\"associations\":{},\"window\":{},\"instances\":{},\"bytes\":{},\"seconds\":{:.6},\"instances_per_s\":{:.1},\"mb_per_s\":{:.2},\"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"failed\":{}}}",
            self.associations,
            self.window,
            self.instances,
            self.bytes,
            self.seconds,
            self.instances_per_s(),
            self.mb_per_s(),
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            self.latency.max(),
            self.failed()
        )
    }
}

/// The totals so far, as the progress callback sees them once a second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub instances: u64,
    pub bytes: u64,
    /// Instances and bytes per second over the last sample.
    pub instances_per_s: f64,
    pub mb_per_s: f64,
    /// The 99th percentile latency of the C-STOREs answered in the last sample, µs.
    pub p99_us: u64,
}

/// One instance to send: its identity and its whole data set.
struct Instance {
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    data_set: Vec<u8>,
}

/// What one association sends: either a fixed list, or synthetic instances made by rewriting
/// the header in front of shared pixel values.
enum Source {
    Files(Vec<Arc<Instance>>),
    Synthetic { run: u32, pixel_bytes: usize },
}

struct Work {
    thread: usize,
    count: usize,
    patients: usize,
    series: usize,
    frames: usize,
    window: u16,
    address: String,
    opts: ScuOptions,
    source: Source,
}

/// Counters every association thread adds to, read by the sampler.
struct Live {
    instances: AtomicU64,
    bytes: AtomicU64,
    /// Latencies since the sampler last took them (each thread locks it once per response,
    /// uncontended but for the sampler's once a second).
    recent: Vec<Mutex<Histogram<u64>>>,
}

struct Outcome {
    latency: Histogram<u64>,
    window: u16,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())
}

fn load_folder(dir: &Path) -> Result<Vec<Instance>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let Some(f) = crate::dicom::part10::parse(&bytes) else {
                continue;
            };
            let (sop_class, sop_instance) = f.data_set_sop_uids(&bytes);
            out.push(Instance {
                sop_class,
                sop_instance,
                transfer_syntax: f.transfer_syntax_uid.clone(),
                data_set: bytes.get(f.data_set_offset..).unwrap_or_default().to_vec(),
            });
        }
    }
    if out.is_empty() {
        return Err(format!("no Part-10 files in {}", dir.display()));
    }
    Ok(out)
}

/// Fixed-width identities, so every synthetic header has the same length and is rewritten in
/// place.
fn synthetic_header(w: &Work, run: u32, i: usize, pixel_bytes: usize) -> (String, Vec<u8>) {
    let global = w.thread * w.count + i;
    let patient = global % w.patients.max(1);
    let series = (i / w.patients.max(1)) % w.series.max(1);
    // UID components may not have leading zeros (PS3.5 §9.1): a leading 1 fixes the width.
    let (run, thread) = (10_000_000_000 + run as u64, 10_000 + w.thread);
    let (patient, series) = (1_000_000 + patient, 10_000 + series);
    let sop = format!("2.25.{run}.{thread}.{}", 1_000_000_000 + i);
    let header = ct_header(
        &CtInstance {
            patient_id: &format!("LOAD{patient}"),
            study_uid: &format!("2.25.77.{run}.{patient}"),
            series_uid: &format!("2.25.78.{run}.{patient}.{thread}.{series}"),
            sop_instance_uid: &sop,
            instance_number: 100_000_000 + i,
            frames: w.frames,
        },
        pixel_bytes,
    );
    (sop, header)
}

fn run_association(w: Work, barrier: Arc<Barrier>, live: Arc<Live>) -> Result<Outcome, String> {
    let mut proposals: Vec<Proposal> = Vec::new();
    let mut synthetic: Option<Vec<u8>> = None;
    match &w.source {
        Source::Files(files) => {
            for f in files {
                let p = Proposal {
                    abstract_syntax: f.sop_class.clone(),
                    transfer_syntaxes: vec![f.transfer_syntax.clone()],
                };
                if !proposals.contains(&p) && proposals.len() < 128 {
                    proposals.push(p);
                }
            }
        }
        Source::Synthetic { run, pixel_bytes } => {
            proposals.push(Proposal {
                abstract_syntax: CT_IMAGE_STORAGE.into(),
                transfer_syntaxes: vec![EXPLICIT_VR_LITTLE_ENDIAN.into()],
            });
            // Built before the clock starts: one data set, whose header is rewritten per send.
            let (_, mut ds) = synthetic_header(&w, *run, 0, *pixel_bytes);
            ds.extend((0..*pixel_bytes).map(|i| (i * 7 % 251) as u8));
            ds.resize(ds.len() + pixel_bytes % 2, 0);
            synthetic = Some(ds);
        }
    }
    // Association set-up is inside the measured time (every thread reaches the barrier, so one
    // that cannot connect cannot hang the others).
    barrier.wait();
    let mut client = Client::connect_windowed(w.address.as_str(), &w.opts, &proposals, w.window)
        .map_err(|e| e.to_string())?;
    let window = client.operations_window.max(1) as usize;
    let mut latency = histogram()?;
    let mut outstanding: VecDeque<(u16, Instant, u64)> = VecDeque::with_capacity(window);
    let recent = live.recent.get(w.thread).ok_or("no live histogram")?;
    let mut receive = |client: &mut Client,
                       outstanding: &mut VecDeque<(u16, Instant, u64)>|
     -> Result<(), String> {
        let (id, status, comment) = client.receive_response().map_err(|e| e.to_string())?;
        let at = outstanding
            .iter()
            .position(|(m, _, _)| *m == id)
            .ok_or_else(|| format!("response to unknown Message ID {id}"))?;
        let Some((_, t0, bytes)) = outstanding.remove(at) else {
            return Err(format!("response to unknown Message ID {id}"));
        };
        let us = t0.elapsed().as_micros().max(1) as u64;
        latency.saturating_record(us);
        recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us);
        if status != 0 {
            return Err(format!(
                "status 0x{status:04X}: {}",
                comment.unwrap_or_default()
            ));
        }
        live.instances.fetch_add(1, Ordering::Relaxed);
        live.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    };
    for i in 0..w.count {
        if outstanding.len() >= window {
            receive(&mut client, &mut outstanding)?;
        }
        let sent = match (&w.source, synthetic.as_mut()) {
            (Source::Files(files), _) => {
                let f = &files[i % files.len()];
                let t0 = Instant::now();
                let id = client
                    .send_store(
                        &f.sop_class,
                        &f.sop_instance,
                        &f.transfer_syntax,
                        &f.data_set,
                    )
                    .map_err(|e| e.to_string())?;
                (id, t0, f.data_set.len() as u64)
            }
            (Source::Synthetic { run, pixel_bytes }, Some(ds)) => {
                let (sop, header) = synthetic_header(&w, *run, i, *pixel_bytes);
                let Some(head) = ds.get_mut(..header.len()) else {
                    return Err("synthetic header grew".into());
                };
                head.copy_from_slice(&header);
                let t0 = Instant::now();
                let id = client
                    .send_store(CT_IMAGE_STORAGE, &sop, EXPLICIT_VR_LITTLE_ENDIAN, ds)
                    .map_err(|e| e.to_string())?;
                (id, t0, ds.len() as u64)
            }
            (Source::Synthetic { .. }, None) => return Err("no synthetic data set".into()),
        };
        outstanding.push_back(sent);
    }
    while !outstanding.is_empty() {
        receive(&mut client, &mut outstanding)?;
    }
    client.release().map_err(|e| e.to_string())?;
    Ok(Outcome {
        latency,
        window: window as u16,
    })
}

/// Runs the load `a` describes; `progress` is called once a second with the totals so far.
pub fn run(a: &LoadArgs, progress: Option<&(dyn Fn(&Progress) + Sync)>) -> Result<Summary, String> {
    let files = match &a.from_dir {
        Some(d) => Some(
            load_folder(d)?
                .into_iter()
                .map(Arc::new)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let associations = a.associations.max(1);
    let barrier = Arc::new(Barrier::new(associations + 1));
    let opts = ScuOptions {
        calling_ae: a.calling.clone(),
        called_ae: a.called.clone(),
        max_pdu_length: a.max_pdu,
        timeout: Duration::from_secs(120),
        tls: None,
    };
    let live = Arc::new(Live {
        instances: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        recent: (0..associations)
            .map(|_| histogram().map(Mutex::new))
            .collect::<Result<_, _>>()?,
    });
    let run = std::process::id();
    let threads: Vec<_> = (0..associations)
        .map(|t| {
            let (source, count) = match &files {
                Some(f) => {
                    let mine: Vec<_> = f.iter().skip(t).step_by(associations).cloned().collect();
                    let n = a.instances.unwrap_or(mine.len());
                    // A folder smaller than the associations: everyone sends the whole folder.
                    let mine = if mine.is_empty() { f.clone() } else { mine };
                    (Source::Files(mine), n)
                }
                None => (
                    Source::Synthetic {
                        run,
                        pixel_bytes: a.pixel_bytes,
                    },
                    a.instances.unwrap_or(500),
                ),
            };
            let w = Work {
                thread: t,
                count,
                patients: a.patients,
                series: a.series,
                frames: a.frames,
                window: a.window.max(1),
                address: a.address.clone(),
                opts: opts.clone(),
                source,
            };
            let (barrier, live) = (barrier.clone(), live.clone());
            std::thread::spawn(move || run_association(w, barrier, live))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let done = AtomicBool::new(false);
    let end_of_run = std::sync::OnceLock::new();
    let mut per_second = Vec::new();
    let mut latency = histogram()?;
    let (mut window, mut errors) = (u16::MAX, Vec::new());
    let mut end = start;
    std::thread::scope(|s| {
        // The sampler: totals once a second, for the progress line and the throughput plot.
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            let (mut last_i, mut last_b, mut last_t) = (0u64, 0u64, Instant::now());
            let mut next = start + Duration::from_secs(1);
            while !done.load(Ordering::Acquire) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                next += Duration::from_secs(1);
                let (i, b) = (
                    live.instances.load(Ordering::Relaxed),
                    live.bytes.load(Ordering::Relaxed),
                );
                let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
                samples.push(((i - last_i) as f64 / dt, (b - last_b) as f64 / dt));
                let mut recent = histogram().ok();
                for h in &live.recent {
                    let mut h = h.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(r) = recent.as_mut() {
                        let _ = r.add(&*h);
                    }
                    h.reset();
                }
                if let Some(f) = progress {
                    f(&Progress {
                        elapsed: now.duration_since(start),
                        instances: i,
                        bytes: b,
                        instances_per_s: (i - last_i) as f64 / dt,
                        mb_per_s: (b - last_b) as f64 / dt / 1e6,
                        p99_us: recent.map_or(0, |r| r.value_at_quantile(0.99)),
                    });
                }
                (last_i, last_b, last_t) = (i, b, now);
            }
            // The last, partial second, as a rate over what it covers.
            let (i, b) = (
                live.instances.load(Ordering::Relaxed),
                live.bytes.load(Ordering::Relaxed),
            );
            let dt = end_of_run
                .get()
                .copied()
                .unwrap_or_else(Instant::now)
                .duration_since(last_t)
                .as_secs_f64();
            if (i > last_i && dt > 0.05) || samples.is_empty() {
                let dt = dt.max(1e-3);
                samples.push(((i - last_i) as f64 / dt, (b - last_b) as f64 / dt));
            }
            samples
        });
        for t in threads {
            match t.join() {
                Ok(Ok(o)) => {
                    let _ = latency.add(&o.latency);
                    window = window.min(o.window);
                }
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("an association thread panicked".into()),
            }
        }
        // The clock stops when the last association is done, not when the sampler notices.
        end = Instant::now();
        let _ = end_of_run.set(end);
        done.store(true, Ordering::Release);
        per_second = sampler.join().unwrap_or_default();
    });
    let seconds = end.duration_since(start).as_secs_f64();
    let instances = live.instances.load(Ordering::Relaxed);
    Ok(Summary {
        associations,
        window: if instances == 0 { 0 } else { window },
        instances,
        bytes: live.bytes.load(Ordering::Relaxed),
        seconds,
        latency,
        per_second,
        errors,
    })
}
