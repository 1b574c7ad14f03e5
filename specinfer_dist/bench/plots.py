"""PNG plots of a bench run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def _bar(path: Path, labels: list[str], values: list[float], ylabel: str, title: str, line: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels)), 3.5))
    ax.bar(labels, values, color="#4c72b0")
    if line is not None:
        ax.axhline(line, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    summary, label = result["summary"], result["machine"]
    modes = list(summary)
    paths = [out / "tokens_per_step.png", out / "speedup_vs_incremental.png"]
    _bar(paths[0], modes, [summary[m]["tokens_per_step"] for m in modes], "tokens per LLM step", label)
    if all("speedup_vs_incremental" in summary[m] for m in modes):
        _bar(paths[1], modes, [summary[m]["speedup_vs_incremental"] for m in modes],
             "speedup vs incremental (tokens/s)", label, line=1.0)
    else:
        paths.pop()
    if "verify_cost_s" in result:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for context, costs in result["verify_cost_s"].items():
            sizes = sorted(costs, key=int)
            ax.plot([int(n) for n in sizes], [1000 * costs[n] for n in sizes], marker="o", label=f"context {context}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree tokens verified in one pass")
        ax.set_ylabel("LLM forward (ms)")
        ax.set_title(label, fontsize=10)
        ax.legend()
        fig.tight_layout()
        paths.append(out / "verify_cost.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
