//! A directory spoolgate writes into and others empty (the file sink's output, the dead
//! letters), made to exist durably before anything confirmed goes into it.
//!
//! Files fsync'd into a directory whose own entry a power loss can take are lost with it, after
//! their records were tombstoned. So the directory is created if need be and the parent of each
//! directory created is fsync'd, and so is the directory's own parent even when it was there
//! already (an earlier run may have been killed between creating it and that fsync). The list
//! of what to fsync is fixed before anything is created, so a retry after a failed fsync syncs
//! what the first attempt created, rather than finding it there and skipping it. Once that has
//! succeeded it is not done again, unless the directory is found removed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct DurableDir {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    durable: bool,
    /// The directories whose fsync makes the entry durable, fixed at the first attempt.
    to_sync: Option<Vec<PathBuf>>,
    /// Whether the directory was there at the first attempt (nothing to create): only then
    /// may its parent's fsync be skipped for want of permission.
    existed: bool,
}

impl DurableDir {
    pub fn new(dir: &Path) -> DurableDir {
        DurableDir {
            dir: dir.to_path_buf(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory exist durably (see the module doc). Blocking.
    pub fn ensure(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.durable && self.dir.is_dir() {
            return Ok(());
        }
        if state.durable || (state.existed && !self.dir.is_dir()) {
            // Removed since it was made durable, or since a first attempt found it there: what
            // to sync is worked out again for what must be created now.
            *state = State::default();
        }
        if state.to_sync.is_none() {
            state.existed = self.dir.is_dir();
            state.to_sync = Some(parents_to_sync(&self.dir)?);
        }
        let existed = state.existed;
        std::fs::create_dir_all(&self.dir)?;
        for dir in state.to_sync.iter().flatten() {
            match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
                Ok(()) => {}
                // The parent of a directory that was there already is synced only in case an
                // earlier run was killed before it could: a parent this process may not open
                // (mode 0711, say) must not stop it, as it did not create anything in it.
                Err(e) if existed && e.kind() == std::io::ErrorKind::PermissionDenied => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the parent of an existing output directory; going on");
                }
                Err(e) => return Err(e),
            }
        }
        state.durable = true;
        Ok(())
    }

    #[cfg(test)]
    fn to_sync(&self) -> Option<Vec<PathBuf>> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_sync
            .clone()
    }
}

/// The parent of each missing ancestor of `dir` (itself included), then `dir`'s own parent.
fn parents_to_sync(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let absolute = std::path::absolute(dir)?;
    let mut parents: Vec<PathBuf> = Vec::new();
    let mut missing = Some(absolute.as_path());
    while let Some(d) = missing.filter(|d| !d.is_dir()) {
        parents.extend(d.parent().map(Path::to_path_buf));
        missing = d.parent();
    }
    if let Some(parent) = absolute.parent() {
        if !parents.iter().any(|p| p == parent) {
            parents.push(parent.to_path_buf());
        }
    }
    Ok(parents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parents_of_every_directory_made_are_synced_and_the_own_parent_always() {
        let scratch = tempfile::tempdir().unwrap();
        let root = std::path::absolute(scratch.path()).unwrap();
        let d = DurableDir::new(&scratch.path().join("a/b/out"));
        d.ensure().unwrap();
        assert!(root.join("a/b/out").is_dir());
        assert_eq!(
            d.to_sync(),
            Some(vec![root.join("a/b"), root.join("a"), root.clone()])
        );
        // There already: only its own parent.
        let again = DurableDir::new(&scratch.path().join("a/b/out"));
        again.ensure().unwrap();
        assert_eq!(again.to_sync(), Some(vec![root.join("a/b")]));
    }

    #[test]
    fn a_directory_removed_after_it_was_made_durable_is_made_again() {
        let scratch = tempfile::tempdir().unwrap();
        let root = std::path::absolute(scratch.path()).unwrap();
        let d = DurableDir::new(&scratch.path().join("x/out"));
        d.ensure().unwrap();
        std::fs::remove_dir_all(scratch.path().join("x")).unwrap();
        d.ensure().unwrap();
        assert!(root.join("x/out").is_dir());
        assert_eq!(d.to_sync(), Some(vec![root.join("x"), root.clone()]));
    }
}
