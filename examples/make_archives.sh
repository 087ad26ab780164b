#!/usr/bin/env bash
# Packages the example handlers into TorchServe model archives (.mar) with the real
# torch-model-archiver (installed into a private virtualenv; it does not need torch).
#
#   examples/make_archives.sh [OUT_DIR]      # default: target/model-store
#
# Produces echo.mar, batching.mar, custom_metrics.mar, streaming.mar, llm.mar (examples/llm:
# an OpenAI-shaped toy LLM in async mode, docs/llm.md), stateful.mar and stateful_stream.mar
# (examples/stateful: sequence batching, alone and with continuous batching), usable by oxserve
# and by TorchServe alike (e.g. `oxserve --model-store target/model-store --models all`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/target/model-store}"
venv="$root/target/mar-venv"
python="${PYTHON:-python3}"

# A venv copied from another folder keeps scripts whose #! names the old path: check it runs.
if ! "$venv/bin/torch-model-archiver" --help >/dev/null 2>&1; then
    echo "creating $venv with torch-model-archiver 0.12.0" >&2
    "$python" -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch-model-archiver==0.12.0
fi
mkdir -p "$out"
# Each archive is built from inside its example folder: a relative OUT_DIR must not be read from there.
out="$(cd "$out" && pwd)"

archive() { # name, folder, handler file, extra torch-model-archiver arguments
    local name="$1" dir="$root/examples/$2" handler="$3"
    shift 3
    (cd "$dir" && "$venv/bin/torch-model-archiver" --model-name "$name" --version 1.0 \
        --handler "$handler" --export-path "$out" --force "$@")
    echo "$out/$name.mar"
}

archive echo echo echo_handler.py
archive batching batching batch_handler.py
archive custom_metrics custom_metrics metrics_handler.py
archive streaming streaming stream_handler.py
archive llm llm llm_handler.py --extra-files engine.py --config-file model-config.yaml
archive stateful stateful/sequence_batching stateful_handler.py --config-file model-config.yaml
archive stateful_stream stateful/sequence_continuous_batching stateful_handler.py \
    --config-file model-config.yaml
