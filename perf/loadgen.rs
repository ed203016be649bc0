//! `dicomgate-loadgen`: a C-STORE load generator. N associations at once (one thread each), M
//! in-memory instances per association, each a CT data set of a chosen pixel size with unique
//! UIDs; P patients spread over the instances. Reports instances/s, MB/s and the C-STORE
//! round-trip latency distribution (request sent → response received).
//!
//! It drives any Storage SCP (dicomgate, DCMTK storescp, pynetdicom, Orthanc), so the same load
//! compares receivers side by side (`perf/compare.sh`).
//!
//! `cargo run --release --bin dicomgate-loadgen -- 127.0.0.1:11112 --associations 8 --instances 500`

use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use dicomgate::net::scu::{Client, Proposal, ScuOptions};

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

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
    /// Instances per association.
    #[arg(long, default_value_t = 500)]
    instances: usize,
    /// Pixel data bytes per instance (512x512x16-bit CT = 524288).
    #[arg(long, default_value_t = 512)]
    pixel_bytes: usize,
    /// Distinct patients over all instances.
    #[arg(long, default_value_t = 16)]
    patients: usize,
    /// Maximum PDU length we receive (and propose).
    #[arg(long, default_value_t = 65536)]
    max_pdu: u32,
}

fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
    let mut v = v.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&v);
}

fn data_set(patient: usize, series: &str, sop: &str, number: usize, pixels: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(pixels.len() + 512);
    el(&mut d, 0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    el(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes());
    el(&mut d, 0x0008, 0x0020, b"DA", b"20260101");
    el(&mut d, 0x0008, 0x0060, b"CS", b"CT");
    el(&mut d, 0x0010, 0x0010, b"PN", b"Load^Test");
    el(
        &mut d,
        0x0010,
        0x0020,
        b"LO",
        format!("LOAD{patient}").as_bytes(),
    );
    el(
        &mut d,
        0x0020,
        0x000D,
        b"UI",
        format!("2.25.77.{patient}").as_bytes(),
    );
    el(&mut d, 0x0020, 0x000E, b"UI", series.as_bytes());
    el(&mut d, 0x0020, 0x0013, b"IS", number.to_string().as_bytes());
    el(&mut d, 0x7FE0, 0x0010, b"OW", pixels);
    d
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = std::process::id();
    let pixels: Arc<Vec<u8>> = Arc::new((0..a.pixel_bytes).map(|i| (i * 7 % 251) as u8).collect());
    let barrier = Arc::new(Barrier::new(a.associations + 1));
    let opts = ScuOptions {
        calling_ae: a.calling.clone(),
        called_ae: a.called.clone(),
        max_pdu_length: a.max_pdu,
        timeout: Duration::from_secs(60),
    };
    let threads: Vec<_> = (0..a.associations)
        .map(|t| {
            let (barrier, pixels, opts, address) = (
                barrier.clone(),
                pixels.clone(),
                opts.clone(),
                a.address.clone(),
            );
            let (n, patients) = (a.instances, a.patients.max(1));
            std::thread::spawn(move || -> Result<(Vec<u32>, u64), String> {
                let proposal = Proposal {
                    abstract_syntax: CT_IMAGE_STORAGE.into(),
                    transfer_syntaxes: vec![EXPLICIT_LE.into()],
                };
                // Data sets are built before the clock starts: the generator measures the SCP.
                let sets: Vec<(String, Vec<u8>)> = (0..n)
                    .map(|i| {
                        let patient = (t * n + i) % patients;
                        let sop = format!("2.25.{run}.{t}.{i}");
                        let series = format!("2.25.78.{patient}.{t}");
                        let ds = data_set(patient, &series, &sop, i + 1, &pixels);
                        (sop, ds)
                    })
                    .collect();
                // Association set-up is inside the measured time (every thread reaches the
                // barrier, so one that cannot connect cannot hang the others).
                barrier.wait();
                let mut client = Client::connect(address.as_str(), &opts, &[proposal])
                    .map_err(|e| e.to_string())?;
                let mut lat = Vec::with_capacity(n);
                let mut bytes = 0u64;
                for (sop, ds) in &sets {
                    let t0 = Instant::now();
                    let (status, comment) = client
                        .store(CT_IMAGE_STORAGE, sop, EXPLICIT_LE, ds)
                        .map_err(|e| e.to_string())?;
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    if status != 0 {
                        return Err(format!(
                            "status 0x{status:04X}: {}",
                            comment.unwrap_or_default()
                        ));
                    }
                    bytes += ds.len() as u64;
                }
                client.release().map_err(|e| e.to_string())?;
                Ok((lat, bytes))
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut bytes = 0u64;
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok((l, b))) => {
                lat.extend(l);
                bytes += b;
            }
            Ok(Err(e)) => {
                eprintln!("association failed: {e}");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "associations={} instances={} pixel_bytes={} seconds={:.3} instances_per_s={:.0} MB_per_s={:.1} latency_us_p50={} p99={} max={}",
        a.associations,
        lat.len(),
        a.pixel_bytes,
        secs,
        lat.len() as f64 / secs,
        bytes as f64 / secs / 1e6,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
