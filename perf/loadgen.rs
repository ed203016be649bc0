//! `dicomgate-loadgen`: the C-STORE load generator ([`dicomgate::bench`]) for scripts, with the
//! command line and output `perf/compare.py` and `perf/scaling.py` depend on (one line, or one
//! JSON object with `--json`). `dicomgate bench` is the same generator for people: a live
//! progress line and an HTML report.
//!
//! `cargo run --release --bin dicomgate-loadgen -- 127.0.0.1:11112 --associations 8 --instances 500`

use std::process::ExitCode;

use clap::Parser;
use dicomgate::bench::{self, LoadArgs};

#[derive(Parser)]
#[command(name = "dicomgate-loadgen", about = "C-STORE load generator")]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
}

fn main() -> ExitCode {
    let a = Args::parse().load;
    let s = match bench::run(&a, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for e in &s.errors {
        eprintln!("association failed: {e}");
    }
    println!("{}", if a.json { s.json() } else { s.line() });
    if s.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
