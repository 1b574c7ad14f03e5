"""Tree shapes: ``<k1,...,km>`` gives every frontier node at depth i exactly k_i children."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from specinfer_dist.errors import InvalidConfigError

DEFAULT_WIDTHS = (1, 1, 3, 1, 1, 1, 1, 1)  # the SpecInfer paper's evaluation shape
DEFAULT_TOKEN_BUDGET = 64


@dataclass(frozen=True)
class TreeSpec:
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    token_budget: int = DEFAULT_TOKEN_BUDGET  # most drafted tokens per request per step

    def __post_init__(self) -> None:
        if not self.widths:
            raise InvalidConfigError("a tree needs at least one depth")
        if any(not isinstance(k, int) or k < 1 for k in self.widths):
            raise InvalidConfigError(f"tree widths must be positive integers, got {list(self.widths)}")
        if self.token_budget < 1:
            raise InvalidConfigError(f"token budget must be positive, got {self.token_budget}")
        if self.num_tokens > self.token_budget:
            raise InvalidConfigError(
                f"tree {','.join(map(str, self.widths))} drafts {self.num_tokens} tokens per step, over the "
                f"budget of {self.token_budget}; raise the budget explicitly to allow it"
            )

    @classmethod
    def parse(cls, text: str, token_budget: int = DEFAULT_TOKEN_BUDGET) -> "TreeSpec":
        try:
            widths = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise InvalidConfigError(f"tree must be comma-separated integers like 1,1,3,1, got {text!r}") from None
        return cls(widths, token_budget)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def num_tokens(self) -> int:
        """Drafted tokens in a full tree of this shape."""
        return sum(prod(self.widths[: d + 1]) for d in range(self.depth))

    def as_sequence(self) -> "TreeSpec":
        """A chain of the same depth: sequence-based speculation."""
        return TreeSpec((1,) * self.depth, self.token_budget)

    def __str__(self) -> str:
        return ",".join(map(str, self.widths))
