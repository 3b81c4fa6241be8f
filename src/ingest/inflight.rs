//! The bound on request bodies held in memory at once.
//!
//! Each request may carry up to `ingest.body_bytes_max` and up to `ingest.connections_max`
//! connections may be sending one, so without a shared budget the worst case is their product
//! (16 GiB with the defaults), far more than a sidecar may take from its host. A request
//! therefore takes its body's bytes from a budget of `ingest.inflight_bytes_max` before reading
//! the body, and gives them back when its response is ready; the body, the parsed envelopes and
//! their encoded frames live within that window. Once the body is read, the request also takes
//! what parsing it may build, by the number of values and envelopes in it (`values`), since a
//! body dense with small values or small envelopes decodes to many times its size.
//!
//! A request that finds the budget spent is answered 429 at once, with `Retry-After` and the
//! same body as the disk watermarks' refusals, before any of its body is read: waiting instead
//! would hold its connection and its unread bytes in the kernel's buffers, and a client already
//! handles 429 for the watermarks. The bytes taken are the declared `Content-Length`; a chunked
//! body, whose size is unknown until it ends, takes `ingest.body_bytes_max` and gives back
//! what it did not use once it has been read.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::backpressure::{Refusal, RETRY_AFTER_MIN_SECS};

pub struct InflightBudget {
    permits: Arc<Semaphore>,
    bytes_max: u64,
    /// `spoolgate_ingest_inflight_bytes`: bytes taken now.
    gauge: IntGauge,
}

/// Bytes taken from the budget; given back when dropped.
pub struct InflightBytes {
    permit: Option<OwnedSemaphorePermit>,
    budget: Arc<InflightBudget>,
}

impl InflightBudget {
    pub fn new(bytes_max: u64, gauge: IntGauge) -> Arc<InflightBudget> {
        let permits = usize::try_from(bytes_max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(InflightBudget {
            permits: Arc::new(Semaphore::new(permits)),
            bytes_max: permits as u64,
            gauge,
        })
    }

    fn taken_bytes(&self) -> u64 {
        self.bytes_max - self.permits.available_permits() as u64
    }

    fn update_gauge(&self) {
        self.gauge
            .set(i64::try_from(self.taken_bytes()).unwrap_or(i64::MAX));
    }

    /// Takes `bytes` for one request, or says why not.
    pub fn take(self: &Arc<Self>, bytes: u64) -> Result<InflightBytes, Refusal> {
        let refusal = || Refusal {
            reason: "inflight_bytes",
            limit: "ingest.inflight_bytes_max",
            limit_bytes: self.bytes_max,
            current_bytes: self.taken_bytes(),
            retry_after_secs: RETRY_AFTER_MIN_SECS,
        };
        // A body larger than u32::MAX is refused by ingest.body_bytes_max (at most 1 GiB) first.
        let n = u32::try_from(bytes).map_err(|_| refusal())?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| refusal())?;
        self.update_gauge();
        Ok(InflightBytes {
            permit: Some(permit),
            budget: self.clone(),
        })
    }
}

impl InflightBytes {
    /// Gives back what was taken beyond `bytes` (a chunked body's reservation, once the body
    /// has been read and its size is known). Never takes more.
    pub fn shrink_to(&mut self, bytes: u64) {
        let Some(permit) = self.permit.as_mut() else {
            return;
        };
        let keep = usize::try_from(bytes).unwrap_or(usize::MAX);
        if let Some(excess) = permit.num_permits().checked_sub(keep).filter(|n| *n > 0) {
            drop(permit.split(excess));
            self.budget.update_gauge();
        }
    }
}

impl Drop for InflightBytes {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.budget.update_gauge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_refused_past_the_budget_and_given_back_when_dropped() {
        let gauge = IntGauge::new("inflight", "test").unwrap();
        let budget = InflightBudget::new(1_000, gauge.clone());
        let a = budget.take(600).unwrap();
        assert_eq!(gauge.get(), 600);
        let refused = budget.take(500).err().unwrap();
        assert_eq!(refused.reason, "inflight_bytes");
        assert_eq!(refused.limit_bytes, 1_000);
        assert_eq!(refused.current_bytes, 600);
        let b = budget.take(400).unwrap();
        assert_eq!(gauge.get(), 1_000);
        drop(a);
        assert_eq!(gauge.get(), 400);
        let c = budget.take(500).unwrap();
        drop((b, c));
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_reservation_shrunk_to_its_body_gives_back_the_rest_and_never_grows() {
        let gauge = IntGauge::new("inflight", "test").unwrap();
        let budget = InflightBudget::new(1_000, gauge.clone());
        let mut chunked = budget.take(1_000).unwrap();
        assert!(budget.take(1).is_err());
        chunked.shrink_to(300);
        assert_eq!(gauge.get(), 300);
        let other = budget.take(700).unwrap();
        chunked.shrink_to(900);
        assert_eq!(gauge.get(), 1_000);
        chunked.shrink_to(0);
        assert_eq!(gauge.get(), 700);
        drop((chunked, other));
        assert_eq!(gauge.get(), 0);
    }
}
