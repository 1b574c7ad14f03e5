"""Tensor parallelism checked without Ray: tiny checkpoints sharded over a real gloo group of
processes, every rank's logits and hidden states (the residual stream entering each layer, what
feature drafters read) compared with the unsharded model's, for both ways of getting a shard:
``shard_model`` on a loaded model, and the loader reading only the rank's slices.

Kept apart from the test modules so that the spawned ranks import only what they run.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specinfer_dist.distributed.tp import TensorParallel, shard_model
from specinfer_dist.models.loader import load_model
from specinfer_dist.runtime.verifier import LocalVerifier, VerifyItem


def tp_logits(model) -> list[torch.Tensor]:
    """A prompt, then a token tree below it, for two requests in one batch, then one request's
    next token alone: each item's logits, then its rows' hidden states entering every layer
    (whole on a shard, not a slice). The lone token is one row, where the residual add runs in
    the row-parallel matmul (2-16 rows on an AMD CPU take the skinny path, which adds it apart)."""
    verifier = LocalVerifier(model)
    layers = list(range(model.num_layers))

    def run(items: list[VerifyItem]) -> list[torch.Tensor]:
        logits, hidden = verifier.logits_hidden(items, layers)
        return [*logits.float().split([len(item.logit_rows) for item in items]), *(h.float() for h in hidden)]

    first = run([VerifyItem(0, [5, 9, 30, 41], [-1, 0, 1, 2], [3]), VerifyItem(1, [7, 8], [-1, 0], [0, 1])])
    verifier.commit(0, [0, 1, 2, 3])
    verifier.commit(1, [0, 1])
    tree = VerifyItem(0, [12, 13, 14, 15], [-1, 0, 0, 1], [0, 1, 2, 3])
    second = run([tree, VerifyItem(1, [99], [-1], [0])])
    verifier.commit(1, [0])
    return first + second + run([VerifyItem(1, [17], [-1], [0])])


def _rank(rank: int, world_size: int, port: int, model_dirs: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    logits = [tp_logits(shard_model(load_model(d, progress=False)[0], rank, world_size)) for d in model_dirs]
    torch.save(logits, f"{out}.{rank}")
    # The loader's path: an empty model sharded on the meta device, then only this rank's slices read.
    sliced = [load_model(d, progress=False, sharding=TensorParallel(rank, world_size))[0] for d in model_dirs]
    assert not any(p.is_meta for model in sliced for p in model.parameters())
    torch.save([tp_logits(model) for model in sliced], f"{out}.sliced.{rank}")
    dist.destroy_process_group()


def assert_shards_match(model_dirs: list[Path], tmp_path: Path, world_size: int = 2) -> None:
    """Every model, sharded ``world_size`` ways in one group of processes, gives every rank the
    unsharded model's logits and hidden states."""
    dirs = [str(d) for d in model_dirs]
    want = [tp_logits(load_model(d, progress=False)[0]) for d in dirs]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "tp-logits")
    mp.spawn(_rank, args=(world_size, port, dirs, out), nprocs=world_size)
    for rank, path in ((r, p) for r in range(world_size) for p in (f"{out}.{r}", f"{out}.sliced.{r}")):
        for d, got, ref in zip(dirs, torch.load(path), want, strict=True):
            where = f"{d}, rank {rank} ({'sliced loading' if 'sliced' in path else 'shard_model'})"
            for g, w in zip(got, ref, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, where=where: f"{where}: {m}")
