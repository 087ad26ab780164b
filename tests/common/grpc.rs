//! gRPC clients for the tests: tonic clients of TorchServe's two services, built from the protos
//! the server itself vendors (so a test speaks exactly what TorchServe's clients speak), and the
//! Python with grpcio that runs TorchServe's own client (tests/grpc_client).

use std::collections::BTreeMap;
use std::time::Duration;

use oxserve::grpc::pb::inference::inference_ap_is_service_client::InferenceApIsServiceClient;
use oxserve::grpc::pb::inference::{PredictionResponse, PredictionsRequest};
use oxserve::grpc::pb::management::management_ap_is_service_client::ManagementApIsServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Streaming;

use super::Server;

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect to the gRPC listener")
}

pub async fn inference(s: &Server) -> InferenceApIsServiceClient<Channel> {
    InferenceApIsServiceClient::new(channel(s.grpc_inference.as_deref().unwrap()).await)
}

pub async fn management(s: &Server) -> ManagementApIsServiceClient<Channel> {
    ManagementApIsServiceClient::new(channel(s.grpc_management.as_deref().unwrap()).await)
}

/// A prediction request with `data` as its `data` input, as TorchServe's client sends a file.
pub fn predict(model: &str, data: &[u8]) -> PredictionsRequest {
    PredictionsRequest {
        model_name: model.into(),
        model_version: String::new(),
        input: BTreeMap::from([("data".to_string(), data.to_vec())]),
        sequence_id: None,
    }
}

/// One `StreamPredictions2` call held open, driven a message at a time as TorchServe's client
/// drives a stateful session: send a request, read its reply, decide the next from it.
pub struct Stream2 {
    tx: mpsc::UnboundedSender<PredictionsRequest>,
    replies: Streaming<PredictionResponse>,
}

impl Stream2 {
    pub async fn open(client: &mut InferenceApIsServiceClient<Channel>) -> Stream2 {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let replies = client
            .stream_predictions2(outbound)
            .await
            .expect("StreamPredictions2 accepted")
            .into_inner();
        Stream2 { tx, replies }
    }

    /// Sends one message and returns the next reply on the stream.
    pub async fn ask(&mut self, msg: PredictionsRequest) -> PredictionResponse {
        self.tx.send(msg).expect("the stream is open");
        self.replies
            .message()
            .await
            .expect("a reply, not a call error")
            .expect("a reply before the stream ended")
    }
}

/// A Python with grpcio and TorchServe's generated stubs (tests/grpc_client/setup.sh makes
/// target/grpc-venv the first time, once per test binary).
pub fn grpcio_python() -> &'static str {
    use std::sync::OnceLock;
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_client/setup.sh");
        let python = super::run_ok(setup, std::process::Command::new("bash").arg(setup));
        python.trim().to_string()
    })
}
