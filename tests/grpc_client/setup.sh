#!/usr/bin/env bash
# Installs grpcio (and grpcio-tools, googleapis-common-protos) from PyPI into target/grpc-venv the
# first time, then generates the Python stubs of the vendored protos into target/grpc-stubs.
# Prints the venv's python. Used by tests/grpc_api.rs; .ci/run needs only PyPI access for it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/target/grpc-venv"
stubs="$root/target/grpc-stubs"
python="${PYTHON:-python3}"

if ! "$venv/bin/python" -c "import grpc, grpc_tools, google.rpc.status_pb2" 2>/dev/null; then
    echo "creating $venv with grpcio, grpcio-tools and googleapis-common-protos" >&2
    "$python" -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        grpcio grpcio-tools googleapis-common-protos >&2
fi
mkdir -p "$stubs"
# status.proto is on the include path only: googleapis-common-protos provides its Python module.
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$stubs" \
    --grpc_python_out="$stubs" "$root/proto/inference.proto" "$root/proto/management.proto" >&2
echo "$venv/bin/python"
