"""Device hygiene: a whole engine step (batched forward over the paged pool, greedy and MSS
verification, commits) with the LLM on the ``meta`` device, recording every copy between host
and device. Only the accepted ids may cross to the host: one [2, requests] tensor per verifier
(greedy, MSS). Anything else (an ``.item()``, a ``.cpu()`` of logits) is a GPU-only stall that
this catches on a CPU. Towards the device each verification makes exactly one copy, and the
forward one; every other host->device copy (a Python list used as an index is one) is counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
from specinfer_dist.tree.device_verify import mss_draws, verify_greedy_batch, verify_mss_batch
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree

VOCAB = 64


class DeviceToHost(TorchDispatchMode):
    """Records device->host copies and scalar reads of meta tensors; answers them with zeros
    (meta tensors have no values), so the step runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._local_scalar_dense.default and src.is_meta:
            self.copies.append(("item", tuple(src.shape)))
            return 0
        moves = func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy)
        target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (torch.device, str))), src)
        if moves and src.is_meta and torch.device(getattr(target, "device", target)).type == "cpu":
            self.copies.append(("to_cpu", tuple(src.shape)))
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        if func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].is_meta:
            self.copies.append(("copy_to_cpu", tuple(args[1].shape)))
            return args[0]
        return func(*args, **kwargs)


class HostToDevice:
    """Records host->device copies into meta tensors as (kind, where): the explicit ones (``.to``,
    ``copy_``, ``torch.tensor``/``as_tensor`` with a ``device=``) and those a GPU makes on its own
    (a Python list, array or host tensor indexing a device tensor; a host tensor in a device op).
    ``where`` is "module:function" of the innermost project function that asked for the copy."""

    def __init__(self) -> None:
        self.copies: list[tuple[str, str]] = []
        self.muted = False  # inside a call already recorded: the copy it makes is that one
        self._modes = (_HostToDeviceCalls(self), _HostToDeviceOps(self))

    def __enter__(self) -> "HostToDevice":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def record(self, kind: str) -> None:
        if not self.muted:
            self.copies.append((kind, _project_caller()))

    def where(self) -> Counter:
        return Counter(where for _, where in self.copies)


def _project_caller() -> str:
    frame = sys._getframe(1)
    while frame is not None and "/specinfer_dist/" not in frame.f_code.co_filename:
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).stem}:{frame.f_code.co_qualname}"


def _is_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _host_index(index) -> bool:
    return any(
        isinstance(i, (list, np.ndarray)) or (isinstance(i, torch.Tensor) and i.device.type == "cpu" and i.dim() > 0)
        for i in (index if isinstance(index, tuple) else (index,))
    )


class _HostToDeviceCalls(TorchFunctionMode):
    """Python-level copies: the dispatcher never sees these (PyTorch makes them below it)."""

    def __init__(self, recorder: HostToDevice) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_meta(kwargs.get("device")):
            kind = None if isinstance(args[0], torch.Tensor) and args[0].is_meta else func.__name__
        elif func is torch.Tensor.new_tensor and args[0].is_meta:
            kind = "new_tensor"
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].is_meta and _host_index(args[1]):
            kind = "host index"
        if kind is None or self.recorder.muted:
            return func(*args, **kwargs)
        self.recorder.record(kind)
        self.recorder.muted = True
        try:
            return func(*args, **kwargs)
        finally:
            self.recorder.muted = False


class _HostToDeviceOps(TorchDispatchMode):
    def __init__(self, recorder: HostToDevice) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy):
            target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
            if args[0].device.type == "cpu" and _is_meta(target):
                self.recorder.record("to")
        elif func is torch.ops.aten.copy_.default:
            if args[0].is_meta and args[1].device.type == "cpu":
                self.recorder.record("copy_")
        elif any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.recorder.record(f"host tensor in {func.overloadpacket.__name__}")
        return func(*args, **kwargs)


class FixedTree(Drafter):
    """Two children of the root, one grandchild; sampled requests get each child's q."""

    def __init__(self) -> None:
        super().__init__("fixed", TreeSpec((2, 1)))

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        q = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
        trees = []
        for request in requests:
            sampled = not request.params.greedy
            tree = TokenTree.from_root(request.tokens[-1])
            a = tree.add(0, 5, q if sampled else None)
            tree.add(0, 6, q if sampled else None)
            tree.add(a, 7, q if sampled else None)
            trees.append(tree)
        return trees


def test_engine_step_copies_only_accepted_ids_to_the_host():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    with torch.device("meta"):
        model = Transformer(config)
    engine = LLMEngine(
        tokenizer=None, model_config=config, eos_ids=set(),
        verifier=LocalVerifier(model, kv_blocks=32, kv_block_size=4), drafters=[FixedTree()], spec=TreeSpec((2, 1)),
        mode="tree", verify="mss", max_num_seqs=4,
    )
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=8, ignore_eos=True, seed=1)
    for i, params in enumerate([greedy, sampled, greedy, sampled]):
        engine.add_request([4 + i, 9, 10, 11, 12][: 3 + i % 3], params)
    for _ in range(2):  # prompts with trees, then trees on cached prefixes
        with DeviceToHost() as mode, HostToDevice() as h2d:
            engine.step()
        assert mode.copies == [("to_cpu", (2, 2)), ("to_cpu", (2, 2))]
        # One copy for the forward, one per verifier (greedy, MSS). The sampled rows' index for
        # tree/verify.py's processed-p is built on the device. Zeroing the blocks handed out
        # (consecutive here) copies nothing; commits move no rows (nothing is accepted on meta,
        # see test_kv_moves_and_zeroing_copy_at_most_one_index).
        assert h2d.where() == {"model_runner:ModelRunner._to_device": 1, "device_verify:_to_device": 2}, h2d.copies


def _meta_step_trees() -> tuple[list[TokenTree], list[TokenTree]]:
    q = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    greedy, sampled = [], []
    for root in range(3):
        for trees, probs in ((greedy, None), (sampled, q)):
            tree = TokenTree.from_root(root)
            a = tree.add(0, 5, probs)
            tree.add(0, 6, probs)
            tree.add(a, 7, probs)
            tree.add(0, 8, None)  # a point mass among drawn candidates
            trees.append(tree.dfs())
    return greedy, sampled


def test_each_verification_copies_once_each_way():
    greedy, sampled = _meta_step_trees()
    logits = torch.empty(sum(map(len, greedy)), VOCAB, device="meta")
    draws = [mss_draws(tree, torch.Generator().manual_seed(0)) for tree in sampled]
    for verify in (
        lambda: verify_greedy_batch(greedy, logits), lambda: verify_mss_batch(sampled, logits.double(), draws)
    ):
        with DeviceToHost() as d2h, HostToDevice() as h2d:
            verify()
        assert d2h.copies == [("to_cpu", (3, 2))]  # (leaf, bonus) per request
        assert h2d.copies == [("to", "device_verify:_to_device")]


def test_kv_moves_and_zeroing_copy_at_most_one_index():
    pool = BlockPool(KVCapacity(8, 4), num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="meta")
    a, b = PagedKVCache(pool), PagedKVCache(pool)
    with HostToDevice() as h2d:
        a.reserve(range(6))  # blocks 0-1 (block 0 again: it was zeroed at once), then 2 for b
        b.reserve(range(4))
        a.commit([0, 3, 5])  # rows move: source and target slots in one copy
    assert h2d.copies == [("to", "block_pool:index_tensor")]
    a.free()
    b.free()
    pool.allocate(8)
    pool.free([1, 3])  # scattered free blocks: zeroing them needs an index
    with HostToDevice() as h2d:
        pool.allocate(2)
    assert h2d.copies == [("to", "block_pool:index_tensor")]


def test_the_recorder_sees_copies_to_the_device():
    x = torch.zeros(4, 3, device="meta")
    with HostToDevice() as h2d:
        torch.as_tensor(np.zeros(3), device="meta")
        torch.tensor([1, 2], device="meta")
        torch.zeros(3).to("meta")
        x[1].copy_(torch.ones(3))
        x[[0, 2]] = 1.0
        x[np.array([0, 2])]
        x.index_select(0, torch.tensor([0, 1]))
        torch.zeros(3).to("meta")[torch.tensor(1)]  # a 0-dim host tensor is a scalar: no copy
    assert [kind for kind, _ in h2d.copies] == [
        "as_tensor", "tensor", "to", "copy_", "host index", "host index", "host tensor in index_select", "to",
    ]


def test_the_recorder_sees_item_and_cpu():
    x = torch.zeros(3, 5, device="meta")
    with DeviceToHost() as mode:
        x.sum().item()
        x.float().cpu()
        x.to("cpu")
        torch.empty(3, 5).copy_(x)
    assert [kind for kind, _ in mode.copies] == ["item", "to_cpu", "to_cpu", "copy_to_cpu"]
