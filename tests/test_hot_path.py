"""Device hygiene: a whole engine step (batched forward over the paged pool, greedy and MSS
verification, commits) with the LLM on the ``meta`` device, recording every copy from the
device to the host. Only the accepted ids may cross: one [2, requests] tensor per verifier
(greedy, MSS). Anything else (an ``.item()``, a ``.cpu()`` of logits) is a GPU-only stall
that this catches on a CPU."""

from __future__ import annotations

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
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
        tokenizer=None, model_config=config, eos_ids=set(), verifier=LocalVerifier(model, kv_blocks=32, kv_block_size=4),
        drafters=[FixedTree()], spec=TreeSpec((2, 1)), mode="tree", verify="mss", max_num_seqs=4,
    )
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=8, ignore_eos=True, seed=1)
    for i, params in enumerate([greedy, sampled, greedy, sampled]):
        engine.add_request([4 + i, 9, 10, 11, 12][: 3 + i % 3], params)
    for _ in range(2):  # prompts with trees, then trees on cached prefixes
        with DeviceToHost() as mode:
            engine.step()
        assert mode.copies == [("to_cpu", (2, 2)), ("to_cpu", (2, 2))]


def test_the_recorder_sees_item_and_cpu():
    x = torch.zeros(3, 5, device="meta")
    with DeviceToHost() as mode:
        x.sum().item()
        x.float().cpu()
        x.to("cpu")
        torch.empty(3, 5).copy_(x)
    assert [kind for kind, _ in mode.copies] == ["item", "to_cpu", "to_cpu", "copy_to_cpu"]
