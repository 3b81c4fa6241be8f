//! The bound on streams. Every stream (an envelope's tenant, or its source when it has no
//! tenant) gets a hash chain head that lives for as long as the spool does: in memory, in the
//! `chain-heads` checkpoint and in the consumer's state. Stream names come from clients, so
//! without a bound a client sending a new `source` per request would grow all three forever.
//!
//! Ingest therefore admits at most `ingest.streams_max` distinct streams. The set is rebuilt at
//! start-up from the chain heads and the envelopes still in the spool, so a restart does not
//! forget a stream. A request naming a stream beyond the bound is refused with 422 before
//! anything of it is written; requests for known streams are unaffected. A name a request adds
//! is pending until its records are durable ([`Admission::commit`], from the spool's commit
//! hook); a request the spool refuses, or that is dropped before the spool took it, takes back
//! the names it added, unless another pending request named them too, so refused requests (a
//! full disk, a poisoned spool) cannot use up the bound. (A request the spool has queued is
//! written whether or not its client is still there, and keeps its names.) Pending names count against the bound, so
//! the set never misses a stream that has, or is about to have, a chain head.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct KnownStreams {
    names: Mutex<HashMap<String, Name>>,
    streams_max: usize,
}

/// A stream's state in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Name {
    /// An envelope of it is durable in the spool (or it was found at start-up).
    committed: bool,
    /// Requests that named it while it was not committed and are not done yet.
    pending: u32,
}

/// A request would add a stream beyond the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimit {
    /// Index in the request of the first envelope whose stream does not fit.
    pub index: usize,
    pub stream: String,
    pub streams_max: usize,
}

/// The names one request holds pending. Committed when its records are durable; dropped
/// uncommitted, it takes back the names no one else holds.
pub struct Admission {
    streams: Arc<KnownStreams>,
    pending: Vec<String>,
}

impl Admission {
    pub fn commit(mut self) {
        // The common request names only known streams: no lock on the writer thread for it.
        if self.pending.is_empty() {
            return;
        }
        let mut names = self.streams.lock();
        for stream in self.pending.drain(..) {
            if let Some(n) = names.get_mut(&stream) {
                n.committed = true;
                n.pending = n.pending.saturating_sub(1);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut names = self.streams.lock();
        for stream in self.pending.drain(..) {
            if let Some(n) = names.get_mut(&stream) {
                n.pending = n.pending.saturating_sub(1);
                if n.pending == 0 && !n.committed {
                    names.remove(&stream);
                }
            }
        }
    }
}

impl KnownStreams {
    pub fn new(streams_max: usize) -> KnownStreams {
        KnownStreams {
            names: Mutex::new(HashMap::new()),
            streams_max,
        }
    }

    /// Records a stream found at start-up. It is kept even past the bound (say the bound was
    /// lowered): those streams keep working, and only new ones are refused.
    pub fn insert_recovered(&self, stream: &str) {
        let mut names = self.lock();
        match names.get_mut(stream) {
            Some(n) => n.committed = true,
            None => {
                names.insert(
                    stream.to_owned(),
                    Name {
                        committed: true,
                        pending: 0,
                    },
                );
            }
        }
    }

    /// Admits every stream of one request, or none of them. The names it adds, and those it
    /// names that are still pending for another request, stay pending until the returned
    /// admission is committed or dropped.
    pub fn admit<'a>(
        self: &Arc<Self>,
        streams: impl IntoIterator<Item = &'a str>,
    ) -> Result<Admission, StreamLimit> {
        let mut names = self.lock();
        let mut new: Vec<&str> = Vec::new();
        let mut joined: Vec<&str> = Vec::new();
        for (index, stream) in streams.into_iter().enumerate() {
            if new.contains(&stream) || joined.contains(&stream) {
                continue;
            }
            match names.get(stream) {
                Some(n) if n.committed => continue,
                Some(_) => joined.push(stream),
                None if names.len() + new.len() >= self.streams_max => {
                    return Err(StreamLimit {
                        index,
                        stream: stream.to_owned(),
                        streams_max: self.streams_max,
                    });
                }
                None => new.push(stream),
            }
        }
        for stream in &joined {
            if let Some(n) = names.get_mut(*stream) {
                n.pending += 1;
            }
        }
        for stream in &new {
            names.insert(
                (*stream).to_owned(),
                Name {
                    committed: false,
                    pending: 1,
                },
            );
        }
        Ok(Admission {
            streams: self.clone(),
            pending: new.into_iter().chain(joined).map(str::to_owned).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name>> {
        // The set stays consistent even if a holder panicked: every change is one entry's.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(s: &Arc<KnownStreams>, streams: &[&str]) -> Result<(), StreamLimit> {
        s.admit(streams.iter().copied()).map(Admission::commit)
    }

    #[test]
    fn known_streams_are_always_admitted_and_new_ones_only_up_to_the_bound() {
        let s = Arc::new(KnownStreams::new(2));
        assert_eq!(admitted(&s, &["a", "a", "b"]), Ok(()));
        assert_eq!(admitted(&s, &["b", "a"]), Ok(()));
        let err = admitted(&s, &["a", "c"]).unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.stream, "c");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_refused_request_admits_none_of_its_new_streams() {
        let s = Arc::new(KnownStreams::new(3));
        s.insert_recovered("a");
        let err = admitted(&s, &["b", "c", "d"]).unwrap_err();
        assert_eq!(err.index, 2);
        assert_eq!(s.len(), 1);
        assert_eq!(admitted(&s, &["b", "c"]), Ok(()));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn streams_recovered_past_the_bound_keep_working() {
        let s = Arc::new(KnownStreams::new(1));
        s.insert_recovered("a");
        s.insert_recovered("b");
        assert_eq!(admitted(&s, &["b", "a"]), Ok(()));
        assert!(admitted(&s, &["c"]).is_err());
    }

    #[test]
    fn a_request_that_is_never_written_gives_its_new_streams_back() {
        let s = Arc::new(KnownStreams::new(1));
        let failed = s.admit(["a"]).unwrap();
        // While it is pending, the name counts against the bound.
        assert!(s.admit(["b"]).is_err());
        drop(failed);
        assert_eq!(s.len(), 0);
        assert_eq!(admitted(&s, &["b"]), Ok(()));
    }

    #[test]
    fn a_name_two_requests_hold_stays_while_either_may_still_write_it() {
        let s = Arc::new(KnownStreams::new(2));
        let first = s.admit(["a"]).unwrap();
        let second = s.admit(["a"]).unwrap();
        drop(first);
        assert_eq!(s.len(), 1, "the second request may still write a");
        second.commit();
        assert_eq!(s.len(), 1);
        let third = s.admit(["a", "b"]).unwrap();
        drop(third);
        assert_eq!(s.len(), 1, "a is committed; only b goes");
    }
}
