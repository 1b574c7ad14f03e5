"""Kernel-launching aten ops per decoder layer per generated token: the CPU proxy for how
launch-bound a step is on a GPU, where each such op is a kernel launch.

    python -m specinfer_dist.bench.op_count                  # SmolLM2-135M's shape, random weights
    python -m specinfer_dist.bench.op_count --llm default    # the default LLM itself
    python -m specinfer_dist.bench.op_count --device cuda    # also the CUDA kernels the profiler sees

One request decodes incrementally (fp32, one thread on a CPU); a few decode steps after the
prompt are recorded. Counted: every aten op the dispatcher runs (a ``TorchDispatchMode`` sees
each once; composite ops are decomposed into what actually runs; the helpers a CPU kernel
calls inside itself are not seen), except views and allocations (no kernel of their own). The count per
layer is every such op of the whole step (embedding, head, verification included) divided by
the layer count, so the step's fixed cost is shared out, as in "1,535 kernels per token / 30
layers". With ``--device cuda`` the torch profiler's count of launched CUDA kernels per token is
printed beside it, with the host's launches (a replayed CUDA graph is one launch for all its
kernels) and the median ms per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from typing import Any

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from specinfer_dist.bench.host_step import SMOLLM2_135M
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
from specinfer_dist.tree.spec import TreeSpec

# Allocations and metadata: no kernel of their own (views are told by their schema).
NOT_KERNELS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                         "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "is_same_size"})

class OpCounter(TorchDispatchMode):
    """Counts the kernel-running aten ops dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Under inference mode composite ops (linear, matmul, reshape, ...) arrive whole: count
        # what they decompose into, which is what runs.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # the pieces come through here again
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_KERNELS:
            self.counts[name] += 1
        return func(*args, **kwargs)


def engine_for(llm: str, device: str = "cpu", dtype: str = "float32", enforce_eager: bool = False) -> LLMEngine:
    if llm == "random-smollm2":
        torch.manual_seed(0)
        model = Transformer(transformers.LlamaConfig(**SMOLLM2_135M)).eval().requires_grad_(False)
        model = model.to(device, getattr(torch, dtype))
        eager = {"enforce_eager": True} if enforce_eager else {}  # so older checkouts run it too
        return LLMEngine(
            tokenizer=None, model_config=model.config, eos_ids=set(), verifier=LocalVerifier(model, kv_blocks=64, **eager),
            drafters=[], spec=TreeSpec(), mode="incremental", max_num_seqs=1,
        )
    return LLMEngine.load(llm, ssms=["none"], mode="incremental", dtype=dtype, device=device, kv_blocks=64,
                          enforce_eager=enforce_eager)


def count(engine: LLMEngine, steps: int = 4, prompt_len: int = 24) -> dict[str, Any]:
    """Ops per generated token and per layer over ``steps`` decode steps of one request; on CUDA
    also the median ms per step and what the profiler sees launched."""
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 8, ignore_eos=True)
    engine.add_request(list(range(3, 3 + prompt_len)), params)
    engine.step()  # the prompt
    engine.step()  # warm-up (a CUDA graph is captured here)
    with OpCounter() as counter:
        for _ in range(steps):
            engine.step()
    ops = counter.counts
    layers = engine.verifier.runner.model.num_layers
    per_token = sum(ops.values()) / steps
    result = {
        "ops_per_token": per_token, "layers": layers, "ops_per_layer_per_token": per_token / layers,
        "by_op_per_token": {name: n / steps for name, n in ops.most_common()},
    }
    if engine.verifier.runner.device.type == "cuda":
        result["ms_per_token"] = step_ms(engine, steps)
        result.update({f"{k}_per_token": v / steps for k, v in cuda_launches(engine, steps).items()})
    return result


def step_ms(engine: LLMEngine, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def cuda_launches(engine: LLMEngine, steps: int) -> dict[str, int]:
    """Kernels run on the GPU, and launches the host made (kernels and graphs), in ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.events()
    return {
        "cuda_kernels": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
        "host_launches": sum(1 for e in events if e.name.startswith(("cudaLaunchKernel", "cudaGraphLaunch",
                                                                     "cuLaunchKernel"))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="random-smollm2", help="random-smollm2 (no download) or an LLM source")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = count(engine_for(args.llm, args.device, args.dtype, args.enforce_eager), args.steps)
    print(json.dumps({"device": args.device, "dtype": args.dtype, "enforce_eager": args.enforce_eager, **result},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
