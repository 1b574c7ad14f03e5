"""gRPC front end: ``specinfer.v1.SpecInfer/Generate`` and the standard ``grpc.health.v1.Health``
(Check; Watch refused with UNIMPLEMENTED), called through Ray Serve's gRPC proxy (which routes
each RPC to the deployment method of its name).

Every failure reaches the client as a status code and a one-line message of ours (never a
traceback, pid, address or actor id); every call is counted by its final code. The log gets one
line per failure: a refusal (the client's error, busy, still loading) at INFO, a server error at
ERROR, with the traceback only when it was unexpected (Serve's own tracebacks for a failed call:
grpc_status.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext

from specinfer_dist.engine.async_engine import EngineStepError, RequestDelta
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.auth import check_api_key
from specinfer_dist.serve.grpc_status import StatusSet, quiet_serve_status_logs
from specinfer_dist.serve.logprobs import top_logprobs_requested
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.service import Service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecInfer"].full_name  # "specinfer.v1.SpecInfer"
# Under Serve's logger: the lines reach the replica's log file and stderr, with the request id.
logger = logging.getLogger("ray.serve").getChild(__name__)
# For Serve's grpc_options.grpc_servicer_functions (they must be importable where the proxies run).
GRPC_SERVICER_FUNCTIONS = [
    "specinfer_dist.serve.proto.add_SpecInferServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


async def generate(service: Service, request: pb.GenerateRequest, context: RayServegRPCContext) -> AsyncIterator[pb.GenerateResponse]:
    """One generation: streamed (``request.stream``) or in one message; any failure ends the
    call with its status code, and every outcome, a client's cancellation too, is counted."""
    request_id = request.request_id or uuid.uuid4().hex
    try:
        check_api_key(service.api_key, dict(context.invocation_metadata()).get("authorization"))
        which = request.WhichOneof("prompt")
        if which is None:
            raise ApiError(400, "a prompt is required: set text or token_ids", param="prompt")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        top = top_logprobs_requested(request.top_logprobs if request.HasField("top_logprobs") else None, "top_logprobs")
        deltas = service.generate([(prompt, _sampling_params(request, top))], chat=request.chat)
        tokenizer = service.engine.tokenizer if top is not None else None
        async with aclosing(deltas):
            if request.stream:
                async for _, delta in deltas:
                    yield _response(request_id, [delta], tokenizer)
            else:
                yield _response(request_id, [delta async for _, delta in deltas], tokenizer)
    except Exception as err:
        api = ApiError.of(err)
        _log_failure(request_id, err, api)
        service.metrics.api_requests.labels("grpc", api.grpc_code.name).inc()  # a stream's final status too
        _fail(context, api.grpc_code, api.message)
    except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or went away
        service.metrics.api_requests.labels("grpc", grpc.StatusCode.CANCELLED.name).inc()
        raise
    service.metrics.api_requests.labels("grpc", grpc.StatusCode.OK.name).inc()


def _response(request_id: str, deltas: list[RequestDelta], tokenizer: Any = None) -> pb.GenerateResponse:
    """One message for consecutive deltas of a request: their tokens and text, the usage if the
    last one finished it, and (with a ``tokenizer``: logprobs were asked for) per-token logprobs."""
    last = deltas[-1]
    logprobs = [] if tokenizer is None else [
        pb.TokenLogprob(token_id=e.token_id, token=tokenizer.decode([e.token_id]), logprob=e.logprob,
                        top=[pb.TopLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp) for t, lp in e.top])
        for d in deltas for e in d.logprobs
    ]
    return pb.GenerateResponse(
        request_id=request_id, token_ids=[t for d in deltas for t in d.token_ids], text="".join(d.text for d in deltas),
        finish_reason=last.finish_reason or "", usage=_usage(last) if last.finished else None, logprobs=logprobs,
    )


def _log_failure(request_id: str, err: Exception, api: ApiError) -> None:
    """One line: INFO for a refusal (the client's error; 429 busy; 503 still loading), ERROR for
    our failure (with the traceback if unexpected)."""
    if api.status != 500:
        logger.info("gRPC request %s refused: %s %s", request_id, api.grpc_code.name, api.message)
    else:
        unexpected = not isinstance(err, (ApiError, EngineStepError))
        logger.error("gRPC request %s failed: %s", request_id, err, exc_info=err if unexpected else None)


def _fail(context: RayServegRPCContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.set_code(code)
    context.set_details(message)
    quiet_serve_status_logs()
    raise StatusSet(message) from None


def _sampling_params(request: pb.GenerateRequest, logprobs: int | None) -> SamplingParams:
    given = {f: getattr(request, f) for f in ("max_tokens", "temperature", "top_p", "top_k", "seed") if request.HasField(f)}
    return SamplingParams(**given, stop=list(request.stop), ignore_eos=request.ignore_eos, logprobs=logprobs,
                          structured_outputs=_structured_outputs(request))


def _structured_outputs(request: pb.GenerateRequest) -> StructuredOutputsParams | None:
    """The request's constraint (None: unset); a schema stays JSON text, which the engine parses."""
    if not request.HasField("structured_outputs"):
        return None
    constraint = request.structured_outputs
    which = constraint.WhichOneof("constraint")
    if which is None:
        raise ApiError(400, "structured_outputs: set one of json_schema, json_object, regex, choice or grammar",
                       param="structured_outputs")
    value = getattr(constraint, which)
    if which == "json_schema":
        return StructuredOutputsParams(json=value)
    if which == "choice":
        return StructuredOutputsParams(choice=list(value.choices))
    return StructuredOutputsParams(**{which: value})  # json_object, regex, grammar: the same names


def _usage(last: RequestDelta) -> pb.Usage:
    stats = last.stats
    return pb.Usage(
        prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens, completion_tokens=stats.generated_tokens,
        accepted_prediction_tokens=stats.accepted_tokens,
        rejected_prediction_tokens=stats.drafted_tokens - stats.accepted_tokens,
        verification_steps=stats.steps, accepted_at_depth=stats.accepted_at_depth,
    )


def check_health(request: health_pb2.HealthCheckRequest, context: RayServegRPCContext,
                 service: Service) -> health_pb2.HealthCheckResponse:
    """For the whole server ("") and for specinfer.v1.SpecInfer: SERVING once ``service``'s engine
    is ready, NOT_SERVING while it loads, if it failed to, or once it stops; unknown services:
    NOT_FOUND. Probes need no API key."""
    if request.service not in ("", SERVICE_NAME):
        _fail(context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
    ready = service.status()["status"] == "ready"
    return health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    )


async def watch_health(request: health_pb2.HealthCheckRequest, context: RayServegRPCContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    """Refused with UNIMPLEMENTED, which the health protocol tells clients to read as "poll
    Check": a Watch stays open for as long as the client likes, holding one of the replica's
    max_ongoing_requests slots."""
    _fail(context, grpc.StatusCode.UNIMPLEMENTED, "grpc.health.v1.Health/Watch is not supported; poll Check")
    yield  # unreachable: makes this an async generator, as Serve's server-streaming path requires
