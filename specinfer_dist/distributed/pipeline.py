"""A verifier forward always in flight: the Ray runtime's step, in two alternating micro-batches.

The running requests are split into two halves. While the shard group verifies one half
(a Ray call whose object refs the engine holds), the coordinator drafts the other half. Then
it waits for the in-flight forward (``ray.wait`` inside ``ShardGroupVerifier.collect``),
**submits the freshly drafted half's forward at once**, and only then verifies and commits the
finished half's results on the host. The device therefore idles only for the few
milliseconds between one forward's result arriving and the next being sent; verification
on the host, merging, streaming and the next drafting all overlap a forward.

Depth: one forward in flight (plus the drafting of the other micro-batch): a request's tree
is drafted only after its previous tree was verified and committed, which is what keeps the
output exact: every tree is drafted from exactly the tokens it would be drafted from without
pipelining, and each forward sees exactly the caches it would. A request advances every other
step, and each step returns the half it verified. Requests preempted or aborted while their
forward is in flight are skipped (their rows are freed by the release queued for the shards).

Prompt chunks (chunked prefill) and requests whose drafting failed are handled by the plain
step: while any running request still has prompt chunks to cache, or nothing is in flight
and a drafter failed, the engine steps plainly (exact either way), then pipelines again.

A feature drafter gets the hidden states of the forward that verified its request's tree, with
the logits (``submit(items, aux_layers)``), and observes the committed rows in ``apply`` before
that request is drafted again: it sees what it would see without pipelining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.engine.sequence import Sequence
from specinfer_dist.runtime.verifier import VerifyItem
from specinfer_dist.tree.token_tree import TokenTree


@dataclass
class _InFlight:
    seqs: list[Sequence]
    trees: list[TokenTree]
    items: list[VerifyItem]
    cached: list[int]  # each request's num_cached at submission (a preemption resets it)
    handle: Any  # what verifier.submit returned


class PipelinedEngine(LLMEngine):
    """LLMEngine whose verifier offers ``submit(items, aux_layers) -> handle`` and ``collect(handle)
    -> (logits, per-item hidden states or None)`` (ShardGroupVerifier); see the module docstring.
    Without drafters it steps plainly."""

    pipeline = True
    _inflight: _InFlight | None = None

    def step(self) -> list[Sequence]:
        if not self.drafters:
            return super().step()
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        if self._inflight is None:
            _, chunks = self.scheduler.split(seqs, self.max_num_batched_tokens, self._drafting())
            if chunks:  # prompts still being prefilled in chunks: plain steps until they are cached
                return super().step()
        start = time.perf_counter()
        failed: list[Sequence] = []
        if self._inflight is None:  # start-up, or after a failure: put half the batch in flight
            first, trees, failed = self._drop_failed(*self._drafted_half(seqs[: (len(seqs) + 1) // 2]))
            if not first:  # every one of them failed to draft (and has ended)
                return failed
            self._inflight = self._submit(first, trees)
        done = self._inflight
        busy = {seq.request_id for seq in done.seqs} | {seq.request_id for seq in failed}
        later, trees, failed_later = self._drop_failed(*self._drafted_half([s for s in seqs if s.request_id not in busy]))
        failed += failed_later  # overlaps the forward in flight
        drafted = time.perf_counter()
        try:
            logits, hidden = self.verifier.collect(done.handle)
        except BaseException:
            self._inflight = None
            raise
        self._inflight = self._submit(later, trees) if later else None
        now = {seq.request_id for seq in seqs}
        keep = [i for i, (seq, cached) in enumerate(zip(done.seqs, done.cached))
                if seq.request_id in now and seq.num_cached == cached and not seq.finished]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        if len(keep) < len(done.items):  # the kept requests' logit rows, still one after another
            per_item = logits.split([len(item.logit_rows) for item in done.items])
            logits = torch.cat(pick(per_item)) if keep else logits[:0]
        hidden = None if hidden is None else pick(hidden)  # feature drafters observe the committed rows
        self.apply(pick(done.seqs), pick(done.trees), pick(done.items), logits, hidden)
        self.timing["draft_s"] += drafted - start
        self.timing["verify_s"] += time.perf_counter() - drafted  # forward time not hidden by drafting
        return failed + pick(done.seqs)

    def _drafted_half(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[TokenTree | Exception]]:
        return seqs, self.draft(seqs) if seqs else []

    def _submit(self, seqs: list[Sequence], trees: list[TokenTree]) -> _InFlight:
        items = self.verify_items(seqs, trees)
        # Feature drafters read this forward's hidden states (aux_layers is empty without one).
        handle = self.verifier.submit(items, self.aux_layers)
        return _InFlight(seqs, trees, items, [seq.num_cached for seq in seqs], handle)
