//! Forwarding: everything between a committed envelope and its tombstone.
//!
//! - [`pipeline`]: the dispatcher (reads the spool in log order, ring first) and the
//!   supervisor (runs workers in epochs, hands a failed worker's slots to its secondary);
//! - [`worker`]: gate → chain → seal → sink → tombstone for one batch at a time;
//! - [`ledger`]: what is pending, sealed and complete, rebuilt at start-up by one scan;
//! - [`sink`], [`file_sink`], [`http_sink`]: where records go; sinks do no metrics or retries,
//!   the worker owns both; [`json`] writes their JSON (serde_json's bytes, faster);
//! - [`retry`]: exponential backoff with full jitter, honouring `Retry-After`;
//! - [`dead_letter`]: batches a sink permanently rejected, kept on disk with the reason;
//! - [`dir_bound`]: the byte bound on the directories spoolgate fills and others empty (the
//!   file sink's output, the dead letters).

pub mod dead_letter;
pub mod dir_bound;
pub mod file_sink;
pub mod http_sink;
pub mod json;
pub mod ledger;
pub mod pipeline;
pub mod retry;
pub mod sink;
pub mod worker;
