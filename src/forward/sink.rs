//! The sink interface and how a configured sink is built.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::chain::SharedRecord;
use crate::config::SinkConfig;

/// How a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying later (5xx, 408, 429, connection and I/O errors).
    #[error("retryable: {reason}")]
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The sink refused the batch for good (4xx other than 408/429): dead-letter it.
    #[error("rejected with status {status}: {reason}")]
    Rejected { status: u16, reason: String },
    /// The sink closed the connection while the batch was being sent, without an answer.
    /// Retried like [`SinkError::Retryable`]; but a server with a body limit may answer 413 as
    /// soon as it has the request's head and close without reading the body, and the client
    /// then sees only the closed connection, so a batch cut off several times running is
    /// split in halves as after a 413 (see `worker`).
    #[error("retryable: {reason}")]
    CutOff { reason: String },
}

pub type DeliverFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for forward records. `deliver` returns Ok only once the sink has the whole
/// batch durably (the file sink after fdatasync, the HTTP sink on a 2xx).
pub trait Sink: Send + Sync {
    fn name(&self) -> &str;
    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a>;
}

#[derive(Debug, thiserror::Error)]
pub enum SinkBuildError {
    #[error("sink {name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// Builds every configured sink.
pub fn build_sinks(
    configs: &BTreeMap<String, SinkConfig>,
    data_dir: &Path,
) -> Result<BTreeMap<String, Arc<dyn Sink>>, SinkBuildError> {
    let mut out: BTreeMap<String, Arc<dyn Sink>> = BTreeMap::new();
    for (name, cfg) in configs {
        let sink: Arc<dyn Sink> = match cfg {
            SinkConfig::File {
                file_bytes_max,
                dir_bytes_max,
                ..
            } => {
                let dir = cfg
                    .file_dir(name, data_dir)
                    .expect("a file sink has a directory");
                Arc::new(
                    super::file_sink::FileSink::open(name, &dir, *file_bytes_max, *dir_bytes_max)
                        .map_err(|e| SinkBuildError::Invalid {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?,
                )
            }
            SinkConfig::Http {
                url,
                format,
                timeout_ms,
                headers,
            } => Arc::new(
                super::http_sink::HttpSink::new(
                    name,
                    url,
                    *format,
                    Duration::from_millis(*timeout_ms),
                    headers.clone(),
                )
                .map_err(|reason| SinkBuildError::Invalid {
                    name: name.clone(),
                    reason,
                })?,
            ),
        };
        out.insert(name.clone(), sink);
    }
    Ok(out)
}
