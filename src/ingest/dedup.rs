//! The dedup index: an `id` seen again within the window is answered with its original
//! position instead of being written twice, so a client may retry any request whose answer it
//! did not see.
//!
//! Only ids a client chose are indexed: an id spoolgate generated for an envelope that came
//! without one can never be retried (the retry gets a new id), and indexing it would let
//! id-less traffic evict the ids of clients that rely on dedup. At start-up the envelope
//! records do not say whose id they carry, but a generated id carries a check value (see
//! `ingest::ids`), so every envelope still in the spool whose id lacks it is indexed: client
//! ids, and generated ids of spools written before the check (which errs on the side of
//! deduplicating and stays within the bound).
//!
//! Memory: one entry costs about 310 bytes with 45-byte keys (a million entries, measured
//! 2026-11-23: 311 B each, 345 B before each key kept a single place in the order queue):
//! the map slot, the shared key, its place in the order queue and in its segment's list.
//!
//! Keys are `(tenant, id)`: ids are the client's, so two tenants may use the same one. Entries
//! expire after `ingest.dedup_window_secs` and the index holds at most `ingest.dedup_entries_max`
//! entries (oldest evicted first), so memory is bounded whatever the traffic. The index is
//! rebuilt at start-up from the dedup checkpoints compaction wrote for the segments it deleted
//! (entries keep their original age, see `dedup_file`) and from the envelope records still in
//! the spool (their window restarts at start-up, which errs on the side of deduplicating).
//!
//! An id that is being written by one request is *pending*: a concurrent request with the same
//! id gets 409 and retries, rather than both being written. A pending id becomes done on the
//! spool's writer thread, by a commit hook ([`Completion`]), before its record can be read,
//! forwarded or compacted: compaction checkpoints the done entries of the segments it deletes,
//! so an id completed any later could leave with its segment unrecorded and be written twice by
//! a retry after a restart. An append that fails, or a request dropped half-way, releases its
//! pending ids instead.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ingest::dedup_file::DedupEntry;
use crate::spool::Position;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Being written. `queued` is false once expiry passed the key's place in the order queue
    /// while it was pending (pending entries are never evicted); completion then queues it
    /// again.
    Pending {
        queued: bool,
    },
    Done {
        position: Position,
        slot: u16,
    },
}

/// A key is stored once and shared by the map, the order queue and the per-segment lists, so a
/// million entries cost one copy of each key.
type Key = Arc<str>;

/// An entry and when its window started (its reservation, or its completion when it had to be
/// queued again). In a `Cell` so that one lookup both finds the stored key and updates the
/// entry; the map is only ever touched under the index's mutex.
type Slot = Cell<(Entry, Instant)>;

/// Places of removed keys the order queue may hold beyond twice the map's entries before
/// [`Dedup::abort`] drops them.
const ORDER_STALE_SLACK: usize = 4096;

struct Inner {
    /// Keys are chosen by clients, so the hasher is seeded per process (foldhash's
    /// `RandomState`), which keeps collisions from being precomputed.
    map: HashMap<Key, Slot, foldhash::fast::RandomState>,
    /// Insertion order, for expiry and eviction: one place per key, taken when it is reserved.
    /// May hold keys already removed or re-inserted; those are recognised by their timestamp
    /// and skipped. Bounded by `2 * map.len() + ORDER_STALE_SLACK` (see [`Dedup::abort`]).
    order: VecDeque<(Key, Instant)>,
    /// Completed keys by the segment their envelope is in, in completion order: what
    /// compaction checkpoints before deleting a segment, found without walking the whole map.
    /// May hold keys since evicted or completed again elsewhere; those are recognised by their
    /// position and skipped. Lists of segments already checkpointed are dropped at the next
    /// checkpoint, so this holds at most one entry per envelope in the spool (bounded by the
    /// spool's quota).
    by_segment: BTreeMap<u64, Vec<(Key, Position)>>,
}

pub struct Dedup {
    inner: Mutex<Inner>,
    window: Duration,
    entries_max: usize,
}

/// The keys one request reserved, on their way to being written. The spool's commit hook
/// completes them with their positions (`complete`), on the writer thread, before the records
/// can be forwarded; if that never happens (the append failed, or the request was dropped
/// half-way) dropping this releases them, so a retry can write them.
pub struct Completion {
    dedup: Arc<Dedup>,
    /// One entry per record appended, in order: the key and slot of an envelope whose id the
    /// client chose, or `None` for one whose id spoolgate generated (never indexed, see
    /// `ingest`).
    reserved: Vec<Option<(String, u16)>>,
    done: bool,
}

impl Completion {
    pub fn new(dedup: Arc<Dedup>, reserved: Vec<Option<(String, u16)>>) -> Completion {
        Completion {
            dedup,
            reserved,
            done: false,
        }
    }

    /// Records where the reserved keys were written (one position per appended record, in
    /// order).
    pub fn complete(mut self, positions: &[Position]) {
        assert_eq!(
            positions.len(),
            self.reserved.len(),
            "one position per appended record"
        );
        let reserved = std::mem::take(&mut self.reserved);
        self.dedup.complete(
            reserved
                .into_iter()
                .zip(positions)
                .filter_map(|(r, p)| r.map(|(k, slot)| (k, *p, slot))),
        );
        self.done = true;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            self.dedup.abort(
                std::mem::take(&mut self.reserved)
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k),
            );
        }
    }
}

/// What `reserve` found for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// New id, now pending: write it, then `complete` or `abort`.
    Reserved,
    /// Already written at this position.
    Hit { position: Position, slot: u16 },
}

/// A key of the request is being written by another request right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub index: usize,
}

pub fn key(tenant: Option<&str>, id: &str) -> String {
    let mut k = String::with_capacity(id.len() + 1 + tenant.map_or(0, str::len));
    k.push_str(tenant.unwrap_or(""));
    k.push('\0');
    k.push_str(id);
    k
}

impl Dedup {
    pub fn new(window: Duration, entries_max: usize) -> Dedup {
        Dedup {
            inner: Mutex::new(Inner {
                map: HashMap::with_hasher(foldhash::fast::RandomState::default()),
                order: VecDeque::new(),
                by_segment: BTreeMap::new(),
            }),
            window,
            entries_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the map consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((_, at)) = inner.order.front() {
            let too_old = now.duration_since(*at) > self.window;
            let too_many = inner.map.len() > self.entries_max;
            if !too_old && !too_many {
                break;
            }
            let Some((k, at)) = inner.order.pop_front() else {
                break;
            };
            let Some(slot) = inner.map.get(&*k) else {
                continue;
            };
            match slot.get() {
                (_, stamped) if stamped != at => {}
                // Pending entries are never evicted: their request is still running. It is
                // queued again when it completes.
                (Entry::Pending { .. }, stamped) => {
                    slot.set((Entry::Pending { queued: false }, stamped));
                }
                (Entry::Done { .. }, _) => {
                    inner.map.remove(&k);
                }
            }
        }
    }

    /// Looks up every key of a request; new keys become pending. All-or-nothing: on a conflict
    /// nothing is reserved.
    pub fn reserve(&self, keys: &[String]) -> Result<Vec<Reservation>, Conflict> {
        if self.entries_max == 0 {
            return Ok(vec![Reservation::Reserved; keys.len()]);
        }
        let now = Instant::now();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let mut out = Vec::with_capacity(keys.len());
        for (index, k) in keys.iter().enumerate() {
            match inner.map.get(k.as_str()).map(Cell::get) {
                Some((Entry::Pending { .. }, _)) => return Err(Conflict { index }),
                Some((Entry::Done { position, slot }, _)) => {
                    out.push(Reservation::Hit { position, slot })
                }
                None => out.push(Reservation::Reserved),
            }
        }
        for (k, r) in keys.iter().zip(&out) {
            if *r == Reservation::Reserved {
                let k = Key::from(k.as_str());
                inner
                    .map
                    .insert(k.clone(), Cell::new((Entry::Pending { queued: true }, now)));
                inner.order.push_back((k, now));
            }
        }
        Ok(out)
    }

    /// Records where reserved keys were written. One lookup per key: the stored key is shared
    /// with the per-segment list, and the entry keeps the place in the order queue it took
    /// when it was reserved.
    pub fn complete(&self, written: impl IntoIterator<Item = (String, Position, u16)>) {
        if self.entries_max == 0 {
            return;
        }
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        for (k, position, slot) in written {
            let done = Entry::Done { position, slot };
            let key = match inner.map.get_key_value(k.as_str()) {
                Some((stored, cell)) => {
                    match cell.get() {
                        (Entry::Pending { queued: true }, stamped) => cell.set((done, stamped)),
                        // Expiry passed its place while it was pending, or it was already done
                        // (the same id found twice at start-up): it starts a window now.
                        _ => {
                            cell.set((done, now));
                            inner.order.push_back((stored.clone(), now));
                        }
                    }
                    stored.clone()
                }
                None => {
                    let stored = Key::from(k);
                    inner.map.insert(stored.clone(), Cell::new((done, now)));
                    inner.order.push_back((stored.clone(), now));
                    stored
                }
            };
            inner
                .by_segment
                .entry(position.segment)
                .or_default()
                .push((key, position));
        }
        self.expire(inner, now);
    }

    /// Releases reserved keys whose write failed, so a retry can write them.
    ///
    /// An aborted key leaves its place in the order queue behind, and nothing else removes it
    /// before the window has passed: expiry stops at the first live entry, and the map, which
    /// eviction counts, no longer holds the key. Refused requests (a full disk below the
    /// watermarks, clients that disconnect while they wait) would grow the queue by their ids
    /// for a whole window. So once the queue holds more than twice the map's entries (plus
    /// `ORDER_STALE_SLACK`), the places of removed keys are dropped: one pass over the queue per
    /// that many aborts.
    pub fn abort(&self, keys: impl IntoIterator<Item = String>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        for k in keys {
            if matches!(
                inner.map.get(k.as_str()).map(Cell::get),
                Some((Entry::Pending { .. }, _))
            ) {
                inner.map.remove(k.as_str());
            }
        }
        if inner.order.len() > 2 * inner.map.len() + ORDER_STALE_SLACK {
            let Inner { map, order, .. } = inner;
            order.retain(|(k, at)| map.get(&**k).is_some_and(|slot| slot.get().1 == *at));
        }
    }

    /// The completed entries whose envelopes are in segments `from..below`, with their
    /// wall-clock acceptance time: what compaction checkpoints before deleting those segments.
    /// Segments below `from` were checkpointed by an earlier call; their lists are dropped
    /// here. The lists of `from..below` stay until a later call moves `from` past them, so a
    /// pass that fails after this call can ask again. Under the lock only the shared keys of
    /// those segments are looked up (work proportional to the segments' envelopes, not to the
    /// index); the copies are made after it.
    pub fn entries_in_segments(&self, from: u64, below: u64, now_ms: u64) -> Vec<DedupEntry> {
        let now = Instant::now();
        let matched: Vec<(Key, Position, u16, Instant)> = {
            let mut inner = self.lock();
            inner.by_segment = inner.by_segment.split_off(&from);
            if from >= below {
                return Vec::new();
            }
            let inner = &*inner;
            inner
                .by_segment
                .range(from..below)
                .flat_map(|(_, keys)| keys)
                .filter_map(|(key, listed)| match inner.map.get(key).map(Cell::get) {
                    Some((Entry::Done { position, slot }, stamped)) if position == *listed => {
                        Some((key.clone(), position, slot, stamped))
                    }
                    _ => None,
                })
                .collect()
        };
        matched
            .into_iter()
            .map(|(key, position, slot, stamped)| {
                let age_ms = now.saturating_duration_since(stamped).as_millis() as u64;
                DedupEntry {
                    key: key.to_string(),
                    position,
                    slot,
                    accepted_ms: now_ms.saturating_sub(age_ms),
                }
            })
            .collect()
    }

    /// Adds an entry from a dedup checkpoint at start-up, keeping its original age, unless it
    /// has left the window or the key is already known. Returns whether it was added.
    pub fn insert_checkpointed(&self, entry: DedupEntry, now_ms: u64) -> bool {
        if self.entries_max == 0 {
            return false;
        }
        let age = Duration::from_millis(now_ms.saturating_sub(entry.accepted_ms));
        if age > self.window {
            return false;
        }
        let now = Instant::now();
        // Instant cannot go back before boot; such an entry restarts its window now, which
        // errs on the side of deduplicating.
        let stamped = now.checked_sub(age).unwrap_or(now);
        let mut inner = self.lock();
        if inner.map.contains_key(entry.key.as_str()) {
            return false;
        }
        let done = Entry::Done {
            position: entry.position,
            slot: entry.slot,
        };
        let key = Key::from(entry.key);
        inner.map.insert(key.clone(), Cell::new((done, stamped)));
        inner.order.push_back((key, stamped));
        self.expire(&mut inner, now);
        true
    }

    /// Adds an entry found in the spool at start-up.
    pub fn insert_recovered(&self, key: String, position: Position, slot: u16) {
        self.complete(std::iter::once((key, position, slot)));
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(offset: u64) -> Position {
        Position { segment: 1, offset }
    }

    #[test]
    fn aborted_reservations_do_not_grow_the_order_queue_beyond_its_bound() {
        let d = Dedup::new(Duration::from_secs(600), 100);
        let kept = key(None, "kept");
        d.reserve(std::slice::from_ref(&kept)).unwrap();
        d.complete([(kept.clone(), pos(64), 1)]);
        for n in 0..50_000 {
            let k = key(None, &format!("refused-{n}"));
            d.reserve(std::slice::from_ref(&k)).unwrap();
            d.abort([k]);
        }
        let inner = d.lock();
        assert!(
            inner.order.len() <= 2 * inner.map.len() + ORDER_STALE_SLACK,
            "{} places for {} entries",
            inner.order.len(),
            inner.map.len()
        );
        drop(inner);
        // The live entry kept its place and is still a hit.
        assert_eq!(
            d.reserve(&[kept]).unwrap(),
            vec![Reservation::Hit {
                position: pos(64),
                slot: 1
            }]
        );
    }

    #[test]
    fn a_completed_id_is_a_hit_with_its_original_position() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        let k = key(Some("t"), "a");
        assert_eq!(
            d.reserve(std::slice::from_ref(&k)).unwrap(),
            vec![Reservation::Reserved]
        );
        d.complete([(k.clone(), pos(5), 3)]);
        assert_eq!(
            d.reserve(&[k]).unwrap(),
            vec![Reservation::Hit {
                position: pos(5),
                slot: 3
            }]
        );
    }

    #[test]
    fn a_completion_records_positions_and_a_dropped_one_releases_its_keys() {
        let d = Arc::new(Dedup::new(Duration::from_secs(60), 10));
        let (a, b) = (key(None, "a"), key(None, "b"));
        d.reserve(&[a.clone(), b.clone()]).unwrap();
        // The record in the middle had a generated id: it takes a position, not an entry.
        Completion::new(
            d.clone(),
            vec![Some((a.clone(), 7)), None, Some((b.clone(), 8))],
        )
        .complete(&[pos(64), pos(96), pos(128)]);
        assert_eq!(
            d.reserve(&[a, b]).unwrap(),
            vec![
                Reservation::Hit {
                    position: pos(64),
                    slot: 7
                },
                Reservation::Hit {
                    position: pos(128),
                    slot: 8
                }
            ]
        );

        // A completion that never ran (its append failed or its request was dropped) frees
        // the ids for a retry instead of leaving them pending, which would answer 409 forever.
        let c = key(None, "c");
        d.reserve(std::slice::from_ref(&c)).unwrap();
        drop(Completion::new(d.clone(), vec![Some((c.clone(), 1)), None]));
        assert_eq!(d.reserve(&[c]).unwrap(), vec![Reservation::Reserved]);
    }

    #[test]
    fn a_pending_id_conflicts_and_nothing_else_is_reserved() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        d.reserve(&[key(None, "a")]).unwrap();
        let err = d.reserve(&[key(None, "b"), key(None, "a")]).unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(
            d.reserve(&[key(None, "b")]).unwrap(),
            vec![Reservation::Reserved]
        );
    }

    #[test]
    fn an_aborted_id_can_be_written_again() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        d.reserve(&[key(None, "a")]).unwrap();
        d.abort([key(None, "a")]);
        assert_eq!(
            d.reserve(&[key(None, "a")]).unwrap(),
            vec![Reservation::Reserved]
        );
    }

    #[test]
    fn the_same_id_of_two_tenants_is_two_keys() {
        assert_ne!(key(Some("a"), "x"), key(Some("b"), "x"));
        assert_ne!(key(None, "a\0x"), key(Some("a"), "x"));
    }

    #[test]
    fn the_entries_of_the_segments_being_deleted_are_the_current_ones_and_only_those() {
        let d = Dedup::new(Duration::from_secs(60), 4);
        let at = |segment, offset| Position { segment, offset };
        d.complete([
            (key(None, "evicted"), at(1, 0), 1),
            (key(None, "a"), at(1, 10), 1),
            (key(None, "moved"), at(1, 20), 2),
            (key(None, "b"), at(2, 0), 3),
            (key(None, "c"), at(3, 0), 4),
        ]);
        // The bound of 4 evicted the oldest entry, "evicted"; "moved" is written again later
        // (as after its window passed).
        d.complete([(key(None, "moved"), at(3, 10), 2)]);
        let names = |entries: Vec<DedupEntry>| -> Vec<(String, Position)> {
            entries
                .into_iter()
                .map(|e| (e.key.trim_start_matches('\0').to_string(), e.position))
                .collect()
        };
        let first = names(d.entries_in_segments(1, 3, 1_000));
        assert_eq!(
            first,
            vec![("a".to_string(), at(1, 10)), ("b".to_string(), at(2, 0))]
        );
        // A pass that failed after collecting asks again and gets the same entries.
        assert_eq!(names(d.entries_in_segments(1, 3, 1_000)), first);
        // Once a later pass starts at 3, segment 3's current entries are all it returns.
        assert_eq!(
            names(d.entries_in_segments(3, 4, 1_000)),
            vec![
                ("c".to_string(), at(3, 0)),
                ("moved".to_string(), at(3, 10))
            ]
        );
        assert!(d.entries_in_segments(1, 3, 1_000).is_empty());
    }

    #[test]
    fn an_id_still_pending_when_the_bound_passes_it_is_evicted_once_it_completes() {
        let d = Dedup::new(Duration::from_secs(60), 1);
        let (a, b) = (key(None, "a"), key(None, "b"));
        // Both pending at once: the bound of 1 passes both, but pending ids stay.
        d.reserve(std::slice::from_ref(&a)).unwrap();
        d.reserve(std::slice::from_ref(&b)).unwrap();
        assert_eq!(d.len(), 2);
        d.complete([(a.clone(), pos(1), 1)]);
        d.complete([(b.clone(), pos(2), 2)]);
        // Completion queued them again, so the bound holds again: the older one, a, is gone.
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.reserve(&[b]).unwrap(),
            vec![Reservation::Hit {
                position: pos(2),
                slot: 2
            }]
        );
        assert_eq!(d.reserve(&[a]).unwrap(), vec![Reservation::Reserved]);
    }

    #[test]
    fn the_entry_bound_evicts_the_oldest() {
        let d = Dedup::new(Duration::from_secs(60), 2);
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            d.insert_recovered(key(None, id), pos(n as u64), 0);
        }
        assert_eq!(d.len(), 2);
        assert_eq!(
            d.reserve(&[key(None, "a")]).unwrap(),
            vec![Reservation::Reserved]
        );
    }

    #[test]
    fn entries_expire_after_the_window() {
        let d = Dedup::new(Duration::ZERO, 10);
        d.insert_recovered(key(None, "a"), pos(1), 0);
        // With a zero window any later reservation finds the entry expired.
        assert_eq!(
            d.reserve(&[key(None, "a")]).unwrap(),
            vec![Reservation::Reserved]
        );
    }
}
