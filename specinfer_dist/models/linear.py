"""Linear layers with a faster CPU path for the few rows a decode or verify step has.

On the CPUs we measured (AMD EPYC, torch 2.13 CPU wheel) ``F.linear`` on 1-16 rows takes a
matrix-vector / skinny-GEMM path several times slower than the same product written as
``weight @ x.T`` with at least two columns, which streams the weight once at full memory
bandwidth (SmolLM2's 49k-token head, 2 threads: ~10 ms for 1 row vs ~3.5-4.5 ms). Decoding is
exactly that shape, so the model's linears route small inputs through it. Results are the
same products, summed in a different order (float rounding only). Larger inputs and other
devices keep ``F.linear``. ``python -m specinfer_dist.bench.linear_cost`` prints the comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_ROWS = 16  # at most this many rows take the weight @ x.T path on the CPU


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > SKINNY_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # a single column falls back to the slow matrix-vector kernel: pad to two
        flat = flat.repeat(2, 1)
    out = (weight @ flat.T).T[:rows].contiguous()  # callers view it and all-reduce it
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
