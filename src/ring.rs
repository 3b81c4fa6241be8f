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

pub struct Ring {
    inner: Mutex<Inner>,
    /// Envelope records committed since start-up (pushed or not), for the pending gauge.
    envelopes_committed: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
    capacity_records: usize,
    capacity_bytes: usize,
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
            envelopes_committed: std::sync::atomic::AtomicU64::new(0),
            capacity_records,
            capacity_bytes,
            metrics,
        }
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
        loop {
            let Some(front) = inner.queue.front() else {
                return RingRead::Empty;
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
                return RingRead::Gap;
            }
            let record = inner.queue.pop_front().expect("front exists");
            inner.bytes -= record.payload.len();
            self.metrics
                .ring_depth_records
                .set(inner.queue.len() as i64);
            return RingRead::Record(record);
        }
    }

    /// Waits until something was pushed after the last wake-up.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    pub fn envelopes_committed(&self) -> u64 {
        self.envelopes_committed
            .load(std::sync::atomic::Ordering::Relaxed)
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
        let mut inner = self.lock();
        let mut overflowed = 0u64;
        let envelopes = records
            .iter()
            .filter(|r| r.kind == RecordKind::ENVELOPE)
            .count();
        self.envelopes_committed
            .fetch_add(envelopes as u64, std::sync::atomic::Ordering::Relaxed);
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
