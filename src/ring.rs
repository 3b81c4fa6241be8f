//! The memory ring: a bounded queue of freshly committed records between the spool writer and
//! the consumer, so that in the steady state the consumer never reads back what was just
//! written.
//!
//! The ring is an optimisation, never a source of truth. The writer pushes every committed
//! record in log order (control records such as seals and tombstones as empty markers, so the
//! sequence of positions stays contiguous). When the ring is full the push is dropped and
//! counted (`spoolgate_ring_overflows_total`); ingest is never blocked and nothing is lost,
//! because the consumer notices the discontinuity — the ring's front is past its cursor, or the
//! ring is empty while the spool's durable end is past its cursor — and reads the missing
//! records back from the segments until it meets the ring again.
//!
//! Bounds: `ring.capacity_records` records and `ring.capacity_bytes` payload bytes.
//!
//! The ring also keeps what the pending gauges need about envelopes committed but not yet read
//! by the dispatcher (which the ledger cannot know of): how many, their payload bytes, and
//! when the oldest of them was committed, from a [`Timeline`] of commit windows. With
//! forwarding disabled nothing reads the ring, so it buffers nothing
//! ([`Ring::counting_only`]) and only keeps that count.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;
use crate::spool::{CommitObserver, Position, Record, RecordKind};

/// What the consumer finds at its cursor.
#[derive(Debug)]
pub enum RingRead {
    /// The record at the cursor.
    Record(Record),
    /// The ring cannot serve the cursor; read the segments from the cursor instead.
    Gap,
    /// Nothing buffered at or after the cursor.
    Empty,
}

struct Inner {
    queue: VecDeque<Record>,
    bytes: usize,
}

/// Length of one window of the commit timeline.
pub const TIMELINE_WINDOW_MS: u64 = 100;
/// Bound on the timeline's windows; past it, neighbouring windows are merged in pairs.
pub const TIMELINE_WINDOWS_MAX: usize = 4096;

/// Envelopes committed since start-up, and when, in windows of at least
/// [`TIMELINE_WINDOW_MS`]: for each window, the envelopes and payload bytes committed before it
/// and the time it began. The oldest envelope not yet read lies in the last window beginning at
/// or before it, so that window's start is a lower bound on its commit time: the age reported
/// is never less than the true one, and at most one window more. Memory is bounded by
/// [`TIMELINE_WINDOWS_MAX`]; merging keeps each pair's first start, so the bound stays a lower
/// one while the windows (and the overstatement) grow with the unread backlog's age.
#[derive(Debug, Default)]
pub struct Timeline {
    windows: VecDeque<Window>,
    envelopes: u64,
    bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    envelopes_before: u64,
    bytes_before: u64,
    began_ms: u64,
}

/// Envelopes committed and not yet read by the dispatcher.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unread {
    pub envelopes: u64,
    pub bytes: u64,
    /// No later than the oldest one's commit time (ms since the Unix epoch); `None` when none.
    pub oldest_ms: Option<u64>,
}

impl Timeline {
    pub fn committed(&mut self, envelopes: u64, bytes: u64, now_ms: u64) {
        if envelopes == 0 {
            return;
        }
        let open = self
            .windows
            .back()
            .is_some_and(|w| now_ms < w.began_ms.saturating_add(TIMELINE_WINDOW_MS));
        if !open {
            if self.windows.len() >= TIMELINE_WINDOWS_MAX {
                // Keep every other window: each kept one now also covers the one after it.
                let mut i = 0;
                self.windows.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
            }
            self.windows.push_back(Window {
                envelopes_before: self.envelopes,
                bytes_before: self.bytes,
                began_ms: now_ms,
            });
        }
        self.envelopes += envelopes;
        self.bytes += bytes;
    }

    /// What is unread once the first `read_envelopes` envelopes (`read_bytes` of payload)
    /// committed since start-up have been read. Forgets the windows wholly read.
    pub fn unread(&mut self, read_envelopes: u64, read_bytes: u64) -> Unread {
        while self
            .windows
            .get(1)
            .is_some_and(|next| next.envelopes_before <= read_envelopes)
        {
            self.windows.pop_front();
        }
        if read_envelopes >= self.envelopes {
            return Unread::default();
        }
        Unread {
            envelopes: self.envelopes - read_envelopes,
            bytes: self.bytes.saturating_sub(read_bytes),
            oldest_ms: self.windows.front().map(|w| w.began_ms),
        }
    }

    pub fn envelopes(&self) -> u64 {
        self.envelopes
    }
}

pub struct Ring {
    inner: Mutex<Inner>,
    /// Envelope records committed since start-up (pushed or not), for the pending gauges.
    timeline: Mutex<Timeline>,
    notify: tokio::sync::Notify,
    capacity_records: usize,
    capacity_bytes: usize,
    /// False when nothing reads the ring (forwarding disabled): it then holds no records.
    buffering: bool,
    metrics: Arc<Metrics>,
}

impl Ring {
    pub fn new(capacity_records: usize, capacity_bytes: usize, metrics: Arc<Metrics>) -> Ring {
        assert!(
            capacity_records > 0 && capacity_bytes > 0,
            "ring bounds must be positive"
        );
        metrics.ring_capacity_records.set(capacity_records as i64);
        Ring {
            inner: Mutex::new(Inner {
                queue: VecDeque::with_capacity(capacity_records.min(4096)),
                bytes: 0,
            }),
            notify: tokio::sync::Notify::new(),
            timeline: Mutex::new(Timeline::default()),
            capacity_records,
            capacity_bytes,
            buffering: true,
            metrics,
        }
    }

    /// A ring for a daemon that does not forward: it keeps the commit timeline for the pending
    /// gauges and no records (nothing would take them, and it would sit full, counting
    /// overflows that no consumer reads back).
    pub fn counting_only(metrics: Arc<Metrics>) -> Ring {
        let ring = Ring {
            buffering: false,
            ..Ring::new(1, 1, metrics)
        };
        ring.metrics.ring_capacity_records.set(0);
        ring
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every mutation
        // is a single push or pop), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the record at `cursor`, discarding buffered records before it (the consumer
    /// already read those from the segments).
    pub fn take_at(&self, cursor: Position) -> RingRead {
        let mut inner = self.lock();
        let read = loop {
            let Some(front) = inner.queue.front() else {
                break RingRead::Empty;
            };
            if front.position < cursor {
                let dropped = inner.queue.pop_front().expect("front exists");
                inner.bytes -= dropped.payload.len();
                continue;
            }
            if front.position > cursor {
                // Something between the cursor and the front was not pushed (overflow), or the
                // cursor sits at the end of a segment and the front starts the next one; only
                // the segments can tell, so the consumer reads them.
                break RingRead::Gap;
            }
            let record = inner.queue.pop_front().expect("front exists");
            inner.bytes -= record.payload.len();
            break RingRead::Record(record);
        };
        // Stale records dropped on the way count too, whatever was found.
        self.metrics
            .ring_depth_records
            .set(inner.queue.len() as i64);
        read
    }

    /// What was committed and not yet read, given what the dispatcher has read live (see
    /// [`Timeline::unread`]).
    pub fn unread(&self, read_envelopes: u64, read_bytes: u64) -> Unread {
        self.unread_with(|| (read_envelopes, read_bytes))
    }

    /// [`Ring::unread`] with what was read taken by `read` while the timeline is locked, so
    /// that concurrent callers (a scrape and the compaction loop) see the read count only grow:
    /// the timeline forgets the windows read, and a caller with an older, smaller count would
    /// otherwise date its oldest unread envelope by a later window.
    pub fn unread_with(&self, read: impl FnOnce() -> (u64, u64)) -> Unread {
        let mut timeline = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let (read_envelopes, read_bytes) = read();
        timeline.unread(read_envelopes, read_bytes)
    }

    /// Waits until something was pushed after the last wake-up.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    pub fn envelopes_committed(&self) -> u64 {
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .envelopes()
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CommitObserver for Ring {
    fn on_commit(&self, records: Vec<Record>) {
        let (envelopes, bytes) = records
            .iter()
            .filter(|r| r.kind == RecordKind::ENVELOPE)
            .fold((0u64, 0u64), |(n, b), r| {
                (n + 1, b + r.payload.len() as u64)
            });
        self.timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed(envelopes, bytes, crate::ingest::now_ms());
        if !self.buffering {
            return;
        }
        let mut inner = self.lock();
        let mut overflowed = 0u64;
        for r in records {
            let record = if r.kind == RecordKind::ENVELOPE {
                r
            } else {
                Record {
                    payload: bytes::Bytes::new(),
                    ..r
                }
            };
            let len = record.payload.len();
            if inner.queue.len() >= self.capacity_records || inner.bytes + len > self.capacity_bytes
            {
                overflowed += 1;
                continue;
            }
            inner.bytes += len;
            inner.queue.push_back(record);
        }
        self.metrics
            .ring_depth_records
            .set(inner.queue.len() as i64);
        drop(inner);
        if overflowed > 0 {
            self.metrics.ring_overflows_total.inc_by(overflowed);
        }
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(offset: u64, len: usize) -> Record {
        Record {
            position: Position { segment: 1, offset },
            kind: RecordKind::ENVELOPE,
            payload: Bytes::from(vec![0u8; len]),
            next: Position {
                segment: 1,
                offset: offset + 10,
            },
        }
    }

    #[test]
    fn records_come_out_in_order_at_the_cursor() {
        let ring = Ring::new(8, 1024, Arc::new(Metrics::new()));
        ring.on_commit(vec![rec(0, 1), rec(10, 1)]);
        let RingRead::Record(r) = ring.take_at(Position {
            segment: 1,
            offset: 0,
        }) else {
            panic!("expected a record")
        };
        assert_eq!(r.position.offset, 0);
        let RingRead::Record(r) = ring.take_at(r.next) else {
            panic!("expected a record")
        };
        assert_eq!(r.position.offset, 10);
        assert!(matches!(ring.take_at(r.next), RingRead::Empty));
    }

    #[test]
    fn a_full_ring_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new());
        let ring = Ring::new(2, 1024, metrics.clone());
        ring.on_commit(vec![rec(0, 1), rec(10, 1), rec(20, 1)]);
        assert_eq!(ring.len(), 2);
        assert_eq!(metrics.ring_overflows_total.get(), 1);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let ring = Ring::new(100, 10, Arc::new(Metrics::new()));
        ring.on_commit(vec![rec(0, 6), rec(10, 6)]);
        assert_eq!(ring.len(), 1);
    }

    #[test]
    fn a_front_past_the_cursor_is_a_gap_and_stale_records_are_discarded() {
        let ring = Ring::new(8, 1024, Arc::new(Metrics::new()));
        ring.on_commit(vec![rec(20, 1), rec(30, 1)]);
        assert!(matches!(
            ring.take_at(Position {
                segment: 1,
                offset: 0
            }),
            RingRead::Gap
        ));
        // The consumer read 20 from disk; the ring's copy of 20 is stale and skipped.
        let RingRead::Record(r) = ring.take_at(Position {
            segment: 1,
            offset: 30,
        }) else {
            panic!("expected a record")
        };
        assert_eq!(r.position.offset, 30);
    }

    #[test]
    fn stale_records_dropped_before_a_gap_or_empty_leave_the_depth_gauge_at_what_is_held() {
        let metrics = Arc::new(Metrics::new());
        let ring = Ring::new(8, 1024, metrics.clone());
        ring.on_commit(vec![rec(0, 1), rec(10, 1), rec(20, 1)]);
        assert_eq!(metrics.ring_depth_records.get(), 3);
        // The consumer read all three from the segments and asks for what follows.
        assert!(matches!(
            ring.take_at(Position {
                segment: 1,
                offset: 30
            }),
            RingRead::Empty
        ));
        assert_eq!(metrics.ring_depth_records.get(), 0);
    }

    #[test]
    fn a_counting_only_ring_holds_nothing_and_counts_no_overflow_but_counts_commits() {
        let metrics = Arc::new(Metrics::new());
        let ring = Ring::counting_only(metrics.clone());
        assert_eq!(metrics.ring_capacity_records.get(), 0);
        ring.on_commit(vec![rec(0, 5), rec(10, 7)]);
        assert!(ring.is_empty());
        assert_eq!(metrics.ring_overflows_total.get(), 0);
        let unread = ring.unread(0, 0);
        assert_eq!((unread.envelopes, unread.bytes), (2, 12));
        assert!(unread.oldest_ms.is_some());
    }

    #[test]
    fn the_timeline_dates_the_oldest_unread_envelope_by_the_window_it_was_committed_in() {
        let mut t = Timeline::default();
        t.committed(3, 30, 1_000);
        t.committed(2, 20, 1_050); // same window
        t.committed(4, 40, 1_200);
        t.committed(1, 10, 1_400);
        assert_eq!(
            t.unread(0, 0),
            Unread {
                envelopes: 10,
                bytes: 100,
                oldest_ms: Some(1_000)
            }
        );
        // Four read: the fifth was committed in the first window still.
        assert_eq!(t.unread(4, 40).oldest_ms, Some(1_000));
        // Five read: the oldest unread is the first of the window that began at 1,200.
        assert_eq!(
            t.unread(5, 50),
            Unread {
                envelopes: 5,
                bytes: 50,
                oldest_ms: Some(1_200)
            }
        );
        assert_eq!(t.unread(10, 100), Unread::default());
        // Windows wholly read are forgotten.
        assert_eq!(t.windows.len(), 1);
    }

    #[test]
    fn the_timeline_stays_bounded_and_never_dates_an_envelope_later_than_its_commit() {
        let mut t = Timeline::default();
        let windows = TIMELINE_WINDOWS_MAX as u64 * 3;
        for w in 0..windows {
            t.committed(1, 1, w * TIMELINE_WINDOW_MS);
        }
        assert!(t.windows.len() <= TIMELINE_WINDOWS_MAX);
        // Envelope k was committed at k windows; its date must be at or before that, and
        // not by more than the few windows that merging joined.
        for k in [0, 1, 777, 4_095, 4_096, 9_000, windows - 1] {
            let mut probe = Timeline {
                windows: t.windows.clone(),
                envelopes: t.envelopes,
                bytes: t.bytes,
            };
            let oldest = probe.unread(k, k).oldest_ms.unwrap();
            assert!(oldest <= k * TIMELINE_WINDOW_MS, "envelope {k}: {oldest}");
            assert!(
                oldest + 16 * TIMELINE_WINDOW_MS >= k * TIMELINE_WINDOW_MS,
                "envelope {k}: {oldest}"
            );
        }
    }

    #[test]
    fn control_records_are_kept_as_empty_markers() {
        let ring = Ring::new(8, 4, Arc::new(Metrics::new()));
        let mut seal = rec(0, 100);
        seal.kind = RecordKind::SEALED;
        ring.on_commit(vec![seal]);
        let RingRead::Record(r) = ring.take_at(Position {
            segment: 1,
            offset: 0,
        }) else {
            panic!("expected a record")
        };
        assert!(r.payload.is_empty());
    }
}
