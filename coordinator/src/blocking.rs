//! A blocking client of an [`InferenceService`], for the commands that run requests without a
//! server (`herd generate`, `eval`, `bench`): they submit through the same seam as the API and
//! wait for the events of all their requests together.

use crate::api::service::{EventStream, InferenceService, ServiceError, Submission};
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use herd_worker::engine::request::Event;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("starting the client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("no event from any request within {0:?}")]
    Timeout(Duration),
}

/// Requests in flight on one service, each known by the caller's key.
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    service: Arc<dyn InferenceService>,
    streams: SelectAll<BoxStream<'static, (usize, Event)>>,
    /// Longest wait for any event before the service is declared stuck (`None`: wait).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient").field("in_flight", &self.streams.len()).finish()
    }
}

impl BlockingClient {
    pub fn new(service: Arc<dyn InferenceService>, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ClientError::Runtime)?;
        Ok(Self { runtime, service, streams: SelectAll::new(), timeout })
    }

    /// Start a request. A refusal the service knows at once is an error here; one that only
    /// the engine can make arrives as the request's `Aborted` event.
    pub fn submit(&mut self, key: usize, submission: Submission) -> Result<(), ClientError> {
        let stream = self.service.submit(submission)?;
        self.streams.push(tagged(key, stream));
        Ok(())
    }

    /// Requests that have not had their final event.
    pub fn in_flight(&self) -> usize {
        self.streams.len()
    }

    /// The next event of any request in flight, with the key it was submitted under; `None`
    /// once every request has ended.
    pub fn next_event(&mut self) -> Result<Option<(usize, Event)>, ClientError> {
        if self.streams.is_empty() {
            return Ok(None);
        }
        let next = self.streams.next();
        match self.timeout {
            None => Ok(self.runtime.block_on(next)),
            Some(t) => self
                .runtime
                .block_on(async { tokio::time::timeout(t, next).await })
                .map_err(|_| ClientError::Timeout(t)),
        }
    }
}

/// One request's events under its key; a refusal after submission becomes its `Aborted` event.
/// (A stream the service drops without a final event just ends: callers count final events.)
fn tagged(key: usize, mut stream: EventStream) -> BoxStream<'static, (usize, Event)> {
    futures::stream::once(async move {
        let first = match stream.admitted().await {
            Ok(()) => None,
            Err(e) => {
                Some(Event::Aborted { id: 0, reason: herd_worker::engine::request::AbortReason::engine(e.to_string()) })
            }
        };
        (first, stream)
    })
    .flat_map(move |(refused, stream)| match refused {
        Some(event) => futures::stream::once(async move { (key, event) }).boxed(),
        None => stream.map(move |e| (key, e)).boxed(),
    })
    .boxed()
}
