//! spoolgate: a sidecar that never loses what it has acknowledged.
//!
//! The module layout follows the data flow:
//!
//! ```text
//!  HTTP POST ──► ingest ──► spool (segments, group commit, fdatasync) ──► 202
//!                              │ commit observer
//!                              ▼
//!                            ring (bounded; overflow = read back from segments)
//!                              │
//!                              ▼
//!        forward: dispatcher ──► worker per slot set (slots)
//!                   gate (classify) ─► chain (seq + SHA-256 link) ─► seal record in spool
//!                   ─► sink (file | http) ─► tombstone record in spool
//!                              │
//!                              ▼
//!                          compaction (delete fully tombstoned segment prefix)
//! ```
//!
//! - [`config`]: every key and bound, defaults, file/env/flag layering.
//! - [`envelope`]: Envelope v1 and its canonical msgpack encoding.
//! - `msgpack`: the bounded msgpack reader under the direct decoders of envelopes and request
//!   bodies.
//! - [`ingest`]: the HTTP front end: parsing, validation, auth, dedup, backpressure.
//! - [`spool`]: the segment log: framing, group commit, recovery, reader, filesystem seam.
//! - [`ring`]: the bounded memory ring between the spool writer and the consumer.
//! - [`gate`]: PII detection and policy, rules (tags, intent, routing), extractive summary.
//! - [`chain`]: per-stream sequence numbers and hash links, seals, the heads checkpoint;
//!   `verify` of a sink's output (`chain/verify.rs`) and of a spool's seals
//!   (`chain/verify_spool.rs`); restoring a damaged heads checkpoint (`chain/restore.rs`).
//! - [`slots`]: stream → slot mapping and the slot ownership table.
//! - [`forward`]: sinks, batching, retries, dead letters, workers, tombstones, replay.
//! - [`compaction`]: deleting segments whose records are all complete, and the disk reserve
//!   that lets it run on a full filesystem (`compaction/reserve.rs`).
//! - [`metrics`]: every exported metric, in one place.
//! - [`daemon`]: start-up, recovery, readiness and graceful shutdown; [`drill`] and [`loadgen`]
//!   are the operator tools behind `spoolgate drill` and `spoolgate bench`.

pub mod chain;
pub mod compaction;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod envelope;
pub mod forward;
pub mod gate;
pub mod ingest;
pub mod loadgen;
pub mod metrics;
mod msgpack;
pub mod ring;
pub mod slots;
pub mod spool;
