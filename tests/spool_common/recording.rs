//! A filesystem that logs what the spool does to its files: every write (where, how long,
//! whether all zeros) and every release of a file's cached pages.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use spoolgate::spool::fs::{FileSystem, SegmentFile, StdFs};

/// One write as the spool issued it.
#[derive(Debug, Clone)]
pub struct Write {
    pub path: String,
    pub offset: u64,
    pub len: u64,
    pub all_zero: bool,
}

#[derive(Default)]
pub struct Log {
    pub writes: Vec<Write>,
    /// Paths whose cached pages the spool released, in order.
    pub released: Vec<String>,
}

impl Log {
    /// The ids of the segments in `dir` whose pages were released, in order.
    pub fn released_segments(&self, dir: &Path) -> Vec<u64> {
        self.released
            .iter()
            .map(|p| {
                let name = Path::new(p)
                    .strip_prefix(dir)
                    .expect("in the spool directory");
                let stem = name.to_str().unwrap().trim_end_matches(".seg");
                stem.parse().expect("a segment file")
            })
            .collect()
    }
}

pub struct RecordingFs {
    pub log: Arc<Mutex<Log>>,
}

struct RecordingFile {
    inner: Arc<dyn SegmentFile>,
    path: String,
    log: Arc<Mutex<Log>>,
}

impl SegmentFile for RecordingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.lock().unwrap().writes.push(Write {
            path: self.path.clone(),
            offset,
            len: buf.len() as u64,
            all_zero: buf.iter().all(|&b| b == 0),
        });
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        // Reserve without writing, as fallocate does, so the log holds only the spool's writes.
        self.inner.set_len(len)
    }
    fn release_cache(&self) -> io::Result<()> {
        self.log.lock().unwrap().released.push(self.path.clone());
        self.inner.release_cache()
    }
}

impl FileSystem for RecordingFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(RecordingFile {
            inner: StdFs.open(path)?,
            path: path.display().to_string(),
            log: self.log.clone(),
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(RecordingFile {
            inner: StdFs.create(path)?,
            path: path.display().to_string(),
            log: self.log.clone(),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        StdFs.lock(path)
    }
}
