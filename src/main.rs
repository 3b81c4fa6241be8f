//! The `spoolgate` binary: command-line parsing, logging set-up and error reporting. All the
//! behaviour lives in the library; this file is the only place that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use spoolgate::config::Config;

/// See Cargo.toml: the pipeline's allocation pattern (large, short-lived batch buffers) is one
/// glibc malloc handles poorly.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spoolgate",
    version,
    about = "A durable ingest sidecar: spool, classify, chain, forward."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SPOOLGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (embedded defaults when given no options).
    Serve(ServeArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a spool directory's segments, record counts and damaged ranges (read-only).
    Inspect {
        /// The spool directory (`<data_dir>/spool`) or the data directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify hash chains: in file-sink output (a .jsonl file or a directory of them), or in
    /// the seals of a spool (a data directory, or its spool directory). Exits 1 when a chain
    /// is broken, 2 when the input cannot be read.
    Verify {
        path: PathBuf,
        /// Refuse a line longer than this many bytes rather than read it into memory.
        #[arg(long, default_value_t = spoolgate::chain::LINE_BYTES_MAX)]
        line_bytes_max: usize,
        /// Sink output whose oldest files were removed: a stream may start at any seq, its
        /// first record read anchoring it (what came before cannot be checked).
        #[arg(long)]
        partial: bool,
    },
    /// Read or restore the `chain-heads` checkpoint (spool-format.md section 8), e.g. after
    /// the daemon refused to start from a damaged one.
    ChainHeads {
        #[command(subcommand)]
        command: ChainHeadsCommand,
    },
    /// List the dead-letter directory, or send a batch a sink rejected to it again.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Run a crash-recovery drill: load, SIGKILL at seeded random moments, restart, check.
    Drill(DrillArgs),
    /// Drive closed-loop HTTP load against a running daemon and report throughput and latency.
    Bench(BenchArgs),
    /// Exit 0 if URL answers 2xx (for container health checks).
    Health {
        #[arg(default_value = "http://127.0.0.1:8751/readyz")]
        url: String,
    },
}

#[derive(Subcommand)]
enum ChainHeadsCommand {
    /// Print a data directory's checkpoint as JSON, `{"<stream>": {"seq": N, "hash": HEX}}`
    /// (exit 1 if it is damaged).
    Show { data_dir: PathBuf },
    /// Print, as the same JSON, each stream's last record in file-sink output (a .jsonl file
    /// or a directory of them): the highest seq, its hash recomputed. The output need not
    /// start at seq 1.
    FromOutput {
        path: PathBuf,
        /// Refuse a line longer than this many bytes rather than read it into memory.
        #[arg(long, default_value_t = spoolgate::chain::LINE_BYTES_MAX)]
        line_bytes_max: usize,
    },
    /// Write a data directory's checkpoint from that JSON (a file, or - for stdin), with the
    /// daemon stopped. An intact checkpoint's heads are never moved back; a damaged one is
    /// replaced.
    Import { data_dir: PathBuf, heads: PathBuf },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List the letters in a dead-letter directory, oldest first: the sink that rejected each
    /// batch, its status and reason, and each stream's sequence range in it (or, for an
    /// envelope that never reached a sink, its spool position and why).
    List {
        /// The dead-letter directory (`<data_dir>/dead-letter` unless configured otherwise).
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send each letter's batch again, once, to the sink that rejected it, as the config
    /// defines that sink, and in the body the daemon would send: the same records, sequence
    /// numbers and hashes. Exits 1 if any letter's batch is refused or cannot be sent.
    Resend {
        /// Letter files (`dl-….json`).
        #[arg(required = true)]
        letters: Vec<PathBuf>,
        /// The daemon's config, for the sink's url, format, timeout and headers.
        #[arg(long, env = "SPOOLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Send to this sink of the config instead of the one that rejected the batch.
        #[arg(long)]
        sink: Option<String>,
        /// Remove each letter whose batch the sink took (answered 2xx).
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (with the environment's SPOOLGATE_* overrides applied).
    Check { file: PathBuf },
    /// Print the effective configuration as TOML, secrets (tokens, the PII hash key) redacted.
    Show {
        #[arg(long, env = "SPOOLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DrillArgs {
    /// Number of SIGKILLs.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Seed for the kill schedule and the load.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Each round kills after 1..=N further acknowledged envelopes.
    #[arg(long, default_value_t = 400)]
    acks_per_round_max: u64,
    /// Sink the daemon forwards to: file (its embedded file sink) or http (a recorder in the drill).
    #[arg(long, default_value = "file")]
    sink: String,
    /// Scratch data directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The spoolgate binary to drill (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Extra daemon settings, `KEY=VALUE` (repeatable). The drill compares every delivered
    /// text with the one sent, so a PII policy that changes texts (`gate.pii.KIND="mask"`,
    /// `"hash"`, `"drop_text"`) fails it.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Rewrite the rules file before every restart (tests that replays are not re-classified).
    #[arg(long)]
    flip_rules: bool,
    /// With `--sink http`: refuse (503) batches holding stream tenant-0 every other 500 ms, so
    /// one worker retries while the others deliver.
    #[arg(long)]
    flaky_stream: bool,
    /// The daemon's log file (default: `<data-dir>.log`, next to the data directory).
    #[arg(long)]
    log: Option<PathBuf>,
    /// The data directory is on a filesystem the drill fills: rounds may fall short, and the
    /// drill fails unless ingest refused for a full disk (429 enospc or reserve).
    #[arg(long)]
    full_disk: bool,
    /// End this share of rounds (percent, 0-100) with SIGTERM instead of SIGKILL, the clients
    /// still sending: the daemon must exit 0, leave its durable-end marker at the end of its data, and a restart must
    /// find nothing damaged.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    clean_stops: u8,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Ingest listener, `host:port`.
    #[arg(long, default_value = "127.0.0.1:8750")]
    ingest: String,
    /// Metrics listener, `host:port`: samples the backlog during the run.
    #[arg(long)]
    metrics: Option<String>,
    /// Read both addresses from `<DIR>/spoolgate.addr` (a daemon started with port 0).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Concurrent keep-alive connections, each sending its next request when answered.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Bytes of text per envelope.
    #[arg(long, default_value_t = 512)]
    text_bytes: usize,
    /// Envelopes per request: 1 sends a JSON object, more send a msgpack array.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Fraction of texts carrying PII.
    #[arg(long, default_value_t = spoolgate::loadgen::PII_FRACTION_DEFAULT)]
    pii_fraction: f64,
    /// Envelopes cycle through this many tenants (streams).
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// After the load, wait until nothing is pending and report end-to-end envelopes/s
    /// (needs the metrics address).
    #[arg(long)]
    wait_drained: bool,
    /// Pace the load to this many envelopes/s in total instead of sending as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, short = 'c', env = "SPOOLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Ingest listen address (overrides `ingest.listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Metrics/health listen address (overrides `metrics.listen`).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Durability mode: always, interval or never (overrides `spool.durability`).
    #[arg(long)]
    durability: Option<String>,
    /// Any key: `--set forward.workers=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr redirected to a file on a full disk) is lost,
    // nothing more: by default the subscriber reports such a failure with `eprintln!`, which
    // panics when stderr cannot be written either, and the panic took down the request or
    // forwarding task that logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn load_config(
    file: Option<&std::path::Path>,
    sets: &[(String, String)],
) -> anyhow::Result<Config> {
    let config = Config::load(file, std::env::vars(), sets);
    // A key misspelt in a variable is refused as in the file; say where else to look.
    let overrides: Vec<String> = std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("SPOOLGATE_") && name.contains("__"))
        .collect();
    if config.is_err() && !overrides.is_empty() {
        return config.with_context(|| {
            format!(
                "with the environment's overrides applied ({}), which may hold the key it names",
                overrides.join(", ")
            )
        });
    }
    Ok(config?)
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut sets = Vec::new();
    if let Some(d) = args.data_dir {
        sets.push(("data_dir".to_string(), toml_string(&d.to_string_lossy())));
    }
    if let Some(l) = args.listen {
        sets.push(("ingest.listen".to_string(), toml_string(&l)));
    }
    if let Some(l) = args.metrics_listen {
        sets.push(("metrics.listen".to_string(), toml_string(&l)));
    }
    if let Some(d) = args.durability {
        sets.push(("spool.durability".to_string(), toml_string(&d)));
    }
    for kv in args.sets {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?} is not KEY=VALUE"))?;
        sets.push((k.to_string(), v.to_string()));
    }
    let config = load_config(args.config.as_deref(), &sets)?;
    raise_open_files_limit(config.ingest.connections_max);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spoolgate")
        .build()
        .context("cannot start the async runtime")?;
    let exit = runtime.block_on(spoolgate::daemon::run(config));
    // Dropping the runtime would wait, without a limit, for blocking work still running: a
    // spool close or a sink fdatasync stuck on a hung disk after the shutdown deadline passed,
    // or a recovery a signal cut short. The deadline must bound the exit, so that work is given
    // a moment and then left to end with the process (everything acknowledged is on disk).
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match exit? {
        spoolgate::daemon::Exit::Clean => Ok(ExitCode::SUCCESS),
        spoolgate::daemon::Exit::DeadlineExceeded => Ok(ExitCode::from(1)),
    }
}

/// Quotes a flag value as a TOML string so paths and addresses are never parsed as numbers.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn dead_letter(command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    use spoolgate::forward::dead_letter_resend as dl;
    match command {
        DeadLetterCommand::List { dir, json } => {
            let mut listed = Vec::new();
            // The daemon makes its dead-letter directory with the first letter it writes.
            let letters = if dir.try_exists()? {
                dl::letters_in(&dir)?
            } else {
                eprintln!(
                    "{}: no such directory, so no letters (the daemon makes it with its first)",
                    dir.display()
                );
                Vec::new()
            };
            for path in letters {
                let letter = dl::read_letter(&path)?;
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                let ranges = letter.stream_ranges();
                if json {
                    listed.push(serde_json::json!({
                        "file": file,
                        "sink": letter.sink,
                        "status": letter.status,
                        "reason": letter.reason,
                        "at_ms": letter.at_ms,
                        "records": letter.records.len(),
                        "streams": ranges.iter().map(|(stream, first, last)| serde_json::json!({
                            "stream": stream, "first_seq": first, "last_seq": last,
                        })).collect::<Vec<_>>(),
                        "position": letter.position,
                        "resendable": letter.resendable(),
                    }));
                    continue;
                }
                let reason = one_line(&letter.reason, 160);
                match (&letter.sink, letter.position) {
                    (Some(sink), _) => {
                        let streams: Vec<String> = ranges
                            .iter()
                            .map(|(s, first, last)| format!("{s}:{first}-{last}"))
                            .collect();
                        println!(
                            "{file}  sink={sink} status={} records={} streams={}  reason: {reason}",
                            letter.status.map_or("-".to_string(), |s| s.to_string()),
                            letter.records.len(),
                            streams.join(","),
                        );
                    }
                    (None, position) => println!(
                        "{file}  never reached a sink, spool position {}  reason: {reason}",
                        position.map_or("unknown".to_string(), |p| format!(
                            "{}/{}",
                            p.segment, p.offset
                        )),
                    ),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadLetterCommand::Resend {
            letters,
            config,
            sink,
            remove,
        } => {
            let config = load_config(config.as_deref(), &[])?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut sinks: std::collections::BTreeMap<
                String,
                std::sync::Arc<dyn spoolgate::forward::sink::Sink>,
            > = Default::default();
            let mut failed = 0;
            for path in &letters {
                let letter = dl::read_letter(path)?;
                let Some(name) = sink.clone().or_else(|| letter.sink.clone()) else {
                    report(&format!(
                        "{}: not sent: its envelope never reached a sink ({})",
                        path.display(),
                        one_line(&letter.reason, 160)
                    ));
                    failed += 1;
                    continue;
                };
                if !sinks.contains_key(&name) {
                    let Some(cfg) = config.sinks.get(&name) else {
                        anyhow::bail!(
                            "{}: the config has no sink {name:?} (its sinks: {})",
                            path.display(),
                            config.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
                        );
                    };
                    if !matches!(cfg, spoolgate::config::SinkConfig::Http { .. }) {
                        anyhow::bail!(
                            "sink {name:?} is not an HTTP sink; only HTTP sinks reject batches \
                             and take them again (use --sink to name another)"
                        );
                    }
                    let one = [(name.clone(), cfg.clone())].into_iter().collect();
                    let built = spoolgate::forward::sink::build_sinks(&one, &config.data_dir)?;
                    sinks.extend(built);
                }
                let target = sinks[&name].clone();
                match runtime.block_on(dl::resend(&letter, target.as_ref())) {
                    Ok(n) => {
                        println!("{}: {n} record(s) delivered to {name}", path.display());
                        if remove {
                            dl::remove_letter(path).with_context(|| {
                                format!("delivered, but cannot remove {}", path.display())
                            })?;
                            println!("{}: removed", path.display());
                        }
                    }
                    Err(e) => {
                        report(&format!("{}: not delivered to {name}: {e}", path.display()));
                        failed += 1;
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// `text` on one line, cut to `chars_max` characters.
fn one_line(text: &str, chars_max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(chars_max) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

fn chain_heads(command: ChainHeadsCommand) -> anyhow::Result<ExitCode> {
    use spoolgate::chain::{restore, Chains};
    let print = |chains: &Chains| -> anyhow::Result<()> {
        println!(
            "{}",
            serde_json::to_string_pretty(&restore::heads_to_json(chains))?
        );
        Ok(())
    };
    match command {
        ChainHeadsCommand::Show { data_dir } => {
            let path = data_dir.join(spoolgate::daemon::CHAIN_HEADS_FILE);
            match Chains::load(&path) {
                Ok(chains) => {
                    print(&chains)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        ChainHeadsCommand::FromOutput {
            path,
            line_bytes_max,
        } => match restore::heads_from_output(&path, line_bytes_max) {
            Ok((chains, records)) => {
                print(&chains)?;
                eprintln!(
                    "{}: {} stream(s) from {records} record(s)",
                    path.display(),
                    chains.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                Ok(ExitCode::from(1))
            }
        },
        ChainHeadsCommand::Import { data_dir, heads } => {
            let text = if heads.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the heads from stdin")?
            } else {
                std::fs::read_to_string(&heads)
                    .with_context(|| format!("reading {}", heads.display()))?
            };
            let chains = restore::heads_from_json(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", heads.display()))?;
            let summary = restore::import(&data_dir, chains)?;
            println!(
                "{}: wrote {} stream head(s){}{}",
                data_dir.join(spoolgate::daemon::CHAIN_HEADS_FILE).display(),
                summary.streams,
                if summary.kept_from_previous > 0 {
                    format!(
                        ", {} kept from the previous checkpoint, which held them further on",
                        summary.kept_from_previous
                    )
                } else {
                    String::new()
                },
                if summary.replaced_damaged {
                    "; the damaged checkpoint was replaced"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Raises the soft limit on open files to the hard one. Every connection holds a descriptor,
/// and so do segments, sink files and the listeners: at a soft limit of 1024 (what many
/// container runtimes give) and the default 1024 connections, creating the next segment failed
/// with EMFILE, which poisons the spool. Warns when even the hard limit leaves little room.
fn raise_open_files_limit(connections_max: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum) {
        if current < hard {
            limit.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::warn!(error = %e, current, hard, "could not raise the open files limit");
            }
        }
    }
    // Descriptors besides connections: segments (a few open at a time, one per reader),
    // sink and dead-letter files, listeners, the runtime's own.
    const OTHER_FILES: u64 = 256;
    let wanted = connections_max as u64 + OTHER_FILES;
    if let Some(current) = getrlimit(Resource::Nofile).current {
        if current < wanted {
            tracing::warn!(
                open_files_max = current,
                wanted,
                "the open files limit is below ingest.connections_max plus room for the spool: \
                 at the connection bound a new segment could fail (EMFILE) and poison the \
                 spool; raise the limit (LimitNOFILE=, docker run --ulimit nofile=) or lower \
                 ingest.connections_max"
            );
        }
    }
}

fn health(url: &str) -> anyhow::Result<ExitCode> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url} is not an http:// URL"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(host).with_context(|| format!("cannot connect to {host}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    println!("{}", response.lines().next().unwrap_or(""));
    Ok(if status.starts_with('2') {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn drill(args: DrillArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let data_dir = args.data_dir.unwrap_or_else(|| scratch.path().join("data"));
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    let sink = match args.sink.as_str() {
        "file" => spoolgate::drill::DrillSink::File,
        "http" => spoolgate::drill::DrillSink::Http,
        other => anyhow::bail!("--sink must be file or http, not {other:?}"),
    };
    let opts = spoolgate::drill::DrillOptions {
        binary,
        data_dir,
        kills: args.kills,
        seed: args.seed,
        clients: args.clients.max(1),
        acks_per_round_max: args.acks_per_round_max.max(1),
        sink,
        sets: args.sets,
        flip_rules: args.flip_rules,
        flaky_stream: args.flaky_stream,
        log: args.log,
        full_disk: args.full_disk,
        clean_stops_percent: args.clean_stops,
    };
    let report = spoolgate::drill::run(&opts)?;
    print!("{report}");
    if let Some(path) = args.report_json {
        // The checks that failed go into the JSON too, so a kept report says why it failed.
        let mut json = serde_json::to_value(&report)?;
        json["failures"] = serde_json::json!(report.failures());
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = load_config(Some(&file), &[])
                .with_context(|| format!("{} is not a valid config", file.display()))?;
            for warning in config.warnings() {
                println!("{}: warning: {warning}", file.display());
            }
            // The rules file is the daemon's to refuse at start-up, so check it here too: a
            // config that passes this check must not keep the daemon from starting.
            if let Some(rules) = &config.gate.rules_path {
                let sinks = config.sinks.keys().cloned().collect();
                let n = spoolgate::gate::check_rules_file(rules, &sinks)
                    .with_context(|| format!("{} is not a valid config", file.display()))?;
                println!("{}: ok ({n} rule(s))", rules.display());
            }
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Show { config },
        } => {
            let mut c = load_config(config.as_deref(), &[])?;
            // What this prints ends up in tickets and chat: the secrets stay out.
            for t in &mut c.ingest.tokens {
                t.token = "<redacted>".into();
            }
            c.gate.pii_hash_key = "<redacted>".into();
            for sink in c.sinks.values_mut() {
                if let spoolgate::config::SinkConfig::Http { url, headers, .. } = sink {
                    // Header values (an Authorization) and credentials in the URL.
                    for value in headers.values_mut() {
                        *value = "<redacted>".into();
                    }
                    if let Some((scheme, rest)) = url.split_once("://") {
                        let authority = rest.split('/').next().unwrap_or(rest);
                        if let Some(at) = authority.rfind('@') {
                            *url = format!("{scheme}://<redacted>@{}", &rest[at + 1..]);
                        }
                    }
                }
            }
            print!("{}", toml::to_string_pretty(&c)?);
            Ok(ExitCode::SUCCESS)
        }
        // Docker reserves exit code 2 for health checks: any failure here, a refused
        // connection included, is 1.
        Command::Health { url } => Ok(health(&url).unwrap_or_else(|e| {
            report(&format!("{e:#}"));
            ExitCode::from(1)
        })),
        Command::ChainHeads { command } => chain_heads(command),
        Command::DeadLetter { command } => dead_letter(command),
        Command::Inspect { dir, json } => {
            let dir = if dir.join("spool").is_dir() {
                dir.join("spool")
            } else {
                dir
            };
            let mut report = spoolgate::spool::inspect(&dir)?;
            let pending = spoolgate::forward::ledger::pending_in_spool(&dir)?;
            for s in &mut report.segments {
                let counts = pending.get(&s.id).copied().unwrap_or_default();
                s.pending_envelopes = Some(counts.pending);
                s.orphan_envelopes = Some(counts.orphans);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            let damaged = !report.missing_segments.is_empty()
                || report
                    .segments
                    .iter()
                    .any(|s| !s.damaged.is_empty() || s.header.is_err());
            Ok(if damaged {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Verify {
            path,
            line_bytes_max,
            partial,
        } => {
            let is_spool = path.is_dir()
                && (path.join("spool").is_dir() || spoolgate::spool::holds_segments(&path));
            let outcome = if is_spool {
                spoolgate::chain::verify_spool(&path).map(|s| {
                    let damaged = if s.damaged_ranges > 0 {
                        format!(
                            "; {} damaged range(s) not checked (see spoolgate inspect)",
                            s.damaged_ranges
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "ok: spool seals of {} stream(s), {} sealed record(s), {} checkpointed head(s){damaged}",
                        s.streams, s.sealed_records, s.checkpointed_streams
                    )
                })
            } else {
                let mut verifier = spoolgate::chain::Verifier::with_line_bytes_max(line_bytes_max);
                if partial {
                    verifier = verifier.partial();
                }
                verifier
                    .read_path(&path)
                    .map(|()| verifier.finish())
                    .map(|s| {
                        let later = if partial {
                            format!(
                                ", {} starting after seq 1, {} record(s) from before a stream's first that do not link to it",
                                s.streams_starting_later, s.unlinked_before_first
                            )
                        } else {
                            String::new()
                        };
                        (
                            s.records,
                            format!(
                                "ok: {} stream(s){later}, {} record(s), {} identical duplicate(s)",
                                s.streams, s.records, s.duplicates
                            ),
                        )
                    })
                    .and_then(|(records, line)| {
                        // A path with no records (a wrong directory, output not yet written)
                        // verified nothing: not a success a script should rely on.
                        if records == 0 {
                            Err(spoolgate::chain::VerifyError::Io(std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "no forward records found (a .jsonl file, or a directory of them)",
                            )))
                        } else {
                            Ok(line)
                        }
                    })
            };
            match outcome {
                Ok(line) => {
                    println!("{}: {line}", path.display());
                    Ok(ExitCode::SUCCESS)
                }
                // Not being able to read is not a broken chain: a script running verify after
                // a drill must tell the two apart.
                Err(
                    e @ (spoolgate::chain::VerifyError::Io(_)
                    | spoolgate::chain::VerifyError::Spool(_)),
                ) => {
                    println!("{}: cannot verify: {e}", path.display());
                    Ok(ExitCode::from(2))
                }
                Err(e) => {
                    println!("{}: BROKEN: {e}", path.display());
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Drill(args) => drill(args),
        Command::Bench(args) => bench(args),
    }
}

fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let (mut ingest, mut metrics) = (args.ingest, args.metrics);
    if let Some(dir) = &args.data_dir {
        let path = dir.join(spoolgate::daemon::ADDRESSES_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let addrs: serde_json::Value = serde_json::from_str(&text)?;
        let field = |k: &str| addrs[k].as_str().map(str::to_string);
        ingest = field("ingest").context("no ingest address in the address file")?;
        metrics = field("metrics").or(metrics);
    }
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.pii_fraction),
        "--pii-fraction must be within 0..=1"
    );
    anyhow::ensure!(
        !args.wait_drained || metrics.is_some(),
        "--wait-drained needs --metrics or --data-dir"
    );
    let opts = spoolgate::loadgen::LoadOptions {
        ingest,
        metrics,
        connections: args.connections,
        duration: std::time::Duration::from_secs_f64(args.duration_s.max(0.1)),
        warmup: std::time::Duration::from_secs_f64(args.warmup_s.max(0.0)),
        text_bytes: args.text_bytes,
        batch: args.batch.max(1),
        pii_fraction: args.pii_fraction,
        streams: args.streams,
        wait_drained: args.wait_drained,
        rate: args.rate,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(spoolgate::loadgen::run(opts))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} connections, batch {}, {} B texts, {:.1} s: {:.0} requests/s, {:.0} envelopes/s; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; 202 {}, 429 {}, other {}, transport errors {}",
            report.connections,
            report.batch,
            report.text_bytes,
            report.duration_s,
            report.requests_per_s,
            report.envelopes_per_s,
            report.latency_p50_ms,
            report.latency_p99_ms,
            report.latency_p999_ms,
            report.latency_max_ms,
            report.requests_ok,
            report.requests_429,
            report.requests_other,
            report.transport_errors
        );
        if let (Some(d), Some(e)) = (report.drain_s, report.end_to_end_envelopes_per_s) {
            println!("drained in {d:.2} s after the load: {e:.0} envelopes/s delivered end to end");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h, v2 and v3);
/// the Rust bindings do not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays mapped before mimalloc returns it to the OS. mimalloc's (v3)
/// default is one second; under load the pipeline's memory use swings on about that scale
/// (batch buffers, request bodies, ring refills), and each purge-and-refault zeroes whole 2 MiB
/// transparent huge pages again: about a tenth of the end-to-end CPU in profiles. Ten seconds
/// keeps memory at its working size while busy and still gives it back after a burst, as
/// jemalloc's default decay does. Measured: end-to-end 1 KiB rate +10-15% (notes, 2026-11-22).
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn configure_allocator() {
    // An operator's MIMALLOC_PURGE_DELAY (read by mimalloc itself) takes precedence.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an integer option; any value is valid for
        // purge_delay, and mimalloc reads it each time it considers a purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
    // No transparent huge pages for this process, unless an operator asks for them with
    // MIMALLOC_ALLOW_THP=1. mimalloc advises huge pages on its arenas, so every first touch
    // of a 2 MiB region faults in and zeroes all of it: the daemon's memory grew in 2 MiB steps
    // to ~50 MB more than it uses, and the zeroing was the largest kernel item in end-to-end
    // profiles. Measured (2026-11-23, e2e 1 KiB, 3 A/B rounds): 34.6-40.4 vs 38.8-42.3 us of
    // daemon CPU per envelope, peak RSS 318-346 vs 375-398 MB. mimalloc reads its own option
    // too late for the arena it maps before `main`, so this uses the process-wide prctl.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            // Only a performance setting: the daemon runs the same with huge pages.
            report(&format!("could not disable transparent huge pages: {e}"));
        }
    }
}

fn main() -> ExitCode {
    configure_allocator();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            report(&format!("{e:#}"));
            ExitCode::from(2)
        }
    }
}

/// Writes `spoolgate: <message>` to stderr, ignoring a failure to (`eprintln!` would panic on a
/// full disk and turn exit status 2 into 101).
fn report(message: &str) {
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("spoolgate: {message}\n"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_index_names_mimallocs_purge_delay() {
        // The bundled mimalloc (v3) sets purge_delay's default to 1000 (ms); the options next to
        // it default to 1 and 0, so reading 1000 here (no override in the environment) pins
        // the index.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set, so the default cannot be read");
            return;
        }
        // SAFETY: reading an option has no preconditions.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000);
        configure_allocator();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, ALLOCATOR_PURGE_DELAY_MS);
    }
}
