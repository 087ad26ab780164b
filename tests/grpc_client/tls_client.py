"""A gRPC client over TLS (grpcio's secure channel, verifying the server's certificate) for
tests/grpc_tls.rs: Ping and Predictions on the inference listener, ListModels on the management
listener, then a cleartext call to the TLS port, which must fail. One line per result.

    tls_client.py CERT.pem MODEL INPUT
"""

import os
import sys

sys.path.insert(0, os.environ["OXSERVE_GRPC_STUBS"])

import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402

import inference_pb2  # noqa: E402
import inference_pb2_grpc  # noqa: E402
import management_pb2  # noqa: E402
import management_pb2_grpc  # noqa: E402

cert_file, model, data = sys.argv[1], sys.argv[2], sys.argv[3]
with open(cert_file, "rb") as f:
    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
inference = os.environ["OXSERVE_GRPC_INFERENCE"]
management = os.environ["OXSERVE_GRPC_MANAGEMENT"]

with grpc.secure_channel(inference, creds) as channel:
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    print("ping:", stub.Ping(empty_pb2.Empty(), timeout=60).health.strip().replace("\n", " "))
    reply = stub.Predictions(
        inference_pb2.PredictionsRequest(model_name=model, input={"data": data.encode()}),
        timeout=60)
    print("prediction:", reply.prediction.decode())
with grpc.secure_channel(management, creds) as channel:
    stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
    msg = stub.ListModels(management_pb2.ListModelsRequest(), timeout=60).msg
    print("models:", msg.replace("\n", " "))
with grpc.insecure_channel(inference) as channel:
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    try:
        stub.Ping(empty_pb2.Empty(), timeout=10)
        print("cleartext: answered")
    except grpc.RpcError as e:
        print("cleartext: refused", e.code())
