//! The seam between the HTTP API and whatever runs requests.
//!
//! The API validates and tokenizes a request, then hands token ids and sampling parameters to an
//! [`InferenceService`]. It gets back an [`EventStream`]: first an admission verdict
//! ([`EventStream::admitted`]), then the request's [`Event`]s until a final one. The service may be
//! an engine in this process ([`LocalService`], what `herd serve --workers 0` and the tests use) or
//! the coordinator's scheduler over worker control channels; the API cannot tell them apart.
//!
//! Dropping an [`EventStream`] before its final event cancels the request: the HTTP layer drops it
//! when the client goes away, and the service must then stop the work on the engine or worker.

use futures::Stream;
use herd_worker::engine::Engine;
pub use herd_worker::engine::Load;
use herd_worker::engine::request::{AbortReason, Event, Rejection, Request, RequestId};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::vision::PixelValues;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Where validated requests go: the coordinator's scheduler over worker control channels (the
/// API of a cluster, and `herd generate|eval|bench --workers N` over a static group), or an
/// engine in this process ([`LocalService`]: `--workers 0`, and tests).
pub trait InferenceService: Send + Sync + 'static {
    /// Start a request; events arrive on the returned stream until a final event
    /// (`Finished`/`Aborted`). Refusals known at once are errors here; refusals that only the
    /// engine can make arrive through [`EventStream::admitted`]. Dropping the stream cancels the
    /// request.
    fn submit(&self, submission: Submission) -> Result<EventStream, ServiceError>;
    /// For `/health`: ok when every worker is up on the current placement epoch.
    fn health(&self) -> Health;
    /// For the `/metrics` gauges.
    fn load(&self) -> Load;
}

/// A tokenized request, before the service gives it an id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Submission {
    pub prompt: Vec<u32>,
    /// The prompt's preprocessed images, in the order of its image blocks.
    pub images: Vec<PixelValues>,
    pub params: SamplingParams,
    /// Also report the prompt's per-position argmax and last logits (`herd eval`).
    pub prompt_logits: bool,
}

impl Submission {
    pub fn into_request(self, id: RequestId) -> Request {
        Request { id, prompt: self.prompt, params: self.params, prompt_logits: self.prompt_logits, images: self.images }
    }
}

/// Why a request could not be started.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ServiceError {
    /// Too much work queued; the client should retry later (HTTP 429).
    #[error("the server is overloaded; retry in {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    /// Nothing can run requests now: no workers, a failed engine, a placement change (HTTP 503).
    #[error("the inference service is unavailable: {reason}")]
    Unavailable { reason: String, retry_after_s: u64 },
    /// The engine refused this request; it would never run as given (HTTP 400, except
    /// `ShuttingDown` → 503 and `DuplicateId` → 500, which are not the client's fault).
    #[error("{0}")]
    Rejected(Rejection),
}

/// `/health`'s verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub ok: bool,
    /// Why not, when not ok.
    pub reason: Option<String>,
    /// A short JSON object for operators (workers, epoch, ...), merged into the response.
    pub detail: serde_json::Value,
}

/// What travels from a service to one [`EventStream`].
#[derive(Debug)]
enum Message {
    Admitted,
    Refused(ServiceError),
    Event(Event),
}

/// The service's end of one request's stream. Sending never blocks: a request produces at most
/// `max_tokens` + 2 messages, and `max_tokens` is capped by the API, so the buffer is bounded,
/// and an engine thread must never wait on one slow client.
#[derive(Debug)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<Message>,
}

impl EventSender {
    /// The engine accepted the request. Optional: a first event implies it.
    pub fn admit(&self) -> bool {
        self.tx.send(Message::Admitted).is_ok()
    }

    /// The engine refused the request; nothing else will follow.
    pub fn refuse(self, error: ServiceError) {
        let _ = self.tx.send(Message::Refused(error));
    }

    /// Deliver an event. False when the stream is gone (the client left): cancel the request.
    pub fn send(&self, event: Event) -> bool {
        self.tx.send(Message::Event(event)).is_ok()
    }

    /// Whether the stream has been dropped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

type CancelFn = Box<dyn FnOnce() + Send>;

/// One request's events, as the API sees them. A [`Stream`] of [`Event`]s that ends after the
/// final one (or when the service drops its [`EventSender`] without one).
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Message>,
    /// An event received while waiting for admission.
    peeked: Option<Event>,
    admitted: bool,
    /// A final event was seen or the request was refused: nothing to cancel.
    done: bool,
    on_cancel: Option<CancelFn>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("admitted", &self.admitted).field("done", &self.done).finish()
    }
}

impl EventStream {
    /// A connected pair. `on_cancel` runs if the stream is dropped before its request ended
    /// (typically: send a cancel command to the engine or worker holding it).
    pub fn channel(on_cancel: impl FnOnce() + Send + 'static) -> (EventSender, EventStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream =
            EventStream { rx, peeked: None, admitted: false, done: false, on_cancel: Some(Box::new(on_cancel)) };
        (EventSender { tx }, stream)
    }

    /// Wait until the service has admitted or refused the request. An error here means the
    /// request never ran; call once before reading events (later calls return `Ok`).
    pub async fn admitted(&mut self) -> Result<(), ServiceError> {
        if self.admitted {
            return Ok(());
        }
        match self.rx.recv().await {
            Some(Message::Admitted) => {}
            Some(Message::Event(event)) => self.peeked = Some(event),
            Some(Message::Refused(error)) => {
                self.done = true;
                return Err(error);
            }
            None => {
                self.done = true;
                return Err(ServiceError::Unavailable {
                    reason: "the inference service stopped before admitting the request".into(),
                    retry_after_s: 1,
                });
            }
        }
        self.admitted = true;
        Ok(())
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if let Some(event) = self.peeked.take() {
            self.done |= event.is_final();
            return Poll::Ready(Some(event));
        }
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Message::Admitted)) => self.admitted = true,
                Poll::Ready(Some(Message::Event(event))) => {
                    self.admitted = true;
                    self.done = event.is_final();
                    return Poll::Ready(Some(event));
                }
                Poll::Ready(Some(Message::Refused(error))) => {
                    // A refusal after admission should not happen; report it as an abort.
                    self.done = true;
                    return Poll::Ready(Some(Event::Aborted { id: 0, reason: AbortReason::engine(error.to_string()) }));
                }
                Poll::Ready(None) => {
                    // The service dropped the request without a final event (e.g. it shut down).
                    self.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.done
            && let Some(cancel) = self.on_cancel.take()
        {
            cancel();
        }
    }
}

/// What the engine thread is asked to do.
enum Command {
    Submit { request: Request, events: EventSender },
    Cancel(RequestId),
    Shutdown,
}

/// Counters the engine thread publishes for `health` and `load`.
#[derive(Debug, Default)]
struct Shared {
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_usage_bits: AtomicU64,
    /// Submitted and not yet ended (includes commands still in the channel).
    in_flight: AtomicUsize,
    /// Set when the engine failed; the service then refuses everything.
    failed: Mutex<Option<String>>,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

/// An [`Engine`] in this process, owned by a dedicated thread that steps it while it has work
/// and takes submissions and cancellations through a channel between steps.
///
/// A std thread rather than a tokio task: a step is a long stretch of CPU work that must not
/// stall the async runtime serving HTTP.
pub struct LocalService {
    commands: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    max_in_flight: usize,
}

impl std::fmt::Debug for LocalService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalService").field("load", &self.load()).finish()
    }
}

impl LocalService {
    /// Start the engine thread. Submissions beyond `max_in_flight` requests (running and
    /// waiting) are refused with [`ServiceError::Overloaded`].
    pub fn start(engine: Engine, max_in_flight: usize) -> std::io::Result<Self> {
        let (commands, rx) = std_mpsc::channel();
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("herd-engine".into())
            .spawn(move || EngineLoop { engine, shared: thread_shared, routes: HashMap::new() }.run(&rx))?;
        Ok(Self { commands, shared, next_id: AtomicU64::new(0), max_in_flight })
    }
}

impl Drop for LocalService {
    fn drop(&mut self) {
        // Streams still alive hold senders for their cancellations, so the channel alone would
        // not end the thread.
        let _ = self.commands.send(Command::Shutdown);
    }
}

impl InferenceService for LocalService {
    fn submit(&self, submission: Submission) -> Result<EventStream, ServiceError> {
        if let Some(reason) = self.shared.failure() {
            return Err(ServiceError::Unavailable { reason, retry_after_s: 5 });
        }
        let in_flight = self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if in_flight >= self.max_in_flight {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ServiceError::Overloaded { retry_after_s: 1 });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = self.commands.clone();
        let (events, stream) = EventStream::channel(move || {
            let _ = cancel.send(Command::Cancel(id));
        });
        let request = submission.into_request(id);
        if self.commands.send(Command::Submit { request, events }).is_err() {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ServiceError::Unavailable { reason: "the engine thread has stopped".into(), retry_after_s: 5 });
        }
        Ok(stream)
    }

    fn health(&self) -> Health {
        let load = self.load();
        let detail = serde_json::json!({
            "backend": "in-process",
            "running": load.running,
            "waiting": load.waiting,
        });
        match self.shared.failure() {
            None => Health { ok: true, reason: None, detail },
            Some(reason) => Health { ok: false, reason: Some(reason), detail },
        }
    }

    fn load(&self) -> Load {
        Load {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.waiting.load(Ordering::Relaxed),
            kv_usage: f64::from_bits(self.shared.kv_usage_bits.load(Ordering::Relaxed)),
        }
    }
}

/// The engine thread's state.
struct EngineLoop {
    engine: Engine,
    shared: Arc<Shared>,
    routes: HashMap<RequestId, EventSender>,
}

impl EngineLoop {
    fn run(mut self, rx: &std_mpsc::Receiver<Command>) {
        loop {
            // Idle: sleep until a command arrives. Busy: take what is queued and step.
            let first = if self.engine.has_work() {
                rx.try_recv().ok()
            } else {
                match rx.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                }
            };
            let mut shutdown = false;
            for command in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match command {
                    Command::Submit { request, events } => self.submit(request, events),
                    Command::Cancel(id) => {
                        self.engine.cancel(id);
                    }
                    Command::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                let events = self.engine.abort_all(&AbortReason::ShuttingDown { what: "the server".into() });
                self.route(events);
                break;
            }
            // Counters are published before events are routed, so that a client that has seen
            // its request end also sees it gone from the load.
            self.publish();
            let events = self.engine.take_events();
            self.route(events);
            if self.engine.has_work() {
                match self.engine.step() {
                    Ok((events, _)) => {
                        self.publish();
                        self.route(events);
                    }
                    Err(e) => {
                        let error = format!("the engine failed: {e}");
                        tracing::error!("{error}");
                        *self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
                        let events = self.engine.abort_all(&AbortReason::engine(error));
                        self.publish();
                        self.route(events);
                        break;
                    }
                }
            }
            self.publish();
        }
        // Whatever is still routed never gets a final event; dropping the senders ends their
        // streams, which the API reports as aborted.
        self.shared.in_flight.fetch_sub(self.routes.len(), Ordering::SeqCst);
        self.routes.clear();
        self.publish();
    }

    fn submit(&mut self, request: Request, events: EventSender) {
        let id = request.id;
        if events.is_closed() {
            // The client left before the engine saw the request.
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        match self.engine.submit(request) {
            Ok(()) => {
                events.admit();
                self.routes.insert(id, events);
            }
            Err(rejection) => {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                events.refuse(ServiceError::Rejected(rejection));
            }
        }
    }

    fn route(&mut self, events: Vec<Event>) {
        for event in events {
            let id = event.id();
            let last = event.is_final();
            let Some(sender) = self.routes.get(&id) else { continue };
            if !sender.send(event) && !last {
                // Nobody listens any more; the cancel command may still be on its way.
                self.engine.cancel(id);
            }
            if last {
                self.routes.remove(&id);
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn publish(&self) {
        self.shared.running.store(self.engine.running(), Ordering::Relaxed);
        self.shared.waiting.store(self.engine.waiting(), Ordering::Relaxed);
        self.shared.kv_usage_bits.store(self.engine.kv_usage().to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use herd_worker::engine::stop::StopReason;
    use std::sync::atomic::AtomicBool;

    fn flagged() -> (Arc<AtomicBool>, impl FnOnce() + Send + 'static) {
        let flag = Arc::new(AtomicBool::new(false));
        let set = flag.clone();
        (flag, move || set.store(true, Ordering::SeqCst))
    }

    fn finished() -> Event {
        Event::Finished { id: 1, reason: StopReason::Eos, prompt_tokens: 2, completion_tokens: 1 }
    }

    #[tokio::test]
    async fn dropping_an_unfinished_stream_cancels_once() {
        let (cancelled, on_cancel) = flagged();
        let (sender, mut stream) = EventStream::channel(on_cancel);
        assert!(sender.admit());
        stream.admitted().await.expect("admitted");
        assert!(sender.send(Event::Token { id: 1, token: 5, text: "a".into(), logprobs: None }));
        assert!(matches!(stream.next().await, Some(Event::Token { .. })));
        assert!(!cancelled.load(Ordering::SeqCst));
        drop(stream);
        assert!(cancelled.load(Ordering::SeqCst));
        assert!(sender.is_closed());
        assert!(!sender.send(finished()), "a closed stream tells the service to stop");
    }

    #[tokio::test]
    async fn a_finished_or_refused_stream_does_not_cancel() {
        let (cancelled, on_cancel) = flagged();
        let (sender, mut stream) = EventStream::channel(on_cancel);
        // An event before any admission message implies admission and is not lost.
        sender.send(Event::Token { id: 1, token: 5, text: "a".into(), logprobs: None });
        sender.send(finished());
        stream.admitted().await.expect("implied admission");
        assert_eq!(stream.by_ref().count().await, 2);
        drop(stream);
        assert!(!cancelled.load(Ordering::SeqCst));

        let (cancelled, on_cancel) = flagged();
        let (sender, mut stream) = EventStream::channel(on_cancel);
        sender.refuse(ServiceError::Overloaded { retry_after_s: 3 });
        assert_eq!(stream.admitted().await, Err(ServiceError::Overloaded { retry_after_s: 3 }));
        drop(stream);
        assert!(!cancelled.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_vanished_service_ends_the_stream() {
        let (sender, mut stream) = EventStream::channel(|| {});
        drop(sender);
        assert!(matches!(stream.admitted().await, Err(ServiceError::Unavailable { .. })));
        let (sender, mut stream) = EventStream::channel(|| {});
        sender.admit();
        drop(sender);
        stream.admitted().await.expect("admitted");
        assert_eq!(stream.next().await, None);
    }
}
