"""Tree shapes: ``<k1,...,km>`` gives every frontier node at depth i exactly k_i children."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from specinfer_dist.errors import InvalidConfigError

DEFAULT_WIDTHS = (1, 1, 3, 1, 1, 1, 1, 1)  # the SpecInfer paper's evaluation shape
DEFAULT_TOKEN_BUDGET = 64


DYNAMIC_TOP_K, DYNAMIC_DEPTH = 4, 6  # `--tree dynamic`: expand the 4 best nodes per depth, 6 deep


@dataclass(frozen=True)
class TreeSpec:
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    token_budget: int = DEFAULT_TOKEN_BUDGET  # most drafted tokens per request per step
    # EAGLE-2 (tree/dynamic.py): widths are k per depth; only the k most probable new nodes of
    # a depth get children, and greedy trees keep their token_budget most probable nodes.
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not self.widths:
            raise InvalidConfigError("a tree needs at least one depth")
        if any(not isinstance(k, int) or k < 1 for k in self.widths):
            raise InvalidConfigError(f"tree widths must be positive integers, got {list(self.widths)}")
        if self.token_budget < 1:
            raise InvalidConfigError(f"token budget must be positive, got {self.token_budget}")
        if not self.dynamic and self.num_tokens > self.token_budget:
            raise InvalidConfigError(
                f"tree {','.join(map(str, self.widths))} drafts {self.num_tokens} tokens per step, over the "
                f"budget of {self.token_budget}; raise the budget explicitly to allow it"
            )

    @classmethod
    def parse(cls, text: str, token_budget: int = DEFAULT_TOKEN_BUDGET) -> "TreeSpec":
        """Widths like ``1,1,3,1``, or ``dynamic`` / ``dynamic:K,DEPTH`` (an EAGLE-2 tree)."""
        kind, _, rest = text.partition(":")
        if kind == "dynamic":
            try:
                k, depth = (int(x) for x in rest.split(",")) if rest else (DYNAMIC_TOP_K, DYNAMIC_DEPTH)
            except ValueError:
                raise InvalidConfigError(f"dynamic tree must be dynamic or dynamic:K,DEPTH, got {text!r}") from None
            return cls((k,) * depth, token_budget, dynamic=True)
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
        """Drafted tokens in a full tree of this shape (a dynamic one: at most its budget)."""
        if self.dynamic:  # k children for the root, then k * k candidates per depth
            k = self.widths[0]
            return min(self.token_budget, k + (self.depth - 1) * k * k)
        return sum(prod(self.widths[: d + 1]) for d in range(self.depth))

    def as_sequence(self) -> "TreeSpec":
        """A chain of the same depth: sequence-based speculation."""
        return TreeSpec((1,) * self.depth, self.token_budget)

    def __str__(self) -> str:
        if self.dynamic:
            return f"dynamic:{self.widths[0]},{self.depth}"
        return ",".join(map(str, self.widths))
