//! The API over a real TCP listener on 127.0.0.1: SSE streaming as a client sees it (chunked
//! transfer encoding), client disconnects cancelling work on the engine, graceful shutdown.

mod api_support;

use api_support::*;
use herd_coordinator::api::{ApiState, InferenceService, serve};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(state: ApiState) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    Server { addr, stop, task }
}

impl Server {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        result.expect("serve returns after shutdown").expect("join").expect("serve");
    }
}

/// A response being read off the socket.
struct Response {
    status: u16,
    chunked: bool,
    reader: BufReader<TcpStream>,
}

async fn post_raw(addr: SocketAddr, path: &str, body: &Value) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body.as_bytes()).await.expect("write body");
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.expect("status line");
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            break;
        }
        chunked |= line.to_ascii_lowercase().starts_with("transfer-encoding: chunked");
    }
    Response { status, chunked, reader }
}

impl Response {
    /// The next piece of a chunked body; None at its end.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        let mut size = String::new();
        self.reader.read_line(&mut size).await.expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data).await.expect("chunk");
        data.truncate(size);
        (size > 0).then_some(data)
    }

    /// SSE `data:` payloads until `[DONE]` (inclusive).
    async fn events_until_done(&mut self) -> Vec<String> {
        let mut buffer = String::new();
        let mut events = Vec::new();
        while let Some(chunk) = self.chunk().await {
            buffer.push_str(&String::from_utf8(chunk).expect("utf-8"));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                events.extend(sse_data(&event));
                if events.last().is_some_and(|e| e == "[DONE]") {
                    return events;
                }
            }
        }
        panic!("the stream ended without [DONE]: {events:?}");
    }

    /// The next SSE `data:` payload.
    async fn next_event(&mut self, buffer: &mut String) -> String {
        loop {
            if let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if let Some(data) = sse_data(&event).pop() {
                    return data;
                }
                continue;
            }
            let chunk = self.chunk().await.expect("more of the stream");
            buffer.push_str(&String::from_utf8(chunk).expect("utf-8"));
        }
    }

    async fn json(mut self) -> Value {
        let mut body = Vec::new();
        if self.chunked {
            while let Some(chunk) = self.chunk().await {
                body.extend(chunk);
            }
        } else {
            self.reader.read_to_end(&mut body).await.expect("body");
        }
        serde_json::from_slice(&body).expect("JSON body")
    }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

async fn metric(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    line.rsplit(' ').next()?.parse().ok()
}

fn long_chat(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "stream": stream,
           "max_tokens": 4000, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_over_tcp_equals_the_plain_answer() {
    let api = local();
    let server = start(api.state.clone()).await;
    let body = json!({"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 30, "temperature": 0,
                      "stream_options": {"include_usage": true}});
    let plain = post_raw(server.addr, "/v1/chat/completions", &body).await;
    assert_eq!(plain.status, 200);
    let plain = plain.json().await;

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut response = post_raw(server.addr, "/v1/chat/completions", &streamed).await;
    assert_eq!(response.status, 200);
    assert!(response.chunked);
    let events = response.events_until_done().await;
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("chunk")).collect();
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|c| c["delta"]["content"].as_str())).collect();
    assert_eq!(text, plain["choices"][0]["message"]["content"].as_str().expect("content"));
    let finish = chunks.iter().find_map(|c| c["choices"].get(0).and_then(|c| c["finish_reason"].as_str()));
    assert_eq!(finish, plain["choices"][0]["finish_reason"].as_str());
    assert_eq!(chunks.last().expect("usage")["usage"], plain["usage"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_cancels_its_request() {
    let api = local();
    let server = start(api.state.clone()).await;
    let mut response = post_raw(server.addr, "/v1/chat/completions", &long_chat(true)).await;
    assert_eq!(response.status, 200);
    let mut buffer = String::new();
    let role = response.next_event(&mut buffer).await;
    assert!(role.contains("\"role\":\"assistant\""), "{role}");
    // Wait for generated text, so the request is surely running on the engine.
    loop {
        let event = response.next_event(&mut buffer).await;
        if event.contains("\"content\"") {
            break;
        }
    }
    assert_eq!(api.service.load().running, 1);
    drop(response);
    let took = wait_for("the engine to drop the request", Duration::from_secs(10), || {
        let load = api.service.load();
        load.running == 0 && load.waiting == 0
    })
    .await;
    eprintln!("cancelled {took:?} after the disconnect");
    assert_eq!(metric(server.addr, "herd:request_success_total{finished_reason=\"abort\"").await, Some(1.0));
    assert_eq!(metric(server.addr, "herd:request_success_total{finished_reason=\"length\"").await, None);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_a_plain_answer_cancels_its_request() {
    let api = local();
    let server = start(api.state.clone()).await;
    let response = post_raw_no_wait(server.addr, "/v1/chat/completions", &long_chat(false)).await;
    wait_for("the request to run", Duration::from_secs(10), || api.service.load().running == 1).await;
    drop(response);
    let took = wait_for("the engine to drop the request", Duration::from_secs(10), || {
        let load = api.service.load();
        load.running == 0 && load.waiting == 0
    })
    .await;
    eprintln!("cancelled {took:?} after the disconnect");
    assert_eq!(metric(server.addr, "herd:request_success_total{finished_reason=\"abort\"").await, Some(1.0));
    assert_eq!(metric(server.addr, "herd:request_success_total{finished_reason=\"length\"").await, None);

    // The engine is still fine afterwards.
    let body = json!({"prompt": "a", "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    let response = post_raw(server.addr, "/v1/completions", &body).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json().await["usage"]["completion_tokens"], 3);
    server.shutdown().await;
}

/// Send a request without reading anything back.
async fn post_raw_no_wait(addr: SocketAddr, path: &str, body: &Value) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    stream
}
