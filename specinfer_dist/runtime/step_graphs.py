"""Step graphs: the model's forward captured once per bucket on CUDA, then replayed.

Eagerly, a step launches every kernel of every layer from Python (SmolLM2-135M: ~20 per layer,
30 layers), and on a GPU that launch time, not the kernels, is the step. A captured CUDA graph
launches them all at once. A graph fixes every shape and every input address, so:

- steps are bucketed: B requests, Q queries, T tree rows and K blocks each rounded up to a
  power of two (``StepShape``), and laid out densely (request b's token j at row b * Q + j);
  rows and requests that pad a bucket write to a reserved scratch block and are masked out
  (runtime/step_layout.py);
- each bucket's graph reads its inputs from one static device buffer, which every step fills
  with one host-to-device copy, and computes logits for all B * Q rows (verification needs
  every tree row's anyway); the step's logit rows are gathered from them after the replay;
- buckets of more than ``max_tokens`` rows (long prompt chunks) run eagerly: a graph there
  saves little and its activations would hold memory;
- a step replays the smallest captured graph that holds it when that pads it at most
  ``REUSE_ROWS`` times (rows) and ``REUSE_BLOCKS`` times (blocks); only a step that no graph
  holds captures its own bucket. Before this rule (a capture for every new bucket), short runs
  on an H200 paid captures inside their timing: bench/synthetic.py's 1.1B tree rows ran at 0.51x
  of incremental decoding, gpu_check's dynamic-tree modes at 0.06-0.10x (docs/bench/gpu/). Padding
  instead of capturing is cheap on a GPU: a 64-token verify costs 1.18x a 1-token step there
  (Llama-3-8B shape).

Graphs are captured on use (a warm-up run on a side stream, then the capture), share one
memory pool (they never run concurrently), and a capture that fails leaves that bucket eager
with a logged warning. ``capture=False`` runs the same bucketed static-buffer path without a
graph: how tests on a CPU check that a padded step equals the natural one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from specinfer_dist.runtime.block_pool import BlockPool
from specinfer_dist.runtime.step_layout import RunItem, StepLayout, StepShape, chain_length

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRAPH_TOKENS = 1024  # most rows (B * Q) of a captured step
REUSE_ROWS = 4  # a step replays a captured graph of up to this many times its (bucketed) rows
REUSE_BLOCKS = 2  # ... and of up to this many times its blocks


def graph_memory(model: torch.nn.Module, max_num_seqs: int, block_size: int,
                 max_tokens: int = DEFAULT_MAX_GRAPH_TOKENS) -> int:
    """Bytes the graphs' shared memory pool may come to hold, an upper bound counted before the
    KV pool is sized: the largest bucket's logits and one layer's activations (``max_tokens``
    rows), plus the K/V that attention gathers for ``max_num_seqs`` requests at the model's
    full context (one layer at a time, as eagerly)."""
    config, itemsize = model.config, next(model.parameters()).element_size()
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, model.head_dim
    per_row = (config.vocab_size + 4 * config.hidden_size + (2 * heads + 3 * kv_heads) * head_dim
               + 3 * config.intermediate_size)
    keys = _bucket(-(-model.max_positions // block_size)) * block_size
    gathered = _bucket(max_num_seqs) * keys * kv_heads * head_dim * 2
    return (max_tokens * per_row + gathered) * itemsize


def _holds(shape: StepShape, need: StepShape) -> bool:
    """Whether a step of bucket ``need`` may replay ``shape``'s graph: every dimension as large,
    at most ``REUSE_ROWS`` times the rows and ``REUSE_BLOCKS`` times the blocks (padding costs
    compute, a capture costs once)."""
    return (shape.batch >= need.batch and shape.queries >= need.queries and shape.tree_rows >= need.tree_rows
            and need.blocks <= shape.blocks <= REUSE_BLOCKS * need.blocks
            and shape.tokens <= REUSE_ROWS * need.tokens)


def _bucket(n: int) -> int:
    """n rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass
class _Graph:
    buffer: torch.Tensor  # the static inputs, then room for the logit rows
    replay: Callable[[], None]
    outputs: list[torch.Tensor]  # [logits [B * Q, vocab]] (+ [aux [B * Q, k * hidden]])


class StepGraphs:
    def __init__(self, model: torch.nn.Module, pool: BlockPool, capture: bool,
                 max_tokens: int = DEFAULT_MAX_GRAPH_TOKENS) -> None:
        self.model, self.pool, self.capture, self.max_tokens = model, pool, capture, max_tokens
        self.scratch_block = pool.set_aside()  # never handed to a request (the runner sized the pool for it)
        self._graphs: dict[tuple, _Graph | None] = {}  # None: capture failed, run eagerly
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, items: list[RunItem], aux_layers: tuple[int, ...]) -> StepShape | None:
        """The bucket ``items`` replay (a captured one that holds them, or their own), or None
        if they run eagerly (too many rows, or a capture that failed)."""
        queries = _bucket(max(len(item.tokens) for item in items))
        tree_rows = _bucket(max(len(item.parents) - chain_length(item.parents) for item in items))
        need = StepShape(
            _bucket(len(items)), queries,
            max(queries, tree_rows) if tree_rows else 0,  # as many as queries (one key fewer) unless more
            _bucket(max(len(item.cache.blocks) for item in items)),
        )
        if need.tokens > self.max_tokens:
            return None
        held = [shape for (shape, aux), graph in self._graphs.items()
                if aux == aux_layers and graph is not None and _holds(shape, need)]
        if held:
            return min(held, key=lambda shape: (shape.tokens, shape.blocks, shape.tree_rows))
        return None if self._graphs.get((need, aux_layers), True) is None else need

    def run(
        self, items: list[RunItem], shape: StepShape, aux_layers: tuple[int, ...],
        to_device: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The runner's ``run`` for a bucketed step (rows already reserved); ``to_device`` copies
        the packed inputs into the graph's buffer."""
        key = (shape, aux_layers)
        if key not in self._graphs:
            self._graphs[key] = self._capture(shape, aux_layers)
        graph = self._graphs[key]
        layout = StepLayout.of(items, self.pool.block_size, shape, self.scratch_block)
        if graph is None:  # its capture failed
            step = layout.unpack(to_device(layout.flat, None))
            return self.model(step.ids, step.positions, step.meta, self.pool.kv, step.logit_rows,
                              aux_layers=aux_layers)
        to_device(layout.flat, graph.buffer)
        graph.replay()
        step = layout.unpack(graph.buffer)
        # Gathers copy: the next replay overwrites the graph's outputs.
        logits = graph.outputs[0].index_select(0, step.logit_rows)
        if not aux_layers:
            return logits
        real = step.meta.query_index[: sum(len(item.tokens) for item in items)]
        return logits, graph.outputs[1].index_select(0, real)

    def _capture(self, shape: StepShape, aux_layers: Sequence[int]) -> _Graph | None:
        """A graph of the model on a bucket's static buffer (filled with padding to start with)."""
        empty = StepLayout.of([], self.pool.block_size, shape, self.scratch_block)
        buffer = torch.zeros(empty.fixed_size + shape.tokens, dtype=torch.long, device=self.pool.kv.device)
        buffer[: len(empty.flat)] = torch.from_numpy(empty.flat).to(buffer.device)
        outputs: list[torch.Tensor] = []

        def forward() -> None:
            step = empty.unpack(buffer)  # fresh metadata: its masks are built inside the graph
            out = self.model(step.ids, step.positions, step.meta, self.pool.kv, None, aux_layers=aux_layers)
            outputs[:] = list(out) if aux_layers else [out]

        if not self.capture:
            return _Graph(buffer, forward, outputs)
        start = time.perf_counter()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: lazy library initialisation must not be captured
                forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                forward()
        except Exception as err:  # noqa: BLE001 - a bucket that cannot be captured runs eagerly
            logger.warning("CUDA graph capture failed for %s (%s: %s); that bucket runs eagerly",
                           shape, type(err).__name__, err)
            return None
        logger.info("captured a CUDA graph for %s in %.0f ms", shape, 1000 * (time.perf_counter() - start))
        return _Graph(buffer, graph.replay, outputs)
