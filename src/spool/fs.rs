//! The filesystem seam. The spool does all its I/O through [`FileSystem`] and [`SegmentFile`],
//! so tests can swap the real filesystem ([`StdFs`]) for one that loses unsynced writes on a
//! simulated crash ([`MemFs`]) or fails on command ([`FaultFs`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One open segment file. Positional reads and writes, so readers and the writer never share
/// a file cursor.
#[allow(clippy::len_without_is_empty)]
pub trait SegmentFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Makes the file `len` bytes long, every byte reading as zero and its blocks reserved, so
    /// later writes within it cannot fail for want of space and need no size change. The
    /// default writes the zeros, in chunks of [`ZERO_CHUNK_BYTES`]; a filesystem that can
    /// reserve blocks without writing them (`fallocate`) does that instead.
    fn allocate(&self, len: u64) -> io::Result<()> {
        write_zeros(self, len)
    }
    /// Advice that the file's cached pages will not be read soon: clean ones may be dropped
    /// from the page cache (reads then go to the disk). The default does nothing.
    fn release_cache(&self) -> io::Result<()> {
        Ok(())
    }
    /// [`SegmentFile::release_cache`] for `len` bytes from `offset` only.
    fn release_cache_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The first offset at or after `from` that is not in a hole, as `lseek(SEEK_DATA)`
    /// answers; `None` when only a hole follows. A hole reads as zeros; a filesystem may call
    /// any range data (the default calls the whole file data), so a caller may skip reading
    /// holes but must not assume that data is non-zero.
    fn seek_data(&self, from: u64) -> io::Result<Option<u64>> {
        Ok((from < self.len()?).then_some(from))
    }
    /// The first offset at or after `from` that is in a hole, as `lseek(SEEK_HOLE)` answers:
    /// the file's length when no hole comes before it (every file ends in an implicit hole).
    fn seek_hole(&self, from: u64) -> io::Result<u64> {
        Ok(self.len()?.max(from))
    }
}

/// The block size at which [`MemFs`] reports holes.
pub const MEM_HOLE_BLOCK_BYTES: u64 = 4096;

/// Chunk size of [`write_zeros`].
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Writes `len` zeros from offset 0, [`ZERO_CHUNK_BYTES`] at a time.
pub fn write_zeros<F: SegmentFile + ?Sized>(file: &F, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

pub trait FileSystem: Send + Sync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>>;
    /// Creates a new file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsync of the directory, making creations and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` for as long as the returned guard lives; fails with
    /// `WouldBlock` if another holder has it.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile(std::fs::File);

impl SegmentFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    /// `fallocate` (mode 0): the blocks are reserved as unwritten extents, which read as zeros,
    /// without writing 64 MiB of zeros through the page cache and the disk at every rotation
    /// (that burst competed with the acknowledging fdatasyncs and tripled their p99). Where
    /// the filesystem cannot (`EOPNOTSUPP`), the zeros are written.
    fn allocate(&self, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => write_zeros(self, len),
            Err(e) => Err(e.into()),
        }
    }
    /// `posix_fadvise(DONTNEED)` over the whole file (a length of 0 means to its end).
    fn release_cache(&self) -> io::Result<()> {
        rustix::fs::fadvise(&self.0, 0, 0, rustix::fs::Advice::DontNeed).map_err(Into::into)
    }
    fn release_cache_range(&self, offset: u64, len: u64) -> io::Result<()> {
        // A length of 0 would mean "to the end of the file" to fadvise.
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fadvise(&self.0, offset, len, rustix::fs::Advice::DontNeed).map_err(Into::into)
    }
    /// `lseek(SEEK_DATA)`. A preallocated segment's blocks past its data are `fallocate`'s
    /// unwritten extents, which ext4 and XFS report as holes (unless their zero pages are in
    /// the page cache, which recovery therefore drops), so recovery need not read 64 MiB of
    /// zeros. Where the filesystem does not support the query, everything is data.
    fn seek_data(&self, from: u64) -> io::Result<Option<u64>> {
        let Ok(at) = i64::try_from(from) else {
            return Ok(None);
        };
        match rustix::fs::seek(&self.0, rustix::fs::SeekFrom::Data(at)) {
            Ok(at) => Ok(Some(at)),
            Err(e) if e == rustix::io::Errno::NXIO => Ok(None),
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::OPNOTSUPP => {
                Ok((from < self.len()?).then_some(from))
            }
            Err(e) => Err(e.into()),
        }
    }
    /// `lseek(SEEK_HOLE)`; the file's length where the query is not supported.
    fn seek_hole(&self, from: u64) -> io::Result<u64> {
        let Ok(at) = i64::try_from(from) else {
            return self.len();
        };
        match rustix::fs::seek(&self.0, rustix::fs::SeekFrom::Hole(at)) {
            Ok(at) => Ok(at),
            Err(e)
                if e == rustix::io::Errno::NXIO
                    || e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::OPNOTSUPP =>
            {
                Ok(self.len()?.max(from))
            }
            Err(e) => Err(e.into()),
        }
    }
}

struct LockGuard(#[allow(dead_code)] std::fs::File);

impl FileSystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(io::Error::from)?;
        Ok(Box::new(LockGuard(f)))
    }
}

/// An in-memory filesystem that models what a crash keeps: everything synced survives; of the
/// writes since a file's last sync, a prefix survives in order and the last surviving one may be
/// torn at any byte; files created since the directory's last sync may vanish.
///
/// It reports every [`MEM_HOLE_BLOCK_BYTES`] block that holds only zeros as a hole, as a
/// filesystem that detects zero blocks (ZFS with compression) does: more holes than ext4 would
/// report, and inside frames too, so that every test on it checks that readers skipping holes
/// read exactly what reading every byte would. [`MemFs::without_holes`] reports none.
#[derive(Default)]
pub struct MemFs {
    state: Mutex<MemState>,
    /// Set by [`MemFs::without_holes`]: every file is data from start to end.
    no_holes: bool,
}

#[derive(Default)]
struct MemState {
    files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// Names made durable by a directory sync.
    durable_names: BTreeSet<PathBuf>,
    locked: BTreeSet<PathBuf>,
}

#[derive(Default)]
struct MemFile {
    inner: Mutex<MemFileInner>,
    /// Copied from [`MemFs::no_holes`] when the file is created.
    no_holes: bool,
}

#[derive(Default, Clone)]
struct MemFileInner {
    data: Vec<u8>,
    synced: Vec<u8>,
    /// Writes and truncations since the last sync, in order.
    unsynced: Vec<MemOp>,
}

#[derive(Clone)]
enum MemOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(data: &mut Vec<u8>, op: &MemOp) {
    match op {
        MemOp::Write(off, bytes) => {
            let end = *off as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*off as usize..end].copy_from_slice(bytes);
        }
        MemOp::SetLen(len) => data.resize(*len as usize, 0),
    }
}

impl MemFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemFileInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SegmentFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = self.lock();
        let start = (offset as usize).min(f.data.len());
        let n = buf.len().min(f.data.len() - start);
        buf[..n].copy_from_slice(&f.data[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut f = self.lock();
        let op = MemOp::Write(offset, buf.to_vec());
        apply(&mut f.data, &op);
        f.unsynced.push(op);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut f = self.lock();
        f.synced = f.data.clone();
        f.unsynced.clear();
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut f = self.lock();
        let op = MemOp::SetLen(len);
        apply(&mut f.data, &op);
        f.unsynced.push(op);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }
    fn seek_data(&self, from: u64) -> io::Result<Option<u64>> {
        let f = self.lock();
        let len = f.data.len() as u64;
        if self.no_holes {
            return Ok((from < len).then_some(from));
        }
        let mut block = from - from % MEM_HOLE_BLOCK_BYTES;
        while block < len {
            if !mem_block_is_hole(&f.data, block) {
                return Ok(Some(block.max(from)));
            }
            block += MEM_HOLE_BLOCK_BYTES;
        }
        Ok(None)
    }
    fn seek_hole(&self, from: u64) -> io::Result<u64> {
        let f = self.lock();
        let len = f.data.len() as u64;
        if self.no_holes {
            return Ok(len.max(from));
        }
        let mut block = from - from % MEM_HOLE_BLOCK_BYTES;
        while block < len {
            if mem_block_is_hole(&f.data, block) {
                return Ok(block.max(from));
            }
            block += MEM_HOLE_BLOCK_BYTES;
        }
        Ok(len.max(from))
    }
}

/// Whether the block of `data` starting at `block` (the last one may be short) is all zeros.
fn mem_block_is_hole(data: &[u8], block: u64) -> bool {
    let end = (block + MEM_HOLE_BLOCK_BYTES).min(data.len() as u64);
    data[block as usize..end as usize].iter().all(|&b| b == 0)
}

impl MemFs {
    pub fn new() -> MemFs {
        MemFs::default()
    }

    /// A `MemFs` that reports no holes: every byte of every file is data.
    pub fn without_holes() -> MemFs {
        MemFs {
            no_holes: true,
            ..MemFs::default()
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a crash: keeps what a real disk could have kept (see the type's doc), chosen
    /// by `rng`, and releases all locks.
    pub fn crash(&self, rng: &mut impl FnMut(u64) -> u64) {
        let mut st = self.state();
        st.locked.clear();
        let names: Vec<PathBuf> = st.files.keys().cloned().collect();
        for name in names {
            if !st.durable_names.contains(&name) && rng(2) == 0 {
                st.files.remove(&name);
                continue;
            }
            let file = st.files[&name].clone();
            let mut f = file.lock();
            let keep = rng(f.unsynced.len() as u64 + 1) as usize;
            let mut data = f.synced.clone();
            for op in &f.unsynced[..keep] {
                apply(&mut data, op);
            }
            if keep < f.unsynced.len() {
                if let MemOp::Write(off, bytes) = &f.unsynced[keep] {
                    let torn = rng(bytes.len() as u64 + 1) as usize;
                    apply(&mut data, &MemOp::Write(*off, bytes[..torn].to_vec()));
                }
            }
            f.data = data.clone();
            f.synced = data;
            f.unsynced.clear();
        }
        st.durable_names = st.files.keys().cloned().collect();
    }

    /// Direct access to a file's bytes, for corruption tests.
    pub fn bytes(&self, path: &Path) -> Option<Vec<u8>> {
        self.state().files.get(path).map(|f| f.lock().data.clone())
    }

    /// Sets a file's bytes as if written and synced, creating the file (with a durable name)
    /// if it does not exist.
    pub fn set_bytes(&self, path: &Path, bytes: Vec<u8>) {
        let mut st = self.state();
        let no_holes = self.no_holes;
        let file = st
            .files
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                Arc::new(MemFile {
                    no_holes,
                    ..MemFile::default()
                })
            })
            .clone();
        st.durable_names.insert(path.to_path_buf());
        let mut g = file.lock();
        g.data = bytes.clone();
        g.synced = bytes;
        g.unsynced.clear();
    }
}

struct MemLock {
    fs: Arc<MemFs>,
    path: PathBuf,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        self.fs.state().locked.remove(&self.path);
    }
}

/// `MemFs` is used through an `Arc` so locks can release themselves.
impl FileSystem for Arc<MemFs> {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .state()
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        match self.state().files.get(path) {
            Some(f) => Ok(f.clone()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
        }
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        let mut st = self.state();
        if st.files.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let f = Arc::new(MemFile {
            no_holes: self.no_holes,
            ..MemFile::default()
        });
        st.files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state();
        st.files.remove(path);
        st.durable_names.remove(path);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.state();
        let names: Vec<PathBuf> = st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        st.durable_names.extend(names);
        Ok(())
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        let mut st = self.state();
        if !st.locked.insert(path.to_path_buf()) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "locked"));
        }
        Ok(Box::new(MemLock {
            fs: self.clone(),
            path: path.to_path_buf(),
        }))
    }
}

/// Wraps a filesystem and fails on command: fdatasync with EIO, writes with ENOSPC (after
/// writing half the buffer, like a real short write), creations with ENOSPC.
pub struct FaultFs<F> {
    inner: F,
    pub faults: Arc<Faults>,
}

#[derive(Default)]
pub struct Faults {
    /// Counts fdatasyncs down: the one that brings it from 1 to 0 fails with EIO. 0 = off.
    pub syncs_until_failure: AtomicU64,
    /// While set, every write fails with ENOSPC after writing half its bytes.
    pub enospc_writes: AtomicBool,
    /// While set, writes at or past this offset fail with ENOSPC (u64::MAX = off).
    pub enospc_from_offset: AtomicU64,
    /// While set, files created fail every write with ENOSPC (a full disk seen at rotation).
    pub enospc_new_files: AtomicBool,
    /// While set, creating a file fails with EMFILE and creates nothing (no descriptor free).
    pub emfile_creates: AtomicBool,
    /// While set, opening a directory to fsync it fails with EMFILE.
    pub emfile_dir_syncs: AtomicBool,
    /// While set, removing a file fails with EIO and leaves it.
    pub fail_removes: AtomicBool,
    /// While set, every read of a segment fails with EIO (a device failing under a running
    /// daemon); `reads_failed` counts them.
    pub fail_reads: AtomicBool,
    pub reads_failed: AtomicU64,
    /// Counts removals down: the one that brings it from 1 to 0 fails with EIO and leaves the
    /// file. 0 = off.
    pub removes_until_failure: AtomicU64,
    /// Directory fsyncs that succeeded.
    pub dir_syncs: AtomicU64,
    /// While set, an fdatasync waits until it is cleared (a slow disk), after counting itself
    /// in `syncs_held`: a test can then queue requests behind the writer.
    pub hold_syncs: AtomicBool,
    pub syncs_held: AtomicU64,
    /// Once set, an fdatasync also waits while this file exists: the same hold, for a test
    /// that drives a daemon from outside (the daemon's `SPOOLGATE_FAILPOINT_HOLD_FSYNC_WHILE`).
    /// A held fdatasync says so by creating the file's name with `.held` appended.
    pub hold_while_exists: std::sync::OnceLock<PathBuf>,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults {
            enospc_from_offset: AtomicU64::new(u64::MAX),
            ..Default::default()
        })
    }
}

impl<F: FileSystem> FaultFs<F> {
    pub fn new(inner: F, faults: Arc<Faults>) -> FaultFs<F> {
        FaultFs { inner, faults }
    }
}

struct FaultFile {
    inner: Arc<dyn SegmentFile>,
    faults: Arc<Faults>,
    /// Created while `enospc_new_files` was set.
    born_full: bool,
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl SegmentFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            self.faults.reads_failed.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let limit = self.faults.enospc_from_offset.load(Ordering::SeqCst);
        if self.born_full
            || self.faults.enospc_writes.load(Ordering::SeqCst)
            || offset + buf.len() as u64 > limit
        {
            let half = buf.len() / 2;
            self.inner.write_all_at(&buf[..half], offset)?;
            return Err(enospc());
        }
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        let held_by_file = || {
            self.faults
                .hold_while_exists
                .get()
                .is_some_and(|p| p.exists())
        };
        if self.faults.hold_syncs.load(Ordering::SeqCst) || held_by_file() {
            self.faults.syncs_held.fetch_add(1, Ordering::SeqCst);
            if let Some(path) = self.faults.hold_while_exists.get() {
                let mut held = path.clone().into_os_string();
                held.push(".held");
                // Only a signal for the test; failing to make it fails the test, not the sync.
                let _ = std::fs::write(held, b"");
            }
            while self.faults.hold_syncs.load(Ordering::SeqCst) || held_by_file() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let left = self.faults.syncs_until_failure.load(Ordering::SeqCst);
        if left > 0 {
            self.faults
                .syncs_until_failure
                .store(left - 1, Ordering::SeqCst);
            if left == 1 {
                return Err(io::Error::from_raw_os_error(5));
            }
        }
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn release_cache(&self) -> io::Result<()> {
        self.inner.release_cache()
    }
    fn release_cache_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.release_cache_range(offset, len)
    }
    fn seek_data(&self, from: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(from)
    }
    fn seek_hole(&self, from: u64) -> io::Result<u64> {
        self.inner.seek_hole(from)
    }
}

impl<F: FileSystem> FileSystem for FaultFs<F> {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(FaultFile {
            inner: self.inner.open(path)?,
            faults: self.faults.clone(),
            born_full: false,
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        if self.faults.emfile_creates.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::MFILE.raw_os_error(),
            ));
        }
        Ok(Arc::new(FaultFile {
            inner: self.inner.create(path)?,
            faults: self.faults.clone(),
            born_full: self.faults.enospc_new_files.load(Ordering::SeqCst),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let countdown = self.faults.removes_until_failure.fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if self.faults.fail_removes.load(Ordering::SeqCst) || countdown == Ok(1) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.faults.emfile_dir_syncs.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::MFILE.raw_os_error(),
            ));
        }
        self.inner.sync_dir(dir)?;
        self.faults.dir_syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        self.inner.lock(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allocated_segment_file_has_its_full_length_reads_as_zeros_and_keeps_what_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("allocated.seg");
        let file = StdFs.create(&path).expect("create");
        let len = 3 * ZERO_CHUNK_BYTES as u64 + 4096 + 8;
        file.allocate(len).expect("allocate");
        assert_eq!(file.len().expect("len"), len);
        file.write_all_at(b"spoolgate", 5000).expect("write inside");
        file.sync_data().expect("sync");
        let mut back = vec![0xffu8; len as usize];
        let mut at = 0usize;
        while at < back.len() {
            let n = file.read_at(&mut back[at..], at as u64).expect("read");
            assert!(n > 0, "short file at {at}");
            at += n;
        }
        assert_eq!(&back[5000..5009], b"spoolgate");
        back[5000..5009].fill(0);
        assert!(
            back.iter().all(|&b| b == 0),
            "every other byte reads as zero"
        );
        assert_eq!(
            file.len().expect("len"),
            len,
            "a write inside changes no size"
        );
    }

    #[test]
    fn the_zero_writing_allocation_makes_the_same_file() {
        let fs = Arc::new(MemFs::new());
        let path = Path::new("/spool/zeros.seg");
        let file = fs.create(path).expect("create");
        file.allocate(ZERO_CHUNK_BYTES as u64 + 24)
            .expect("allocate");
        let bytes = fs.bytes(path).expect("file exists");
        assert_eq!(bytes.len(), ZERO_CHUNK_BYTES + 24);
        assert!(bytes.iter().all(|&b| b == 0));
    }
}
