//! The gate: deterministic classification of each envelope before it is chained.
//!
//! For an envelope with text the gate sets `text_hash` (SHA-256 of the original text, hex) and
//! `char_len`, counts PII by kind (`pii`), applies the rules file (`tags`, `intent_hint`,
//! `routing_hints`, see [`rules`]), applies the PII policy to the text, and takes an extractive
//! summary of the text *after* the policy, so a summary never shows what the policy hid.
//!
//! PII policy per kind (`gate.pii`, default `gate.pii_default`):
//! - `tag`: count only;
//! - `mask`: replace each match with `[KIND]`;
//! - `hash`: replace each match with `[KIND:<first 16 hex of HMAC-SHA-256(pii_hash_key, match)>]`;
//! - `drop_text`: forward no text (and no summary) when the kind is found; `text_hash` and
//!   `char_len` still describe the original. This is the "hash only after ingest" choice; note
//!   the spool itself keeps the text until compaction deletes its segment.
//!
//! Only the first `gate.scan_bytes_max` bytes are scanned for PII and rules (bounded cost per
//! envelope). What lies beyond cannot be vouched for, so under a policy that rewrites or drops
//! any kind (anything but `tag` for all), a longer text is forwarded as under `drop_text`:
//! failing closed, rather than forwarding unscanned bytes, or a match cut by the limit, in
//! clear. Under `tag` alone, a longer text goes on whole, counted from its scanned part.
//!
//! Where matches of different kinds overlap, one is kept: the kind whose action is strictest
//! (`drop_text`, then `mask` and `hash`, then `tag`), and among equals the earlier in
//! [`PII_KINDS`]. So a lenient kind's match (an unterminated private key under `tag`, which
//! runs to the end of the text) never shields a stricter kind's from its policy.
//!
//! The policy applies to `text` (and the summary taken from it) only: `meta`, `source`,
//! `tenant` and `id` are forwarded as the client sent them.
//!
//! Determinism: the output depends only on the envelope, the rules and the config. It still
//! changes when the rules change, which is why the chain seals the gate's output before
//! forwarding (see `chain`).
//!
//! Hot reload: [`Gate::watch`] watches the rules file's directory (editors replace files by
//! rename) and reloads on change; an invalid file is refused with an error log and
//! `spoolgate_gate_rules_reloads_total{result="error"}`, and the previous rules stay in force.

pub mod pii;
pub mod rules;
pub mod summary;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::config::{GateConfig, PiiAction};
use crate::envelope::Envelope;
use crate::metrics::Metrics;
pub use pii::PII_KINDS;
use rules::Rules;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot watch rules file: {0}")]
    Watch(#[from] notify::Error),
}

pub struct Gate {
    config: GateConfig,
    detector: pii::Detector,
    rules: RwLock<Arc<Rules>>,
    generation: AtomicU64,
    /// What the rules file held at the last look (start-up, or a reload the watcher started):
    /// [`rules_fingerprint`]. The watcher reacts to any change in the file's directory (a
    /// Kubernetes ConfigMap update renames a symlink there and never touches the file's own
    /// name), so it reloads only when this differs.
    rules_seen: std::sync::Mutex<Option<[u8; 32]>>,
    metrics: Arc<Metrics>,
    /// Per entry of [`PII_KINDS`]: its configured action, and its
    /// `gate_pii_found_total{kind}` counter, resolved once rather than per match.
    actions: Vec<PiiAction>,
    /// The kinds by how strict their action is, strictest first (see the module doc): the
    /// order in which overlapping matches are kept.
    match_order: Vec<usize>,
    /// Whether any kind's action is other than `tag`: then a text longer than
    /// `scan_bytes_max` is not forwarded (see the module doc).
    rewrites_or_drops: bool,
    pii_found: Vec<prometheus::IntCounter>,
    /// The configured sinks' names, when a rules file must route only to them (the daemon's
    /// gate); `None` accepts any sink name (tests and benches without sinks).
    sinks: Option<BTreeSet<String>>,
    /// Fault injection for tests ([`Gate::panicking_on`]); `None` in the daemon.
    panics_on: Option<fn(&Envelope) -> bool>,
}

thread_local! {
    /// True while this thread is in [`Gate::classify`].
    static CLASSIFYING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last panic inside [`Gate::classify`] on this thread happened.
    static PANICKED_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Marks the thread as classifying until dropped (on return or unwind).
struct Classifying;

impl Classifying {
    fn enter() -> Classifying {
        CLASSIFYING.with(|c| c.set(true));
        Classifying
    }
}

impl Drop for Classifying {
    fn drop(&mut self) {
        CLASSIFYING.with(|c| c.set(false));
    }
}

/// Installs, once per process, a panic hook that reports a panic inside [`Gate::classify`] by
/// its location only, and remembers it for [`take_panic_location`]: the message of a panic on
/// a text (a string sliced off a character boundary, say) quotes up to 256 bytes of that text,
/// which the PII policy exists to keep out of logs. Every other panic goes to the hook that was
/// there before.
pub fn quiet_classify_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CLASSIFYING.with(|c| c.get()) {
                let at = info
                    .location()
                    .map_or_else(|| "an unknown place".to_string(), |l| l.to_string());
                tracing::error!(at = %at, "the gate panicked (its message is withheld: it may quote the text)");
                PANICKED_AT.with(|p| *p.borrow_mut() = Some(at));
            } else {
                previous(info);
            }
        }));
    });
}

/// Where the last panic inside [`Gate::classify`] on this thread happened, if the hook of
/// [`quiet_classify_panics`] saw it.
pub fn take_panic_location() -> Option<String> {
    PANICKED_AT.with(|p| p.borrow_mut().take())
}

/// Keeps the rules file watched; dropping it stops the watching.
pub struct RulesWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// How long the rules file must see no change before a reload reads it.
const RELOAD_QUIET: std::time::Duration = std::time::Duration::from_millis(100);

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(k.map(|b| b ^ 0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(k.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Reads and compiles the rules file. With `refuse_empty` (a reload), a file holding nothing
/// but whitespace is refused: a file rewritten in place is empty for a moment, and an empty
/// file parses as valid rules with no rules in them, which would gate records with none until
/// the write finished, and seal them so. `rule = []` says "no rules" on purpose.
fn load_rules(
    path: &std::path::Path,
    refuse_empty: bool,
    sinks: Option<&BTreeSet<String>>,
) -> Result<Rules, GateError> {
    let read_error = |source| GateError::Read {
        path: path.to_path_buf(),
        source,
    };
    // The bound is applied to what is read, not to the size a stat saw: a file rewritten in
    // place between the two could otherwise be read whole, however large.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(read_error)?,
            rules::RULES_FILE_BYTES_MAX + 1,
        ),
        &mut bytes,
    )
    .map_err(read_error)?;
    if bytes.len() as u64 > rules::RULES_FILE_BYTES_MAX {
        return Err(GateError::Invalid {
            path: path.to_path_buf(),
            reason: format!("over the limit of {} bytes", rules::RULES_FILE_BYTES_MAX),
        });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if refuse_empty && text.trim().is_empty() {
        return Err(GateError::Invalid {
            path: path.to_path_buf(),
            reason: "the file is empty (as a file being rewritten in place is for a moment); \
                     write `rule = []` to run with no rules"
                .into(),
        });
    }
    let rules = Rules::parse(&text).map_err(|reason| GateError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    if let Some(reason) = sinks.and_then(|known| rules.unknown_sink(&|s| known.contains(s))) {
        return Err(GateError::Invalid {
            path: path.to_path_buf(),
            reason,
        });
    }
    Ok(rules)
}

/// Reads and compiles a rules file as the daemon would at start-up, routing only to `sinks`;
/// `spoolgate config check` uses it. Returns the number of rules.
pub fn check_rules_file(
    path: &std::path::Path,
    sinks: &BTreeSet<String>,
) -> Result<usize, GateError> {
    load_rules(path, false, Some(sinks)).map(|rules| rules.len())
}

/// SHA-256 of what reading the rules file gives now: its bytes (up to one past the bound), or
/// the error reading it, so that a file that stays unreadable is reported once, not at every
/// change to its neighbours.
fn rules_fingerprint(path: &std::path::Path) -> [u8; 32] {
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        std::io::Read::read_to_end(
            &mut std::io::Read::take(f, rules::RULES_FILE_BYTES_MAX + 1),
            &mut bytes,
        )
    });
    match read {
        Ok(_) => Sha256::digest(&bytes).into(),
        Err(e) => Sha256::new()
            .chain_update(b"unreadable: ")
            .chain_update(e.kind().to_string())
            .finalize()
            .into(),
    }
}

/// Reloads the rules once the file has had no change for [`RELOAD_QUIET`]. A file rewritten
/// in place raises several events (truncate, then each write); reading at the first would see
/// part of it, which may still parse (an empty file, or one cut at a rule boundary) and would
/// then gate, and seal, records with the wrong rules until the next event. Waiting for the
/// events to stop reads the finished file in the usual case; writing a temporary file and
/// renaming it over the rules file makes it certain. Ends when the watcher is dropped.
fn reload_when_quiet(changed: &std::sync::mpsc::Receiver<()>, gate: &std::sync::Weak<Gate>) {
    use std::sync::mpsc::RecvTimeoutError;
    while changed.recv().is_ok() {
        loop {
            match changed.recv_timeout(RELOAD_QUIET) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(gate) = gate.upgrade() else { return };
        gate.reload_if_changed();
    }
}

impl Gate {
    pub fn new(config: &GateConfig, metrics: Arc<Metrics>) -> Result<Gate, GateError> {
        Gate::build(config, metrics, None)
    }

    /// The daemon's gate: a rules file (at start-up or reloaded) may route only to `sinks`.
    pub fn with_sinks(
        config: &GateConfig,
        metrics: Arc<Metrics>,
        sinks: BTreeSet<String>,
    ) -> Result<Gate, GateError> {
        Gate::build(config, metrics, Some(sinks))
    }

    fn build(
        config: &GateConfig,
        metrics: Arc<Metrics>,
        sinks: Option<BTreeSet<String>>,
    ) -> Result<Gate, GateError> {
        let rules = match &config.rules_path {
            Some(p) => load_rules(p, false, sinks.as_ref())?,
            None => Rules::empty(),
        };
        let actions: Vec<PiiAction> = PII_KINDS
            .iter()
            .map(|kind| config.pii.get(*kind).copied().unwrap_or(config.pii_default))
            .collect();
        let strictness = |action: PiiAction| match action {
            PiiAction::DropText => 0,
            PiiAction::Mask | PiiAction::Hash => 1,
            PiiAction::Tag => 2,
        };
        let mut match_order: Vec<usize> = (0..PII_KINDS.len()).collect();
        // Stable: among kinds of equal strictness, PII_KINDS's priority stands.
        match_order.sort_by_key(|&kind| strictness(actions[kind]));
        let rewrites_or_drops = actions.iter().any(|a| *a != PiiAction::Tag);
        let pii_found = PII_KINDS
            .iter()
            .map(|kind| metrics.gate_pii_found_total.with_label_values(&[kind]))
            .collect();
        Ok(Gate {
            config: config.clone(),
            detector: pii::Detector::new(),
            rules: RwLock::new(Arc::new(rules)),
            generation: AtomicU64::new(1),
            rules_seen: std::sync::Mutex::new(config.rules_path.as_deref().map(rules_fingerprint)),
            metrics,
            actions,
            match_order,
            rewrites_or_drops,
            pii_found,
            sinks,
            panics_on: None,
        })
    }

    /// Fault injection, as `spool::fs::FaultFs` is for the disk: [`Gate::classify`] panics on
    /// the envelopes `selects` picks, as a bug in a detector or a rule would, so that tests can
    /// show what the worker does with a record the gate cannot classify.
    pub fn panicking_on(mut self, selects: fn(&Envelope) -> bool) -> Gate {
        self.panics_on = Some(selects);
        self
    }

    /// Increments on every successful reload.
    pub fn rules_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Re-reads the rules file; on error the previous rules stay in force.
    pub fn reload(&self) -> Result<(), GateError> {
        let Some(path) = &self.config.rules_path else {
            return Ok(());
        };
        *self.rules_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(rules_fingerprint(path));
        match load_rules(path, true, self.sinks.as_ref()) {
            Ok(rules) => {
                let n = rules.len();
                *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.metrics
                    .gate_rules_reloads_total
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(path = %path.display(), rules = n, "rules reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .gate_rules_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, "rules reload refused; the previous rules stay in force");
                Err(e)
            }
        }
    }

    /// Reloads the rules if the file reads differently from the last look; what the watcher
    /// calls after any change in the file's directory. `true` if it tried (the reload itself
    /// may have been refused).
    pub fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.config.rules_path else {
            return false;
        };
        let seen = *self.rules_seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen == Some(rules_fingerprint(path)) {
            tracing::debug!(path = %path.display(), "rules file unchanged");
            return false;
        }
        let _ = self.reload();
        true
    }

    /// Watches the rules file and reloads it when it changes. `None` without a rules file.
    ///
    /// The watch is on the file's directory, and on the directory of the file a symlink at the
    /// path resolves to at start-up, if another; any change there makes the reloader compare
    /// the file's contents with the last look ([`Gate::reload_if_changed`]). So an editor's
    /// rename over the file, a write in place, and a Kubernetes ConfigMap update (a new
    /// timestamped directory, then the `..data` symlink renamed over, which never names the
    /// file) are all seen, and a change to a neighbouring file costs one read of the rules.
    pub fn watch(self: &Arc<Self>) -> Result<Option<RulesWatcher>, GateError> {
        use notify::Watcher;
        let Some(path) = self.config.rules_path.clone() else {
            return Ok(None);
        };
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        let resolved_dir = std::fs::canonicalize(&path)
            .ok()
            .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
            .filter(|d| std::fs::canonicalize(&dir).ok().as_ref() != Some(d));
        let gate = Arc::downgrade(self);
        // One pending change is all the reloader needs to know of, so the channel holds one.
        let (changed_tx, changed_rx) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("rules-reload".into())
            .spawn(move || reload_when_quiet(&changed_rx, &gate))
            .map_err(|e| GateError::Watch(notify::Error::io(e)))?;
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, notify::EventKind::Access(_)) {
                    return;
                }
                let _ = changed_tx.try_send(());
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        if let Some(resolved) = resolved_dir {
            watcher.watch(&resolved, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(Some(RulesWatcher { _watcher: watcher }))
    }

    /// The action for the kind at `kind` in [`PII_KINDS`].
    fn action(&self, kind: usize) -> PiiAction {
        self.actions[kind]
    }

    /// Classifies `env` in place (see the module doc).
    pub fn classify(&self, env: &mut Envelope) {
        let _classifying = Classifying::enter();
        if self.panics_on.is_some_and(|selects| selects(env)) {
            panic!("injected gate fault on envelope {}", env.id);
        }
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(text) = env.text.take() else {
            let d = rules.decide(&env.source, "");
            env.tags = d.tags;
            env.intent_hint = d.intent;
            env.routing_hints = d.routing;
            return;
        };
        env.text_hash = Some(crate::chain::hex32(&Sha256::digest(text.as_bytes()).into()));
        env.char_len = Some(text.chars().count() as u64);
        let mut scan_end = text.len().min(self.config.scan_bytes_max);
        while !text.is_char_boundary(scan_end) {
            scan_end -= 1;
        }
        let scanned = &text[..scan_end];
        let matches = self.detector.find_in_order(scanned, &self.match_order);
        let mut found = [0u64; PII_KINDS.len()];
        // Unscanned bytes cannot be rewritten or vouched for (see the module doc).
        let mut drop_text = self.rewrites_or_drops && scan_end < text.len();
        for m in &matches {
            found[m.kind] += 1;
            drop_text |= self.action(m.kind) == PiiAction::DropText;
        }
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (kind, &n) in found.iter().enumerate() {
            if n > 0 {
                self.pii_found[kind].inc_by(n);
                counts.insert(PII_KINDS[kind].to_string(), n);
            }
        }
        let d = rules.decide(&env.source, scanned);
        env.tags = d.tags;
        env.intent_hint = d.intent;
        env.routing_hints = d.routing;
        env.pii = counts;
        if drop_text {
            env.text = None;
            env.summary_extractive = None;
            return;
        }
        let rewrites = matches
            .iter()
            .any(|m| matches!(self.action(m.kind), PiiAction::Mask | PiiAction::Hash));
        if !rewrites {
            // The text goes on as it came (the default `tag` policy): no copy.
            env.summary_extractive = summary::summarize(&text, self.config.summary_chars_max);
            env.text = Some(text);
            return;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for m in &matches {
            let kind = PII_KINDS[m.kind];
            let replacement = match self.action(m.kind) {
                PiiAction::Tag | PiiAction::DropText => continue,
                PiiAction::Mask => format!("[{}]", kind.to_uppercase()),
                PiiAction::Hash => {
                    let mac = hmac_sha256(
                        self.config.pii_hash_key.as_bytes(),
                        &text.as_bytes()[m.start..m.end],
                    );
                    format!("[{}:{}]", kind.to_uppercase(), &hex::encode(mac)[..16])
                }
            };
            out.push_str(&text[at..m.start]);
            out.push_str(&replacement);
            at = m.end;
        }
        out.push_str(&text[at..]);
        env.summary_extractive = summary::summarize(&out, self.config.summary_chars_max);
        env.text = Some(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tag: &str) -> String {
        format!("[[rule]]\nname = \"r\"\nkeywords = [\"alpha\"]\ntags = [\"{tag}\"]\n")
    }

    /// A gate on `rules_path`, watching it.
    fn watched_gate(rules_path: &std::path::Path) -> (Arc<Gate>, RulesWatcher) {
        let cfg = GateConfig {
            rules_path: Some(rules_path.to_path_buf()),
            ..GateConfig::default()
        };
        let g = Arc::new(Gate::new(&cfg, Arc::new(Metrics::new())).unwrap());
        let watcher = g.watch().unwrap().expect("a rules file is watched");
        (g, watcher)
    }

    /// Polls until the gate's rules carry `tag`; fails after a minute. A filesystem event has
    /// nothing to await from here, so it is looked for every few ms.
    fn wait_for_tag(g: &Gate, tag: &str) {
        let started = std::time::Instant::now();
        while classify(g, "alpha").tags != vec![tag.to_string()] {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the rules never changed to tag {tag:?} (generation {})",
                g.rules_generation()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_configmap_update_that_swaps_the_data_symlink_is_reloaded() {
        // The layout the kubelet writes: rules.toml -> ..data/rules.toml, ..data -> ..<ts>/;
        // an update writes a new ..<ts>/ and renames a new symlink over ..data, and never
        // touches the name rules.toml.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..ts1")).unwrap();
        std::fs::write(d.join("..ts1/rules.toml"), rule("old")).unwrap();
        std::os::unix::fs::symlink("..ts1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/rules.toml", d.join("rules.toml")).unwrap();
        let (g, _watcher) = watched_gate(&d.join("rules.toml"));
        assert_eq!(classify(&g, "alpha").tags, vec!["old"]);
        std::fs::create_dir(d.join("..ts2")).unwrap();
        std::fs::write(d.join("..ts2/rules.toml"), rule("new")).unwrap();
        std::os::unix::fs::symlink("..ts2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..ts1")).unwrap();
        wait_for_tag(&g, "new");
        assert_eq!(g.rules_generation(), 2);
    }

    #[test]
    fn a_rules_path_symlinked_into_another_directory_is_reloaded_when_its_target_is_replaced() {
        let config = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("rules.toml"), rule("old")).unwrap();
        let link = config.path().join("rules.toml");
        std::os::unix::fs::symlink(shared.path().join("rules.toml"), &link).unwrap();
        let (g, _watcher) = watched_gate(&link);
        std::fs::write(shared.path().join("rules.toml.new"), rule("new")).unwrap();
        std::fs::rename(
            shared.path().join("rules.toml.new"),
            shared.path().join("rules.toml"),
        )
        .unwrap();
        wait_for_tag(&g, "new");
    }

    #[test]
    fn a_change_beside_the_rules_file_does_not_reload_rules_that_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule("a")).unwrap();
        let cfg = GateConfig {
            rules_path: Some(path.clone()),
            ..GateConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let g = Gate::new(&cfg, metrics.clone()).unwrap();
        std::fs::write(dir.path().join("spoolgate.toml"), "# a neighbour\n").unwrap();
        assert!(!g.reload_if_changed(), "same rules: nothing to do");
        assert_eq!(g.rules_generation(), 1);
        std::fs::write(&path, rule("b")).unwrap();
        assert!(g.reload_if_changed());
        assert_eq!(g.rules_generation(), 2);
        assert!(!g.reload_if_changed());
        // A file that cannot be read is reported once, not at every change beside it.
        std::fs::remove_file(&path).unwrap();
        assert!(g.reload_if_changed());
        assert!(!g.reload_if_changed());
        let errors = metrics
            .gate_rules_reloads_total
            .with_label_values(&["error"])
            .get();
        assert_eq!(errors, 1);
        assert_eq!(
            classify(&g, "alpha").tags,
            vec!["b"],
            "the last good rules stay"
        );
    }

    #[test]
    fn a_rules_file_over_its_bound_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        let mut text = "rule = []\n".to_string();
        text.push_str(&"#".repeat(rules::RULES_FILE_BYTES_MAX as usize));
        std::fs::write(&path, &text).unwrap();
        let err = load_rules(&path, true, None).unwrap_err().to_string();
        assert!(err.contains("over the limit of 8388608 bytes"), "{err}");
        std::fs::write(&path, "rule = []\n").unwrap();
        assert_eq!(load_rules(&path, true, None).unwrap().len(), 0);
    }

    fn gate(pii: &[(&str, PiiAction)]) -> Gate {
        let cfg = GateConfig {
            pii: pii.iter().map(|(k, a)| (k.to_string(), *a)).collect(),
            ..GateConfig::default()
        };
        Gate::new(&cfg, Arc::new(Metrics::new())).unwrap()
    }

    fn classify(g: &Gate, text: &str) -> Envelope {
        let mut e = Envelope {
            source: "s".into(),
            text: Some(text.into()),
            ..Default::default()
        };
        g.classify(&mut e);
        e
    }

    #[test]
    fn a_reload_refuses_an_empty_rules_file_and_keeps_the_rules_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(
            &path,
            "[[rule]]\nname = \"a\"\nkeywords = [\"alpha\"]\ntags = [\"t\"]\n",
        )
        .unwrap();
        let cfg = GateConfig {
            rules_path: Some(path.clone()),
            ..GateConfig::default()
        };
        let g = Gate::new(&cfg, Arc::new(Metrics::new())).unwrap();
        assert_eq!(classify(&g, "alpha").tags, vec!["t"]);
        // What a rewrite in place shows for a moment.
        std::fs::write(&path, " \n").unwrap();
        let err = g.reload().unwrap_err().to_string();
        assert!(err.contains("rule = []"), "{err}");
        assert_eq!(classify(&g, "alpha").tags, vec!["t"]);
        // No rules, said on purpose, is taken.
        std::fs::write(&path, "rule = []\n").unwrap();
        g.reload().unwrap();
        assert!(classify(&g, "alpha").tags.is_empty());
    }

    #[test]
    fn the_daemons_gate_refuses_rules_routing_to_a_sink_not_configured_at_start_and_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        let rule = |sink: &str| {
            format!("[[rule]]\nname = \"a\"\nkeywords = [\"alpha\"]\nsink = \"{sink}\"\n")
        };
        let cfg = GateConfig {
            rules_path: Some(path.clone()),
            ..GateConfig::default()
        };
        let sinks: BTreeSet<String> = ["default".to_string(), "audit".to_string()].into();
        std::fs::write(&path, rule("audti")).unwrap();
        let err = Gate::with_sinks(&cfg, Arc::new(Metrics::new()), sinks.clone())
            .err()
            .expect("a misspelt sink must refuse the rules")
            .to_string();
        assert!(err.contains("sink \"audti\" is not configured"), "{err}");
        std::fs::write(&path, rule("audit")).unwrap();
        let g = Gate::with_sinks(&cfg, Arc::new(Metrics::new()), sinks).unwrap();
        assert_eq!(
            classify(&g, "alpha")
                .routing_hints
                .get("sink")
                .map(String::as_str),
            Some("audit")
        );
        std::fs::write(&path, rule("audti")).unwrap();
        let err = g.reload().unwrap_err().to_string();
        assert!(err.contains("sink \"audti\" is not configured"), "{err}");
        assert_eq!(
            classify(&g, "alpha")
                .routing_hints
                .get("sink")
                .map(String::as_str),
            Some("audit"),
            "the previous rules stay in force"
        );
        // A gate built without the sinks (tests, benches) takes any name.
        std::fs::write(&path, rule("audti")).unwrap();
        assert!(Gate::new(&cfg, Arc::new(Metrics::new())).is_ok());
    }

    #[test]
    fn a_private_key_is_masked_whole_and_without_an_end_line_to_the_end_of_the_text() {
        let key = format!(
            "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEA".repeat(10)
        );
        let g = gate(&[("private_key", PiiAction::Mask)]);
        let e = classify(&g, &format!("key: {key} and after."));
        assert_eq!(e.text.as_deref(), Some("key: [PRIVATE_KEY] and after."));
        let cut = &key[..120];
        let e = classify(&g, &format!("key: {cut}"));
        assert_eq!(e.text.as_deref(), Some("key: [PRIVATE_KEY]"));
    }

    #[test]
    fn a_text_past_the_scan_limit_is_not_forwarded_under_a_policy_that_rewrites_or_drops() {
        // An email the limit cuts, a private key whose BEGIN line it cuts, and an SSN wholly
        // past it: none of them may go on in clear under `mask`.
        let text = format!(
            "{}jane@example.com -----BEGIN RSA PRIVATE KEY-----\nMIIEow\n ssn 123-45-6789.",
            "x".repeat(56)
        );
        let limited = |pii_default| GateConfig {
            pii_default,
            scan_bytes_max: 64,
            ..GateConfig::default()
        };
        let g = Gate::new(&limited(PiiAction::Mask), Arc::new(Metrics::new())).unwrap();
        let e = classify(&g, &text);
        assert_eq!((e.text, e.summary_extractive), (None, None));
        assert!(e.text_hash.is_some());
        // Under `tag` alone nothing is rewritten, so the text goes on whole.
        let g = Gate::new(&limited(PiiAction::Tag), Arc::new(Metrics::new())).unwrap();
        assert_eq!(classify(&g, &text).text.as_deref(), Some(text.as_str()));
        // Within the limit, the same policy rewrites as usual.
        let g = gate(&[("email", PiiAction::Mask)]);
        assert_eq!(
            classify(&g, "mail jane@example.com").text.as_deref(),
            Some("mail [EMAIL]")
        );
    }

    #[test]
    fn an_unterminated_private_key_under_tag_does_not_shield_a_stricter_kind() {
        let text = "See doc on -----BEGIN PRIVATE KEY----- headers. Customer jane@example.com, \
                    card 4111 1111 1111 1111, ssn 123-45-6789.";
        let g = gate(&[
            ("email", PiiAction::DropText),
            ("card", PiiAction::Mask),
            ("us_ssn", PiiAction::Mask),
        ]);
        let e = classify(&g, text);
        assert_eq!(e.text, None, "{:?}", e.pii);
        assert_eq!(e.pii.get("email"), Some(&1));
        // Without the drop, the masks apply inside the key's span too.
        let g = gate(&[("card", PiiAction::Mask), ("us_ssn", PiiAction::Mask)]);
        let out = classify(&g, text).text.unwrap();
        assert!(
            out.contains("[CARD]") && out.contains("[US_SSN]") && !out.contains("4111"),
            "{out}"
        );
    }

    #[test]
    fn tag_counts_and_keeps_the_text() {
        let e = classify(&gate(&[]), "Mail a@b.io or c@d.io.");
        assert_eq!(e.pii.get("email"), Some(&2));
        assert_eq!(e.text.as_deref(), Some("Mail a@b.io or c@d.io."));
        assert_eq!(e.char_len, Some(22));
        assert_eq!(e.text_hash.as_deref().map(str::len), Some(64));
    }

    #[test]
    fn mask_replaces_matches_and_the_summary_never_shows_them() {
        let e = classify(
            &gate(&[("email", PiiAction::Mask)]),
            "Write to jane@example.com today.",
        );
        assert_eq!(e.text.as_deref(), Some("Write to [EMAIL] today."));
        assert_eq!(
            e.summary_extractive.as_deref(),
            Some("Write to [EMAIL] today.")
        );
    }

    #[test]
    fn hash_replaces_matches_with_a_keyed_digest() {
        let e = classify(&gate(&[("email", PiiAction::Hash)]), "jane@example.com");
        let t = e.text.unwrap();
        assert!(
            t.starts_with("[EMAIL:") && t.len() == "[EMAIL:]".len() + 16,
            "{t}"
        );
        assert_eq!(
            t,
            classify(&gate(&[("email", PiiAction::Hash)]), "jane@example.com")
                .text
                .unwrap()
        );
    }

    #[test]
    fn drop_text_forwards_only_the_hash() {
        let e = classify(&gate(&[("us_ssn", PiiAction::DropText)]), "ssn 123-45-6789");
        assert_eq!(e.text, None);
        assert_eq!(e.summary_extractive, None);
        assert!(e.text_hash.is_some());
    }

    #[test]
    fn classification_is_deterministic() {
        let g = gate(&[("email", PiiAction::Mask)]);
        assert_eq!(classify(&g, "x a@b.io. y"), classify(&g, "x a@b.io. y"));
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    mod any_text {
        use super::*;
        use proptest::prelude::*;

        /// Pieces that look like every PII kind, sentence ends, multi-byte characters and
        /// arbitrary strings, so generated texts hit the detectors, their checks, the rewrite
        /// and the summary's boundaries.
        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("a@b.co".to_string()),
                Just("4111 1111 1111 1111".to_string()),
                Just("4111 1111 1111 1112".to_string()),
                Just("::1".to_string()),
                Just("fe80::1:2".to_string()),
                Just("192.168.0.1".to_string()),
                Just("+1 415 555 0132".to_string()),
                Just("DE89 3704 0044 0532 0130 00".to_string()),
                Just("123-45-6789".to_string()),
                Just("AKIAABCDEFGHIJKLMNOP".to_string()),
                Just("eyJhbGciOiJI.eyJzdWIiOiIx.SflKxwRJSMeK".to_string()),
                Just("-----BEGIN RSA PRIVATE KEY-----".to_string()),
                Just("é".to_string()),
                Just("—".to_string()),
                Just(". ".to_string()),
                Just("!".to_string()),
                Just("? ".to_string()),
                Just(" ".to_string()),
                Just("\n".to_string()),
                "[0-9 .:@+-]{0,12}",
                any::<String>(),
            ]
        }

        fn action() -> impl Strategy<Value = PiiAction> {
            prop_oneof![
                Just(PiiAction::Tag),
                Just(PiiAction::Mask),
                Just(PiiAction::Hash),
                Just(PiiAction::DropText),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

            /// A panic here would fail every worker that tried the record and stall its slot;
            /// a result that differed between two runs would break "forwarded twice, forwarded
            /// identically" for records gated again after a crash.
            #[test]
            fn classification_never_panics_is_deterministic_and_keeps_its_bounds(
                pieces in proptest::collection::vec(piece(), 0..40),
                email in action(),
                card in action(),
                ipv6 in action(),
                default in action(),
                summary_chars_max in 0usize..400,
                scan_bytes_max in 0usize..300,
            ) {
                let text: String = pieces.concat();
                let cfg = GateConfig {
                    pii: [("email", email), ("card", card), ("ipv6", ipv6)]
                        .iter()
                        .map(|(k, a)| (k.to_string(), *a))
                        .collect(),
                    pii_default: default,
                    summary_chars_max,
                    scan_bytes_max,
                    ..GateConfig::default()
                };
                let g = Gate::new(&cfg, Arc::new(Metrics::new())).unwrap();
                let e = classify(&g, &text);
                prop_assert_eq!(&e, &classify(&g, &text));
                prop_assert_eq!(e.char_len, Some(text.chars().count() as u64));
                let text_hash = crate::chain::hex32(&Sha256::digest(text.as_bytes()).into());
                prop_assert_eq!(e.text_hash.as_deref(), Some(text_hash.as_str()));
                if let Some(summary) = &e.summary_extractive {
                    prop_assert!(summary.chars().count() <= summary_chars_max.max(1));
                }
                let found: u64 = e.pii.values().sum();
                let unscanned_refused = g.rewrites_or_drops && text.len() > scan_bytes_max;
                if found == 0 && !unscanned_refused {
                    prop_assert_eq!(e.text.as_deref(), Some(text.as_str()));
                }
                let drops = e.pii.keys().any(|k| g.actions[PII_KINDS.iter().position(|p| p == k).unwrap()] == PiiAction::DropText);
                prop_assert_eq!(e.text.is_none(), drops || unscanned_refused);
                // A text forwarded as it came holds no match of a kind under `drop_text`, even
                // searched for that kind first: no other kind's match shields one.
                if e.text.as_deref() == Some(text.as_str()) {
                    for (kind, action) in g.actions.iter().enumerate() {
                        if *action != PiiAction::DropText {
                            continue;
                        }
                        let mut order: Vec<usize> = (0..PII_KINDS.len()).filter(|&k| k != kind).collect();
                        order.insert(0, kind);
                        let found_first = g.detector.find_in_order(&text, &order);
                        prop_assert!(!found_first.iter().any(|m| m.kind == kind), "{} forwarded in {:?}", PII_KINDS[kind], text);
                    }
                }
            }
        }
    }
}
