//! The embedded default sink: JSON lines (`{stream, seq, prev_hash, hash, slot, envelope}`) in
//! `out-<20-digit index>.jsonl` files, rotated at `file_bytes_max`, each batch written whole and
//! fdatasync'd before the sink reports success. On start it continues after the newest file.
//! A failed write is retryable; a batch that was half written before a crash is written again
//! whole, so a reader may see a record twice, always identically (verify accepts that).
//!
//! Workers deliver concurrently: each serialises its batch without a lock, then writes it
//! whole under the sink's lock (so lines never interleave) and fdatasyncs outside it, where one
//! fdatasync confirms every batch written before it (group commit; a failed write or fdatasync
//! fails every batch written into that file, since Linux reports a writeback error only once).
//!
//! Bound: `dir_bytes_max`, kept by a [`DirBound`] over the sink's own files (its directory
//! holds at most the bound plus one batch). Once it is reached the sink refuses batches with a
//! retryable error and writes nothing; records then wait in the spool (whose quota answers 429
//! in time) until whoever consumes the files removes closed ones. A sidecar must not fill its
//! host's disk with output nobody takes.
//!
//! A crash (or a failed write) can leave a partial last line. Nothing in it was confirmed, so
//! before appending to a file the sink cuts it back to its last newline; otherwise the next
//! batch would be glued to the fragment and the file would hold a line no reader can parse.
//! Only the newest file can hold one: a file is fdatasync'd whole before the next one is
//! created, and at start the sink also cuts the file before the newest (as runs before that
//! rule could leave it). After a failed fdatasync the sink goes on in a new file rather than
//! the failed one, whose unsynced pages Linux may have dropped (a hole of stale bytes that
//! later appends would sit behind), and cuts the failed one back to its synced bytes.
//!
//! Removed under it: a file (or the directory) an operator or consumer deletes while the sink
//! writes to it would take confirmed lines with it, as the open handle keeps writing and
//! syncing an unlinked file. The sink looks at the file's link count after each fdatasync and
//! fails the batch if it is 0; the retry writes it to a new file (recreating the directory if
//! need be), so nothing confirmed is lost.
//!
//! Blocking: writes and fdatasyncs run on the worker's thread (through `run_blocking`), so a
//! hung filesystem hangs the worker without its deadline firing (the deadline is a timer on
//! the same task). That is left as is: a secondary worker would hang on the same filesystem.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::dir_bound::{BoundError, DirBound};
use super::durable_dir::DurableDir;
use super::sink::{DeliverFuture, Sink, SinkError};
use crate::chain::SharedRecord;

/// One output file, shared by the writer that appended to it and whoever fdatasyncs it.
///
/// Group commit: batches are written one at a time under the sink's lock, but fdatasync runs
/// outside it, under `sync`, and covers everything written so far; a writer whose bytes an
/// earlier fdatasync already covered returns without its own. `failed` is set when a write or
/// fdatasync of this file fails, and from then on every writer whose bytes went into it fails
/// too: after a failed fdatasync Linux reports the error to one caller only, and a second
/// writer's fdatasync could return success for pages that were never written. It is an atomic
/// so a writer can look at it without waiting for an fdatasync in progress (which would stop
/// writes from overlapping syncs, and with it the group commit); a stale `false` there only
/// means the write goes to a file whose sync will then report the failure.
struct OutFile {
    index: u64,
    file: std::fs::File,
    /// Bytes whose write has returned; stored under the sink's lock after each write.
    written_bytes: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicBool,
    /// Set with `failed` when it was an fdatasync that failed (or found the file removed): the
    /// file is then left for a new one (see the module doc).
    sync_failed: std::sync::atomic::AtomicBool,
    sync: std::sync::Mutex<SyncState>,
}

#[derive(Default)]
struct SyncState {
    /// Bytes of the file known durable.
    synced_bytes: u64,
    /// Bytes whose page-cache pages were released after they became durable (always a multiple
    /// of [`PAGE_BYTES`], at most `synced_bytes`).
    released_bytes: u64,
}

/// The page size assumed when releasing written pages; on a kernel with larger pages the
/// release only drops fewer pages, it stays correct.
const PAGE_BYTES: u64 = 4096;

impl OutFile {
    /// The file's length: what was there when opened plus every write that returned.
    fn written(&self) -> u64 {
        self.written_bytes
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

pub struct FileSink {
    name: String,
    dir: PathBuf,
    file_bytes_max: u64,
    bound: DirBound,
    durable_dir: DurableDir,
    /// The lowest index the next file opened may have: the current one's, or past a file
    /// left after a failed fdatasync (0 before the first file is opened). Without it, a sink
    /// whose new file could not be created (or whose directory was removed, taking every
    /// file with it) would go back to the failed file, or start its numbering over.
    index_floor: AtomicU64,
    /// The file being appended to; `None` before the first batch and after a failure.
    current: Mutex<Option<Arc<OutFile>>>,
}

fn file_name(index: u64) -> String {
    format!("out-{index:020}.jsonl")
}

/// The index of an output file's name, `None` for any other name.
fn file_index(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?
        .strip_prefix("out-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

impl FileSink {
    pub fn open(
        name: &str,
        dir: &Path,
        file_bytes_max: u64,
        dir_bytes_max: u64,
    ) -> std::io::Result<FileSink> {
        let durable_dir = DurableDir::new(dir);
        durable_dir.ensure()?;
        Ok(FileSink {
            durable_dir,
            index_floor: AtomicU64::new(0),
            name: name.to_string(),
            dir: dir.to_path_buf(),
            file_bytes_max: file_bytes_max.max(1),
            bound: DirBound::new(dir, dir_bytes_max, |name| file_index(name).is_some()),
            current: Mutex::new(None),
        })
    }

    fn newest_index(&self) -> std::io::Result<u64> {
        let mut newest = 0;
        for e in std::fs::read_dir(&self.dir)? {
            if let Some(n) = file_index(&e?.file_name()) {
                newest = newest.max(n);
            }
        }
        Ok(newest)
    }

    /// Makes the output directory exist durably; if it was removed while running, it is made
    /// again, so that the retried batch has somewhere to go.
    fn ensure_dir(&self) -> std::io::Result<()> {
        if !self.dir.is_dir() {
            tracing::warn!(dir = %self.dir.display(), "file sink: the output directory is missing; making it");
        }
        self.durable_dir.ensure()
    }

    /// Cuts a partial last line from output file `index` if it exists: the file before the
    /// newest, at start, as a run before files were synced whole at rotation could leave it.
    fn trim_before_newest(&self, index: u64) -> std::io::Result<()> {
        let path = self.dir.join(file_name(index));
        if !path.exists() {
            return Ok(());
        }
        let trimmed = trim_partial_line(&path)?;
        if trimmed > 0 {
            tracing::warn!(
                file = %path.display(),
                bytes = trimmed,
                "file sink: cut a partial last line from the file before the newest (an unconfirmed write before a crash)"
            );
        }
        Ok(())
    }

    /// Opens output file `index` for appending, first cutting a partial last line. A cut after
    /// a write of this process failed (`after_failure`) is that write's own remains and is
    /// logged at debug: the worker has already said the sink is failing, and a full disk would
    /// otherwise log one warning per retry. A cut at first open is news: it is what an earlier
    /// run left when it crashed mid-write.
    fn open_index(&self, index: u64, after_failure: bool) -> std::io::Result<Arc<OutFile>> {
        self.ensure_dir()?;
        let path = self.dir.join(file_name(index));
        if path.exists() {
            let trimmed = trim_partial_line(&path)?;
            if trimmed > 0 && after_failure {
                tracing::debug!(
                    file = %path.display(),
                    bytes = trimmed,
                    "file sink: cut the partial line a failed write left"
                );
            } else if trimmed > 0 {
                tracing::warn!(
                    file = %path.display(),
                    bytes = trimmed,
                    "file sink: cut a partial last line (an unconfirmed write before a crash or failure)"
                );
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let bytes = file.metadata()?.len();
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(Arc::new(OutFile {
            index,
            file,
            written_bytes: std::sync::atomic::AtomicU64::new(bytes),
            failed: std::sync::atomic::AtomicBool::new(false),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            // What the file held when opened was made durable by the trim or by the run that
            // wrote it; only this handle's writes need syncing.
            sync: std::sync::Mutex::new(SyncState {
                synced_bytes: bytes,
                released_bytes: bytes - bytes % PAGE_BYTES,
            }),
        }))
    }

    /// Appends `buf` (whole lines) to the current file, opening or rotating it first. Returns
    /// the file and the length it has with `buf` in it; once the sink's files reach
    /// `dir_bytes_max`, a `StorageFull` error and nothing written. Runs under the sink's lock.
    fn write_lines(
        &self,
        current: &mut Option<Arc<OutFile>>,
        buf: &[u8],
    ) -> std::io::Result<(Arc<OutFile>, u64)> {
        self.bound
            .write(buf.len() as u64, || {
                self.write_lines_unbounded(current, buf)
            })
            .map_err(|e| match e {
                BoundError::Full {
                    used_bytes,
                    bytes_max,
                } => std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "output directory full: its files hold {used_bytes} bytes, at or past \
                         dir_bytes_max = {bytes_max}; remove delivered files (all but the \
                         newest) to make room"
                    ),
                ),
                BoundError::Io(e) => e,
            })
    }

    /// [`FileSink::write_lines`] once the directory's bound has allowed it.
    fn write_lines_unbounded(
        &self,
        current: &mut Option<Arc<OutFile>>,
        buf: &[u8],
    ) -> std::io::Result<(Arc<OutFile>, u64)> {
        let failed = current
            .as_ref()
            .filter(|c| c.failed.load(std::sync::atomic::Ordering::Acquire))
            .cloned();
        let first_open = current.is_none() && self.index_floor.load(Ordering::Acquire) == 0;
        if current.is_none() || failed.is_some() {
            // A fresh handle after a failure: the old one may be in an unknown state, and
            // reopening cuts a partial last line. After a failed fdatasync (not a failed write,
            // which a full disk causes once per retry) the sink moves on to a new file, and
            // never back to that one, whatever fails next (the floor below).
            if let Some(f) = failed
                .as_ref()
                .filter(|f| f.sync_failed.load(Ordering::Acquire))
            {
                leave_failed_file(f);
                self.index_floor.fetch_max(f.index + 1, Ordering::AcqRel);
            }
            *current = None;
            self.ensure_dir()?;
            let index = self
                .newest_index()?
                .max(1)
                .max(self.index_floor.load(Ordering::Acquire));
            if first_open && index > 1 {
                self.trim_before_newest(index - 1)?;
            }
            *current = Some(self.open_index(index, failed.is_some())?);
            self.index_floor.fetch_max(index, Ordering::AcqRel);
        }
        let needs_rotation = current.as_ref().is_some_and(|c| {
            c.written() > 0 && c.written() + buf.len() as u64 > self.file_bytes_max
        });
        if needs_rotation {
            // The file is made durable whole before the next one exists, so that a crash can
            // leave a partial line only in the newest file, where the next start cuts it. If
            // that fails, the file stays current, failed, and the next batch leaves it.
            let old = current.clone().expect("checked above");
            sync_up_to(&old, old.written())?;
            *current = Some(self.open_index(old.index + 1, false)?);
            self.index_floor.fetch_max(old.index + 1, Ordering::AcqRel);
        }
        let c = current.as_ref().expect("opened above");
        if let Err(e) = (&c.file).write_all(buf) {
            c.failed.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        // Only writers holding the sink's lock change the length, so this is not a race.
        let end = c.written() + buf.len() as u64;
        c.written_bytes
            .store(end, std::sync::atomic::Ordering::Release);
        Ok((c.clone(), end))
    }
}

/// Cuts a file whose fdatasync failed back to what was synced before, as the sink leaves it:
/// its later pages may have been dropped by the kernel, and whatever they read as after a
/// reboot must not sit in the middle of the output. Every writer of those bytes has failed
/// (the file is marked failed under its `sync` lock), so nothing confirmed is cut. Best effort:
/// if even that fails, the next start cuts a partial line of it if it is the file before the
/// newest.
fn leave_failed_file(out: &OutFile) {
    let synced = out
        .sync
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .synced_bytes;
    if let Err(e) = out.file.set_len(synced).and_then(|()| out.file.sync_data()) {
        tracing::warn!(file = file_name(out.index), error = %e, "file sink: could not cut a failed file back to its synced bytes");
    }
}

/// Makes `out` durable up to `end` bytes, or fails if anything written to it failed.
fn sync_up_to(out: &OutFile, end: u64) -> std::io::Result<()> {
    let mut state = out.sync.lock().unwrap_or_else(|p| p.into_inner());
    if out.failed.load(std::sync::atomic::Ordering::Acquire) {
        return Err(std::io::Error::other(
            "an earlier write or fdatasync of this file failed",
        ));
    }
    if state.synced_bytes >= end {
        return Ok(());
    }
    // Everything written before this call, including batches of writers still on their way
    // here, is covered by this fdatasync: they will find their bytes synced and return.
    let written = out.written();
    debug_assert!(
        written >= end,
        "a writer's bytes are counted before it syncs"
    );
    // A file removed since it was opened is synced as happily as any, and its lines would go
    // with it once the handle closes: that is a failed batch, not a confirmed one.
    let synced = out.file.sync_data().and_then(|()| {
        use std::os::unix::fs::MetadataExt;
        if out.file.metadata()?.nlink() == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "output file {} was removed while being written",
                    file_name(out.index)
                ),
            ));
        }
        Ok(())
    });
    match synced {
        Ok(()) => {
            state.synced_bytes = written;
            release_pages(out, &mut state);
            Ok(())
        }
        Err(e) => {
            // Set while holding `sync`: a writer waiting for it sees the failure.
            out.sync_failed
                .store(true, std::sync::atomic::Ordering::Release);
            out.failed.store(true, std::sync::atomic::Ordering::Release);
            Err(e)
        }
    }
}

/// Drops the durable whole pages of `out` from the page cache. spoolgate never reads its
/// output back, and a sidecar should not fill its host's page cache with it: the memory belongs
/// to the services it runs next to. Released pages are also the ones the next writes reuse,
/// which on a host that has not touched all its memory yet (a fresh VM) saves a host page
/// fault per page. The partial last page stays cached, so the next write does not have to read
/// it back from disk first. This is advice: if the kernel refuses it, nothing is lost but the
/// memory, so the error is only logged.
fn release_pages(out: &OutFile, state: &mut SyncState) {
    let end = state.synced_bytes - state.synced_bytes % PAGE_BYTES;
    if end <= state.released_bytes {
        return;
    }
    // A zero length would mean "to the end of the file"; `end > released_bytes` here.
    let len = end - state.released_bytes;
    match rustix::fs::fadvise(
        &out.file,
        state.released_bytes,
        len,
        rustix::fs::Advice::DontNeed,
    ) {
        Ok(()) => state.released_bytes = end,
        Err(e) => tracing::debug!(error = %e, "file sink: could not release written pages"),
    }
}

fn trim_partial_line(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK_BYTES: u64 = 64 * 1024;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    // Scan backwards chunk by chunk: lines are bounded by the record size, not the file size.
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(CHUNK_BYTES);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        file.set_len(keep)?;
        file.sync_data()?;
    }
    Ok(len - keep)
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let failure = |e: std::io::Error| SinkError::Retryable {
                reason: format!("file sink {}: {e}", self.dir.display()),
                retry_after: None,
            };
            // Serialising is most of this sink's CPU; it needs no lock, so workers do it in
            // parallel.
            let mut buf = Vec::with_capacity(batch.len() * 1536);
            for r in batch {
                super::json::write_record(&mut buf, r)
                    .map_err(|e| failure(std::io::Error::other(e)))?;
                buf.push(b'\n');
            }
            // The write and fdatasync block; this sink is the embedded default and its batches
            // are bounded, so running them in place keeps it simple without a copy of the
            // batch.
            let (out, end) = {
                let mut current = self.current.lock().await;
                super::run_blocking(|| self.write_lines(&mut current, &buf)).map_err(failure)?
            };
            super::run_blocking(|| sync_up_to(&out, end)).map_err(failure)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_last_line_is_cut_back_to_the_last_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        assert_eq!(trim_partial_line(&path).unwrap(), 5);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(trim_partial_line(&path).unwrap(), 0);
        std::fs::write(&path, b"no newline at all").unwrap();
        assert_eq!(trim_partial_line(&path).unwrap(), 17);
        assert!(std::fs::read(&path).unwrap().is_empty());
    }

    #[test]
    fn a_batch_after_a_torn_line_starts_on_its_own_line() {
        let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file_name(1)), b"{\"torn\":").unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20, 1 << 30).unwrap();
        let record = crate::chain::Chains::new()
            .seal(crate::envelope::Envelope {
                version: 1,
                id: "x".into(),
                source: "s".into(),
                slot: crate::slots::slot_of("s"),
                ..Default::default()
            })
            .unwrap();
        rt.block_on(sink.deliver(&[SharedRecord::new(record)]))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(file_name(1))).unwrap();
        let summary = crate::chain::verify_jsonl(text.as_bytes()).unwrap();
        assert_eq!(summary.records, 1);
    }

    fn records(stream: &str, n: usize) -> Vec<SharedRecord> {
        let mut chains = crate::chain::Chains::new();
        (0..n)
            .map(|i| {
                SharedRecord::new(
                    chains
                        .seal(crate::envelope::Envelope {
                            version: 1,
                            id: format!("{stream}-{i}"),
                            source: stream.into(),
                            slot: crate::slots::slot_of(stream),
                            ..Default::default()
                        })
                        .unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn concurrent_deliveries_each_land_whole_and_in_order_per_writer() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Small files, so rotation happens while other writers wait to sync.
        let sink = Arc::new(FileSink::open("default", dir.path(), 4096, 1 << 30).unwrap());
        rt.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..8 {
                let sink = sink.clone();
                tasks.push(tokio::spawn(async move {
                    let all = records(&format!("s{w}"), 60);
                    for batch in all.chunks(3) {
                        sink.deliver(batch).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() > 1, "rotation was exercised");
        let mut joined = String::new();
        for f in &files {
            joined.push_str(&std::fs::read_to_string(f).unwrap());
        }
        // verify checks every stream is gapless and linked, in file order.
        let summary = crate::chain::verify_jsonl(joined.as_bytes()).unwrap();
        assert_eq!(summary.records, 8 * 60);
    }

    #[test]
    fn after_a_failure_no_writer_of_that_file_is_confirmed_and_the_next_batch_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20, 1 << 30).unwrap();
        let mut current = None;
        let line = b"{\"a\":1}\n";
        let (first, first_end) = sink.write_lines(&mut current, line).unwrap();
        let (second, second_end) = sink.write_lines(&mut current, line).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        // The first writer's fdatasync fails (as after an I/O error); the second writer's
        // bytes are in the same file and must not be confirmed by a later, clean-looking sync.
        first
            .failed
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(sync_up_to(&first, first_end).is_err());
        assert!(sync_up_to(&second, second_end).is_err());
        let (third, third_end) = sink.write_lines(&mut current, line).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &third),
            "a fresh handle after the failure"
        );
        sync_up_to(&third, third_end).unwrap();
    }

    #[test]
    fn a_file_is_synced_whole_before_the_next_one_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open("default", dir.path(), 16, 1 << 30).unwrap();
        let mut current = None;
        let (first, first_end) = sink.write_lines(&mut current, b"{\"a\":1}\n").unwrap();
        // The next batch does not fit: rotation syncs what the first file holds, although
        // its writer has not synced yet.
        let (second, _) = sink.write_lines(&mut current, b"{\"b\":22}\n").unwrap();
        assert_eq!((first.index, second.index), (1, 2));
        assert_eq!(first.sync.lock().unwrap().synced_bytes, first_end);
    }

    #[test]
    fn at_start_a_partial_line_in_the_file_before_the_newest_is_cut_too() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file_name(1)), b"{\"a\":1}\n{\"torn\":").unwrap();
        std::fs::write(dir.path().join(file_name(2)), b"{\"b\":2}\n").unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20, 1 << 30).unwrap();
        let mut current = None;
        let (out, _) = sink.write_lines(&mut current, b"{\"c\":3}\n").unwrap();
        assert_eq!(out.index, 2);
        assert_eq!(
            std::fs::read(dir.path().join(file_name(1))).unwrap(),
            b"{\"a\":1}\n"
        );
    }

    #[test]
    fn lines_synced_into_a_removed_file_are_not_confirmed_and_the_retry_lands_in_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("out");
        let sink = FileSink::open("default", &out_dir, 1 << 20, 1 << 30).unwrap();
        let mut current = None;
        let (first, end) = sink.write_lines(&mut current, b"{\"a\":1}\n").unwrap();
        sync_up_to(&first, end).unwrap();
        // A consumer removes the whole directory while the file is open.
        std::fs::remove_dir_all(&out_dir).unwrap();
        let (second, end) = sink.write_lines(&mut current, b"{\"b\":2}\n").unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "still the open, unlinked file"
        );
        let err = sync_up_to(&second, end).unwrap_err();
        assert!(err.to_string().contains("was removed"), "{err}");
        // The retry goes to a new file in a directory made again, and is confirmed there.
        let (third, end) = sink.write_lines(&mut current, b"{\"b\":2}\n").unwrap();
        sync_up_to(&third, end).unwrap();
        assert_eq!(third.index, 2, "after a failed sync, a new file");
        assert_eq!(
            std::fs::read(out_dir.join(file_name(2))).unwrap(),
            b"{\"b\":2}\n"
        );
    }

    #[test]
    fn a_rotation_whose_sync_fails_never_sends_the_next_batch_back_to_the_failed_file() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open("default", dir.path(), 16, 1 << 30).unwrap();
        let mut current = None;
        sink.write_lines(&mut current, b"{\"a\":1}\n").unwrap();
        // The file is removed, so the rotation's fdatasync finds it unlinked and fails.
        std::fs::remove_file(dir.path().join(file_name(1))).unwrap();
        let err = sink
            .write_lines(&mut current, b"{\"b\":22}\n")
            .err()
            .expect("the rotation's sync fails");
        assert!(err.to_string().contains("was removed"), "{err}");
        // No file is left in the directory, yet the numbering goes on past the failed one.
        let (out, end) = sink.write_lines(&mut current, b"{\"b\":22}\n").unwrap();
        sync_up_to(&out, end).unwrap();
        assert_eq!(out.index, 2);
    }

    #[test]
    fn a_delivery_on_a_current_thread_runtime_does_not_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20, 1 << 30).unwrap();
        rt.block_on(sink.deliver(&records("s", 2))).unwrap();
    }

    #[test]
    fn one_fdatasync_covers_every_batch_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20, 1 << 30).unwrap();
        let mut current = None;
        let (a, a_end) = sink.write_lines(&mut current, b"{}\n").unwrap();
        let (b, b_end) = sink.write_lines(&mut current, b"{}\n").unwrap();
        sync_up_to(&b, b_end).unwrap();
        assert_eq!(a.sync.lock().unwrap().synced_bytes, b_end);
        assert!(a_end < b_end);
        // The earlier writer finds its bytes synced: no second fdatasync, and success.
        sync_up_to(&a, a_end).unwrap();
    }

    fn record(id: &str) -> SharedRecord {
        SharedRecord::new(
            crate::chain::Chains::new()
                .seal(crate::envelope::Envelope {
                    version: 1,
                    id: id.into(),
                    source: "s".into(),
                    text: Some("x".repeat(300)),
                    slot: crate::slots::slot_of("s"),
                    ..Default::default()
                })
                .unwrap(),
        )
    }

    fn out_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn once_its_files_reach_the_bound_the_sink_refuses_retryably_until_files_are_removed() {
        let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // One batch per file, so closed files can be removed; the bound is passed by the
        // second batch (each line is well over 500 bytes).
        let sink = FileSink::open("default", dir.path(), 1, 1_000).unwrap();
        rt.block_on(sink.deliver(&[record("a")])).unwrap();
        rt.block_on(sink.deliver(&[record("b")])).unwrap();
        let before = out_files(dir.path());
        assert_eq!(before.len(), 2);
        match rt.block_on(sink.deliver(&[record("c")])) {
            Err(SinkError::Retryable { reason, .. }) => {
                assert!(reason.contains("output directory full"), "{reason}");
                assert!(reason.contains("dir_bytes_max = 1000"), "{reason}");
            }
            other => panic!("expected a retryable refusal, got {other:?}"),
        }
        assert_eq!(
            out_files(dir.path()),
            before,
            "nothing written, no file opened"
        );

        // A consumer takes the closed file; the next batch goes through.
        std::fs::remove_file(&before[0]).unwrap();
        rt.block_on(sink.deliver(&[record("c")])).unwrap();
        let after = out_files(dir.path());
        assert_eq!(after.len(), 2);
        let newest = std::fs::read_to_string(&after[1]).unwrap();
        assert!(newest.contains("\"id\":\"c\""), "{newest}");
    }
}
