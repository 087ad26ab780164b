//! The bare axum server the load benchmark compares oxserve's inference path against: it answers
//! every POST with a small JSON body, and nothing else.
//!
//! cargo run --release --example hello_server -- 127.0.0.1:8090

use axum::routing::post;
use axum::Router;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = Router::new().route(
        "/predictions/{model}",
        post(|| async {
            (
                [("content-type", "application/json")],
                "{\"label\":\"positive\",\"score\":0.667}",
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    println!("hello server listening on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
