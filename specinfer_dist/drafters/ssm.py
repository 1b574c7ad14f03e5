"""A small causal LM that expands a token tree depth by depth, for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from specinfer_dist.drafters.base import Drafter
from specinfer_dist.engine.kv_cache import KVCache
from specinfer_dist.engine.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.engine.sequence import Sequence
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


@dataclass
class _Expansion:
    """One request's tree under construction and how its nodes map to pending cache rows."""

    cache: KVCache
    tree: TokenTree
    chain_len: int  # committed tokens fed this step (the root is the last of them)
    max_depth: int
    item: RunItem
    node_row: list[int] = field(default_factory=list)
    frontier: list[int] = field(default_factory=lambda: [0])


class SSMDrafter(Drafter):
    """Greedy expansion: each frontier node at depth i gets the SSM's top-k_i tokens as children.

    The SSM keeps a KV cache of the committed tokens per request. Each step first feeds the
    tokens committed since the last step (they end with the tree's root), then one forward
    per depth over the new frontier; afterwards only the committed rows stay in its cache.
    """

    def __init__(self, model: Transformer, spec: TreeSpec, name: str = "ssm") -> None:
        super().__init__(name, spec)
        self.runner = ModelRunner(model)
        self.caches: dict[int, KVCache] = {}

    def propose(self, seqs: list[Sequence], max_depths: list[int]) -> list[TokenTree]:
        states = []
        for seq, max_depth in zip(seqs, max_depths):
            if seq.request_id not in self.caches:
                self.caches[seq.request_id] = self.runner.new_cache()
            cache = self.caches[seq.request_id]
            chain = seq.tokens[cache.length :]
            states.append(
                _Expansion(
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
                top = node_logits.topk(self.spec.widths[depth], dim=-1).indices.tolist()
                state.frontier = [state.tree.add(p, t) for p, toks in zip(state.frontier, top) for t in toks]
                if depth + 1 < state.max_depth:
                    self._feed_frontier(state)
                    still.append(state)
            active, depth = still, depth + 1
        for state in states:
            if state.cache.pending:
                state.cache.commit(range(state.chain_len))
        return [state.tree for state in states]

    @staticmethod
    def _feed_frontier(state: _Expansion) -> None:
        parents = state.item.parents
        first_row = len(parents)
        parents = parents + [state.node_row[state.tree.parents[n]] for n in state.frontier]
        state.node_row.extend(range(first_row, first_row + len(state.frontier)))
        tokens = [state.tree.tokens[n] for n in state.frontier]
        state.item = RunItem(state.cache, tokens, parents, list(range(len(tokens))))

    def release(self, seq: Sequence) -> None:
        self.caches.pop(seq.request_id, None)
