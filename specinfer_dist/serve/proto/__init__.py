"""Python stubs for ``specinfer.proto`` (package ``specinfer.v1``), compiled on first import.

grpcio-tools compiles the .proto in memory (``grpc.protos_and_services``), so there are no
generated files to commit, forget or keep in sync: a fresh clone works right after
``pip install -e .``, and so does a read-only install. The modules register under their
usual names (``specinfer_dist.serve.proto.specinfer_pb2`` and ``..._pb2_grpc``), so
messages pickle between Ray processes. Other languages: compile ``specinfer.proto``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from specinfer_dist.serve.grpc_status import quiet_serve_status_logs

_PROTO = "specinfer_dist/serve/proto/specinfer.proto"
# The compiler looks the .proto up on sys.path; an editable install is not on it.
_ROOT = str(Path(__file__).resolve().parents[3])
sys.path.append(_ROOT)
try:
    specinfer_pb2, specinfer_pb2_grpc = grpc.protos_and_services(_PROTO)
finally:
    sys.path.remove(_ROOT)


def add_SpecInferServicer_to_server(servicer: object, server: object) -> None:  # noqa: N802 - gRPC's naming
    """Ray Serve's grpc_options.grpc_servicer_functions entry, called where each proxy builds its
    gRPC server: registers specinfer.v1.SpecInfer, and keeps the proxy from logging a traceback
    for a call that a replica ended with a status code of ours (the replica logs it in one line)."""
    quiet_serve_status_logs()
    specinfer_pb2_grpc.add_SpecInferServicer_to_server(servicer, server)


__all__ = ["add_SpecInferServicer_to_server", "specinfer_pb2", "specinfer_pb2_grpc"]
