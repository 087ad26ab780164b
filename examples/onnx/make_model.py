#!/usr/bin/env python3
"""Generates examples/onnx/model.onnx, a tiny linear classifier served by oxserve's ONNX backend.

    probabilities = Softmax(input @ W + b)      input: float32 [N, 4]  ->  probabilities: float32 [N, 3]

N is a symbolic batch dimension. The weights are fixed, so the file is byte-for-byte reproducible.

The script also writes the known input as a request body (sample_input.json) and the expected reply
data (expected_output.json), computed here with numpy; tests/onnx_backend.rs compares the server's
answer against them. It fails if numpy's result drifts from the numbers recorded in EXPECTED below.

Usage (needs the `onnx` and `numpy` PyPI packages):

    python3 -m venv target/pyenv && target/pyenv/bin/pip install onnx numpy
    target/pyenv/bin/python examples/onnx/make_model.py
"""

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))

W = np.array(
    [
        [0.5, -0.2, 0.1],
        [0.3, 0.8, -0.5],
        [-0.6, 0.1, 0.9],
        [0.2, -0.4, 0.3],
    ],
    dtype=np.float32,
)
B = np.array([0.1, 0.0, -0.1], dtype=np.float32)

# The known input: two rows, so the symbolic batch dimension is exercised.
SAMPLE = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=np.float32)

# numpy's float32 result for SAMPLE, recorded (rounded to 7 decimals) so that a change is noticed.
EXPECTED = [
    [0.0595785, 0.0539089, 0.8865126],
    [0.3402977, 0.0396393, 0.6200630],
]


def build_model():
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["logits_raw"], name="matmul"),
        helper.make_node("Add", ["logits_raw", "B"], ["logits"], name="add_bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [inp],
        [out],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(
        graph,
        producer_name="oxserve-examples",
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reference(x):
    logits = x @ W + B
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def main():
    model = build_model()
    onnx.save(model, os.path.join(HERE, "model.onnx"))

    probs = reference(SAMPLE)
    if not np.allclose(probs, np.array(EXPECTED, dtype=np.float32), atol=1e-6):
        raise SystemExit(f"numpy result {probs.tolist()} differs from EXPECTED {EXPECTED}")

    with open(os.path.join(HERE, "sample_input.json"), "w") as f:
        json.dump({"inputs": {"input": SAMPLE.tolist()}}, f)
        f.write("\n")
    with open(os.path.join(HERE, "expected_output.json"), "w") as f:
        json.dump(
            {"outputs": {"probabilities": {"shape": list(probs.shape), "data": probs.tolist()}}},
            f,
        )
        f.write("\n")
    print("wrote model.onnx, sample_input.json, expected_output.json")
    print("probabilities:", probs.tolist())


if __name__ == "__main__":
    main()
