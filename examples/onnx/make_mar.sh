#!/bin/sh
# Packs examples/onnx/ (MAR-INF/MANIFEST.json + model.onnx) into tiny_classifier.mar, a model
# archive oxserve serves with its built-in ONNX backend (see docs/onnx.md).
#
# Usage: examples/onnx/make_mar.sh [OUTPUT_DIR]     (default: the current directory)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out_dir=$(cd "${1:-.}" && pwd)
out="$out_dir/tiny_classifier.mar"
rm -f "$out"
cd "$here"
if command -v zip >/dev/null 2>&1; then
    zip -q -X "$out" MAR-INF/MANIFEST.json model.onnx
else
    python3 - "$out" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for name in ("MAR-INF/MANIFEST.json", "model.onnx"):
        z.write(name, name)
PY
fi
echo "wrote $out"
