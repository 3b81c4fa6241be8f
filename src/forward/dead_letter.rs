//! The dead-letter directory: batches a sink rejected for good, one JSON file each, with the
//! sink, the status, the reason and the records, written with fdatasync before the batch is
//! tombstoned. Files are never deleted by the daemon; an operator inspects and re-sends
//! (`spoolgate dead-letter resend`, [`super::dead_letter_resend`]) or
//! removes them, and spoolgate logs every file it writes, so growth is visible.
//!
//! Bound: `forward.dead_letter_bytes_max`, kept by a [`DirBound`] (the directory holds at
//! most the bound plus one file). Once it is reached a write is refused with
//! [`DeadLetterError::Full`] and nothing is written: the worker keeps the batch pending and
//! retries it with back-off, so a sink that rejects everything holds back only its own slots'
//! records in the spool (whose quota then answers 429) instead of moving them into a directory
//! that grows until the disk is full. Removing files makes room again. A filesystem with no
//! room (ENOSPC) is answered the same way, with [`DeadLetterError::NoSpace`], and the file it
//! cut short is removed.
//!
//! Whole or absent, across a crash too: a letter is written under a temporary name
//! (`.dl-….json.tmp`), fdatasync'd, renamed to its `dl-….json` name, and the directory is
//! fsync'd, all before the batch is tombstoned. A kill before the rename leaves only a
//! temporary file, whose batch is still pending and is dead-lettered again by the next run;
//! [`DeadLetter::new`] removes such leftovers. The directory is made to exist durably before
//! the first letter ([`DurableDir`]).
//!
//! Writes block (a write, two fsyncs, a rename, sometimes a directory scan); callers on the
//! async runtime run them through [`super::run_blocking`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

use super::dir_bound::{BoundError, DirBound};
use super::durable_dir::DurableDir;
use crate::chain::SharedRecord;
use crate::spool::Position;

/// Why a batch was not dead-lettered.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(
        "dead-letter directory full: it holds {used_bytes} bytes, at or past \
         forward.dead_letter_bytes_max = {bytes_max}"
    )]
    Full { used_bytes: u64, bytes_max: u64 },
    /// The filesystem had no room (ENOSPC); nothing of the file is left. Like `Full`, a
    /// condition to wait out, not a failure of the worker.
    #[error("dead-letter write failed, the filesystem is full: {0}")]
    NoSpace(std::io::Error),
    #[error("dead-letter write failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct DeadLetter {
    dir: PathBuf,
    counter: Arc<AtomicU64>,
    bound: Arc<DirBound>,
    /// Made to exist durably before the first letter (see `forward::durable_dir`).
    durable_dir: Arc<DurableDir>,
}

/// Gives the whole letter at `temporary` its name `path`, never replacing a letter of that
/// name (a restarted container is pid 1 again, and the clock may have stepped back), which may
/// hold records already tombstoned: a clash fails the write (`AlreadyExists`), and the retry
/// takes the next number. A rename that refuses to replace (`renameat2` with `NOREPLACE`)
/// where the filesystem has it; else a hard link and an unlink; where neither exists (vfat,
/// some FUSE filesystems), a plain rename after looking that the name is free, which only a
/// second writer in the same directory at the same moment could defeat.
fn publish(temporary: &Path, path: &Path) -> std::io::Result<()> {
    use rustix::io::Errno;
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(
        cwd,
        temporary,
        cwd,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST) => return Err(std::io::ErrorKind::AlreadyExists.into()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::hard_link(temporary, path) {
        Ok(()) => {
            // Published; a temporary name left behind is removed at the next start.
            let _ = std::fs::remove_file(temporary);
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(code) if code == Errno::PERM.raw_os_error()
                    || code == Errno::NOSYS.raw_os_error()
                    || code == Errno::OPNOTSUPP.raw_os_error()
            ) =>
        {
            return Err(e)
        }
        Err(_) => {}
    }
    if path.exists() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(temporary, path)
}

/// The name a letter has until it is whole.
fn is_temporary(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with(".dl-") && n.ends_with(".json.tmp"))
}

impl DeadLetter {
    /// Removes what a killed write left under a temporary name (its batch is still pending).
    pub fn new(dir: &Path, bytes_max: u64) -> DeadLetter {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if is_temporary(&entry.file_name()) {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            tracing::info!(file = %entry.path().display(), "removed a dead letter a crash left unfinished; its batch is still pending")
                        }
                        Err(e) => {
                            tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an unfinished dead letter")
                        }
                    }
                }
            }
        }
        DeadLetter {
            dir: dir.to_path_buf(),
            counter: Arc::new(AtomicU64::new(0)),
            bound: Arc::new(DirBound::new(dir, bytes_max, |_| true)),
            durable_dir: Arc::new(DurableDir::new(dir)),
        }
    }

    /// Reports the directory's size through `gauge`, measured now and kept current.
    pub fn with_gauge(self, gauge: IntGauge) -> DeadLetter {
        let bytes_max = self.bound.bytes_max();
        DeadLetter {
            bound: Arc::new(DirBound::new(&self.dir, bytes_max, |_| true).with_gauge(gauge)),
            ..self
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_json(&self, body: &serde_json::Value) -> Result<PathBuf, DeadLetterError> {
        let text = serde_json::to_string_pretty(body).map_err(std::io::Error::from)?;
        self.bound
            .write(text.len() as u64, || self.create(&text))
            .map_err(|e| match e {
                BoundError::Full {
                    used_bytes,
                    bytes_max,
                } => DeadLetterError::Full {
                    used_bytes,
                    bytes_max,
                },
                BoundError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                    DeadLetterError::NoSpace(e)
                }
                BoundError::Io(e) => DeadLetterError::Io(e),
            })
    }

    fn create(&self, text: &str) -> std::io::Result<PathBuf> {
        self.durable_dir.ensure()?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "dl-{}-{}-{n}.json",
            crate::ingest::now_ms(),
            std::process::id()
        );
        let path = self.dir.join(&name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let written = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&temporary)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_data()))
            .and_then(|()| publish(&temporary, &path));
        if let Err(e) = written {
            // A file cut short by a full disk would count against the bound for nothing, and
            // each retry would leave another; the batch is still pending, so nothing is lost
            // by removing it. If even that fails, the error is the write's.
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// Keeps a batch a sink rejected.
    pub fn write(
        &self,
        sink: &str,
        status: u16,
        reason: &str,
        records: &[SharedRecord],
    ) -> Result<PathBuf, DeadLetterError> {
        self.write_json(&serde_json::json!({
            "sink": sink,
            "status": status,
            "reason": reason,
            "at_ms": crate::ingest::now_ms(),
            "records": records,
        }))
    }

    /// Keeps an envelope that could not be sealed (its gated form outgrew a spool record), as
    /// the gate left it.
    pub fn write_unsealable(
        &self,
        position: Position,
        reason: &str,
        envelope: &crate::envelope::Envelope,
    ) -> Result<PathBuf, DeadLetterError> {
        let envelope = serde_json::to_value(envelope).map_err(std::io::Error::from)?;
        self.write_unsent(position, reason, "envelope", envelope)
    }

    /// Keeps an envelope record that could not be decoded, as hex.
    pub fn write_raw(
        &self,
        position: Position,
        reason: &str,
        payload: &[u8],
    ) -> Result<PathBuf, DeadLetterError> {
        self.write_unsent(position, reason, "payload_hex", hex::encode(payload).into())
    }

    /// A letter for one envelope record that never reached a sink: its position, the reason,
    /// and what is kept of it under `field`.
    fn write_unsent(
        &self,
        position: Position,
        reason: &str,
        field: &str,
        kept: serde_json::Value,
    ) -> Result<PathBuf, DeadLetterError> {
        let mut letter = serde_json::json!({
            "sink": null,
            "reason": reason,
            "position": position,
            "at_ms": crate::ingest::now_ms(),
        });
        letter[field] = kept;
        self.write_json(&letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(offset: u64) -> Position {
        Position { segment: 1, offset }
    }

    #[test]
    fn a_letter_for_a_record_that_never_reached_a_sink_names_its_position_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(&dir.path().join("dl"), 1 << 20);
        let read = |path: PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let raw = read(
            dl.write_raw(position(8), "bad msgpack", &[0xc1, 0x01])
                .unwrap(),
        );
        assert_eq!(raw["payload_hex"], "c101");
        let envelope = crate::envelope::Envelope {
            id: "e-1".into(),
            source: "svc".into(),
            ..Default::default()
        };
        let gated = read(
            dl.write_unsealable(position(16), "too large", &envelope)
                .unwrap(),
        );
        assert_eq!(gated["envelope"]["id"], "e-1");
        for (letter, offset, reason) in [(raw, 8, "bad msgpack"), (gated, 16, "too large")] {
            assert_eq!(letter["sink"], serde_json::Value::Null);
            assert_eq!(letter["reason"], reason);
            assert_eq!(letter["position"]["offset"], offset);
            assert!(letter["at_ms"].as_u64().is_some());
        }
    }

    #[test]
    fn a_letter_a_kill_left_unfinished_is_removed_at_start_and_finished_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path(), 1 << 20);
        let whole = dl.write_raw(position(0), "bad", &[1, 2]).unwrap();
        let unfinished = dir.path().join(".dl-1-2-3.json.tmp");
        std::fs::write(&unfinished, b"{\"sink\": nu").unwrap();
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, b"the operator's").unwrap();
        let _restarted = DeadLetter::new(dir.path(), 1 << 20);
        assert!(!unfinished.exists());
        assert!(whole.exists() && other.exists());
        // What a letter is named and holds once written: no temporary name is left.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let letter: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&whole).unwrap()).unwrap();
        assert_eq!(letter["payload_hex"], "0102");
    }

    #[test]
    fn a_letter_never_replaces_one_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = dir.path().join("dl-1-1-0.json");
        std::fs::write(&earlier, b"{\"reason\":\"first\"}").unwrap();
        let temporary = dir.path().join(".dl-1-1-0.json.tmp");
        std::fs::write(&temporary, b"{\"reason\":\"second\"}").unwrap();
        let err = publish(&temporary, &earlier).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&earlier).unwrap(), b"{\"reason\":\"first\"}");
        // Under a free name it is published, and the temporary name is gone.
        let free = dir.path().join("dl-1-1-1.json");
        publish(&temporary, &free).unwrap();
        assert!(!temporary.exists());
        assert_eq!(std::fs::read(&free).unwrap(), b"{\"reason\":\"second\"}");
    }

    #[test]
    fn a_directory_removed_while_running_is_made_again_for_the_next_letter() {
        let dir = tempfile::tempdir().unwrap();
        let dl_dir = dir.path().join("dl");
        let dl = DeadLetter::new(&dl_dir, 1 << 20);
        dl.write_raw(position(0), "bad", &[1]).unwrap();
        std::fs::remove_dir_all(&dl_dir).unwrap();
        let path = dl.write_raw(position(1), "bad", &[2]).unwrap();
        assert_eq!(path.parent(), Some(dl_dir.as_path()));
    }

    #[test]
    fn a_directory_that_does_not_exist_yet_is_made_with_its_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/dl");
        let dl = DeadLetter::new(&nested, 1 << 20);
        let path = dl.write_raw(position(0), "bad", &[7]).unwrap();
        assert_eq!(path.parent(), Some(nested.as_path()));
    }

    #[test]
    fn once_the_bound_is_reached_a_write_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dl_dir = dir.path().join("dl");
        let dl = DeadLetter::new(&dl_dir, 400);
        // The first file takes the directory past the bound (it was empty when the write was
        // checked); the next write is refused.
        let first = dl.write_raw(position(0), "bad", &[0u8; 200]).unwrap();
        let first_bytes = std::fs::metadata(&first).unwrap().len();
        assert!(first_bytes > 400, "{first_bytes}");
        match dl.write_raw(position(1), "bad", &[0u8; 200]) {
            Err(DeadLetterError::Full {
                used_bytes,
                bytes_max,
            }) => {
                assert_eq!(used_bytes, first_bytes);
                assert_eq!(bytes_max, 400);
            }
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(&dl_dir).unwrap().count(), 1);
    }

    #[test]
    fn files_already_in_the_directory_count_against_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("earlier.json"), vec![b'x'; 1_000]).unwrap();
        let gauge = IntGauge::new("dl_bytes", "test").unwrap();
        let dl = DeadLetter::new(dir.path(), 1_000).with_gauge(gauge.clone());
        assert_eq!(gauge.get(), 1_000);
        let err = dl.write_raw(position(0), "bad", &[0u8; 8]).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds 1000 bytes, at or past forward.dead_letter_bytes_max = 1000"),
            "{err}"
        );
        // Just below the bound, a write of any size is taken.
        std::fs::write(dir.path().join("earlier.json"), vec![b'x'; 999]).unwrap();
        dl.write_raw(position(0), "bad", &[0u8; 8]).unwrap();
    }

    #[test]
    fn removing_files_makes_room_for_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let gauge = IntGauge::new("dl_bytes", "test").unwrap();
        let dl = DeadLetter::new(dir.path(), 400).with_gauge(gauge.clone());
        let first = dl.write_raw(position(0), "bad", &[0u8; 200]).unwrap();
        assert_eq!(gauge.get() as u64, std::fs::metadata(&first).unwrap().len());
        assert!(dl.write_raw(position(1), "bad", &[0u8; 200]).is_err());
        std::fs::remove_file(&first).unwrap();
        let second = dl.write_raw(position(1), "bad", &[0u8; 200]).unwrap();
        assert_eq!(
            gauge.get() as u64,
            std::fs::metadata(&second).unwrap().len()
        );
    }
}
