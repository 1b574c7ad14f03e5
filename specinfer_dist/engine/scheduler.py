"""Iteration-level scheduling: requests join and leave the running batch between steps."""

from __future__ import annotations

from collections import deque

from specinfer_dist.engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """The batch for the next step: everything running, topped up first-come first-served."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        return list(self.running)

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
