"""Serving wrapper: an LLMEngine stepping on its own thread, requests streamed as async iterators.

The engine is not thread-safe, so only the loop thread touches it; callers hand requests
and aborts over through an inbox. A client that stops iterating (disconnects) aborts its
request, which frees its KV cache. If a step fails (say, a verifier shard died), the requests
in it end with ``EngineStepError`` and the loop keeps serving the others.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from specinfer_dist.engine.engine import LLMEngine, Prompt
from specinfer_dist.engine.sequence import Sequence, SpecStats
from specinfer_dist.runtime.sampling_params import SamplingParams


class EngineStepError(RuntimeError):
    """The engine failed while running this request (not the client's fault)."""


@dataclass
class RequestDelta:
    """What one step added to a request."""

    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last delta
    stats: SpecStats = field(default_factory=SpecStats)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Counters:
    """Totals since start, in the shape of vLLM's metrics (exported by the serving layer)."""

    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    spec_decode_num_drafts: int = 0  # verification steps that carried a draft
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


class _Stream:
    """Per-request state owned by the loop thread, plus the caller's queue."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop) -> None:
        self.seq = seq
        self.loop = loop
        self.queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self.sent_tokens = 0
        self.sent_text = 0
        self.last_stats = SpecStats()  # at the previous delta, for per-step counters

    def push(self, item: RequestDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.counters = Counters()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[int, _Stream] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specinfer-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until it finishes. Bad input raises before the first one."""
        seq = self.engine.new_sequence(prompt, params, chat)  # validates; raises SpecInferError
        stream = _Stream(seq, asyncio.get_running_loop())
        self._inbox.put(("add", stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away, or the request failed: free it
                self._inbox.put(("abort", seq.request_id))

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer (the serving layer renders chat templates with it)."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        """Prompt + generated tokens one request may hold (the LLM's context)."""
        return self.engine.max_positions

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampling values requests get where they set none (the model's generation_config.json)."""
        return self.engine.sampling_defaults

    def num_waiting(self) -> int:
        return self.engine.num_waiting()

    def num_running(self) -> int:
        return self.engine.num_running()

    def kv_usage(self) -> float | None:
        """Fraction of the LLM's KV block pool in use (None without a bounded pool)."""
        return self.engine.kv_usage()

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            idle = not self.engine.has_unfinished()
            try:
                # Block while idle; between steps, just drain what has arrived.
                self._handle(*self._inbox.get(timeout=None if idle else 0))
                continue
            except queue.Empty:
                pass
            try:
                stepped = self.engine.step()
            except Exception as err:  # noqa: BLE001 - any failure ends only the requests in it
                self._fail_running(err)
                continue
            for seq in stepped:
                self._emit(self._streams[seq.request_id])

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            stream: _Stream = payload
            self._streams[stream.seq.request_id] = stream
            self.engine.add(stream.seq)
            self.counters.prompt_tokens += len(stream.seq.prompt_ids)
        elif kind == "abort" and payload in self._streams:
            del self._streams[payload]
            if self.engine.abort(payload):
                self.counters.requests_aborted += 1

    def _fail_running(self, err: Exception) -> None:
        for seq in self.engine.running():
            self.engine.abort(seq.request_id)
            stream = self._streams.pop(seq.request_id, None)
            if stream is not None:
                stream.push(EngineStepError(f"generation failed: {err}"))

    def _emit(self, stream: _Stream) -> None:
        seq = stream.seq
        new_tokens = seq.output_ids[stream.sent_tokens :]
        stream.sent_tokens = len(seq.output_ids)
        text = seq.text if seq.finished else self._visible_text(seq)
        delta = RequestDelta(seq.request_id, len(seq.prompt_ids), new_tokens, text[stream.sent_text :])
        stream.sent_text = max(stream.sent_text, len(text))
        self._count_step(stream, len(new_tokens))
        if seq.finished:
            delta.finish_reason = seq.finish_reason.value
            delta.stats = seq.stats
            self.counters.requests_finished += 1
            del self._streams[seq.request_id]
        stream.push(delta)

    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to send now: no half-decoded character, no possible start of a stop string."""
        text = self.engine.decode(seq.output_ids).rstrip("\ufffd")
        holdback = max((len(s) - 1 for s in seq.params.stop), default=0)
        return text[: len(text) - holdback] if holdback else text

    def _count_step(self, stream: _Stream, new_tokens: int) -> None:
        c, now, before = self.counters, stream.seq.stats, stream.last_stats
        c.generation_tokens += new_tokens
        if now.drafted_tokens > before.drafted_tokens:
            c.spec_decode_num_drafts += now.steps - before.steps
        c.spec_decode_num_draft_tokens += now.drafted_tokens - before.drafted_tokens
        c.spec_decode_num_accepted_tokens += now.accepted_tokens - before.accepted_tokens
        per_pos = c.spec_decode_num_accepted_tokens_per_pos
        per_pos.extend([0] * (len(now.accepted_at_depth) - len(per_pos)))
        for d, n in enumerate(now.accepted_at_depth):
            per_pos[d] += n - (before.accepted_at_depth[d] if d < len(before.accepted_at_depth) else 0)
        stream.last_stats = copy.deepcopy(now)
