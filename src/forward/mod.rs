//! Forwarding: everything between a committed envelope and its tombstone.
//!
//! - [`pipeline`]: the dispatcher (reads the spool in log order, ring first) and the
//!   supervisor (runs workers in epochs, hands a failed worker's slots to its secondary);
//! - [`worker`]: gate → chain → seal → sink → tombstone for one batch at a time;
//! - [`ledger`]: what is pending, sealed and complete, rebuilt at start-up by one scan;
//! - [`sink`], [`file_sink`], [`http_sink`]: where records go; sinks do no metrics or retries,
//!   the worker owns both; [`json`] writes their JSON (serde_json's bytes, faster);
//! - [`retry`]: exponential backoff with jitter, honouring `Retry-After` up to a bound;
//! - [`dead_letter`]: batches a sink permanently rejected, kept on disk with the reason;
//!   [`dead_letter_resend`]: reading them back for `spoolgate dead-letter list|resend`;
//! - [`dir_bound`]: the byte bound on the directories spoolgate fills and others empty (the
//!   file sink's output, the dead letters); [`durable_dir`]: making them exist durably.

pub mod dead_letter;
pub mod dead_letter_resend;
pub mod dir_bound;
pub mod durable_dir;
pub mod file_sink;
pub mod http_sink;
pub mod json;
pub mod ledger;
pub mod pipeline;
pub mod retry;
pub mod sink;
pub mod worker;

/// Runs blocking file work (dead letters) from async code: on a multi-threaded runtime through
/// `block_in_place`, so the runtime moves its other tasks (ingest among them) to another
/// thread meanwhile; elsewhere (a current-thread runtime in tests) directly.
pub fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
