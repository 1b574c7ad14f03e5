"""Batch jobs over the LLM whose results are cached as files: generation and teacher passes.

Every job's result is written atomically to its own file, so an interrupted run resumes with
the jobs not yet done, and a run with a deadline stops starting jobs once it has passed
(what is done stays on disk).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

Job = tuple[Callable, tuple]


def load_hf(model_dir: Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The LLM as a Hugging Face model (fp32, SDPA attention) for generation and teacher passes."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


def save_atomic(path: Path, value: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, path)  # a result file is either whole or absent


def run_chunks(model: PreTrainedModel, model_dir: Path, jobs: list[Job], paths: list[Path], workers: int, desc: str,
               progress: bool, deadline: float | None = None) -> list[Any]:
    """``fn(model, *args)`` for every job, each result cached at its path; a job not done by
    ``deadline`` (a ``time.monotonic()`` value) gives None.

    With several workers, each is a spawned process with one thread and its own copy of the
    model: on a shared 2-core machine, two 2-thread processes slow each other down ~10x
    (OpenMP spinning), while single-thread processes scale.
    """
    for p in {p.parent for p in paths}:
        p.mkdir(parents=True, exist_ok=True)
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                if deadline is not None and time.monotonic() > deadline:
                    break
                fn, args = jobs[i]
                save_atomic(paths[i], fn(model, *args))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            # time.monotonic() is system-wide on Linux, so the children share the parent's deadline.
            procs = [ctx.Process(target=_worker, args=(str(model_dir), [(paths[i], jobs[i]) for i in todo[w::workers]],
                                                        deadline))
                     for w in range(workers)]
            for proc in procs:
                proc.start()
            while any(proc.is_alive() for proc in procs):
                time.sleep(2)
                bar.update(sum(p.is_file() for p in paths) - bar.n)
            if any(proc.exitcode != 0 for proc in procs):
                raise RuntimeError(f"{desc}: a worker process failed (exit codes {[p.exitcode for p in procs]})")
            bar.update(sum(p.is_file() for p in paths) - bar.n)
    return [torch.load(p) if p.is_file() else None for p in paths]


def _worker(model_dir: str, jobs: list[tuple[Path, Job]], deadline: float | None) -> None:
    torch.set_num_threads(1)
    model = load_hf(Path(model_dir))
    for path, (fn, args) in jobs:
        if deadline is not None and time.monotonic() > deadline:
            return
        if not path.is_file():
            save_atomic(path, fn(model, *args))
