"""A small causal LM that expands a token tree depth by depth, for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specinfer_dist.drafters.base import Drafter, DraftRequest, draft_generator
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.tree.sampling import sampling_probs
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


@dataclass
class _Expansion:
    """One request's tree under construction and how its nodes map to pending cache rows."""

    request: DraftRequest
    cache: PagedKVCache
    tree: TokenTree
    chain_len: int  # committed tokens fed this step (the root is the last of them)
    max_depth: int
    item: RunItem
    node_row: list[int] = field(default_factory=list)
    frontier: list[int] = field(default_factory=lambda: [0])


class SSMDrafter(Drafter):
    """Each frontier node at depth i gets k_i children: the SSM's top-k_i tokens for a greedy
    request; k_i independent draws from the SSM's processed distribution q (recorded on each
    child) for a sampled one. ``draft_temperature`` None gives q the request's own transforms.

    The SSM keeps a KV cache of the committed tokens per request. Each step first feeds the
    tokens committed since the last step (they end with the tree's root), then one forward
    per depth over the new frontier; afterwards only the committed rows stay in its cache.
    """

    def __init__(
        self, model: Transformer, spec: TreeSpec, name: str = "ssm", draft_temperature: float | None = None
    ) -> None:
        super().__init__(name, spec)
        self.draft_temperature = draft_temperature
        self.runner = ModelRunner(model)
        self.caches: dict[int, PagedKVCache] = {}
        self.generators: dict[int, torch.Generator] = {}

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        states = []
        for request, max_depth in zip(requests, max_depths):
            if request.request_id not in self.caches:
                self.caches[request.request_id] = self.runner.new_cache()
                self.generators[request.request_id] = draft_generator(request.params, self.name)
            cache = self.caches[request.request_id]
            chain = request.tokens[cache.length :]
            states.append(
                _Expansion(
                    request=request,
                    cache=cache,
                    tree=TokenTree.from_root(chain[-1]),
                    chain_len=len(chain),
                    max_depth=min(max_depth, self.spec.depth),
                    item=RunItem(cache, chain, chain_parents(len(chain)), [len(chain) - 1]),
                    node_row=[len(chain) - 1],
                )
            )
        active = [s for s in states if s.max_depth > 0]
        depth = 0
        while active:
            logits = self.runner.forward([s.item for s in active])
            still = []
            for state, node_logits in zip(active, logits):
                children = self._children(state.request, node_logits, self.spec.widths[depth])
                state.frontier = [
                    state.tree.add(parent, token, q) for parent, kids in zip(state.frontier, children) for token, q in kids
                ]
                if depth + 1 < state.max_depth:
                    self._feed_frontier(state)
                    still.append(state)
            active, depth = still, depth + 1
        for state in states:
            if state.cache.pending:
                state.cache.commit(range(state.chain_len))
        return [state.tree for state in states]

    def _children(
        self, request: DraftRequest, logits: torch.Tensor, k: int
    ) -> list[list[tuple[int, torch.Tensor | None]]]:
        """For each frontier row of ``logits``: k (token, q) children; q None = chosen, not drawn."""
        params = request.params
        if params.greedy:
            return [[(t, None) for t in row] for row in logits.topk(k, dim=-1).indices.tolist()]
        if self.draft_temperature is None:
            q = sampling_probs(logits, params.temperature, params.top_k, params.top_p)
        else:
            q = sampling_probs(logits, self.draft_temperature)
        draws = torch.multinomial(q, k, replacement=True, generator=self.generators[request.request_id]).tolist()
        return [[(t, q[row]) for t in tokens] for row, tokens in enumerate(draws)]

    @staticmethod
    def _feed_frontier(state: _Expansion) -> None:
        parents = state.item.parents
        first_row = len(parents)
        parents = parents + [state.node_row[state.tree.parents[n]] for n in state.frontier]
        state.node_row.extend(range(first_row, first_row + len(state.frontier)))
        tokens = [state.tree.tokens[n] for n in state.frontier]
        state.item = RunItem(state.cache, tokens, parents, list(range(len(tokens))))

    def release(self, request_id: int) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None:
            cache.free()
        self.generators.pop(request_id, None)
