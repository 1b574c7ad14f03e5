"""A feature drafter: an EAGLE-3 head (models/eagle3.py) that drafts from the LLM's hidden states.

The verifier's forward already computes the residual stream of every token it runs; with
``aux_layers`` it hands the three captured layers to the engine, which passes the rows it
commits to ``observe`` (no extra LLM pass). Invariants:

- The head's KV cache holds rows t = 0 .. length-1, row t = (LLM feature of token t, token t+1)
  at position t. Features arrive for every committed token but the newest (the next root),
  so after a step rows up to the root's predecessor can be fed: that last row predicts the
  root's children. Before the LLM has seen a request (its first step) there is nothing to
  draft from: the tree is the root alone.
- Deeper nodes feed the head's own pre-norm output of their parent's row (EAGLE's
  autoregressive drafting), with the node's token, at the parent's position + 1.
- Children are chosen as an SSM's are (top-k greedy; k draws from q, recorded, when sampled);
  q is over the draft vocabulary mapped to the LLM's ids, 0 elsewhere, which MSS handles.
- Only the committed rows stay in the cache after a step (like SSMs, drafted rows are dropped).
- Prefix caching: row t depends on tokens 0 .. t+1, so a cache's blocks are keyed by the rows'
  ids (token t+1) chained from token 0 (the cache's seed). A request starts on its cached rows
  when admitted (``start``, before the LLM's first rows reach ``observe``), and the engine lets
  the LLM reuse no more of the prefix than ``reusable_rows``: the LLM's hidden states for every
  row after them must arrive.
"""

from __future__ import annotations

import torch

from specinfer_dist.drafters.base import DraftRequest
from specinfer_dist.drafters.ssm import SSMDrafter, _Expansion
from specinfer_dist.models.eagle3 import Eagle3Head
from specinfer_dist.runtime.block_pool import chain_digests
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.tree.spec import TreeSpec


class FeatureDrafter(SSMDrafter):
    """Expands trees like an SSM (same shapes, same q bookkeeping) from an EAGLE-3 head."""

    def __init__(
        self, head: Eagle3Head, spec: TreeSpec, name: str = "feature", draft_temperature: float | None = None,
        prefix_caching: bool = False, confidence: float = 0.0,
    ) -> None:
        super().__init__(head, spec, name, draft_temperature, prefix_caching, confidence)  # type: ignore[arg-type]  # the runner takes heads too
        self.head = head
        self.aux_layers = list(head.aux_layers)
        self.features: dict[int, torch.Tensor] = {}  # request -> fused features not yet in its cache

    def reusable_rows(self, request_id: int, tokens: list[int]) -> int:
        """Rows of ``tokens`` this drafter holds or would take from its prefix cache when started
        (the LLM must compute its hidden states from there on)."""
        cache = self.caches.get(request_id)
        if cache is not None:
            pending = self.features.get(request_id)
            return cache.length + (len(pending) if pending is not None else 0)
        if not self.runner.pool.prefix_caching:
            return 0
        blocks, _ = PagedKVCache(self.runner.pool, self._seed(tokens)).reusable(self._row_ids(tokens))
        return blocks * self.runner.pool.block_size

    def _seed(self, tokens: list[int]) -> bytes:
        return chain_digests(tokens[:1], 1)[0] if tokens else b""

    def _row_ids(self, tokens: list[int]) -> list[int]:
        return tokens[1:-1]  # row t's id is token t+1; the root's predecessor's row is always fed

    def observe(self, request_id: int, start: int, aux: torch.Tensor) -> None:
        """The LLM's captured hidden states [k, 3 * hidden] of tokens ``start .. start+k-1`` (committed)."""
        cache = self.caches.get(request_id)
        pending = self.features.get(request_id)
        expected = (cache.length if cache is not None else 0) + (len(pending) if pending is not None else 0)
        if start > expected:
            # A hole (features were never handed over): start over from a fresh prefix only.
            self.release(request_id)
            if start != 0:
                return
            expected = 0
        aux = aux[expected - start :]  # a recomputed prefix (after preemption) is already here
        if len(aux) == 0:
            return
        with torch.inference_mode():  # aux may come from another device (the Ray runtime ships it on the CPU)
            fused = self.head.fuse(aux.to(self.runner.device, self.runner.dtype))
        self.features[request_id] = fused if pending is None else torch.cat((pending, fused))

    def _chain(self, request: DraftRequest, cache: PagedKVCache) -> list[int]:
        pending = self.features.get(request.request_id)
        # Rows cache.length .. len(tokens) - 2 must all have features (the root's row is the last).
        if pending is None or cache.length + len(pending) < len(request.tokens) - 1:
            return []
        return request.tokens[cache.length + 1 :]

    @torch.inference_mode()
    def _forward(self, states: list[_Expansion]) -> list[torch.Tensor]:
        hidden = []
        for state in states:
            n = len(state.item.tokens)
            if state.outputs is None:  # the chain: the LLM's features
                rid = state.request.request_id
                hidden.append(self.features[rid][:n])
                self.features[rid] = self.features[rid][n:]
            else:  # a new depth: each node reads its parent row's output
                hidden.append(state.outputs[state.item.parents[-n:]])
        (ids, positions, rows), meta = self.runner.prepare([s.item for s in states])
        out = self.head.step(ids, torch.cat(hidden), positions, meta, self.runner.pool.kv[0])
        for state, chunk in zip(states, out.split([len(s.item.tokens) for s in states])):
            state.outputs = chunk if state.outputs is None else torch.cat((state.outputs, chunk))
        logits = self.head.target_logits(out[rows]).float().cpu()
        return list(logits.split([len(s.item.logit_rows) for s in states]))

    def release(self, request_id: int) -> None:
        super().release(request_id)
        self.features.pop(request_id, None)
