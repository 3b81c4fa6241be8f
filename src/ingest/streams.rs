//! The bound on streams. Every stream (an envelope's tenant, or its source when it has no
//! tenant) gets a hash chain head that lives for as long as the spool does: in memory, in the
//! `chain-heads` checkpoint and in the consumer's state. Stream names come from clients, so
//! without a bound a client sending a new `source` per request would grow all three forever.
//!
//! Ingest therefore admits at most `ingest.streams_max` distinct streams. The set is rebuilt at
//! start-up from the chain heads and the envelopes still in the spool, so a restart does not
//! forget a stream. A request naming a stream beyond the bound is refused with 422 before
//! anything of it is written; requests for known streams are unaffected. A name is admitted
//! before its request is written, so a request that then fails still counts its new streams:
//! the set may hold a few names that have no chain head, never the other way round.

use std::collections::HashSet;
use std::sync::Mutex;

pub struct KnownStreams {
    names: Mutex<HashSet<String>>,
    streams_max: usize,
}

/// A request would add a stream beyond the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimit {
    /// Index in the request of the first envelope whose stream does not fit.
    pub index: usize,
    pub stream: String,
    pub streams_max: usize,
}

impl KnownStreams {
    pub fn new(streams_max: usize) -> KnownStreams {
        KnownStreams {
            names: Mutex::new(HashSet::new()),
            streams_max,
        }
    }

    /// Records a stream found at start-up. It is kept even past the bound (say the bound was
    /// lowered): those streams keep working, and only new ones are refused.
    pub fn insert_recovered(&self, stream: &str) {
        let mut names = self.lock();
        if !names.contains(stream) {
            names.insert(stream.to_owned());
        }
    }

    /// Admits every stream of one request, or none of them.
    pub fn admit<'a>(&self, streams: impl IntoIterator<Item = &'a str>) -> Result<(), StreamLimit> {
        let mut names = self.lock();
        let mut new: Vec<&str> = Vec::new();
        for (index, stream) in streams.into_iter().enumerate() {
            if names.contains(stream) || new.contains(&stream) {
                continue;
            }
            if names.len() + new.len() >= self.streams_max {
                return Err(StreamLimit {
                    index,
                    stream: stream.to_owned(),
                    streams_max: self.streams_max,
                });
            }
            new.push(stream);
        }
        for stream in new {
            names.insert(stream.to_owned());
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set stays consistent even if a holder panicked: every change is one insert.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_streams_are_always_admitted_and_new_ones_only_up_to_the_bound() {
        let s = KnownStreams::new(2);
        assert_eq!(s.admit(["a", "a", "b"]), Ok(()));
        assert_eq!(s.admit(["b", "a"]), Ok(()));
        let err = s.admit(["a", "c"]).unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.stream, "c");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_refused_request_admits_none_of_its_new_streams() {
        let s = KnownStreams::new(3);
        s.insert_recovered("a");
        let err = s.admit(["b", "c", "d"]).unwrap_err();
        assert_eq!(err.index, 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.admit(["b", "c"]), Ok(()));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn streams_recovered_past_the_bound_keep_working() {
        let s = KnownStreams::new(1);
        s.insert_recovered("a");
        s.insert_recovered("b");
        assert_eq!(s.admit(["b", "a"]), Ok(()));
        assert!(s.admit(["c"]).is_err());
    }
}
