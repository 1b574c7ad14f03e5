"""How long ``tree: auto`` may measure: ``tuning_budget_s`` for the whole of it (the cost model's
measurement, tune.py, and the race, race.py), split by a ``Deadline``.

Invariant: the budget bounds optional work only. Every stage still does the least that gives a
comparable answer (a few tokens of coverage, two sweep sizes, one prompt per race candidate), so
a budget of 0 is valid and overruns by that least amount.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

# ``tuning_budget_s: auto``. On the 2-core CPU the unbounded measurement took 13 s (1 torch thread)
# and the race 39 s; 20 s keeps a first ``generate`` near a minute. On a GPU the same work is
# milliseconds per forward, so a few seconds measure it fully.
AUTO_BUDGET_S = {"cpu": 20.0, "cuda": 5.0}
TUNE_SHARE = 0.4  # of the budget, for the cost model's measurement; the race gets the rest


def budget_seconds(value: float | str, device: torch.device) -> float:
    """``tuning_budget_s`` in seconds on ``device``."""
    if value == "auto":
        return AUTO_BUDGET_S.get(device.type, AUTO_BUDGET_S["cpu"])
    return float(value)


class Deadline:
    """The end of a budget on ``clock`` (tests inject a fake one); ``seconds=None``: no end."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.end = math.inf if seconds is None else clock() + seconds

    def left(self) -> float:
        return max(0.0, self.end - self.clock())

    def passed(self) -> bool:
        return self.left() <= 0

    def fits(self, seconds: float) -> bool:
        """Whether work taking ``seconds`` would end before the deadline."""
        return seconds <= self.left()

    def share(self, fraction: float) -> "Deadline":
        """A deadline ``fraction`` of the time left from now (no end if this one has none)."""
        left = self.left()
        return Deadline(None if math.isinf(left) else fraction * left, self.clock)
