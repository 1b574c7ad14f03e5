"""Linear layers with a faster path for the few rows a verify step has on AMD CPUs.

On AMD EPYC CPUs (torch 2.13 CPU wheel) ``F.linear`` on 2-16 rows takes a skinny-GEMM path
several times slower than the same product written as ``weight @ x.T``, which streams the weight
once at full memory bandwidth (SmolLM2's 49k-token head: ~23 ms for 2 rows vs ~57 ms). On Intel
Xeons it is the reverse (2026-12-06: ``F.linear`` 3.1 ms for 2 rows, 6.4 ms for 4, against
11.9 and 11.5 ms; MKL's small-GEMM kernels are fast there), so only AMD CPUs take that path
(``SKINNY_CPU``: fixed per machine, so a machine's outputs never depend on a timing). A single
row is the exception everywhere: ``F.linear`` runs a matrix-vector kernel that is as fast, in
one op. Results are the same products, summed in a different order (float rounding only).
Larger inputs and other devices keep ``F.linear``. ``python -m specinfer_dist.bench.linear_cost``
prints the comparison on the machine it runs on.

A residual stream's ``x + proj(h)`` is ``proj(h, residual=x)``: one ``addmm`` (on CUDA the add
runs in the GEMM's epilogue; on the CPU it saves the add's pass). The skinny path and a bias
keep the separate add (the fused skinny form measured no faster), with the reference's order.

The skinny path returns a transposed view (no copy): callers that need contiguous memory (a
tensor-parallel all-reduce) make it so.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_ROWS = 16  # 2 to this many rows take the weight @ x.T path on an AMD CPU


def _cpu_vendor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    return platform.processor()


SKINNY_CPU = "AMD" in _cpu_vendor()  # "AuthenticAMD" on Linux


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias``; with ``residual``, ``residual + that`` (see module docstring)."""
    rows = x.numel() // x.shape[-1]
    skinny = SKINNY_CPU and x.device.type == "cpu" and 1 < rows <= SKINNY_ROWS
    if residual is not None and bias is None and not skinny:
        out = torch.addmm(residual.reshape(rows, weight.shape[0]), x.reshape(rows, x.shape[-1]), weight.T)
        return out.view(*x.shape[:-1], weight.shape[0])
    if not skinny:
        out = F.linear(x, weight, bias)
    else:
        out = (weight @ x.reshape(rows, x.shape[-1]).T).T
        if bias is not None:
            out = out + bias
        out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if residual is None else residual + out


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, residual)


class FusedRows:
    """Several linears over the same input run as one matmul: their weights (and biases)
    become row views of one concatenated matrix, so parameter names, ``state_dict``,
    ``load_state_dict`` and optimiser steps see the same tensors as before. Anything that
    replaces a parameter instead (``model.to(...)``, a tensor-parallel re-slice) breaks the
    views; ``intact`` sees that and the caller runs the separate linears again."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: tuple[nn.Linear, ...]) -> None:
        self.weight, self.bias, self.parts = weight, bias, parts
        self._pointers = [p.weight.data_ptr() for p in parts]

    def intact(self) -> bool:
        return [p.weight.data_ptr() for p in self.parts] == self._pointers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fuse_rows(*parts: nn.Linear) -> FusedRows | None:
    """Fuse ``parts`` (see ``FusedRows``); None if their weights are not all materialised."""
    if any(p.weight.is_meta for p in parts):  # a draft worker's LLM holds only a few real tensors
        return None
    sizes = [p.out_features for p in parts]
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts])
        for p, view in zip(parts, weight.split(sizes)):
            p.weight.data = view
        bias = None
        if parts[0].bias is not None:
            bias = torch.cat([p.bias for p in parts])
            for p, view in zip(parts, bias.split(sizes)):
                p.bias.data = view
    return FusedRows(weight, bias, parts)
