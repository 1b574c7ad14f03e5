"""Iteration-level scheduling: requests join and leave the running batch between steps.

With a KV pool, a batch is scheduled only if every request in it can hold its worst case for
the step (its tokens plus a full draft tree), so the LLM never runs out of KV memory and no
request fails for it: new requests wait, and when running requests outgrow the pool the most
recently admitted one is preempted (its LLM cache freed, its prefix recomputed once it is back,
or taken from the prefix cache where it is still there).

Admission counts blocks as the pool holds them: a step of the running requests needs each one's
growth past the blocks it holds (a block shared by several is held once), and a newcomer needs
its rows less the cached prefix blocks it will take, plus those of them nobody holds now (taking
them leaves fewer for allocations). Free and evictable blocks are what is there to take.

With a per-step token budget (chunked prefill), ``split`` bounds the rows a step sends through the
LLM: every decoding request runs, and prompts are prefilled in chunks with what is left, so a long
prompt never holds up the others for more than a step's worth of work.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from specinfer_dist.engine.sequence import Sequence
from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.runtime.block_pool import KVCapacity


class SchedulerKV(Protocol):
    """The LLM's KV as the scheduler sees it (the engine's, over its verifier's ``KVBlocks``)."""

    capacity: KVCapacity | None  # None: no bounded pool, no admission control

    def free_blocks(self) -> int: ...

    def held_blocks(self, request_id: int) -> int: ...

    def reusable(self, seq: Sequence) -> tuple[int, int]:
        """Cached prefix blocks ``seq`` would take when admitted, and how many of them nobody holds."""

    def admit(self, seq: Sequence) -> None:
        """Start ``seq``'s LLM cache (on its cached prefix: sets ``num_cached``)."""

    def release(self, request_id: int) -> None: ...


class Scheduler:
    """``kv`` is the LLM's KV pool and caches; ``max_drafted`` is the most tree tokens a step
    drafts for one request."""

    def __init__(self, max_num_seqs: int, kv: SchedulerKV, max_drafted: int = 0) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv = kv
        self.kv_capacity = kv.capacity
        self.block_size = kv.capacity.block_size if kv.capacity else 1
        self.max_drafted = max_drafted
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Reject a request that would not fit the KV pool even alone."""
        cap = self.kv_capacity
        if cap is None:
            return
        # While running, a request has at most prompt + max_tokens - 1 tokens (then it ends).
        need = cap.blocks_for(prompt_tokens + max_tokens - 1 + self.max_drafted)
        if need > cap.num_blocks:
            raise InvalidRequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) with a draft tree of up to "
                f"{self.max_drafted} tokens needs {need} KV blocks of {cap.block_size} tokens; the pool has "
                f"{cap.num_blocks}"
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The batch for the next step: the running requests that fit (newest preempted first),
        topped up first-come first-served as far as ``max_num_seqs`` and the KV pool allow."""
        while not self._fits(self.running):
            self._preempt(self.running.pop())
        while self.waiting and len(self.running) < self.max_num_seqs and self._fits(self.running, self.waiting[0]):
            seq = self.waiting.popleft()
            self.kv.admit(seq)
            self.running.append(seq)
        return list(self.running)

    def split(
        self, seqs: list[Sequence], budget: int | None, drafting: bool
    ) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Which of ``seqs`` run a whole step now (decode/verify, or a prompt's last part with
        its first tree), and which only prefill a chunk of that many rows, given ``budget``
        LLM rows per step (None: no budget, everything runs whole).

        Decode/verify rows (the root and, when ``drafting``, a full tree each) come first. Then
        prompts whose rest fits run whole (in admission order: a short prompt is not held up by
        a long one), and the oldest prompt that does not fit gets a chunk of what is left. Prompts
        get at least half the budget however many requests decode, so a long one keeps advancing.
        Prompts that get nothing wait for the next step. A chunk ends on a block boundary where it can.
        """
        if budget is None:
            return list(seqs), []
        step_rows = 1 + (self.max_drafted if drafting else 0)
        prefilling = [s for s in seqs if s.prefilling]
        left = max(budget - step_rows * (len(seqs) - len(prefilling)), budget // 2)
        waiting: set[int] = set()
        for seq in prefilling:
            chain = len(seq.prompt_ids) + len(seq.output_ids) - 1 - seq.num_cached
            if chain <= left:  # the rest of the prompt, then its first tree: a whole step
                left -= chain + step_rows
            else:
                waiting.add(seq.request_id)
        oldest = next((s for s in prefilling if s.request_id in waiting), None)
        rows = self._block_end(oldest, left, budget) if oldest is not None and left > 0 else 0
        return [s for s in seqs if s.request_id not in waiting], [(oldest, rows)] if rows else []

    def _block_end(self, seq: Sequence, rows: int, budget: int) -> int:
        """A chunk of at most ``rows`` ending on a block boundary, so the request can still take
        blocks another request publishes meanwhile (engine: prefix caching); none this step if
        that leaves nothing and a later step surely has a block's worth (prompts get at least
        half the budget)."""
        aligned = (seq.num_cached + rows) // self.block_size * self.block_size - seq.num_cached
        if aligned > 0:
            return aligned
        return 0 if budget // 2 >= self.block_size else rows

    def _fits(self, running: list[Sequence], newcomer: Sequence | None = None) -> bool:
        """Whether a step of ``running`` (and ``newcomer``) fits the KV pool even if each gets a
        full draft tree: the step's rows are the request's tokens (its root last) plus the
        drafted ones (see the module docstring)."""
        cap = self.kv_capacity
        if cap is None:
            return True
        rows = lambda s: cap.blocks_for(len(s.prompt_ids) + len(s.output_ids) + self.max_drafted)  # noqa: E731
        need = sum(max(0, rows(s) - self.kv.held_blocks(s.request_id)) for s in running)
        if newcomer is not None:
            reused, unheld = self.kv.reusable(newcomer)
            need += rows(newcomer) - reused + unheld
        return need <= self.kv.free_blocks()

    def _preempt(self, seq: Sequence) -> None:
        # Only the LLM cache goes. Drafters keep their state (caches of the same tokens, and
        # seeded random streams where they were), so what a request drafts, and thus a seeded
        # sampled output, does not depend on whether it was preempted.
        self.kv.release(seq.request_id)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)

    def remove(self, request_id: int) -> Sequence | None:
        """Take a request out wherever it is (waiting or running)."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
