//! `dicomgate`: thin CLI over the library. `serve` runs the node; `echo` and `store` run the
//! requestor side of the same code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dicomgate::assoc::negotiation::VERIFICATION_SOP_CLASS;
use dicomgate::assoc::transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN;
use dicomgate::config::Config;
use dicomgate::net::scu::{Client, Proposal, ScuOptions};
use dicomgate::storage::part10;

#[derive(Parser)]
#[command(name = "dicomgate", version, about = "DICOM ingestion gateway node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node (embedded defaults when no config file is given).
    Serve {
        /// TOML config file; flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        ae_title: Option<String>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// C-ECHO a peer.
    Echo {
        /// HOST:PORT
        address: String,
        #[arg(long, default_value = "ANY-SCP")]
        called: String,
        #[arg(long, default_value = "DICOMGATE-SCU")]
        calling: String,
    },
    /// C-STORE Part-10 files (directories are walked) to a peer, each in its own transfer syntax.
    Store {
        /// HOST:PORT
        address: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "ANY-SCP")]
        called: String,
        #[arg(long, default_value = "DICOMGATE-SCU")]
        calling: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dicomgate: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            ae_title,
            print_config,
        } => {
            let mut cfg = match config {
                Some(p) => Config::from_toml(&std::fs::read_to_string(&p)?)
                    .map_err(|e| format!("{}: {e}", p.display()))?,
                None => Config::default(),
            };
            if let Some(l) = listen {
                cfg.node.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.node.data_dir = d;
            }
            if let Some(a) = ae_title {
                cfg.node.ae_title = a;
            }
            cfg.validate()?;
            if print_config {
                print!("{}", toml::to_string(&cfg)?);
                return Ok(ExitCode::SUCCESS);
            }
            let node = dicomgate::net::start(cfg)?;
            // Tests and scripts read the bound address from this line.
            println!("listening on {}", node.local_addr);
            node.wait();
            Ok(ExitCode::SUCCESS)
        }
        Command::Echo {
            address,
            called,
            calling,
        } => {
            let opts = ScuOptions {
                called_ae: called,
                calling_ae: calling,
                ..Default::default()
            };
            let proposal = Proposal {
                abstract_syntax: VERIFICATION_SOP_CLASS.into(),
                transfer_syntaxes: vec![IMPLICIT_VR_LITTLE_ENDIAN.into()],
            };
            let mut c = Client::connect(address.as_str(), &opts, &[proposal])?;
            let status = c.echo()?;
            c.release()?;
            println!("C-ECHO status 0x{status:04X}");
            Ok(if status == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Store {
            address,
            paths,
            called,
            calling,
        } => store(&address, &paths, called, calling),
    }
}

/// A file to send: its meta only; the bytes are read again when it is sent, so a folder of any
/// size is sent with one file in memory at a time.
struct FileToSend {
    path: PathBuf,
    meta: part10::ParsedFile,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn store(
    address: &str,
    paths: &[PathBuf],
    called: String,
    calling: String,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut to_send = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path)?;
        match part10::parse(&bytes) {
            Some(mut meta) if !meta.transfer_syntax_uid.is_empty() => {
                // Name the instance the data set carries (as DCMTK's storescu does); some files'
                // meta disagrees with their data set.
                let (class, instance) = meta.data_set_sop_uids(&bytes);
                meta.sop_class_uid = class;
                meta.sop_instance_uid = instance;
                if meta.sop_class_uid.is_empty() || meta.sop_instance_uid.is_empty() {
                    eprintln!("skipping {}: no SOP Class/Instance UID", path.display());
                    continue;
                }
                to_send.push(FileToSend { path, meta })
            }
            _ => eprintln!("skipping {}: not a Part-10 file", path.display()),
        }
    }
    // One presentation context per (SOP class, transfer syntax); 128 per association at most.
    let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, f) in to_send.iter().enumerate() {
        groups
            .entry((
                f.meta.sop_class_uid.clone(),
                f.meta.transfer_syntax_uid.clone(),
            ))
            .or_default()
            .push(i);
    }
    let keys: Vec<_> = groups.keys().cloned().collect();
    let opts = ScuOptions {
        called_ae: called,
        calling_ae: calling,
        ..Default::default()
    };
    let (mut ok, mut failed) = (0usize, 0usize);
    for chunk in keys.chunks(128) {
        let proposals: Vec<Proposal> = chunk
            .iter()
            .map(|(sop, ts)| Proposal {
                abstract_syntax: sop.clone(),
                transfer_syntaxes: vec![ts.clone()],
            })
            .collect();
        let mut c = Client::connect(address, &opts, &proposals)?;
        for key in chunk {
            for &i in &groups[key] {
                let f = &to_send[i];
                let bytes = std::fs::read(&f.path)?;
                let ds = bytes.get(f.meta.data_set_offset..).unwrap_or_default();
                match c.store(
                    &f.meta.sop_class_uid,
                    &f.meta.sop_instance_uid,
                    &f.meta.transfer_syntax_uid,
                    ds,
                ) {
                    Ok((0, _)) => ok += 1,
                    Ok((st, comment)) => {
                        failed += 1;
                        eprintln!(
                            "{}: status 0x{st:04X} {}",
                            f.path.display(),
                            comment.unwrap_or_default()
                        );
                    }
                    Err(dicomgate::net::scu::ScuError::NoContext(w)) => {
                        failed += 1;
                        eprintln!("{}: {w} not accepted", f.path.display());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        c.release()?;
    }
    println!("stored {ok}, failed {failed}");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
