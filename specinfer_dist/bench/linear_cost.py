"""``python -m specinfer_dist.bench.linear_cost``: time ``F.linear`` against our decode-shaped
CPU path (models/linear.py) on the default LLM's head shape, for 1..32 rows."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from specinfer_dist.models.linear import linear


def compare(out_features: int = 49152, in_features: int = 576, repeats: int = 30) -> None:
    weight = torch.randn(out_features, in_features)
    for rows in (1, 2, 4, 8, 16, 32):
        x = torch.randn(rows, in_features)
        times = {}
        for name, fn in (("F.linear", F.linear), ("linear", linear)):
            fn(x, weight)
            start = time.perf_counter()
            for _ in range(repeats):
                fn(x, weight)
            times[name] = 1000 * (time.perf_counter() - start) / repeats
        print(f"[{out_features}x{in_features}] {rows:3d} rows: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))


if __name__ == "__main__":
    compare()
