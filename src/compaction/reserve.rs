//! The reserve: space held back on the data filesystem so that compaction can still run when
//! another process has filled it.
//!
//! Compaction frees space only after it has written two checkpoints, the chain heads and the
//! dedup entries of the segments it deletes, and both are new files. On a filesystem that
//! something else has filled to the last block, every pass fails, and delivered segments stay
//! on disk until an operator frees space: the spool cannot shrink when shrinking matters most.
//! So the daemon holds `spool.reserve_bytes` in `<data_dir>/reserve`, a file whose blocks are
//! allocated (`fallocate`, or zeros written where the filesystem cannot) and fsync'd. When a
//! compaction pass fails for lack of space, the compactor deletes the file and runs the pass
//! again; while the reserve is spent, each pass deletes at most one segment, so its dedup
//! checkpoint holds one segment's entries at most and fits in what the reserve gave back.
//! Compaction only frees segments whose envelopes are tombstoned, and their seals and
//! tombstones need room too (a new segment once the prepared one is full): so a seal or
//! tombstone append that finds the spool full spends the reserve as well (`forward::worker`,
//! and the dispatcher's tombstone for an undecodable record in `forward::pipeline`).
//! While the reserve is spent, ingest is answered 429 (reason `reserve`), so that new
//! envelopes do not take the space meant for the appends and checkpoints that free more, and
//! `/readyz` answers 503 (`disk reserve spent`), as above a hard watermark.
//!
//! A start on a filesystem full to the last block spends it too (`Reserve::spend_to_start`):
//! the daemon's address file needs a new page, and a daemon that cannot start can neither
//! answer 429 nor deliver what it holds.
//!
//! The reserve is made again once the filesystem has `spool.disk_free_soft_bytes +
//! spool.reserve_bytes` free, so that making it never trips a free-space watermark by itself.
//! An operator may delete the file by hand to free space at once; the daemon makes it again
//! when there is room.
//!
//! | `<data_dir>/reserve` found            | action                                              |
//! |---------------------------------------|-----------------------------------------------------|
//! | `reserve_bytes` is 0                  | removed if present; nothing is held                 |
//! | present, exactly `reserve_bytes` long | held                                                |
//! | present, any other length             | removed (a changed config), then as if absent       |
//! | absent, room as above                 | made: temp file, allocate, fsync, rename, dir fsync |
//! | absent, no room, or the make fails    | not held; tried again at every compaction pass      |
//!
//! A kill while the reserve is being made leaves a `.tmp*` file, which start-up removes like
//! any other interrupted atomic write; a `reserve` file is therefore always whole.

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
    /// Free bytes the filesystem must keep after the reserve is made
    /// (`spool.disk_free_soft_bytes`).
    free_floor_bytes: u64,
    /// True while `<dir>/reserve` is whole and ours to spend.
    held: AtomicBool,
    /// Set when the reserve is spent, cleared when it is made again: ingest is refused
    /// meanwhile, so that the space it gave back goes to seals, tombstones and checkpoints,
    /// which free space, rather than to new envelopes.
    refusing_ingest: AtomicBool,
    /// `spoolgate_spool_reserve_bytes`.
    gauge: IntGauge,
    /// `spoolgate_spool_reserve_spent_total`.
    spent: IntCounter,
}

impl Reserve {
    pub fn new(
        dir: &Path,
        bytes: u64,
        free_floor_bytes: u64,
        gauge: IntGauge,
        spent: IntCounter,
    ) -> Reserve {
        Reserve {
            dir: dir.to_path_buf(),
            bytes,
            free_floor_bytes,
            held: AtomicBool::new(false),
            refusing_ingest: AtomicBool::new(false),
            gauge,
            spent,
        }
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

    /// True from the moment the reserve is spent until it is made again.
    pub fn refuses_ingest(&self) -> bool {
        self.refusing_ingest.load(Ordering::Relaxed)
    }

    /// True when a reserve is configured but not held: compaction then deletes one segment per
    /// pass.
    pub fn is_spent(&self) -> bool {
        self.bytes > 0 && !self.held()
    }

    /// Holds the reserve if it is not held yet and there is room (see the module doc's table).
    /// Blocking; returns whether it is held afterwards.
    pub fn keep(&self, free_bytes: u64) -> io::Result<bool> {
        let path = self.path();
        let found = match std::fs::metadata(&path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if self.held() {
            if found == Some(self.bytes) {
                return Ok(true);
            }
            // An operator deleted it to free space at once (or replaced it): no longer held.
            tracing::warn!(path = %path.display(), "the disk reserve was removed by someone else");
            self.set_held(false);
        }
        if self.bytes == 0 {
            if found.is_some() {
                self.remove(&path)?;
            }
            return Ok(false);
        }
        if found == Some(self.bytes) {
            self.set_held(true);
            self.refusing_ingest.store(false, Ordering::Relaxed);
            return Ok(true);
        }
        // A file of another length is a reserve made under another config: what it holds
        // counts as free for the decision below, since removing it gives it back.
        let mut free = free_bytes;
        if let Some(len) = found {
            self.remove(&path)?;
            free = free.saturating_add(len);
        }
        if free < self.free_floor_bytes.saturating_add(self.bytes) {
            return Ok(false);
        }
        self.make(&path)?;
        self.set_held(true);
        self.refusing_ingest.store(false, Ordering::Relaxed);
        tracing::info!(bytes = self.bytes, path = %path.display(), "holding the disk reserve");
        Ok(true)
    }

    /// Deletes the reserve so that compaction and forwarding can use its space; `who` says
    /// which ran out of room. Blocking; false when it was not held (or another caller spent
    /// it first).
    pub fn spend(&self, who: &str) -> io::Result<bool> {
        if self
            .held
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(false);
        }
        self.refusing_ingest.store(true, Ordering::Relaxed);
        self.set_held(false);
        let path = self.path();
        self.remove(&path)?;
        self.spent.inc();
        tracing::warn!(
            bytes = self.bytes,
            path = %path.display(),
            needed_by = who,
            "the data filesystem is full: spent the disk reserve so that forwarding and compaction can go on and free space; ingest is refused until it is made again"
        );
        Ok(true)
    }

    /// Deletes a reserve file found at start-up, held or not, so that the daemon can write
    /// what it needs to start on a full filesystem. Blocking; false when there was none.
    pub fn spend_to_start(&self) -> io::Result<bool> {
        let path = self.path();
        if !path.exists() {
            return Ok(false);
        }
        self.remove(&path)?;
        self.set_held(false);
        self.refusing_ingest.store(true, Ordering::Relaxed);
        self.spent.inc();
        tracing::warn!(
            path = %path.display(),
            "the data filesystem is full: spent the disk reserve so that the daemon can start; ingest is refused until it is made again"
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

    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.dir)
    }
}

/// Spends `reserve`, when one is held, for a spool append of `who` that found the filesystem
/// full (a seal, a tombstone): forwarding and tombstoning are what let compaction free space.
/// True when it was spent by this call, so the caller retries its append at once; false when
/// there was none to spend (the caller waits and retries as before).
pub async fn spend_for_append(
    reserve: Option<&std::sync::Arc<Reserve>>,
    who: &'static str,
) -> bool {
    let Some(reserve) = reserve.filter(|r| r.held()).cloned() else {
        return false;
    };
    match tokio::task::spawn_blocking(move || reserve.spend(who)).await {
        Ok(Ok(spent)) => spent,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not delete the disk reserve");
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

    fn reserve(dir: &Path, bytes: u64, floor: u64) -> Reserve {
        Reserve::new(
            dir,
            bytes,
            floor,
            IntGauge::new("g", "g").unwrap(),
            IntCounter::new("c", "c").unwrap(),
        )
    }

    #[test]
    fn an_absent_reserve_is_made_when_there_is_room_and_spent_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 1000);
        assert!(r.keep(5096).unwrap());
        assert_eq!(std::fs::metadata(r.path()).unwrap().len(), 4096);
        assert_eq!(r.gauge.get(), 4096);
        assert!(!r.refuses_ingest());
        assert!(r.spend("test").unwrap());
        assert!(r.refuses_ingest());
        assert!(!r.path().exists());
        assert_eq!(r.gauge.get(), 0);
        assert_eq!(r.spent.get(), 1);
        assert!(r.is_spent());
        // Spending again is a no-op.
        assert!(!r.spend("test").unwrap());
        assert_eq!(r.spent.get(), 1);
        // Made again once there is room, and ingest is let through again.
        assert!(r.keep(5096).unwrap());
        assert!(!r.refuses_ingest());
    }

    #[test]
    fn an_absent_reserve_is_not_made_without_room_above_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 1000);
        assert!(!r.keep(5095).unwrap());
        assert!(!r.path().exists());
        assert_eq!(r.gauge.get(), 0);
        // A reserve never made refuses nothing: only a spent one does.
        assert!(!r.refuses_ingest());
    }

    #[test]
    fn a_reserve_of_the_configured_length_is_held_without_being_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0);
        std::fs::write(r.path(), vec![7u8; 4096]).unwrap();
        // No room is needed to hold what is already there.
        assert!(r.keep(0).unwrap());
        assert_eq!(std::fs::read(r.path()).unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn a_reserve_of_another_length_is_replaced_and_its_bytes_count_as_room() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0);
        std::fs::write(r.path(), vec![7u8; 3000]).unwrap();
        assert!(r.keep(2000).unwrap());
        assert_eq!(std::fs::read(r.path()).unwrap(), vec![0u8; 4096]);
    }

    #[test]
    fn a_reserve_deleted_by_hand_is_no_longer_held_and_made_again_when_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 1000);
        assert!(r.keep(u64::MAX).unwrap());
        std::fs::remove_file(r.path()).unwrap();
        assert!(!r.keep(0).unwrap());
        assert_eq!(r.gauge.get(), 0);
        assert!(r.keep(5096).unwrap());
        assert_eq!(std::fs::metadata(r.path()).unwrap().len(), 4096);
    }

    #[test]
    fn a_start_spends_a_reserve_file_it_has_not_taken_up_yet() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 4096, 0);
        assert!(!r.spend_to_start().unwrap());
        std::fs::write(r.path(), vec![0u8; 4096]).unwrap();
        assert!(r.spend_to_start().unwrap());
        assert!(!r.path().exists());
        assert_eq!(r.spent.get(), 1);
        assert!(r.is_spent());
    }

    #[test]
    fn a_zero_reserve_removes_a_file_left_by_an_earlier_config() {
        let dir = tempfile::tempdir().unwrap();
        let r = reserve(dir.path(), 0, 0);
        std::fs::write(r.path(), vec![0u8; 10]).unwrap();
        assert!(!r.keep(u64::MAX).unwrap());
        assert!(!r.path().exists());
        assert!(!r.is_spent());
    }
}
