//! `dicomgate`: thin CLI over the library. `serve` runs the node; `echo` and `store` run the
//! requestor side of the same code; `status` asks a running node's HTTP endpoint; `ls` and
//! `extract` read a data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dicomgate::config::{Config, ConfigError, ConfigFile};
use dicomgate::dicom::part10::InstanceFile;
use dicomgate::dicom::sop_class::VERIFICATION;
use dicomgate::dicom::transfer_syntax::IMPLICIT_VR_LITTLE_ENDIAN;
use dicomgate::net::scu::{self, Client, Proposal, ScuOptions, StoreFilesError, StoreOutcome};

#[derive(Parser)]
#[command(name = "dicomgate", version, about = "DICOM ingestion gateway node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The peer `echo` and `store` associate with: AE titles, and TLS if asked for.
#[derive(clap::Args)]
struct PeerArgs {
    /// The peer's AE title (the called AE); dicomgate's own default is DICOMGATE.
    #[arg(long, default_value = "DICOMGATE")]
    called: String,
    /// Our AE title (the calling AE).
    #[arg(long, default_value = "DICOMGATE-SCU")]
    calling: String,
    /// DICOM over TLS: the CA certificate(s) (PEM) the peer's certificate must chain to.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: our client certificate chain (PEM), for a peer that asks for one.
    #[arg(
        long,
        value_name = "PEM",
        requires = "tls_private_key",
        requires = "tls_ca"
    )]
    tls_certificate: Option<PathBuf>,
    /// The private key (PEM) of --tls-certificate.
    #[arg(long, value_name = "PEM", requires = "tls_certificate")]
    tls_private_key: Option<PathBuf>,
}

impl PeerArgs {
    fn options(self) -> Result<ScuOptions, String> {
        Ok(ScuOptions {
            called_ae: self.called,
            calling_ae: self.calling,
            tls: scu_tls(self.tls_ca, self.tls_certificate, self.tls_private_key)?,
            ..Default::default()
        })
    }
}

/// Where `retry` and `force` reach the node's operator API, and with which token.
#[derive(clap::Args)]
struct ApiArgs {
    /// HOST:PORT of the node's HTTP endpoint; default: the config's [http] listen, or
    /// 127.0.0.1:8104.
    #[arg(long)]
    http: Option<String>,
    /// The node's config file (for its [http] listen and token_file).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A file holding the bearer token (default: the config's [http] token_file); needed
    /// from every host, the node's own too, once the node has a token_file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    /// The endpoint's address and the bearer token to send (if any).
    fn reach(self) -> Result<(String, Option<String>), Box<dyn std::error::Error>> {
        let token = token_of(&self.config, self.token_file)?;
        Ok((http_address(self.http, self.config)?, token))
    }
}

/// `serve --log-format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node (embedded defaults when no config file is given).
    Serve {
        /// TOML config file; flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// IP:PORT to accept plain associations on ([node] listen; default 0.0.0.0:11112).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Where instances, the segment log and batches are kept ([node] data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Our AE title: the called AE title associations must name ([node] ae_title).
        #[arg(long)]
        ae_title: Option<String>,
        /// HOST:PORT of the HTTP endpoint (/, /api/status, /metrics, /healthz, /readyz); "" for none.
        #[arg(long)]
        http: Option<String>,
        /// How log lines are written to stderr: text (human-readable) or json (one JSON object
        /// per line, for log shippers) ([log] format; default text).
        #[arg(long, value_enum, value_name = "FORMAT")]
        log_format: Option<LogFormatArg>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// C-ECHO a peer.
    Echo {
        /// HOST:PORT
        address: String,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// C-STORE Part-10 files (directories are walked) to a peer, each in its own transfer syntax.
    Store {
        /// HOST:PORT
        address: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Benchmark any Storage SCP (ours or another): associations at once, each sending
    /// synthetic CT instances or a folder's files, with a live progress line on a terminal,
    /// the result as a line or JSON (the keys of dicomgate-loadgen), and an HTML report.
    Bench {
        #[command(flatten)]
        load: dicomgate::bench::LoadArgs,
        /// Also write an HTML report (latency histogram, throughput over time) to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Show what a running node is doing (its status page, in the terminal): pending patients
    /// and each input's progress, batches, failed batches with their reasons, recent
    /// associations. Reads the node's `GET /api/status`.
    Status {
        /// HOST:PORT of the node's HTTP endpoint; default: the config's [http] listen, or
        /// 127.0.0.1:8104.
        #[arg(long)]
        http: Option<String>,
        /// The node's config file (for its [http] listen).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the JSON as the node sent it.
        #[arg(long)]
        json: bool,
    },
    /// Run failed batches again: move them from failed/ back into the outbox of the running
    /// node (POST /api/retry), which processes or exports them from the stage they failed in.
    Retry {
        /// The batch id (its directory name under failed/).
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        batch: Option<String>,
        /// Every batch in failed/.
        #[arg(long)]
        all_failed: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Claim a pending patient's batch now, whether or not the rules hold (as mercure's force
    /// complete): it is processed and exported as any batch.
    Force {
        /// The patient: its grouping key (the Patient ID by default) or its folder name (the
        /// digest the status page shows).
        patient: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List what a data directory holds: pending patients and instances (own file or segment
    /// log record), the log's segments, and claimed batches. Safe beside a running node.
    Ls {
        /// The node's config file (its `[node] data_dir`); or give --data-dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory to read (default: the config's [node] data_dir, or
        /// ./dicomgate-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// One line per instance, not only per patient.
        #[arg(long)]
        instances: bool,
    },
    /// Print a users-file line (`USERNAME:HASH`, an argon2id PHC string) for `[auth]
    /// users_file`. The password is read from stdin's first line, or prompted for (not
    /// echoed) when stdin is a terminal; it is never printed.
    Passwd {
        /// The username the requestor will send (no ':' and no control characters).
        username: String,
    },
    /// Copy pending instances (of one patient, or all) or a batch's instances out of a data
    /// directory as Part-10 files, keeping `<patient digest>/<study>/<series>/<SOP>.dcm`.
    Extract {
        /// The node's config file (its `[node] data_dir`); or give --data-dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory to read (default: the config's [node] data_dir, or
        /// ./dicomgate-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only this Patient ID's pending instances.
        #[arg(long, conflicts_with = "batch")]
        patient: Option<String>,
        /// A claimed batch's instances (its id under batches/ or failed/).
        #[arg(long)]
        batch: Option<String>,
        /// Folder to write into (created).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The data directory named by `--data-dir`, or by the config file, or the default.
fn data_dir_of(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(d) = data_dir {
        return Ok(d);
    }
    let cfg = match config {
        Some(p) => ConfigFile::read(&p)?.parse()?,
        None => Config::default(),
    };
    Ok(cfg.node.data_dir)
}

/// The node's HTTP address for `dicomgate status`: `--http`, else the config's `[http]
/// listen` (an unspecified IP such as 0.0.0.0 asked on loopback), else the default.
fn http_address(
    http: Option<String>,
    config: Option<PathBuf>,
) -> Result<String, Box<dyn std::error::Error>> {
    if let Some(h) = http {
        return Ok(h);
    }
    let cfg = match config {
        Some(p) => ConfigFile::read(&p)?.parse()?,
        None => Config::default(),
    };
    let listen = cfg.http.listen.trim();
    if listen.is_empty() {
        return Err(
            "the config's [http] listen is \"\" (no HTTP endpoint): give --http HOST:PORT".into(),
        );
    }
    Ok(match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => listen.to_string(),
    })
}

/// The bearer token for a mutating request: from `token_file`, else the config's
/// `[http] token_file`; none when neither names one (then only the node's own host may ask, and
/// only while the node has no token_file).
fn token_of(
    config: &Option<PathBuf>,
    token_file: Option<PathBuf>,
) -> Result<Option<String>, Box<dyn std::error::Error>> {
    let cfg = match config {
        Some(p) => Some(ConfigFile::read(p)?.parse()?),
        None => None,
    };
    let token_file = token_file.or_else(|| {
        cfg.as_ref()
            .map(|c| c.http.token_file.trim().to_string())
            .filter(|t| !t.is_empty())
            .map(PathBuf::from)
    });
    Ok(match token_file {
        Some(f) => Some(
            std::fs::read_to_string(&f)
                .map_err(|e| format!("token file {}: {e}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    })
}

fn force(patient: String, api: ApiArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use dicomgate::http::status;
    let (addr, token) = api.reach()?;
    let key = status::force(&addr, &patient, token.as_deref())?;
    println!(
        "forced {}: its batch is claimed now, sufficient or not",
        status::printable(&key)
    );
    Ok(ExitCode::SUCCESS)
}

fn retry(batch: Option<String>, api: ApiArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use dicomgate::http::status;
    let (addr, token) = api.reach()?;
    let answer = status::retry(&addr, batch.as_deref(), token.as_deref())?;
    for id in &answer.retried {
        println!("retrying {}", status::printable(id));
    }
    for e in &answer.errors {
        eprintln!(
            "cannot retry {}: {}",
            status::printable(&e.batch),
            status::printable(&e.error)
        );
    }
    if answer.left > 0 {
        println!(
            "{} more failed batches left: run it again to retry them",
            answer.left
        );
    }
    if answer.retried.is_empty() && answer.errors.is_empty() {
        println!("no failed batch");
    }
    Ok(if answer.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench(
    load: &dicomgate::bench::LoadArgs,
    report: Option<&Path>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use std::io::{IsTerminal, Write};
    let started = utc_now();
    // A live line on a terminal (stderr, so that stdout keeps only the result).
    let live = std::io::stderr().is_terminal();
    let progress = |p: &dicomgate::bench::Progress| {
        let _ = write!(
            std::io::stderr(),
            "\r{:>5.0} s  {:>9} instances  {:>9.0}/s  {:>8.1} MB/s  p99 {:>8.2} ms ",
            p.elapsed.as_secs_f64(),
            p.instances,
            p.instances_per_s,
            p.mb_per_s,
            p.p99_us as f64 / 1000.0
        );
    };
    let s = dicomgate::bench::run(load, live.then_some(&progress as _))?;
    if live {
        eprintln!();
    }
    for e in &s.errors {
        eprintln!("association failed: {e}");
    }
    println!("{}", if load.json { s.json() } else { s.line() });
    if let Some(path) = report {
        std::fs::write(path, dicomgate::bench::report::html(load, &s, &started))
            .map_err(|e| format!("report {}: {e}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(if s.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Now as `YYYY-MM-DD HH:MM:SS UTC` ([`dicomgate::dicom::civil_date`] of the Unix day count).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = dicomgate::dicom::civil_date(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn status(
    http: Option<String>,
    config: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use dicomgate::http::status;
    let addr = http_address(http, config)?;
    let s = status::fetch(&addr)?;
    if json {
        println!("{}", status::terminal_json(&status::render_json(&s)?));
    } else {
        print!("{}", status::render_text(&s));
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(data_dir: &Path, instances: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use dicomgate::storage::inventory::{self, Source};
    let (entries, segments) =
        inventory::pending_except(data_dir, &dicomgate::pipeline::held_records(data_dir)?)?;
    let mut patients: BTreeMap<Vec<u8>, (usize, usize, u64)> = BTreeMap::new();
    for e in &entries {
        let p = patients.entry(e.patient_id.clone()).or_default();
        match e.source {
            Source::File(_) => p.0 += 1,
            Source::Log(_) => p.1 += 1,
        }
        p.2 += e.bytes;
    }
    println!("data directory {}", data_dir.display());
    println!(
        "pending: {} patients, {} instances",
        patients.len(),
        entries.len()
    );
    for (id, (files, logged, bytes)) in &patients {
        println!(
            "  patient {:?} (digest {}): {} instances ({} in files, {} in the log), {} bytes",
            String::from_utf8_lossy(id),
            dicomgate::storage::patient_dir_name(id),
            files + logged,
            files,
            logged,
            bytes
        );
    }
    if instances {
        for e in &entries {
            let at = match &e.source {
                Source::File(f) => f.display().to_string(),
                Source::Log(l) => format!("log segment {:016x} offset {}", l.seq, l.offset),
            };
            println!("  {}  {}  {} bytes", e.rel.display(), at, e.bytes);
        }
    }
    println!("log: {} segments", segments.len());
    for (seq, live, bytes) in &segments {
        println!("  segment {seq:016x}: {live} live records, {bytes} bytes on disk");
    }
    for dir in ["batches", "failed"] {
        let mut names: Vec<String> = std::fs::read_dir(data_dir.join(dir))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        println!("{dir}: {}", names.len());
        for n in names {
            println!("  {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn extract(
    data_dir: &Path,
    patient: Option<String>,
    batch: Option<String>,
    out: &Path,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use dicomgate::storage::inventory;
    std::fs::create_dir_all(out)?;
    let mut n = 0usize;
    if let Some(b) = batch {
        if b.contains('/') || b.starts_with('.') {
            return Err(format!("batch {b:?}: give the batch's directory name").into());
        }
        let dir = ["batches", "failed"]
            .iter()
            .map(|d| data_dir.join(d).join(&b).join("files"))
            .find(|d| d.is_dir())
            .ok_or_else(|| format!("no batch {b:?} under batches/ or failed/"))?;
        let mut files = Vec::new();
        collect(&dir, &mut files)?;
        for f in files {
            let Ok(rel) = f.strip_prefix(&dir) else {
                continue;
            };
            let dest = out.join(rel);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(&f, &dest)?;
            n += 1;
        }
        // A router-mode batch's instances that are still segment log records.
        let batch_dir = dir.parent().unwrap_or(&dir);
        for (rel, loc) in dicomgate::pipeline::records_of(batch_dir).unwrap_or_default() {
            let dest = out.join(&rel);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p)?;
            }
            match dicomgate::storage::log::read_record(&data_dir.join("log"), loc) {
                Ok(r) => {
                    r.write_file(&dest)?;
                    n += 1;
                }
                Err(e) => eprintln!("{}: not in the segment log: {e}", rel.display()),
            }
        }
    } else {
        let (entries, _) =
            inventory::pending_except(data_dir, &dicomgate::pipeline::held_records(data_dir)?)?;
        for e in entries.iter().filter(|e| {
            patient
                .as_ref()
                .is_none_or(|p| e.patient_id == p.as_bytes())
        }) {
            inventory::extract(data_dir, e, out)?;
            n += 1;
        }
    }
    println!("extracted {n} instances into {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `dicomgate passwd USERNAME`.
fn passwd(username: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal, Write};
    if username.is_empty()
        || username.contains(':')
        || username.chars().any(char::is_control)
        || username.len() > dicomgate::config::users::MAX_USERNAME
    {
        return Err(
            "the username must be 1 to 256 bytes, without ':' or control characters".into(),
        );
    }
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut line = String::new();
    if tty {
        eprint!("password for {username}: ");
        std::io::stderr().flush()?;
        // Not echoed: the terminal's echo is off while the line is read.
        let old = rustix::termios::tcgetattr(&stdin)?;
        let mut quiet = old.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)?;
        let r = stdin.lock().read_line(&mut line);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &old)?;
        eprintln!();
        r?;
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err("empty password: list the user with '-' for username-only identities".into());
    }
    let mut salt = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut salt)?;
    let hash = dicomgate::assoc::identity::hash_password(password.as_bytes(), &salt)?;
    println!("{username}:{hash}");
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr at `RUST_LOG`'s level (default info), as text or as one JSON object per line
/// (tracing-subscriber's JSON formatter: `timestamp`, `level`, `target`, the event's fields
/// and `message` at the top level).
fn init_logging(format: dicomgate::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match format {
        dicomgate::config::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        dicomgate::config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` starts its logging once it has read its config ([log] format).
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logging(dicomgate::config::LogFormat::Text);
    }
    match run(cli) {
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
            http,
            log_format,
            print_config,
        } => {
            let file = config.as_deref().map(ConfigFile::read).transpose()?;
            let mut cfg = match &file {
                Some(f) => f.parse()?,
                None => Config::default(),
            };
            // The fields flags set: an error about one of them is not the file's.
            let flagged: Vec<&str> = [
                (listen.is_some(), "node.listen"),
                (data_dir.is_some(), "node.data_dir"),
                (ae_title.is_some(), "node.ae_title"),
                (http.is_some(), "http.listen"),
            ]
            .into_iter()
            .filter_map(|(set, field)| set.then_some(field))
            .collect();
            if let Some(l) = listen {
                cfg.node.listen = Some(l);
            }
            if let Some(d) = data_dir {
                cfg.node.data_dir = d;
            }
            if let Some(a) = ae_title {
                cfg.node.ae_title = a;
            }
            if let Some(h) = http {
                cfg.http.listen = h;
            }
            match log_format {
                Some(LogFormatArg::Text) => cfg.log.format = dicomgate::config::LogFormat::Text,
                Some(LogFormatArg::Json) => cfg.log.format = dicomgate::config::LogFormat::Json,
                None => {}
            }
            cfg.validate()?;
            if print_config {
                print!("{}", toml::to_string(&cfg)?);
                return Ok(ExitCode::SUCCESS);
            }
            init_logging(cfg.log.format);
            let drain = std::time::Duration::from_secs_f64(cfg.node.drain_seconds);
            // Watched from before the node starts (recovery can take a while): the first
            // signal asks for a drain, the second stops at once, start-up included.
            // SIGHUP: read [tls]'s certificate, key and CA files again.
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGHUP,
            ])?;
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<i32>();
            std::thread::spawn(move || {
                let mut seen = 0;
                for sig in signals.forever() {
                    if sig == signal_hook::consts::SIGHUP {
                        let _ = stop_tx.send(sig);
                        continue;
                    }
                    seen += 1;
                    if seen == 1 {
                        tracing::info!(
                            signal = sig,
                            "stop requested: draining (a second signal stops at once)"
                        );
                        let _ = stop_tx.send(sig);
                    } else {
                        tracing::warn!(signal = sig, "second signal: stopping at once");
                        dicomgate::pipeline::kill_running_processing();
                        std::process::exit(1);
                    }
                }
            });
            let node = dicomgate::node::start(cfg).map_err(|e| {
                let config_error = e.get_ref().and_then(|i| i.downcast_ref::<ConfigError>());
                match (config_error, &file) {
                    (Some(c), Some(f)) if !flagged.iter().any(|field| c.0.starts_with(field)) => {
                        Box::new(f.locate(c)) as Box<dyn std::error::Error>
                    }
                    _ => e.into(),
                }
            })?;
            // Tests and scripts read the bound address from this line (and the TLS one from
            // the next, when [tls] listen is set; only that one when node.listen is "").
            if let Some(a) = node.local_addr {
                println!("listening on {a}");
            }
            if let Some(a) = node.tls_addr {
                println!("tls listening on {a}");
            }
            while let Ok(sig) = stop_rx.recv() {
                if sig != signal_hook::consts::SIGHUP {
                    break;
                }
                match node.reload_tls() {
                    Ok(()) => tracing::info!(
                        "SIGHUP: TLS certificate, key and CA reloaded; new connections use them"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "SIGHUP: TLS files not reloaded, the old ones stay")
                    }
                }
            }
            node.drain(drain);
            Ok(ExitCode::SUCCESS)
        }
        Command::Echo { address, peer } => {
            let opts = peer.options()?;
            let proposal = Proposal {
                abstract_syntax: VERIFICATION.into(),
                transfer_syntaxes: vec![IMPLICIT_VR_LITTLE_ENDIAN.into()],
            };
            let mut c = Client::open(address.as_str(), &opts, &[proposal])?;
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
            peer,
        } => store(&address, &paths, peer.options()?),
        Command::Status { http, config, json } => status(http, config, json),
        Command::Bench { load, report } => bench(&load, report.as_deref()),
        Command::Passwd { username } => passwd(&username),
        Command::Retry {
            batch,
            all_failed: _,
            api,
        } => retry(batch, api),
        Command::Force { patient, api } => force(patient, api),
        Command::Ls {
            config,
            data_dir,
            instances,
        } => ls(&data_dir_of(config, data_dir)?, instances),
        Command::Extract {
            config,
            data_dir,
            patient,
            batch,
            out,
        } => extract(&data_dir_of(config, data_dir)?, patient, batch, &out),
    }
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

/// The requestor's TLS configuration from `--tls-ca` (and a client certificate), if given.
fn scu_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, String> {
    let Some(ca) = ca else { return Ok(None) };
    let client = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    dicomgate::net::tls::client_config(
        ["--tls-ca", "--tls-certificate", "--tls-private-key"],
        &ca,
        client,
    )
    .map(Some)
}

fn store(
    address: &str,
    paths: &[PathBuf],
    opts: ScuOptions,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(format!("{}: no such file or directory", p.display()).into());
        }
        collect(p, &mut files).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // Each file is read when the associations are planned and again when it is sent, so a
    // folder of any size is sent with one file in memory at a time.
    let read = |path: &PathBuf| -> Result<Option<InstanceFile>, Box<dyn std::error::Error>> {
        match InstanceFile::parse(std::fs::read(path)?) {
            Some(f) if !f.transfer_syntax_uid.is_empty() => {
                if f.sop_class_uid.is_empty() || f.sop_instance_uid.is_empty() {
                    eprintln!("skipping {}: no SOP Class/Instance UID", path.display());
                    return Ok(None);
                }
                Ok(Some(f))
            }
            _ => {
                eprintln!("skipping {}: not a Part-10 file", path.display());
                Ok(None)
            }
        }
    };
    let (mut ok, mut failed) = (0usize, 0usize);
    let sent = scu::store_files(address, &opts, &files, read, |path, _, outcome| {
        match outcome {
            StoreOutcome::Answered { status: 0, .. } => ok += 1,
            StoreOutcome::Answered { status, comment } => {
                failed += 1;
                eprintln!(
                    "{}: status 0x{status:04X} {}",
                    path.display(),
                    comment.unwrap_or_default()
                );
            }
            StoreOutcome::NotAccepted(w) => {
                failed += 1;
                eprintln!("{}: {w} not accepted", path.display());
            }
        }
        Ok(())
    });
    match sent {
        Ok(()) => {}
        Err(StoreFilesError::Scu(e) | StoreFilesError::Release(e)) => return Err(e.into()),
        Err(StoreFilesError::Caller(e)) => return Err(e),
    }
    println!("stored {ok}, failed {failed}");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
