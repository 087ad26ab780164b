"""Runs TorchServe's own gRPC client (torchserve_grpc_client.py, unchanged) against a test server.

The client dials the fixed addresses localhost:7070 and localhost:7071; tests run servers on ports
the OS chose, so this wrapper points those two targets at OXSERVE_GRPC_INFERENCE and
OXSERVE_GRPC_MANAGEMENT (host:port) and changes nothing else. The Python stubs it imports are
generated from proto/ by setup.sh into the folder named by OXSERVE_GRPC_STUBS.

    run_client.py infer demo input.txt [--auth-token KEY]
"""

import os
import runpy
import sys

sys.path.insert(0, os.environ["OXSERVE_GRPC_STUBS"])

import grpc  # noqa: E402

_real = grpc.insecure_channel
_targets = {
    "localhost:7070": os.environ["OXSERVE_GRPC_INFERENCE"],
    "localhost:7071": os.environ["OXSERVE_GRPC_MANAGEMENT"],
}
grpc.insecure_channel = lambda target, *a, **k: _real(_targets.get(target, target), *a, **k)

client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchserve_grpc_client.py")
sys.argv = [client] + sys.argv[1:]
runpy.run_path(client, run_name="__main__")
