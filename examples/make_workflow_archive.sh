#!/usr/bin/env bash
# Packages examples/workflow into a TorchServe workflow archive (.war) with the real
# torch-workflow-archiver (installed into a private virtualenv; it needs no torch).
#
#   examples/make_workflow_archive.sh [OUT_DIR]      # default: target/workflow-store
#
# Produces echo_pipeline.war; its models are echo.mar (examples/make_archives.sh) in the model
# store: `oxserve --model-store target/model-store --workflow-store target/workflow-store`, then
# `curl -X POST "localhost:8081/workflows?url=echo_pipeline.war"` (docs/workflows.md).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/target/workflow-store}"
venv="$root/target/war-venv"
python="${PYTHON:-python3}"

# A venv copied from another folder keeps scripts whose #! names the old path: check it runs.
if ! "$venv/bin/torch-workflow-archiver" --help >/dev/null 2>&1; then
    echo "creating $venv with torch-workflow-archiver 0.2.15" >&2
    "$python" -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch-workflow-archiver==0.2.15
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root/examples/workflow"
"$venv/bin/torch-workflow-archiver" --workflow-name echo_pipeline --spec-file echo_pipeline.yaml \
    --handler workflow_handler.py --export-path "$out" -f
echo "$out/echo_pipeline.war"
