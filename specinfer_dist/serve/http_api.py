"""OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
plus /health, /metrics and POST /reset_prefix_cache (vLLM's path; behind the API key).

Invariants: every error answer uses OpenAI's body {"error": {message, type, param, code}},
whatever raised it (anything unexpected is a logged 500 "internal error: <type>"); every
generation POST is counted by the status it got; no body over ``max_request_bytes`` reaches the
handlers, with or without Content-Length; after a stream's 200, errors arrive in-band as an
error event."""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specinfer_dist.engine.async_engine import EngineStepError, RequestDelta
from specinfer_dist.engine.engine import Prompt
from specinfer_dist.errors import SpecInferError
from specinfer_dist.serve.api_errors import RETRY_AFTER, ApiError
from specinfer_dist.serve.auth import check_api_key
from specinfer_dist.serve.logprobs import LogprobsFormatter, top_logprobs_requested
from specinfer_dist.serve.metrics import CONTENT_TYPE
from specinfer_dist.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)
from specinfer_dist.serve.service import Service, Usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's
RESET_PREFIX_CACHE = "/reset_prefix_cache"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Shape:
    """How an endpoint's responses look: completions and chat differ only here."""

    id_prefix: str
    object: str
    chunk_object: str
    # (index, text, finish, logprobs, streaming, first)
    choice: Callable[[int, str, str | None, dict[str, Any] | None, bool, bool], dict[str, Any]]


def _completion_choice(
    index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None, streaming: bool, first: bool
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _chat_choice(
    index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None, streaming: bool, first: bool
) -> dict[str, Any]:
    if not streaming:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


COMPLETION = _Shape("cmpl", "text_completion", "text_completion", _completion_choice)
CHAT = _Shape("chatcmpl", "chat.completion", "chat.completion.chunk", _chat_choice)


class _BodyLimit:
    """413 for a body over the limit: judged by Content-Length before a byte is read when there
    is one (h11 holds the body to it), else counted while a chunked body arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await _error_response(too_large)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # Chunked: read it all here (at most limit bytes are held), then hand it on as one message.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _error_response(too_large)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class _Guard:
    """Outermost: counts POSTs (generation requests) by the status they were answered with, and
    turns any exception nothing else handled into a logged, counted 500 with OpenAI's body."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        # An operator's reset is no generation request. endswith: behind Serve's route prefix.
        count = scope["method"] == "POST" and not scope["path"].endswith(RESET_PREFIX_CACHE)

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if count:
                    self.service.metrics.api_requests.labels("http", str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as err:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:  # the status line is gone (a stream): the client sees the connection end
                raise
            await _error_response(err)(scope, receive, counting_send)


def _error_response(err: Exception) -> JSONResponse:
    api = ApiError.of(err)
    return JSONResponse(api.body(), status_code=api.status, headers=api.headers)


async def _handle(_: Request, err: Exception) -> JSONResponse:
    if isinstance(err, RequestValidationError):
        err = _validation_error(err)
    elif isinstance(err, HTTPException):  # unknown route, wrong method
        err = ApiError(err.status_code, str(err.detail))
    return _error_response(err)


def _validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {first['msg']}")
    loc = [str(part) for part in first["loc"][1:]]  # after "body"
    return ApiError(400, f"{'.'.join(loc) or 'body'}: {first['msg']}", param=loc[0] if loc else None)


def build_http_app(service: Service) -> FastAPI:
    app = FastAPI(title="specinfer_dist", description="OpenAI-compatible API with tree-based speculative inference")
    app.add_middleware(_BodyLimit, limit=service.config.max_request_bytes)
    app.add_middleware(_Guard, service=service)  # outermost of ours: counts the 413s and 500s too
    for exc_type in (ApiError, SpecInferError, EngineStepError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc_type, _handle)

    def authorized(authorization: str | None = Header(None)) -> None:
        check_api_key(service.api_key, authorization)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "specinfer_dist",
                "max_model_len": service.engine.max_model_len,
                # Unset temperature/top_p/top_k get these (the model's generation_config.json), else OpenAI's.
                "sampling_defaults": service.engine.sampling_defaults}
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> Response:
        _check_model(service, body)
        return await _answer(service, COMPLETION, body, body.prompts(), body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        _check_model(service, body)
        prompt = service.chat_prompt([m.to_template() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens or service.default_chat_max_tokens(len(prompt))
        return await _answer(service, CHAT, body, [prompt], max_tokens)

    app.include_router(v1)

    @app.post(RESET_PREFIX_CACHE, dependencies=[Depends(authorized)])
    async def reset_prefix_cache() -> dict[str, Any]:
        """Forget every cached prompt prefix of the replica Serve routes this to (e.g. to measure
        cold prefills); running requests keep their blocks. ``blocks``: LLM blocks that were published."""
        blocks = await service.engine.reset_prefix_cache()
        logger.info("prefix cache reset: %d published blocks forgotten", blocks)
        return {"reset": True, "blocks": blocks}

    # Plain functions: FastAPI runs them in a thread, as the Ray runtime's engine answers by blocking calls.
    @app.get("/health")
    def health() -> JSONResponse:
        """200 once the engine is ready; 503 with what the replica is doing until then (or why it failed)."""
        status = service.status()
        ready = status["status"] == "ready"
        return JSONResponse(status, status_code=200 if ready else 503, headers={} if ready else RETRY_AFTER)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _check_model(service: Service, body: SamplingRequest) -> None:
    if body.model not in (None, service.model_name):
        raise ApiError(404, f"The model '{body.model}' does not exist", param="model", code="model_not_found")


async def _answer(service: Service, shape: _Shape, body: SamplingRequest, prompts: list[Prompt], max_tokens: int) -> Response:
    n = body.n
    top = top_logprobs_requested(body.top_logprobs_wanted())
    logprobs = None if top is None else LogprobsFormatter(service.engine.tokenizer, top, chat=shape is CHAT)
    jobs = [(prompt, body.sampling_params(max_tokens, j)) for prompt in prompts for j in range(n)]
    events = service.generate(jobs)
    first = await anext(events)  # bad input raises here, while a 400 can still be sent
    head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
    if body.stream:
        chunks = _chunks(service, shape, head, first, events, n, logprobs, body.include_usage, body.continuous_usage)
        return StreamingResponse(_sse(chunks), media_type="text/event-stream")
    usage, texts, finish = Usage(), [""] * len(jobs), [None] * len(jobs)
    entries: list[list[Any]] = [[] for _ in jobs]  # per choice: the engine's per-token logprobs
    async with aclosing(events):
        async for k, delta in _prepend(first, events):
            usage.add(delta, count_prompt=k % n == 0)  # a prompt counts once, whatever n
            texts[k] += delta.text
            finish[k] = delta.finish_reason
            if logprobs:
                entries[k] += delta.logprobs
    choices = [
        shape.choice(k, texts[k], finish[k], logprobs and logprobs.format(k, entries[k]), False, False)
        for k in range(len(jobs))
    ]
    return JSONResponse({**head, "object": shape.object, "choices": choices, "usage": usage.to_openai()})


async def _chunks(
    service: Service, shape: _Shape, head: dict[str, Any], first: tuple[int, RequestDelta],
    events: AsyncIterator[tuple[int, RequestDelta]], n: int, logprobs: LogprobsFormatter | None,
    include_usage: bool, continuous_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    usage, started = Usage(), set()
    async with aclosing(events):
        try:
            async for k, delta in _prepend(first, events):
                usage.add(delta, count_prompt=k % n == 0)
                chunk_logprobs = logprobs and logprobs.format(k, delta.logprobs)
                choice = shape.choice(k, delta.text, delta.finish_reason, chunk_logprobs, True, k not in started)
                started.add(k)
                extra = {"usage": usage.to_openai() if continuous_usage else None} if include_usage else {}
                yield {**head, "object": shape.chunk_object, "choices": [choice], **extra}
        except Exception as err:  # noqa: BLE001 - the status line is gone; report in-band, as OpenAI does
            api = ApiError.of(err)
            if api.status >= 500:
                logger.error("stream %s failed: %s", head["id"], err)
            service.metrics.stream_errors.labels("http", str(api.status)).inc()
            yield api.body()
            return
    if include_usage:
        yield {**head, "object": shape.chunk_object, "choices": [], "usage": usage.to_openai()}


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async with aclosing(chunks):
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


async def _prepend(first: tuple[int, RequestDelta], rest: AsyncIterator[tuple[int, RequestDelta]]) -> AsyncIterator[tuple[int, RequestDelta]]:
    yield first
    async for item in rest:
        yield item
