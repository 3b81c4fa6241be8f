//! Configuration: embedded defaults, a TOML file, `SPOOLGATE_*` environment overrides and CLI
//! flags, applied in that order. Every bound the daemon has is a key here, with its default and
//! the range `validate` accepts; README.md's configuration reference is generated from the same
//! list by hand and must stay in step with it.
//!
//! Environment overrides name a key path: `SPOOLGATE_DATA_DIR` sets `data_dir`,
//! `SPOOLGATE_SPOOL__DURABILITY=never` sets `spool.durability` (sections and keys are separated
//! by a double underscore, and the rest is lower-cased). Values parse as TOML when they can
//! (`8192`, `true`, `"x"`), else they are taken as strings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spool::{Durability, SpoolOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// `SPOOLGATE_*` variables that are not config keys: flags read by clap, and failpoints.
const ENV_NOT_CONFIG: &[&str] = &["CONFIG", "LOG_FORMAT", "FAILPOINT_"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid TOML or has an unknown/mistyped key: {0}")]
    Parse(String),
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for segments, chain state, sink output and dead letters.
    pub data_dir: PathBuf,
    pub ingest: IngestConfig,
    pub metrics: MetricsConfig,
    pub spool: SpoolConfig,
    pub ring: RingConfig,
    pub gate: GateConfig,
    pub forward: ForwardConfig,
    /// Named sinks. Records go to the sink named by their `routing_hints.sink`, else `default`.
    pub sinks: BTreeMap<String, SinkConfig>,
    pub shutdown: ShutdownConfig,
    /// `SPOOLGATE_*` variables whose first part names no config section or key, ignored (see
    /// `load`): reported by `warnings`.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// Unknown top-level fields of a client envelope are moved into `meta`.
    Meta,
    /// Unknown top-level fields are a 400.
    Reject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub tenant: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted (413 above it).
    pub body_bytes_max: u64,
    /// Bound on the request bodies of all requests being handled at once (429 beyond it).
    pub inflight_bytes_max: u64,
    /// Largest single envelope, as encoded msgpack (413 above it).
    pub envelope_bytes_max: u64,
    /// Most envelopes in one request (413 above it).
    pub batch_items_max: usize,
    /// Simultaneous ingest connections; further ones wait in the kernel backlog.
    pub connections_max: usize,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub unknown_fields: UnknownFields,
    /// A retried `id` within this window is answered with its original position.
    pub dedup_window_secs: u64,
    /// Bound on ids remembered for dedup (oldest forgotten first).
    pub dedup_entries_max: usize,
    /// Bound on distinct streams (tenants, or sources without a tenant); a request naming a new
    /// stream beyond it gets 422. Each stream keeps a chain head for the life of the spool.
    pub streams_max: usize,
    /// Bearer tokens; when non-empty, every ingest request needs one.
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    Always,
    Interval,
    Never,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub durability: DurabilityMode,
    /// With `durability = "interval"`: the longest time between fdatasyncs.
    pub fsync_interval_ms: u64,
    pub segment_bytes_max: u64,
    pub record_bytes_max: u32,
    pub commit_batch_records_max: usize,
    pub commit_batch_bytes_max: usize,
    pub queue_depth_max: usize,
    pub preallocate: bool,
    /// With `preallocate`: write the zeros instead of reserving the blocks (`fallocate`).
    pub preallocate_zeros: bool,
    /// With `preallocate` by `fallocate`: keep this many bytes ahead of the writer zero-filled.
    pub zero_ahead_bytes: u64,
    /// Spool bytes on disk above which `low` priority gets 429.
    pub quota_soft_bytes: u64,
    /// Spool bytes on disk above which everything gets 429.
    pub quota_hard_bytes: u64,
    /// Free bytes on the data filesystem below which `low` priority gets 429.
    pub disk_free_soft_bytes: u64,
    /// Free bytes on the data filesystem below which everything gets 429.
    pub disk_free_hard_bytes: u64,
    /// Space held in `<data_dir>/reserve` for compaction to spend on a full filesystem
    /// (`compaction::reserve`); 0 holds none.
    pub reserve_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    pub capacity_records: usize,
    pub capacity_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    /// Count only; text unchanged.
    Tag,
    /// Replace each match in the text with `[KIND]`.
    Mask,
    /// Replace each match with `[KIND:first 16 hex of HMAC-SHA-256(key, match)]`.
    Hash,
    /// Forward no text at all, only its hash (applies when the kind is found).
    DropText,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// TOML rules file (tags, intent, routing); watched and hot-reloaded. None = no rules.
    pub rules_path: Option<PathBuf>,
    /// Longest extractive summary, in characters.
    pub summary_chars_max: usize,
    /// Longest text prefix scanned for PII and rules, in bytes.
    pub scan_bytes_max: usize,
    /// Action per PII kind; kinds not listed use `pii_default`.
    pub pii: BTreeMap<String, PiiAction>,
    pub pii_default: PiiAction,
    /// Key for `hash` PII action. Change it and hashed values change.
    pub pii_hash_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// `false` runs ingest only: nothing is gated, forwarded, tombstoned or compacted, and the
    /// spool grows until its quota answers 429. For benchmarks and sink maintenance windows.
    pub enabled: bool,
    pub workers: usize,
    pub batch_records_max: usize,
    pub batch_bytes_max: usize,
    pub linger_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// A sink call running longer than this counts as a stuck worker (takeover).
    pub worker_deadline_ms: u64,
    /// Bound on records dispatched to one worker and not yet confirmed.
    pub worker_queue_records_max: usize,
    pub dead_letter_dir: Option<PathBuf>,
    /// Bound on the dead-letter directory; once it holds this much, a rejected batch stays
    /// pending and is retried instead.
    pub dead_letter_bytes_max: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    Json,
    Msgpack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines in `dir`, rotated at `file_bytes_max`, fsync'd before success; the sink
    /// refuses (retryably) batches that would take its files past `dir_bytes_max`.
    File {
        dir: Option<PathBuf>,
        #[serde(default = "default_sink_file_bytes_max")]
        file_bytes_max: u64,
        #[serde(default = "default_sink_dir_bytes_max")]
        dir_bytes_max: u64,
    },
    /// POST batches to `url`; 2xx = delivered.
    Http {
        url: String,
        #[serde(default = "default_wire_format")]
        format: WireFormat,
        #[serde(default = "default_http_timeout_ms")]
        timeout_ms: u64,
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
}

impl SinkConfig {
    /// The directory a file sink writes to: its `dir`, else `<data_dir>/out` for the sink named
    /// `default` and `<data_dir>/out-<name>` for the others. `None` for other sink types.
    pub fn file_dir(&self, name: &str, data_dir: &Path) -> Option<PathBuf> {
        let SinkConfig::File { dir, .. } = self else {
            return None;
        };
        Some(dir.clone().unwrap_or_else(|| {
            if name == "default" {
                data_dir.join("out")
            } else {
                data_dir.join(format!("out-{name}"))
            }
        }))
    }
}

fn default_sink_file_bytes_max() -> u64 {
    64 * MIB
}
fn default_sink_dir_bytes_max() -> u64 {
    8 * GIB
}
fn default_wire_format() -> WireFormat {
    WireFormat::Json
}
fn default_http_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// SIGTERM to exit: stop accepting, finish in-flight work, flush. Past this, exit anyway
    /// (nothing acknowledged is lost: it is on disk and replays at the next start).
    pub deadline_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: "127.0.0.1:8750".parse().expect("valid literal address"),
            body_bytes_max: 16 * MIB,
            inflight_bytes_max: 256 * MIB,
            envelope_bytes_max: MIB,
            batch_items_max: 10_000,
            connections_max: 1024,
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 15_000,
            idle_timeout_ms: 60_000,
            unknown_fields: UnknownFields::Meta,
            dedup_window_secs: 600,
            dedup_entries_max: 1_000_000,
            streams_max: 100_000,
            tokens: Vec::new(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:8751".parse().expect("valid literal address"),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            durability: DurabilityMode::Always,
            fsync_interval_ms: 100,
            segment_bytes_max: 64 * MIB,
            record_bytes_max: (MIB + 64 * KIB) as u32,
            commit_batch_records_max: 4096,
            commit_batch_bytes_max: (8 * MIB) as usize,
            queue_depth_max: 8192,
            preallocate: true,
            preallocate_zeros: false,
            zero_ahead_bytes: crate::spool::ZERO_AHEAD_BYTES_DEFAULT,
            quota_soft_bytes: 3 * GIB,
            quota_hard_bytes: 4 * GIB,
            disk_free_soft_bytes: 512 * MIB,
            disk_free_hard_bytes: 128 * MIB,
            reserve_bytes: 64 * MIB,
        }
    }
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            capacity_records: 65_536,
            capacity_bytes: (64 * MIB) as usize,
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            rules_path: None,
            summary_chars_max: 280,
            scan_bytes_max: (64 * KIB) as usize,
            pii: BTreeMap::new(),
            pii_default: PiiAction::Tag,
            pii_hash_key: "spoolgate-default-pii-key".into(),
        }
    }
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            enabled: true,
            workers: 4,
            batch_records_max: 2048,
            batch_bytes_max: (4 * MIB) as usize,
            linger_ms: 5,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            worker_deadline_ms: 60_000,
            worker_queue_records_max: 8192,
            dead_letter_dir: None,
            dead_letter_bytes_max: GIB,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            deadline_ms: 20_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut sinks = BTreeMap::new();
        sinks.insert(
            "default".to_string(),
            SinkConfig::File {
                dir: None,
                file_bytes_max: default_sink_file_bytes_max(),
                dir_bytes_max: default_sink_dir_bytes_max(),
            },
        );
        Config {
            data_dir: PathBuf::from("./spoolgate-data"),
            ingest: IngestConfig::default(),
            metrics: MetricsConfig::default(),
            spool: SpoolConfig::default(),
            ring: RingConfig::default(),
            gate: GateConfig::default(),
            forward: ForwardConfig::default(),
            sinks,
            shutdown: ShutdownConfig::default(),
            ignored_env: Vec::new(),
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The directory `dir` names, for comparing two of them: the longest part of it that exists
/// resolved by the filesystem (symbolic links and `..` as the kernel follows them), the rest,
/// which the sink will create, with `.` and `..` taken out. So `out`, `./x/../out` and a link
/// to `out` compare equal, and so does a link to an `out` that does not exist yet.
fn resolved_dir(dir: &Path) -> PathBuf {
    resolve_dir(dir, 0)
}

/// As many links as Linux follows in one path lookup before it gives up with ELOOP.
const SYMLINKS_FOLLOWED_MAX: u32 = 40;

fn resolve_dir(dir: &Path, links_followed: u32) -> PathBuf {
    use std::path::Component;
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    let mut resolved = loop {
        if let Ok(real) = existing.canonicalize() {
            break real;
        }
        // A link whose target does not exist yet (a sink creates its directory at start):
        // what matters is where it points.
        let dangling = std::fs::symlink_metadata(existing).is_ok_and(|m| m.is_symlink());
        if dangling && links_followed < SYMLINKS_FOLLOWED_MAX {
            if let (Ok(target), Some(parent)) = (std::fs::read_link(existing), existing.parent()) {
                let rest: PathBuf = missing.iter().rev().collect();
                return resolve_dir(&parent.join(target).join(rest), links_followed + 1);
            }
        }
        match existing.parent() {
            Some(parent) => {
                missing.extend(existing.components().next_back());
                existing = parent;
            }
            None => break PathBuf::new(),
        }
    };
    for part in missing.into_iter().rev() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            other => resolved.push(other),
        }
    }
    resolved
}

/// The longest dedup window: 30 days.
const DEDUP_WINDOW_SECS_MAX: u64 = 30 * 86_400;

fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

impl Config {
    /// Builds the configuration from defaults, an optional file, the environment and `sets`
    /// (`key.path=value` pairs from the command line), then validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut tree = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let from_file: toml::Value = text
                .parse::<toml::Table>()
                .map(toml::Value::Table)
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
            // A sink named in the file replaces the default of that name whole: sink types have
            // different keys, so merging them key by key would mix two types.
            if let (Some(file_sinks), Some(base_sinks)) = (
                from_file.get("sinks").and_then(toml::Value::as_table),
                tree.get_mut("sinks").and_then(toml::Value::as_table_mut),
            ) {
                for name in file_sinks.keys() {
                    base_sinks.remove(name);
                }
            }
            merge(&mut tree, from_file);
        }
        let mut ignored_env = Vec::new();
        for (name, value) in env {
            if let Some(rest) = name.strip_prefix("SPOOLGATE_") {
                if rest.is_empty() || ENV_NOT_CONFIG.iter().any(|p| rest.starts_with(p)) {
                    continue;
                }
                let path: Vec<String> = rest.split("__").map(|p| p.to_lowercase()).collect();
                // Only a variable whose first part is a section or a top-level key is an
                // override. Others are not ours: Kubernetes defines SPOOLGATE_PORT,
                // SPOOLGATE_SERVICE_HOST, ... for a Service named spoolgate, and refusing them
                // as unknown keys kept the pod from starting. A misspelt key inside a section
                // is still refused.
                if tree.get(&path[0]).is_none() {
                    ignored_env.push(name.clone());
                    continue;
                }
                set_path(&mut tree, &path, &value);
            }
        }
        for (key, value) in sets {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            set_path(&mut tree, &path, value);
        }
        let mut config: Config = tree
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        config.ignored_env = ignored_env;
        Ok(config)
    }

    /// Settings that are valid but probably not what the operator wants: logged at start-up
    /// and printed by `config check`, which still passes.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .ignored_env
            .iter()
            .map(|name| {
                format!(
                    "environment variable {name} names no config section or key; ignored \
                     (overrides are SPOOLGATE_<KEY> or SPOOLGATE_<SECTION>__<KEY>)"
                )
            })
            .collect();
        let g = &self.gate;
        let hashed: Vec<&str> = crate::gate::PII_KINDS
            .iter()
            .copied()
            .filter(|kind| g.pii.get(*kind).copied().unwrap_or(g.pii_default) == PiiAction::Hash)
            .collect();
        if self.spool.durability == DurabilityMode::Never {
            warnings.push(
                "spool.durability = \"never\": a 202 means written, never fdatasync'd by \
                 itself; a power loss or a kernel crash can lose any acknowledged envelope \
                 (meant for tests and benchmarks)"
                    .to_string(),
            );
        }
        // An empty key (an environment variable left empty, say) is as public as the default.
        let key_public = g.pii_hash_key == GateConfig::default().pii_hash_key
            || g.pii_hash_key.trim().is_empty();
        if !hashed.is_empty() && key_public {
            let which = if g.pii_hash_key.trim().is_empty() {
                "an empty gate.pii_hash_key"
            } else {
                "the default gate.pii_hash_key"
            };
            warnings.push(format!(
                "gate.pii hashes {} with {which}, which is public: anyone can recompute the \
                 hash of a guessable value (a phone or card number) and so read it back; set \
                 gate.pii_hash_key to a secret",
                hashed.join(", ")
            ));
        }
        warnings
    }

    /// Checks every bound. The messages name the key, the value and the accepted range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.spool;
        check_range(
            "spool.segment_bytes_max",
            s.segment_bytes_max,
            MIB,
            4 * GIB - 1,
        )?;
        check_range(
            "spool.record_bytes_max",
            u64::from(s.record_bytes_max),
            1024,
            s.segment_bytes_max / 2,
        )?;
        check_range(
            "spool.zero_ahead_bytes",
            s.zero_ahead_bytes,
            0,
            s.segment_bytes_max / 2,
        )?;
        check_range("spool.fsync_interval_ms", s.fsync_interval_ms, 1, 60_000)?;
        check_range(
            "spool.commit_batch_records_max",
            s.commit_batch_records_max as u64,
            1,
            1 << 20,
        )?;
        check_range(
            "spool.commit_batch_bytes_max",
            s.commit_batch_bytes_max as u64,
            u64::from(s.record_bytes_max),
            GIB,
        )?;
        check_range(
            "spool.queue_depth_max",
            s.queue_depth_max as u64,
            1,
            1 << 20,
        )?;
        // The spool counts its segments' allocated size, so a hard quota of one segment or less
        // would refuse every request from the start.
        check_range(
            "spool.quota_hard_bytes",
            s.quota_hard_bytes,
            s.segment_bytes_max + 1,
            u64::MAX,
        )?;
        if s.quota_soft_bytes > s.quota_hard_bytes {
            return Err(invalid(
                "spool.quota_soft_bytes",
                "must not exceed spool.quota_hard_bytes",
            ));
        }
        if s.disk_free_soft_bytes < s.disk_free_hard_bytes {
            return Err(invalid(
                "spool.disk_free_soft_bytes",
                "must be at least spool.disk_free_hard_bytes (soft trips first)",
            ));
        }
        check_range("spool.reserve_bytes", s.reserve_bytes, 0, 64 * GIB)?;
        let i = &self.ingest;
        check_range(
            "ingest.envelope_bytes_max",
            i.envelope_bytes_max,
            256,
            u64::from(s.record_bytes_max) - 1024,
        )?;
        check_range(
            "ingest.body_bytes_max",
            i.body_bytes_max,
            i.envelope_bytes_max,
            GIB,
        )?;
        check_range(
            "ingest.inflight_bytes_max",
            i.inflight_bytes_max,
            i.body_bytes_max,
            64 * GIB,
        )?;
        check_range(
            "ingest.batch_items_max",
            i.batch_items_max as u64,
            1,
            1_000_000,
        )?;
        check_range(
            "ingest.connections_max",
            i.connections_max as u64,
            1,
            1_000_000,
        )?;
        check_range(
            "ingest.header_read_timeout_ms",
            i.header_read_timeout_ms,
            10,
            600_000,
        )?;
        check_range(
            "ingest.body_read_timeout_ms",
            i.body_read_timeout_ms,
            10,
            600_000,
        )?;
        check_range("ingest.idle_timeout_ms", i.idle_timeout_ms, 10, 3_600_000)?;
        // A window is remembered in memory and in compaction's checkpoints until it ends, so
        // one of years would keep every id ever sent (up to dedup_entries_max) for good.
        check_range(
            "ingest.dedup_window_secs",
            i.dedup_window_secs,
            0,
            DEDUP_WINDOW_SECS_MAX,
        )?;
        check_range(
            "ingest.dedup_entries_max",
            i.dedup_entries_max as u64,
            0,
            100_000_000,
        )?;
        check_range("ingest.streams_max", i.streams_max as u64, 1, 10_000_000)?;
        for (n, t) in i.tokens.iter().enumerate() {
            if t.token.len() < 16 {
                return Err(invalid(
                    &format!("ingest.tokens[{n}].token"),
                    "must be at least 16 characters",
                ));
            }
            if t.tenant.is_empty() {
                return Err(invalid(
                    &format!("ingest.tokens[{n}].tenant"),
                    "must not be empty",
                ));
            }
        }
        if i.listen == self.metrics.listen && i.listen.port() != 0 {
            return Err(invalid("metrics.listen", "must differ from ingest.listen"));
        }
        check_range(
            "ring.capacity_records",
            self.ring.capacity_records as u64,
            1,
            1 << 24,
        )?;
        check_range(
            "ring.capacity_bytes",
            self.ring.capacity_bytes as u64,
            1,
            16 * GIB,
        )?;
        check_range(
            "gate.summary_chars_max",
            self.gate.summary_chars_max as u64,
            0,
            65_536,
        )?;
        check_range(
            "gate.scan_bytes_max",
            self.gate.scan_bytes_max as u64,
            64,
            64 * MIB,
        )?;
        let f = &self.forward;
        check_range("forward.workers", f.workers as u64, 1, 256)?;
        check_range(
            "forward.batch_records_max",
            f.batch_records_max as u64,
            1,
            100_000,
        )?;
        check_range(
            "forward.batch_bytes_max",
            f.batch_bytes_max as u64,
            1024,
            GIB,
        )?;
        check_range("forward.linger_ms", f.linger_ms, 0, 60_000)?;
        check_range("forward.retry_initial_ms", f.retry_initial_ms, 1, 600_000)?;
        check_range(
            "forward.retry_max_ms",
            f.retry_max_ms,
            f.retry_initial_ms,
            3_600_000,
        )?;
        check_range(
            "forward.worker_deadline_ms",
            f.worker_deadline_ms,
            100,
            3_600_000,
        )?;
        check_range(
            "forward.worker_queue_records_max",
            f.worker_queue_records_max as u64,
            1,
            1 << 24,
        )?;
        check_range(
            "forward.dead_letter_bytes_max",
            f.dead_letter_bytes_max,
            4 * KIB,
            1 << 50,
        )?;
        // A misspelt kind would otherwise be ignored, and that kind forwarded under the default
        // action: PII passed on that the operator meant to mask or drop.
        if let Some(kind) = self
            .gate
            .pii
            .keys()
            .find(|k| !crate::gate::PII_KINDS.contains(&k.as_str()))
        {
            return Err(invalid(
                &format!("gate.pii.{kind}"),
                format!(
                    "is not a PII kind; the kinds are {}",
                    crate::gate::PII_KINDS.join(", ")
                ),
            ));
        }
        // Two file sinks writing one directory would number their files over each other, and
        // each would cut lines the other is writing as partial (at start, after a failure).
        let mut file_dirs: BTreeMap<PathBuf, (&str, PathBuf)> = BTreeMap::new();
        for (name, sink) in &self.sinks {
            let Some(dir) = sink.file_dir(name, &self.data_dir) else {
                continue;
            };
            let resolved = resolved_dir(&dir);
            if let Some((other, other_dir)) =
                file_dirs.insert(resolved.clone(), (name, dir.clone()))
            {
                // Name the directory as both sinks' settings give it, so the user can see why
                // two different-looking paths are one.
                let other_named = if other_dir == dir {
                    String::new()
                } else {
                    format!(" (as {})", other_dir.display())
                };
                return Err(invalid(
                    &format!("sinks.{name}.dir"),
                    format!(
                        "{} is also the directory of sinks.{other}{other_named}; each file sink \
                         needs its own",
                        dir.display()
                    ),
                ));
            }
        }
        if !self.sinks.contains_key("default") {
            return Err(invalid("sinks", "a sink named \"default\" is required"));
        }
        for (name, sink) in &self.sinks {
            match sink {
                SinkConfig::Http {
                    url,
                    timeout_ms,
                    headers,
                    ..
                } => {
                    if !(url.starts_with("http://")) {
                        return Err(invalid(
                            &format!("sinks.{name}.url"),
                            "must be an http:// URL",
                        ));
                    }
                    crate::forward::http_sink::check_settings(url, headers)
                        .map_err(|why| invalid(&format!("sinks.{name}"), why))?;
                    // An attempt that may outlast the worker deadline would turn a slow but
                    // working sink into a stuck one, and every such attempt into a takeover.
                    if *timeout_ms == 0 || *timeout_ms >= f.worker_deadline_ms {
                        return Err(invalid(
                            &format!("sinks.{name}.timeout_ms"),
                            format!(
                                "{timeout_ms} must be at least 1 and below \
                                 forward.worker_deadline_ms ({})",
                                f.worker_deadline_ms
                            ),
                        ));
                    }
                }
                SinkConfig::File {
                    file_bytes_max,
                    dir_bytes_max,
                    ..
                } => {
                    check_range(
                        &format!("sinks.{name}.file_bytes_max"),
                        *file_bytes_max,
                        4 * KIB,
                        64 * GIB,
                    )?;
                    // Once the files reach the bound, removing the closed ones must bring them
                    // below it again; the file being appended to cannot be removed.
                    let floor = 2 * file_bytes_max;
                    if *dir_bytes_max < floor {
                        return Err(invalid(
                            &format!("sinks.{name}.dir_bytes_max"),
                            format!(
                                "{dir_bytes_max} is below 2 x file_bytes_max = {floor}: \
                                 removing the closed files must make room again"
                            ),
                        ));
                    }
                    check_range(
                        &format!("sinks.{name}.dir_bytes_max"),
                        *dir_bytes_max,
                        floor,
                        1 << 50,
                    )?;
                }
            }
        }
        check_range(
            "shutdown.deadline_ms",
            self.shutdown.deadline_ms,
            100,
            3_600_000,
        )?;
        Ok(())
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    pub fn dead_letter_dir(&self) -> PathBuf {
        self.forward
            .dead_letter_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("dead-letter"))
    }

    pub fn spool_options(&self) -> SpoolOptions {
        let s = &self.spool;
        SpoolOptions {
            dir: self.spool_dir(),
            segment_bytes_max: s.segment_bytes_max,
            record_bytes_max: s.record_bytes_max,
            durability: match s.durability {
                DurabilityMode::Always => Durability::Always,
                DurabilityMode::Interval => {
                    Durability::Interval(Duration::from_millis(s.fsync_interval_ms))
                }
                DurabilityMode::Never => Durability::Never,
            },
            commit_batch_records_max: s.commit_batch_records_max,
            commit_batch_bytes_max: s.commit_batch_bytes_max,
            queue_depth_max: s.queue_depth_max,
            preallocate: s.preallocate,
            preallocate_zeros: s.preallocate_zeros,
            zero_ahead_bytes: s.zero_ahead_bytes,
            cached_behind_bytes: crate::spool::CACHED_BEHIND_BYTES_DEFAULT,
            cached_unread_bytes_max: crate::spool::CACHED_UNREAD_BYTES_MAX_DEFAULT,
        }
    }
}

/// Overlays `over` onto `base`, table by table.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn set_path(tree: &mut toml::Value, path: &[String], raw: &str) {
    // A key that holds a string takes the value as it is: a secret such as
    // gate.pii_hash_key that happens to read as a TOML number or boolean stays a string.
    let holds_string = path
        .iter()
        .try_fold(&*tree, |node, key| node.get(key))
        .is_some_and(toml::Value::is_str);
    let value = match format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(parsed) if parsed.is_str() || !holds_string => parsed,
        _ => toml::Value::String(raw.to_string()),
    };
    let mut node = tree;
    for (n, key) in path.iter().enumerate() {
        let Some(table) = node.as_table_mut() else {
            return;
        };
        if n + 1 == path.len() {
            table.insert(key.clone(), value);
            return;
        }
        node = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env, &[])
    }

    #[test]
    fn defaults_are_valid_and_safe() {
        let c = Config::load(None, Vec::new(), &[]).unwrap();
        assert_eq!(c.spool.durability, DurabilityMode::Always);
        assert_eq!(c.ingest.listen.to_string(), "127.0.0.1:8750");
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:8751");
        assert!(matches!(
            c.sinks.get("default"),
            Some(SinkConfig::File { .. })
        ));
    }

    #[test]
    fn file_then_env_then_flags_override_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "data_dir = \"/a\"\n[spool]\ndurability = \"interval\"\n",
        )
        .unwrap();
        let env = vec![("SPOOLGATE_DATA_DIR".to_string(), "/b".to_string())];
        let sets = vec![("spool.durability".to_string(), "never".to_string())];
        let c = Config::load(Some(&path), env, &sets).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.spool.durability, DurabilityMode::Never);
    }

    #[test]
    fn env_override_reaches_nested_numeric_keys() {
        let c = load("", &[("SPOOLGATE_FORWARD__WORKERS", "7")]).unwrap();
        assert_eq!(c.forward.workers, 7);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = load("[spool]\nsegment_byte_max = 5\n", &[]).unwrap_err();
        assert!(err.to_string().contains("segment_byte_max"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_key_and_range() {
        let err = load("[forward]\nworkers = 0\n", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for forward.workers: 0 is outside 1..=256"
        );
    }

    #[test]
    fn durability_never_is_warned_of() {
        let c = load("[spool]\ndurability = \"never\"\n", &[]).unwrap();
        assert!(
            c.warnings().iter().any(|w| w.contains("spool.durability")),
            "{:?}",
            c.warnings()
        );
        let c = load("[spool]\ndurability = \"interval\"\n", &[]).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn a_dedup_window_over_thirty_days_is_refused() {
        let err = load("[ingest]\ndedup_window_secs = 2592001\n", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for ingest.dedup_window_secs: 2592001 is outside 0..=2592000"
        );
        load("[ingest]\ndedup_window_secs = 2592000\n", &[]).unwrap();
    }

    #[test]
    fn a_misspelt_pii_kind_is_refused_naming_the_key_and_the_kinds() {
        let err = load("[gate.pii]\nssn = \"drop_text\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid value for gate.pii.ssn: is not a PII kind"),
            "{err}"
        );
        assert!(err.contains("us_ssn"), "{err}");
        load("[gate.pii]\nus_ssn = \"drop_text\"\n", &[]).unwrap();
    }

    #[test]
    fn hashing_pii_with_the_public_default_key_is_warned_of_and_a_secret_key_is_not() {
        let c = load("[gate.pii]\nphone = \"hash\"\ncard = \"hash\"\n", &[]).unwrap();
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("card, phone") && warnings[0].contains("gate.pii_hash_key"),
            "{warnings:?}"
        );
        let c = load(
            "[gate]\npii_hash_key = \"a secret of our own\"\n[gate.pii]\nphone = \"hash\"\n",
            &[],
        )
        .unwrap();
        assert!(c.warnings().is_empty());
        assert!(load("", &[]).unwrap().warnings().is_empty());
        // An empty key, as an environment variable left empty gives, is no secret either.
        let c = load(
            "[gate.pii]\nphone = \"hash\"\n",
            &[("SPOOLGATE_GATE__PII_HASH_KEY", "")],
        )
        .unwrap();
        let warnings = c.warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains("an empty gate.pii_hash_key"),
            "{warnings:?}"
        );
    }

    #[test]
    fn variables_that_name_no_section_are_ignored_with_a_warning_and_string_keys_take_any_value() {
        // What Kubernetes defines for a Service named spoolgate.
        let c = load(
            "",
            &[
                ("SPOOLGATE_PORT", "tcp://10.0.0.1:8750"),
                ("SPOOLGATE_SERVICE_HOST", "10.0.0.1"),
                ("SPOOLGATE_GATE__PII_HASH_KEY", "12345"),
                ("SPOOLGATE_DATA_DIR", "\"/quoted\""),
                ("SPOOLGATE_FORWARD__WORKERS", "3"),
            ],
        )
        .unwrap();
        assert_eq!(c.forward.workers, 3);
        assert_eq!(c.gate.pii_hash_key, "12345");
        assert_eq!(
            c.data_dir,
            PathBuf::from("/quoted"),
            "a TOML string is read as one"
        );
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("SPOOLGATE_PORT"), "{warnings:?}");
        // A misspelt key inside a section is still refused.
        let err = load("", &[("SPOOLGATE_FORWARD__WORKRES", "3")]).unwrap_err();
        assert!(err.to_string().contains("workres"), "{err}");
    }

    #[test]
    fn a_hard_quota_of_one_segment_or_less_is_refused() {
        let err = load(
            "[spool]\nquota_soft_bytes = 1048576\nquota_hard_bytes = 33554432\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for spool.quota_hard_bytes: 33554432 is outside 67108865..=18446744073709551615"
        );
    }

    #[test]
    fn a_file_sink_bound_below_two_files_is_refused_with_the_reason() {
        let err = load(
            "[sinks.default]\ntype = \"file\"\nfile_bytes_max = 65536\ndir_bytes_max = 100000\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for sinks.default.dir_bytes_max: 100000 is below \
             2 x file_bytes_max = 131072: removing the closed files must make room again"
        );
        let c = load(
            "[sinks.default]\ntype = \"file\"\nfile_bytes_max = 65536\ndir_bytes_max = 131072\n",
            &[],
        )
        .unwrap();
        match c.sinks.get("default").unwrap() {
            SinkConfig::File { dir_bytes_max, .. } => assert_eq!(*dir_bytes_max, 131_072),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_http_sink_parses_with_defaults() {
        let c = load(
            "[sinks.default]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n",
            &[],
        )
        .unwrap();
        match c.sinks.get("default").unwrap() {
            SinkConfig::Http {
                format, timeout_ms, ..
            } => {
                assert_eq!(*format, WireFormat::Json);
                assert_eq!(*timeout_ms, 10_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_file_sinks_writing_one_directory_are_refused() {
        let err = load(
            "data_dir = \"/srv/sg\"\n[sinks.audit]\ntype = \"file\"\ndir = \"/srv/sg/out\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid value for sinks.default.dir: /srv/sg/out is also the directory of \
             sinks.audit; each file sink needs its own"
        );
        assert!(load(
            "data_dir = \"/srv/sg\"\n[sinks.audit]\ntype = \"file\"\n",
            &[]
        )
        .is_ok());
    }

    #[test]
    fn two_file_sinks_naming_one_directory_through_dots_or_a_link_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("sg");
        std::fs::create_dir_all(data.join("out")).unwrap();
        std::os::unix::fs::symlink(data.join("out"), root.path().join("link")).unwrap();
        let config = |audit_dir: &Path| {
            format!(
                "data_dir = \"{}\"\n[sinks.audit]\ntype = \"file\"\ndir = \"{}\"\n",
                data.display(),
                audit_dir.display()
            )
        };
        for same in [
            data.join("x/../out"),
            data.join("./out/"),
            root.path().join("link"),
        ] {
            let err = load(&config(&same), &[]).unwrap_err().to_string();
            assert!(
                err.contains("is also the directory of sinks.audit"),
                "{}: {err}",
                same.display()
            );
        }
        // `..` after a link leads to the link target's parent, as the kernel follows it, not
        // back to the link's own directory.
        let err = load(&config(&root.path().join("link/../out")), &[]).unwrap_err();
        assert!(err.to_string().contains("is also the directory"), "{err}");
        assert!(load(&config(&root.path().join("out")), &[]).is_ok());
        // Directories that do not exist yet compare by their names.
        assert!(load(&config(&data.join("new/../out")), &[]).is_err());
        assert!(load(&config(&root.path().join("link/sub")), &[]).is_ok());
        // A link to the default's directory before the sink has created it.
        std::fs::remove_dir(data.join("out")).unwrap();
        let err = load(&config(&root.path().join("link")), &[]).unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "is also the directory of sinks.audit (as {})",
                root.path().join("link").display()
            )),
            "{err}"
        );
        std::os::unix::fs::symlink("sg/out", root.path().join("relative-link")).unwrap();
        assert!(load(&config(&root.path().join("relative-link")), &[]).is_err());
    }

    #[test]
    fn an_http_sink_timeout_of_zero_or_not_below_the_worker_deadline_is_refused() {
        let sink = |timeout: u64| {
            format!(
                "[forward]\nworker_deadline_ms = 60000\n[sinks.default]\ntype = \"http\"\n\
                 url = \"http://127.0.0.1:9/x\"\ntimeout_ms = {timeout}\n"
            )
        };
        for bad in [0, 60_000, 90_000] {
            let err = load(&sink(bad), &[]).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "invalid value for sinks.default.timeout_ms: {bad} must be at least 1 and \
                     below forward.worker_deadline_ms (60000)"
                )
            );
        }
        assert!(load(&sink(59_999), &[]).is_ok());
    }

    #[test]
    fn an_http_sink_header_or_url_the_client_would_refuse_is_refused_by_the_config() {
        let err = load(
            "[sinks.default]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n\
             headers = { \"bad header\" = \"v\" }\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid value for sinks.default: header \"bad header\""),
            "{err}"
        );
        let err = load(
            "[sinks.default]\ntype = \"http\"\nurl = \"http:// spaced/x\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid url"), "{err}");
    }
}
