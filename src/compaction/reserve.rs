//! The reserve: space held back on the data filesystem so that forwarding and compaction can
//! still free space when the filesystem is full.
//!
//! Compaction frees space only after it has written two checkpoints, the chain heads and the
//! dedup entries of the segments it deletes, and both are new files. On a filesystem that
//! something else has filled to the last block, every pass fails, and delivered segments stay
//! on disk until an operator frees space: the spool cannot shrink when shrinking matters most.
//! So the daemon holds `spool.reserve_bytes` in `<data_dir>/reserve`, a file whose blocks are
//! allocated (`fallocate`, or zeros written where the filesystem cannot) and fsync'd. When a
//! compaction pass fails for lack of space, the compactor spends the reserve and runs the pass
//! again; while the reserve is spent, each pass deletes at most one segment, so its dedup
//! checkpoint holds one segment's entries at most and fits in what the reserve gave back.
//! Compaction only frees segments whose envelopes are tombstoned, and their seals and
//! tombstones need room too (a new segment once the prepared one is full): so a seal or
//! tombstone append that finds the spool full spends the reserve as well (`forward::worker`,
//! and the dispatcher's tombstone for an undecodable record in `forward::pipeline`). A start
//! on a filesystem full to the last block spends it too (`Reserve::spend_to_start`): the
//! daemon's address file needs a new page, and a daemon that cannot start can neither answer
//! 429 nor deliver what it holds.
//!
//! Spending truncates the file to zero length rather than deleting it: the empty file records,
//! across restarts, that the reserve is spent. While it is spent, the reserve is kept as free
//! space instead of as a file: ingest is answered 429 (reason `reserve`) and `/readyz` 503
//! while the filesystem has less than `spool.disk_free_hard_bytes + spool.reserve_bytes` free,
//! the same room ingest leaves while the reserve is held (the hard watermark, with the file
//! counted as used). So new envelopes cannot take the space meant for the appends and
//! checkpoints that free more, and a restart does not forget it; yet a filesystem whose free
//! space never again reaches what making the file takes (another process keeps it) does not
//! refuse ingest forever. The file is made again once `spool.disk_free_soft_bytes +
//! spool.reserve_bytes` is free, so that making it never trips a free-space watermark by
//! itself.
//!
//! | `<data_dir>/reserve` found            | state  | action                                        |
//! |---------------------------------------|--------|-----------------------------------------------|
//! | `reserve_bytes` is 0                  | off    | removed if present; nothing is held           |
//! | present, exactly `reserve_bytes` long | held   | kept                                          |
//! | present, empty                        | spent  | made again when there is room, as below       |
//! | present, any other length             | absent | removed (a changed config), then as if absent |
//! | absent, room as above                 | held   | made: temp file, allocate, fsync, rename over |
//! | absent, no room, or the make fails    | absent | tried again at every compaction pass          |
//!
//! An absent reserve (a first start on a small filesystem, or a file an operator deleted by
//! hand to free space at once) refuses nothing; the daemon makes it when there is room. A
//! kill while the reserve is being made leaves a `.tmp*` file, which start-up removes like any
//! other interrupted atomic write; a `reserve` file is therefore whole, or empty.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{IntCounter, IntGauge};

/// The reserve's file name in the data directory.
pub const RESERVE_FILE: &str = "reserve";

/// Zeros written per call where the filesystem cannot `fallocate`.
const ZEROS_CHUNK_BYTES: usize = 1 << 20;

pub struct Reserve {
    dir: PathBuf,
    bytes: u64,
    /// Free bytes below which ingest is refused while the reserve is spent
    /// (`spool.disk_free_hard_bytes + spool.reserve_bytes`).
    spent_floor_bytes: u64,
    /// Free bytes the filesystem must have for the reserve to be made
    /// (`spool.disk_free_soft_bytes + spool.reserve_bytes`).
    make_floor_bytes: u64,
    /// True while `<dir>/reserve` is whole and ours to spend.
    held: AtomicBool,
    /// True from the moment the reserve is spent (or found empty at start-up) until it is
    /// made again: the reserve is then kept as free space (see the module doc).
    spent: AtomicBool,
    /// `spoolgate_spool_reserve_bytes`.
    gauge: IntGauge,
    /// `spoolgate_spool_reserve_spent_total`.
    spent_total: IntCounter,
    /// Held by [`Reserve::keep`] and [`Reserve::spend`] for their whole run: each looks at the
    /// file and then acts on what it saw, so one must not change the file in between (a keep
    /// that saw the file whole would otherwise mark a reserve held that a spend had just
    /// emptied).
    ops: std::sync::Mutex<()>,
}

impl Reserve {
    /// `disk_free_hard_bytes` and `disk_free_soft_bytes` are the spool's free-space
    /// watermarks, which the reserve's own floors sit above.
    pub fn new(
        dir: &Path,
        bytes: u64,
        disk_free_hard_bytes: u64,
        disk_free_soft_bytes: u64,
        gauge: IntGauge,
        spent_total: IntCounter,
    ) -> Reserve {
        // A reserve spent before a restart is spent from the first request on, not from the
        // compactor's first pass: the daemon opens ingest before that pass has looked at the
        // file, and in between new envelopes could take the room meant for the seals,
        // tombstones and checkpoints that free space (found by a review on 2026-12-06). A
        // file that cannot be looked at is left to `keep`, as before.
        let found_spent = bytes > 0
            && std::fs::metadata(dir.join(RESERVE_FILE)).is_ok_and(|m| m.is_file() && m.len() == 0);
        Reserve {
            dir: dir.to_path_buf(),
            bytes,
            spent_floor_bytes: disk_free_hard_bytes.saturating_add(bytes),
            make_floor_bytes: disk_free_soft_bytes.saturating_add(bytes),
            held: AtomicBool::new(false),
            spent: AtomicBool::new(found_spent),
            gauge,
            spent_total,
            ops: std::sync::Mutex::new(()),
        }
    }

    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// True while the reserve is held.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// The configured size, `spool.reserve_bytes`.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Free bytes below which ingest is refused while the reserve is spent.
    pub fn spent_floor_bytes(&self) -> u64 {
        self.spent_floor_bytes
    }

    /// True while the reserve is spent and the filesystem has less than
    /// [`Reserve::spent_floor_bytes`] free: ingest is refused (429, reason `reserve`).
    pub fn refuses_ingest(&self, free_bytes: u64) -> bool {
        self.spent.load(Ordering::Acquire) && !self.held() && free_bytes < self.spent_floor_bytes
    }

    /// True when a reserve is configured but not held: compaction then deletes one segment per
    /// pass.
    pub fn is_spent(&self) -> bool {
        self.bytes > 0 && !self.held()
    }

    /// Holds the reserve if it is not held yet and there is room (see the module doc's table).
    /// Blocking; returns whether it is held afterwards.
    pub fn keep(&self, free_bytes: u64) -> io::Result<bool> {
        let _exclusive = self.exclusive();
        let path = self.path();
        let found = match std::fs::metadata(&path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if self.bytes == 0 {
            if found.is_some() {
                self.remove(&path)?;
            }
            self.set_held(false);
            return Ok(false);
        }
        if self.held() {
            if found == Some(self.bytes) {
                return Ok(true);
            }
            // An operator deleted it to free space at once (or replaced it): no longer held,
            // and not spent by the daemon, so nothing is refused for it.
            tracing::warn!(path = %path.display(), "the disk reserve was removed by someone else");
            self.set_held(false);
        }
        let mut free = free_bytes;
        match found {
            Some(len) if len == self.bytes => {
                self.set_held(true);
                self.spent.store(false, Ordering::Release);
                return Ok(true);
            }
            // Spent before a restart: kept as free space until it can be made again.
            Some(0) => self.spent.store(true, Ordering::Release),
            // A reserve made under another config: what it holds counts as free for the
            // decision below, since removing it gives it back.
            Some(len) => {
                self.remove(&path)?;
                free = free.saturating_add(len);
            }
            None => {}
        }
        if free < self.make_floor_bytes {
            return Ok(false);
        }
        self.make(&path)?;
        self.set_held(true);
        self.spent.store(false, Ordering::Release);
        tracing::info!(bytes = self.bytes, path = %path.display(), "holding the disk reserve");
        Ok(true)
    }

    /// Empties the reserve so that compaction and forwarding can use its space; `who` says
    /// which ran out of room. Blocking; false when it was not held (or another caller spent
    /// it first).
    pub fn spend(&self, who: &str) -> io::Result<bool> {
        let _exclusive = self.exclusive();
        if self
            .held
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(false);
        }
        self.spent.store(true, Ordering::Release);
        self.set_held(false);
        let path = self.path();
        if !self.empty(&path)? {
            // Deleted by an operator since the last keep: its space is free already, and
            // nothing was spent by the daemon, so nothing is refused for it (as keep decides
            // when it finds it gone).
            self.spent.store(false, Ordering::Release);
            tracing::warn!(path = %path.display(), "the disk reserve was removed by someone else");
            return Ok(false);
        }
        self.spent_total.inc();
        tracing::warn!(
            bytes = self.bytes,
            path = %path.display(),
            needed_by = who,
            ingest_refused_below_free_bytes = self.spent_floor_bytes,
            "the data filesystem is full: spent the disk reserve so that forwarding and compaction can go on and free space; until it is made again, ingest is refused while less than the hard watermark plus the reserve is free"
        );
        Ok(true)
    }

    /// Empties a reserve file found at start-up, held or not, so that the daemon can write
    /// what it needs to start on a full filesystem. Blocking; false when there was none, or it
    /// was already empty.
    pub fn spend_to_start(&self) -> io::Result<bool> {
        let _exclusive = self.exclusive();
        let path = self.path();
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        if !self.empty(&path)? {
            return Ok(false);
        }
        self.set_held(false);
        self.spent.store(true, Ordering::Release);
        self.spent_total.inc();
        tracing::warn!(
            path = %path.display(),
            ingest_refused_below_free_bytes = self.spent_floor_bytes,
            "the data filesystem is full: spent the disk reserve so that the daemon can start; until it is made again, ingest is refused while less than the hard watermark plus the reserve is free"
        );
        Ok(true)
    }

    fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Release);
        self.gauge.set(if held {
            self.bytes.min(i64::MAX as u64) as i64
        } else {
            0
        });
    }

    fn make(&self, path: &Path) -> io::Result<()> {
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        allocate(tmp.as_file(), self.bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        sync_dir(&self.dir)
    }

    /// Truncates the file to zero length and makes that durable: its blocks are free, and a
    /// restart finds the reserve spent. A missing file (deleted by hand) is left missing.
    /// Truncates the reserve file; false when there was none.
    fn empty(&self, path: &Path) -> io::Result<bool> {
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => {
                file.set_len(0)?;
                file.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.dir)
    }
}

/// Spends `reserve`, when one is held, for `who`, which found the filesystem full (a seal or
/// tombstone append, a compaction pass): forwarding, tombstoning and compaction are what free
/// space. True when it was spent by this call, so the caller tries again at once; false when
/// there was none to spend (the caller waits and retries as before).
pub async fn spend_when_full(reserve: Option<&std::sync::Arc<Reserve>>, who: &'static str) -> bool {
    let Some(reserve) = reserve.filter(|r| r.held()).cloned() else {
        return false;
    };
    match tokio::task::spawn_blocking(move || reserve.spend(who)).await {
        Ok(Ok(spent)) => spent,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not empty the disk reserve");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "the disk reserve task failed");
            false
        }
    }
}

/// Allocates `len` bytes: `fallocate` (mode 0), or zeros written where the filesystem cannot.
fn allocate(file: &std::fs::File, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let zeros = vec![0u8; ZEROS_CHUNK_BYTES];
            let mut left = len;
            let mut w = file;
            while left > 0 {
                let n = left.min(ZEROS_CHUNK_BYTES as u64) as usize;
                std::io::Write::write_all(&mut w, &zeros[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reserve of `bytes` with a hard watermark of `hard` and a soft one of `soft`: spent,
    /// it refuses ingest below `hard + bytes` free, and it is made with `soft + bytes` free.
    fn reserve(dir: &Path, bytes: u64, hard: u64, soft: u64) -> Reserve {
        Reserve::new(
            dir,
            bytes,
            hard,
            soft,
            IntGauge::new("g", "g").unwrap(),
            IntCounter::new("c", "c").unwrap(),
        )
    }

    fn len(r: &Reserve) -> Option<u64> {
        std::fs::metadata(r.path()).ok().map(|m| m.len())
    }

    #[test]
    fn an_absent_reserve_is_made_when_there_is_room_and_spent_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        assert!(r.keep(5096).unwrap());
        assert_eq!(len(&r), Some(4096));
        assert_eq!(r.gauge.get(), 4096);
        assert!(!r.refuses_ingest(0));
        assert!(r.spend("test").unwrap());
        // Emptied, not deleted: the empty file says it is spent.
        assert_eq!(len(&r), Some(0));
        assert_eq!(r.gauge.get(), 0);
        assert_eq!(r.spent_total.get(), 1);
        assert!(r.is_spent());
        // Spending again is a no-op.
        assert!(!r.spend("test").unwrap());
        assert_eq!(r.spent_total.get(), 1);
        // Made again once there is room, and ingest is let through again.
        assert!(r.keep(5096).unwrap());
        assert_eq!(len(&r), Some(4096));
        assert!(!r.refuses_ingest(0));
    }

    #[test]
    fn a_spent_reserve_is_kept_as_free_space_above_the_hard_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        assert!(r.keep(u64::MAX).unwrap());
        assert!(r.spend("test").unwrap());
        assert!(r.refuses_ingest(4195));
        assert!(!r.refuses_ingest(4196));
        // Not yet room to make it: it stays spent, and keeps refusing below the floor.
        assert!(!r.keep(5095).unwrap());
        assert!(r.refuses_ingest(0));
    }

    #[test]
    fn an_empty_reserve_file_found_at_start_is_spent_and_made_again_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESERVE_FILE), b"").unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        // Before anything has looked at it with `keep` (the compactor's first pass): the
        // daemon answers ingest from then on.
        assert!(r.refuses_ingest(4195));
        assert!(!r.keep(5095).unwrap());
        assert_eq!(len(&r), Some(0));
        assert!(r.refuses_ingest(4195));
        assert!(!r.refuses_ingest(4196));
        assert!(r.keep(5096).unwrap());
        assert_eq!(len(&r), Some(4096));
        assert!(!r.refuses_ingest(0));
    }

    #[test]
    fn an_absent_reserve_is_not_made_without_room_above_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        assert!(!r.keep(5095).unwrap());
        assert_eq!(len(&r), None);
        assert_eq!(r.gauge.get(), 0);
        // A reserve never made refuses nothing: only a spent one does.
        assert!(!r.refuses_ingest(0));
    }

    #[test]
    fn a_reserve_of_the_configured_length_is_held_without_being_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0, 0);
        std::fs::write(r.path(), vec![7u8; 4096]).unwrap();
        // No room is needed to hold what is already there.
        assert!(r.keep(0).unwrap());
        assert_eq!(std::fs::read(r.path()).unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn a_reserve_of_another_length_is_replaced_and_its_bytes_count_as_room() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0, 0);
        std::fs::write(r.path(), vec![7u8; 3000]).unwrap();
        assert!(r.keep(2000).unwrap());
        assert_eq!(std::fs::read(r.path()).unwrap(), vec![0u8; 4096]);
    }

    #[test]
    fn a_reserve_deleted_by_hand_before_a_spend_is_not_counted_as_spent_and_refuses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        assert!(r.keep(u64::MAX).unwrap());
        std::fs::remove_file(r.path()).unwrap();
        // The spend finds nothing to free: the caller must wait as with no reserve.
        assert!(!r.spend("test").unwrap());
        assert_eq!(r.spent_total.get(), 0);
        assert!(!r.refuses_ingest(0));
        // And the next keep makes it again when there is room.
        assert!(r.keep(u64::MAX).unwrap());
        assert_eq!(len(&r), Some(4096));
    }

    #[test]
    fn a_reserve_deleted_by_hand_is_no_longer_held_refuses_nothing_and_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 100, 1000);
        assert!(r.keep(u64::MAX).unwrap());
        std::fs::remove_file(r.path()).unwrap();
        assert!(!r.keep(0).unwrap());
        assert_eq!(r.gauge.get(), 0);
        assert!(!r.refuses_ingest(0));
        assert!(r.keep(5096).unwrap());
        assert_eq!(len(&r), Some(4096));
    }

    #[test]
    fn a_start_spends_a_reserve_file_it_has_not_taken_up_yet() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0, 0);
        assert!(!r.spend_to_start().unwrap());
        std::fs::write(r.path(), vec![0u8; 4096]).unwrap();
        assert!(r.spend_to_start().unwrap());
        assert_eq!(len(&r), Some(0));
        assert_eq!(r.spent_total.get(), 1);
        assert!(r.is_spent());
        assert!(r.refuses_ingest(4095));
        // An empty file has nothing more to give.
        assert!(!r.spend_to_start().unwrap());
        assert_eq!(r.spent_total.get(), 1);
    }

    #[test]
    fn a_zero_reserve_removes_a_file_left_by_an_earlier_config() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 0, 0, 0);
        std::fs::write(r.path(), vec![0u8; 10]).unwrap();
        assert!(!r.keep(u64::MAX).unwrap());
        assert_eq!(len(&r), None);
        assert!(!r.is_spent());
        assert!(!r.refuses_ingest(0));
    }
}
