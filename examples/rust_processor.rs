//! A node whose processing is Rust code instead of a command: the [`Processor`] trait.
//!
//! `cargo run --release --example rust_processor -- 127.0.0.1:11112 ./example-data`
//!
//! Each sufficient batch is handed to `Anonymise::process` on a pipeline worker thread. This
//! one copies every input file to the output, replacing the Patient Name value with `ANON`
//! (same length, so the file stays valid without re-encoding); the node then exports the
//! output (to `<data_dir>/export/` here, since no `[[export]]` is configured).

use std::path::Path;
use std::sync::Arc;

use dicomgate::config::Config;
use dicomgate::pipeline::{BatchInfo, ProcessingError, Processor};

struct Anonymise;

impl Processor for Anonymise {
    /// Each `?` turns the error's words into [`ProcessingError::Failed`], the kind a library
    /// processor's failures are counted under (`dicomgate_processing_failures_total{kind="failed"}`).
    fn process(&self, batch: &BatchInfo) -> Result<(), ProcessingError> {
        for (input, files) in &batch.inputs {
            let out_dir = batch.output_dir.join(input);
            std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
            for f in files {
                let mut bytes = std::fs::read(f).map_err(|e| e.to_string())?;
                blank_patient_name(&mut bytes);
                let name = f.file_name().ok_or("file without a name")?;
                std::fs::write(out_dir.join(name), bytes).map_err(|e| e.to_string())?;
            }
        }
        tracing_line(batch);
        Ok(())
    }
}

/// Overwrites an explicit-VR little endian (0010,0010) PN value in place with "ANON" padded.
fn blank_patient_name(bytes: &mut [u8]) {
    let pat = [0x10, 0x00, 0x10, 0x00, b'P', b'N'];
    if let Some(at) = bytes.windows(6).position(|w| w == pat) {
        let Some(len) = bytes
            .get(at + 6..at + 8)
            .map(|l| u16::from_le_bytes([l[0], l[1]]) as usize)
        else {
            return;
        };
        if let Some(v) = bytes.get_mut(at + 8..at + 8 + len) {
            v.fill(b' ');
            let n = v.len().min(4);
            v[..n].copy_from_slice(&b"ANON"[..n]);
        }
    }
}

fn tracing_line(batch: &BatchInfo) {
    let n: usize = batch.inputs.iter().map(|(_, f)| f.len()).sum();
    eprintln!(
        "processed batch {} of patient {} ({n} files)",
        batch.id, batch.patient_id
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut config = Config::default();
    config.http.listen = String::new(); // no /metrics for this example
    if let Some(listen) = args.next() {
        config.node.listen = Some(listen.parse()?);
    }
    config.node.data_dir =
        Path::new(&args.next().unwrap_or_else(|| "./example-data".into())).to_path_buf();
    config.trigger.quiet_seconds = 5.0;
    let node = dicomgate::node::start_with(config, Some(Arc::new(Anonymise)))?;
    if let Some(a) = node.local_addr {
        println!("listening on {a}");
    }
    node.wait();
    Ok(())
}
