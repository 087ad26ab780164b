//! The built-in demo model: needs no files, so `oxserve` with no arguments serves a real prediction.
//!
//! It is a tiny sentiment scorer: it counts positive and negative words of the text it gets and
//! answers `{"label": ..., "score": ...}`. JSON bodies may be `{"text": "..."}` or any JSON string.
//! `{"text": ..., "sleep_ms": N}` makes the batch take at least N ms, to try queueing, timeouts and
//! scaling by hand (and in tests) without a slow model.
//!
//! Two test hooks, read from the environment once, make the demo model fail the way a buggy
//! backend would, so tests over the real binary can prove the server survives it:
//! `OXSERVE_DEMO_PANIC_WORD=<word>` panics in inference on any text containing `<word>`, and
//! `OXSERVE_DEMO_PANIC_LOADS=<n>` panics in the first `n` model loads of the process. Unset (the
//! normal case) they cost one branch.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use async_trait::async_trait;

use super::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, StreamSink, WorkerSpec,
};
use crate::error::ErrorKind;

const POSITIVE: &[&str] = &[
    "good",
    "great",
    "love",
    "excellent",
    "happy",
    "fast",
    "nice",
    "best",
    "awesome",
    "fine",
];
const NEGATIVE: &[&str] = &[
    "bad", "terrible", "hate", "awful", "sad", "slow", "worst", "poor", "broken", "ugly",
];

/// The test hooks (see the module doc).
struct PanicHooks {
    word: Option<String>,
    loads: AtomicU32,
}

fn hooks() -> &'static PanicHooks {
    static HOOKS: OnceLock<PanicHooks> = OnceLock::new();
    HOOKS.get_or_init(|| PanicHooks {
        word: std::env::var("OXSERVE_DEMO_PANIC_WORD")
            .ok()
            .filter(|w| !w.is_empty()),
        loads: AtomicU32::new(
            std::env::var("OXSERVE_DEMO_PANIC_LOADS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        ),
    })
}

/// Loads [`DemoModel`]s.
pub struct DemoLoader;

#[async_trait]
impl BackendLoader for DemoLoader {
    fn runtime(&self) -> &str {
        "builtin"
    }
    async fn load(&self, _spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        let left = &hooks().loads;
        if left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("demo model: load panic requested by OXSERVE_DEMO_PANIC_LOADS");
        }
        Ok(Box::new(DemoModel))
    }
}

/// The demo model itself (stateless).
pub struct DemoModel;

/// Scores one text: (label, score in 0..1).
pub fn score(text: &str) -> (&'static str, f64) {
    let (mut pos, mut neg) = (0u32, 0u32);
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        let w = word.to_ascii_lowercase();
        if POSITIVE.contains(&w.as_str()) {
            pos += 1;
        } else if NEGATIVE.contains(&w.as_str()) {
            neg += 1;
        }
    }
    let score = (f64::from(pos) + 1.0) / (f64::from(pos + neg) + 2.0);
    let label = if score > 0.5 {
        "positive"
    } else if score < 0.5 {
        "negative"
    } else {
        "neutral"
    };
    (label, (score * 1000.0).round() / 1000.0)
}

fn infer_one(req: &InferRequest) -> InferResponse {
    let Some(payload) = req.payload() else {
        return InferResponse::error(
            ErrorKind::BadRequest,
            "empty request: send text or {\"text\": ...}",
        );
    };
    let text = if payload.content_type.starts_with("application/json") {
        match serde_json::from_slice::<serde_json::Value>(&payload.value) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Object(o)) => match o.get("text").and_then(|t| t.as_str()) {
                Some(t) => t.to_string(),
                None => {
                    return InferResponse::error(
                        ErrorKind::BadRequest,
                        "JSON body needs a string field \"text\"",
                    )
                }
            },
            Ok(_) => {
                return InferResponse::error(
                    ErrorKind::BadRequest,
                    "JSON body must be a string or {\"text\": ...}",
                )
            }
            Err(e) => {
                return InferResponse::error(
                    ErrorKind::BadRequest,
                    &format!("invalid JSON body: {e}"),
                )
            }
        }
    } else {
        match std::str::from_utf8(&payload.value) {
            Ok(s) => s.to_string(),
            Err(_) => return InferResponse::error(ErrorKind::BadRequest, "body is not UTF-8 text"),
        }
    };
    if let Some(word) = &hooks().word {
        if text.contains(word.as_str()) {
            panic!("demo model: panic requested by OXSERVE_DEMO_PANIC_WORD ({word:?})");
        }
    }
    let (label, score) = score(&text);
    if req.header("explain") == Some("True") {
        // /explanations: which words moved the score, and which way.
        let mut words = serde_json::Map::new();
        for word in text.split(|c: char| !c.is_alphanumeric()) {
            let w = word.to_ascii_lowercase();
            if POSITIVE.contains(&w.as_str()) {
                words.insert(w, 1.into());
            } else if NEGATIVE.contains(&w.as_str()) {
                words.insert(w, (-1).into());
            }
        }
        let body = serde_json::json!({"label": label, "score": score, "explanation": words});
        return InferResponse::ok("application/json", body.to_string());
    }
    let body = format!("{{\"label\":\"{label}\",\"score\":{score}}}");
    InferResponse::ok("application/json", body)
}

/// `sleep_ms` of a JSON object body, capped at 10 minutes.
fn requested_sleep(req: &InferRequest) -> Option<u64> {
    let p = req.payload()?;
    if !p.content_type.starts_with("application/json") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&p.value).ok()?;
    v.get("sleep_ms")?.as_u64().map(|ms| ms.min(600_000))
}

#[async_trait]
impl Backend for DemoModel {
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        _sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        let sleep_ms = batch.iter().filter_map(requested_sleep).max().unwrap_or(0);
        if sleep_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)).await;
        }
        Ok(batch.iter().map(infer_one).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_words() {
        assert_eq!(score("I love this, great!").0, "positive");
        assert_eq!(score("terrible and slow").0, "negative");
        assert_eq!(score("a table").0, "neutral");
    }
}
