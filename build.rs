//! Compiles TorchServe's vendored gRPC protos (proto/) into Rust at build time, in pure Rust
//! (protox parses them; no system protoc is needed), server side only; and rebuilds the crate when
//! the embedded Python runtime (python/) changes.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/inference.proto",
        "proto/management.proto",
        "proto/google/rpc/error_details.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto/google/rpc/status.proto");
    // The Python runtime under python/ is embedded with include_dir!, which tracks the files it
    // read but not a file added to the folder: a change anywhere in it rebuilds the crate.
    println!("cargo:rerun-if-changed=python");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // The integration tests build their own client from the same descriptors.
        .build_client(true)
        .build_server(true)
        // The lib has no transport client: tests connect their own channel.
        .build_transport(false)
        // Deterministic order of the `input` map, so handlers see parameters in name order.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
