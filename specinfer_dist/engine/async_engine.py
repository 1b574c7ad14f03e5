"""Serving wrapper: an LLMEngine stepping on its own thread, requests streamed as async iterators.

The engine is not thread-safe, so only the loop thread touches it; callers hand requests
and aborts over through an inbox. A client that stops iterating (disconnects) aborts its
request, which frees its KV cache. A request whose own processing fails (the engine ends it with
``FinishReason.ERROR``) ends with ``EngineStepError`` while the others go on untouched; if the
LLM forward fails (say, a verifier shard died, taking every cache with it), every running
request ends with ``EngineStepError`` and the loop keeps serving new ones. Failures are logged
and counted.

Setup switch: ``switch`` hands the loop a new drafting setup (``tree: auto``'s race winner, raced
beside a serving engine, see ``from_config``); the loop applies it between steps, once every
request fits the KV pool with the new tree's reservation. No request is dropped or changed.

Prefix cache reset: ``reset_prefix_cache`` goes through the inbox too, so the loop forgets the
cached prefixes between steps, never while a step holds them; running requests keep their blocks.

Admission: ``generate`` refuses a sequence with ``EngineOverloadedError`` when
``max_queued_seqs`` are already waiting (counting those still in the inbox); ``check_capacity``
lets the serving layer test a whole request (prompts x n) before starting any of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.builder import Drafting, Target, build_drafting, load_target, races_tree
from specinfer_dist.engine.engine import LLMEngine, Prompt
from specinfer_dist.engine.sequence import Sequence, SpecStats, TokenLogprob
from specinfer_dist.errors import EngineOverloadedError
from specinfer_dist.progress import say
from specinfer_dist.runtime.device import resolve_device
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tuning.race import cached_setup, describe

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running this request (not the client's fault)."""


@dataclass
class RequestDelta:
    """What one step added to a request."""

    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    text: str
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    finish_reason: str | None = None  # set on the last delta
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Counters:
    """Totals since start, in the shape of vLLM's metrics (exported by the serving layer)."""

    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0  # ended by an error in the engine (their own, or their step's)
    prompt_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache when first admitted
    prefix_cache_hits: int = 0  # of them, found cached (not computed)
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
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.counters = Counters()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[int, _Stream] = {}
        self._inbox_adds = 0  # sequences handed over but not yet queued in the engine
        self._adds_lock = threading.Lock()
        self._stopped = threading.Event()
        self._switch: tuple[Drafting, bool] | None = None  # (setup, progress) waiting for every request to fit it
        self.tuning: threading.Thread | None = None  # tree auto racing beside the engine (from_config)
        self._thread = threading.Thread(target=self._run, name="specinfer-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False) -> "AsyncLLMEngine":
        """Serve first, tune later. Where ``tree: auto`` would race setups (tuning/race.py) and no
        result is cached for this machine, the engine starts at once with incremental decoding
        and the race runs on a thread beside it; its winner is switched in between steps
        (``switch``). Outputs are the LLM's under either setup. On CUDA the race runs before
        serving instead (a few seconds there): capturing its CUDA graphs beside a serving
        thread's kernels is not safe."""
        target = load_target(config, progress)
        later = (races_tree(config) and resolve_device(config.device).type != "cuda"
                 and cached_setup(config) is None)
        if not later:
            return cls(LLMEngine.from_config(config, progress, target))
        served = cls(LLMEngine.from_config(config.replace(mode="incremental", feature_drafter=None), progress, target))
        say("serving with incremental decoding while tree auto races setups in the background", show=progress)
        served.tuning = threading.Thread(target=served._tune, args=(config, target, progress), name="specinfer-tune",
                                         daemon=True)
        served.tuning.start()
        return served

    def _tune(self, config: EngineConfig, target: Target, progress: bool) -> None:
        # The race's engines share the LLM's weights (read-only) but tokenize with their own copy:
        # a Rust tokenizer used from two threads at once may raise "Already borrowed".
        racing = dataclasses.replace(target, tokenizer=copy.deepcopy(target.tokenizer))
        try:
            drafting = build_drafting(LLMEngine.raced(config, racing, progress), target, progress)
        except Exception as err:  # noqa: BLE001 - serving goes on as it started
            logger.error("tree auto failed; staying with incremental decoding", exc_info=err)
            say(f"tree auto failed ({type(err).__name__}: {err}); staying with incremental decoding", show=progress)
            return
        if drafting.mode == "incremental":
            say("tree auto chose incremental decoding: serving on as started", show=progress)
        else:
            self.switch(drafting, progress)

    def switch(self, drafting: Drafting, progress: bool = False) -> None:
        """Draft with ``drafting`` from a step soon: between steps, once every request in the
        engine fits the KV pool with the new tree's reservation (``LLMEngine.switch_drafting``)."""
        self._inbox.put(("switch", (drafting, progress)))

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until it finishes. Bad input raises before the first one."""
        seq = self.engine.new_sequence(prompt, params, chat)  # validates; raises SpecInferError
        stream = _Stream(seq, asyncio.get_running_loop())
        with self._adds_lock:  # shutdown sets _stopped under it: no add lands after the final drain
            if self._stopped.is_set():
                raise EngineOverloadedError("the engine is shutting down")
            self.check_capacity(1)
            self._inbox_adds += 1
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

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (the LLM's and the drafters'), between two steps; returns how
        many LLM blocks were published. Raises EngineStepError if the engine failed to."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._adds_lock:  # as generate: nothing lands in the inbox after the final drain
            if self._stopped.is_set():
                raise EngineOverloadedError("the engine is shutting down")
            self._inbox.put(("reset", done))
        return await asyncio.wrap_future(done)

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer (the serving layer renders chat templates with it)."""
        return self.engine.tokenizer

    def check_capacity(self, num_seqs: int) -> None:
        """Raise InvalidRequestError if one request may never start ``num_seqs`` sequences
        (prompts x n, ``max_seqs_per_request``), EngineOverloadedError if the queue has no room
        for them now (``max_queued_seqs``)."""
        self.engine.check_capacity(num_seqs, queued=self.engine.num_waiting() + self._inbox_adds)

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
        """Stop the loop after its current step; every request still in it ends with an error."""
        with self._adds_lock:
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
            self.counters.prefix_cache_queries = self.engine.prefix_cache_queries
            self.counters.prefix_cache_hits = self.engine.prefix_cache_hits
            for seq in stepped:
                self._emit(self._streams[seq.request_id])
            self._try_switch()
        self._drain()

    def _try_switch(self) -> None:
        if self._switch is None:
            return
        drafting, progress = self._switch
        try:
            switched = self.engine.switch_drafting(drafting)
        except Exception as err:  # noqa: BLE001 - a setup this engine cannot run: serve on as before
            self._switch = None
            logger.error("cannot switch to %s; serving on as before", describe(drafting), exc_info=err)
            return
        if switched:
            self._switch = None
            logger.info("switched to %s", describe(drafting))
            say(f"switched to {describe(drafting)}", show=progress)

    def _drain(self) -> None:
        """After a stop: what is still in the inbox is handled (aborts free their requests), then
        every request left ends with an error, so no client waits and no request stays."""
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                break
        for request_id, stream in list(self._streams.items()):
            del self._streams[request_id]
            self.engine.abort(request_id)
            stream.push(EngineOverloadedError("the engine is shutting down"))

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            stream: _Stream = payload
            with self._adds_lock:
                self._inbox_adds -= 1
                try:
                    self.engine.add(stream.seq)
                except Exception as err:  # noqa: BLE001 - refused (overloaded): tell this caller only
                    stream.push(err)
                    return
            self._streams[stream.seq.request_id] = stream
            self.counters.prompt_tokens += len(stream.seq.prompt_ids)
        elif kind == "switch":
            self._switch = payload
            self._try_switch()
        elif kind == "reset":
            self._reset_prefix_cache(payload)
        elif kind == "abort" and payload in self._streams:
            del self._streams[payload]
            if self.engine.abort(payload):
                self.counters.requests_aborted += 1

    def _reset_prefix_cache(self, done: concurrent.futures.Future[int]) -> None:
        if not done.set_running_or_notify_cancel():  # the caller gave up waiting (cancelled): no reset
            return
        try:
            blocks = self.engine.reset_prefix_cache()
        except Exception as err:  # noqa: BLE001 - the caller hears of it; serving goes on
            logger.error("resetting the prefix cache failed", exc_info=err)
            done.set_exception(EngineStepError(f"resetting the prefix cache failed: {type(err).__name__}: {err}"))
            return
        done.set_result(blocks)

    def _fail_running(self, err: Exception) -> None:
        running = self.engine.running()
        logger.error("engine step failed; ending its %d requests %s", len(running),
                     [seq.request_id for seq in running], exc_info=err)
        for seq in running:
            self.engine.abort(seq.request_id)
            stream = self._streams.pop(seq.request_id, None)
            if stream is not None:
                self.counters.requests_failed += 1
                stream.push(EngineStepError(f"generation failed: {err}"))
        # Requests that failed on their own earlier in the step have already left the engine.
        for stream in [s for s in self._streams.values() if s.seq.error is not None]:
            self._emit(stream)

    def _emit(self, stream: _Stream) -> None:
        seq = stream.seq
        if seq.error is None:
            try:
                text = seq.text if seq.finished else self._visible_text(seq)
            except Exception as err:  # noqa: BLE001 - detokenising this request failed: end it alone
                self.engine.abort(seq.request_id)
                seq.error = f"request {seq.request_id} failed while detokenising: {type(err).__name__}: {err}"
                logger.error("%s", seq.error, exc_info=err)
        if seq.error is not None:  # the engine logged it; what was streamed so far stands
            self.counters.requests_failed += 1
            del self._streams[seq.request_id]
            stream.push(EngineStepError(seq.error))
            return
        new_tokens = seq.output_ids[stream.sent_tokens :]
        logprobs = None if seq.logprobs is None else seq.logprobs[stream.sent_tokens :]
        stream.sent_tokens = len(seq.output_ids)
        delta = RequestDelta(
            seq.request_id, len(seq.prompt_ids), new_tokens, text[stream.sent_text :], seq.cached_tokens or 0,
            logprobs=logprobs,
        )
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
