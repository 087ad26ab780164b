//! The socket transport to one worker: connects to the Unix socket the worker listens on, sends
//! the load and inference messages of TorchServe's worker protocol ([`crate::backend::protocol`])
//! and reads the replies, each frame bounded, each wait bounded by `default_response_timeout`.
//! A worker that breaks the protocol, closes its connection or times out is marked dead and its
//! process killed; the worker pool then starts another.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use super::process::WorkerProcess;
use super::runtime::RuntimeDir;
use crate::backend::protocol::{self, FrameResponse, LoadRequest};
use crate::backend::{
    Backend, BackendError, InferRequest, InferResponse, Part, StreamSink, WorkerSpec, NO_RESPONSE,
};

/// One Python worker process and its connection.
pub(super) struct PythonBackend {
    pub(super) name: String,
    pub(super) process: WorkerProcess,
    /// The connection to the worker (to rank 0 of a torchrun worker): replies come from it alone.
    pub(super) stream: Option<UnixStream>,
    /// The connections to ranks 1.. of a torchrun worker: they get the load message and, with
    /// `broadcast`, every inference message, and answer only the load.
    pub(super) peers: Vec<UnixStream>,
    /// Processes listening for the server: torchrun ranks, or 1.
    pub(super) ranks: u32,
    /// Inference messages go to every rank (tensor parallel), not to rank 0 alone.
    pub(super) broadcast: bool,
    /// Added to a start-up failure: how the worker was launched, when that may be the cause.
    pub(super) launch_hint: Option<String>,
    /// Bytes received and not yet decoded.
    pub(super) buf: BytesMut,
    pub(super) response_timeout: Duration,
    pub(super) max_len: usize,
    /// Started with `--async`: many requests in flight ([`Backend::send`] / [`Backend::recv`]).
    pub(super) async_mode: bool,
    /// Async mode on oxserve's runtime, which takes cancel messages (TorchServe's worker would
    /// refuse the unknown command and stop reading).
    pub(super) cancellable: bool,
    /// Requests per inference message at most (and so per reply frame).
    pub(super) batch_size: usize,
    /// Requests in the latest message sent: a continuous step may hold more than batch_size
    /// (sequence + continuous batching runs 2 x batchSize, as TorchServe), and its reply frame
    /// answers each of them.
    pub(super) last_sent: usize,
    /// Async mode: the ids of requests sent and not yet answered by a final part. One reply frame
    /// may carry a part for each of them (oxserve's runtime sends one engine step's chunks of
    /// every stream in one frame: `send_intermediate_parts`), so their number, not batch_size,
    /// bounds its responses. Ids, not a count: a handler that answers a request twice must not
    /// make the bound drift below the requests really in flight.
    pub(super) in_flight: std::collections::HashSet<String>,
    /// Why the worker is unusable, once it is.
    pub(super) dead: Option<String>,
    pub(super) _sock_dir: tempfile::TempDir,
    pub(super) _runtime: Arc<RuntimeDir>,
}

/// Why reading a reply stopped.
#[derive(Debug)]
pub(super) enum ReadError {
    Eof,
    Io(io::Error),
    Protocol(protocol::ProtocolError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => write!(f, "closed its connection"),
            ReadError::Io(e) => write!(f, "connection failed: {e}"),
            ReadError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

/// Why a worker did not start; the caller adds what is known about the process (its exit, the
/// last lines of its log). `hint` is the launch hint in parentheses (or empty).
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// `of`: how many ranks of a multi-rank worker were listening (or empty).
    #[error("{NO_RESPONSE}: worker {name} did not start within {secs}s{of}{hint}")]
    NotListening {
        name: String,
        secs: f64,
        of: String,
        hint: String,
    },
    #[error("worker {name} exited before it started listening{hint}")]
    Exited { name: String, hint: String },
    #[error("cannot connect to worker {name} at {}: {source}", .path.display())]
    Connect {
        name: String,
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{NO_RESPONSE}: worker {name} did not load the model within {secs}s")]
    NotLoaded { name: String, secs: f64 },
    #[error("worker {name} {reason} while loading the model")]
    Read { name: String, reason: ReadError },
    /// The handler answered the load with an error; `at` names the rank of a multi-rank worker.
    #[error("worker {name} failed to load the model{at} ({code}): {message}")]
    Refused {
        name: String,
        at: String,
        code: i32,
        message: String,
    },
}

impl PythonBackend {
    /// Waits for the worker (every rank) to listen, connects and loads the model.
    pub(super) async fn start(
        &mut self,
        spec: &WorkerSpec,
        sock: &Path,
        model_dir: &Path,
        mut started: watch::Receiver<usize>,
        deadline: Instant,
    ) -> Result<(), StartError> {
        let secs = spec.model.startup_timeout.as_secs_f64();
        let ranks = self.ranks.max(1) as usize;
        let hint = self
            .launch_hint
            .as_ref()
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        let all_listening = async {
            loop {
                if *started.borrow_and_update() >= ranks {
                    return true;
                }
                if started.changed().await.is_err() {
                    return *started.borrow() >= ranks;
                }
            }
        };
        match tokio::time::timeout_at(deadline, all_listening).await {
            Err(_) => {
                let up = *started.borrow();
                let of = if ranks > 1 {
                    format!(" ({up} of {ranks} ranks listening)")
                } else {
                    String::new()
                };
                return Err(StartError::NotListening {
                    name: self.name.clone(),
                    secs,
                    of,
                    hint,
                });
            }
            Ok(false) => {
                return Err(StartError::Exited {
                    name: self.name.clone(),
                    hint,
                })
            }
            Ok(true) => {}
        }
        for rank in 0..ranks as u64 {
            // Rank r listens on the port number plus r (TorchServe's rule, LOCAL_RANK).
            let path = sock.with_file_name(format!(".oxs.sock.{}", u64::from(spec.id) + rank));
            let stream =
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| StartError::Connect {
                        name: self.name.clone(),
                        path: path.clone(),
                        source,
                    })?;
            if rank == 0 {
                self.stream = Some(stream);
            } else {
                self.peers.push(stream);
            }
        }
        let load = protocol::encode_load(&LoadRequest {
            model_name: spec.model.model_name.clone(),
            model_path: model_dir.display().to_string(),
            batch_size: i32::try_from(spec.model.batch_size).unwrap_or(i32::MAX),
            handler: spec.model.manifest.model.handler.clone(),
            gpu_id: spec.gpu_id,
            envelope: spec.model.settings.service_envelope.as_str().to_string(),
            limit_max_image_pixels: true,
        });
        let reply = tokio::time::timeout_at(deadline, async {
            // Every rank loads (and its handler joins the process group) at once.
            self.write_to_ranks(&load, true)
                .await
                .map_err(ReadError::Io)?;
            let max_len = self.max_len;
            let mut replies = Vec::with_capacity(ranks);
            loop {
                if let Some((reply, used)) =
                    protocol::decode_load_reply(&self.buf, max_len).map_err(ReadError::Protocol)?
                {
                    self.buf.advance(used);
                    replies.push(reply);
                    break;
                }
                self.fill().await?;
            }
            for peer in &mut self.peers {
                let mut buf = BytesMut::new();
                loop {
                    if let Some((reply, _)) =
                        protocol::decode_load_reply(&buf, max_len).map_err(ReadError::Protocol)?
                    {
                        replies.push(reply);
                        break;
                    }
                    match peer.read_buf(&mut buf).await {
                        Ok(0) => return Err(ReadError::Eof),
                        Ok(_) => {}
                        Err(e) => return Err(ReadError::Io(e)),
                    }
                }
            }
            Ok::<_, ReadError>(replies)
        })
        .await;
        match reply {
            Err(_) => Err(StartError::NotLoaded {
                name: self.name.clone(),
                secs,
            }),
            Ok(Err(reason)) => Err(StartError::Read {
                name: self.name.clone(),
                reason,
            }),
            Ok(Ok(replies)) => {
                for (rank, reply) in replies.iter().enumerate() {
                    if reply.code != 200 {
                        let at = if ranks > 1 {
                            format!(" at rank {rank}")
                        } else {
                            String::new()
                        };
                        return Err(StartError::Refused {
                            name: self.name.clone(),
                            at,
                            code: reply.code,
                            message: reply.message.clone(),
                        });
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes a message to rank 0, and to the other ranks too when `all` (a load message, or an
    /// inference message of a tensor-parallel worker), all at once: a rank waiting in a
    /// collective operation for another must not keep that one's message from being sent.
    async fn write_to_ranks(&mut self, frame: &[u8], all: bool) -> io::Result<()> {
        let Some(first) = self.stream.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        if !all || self.peers.is_empty() {
            return first.write_all(frame).await;
        }
        let mut writes = vec![first.write_all(frame)];
        writes.extend(self.peers.iter_mut().map(|p| p.write_all(frame)));
        futures_util::future::try_join_all(writes).await.map(|_| ())
    }

    /// Sends an inference message: to every rank of a tensor-parallel worker, else to rank 0.
    async fn write_inference(&mut self, frame: &[u8]) -> io::Result<()> {
        let all = self.broadcast;
        self.write_to_ranks(frame, all).await
    }

    /// Writes a message (`what`, for the error) where inference messages go, within
    /// response_timeout; a worker that does not take it is killed.
    async fn deliver(&mut self, frame: &[u8], what: &str) -> Result<(), BackendError> {
        match timeout(self.response_timeout, self.write_inference(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let what = format!("worker {} connection failed: {e}", self.name);
                Err(self.died(what).await)
            }
            Err(_) => {
                self.kill_and_reap().await;
                let reason = format!(
                    "worker {} did not take {what} within {}s; killed",
                    self.name,
                    self.response_timeout.as_secs_f64()
                );
                self.dead = Some(reason.clone());
                Err(BackendError::Died(reason))
            }
        }
    }

    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let stream = self.stream.as_mut().ok_or(ReadError::Eof)?;
        match stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadError::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Reads one reply frame of at most `max_frame` bytes. Each string of a frame is bounded by
    /// the decoder; the frame as a whole is bounded here, so that a worker sending an endless
    /// frame of small pieces cannot grow the buffer without end.
    async fn read_reply(
        &mut self,
        max_frame: usize,
        max_responses: usize,
    ) -> Result<protocol::PredictReply, ReadError> {
        // Bytes the buffer must hold before decoding can get further: a frame that arrives in
        // many small reads is decoded once per field, not once per read.
        let mut need = 0;
        loop {
            if self.buf.len() >= need {
                match protocol::decode_predict_reply_from(&self.buf, self.max_len, max_responses)
                    .map_err(ReadError::Protocol)?
                {
                    Ok((reply, used)) => {
                        self.buf.advance(used);
                        return Ok(reply);
                    }
                    Err(n) => need = n,
                }
            }
            if self.buf.len() > max_frame || need > max_frame {
                return Err(ReadError::Protocol(protocol::ProtocolError(format!(
                    "reply frame exceeds {max_frame} bytes (max_response_size per request of the batch)"
                ))));
            }
            self.fill().await?;
        }
    }

    /// Drops the connection, kills the process group (if the process is not reaped yet) and
    /// reaps the process.
    async fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        self.stream = None;
        self.peers.clear();
        self.process.kill_and_reap().await
    }

    /// Drops the connection and describes how the process ended ([`WorkerProcess::reap_and_describe`]).
    pub(super) async fn reap_and_describe(&mut self, grace: Duration) -> String {
        self.stream = None;
        self.peers.clear();
        self.process.reap_and_describe(grace).await
    }

    /// Marks the worker dead after a connection failure and returns the error to report.
    async fn died(&mut self, what: String) -> BackendError {
        let detail = self.reap_and_describe(Duration::from_secs(2)).await;
        let reason = format!("{what}{detail}");
        self.dead = Some(reason.clone());
        BackendError::Died(reason)
    }
}

/// Replies are matched to requests by id, so ids within a batch must differ; clients choose their
/// own `x-request-id`, and two concurrent requests may share one. Returns a copy of the batch with
/// the later duplicates renamed `<id>#2`, `<id>#3`, ... (what the handler sees), or None when every
/// id is already unique (the common case, no copy).
fn unique_ids(batch: &[InferRequest]) -> Option<Vec<InferRequest>> {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    if batch.iter().all(|r| seen.insert(r.id.as_str())) {
        return None;
    }
    let mut taken: std::collections::HashSet<String> = batch.iter().map(|r| r.id.clone()).collect();
    let mut first = std::collections::HashSet::new();
    let mut out = batch.to_vec();
    for r in &mut out {
        if first.insert(r.id.clone()) {
            continue;
        }
        let mut n = 2;
        let mut id = format!("{}#{n}", r.id);
        while taken.contains(&id) {
            n += 1;
            id = format!("{}#{n}", r.id);
        }
        taken.insert(id.clone());
        r.id = id;
    }
    Some(out)
}

fn to_response(r: FrameResponse) -> InferResponse {
    let status = u16::try_from(r.status)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(500);
    InferResponse {
        status,
        content_type: r.content_type,
        headers: r
            .headers
            .into_iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("content-type"))
            .collect(),
        body: r.body,
    }
}

#[async_trait]
impl Backend for PythonBackend {
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let secs = self.response_timeout.as_secs_f64();
        let renamed = unique_ids(batch);
        let wire = renamed.as_deref().unwrap_or(batch);
        let index: HashMap<&str, usize> = wire
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        let frame = protocol::encode_infer(wire);
        match timeout(self.response_timeout, self.write_inference(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let what = format!("worker {} connection failed: {e}", self.name);
                return Err(self.died(what).await);
            }
            Err(_) => {
                self.kill_and_reap().await;
                let reason = format!(
                    "worker {} did not take the batch; timed out after {secs}s",
                    self.name
                );
                self.dead = Some(reason.clone());
                return Err(BackendError::Died(reason));
            }
        }
        let mut finals: Vec<Option<InferResponse>> = vec![None; batch.len()];
        let mut missing = batch.len();
        // One full-size response per request of the batch, plus room for the frame's own fields.
        let max_frame = self
            .max_len
            .saturating_mul(batch.len())
            .saturating_add(1 << 20);
        while missing > 0 {
            let reply = match timeout(
                self.response_timeout,
                self.read_reply(max_frame, batch.len()),
            )
            .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    let what = format!("worker {} {e}", self.name);
                    return Err(self.died(what).await);
                }
                Err(_) => {
                    let status = self.kill_and_reap().await;
                    let ended = status.map(|s| format!(" ({s})")).unwrap_or_default();
                    let reason = format!(
                        "worker {} response timed out after {secs}s; process {} killed{ended}",
                        self.name, self.process.pid
                    );
                    self.dead = Some(reason.clone());
                    return Err(BackendError::Died(reason));
                }
            };
            if reply.code != 200 {
                let status = u16::try_from(reply.code)
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                    .unwrap_or(500);
                return Err(BackendError::Failed {
                    status,
                    message: reply.message,
                });
            }
            for r in reply.responses {
                let Some(&i) = index.get(r.request_id.as_str()) else {
                    let what = format!(
                        "worker {} answered unknown request id {:?}",
                        self.name, r.request_id
                    );
                    return Err(self.died(what).await);
                };
                if r.is_intermediate() {
                    sink.send_partial(i, to_response(r));
                } else {
                    if finals[i].is_none() {
                        missing -= 1;
                    }
                    finals[i] = Some(to_response(r));
                }
            }
        }
        Ok(finals.into_iter().flatten().collect())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.process.pid)
    }

    fn is_async(&self) -> bool {
        self.async_mode
    }

    fn can_step(&self) -> bool {
        true
    }

    async fn send(&mut self, batch: &[InferRequest]) -> Result<(), BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        let frame = protocol::encode_infer(batch);
        self.last_sent = batch.len();
        if self.async_mode {
            self.in_flight.extend(batch.iter().map(|r| r.id.clone()));
        }
        self.deliver(&frame, "a request").await
    }

    fn can_cancel(&self) -> bool {
        self.cancellable
    }

    async fn cancel(&mut self, ids: &[String]) -> Result<(), BackendError> {
        if !self.cancellable || self.dead.is_some() {
            return Ok(());
        }
        // Only requests still in flight: one answered meanwhile needs no cancel.
        let ids: Vec<String> = ids
            .iter()
            .filter(|id| self.in_flight.contains(*id))
            .cloned()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        // Where the requests went: every rank of a tensor-parallel worker runs them (and must stop
        // together), else rank 0.
        self.deliver(&protocol::encode_cancel(&ids), "a cancel")
            .await
    }

    async fn recv(&mut self) -> Result<Vec<Part>, BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        let most = self
            .batch_size
            .max(self.last_sent)
            .max(self.in_flight.len());
        let max_frame = self.max_len.saturating_mul(most).saturating_add(1 << 20);
        // Cancel safe: bytes read stay in self.buf, and decoding starts from the buffer.
        let reply = match self.read_reply(max_frame, most).await {
            Ok(reply) => reply,
            Err(e) => {
                let what = format!("worker {} {e}", self.name);
                // Marked before anything else awaits, so a cancelled recv still leaves it dead.
                self.dead = Some(what.clone());
                return Err(self.died(what).await);
            }
        };
        if self.async_mode {
            for r in &reply.responses {
                if reply.code != 200 || !r.is_intermediate() {
                    self.in_flight.remove(&r.request_id);
                }
            }
        }
        if reply.code != 200 {
            // An error frame names the requests it fails: it answers those, and only those.
            let status = u16::try_from(reply.code)
                .ok()
                .filter(|s| (400..=599).contains(s))
                .unwrap_or(500);
            return Ok(reply
                .responses
                .into_iter()
                .map(|r| Part {
                    id: r.request_id,
                    response: InferResponse::from(crate::error::ApiError::with_status(
                        status,
                        crate::error::ErrorKind::InternalServer,
                        &reply.message,
                    )),
                    last: true,
                })
                .collect());
        }
        Ok(reply
            .responses
            .into_iter()
            .map(|r| Part {
                last: !r.is_intermediate(),
                id: r.request_id.clone(),
                response: to_response(r),
            })
            .collect())
    }

    fn reports_handler_metrics(&self) -> bool {
        true
    }

    async fn shutdown(mut self: Box<Self>) {
        self.stream = None;
        self.peers.clear();
        self.process.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_request_ids_in_a_batch_are_renamed() {
        let req = |id: &str| InferRequest {
            id: id.into(),
            ..Default::default()
        };
        assert!(unique_ids(&[req("a"), req("b")]).is_none());
        let ids: Vec<String> = unique_ids(&[req("a"), req("a"), req("a#2"), req("a")])
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "a#3", "a#2", "a#4"]);
    }

    #[test]
    fn frame_status_codes_are_http_codes() {
        let r = FrameResponse {
            request_id: "a".into(),
            content_type: "text/plain".into(),
            status: 0,
            reason: String::new(),
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("ts_stream_next".into(), "true".into()),
            ],
            body: bytes::Bytes::from_static(b"x"),
        };
        let resp = to_response(r);
        assert_eq!(resp.status, 500);
        assert_eq!(resp.content_type, "text/plain");
        assert_eq!(
            resp.headers,
            vec![("ts_stream_next".to_string(), "true".to_string())]
        );
    }
}
