"""gRPC front end: ``specinfer.v1.SpecInfer/Generate`` and the standard ``grpc.health.v1.Health/Check``,
called through Ray Serve's gRPC proxy (which routes each RPC to the deployment method of its name)."""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from specinfer_dist.engine.async_engine import RequestDelta
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.auth import check_api_key
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.service import Service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecInfer"].full_name  # "specinfer.v1.SpecInfer"
# For Serve's grpc_options.grpc_servicer_functions (they must be importable where the proxies run).
GRPC_SERVICER_FUNCTIONS = [
    "specinfer_dist.serve.proto.add_SpecInferServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


async def generate(service: Service, request: pb.GenerateRequest, context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
    """Stream one generation; any failure ends the call with its status code."""
    request_id = request.request_id or uuid.uuid4().hex
    try:
        check_api_key(service.api_key, dict(context.invocation_metadata()).get("authorization"))
        which = request.WhichOneof("prompt")
        if which is None:
            raise ApiError(400, "a prompt is required: set text or token_ids", param="prompt")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        async with aclosing(service.generate([(prompt, _sampling_params(request))], chat=request.chat)) as deltas:
            async for _, delta in deltas:
                yield pb.GenerateResponse(
                    request_id=request_id, token_ids=delta.token_ids, text=delta.text,
                    finish_reason=delta.finish_reason or "", usage=_usage(delta) if delta.finished else None,
                )
    except Exception as err:
        api = ApiError.of(err)
        service.metrics.api_requests.labels("grpc", api.grpc_code.name).inc()
        context.set_code(api.grpc_code)
        context.set_details(api.message)
        # Serve sends the code set above; the exception only has to cross processes intact.
        raise RuntimeError(api.message) from None
    service.metrics.api_requests.labels("grpc", grpc.StatusCode.OK.name).inc()


def _sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    given = {f: getattr(request, f) for f in ("max_tokens", "temperature", "top_p", "top_k", "seed") if request.HasField(f)}
    return SamplingParams(**given, stop=list(request.stop), ignore_eos=request.ignore_eos)


def _usage(last: RequestDelta) -> pb.Usage:
    stats = last.stats
    return pb.Usage(
        prompt_tokens=last.prompt_tokens, completion_tokens=stats.generated_tokens,
        accepted_prediction_tokens=stats.accepted_tokens,
        rejected_prediction_tokens=stats.drafted_tokens - stats.accepted_tokens,
        verification_steps=stats.steps, accepted_at_depth=stats.accepted_at_depth,
    )


def check_health(request: health_pb2.HealthCheckRequest, context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
    """SERVING for the whole server ("") and for specinfer.v1.SpecInfer; unknown services: NOT_FOUND.
    Probes need no API key. Reaching this method means the replica and its engine are up."""
    if request.service not in ("", SERVICE_NAME):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"unknown service {request.service!r}")
        raise RuntimeError(f"unknown service {request.service!r}")
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
