# Sourced by bench/llm_stream.sh and bench/llm_vs_torchserve.sh: the streaming load client, as the
# array CLIENT_CMD. CLIENT=rust (default): examples/stream_load.rs, release build (STREAM_LOAD_BIN=
# a built one skips the build); CLIENT=python: bench/llm_stream.py. Both take the same options and
# print the same fields; the Rust one costs a few us of CPU per chunk where the Python one costs
# 30-34 us, which at 64 streams sat inside every TTFT it measured (docs/benchmarks.md).
case "${CLIENT:-rust}" in
  rust)
    if [ -z "${STREAM_LOAD_BIN:-}" ]; then
      cargo build --release --quiet --example stream_load
      STREAM_LOAD_BIN=target/release/examples/stream_load
    fi
    CLIENT_CMD=("$(realpath "$STREAM_LOAD_BIN")")
    ;;
  python) CLIENT_CMD=(python3 bench/llm_stream.py) ;;
  *) echo "CLIENT must be rust or python" >&2; exit 1 ;;
esac
