//! `dicomgate-loadgen`: a C-STORE load generator. N associations at once (one thread each)
//! keep a Storage SCP busy with in-memory instances: synthetic CT data sets of a chosen size
//! spread over P patients × S series, or the Part-10 files of a folder. With `--window W` each
//! association proposes an asynchronous operations window (PS3.7 D.3.3.3) and keeps up to W
//! C-STOREs outstanding when the SCP grants it. Reports instances/s, MB/s and the C-STORE
//! latency distribution (request sent → response received; hdrhistogram, µs), as a line or as
//! JSON for scripts (`--json`).
//!
//! Data sets are built before the clock starts and only their few header bytes are rewritten
//! between instances, so the generator costs little more than the socket writes: the receiver,
//! not the sender, is what gets measured. It drives any Storage SCP (dicomgate, DCMTK storescp,
//! dicom-rs, pynetdicom, Orthanc): `perf/compare.py` runs the same load against each.
//!
//! `cargo run --release --bin dicomgate-loadgen -- 127.0.0.1:11112 --associations 8 --instances 500`

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use dicomgate::net::scu::{Client, Proposal, ScuOptions};
use dicomgate::synth::{ct_header, CtInstance, CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN};
use hdrhistogram::Histogram;

#[derive(Parser)]
#[command(name = "dicomgate-loadgen", about = "C-STORE load generator")]
struct Args {
    /// HOST:PORT of the Storage SCP.
    address: String,
    #[arg(long, default_value = "DICOMGATE")]
    called: String,
    #[arg(long, default_value = "LOADGEN")]
    calling: String,
    /// Concurrent associations (one thread each).
    #[arg(long, default_value_t = 4)]
    associations: usize,
    /// Instances per association (with --from-dir: default = the folder's files shared out).
    #[arg(long)]
    instances: Option<usize>,
    /// Pixel data bytes per synthetic instance (512x512x16-bit CT slice = 524288).
    #[arg(long, default_value_t = 512)]
    pixel_bytes: usize,
    /// Number of Frames written in each synthetic instance (the pixel bytes are the total).
    #[arg(long, default_value_t = 1)]
    frames: usize,
    /// Distinct patients over all instances.
    #[arg(long, default_value_t = 16)]
    patients: usize,
    /// Series per patient and association.
    #[arg(long, default_value_t = 1)]
    series: usize,
    /// Send the Part-10 files of this folder (recursively) instead of synthetic instances.
    #[arg(long)]
    from_dir: Option<PathBuf>,
    /// Outstanding C-STOREs per association (asynchronous operations window; 1 = none).
    #[arg(long, default_value_t = 1)]
    window: u16,
    /// Maximum PDU length we receive (and propose).
    #[arg(long, default_value_t = 65536)]
    max_pdu: u32,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
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

struct Outcome {
    latency: Histogram<u64>,
    bytes: u64,
    stored: u64,
    window: u16,
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
            let Some(f) = dicomgate::storage::part10::parse(&bytes) else {
                continue;
            };
            let (sop_class, sop_instance) = f.data_set_sop_uids(&bytes);
            out.push(Instance {
                sop_class,
                sop_instance,
                transfer_syntax: f.transfer_syntax_uid.clone(),
                data_set: bytes[f.data_set_offset..].to_vec(),
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

fn run_association(w: Work, barrier: Arc<Barrier>) -> Result<Outcome, String> {
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
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let mut outstanding: VecDeque<(u16, Instant)> = VecDeque::with_capacity(window);
    let (mut bytes, mut stored) = (0u64, 0u64);
    let mut receive =
        |client: &mut Client, outstanding: &mut VecDeque<(u16, Instant)>| -> Result<(), String> {
            let (id, status, comment) = client.receive_response().map_err(|e| e.to_string())?;
            let at = outstanding
                .iter()
                .position(|(m, _)| *m == id)
                .ok_or_else(|| format!("response to unknown Message ID {id}"))?;
            let (_, t0) = outstanding.remove(at).unwrap_or((id, Instant::now()));
            latency.saturating_record(t0.elapsed().as_micros().max(1) as u64);
            if status != 0 {
                return Err(format!(
                    "status 0x{status:04X}: {}",
                    comment.unwrap_or_default()
                ));
            }
            stored += 1;
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
                bytes += f.data_set.len() as u64;
                (id, t0)
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
                bytes += ds.len() as u64;
                (id, t0)
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
        bytes,
        stored,
        window: window as u16,
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    let files = match &a.from_dir {
        Some(d) => match load_folder(d) {
            Ok(f) => Some(f.into_iter().map(Arc::new).collect::<Vec<_>>()),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
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
            let barrier = barrier.clone();
            std::thread::spawn(move || run_association(w, barrier))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).ok();
    let (mut bytes, mut stored, mut window) = (0u64, 0u64, u16::MAX);
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok(o)) => {
                if let Some(h) = latency.as_mut() {
                    let _ = h.add(&o.latency);
                }
                bytes += o.bytes;
                stored += o.stored;
                window = window.min(o.window);
            }
            Ok(Err(e)) => {
                eprintln!("association failed: {e}");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let q = |p: f64| latency.as_ref().map_or(0, |h| h.value_at_quantile(p));
    let max = latency.as_ref().map_or(0, |h| h.max());
    let rate = stored as f64 / secs;
    let mbs = bytes as f64 / secs / 1e6;
    let window = if stored == 0 { 0 } else { window };
    if a.json {
        println!(
            "{{\"associations\":{associations},\"window\":{window},\"instances\":{stored},\"bytes\":{bytes},\"seconds\":{secs:.6},\"instances_per_s\":{rate:.1},\"mb_per_s\":{mbs:.2},\"latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{max}}},\"failed\":{failed}}}",
            q(0.5),
            q(0.99),
            q(0.999)
        );
    } else {
        println!(
            "associations={associations} window={window} instances={stored} bytes={bytes} seconds={secs:.3} instances_per_s={rate:.0} MB_per_s={mbs:.1} latency_us_p50={} p99={} p99.9={} max={max}",
            q(0.5),
            q(0.99),
            q(0.999)
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
