"""A small causal LM that expands a token tree depth by depth, for a whole batch at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specinfer_dist.drafters.base import Drafter, DraftRequest, draft_generator
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tree.dynamic import best_nodes, prune_tree
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
    node_row: dict[int, int] = field(default_factory=dict)  # fed tree node -> its pending row
    frontier: list[int] = field(default_factory=lambda: [0])
    outputs: torch.Tensor | None = None  # feature drafters: every pending row's output so far
    scores: list[float] = field(default_factory=lambda: [0.0])  # dynamic trees: path log-prob per node


class SSMDrafter(Drafter):
    """Each frontier node at depth i gets k_i children: the SSM's top-k_i tokens for a greedy
    request; k_i independent draws from the SSM's processed distribution q (recorded on each
    child) for a sampled one. ``draft_temperature`` None gives q the request's own transforms.
    With a ``confidence`` c > 0 the drafter proposes only where it is sure enough: a greedy
    child needs q >= c, and a sampled node gets its draws only where its most probable token
    has q >= c (so whether a node has children depends on its path, never on the draws
    themselves: multi-step speculative sampling stays exact). Where each verified row costs
    (a CPU), unlikely drafts cost more than they bring (HF's ``assistant_confidence_threshold``
    is the same idea for chains).

    The SSM keeps a KV cache of the committed tokens per request. Each step first feeds the
    tokens committed since the last step (they end with the tree's root), then one forward
    per depth over the new frontier; afterwards only the committed rows stay in its cache.
    With a dynamic spec (tree/dynamic.py) only the k most probable new nodes of a depth form
    the next frontier, and greedy trees keep their token_budget most probable nodes.
    Subclasses change what is fed (``_chain``) and how a depth is computed (``_forward``).
    With ``prefix_caching`` a request's cache starts on the longest prefix its pool has cached
    (runtime/kv_cache.py), so only the rest is fed.
    """

    def __init__(
        self, model: Transformer, spec: TreeSpec, name: str = "ssm", draft_temperature: float | None = None,
        prefix_caching: bool = False, confidence: float = 0.0,
    ) -> None:
        super().__init__(name, spec)
        self.draft_temperature = draft_temperature
        self.confidence = confidence
        self.runner = ModelRunner(model, prefix_caching=prefix_caching)
        self.caches: dict[int, PagedKVCache] = {}
        self.generators: dict[int, torch.Generator] = {}

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        states = []
        for request, max_depth in zip(requests, max_depths):
            if request.request_id not in self.caches:
                self.start(request.request_id, request.tokens, request.params)
            cache = self.caches[request.request_id]
            chain = self._chain(request, cache)
            states.append(
                _Expansion(
                    request=request,
                    cache=cache,
                    tree=TokenTree.from_root(request.tokens[-1]),
                    chain_len=len(chain),
                    max_depth=min(max_depth, self.spec.depth) if chain else 0,
                    item=RunItem(cache, chain, chain_parents(len(chain)), [len(chain) - 1]),
                    node_row={0: len(chain) - 1},
                )
            )
        active = [s for s in states if s.max_depth > 0]
        depth = 0
        while active:
            logits = self._forward(active)
            still = []
            for state, node_logits in zip(active, logits):
                if state.request.grammar is not None:
                    node_logits = self._constrained(state, node_logits)
                children = self._children(state.request, node_logits, self.spec.widths[depth])
                new = [
                    state.tree.add(parent, token, q)
                    for parent, kids in zip(state.frontier, children)
                    for token, q in kids
                ]
                if self.spec.dynamic:  # EAGLE-2: only the most probable new nodes grow further
                    self._score(state, node_logits, new)
                    new = best_nodes(new, state.scores, self.spec.widths[0])
                state.frontier = new
                if depth + 1 < state.max_depth and new:  # a grammar may leave a frontier no allowed token
                    self._feed_frontier(state)
                    still.append(state)
            active, depth = still, depth + 1
        for state in states:
            if state.cache.pending:
                state.cache.commit(range(state.chain_len))
            if self.spec.dynamic and state.request.params.greedy:  # sampled draws are never dropped by value
                state.tree = prune_tree(state.tree, state.scores, self.spec.token_budget)
        return [state.tree for state in states]

    def start(self, request_id: int, tokens: list[int], params: SamplingParams) -> None:
        """A new request's cache, on its longest cached prefix (the rows ``_chain`` need not feed)."""
        if request_id in self.caches:
            return
        self.caches[request_id] = cache = self.runner.new_cache(self._seed(tokens))
        self.generators[request_id] = draft_generator(params, self.name)
        if self.runner.pool.prefix_caching:
            cache.attach(self._row_ids(tokens))

    def _seed(self, tokens: list[int]) -> bytes:
        """What every cache row depends on besides its own and earlier rows' ids (here nothing)."""
        return b""

    def _row_ids(self, tokens: list[int]) -> list[int]:
        """The ids of the rows that may come from the prefix cache: all but the root, which is fed."""
        return tokens[:-1]

    def reset_prefix_cache(self) -> None:
        self.runner.pool.reset_prefix_cache()

    @staticmethod
    def _score(state: _Expansion, logits: torch.Tensor, new: list[int]) -> None:
        """Path log-probability of each new node: its parent's plus log q of its token
        (q: the distribution that drew it, else the drafter's softmax). The nodes' values are
        gathered by one index per distribution and read in one copy, not an ``.item()`` each."""
        if not new:
            return
        tree = state.tree
        by_q: dict[int | None, tuple[torch.Tensor | None, list[int]]] = {}  # q's data_ptr (siblings share q)
        for i, node in enumerate(new):
            q = tree.probs[node]
            by_q.setdefault(None if q is None else q.data_ptr(), (q, []))[1].append(i)
        rows = {node: row for row, node in enumerate(state.frontier)}
        parts, order = [], []
        for q, members in by_q.values():
            tokens = [tree.tokens[new[i]] for i in members]
            if q is None:
                parts.append(logits.log_softmax(dim=-1)[[rows[tree.parents[new[i]]] for i in members], tokens])
            else:
                parts.append(q[tokens].log())
            order += members
        steps = dict(zip(order, torch.cat(parts).tolist()))
        for i, node in enumerate(new):
            state.scores.append(state.scores[tree.parents[node]] + steps[i])

    @staticmethod
    def _constrained(state: _Expansion, logits: torch.Tensor) -> torch.Tensor:
        """The frontier's logits with what the request's grammar forbids after each frontier node
        at -inf: greedy children are allowed tokens, and a sampled child's q is the drafter's
        distribution renormalised over them (so the grammar never drops a draw, see runtime/grammar.py)."""
        forbidden = state.request.grammar.forbidden([tuple(state.tree.path(n)) for n in state.frontier], logits.device)
        width = logits.shape[-1]
        if forbidden.shape[-1] < width:  # the drafter's head is wider than the LLM's vocabulary
            forbidden = torch.nn.functional.pad(forbidden, (0, width - forbidden.shape[-1]), value=True)
        return logits.masked_fill(forbidden[:, :width], float("-inf"))

    def _chain(self, request: DraftRequest, cache: PagedKVCache) -> list[int]:
        """Tokens fed before the tree: those committed since the last step, ending with the root
        (empty: nothing to draft from this step)."""
        return request.tokens[cache.length :]

    def _forward(self, states: list[_Expansion]) -> list[torch.Tensor]:
        """Logits of every state's ``item.logit_rows``, one forward for all."""
        return self.runner.forward([s.item for s in states])

    def _children(
        self, request: DraftRequest, logits: torch.Tensor, k: int
    ) -> list[list[tuple[int, torch.Tensor | None]]]:
        """For each frontier row of ``logits``: up to k (token, q) children; q None = chosen, not drawn."""
        params = request.params
        if params.greedy:
            top = logits.topk(k, dim=-1)
            keep = top.values > float("-inf")  # a grammar may allow fewer than k tokens
            if self.confidence > 0:  # log q >= log c, q the drafter's softmax
                keep &= top.values - logits.logsumexp(dim=-1, keepdim=True) >= math.log(self.confidence)
            return [[(t, None) for t, ok in zip(ids, oks) if ok] for ids, oks in zip(top.indices.tolist(), keep.tolist())]
        if self.draft_temperature is None:
            q = sampling_probs(logits, params.temperature, params.top_k, params.top_p)
        else:
            q = sampling_probs(logits, self.draft_temperature)
        draws = torch.multinomial(q, k, replacement=True, generator=self.generators[request.request_id]).tolist()
        if self.confidence > 0:  # decided by the row's q, never by what was drawn from it
            draws = [tokens if sure else [] for tokens, sure in zip(draws, (q.amax(dim=-1) >= self.confidence).tolist())]
        return [[(t, q[row]) for t in tokens] for row, tokens in enumerate(draws)]

    @staticmethod
    def _feed_frontier(state: _Expansion) -> None:
        parents = state.item.parents
        first_row = len(parents)
        parents = parents + [state.node_row[state.tree.parents[n]] for n in state.frontier]
        state.node_row.update(zip(state.frontier, range(first_row, first_row + len(state.frontier))))
        tokens = [state.tree.tokens[n] for n in state.frontier]
        state.item = RunItem(state.cache, tokens, parents, list(range(len(tokens))))

    def release(self, request_id: int) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None:
            cache.free()
        self.generators.pop(request_id, None)
