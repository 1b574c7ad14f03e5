"""The distillation set: the LLM's own continuations of prompts, stored as token ids, plus
the LLM's top-k next-token distribution at every continuation position.

Generation uses Hugging Face ``generate()`` on a left-padded batch: one forward per new token
for the whole batch. Measured on the 2-core CPU with SmolLM2-135M, batch 64 x 64 new tokens:
~9.4k tokens/min, against ~2.6k with our engine (whose attention runs one request at a time).
Work is cached in chunks under a work dir, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from specinfer_dist.engine.builder import eos_ids
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.training import prompts as P


@dataclass
class DataConfig:
    num_prompts: int = 2048
    max_new_tokens: int = 128
    heldout_fraction: float = 0.05
    temperature: float = 0.8  # every other prompt is answered by sampling at this temperature
    batch_size: int = 64
    prompt_gen_tokens: int = 48  # length limit of the prompts the LLM writes itself
    topk: int = 32  # teacher distribution kept per position (renormalised)
    seed: int = 0
    workers: int = 1  # processes for generation and teacher passes, one thread each


@dataclass
class DistillSet:
    """Sequences (prompt + LLM continuation) and the teacher's top-k at each continuation position.

    Position j of ``top_ids[i]`` is the teacher's distribution for token ``prompt_lens[i] + j``.
    """

    tokens: list[torch.Tensor]
    prompt_lens: list[int]
    sources: list[str]
    heldout: list[bool]
    top_ids: list[torch.Tensor]  # int32 [continuation length, k]; column 0 = the LLM's argmax (or own token)
    top_probs: list[torch.Tensor]  # float16, rows sum to 1 (k = 1: the one-hot own-token target)

    def indices(self, heldout: bool) -> list[int]:
        return [i for i, h in enumerate(self.heldout) if h == heldout]

    def num_targets(self, indices: list[int]) -> int:
        return sum(len(self.top_ids[i]) for i in indices)


def _save(path: Path, value: Any) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, path)  # atomic: a chunk file is either whole or absent


def run_chunks(model: PreTrainedModel, model_dir: Path, jobs: list[tuple[Callable, tuple]], chunk_dir: Path,
               workers: int, desc: str, progress: bool) -> list[Any]:
    """``fn(model, *args)`` for every job, each result cached as ``chunk_dir/<index>.pt``.

    With several workers, each is a spawned process with one thread and its own copy of the
    model: on a shared 2-core machine, two 2-thread processes slow each other down ~10x
    (OpenMP spinning), while single-thread processes scale.
    """
    chunk_dir.mkdir(parents=True, exist_ok=True)
    paths = [chunk_dir / f"{i:05d}.pt" for i in range(len(jobs))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                fn, args = jobs[i]
                _save(paths[i], fn(model, *args))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=(str(model_dir), [(paths[i], jobs[i]) for i in todo[w::workers]]))
                     for w in range(workers)]
            for proc in procs:
                proc.start()
            while any(proc.is_alive() for proc in procs):
                time.sleep(2)
                bar.update(sum(p.is_file() for p in paths) - bar.n)
            if any(proc.exitcode != 0 for proc in procs):
                raise RuntimeError(f"{desc}: a worker process failed (exit codes {[p.exitcode for p in procs]})")
            bar.update(len(jobs) - bar.n)
    return [torch.load(p) for p in paths]


def _worker(model_dir: str, jobs: list[tuple[Path, tuple[Callable, tuple]]]) -> None:
    torch.set_num_threads(1)
    model = load_hf(Path(model_dir))
    for path, (fn, args) in jobs:
        if not path.is_file():
            _save(path, fn(model, *args))


def load_hf(model_dir: Path) -> PreTrainedModel:
    """The LLM as a Hugging Face model (fp32, SDPA attention) for generation and teacher passes."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def _check_params(work: Path, params: dict[str, Any]) -> None:
    """A work dir belongs to one set of data settings; reusing it with others would mix data."""
    work.mkdir(parents=True, exist_ok=True)
    f = work / "params.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != params:
            changed = sorted(k for k in params if old.get(k) != params[k])
            raise InvalidConfigError(
                f"work dir {work} holds data built with other settings ({', '.join(changed)}); "
                "pass another work dir or delete it"
            )
    else:
        f.write_text(json.dumps(params, indent=1))


def generate(
    model: PreTrainedModel,
    model_dir: Path,
    prompts: list[list[int]],
    sampled: list[bool],
    cfg: DataConfig,
    eos: set[int],
    pad_id: int,
    max_new_tokens: int,
    chunk_dir: Path,
    desc: str,
    progress: bool,
) -> list[list[int]]:
    """Continuations of ``prompts`` (each cut after its first EOS), greedy or sampled per prompt.

    Prompts are batched by length (less padding) and kind; batch b is seeded with seed + b.
    """
    order = sorted(range(len(prompts)), key=lambda i: (sampled[i], len(prompts[i]), i))
    batches = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    # Split batches that mix greedy and sampled prompts (at most one).
    batches = [part for b in batches for part in _split_by(b, sampled)]
    jobs = [
        (_generate_batch, ([prompts[i] for i in batch], sampled[batch[0]], cfg.temperature, sorted(eos), pad_id,
                           max_new_tokens, cfg.seed + b))
        for b, batch in enumerate(batches)
    ]
    out: list[list[int]] = [[] for _ in prompts]
    for batch, conts in zip(batches, run_chunks(model, model_dir, jobs, chunk_dir, cfg.workers, desc, progress)):
        for i, cont in zip(batch, conts):
            out[i] = cont
    return out


def _split_by(batch: list[int], flag: list[bool]) -> list[list[int]]:
    parts = [[i for i in batch if not flag[i]], [i for i in batch if flag[i]]]
    return [p for p in parts if p]


@torch.inference_mode()
def _generate_batch(model, prompts, sample, temperature, eos, pad_id, max_new_tokens, seed) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_k=None, top_p=None, pad_token_id=pad_id, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    new = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, width:].tolist()
    conts = []
    for row in new:
        end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        conts.append(row[:end])
    return conts


def teacher_topk(
    model: PreTrainedModel, model_dir: Path, tokens: list[torch.Tensor], prompt_lens: list[int], cfg: DataConfig,
    chunk_dir: Path, token_budget: int = 4096, progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The LLM's renormalised top-k next-token distribution at every continuation position.

    Computed once in batched full-sequence forwards (far cheaper per token than generation)
    and cached, so every boosting stage and epoch reuses it instead of re-running the LLM.
    """
    order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(tokens[i]) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    jobs = [(_teacher_batch, ([tokens[i] for i in b], [prompt_lens[i] for i in b], cfg.topk)) for b in batches]
    ids_out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    probs_out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    for batch, rows in zip(batches, run_chunks(model, model_dir, jobs, chunk_dir, cfg.workers, "teacher top-k", progress)):
        for i, (ids, probs) in zip(batch, rows):
            ids_out[i], probs_out[i] = ids, probs
    return ids_out, probs_out


@torch.inference_mode()
def _teacher_batch(model, seqs, prompt_lens, topk):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):  # right padding: causal attention never sees it
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = []
    for row, (s, plen) in enumerate(zip(seqs, prompt_lens)):
        logits = model.lm_head(hidden[row, plen - 1 : len(s) - 1]).float()
        top = logits.softmax(-1).topk(topk, dim=-1)
        probs = top.values / top.values.sum(-1, keepdim=True)
        out.append((top.indices.to(torch.int32), probs.to(torch.float16)))
    return out


def build_prompts(tokenizer: Any, model: PreTrainedModel, model_dir: Path, cfg: DataConfig, corpus: str, work: Path,
                  eos: set[int], pad_id: int, progress: bool) -> list[P.Prompt]:
    """Prompts from every source; the held-out ones are a fixed share of each source."""
    rng = random.Random(cfg.seed)
    n = cfg.num_prompts
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts: list[tuple[str, str, bool]] = []  # (source, text, chat)
    if chat:
        n_templ, n_gen = round(0.4 * n), round(0.2 * n)
        n_corpus = n - n_templ - n_gen
        texts += [("template", t, True) for t in P.templated_instructions(n_templ, rng)]
        passages = P.corpus_passages(corpus, n_corpus, rng)
        half = n_corpus // 2
        texts += [("corpus-raw", p, False) for p in passages[:half]]
        texts += [("corpus-chat", t, True) for t in P.corpus_tasks(passages[half:], rng)]
        metas = P.meta_prompts(n_gen, rng)
        written = generate(model, model_dir, [P.encode(tokenizer, m, True) for m in metas], [True] * n_gen, cfg, eos,
                           pad_id, cfg.prompt_gen_tokens, work / "prompt-gen", "LLM-written prompts", progress)
        for m, w in zip(metas, written):
            text = tokenizer.decode(w, skip_special_tokens=True).strip().strip('"')
            texts.append(("llm-written", text or m, True))
    else:  # a base model (or a test model) without a chat template: raw text only
        texts += [("corpus-raw", p, False) for p in P.corpus_passages(corpus, n, rng)]
    prompts = [P.Prompt(P.encode(tokenizer, text, c), src) for src, text, c in texts]
    # Hold out the same share of every source, chosen at random.
    by_source: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_source.setdefault(p.source, []).append(i)
    for idx in by_source.values():
        for i in rng.sample(idx, math.ceil(cfg.heldout_fraction * len(idx))):
            prompts[i].heldout = True
    return prompts


def llm_answers(model: PreTrainedModel, tokenizer: Any, model_dir: Path, cfg: DataConfig, work: Path,
                corpus: str, progress: bool, extra_params: dict[str, Any] | None = None
                ) -> tuple[list[P.Prompt], list[list[int]]]:
    """The prompts and the LLM's continuations of them (half greedy, half sampled), cached in
    ``work``; a work directory made with other parameters is refused."""
    params = {k: v for k, v in asdict(cfg).items() if k != "workers"}  # workers do not change the data
    _check_params(work, {**params, **(extra_params or {}), "corpus_chars": len(corpus), "llm": str(model_dir)})
    eos = eos_ids(model_dir, model.config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    prompts = build_prompts(tokenizer, model, model_dir, cfg, corpus, work, eos, pad_id, progress)
    sampled = [i % 2 == 1 for i in range(len(prompts))]
    conts = generate(model, model_dir, [p.ids for p in prompts], sampled, cfg, eos, pad_id, cfg.max_new_tokens,
                     work / "continuations", "LLM continuations", progress)
    return prompts, conts


def build_distill_set(model: PreTrainedModel, tokenizer: Any, model_dir: Path, cfg: DataConfig, work: Path,
                      corpus: str | None = None, progress: bool = True, soft_targets: bool = True) -> DistillSet:
    """Prompts -> LLM continuations (half greedy, half sampled) -> targets; all cached in ``work``.

    ``soft_targets``: the LLM's top-k at every position (one extra LLM pass over all data).
    Otherwise training sequences target the LLM's own next token, one-hot: for a greedy
    continuation that is the LLM's argmax, for a sampled one an unbiased draw from its
    distribution (at the sampling temperature). On a CPU the teacher pass costs about as
    much per token as generation itself; held-out sequences always get the real top-k, so
    evaluation compares against the LLM's argmax.
    """
    corpus = P.fetch_corpus(progress) if corpus is None else corpus
    prompts, conts = llm_answers(model, tokenizer, model_dir, cfg, work, corpus, progress)
    keep = [i for i, c in enumerate(conts) if c]
    tokens = [torch.tensor(prompts[i].ids + conts[i]) for i in keep]
    plens = [len(prompts[i].ids) for i in keep]
    heldout = [prompts[i].heldout for i in keep]
    top_ids = [t[p:, None].to(torch.int32) for t, p in zip(tokens, plens)]
    top_probs = [torch.ones(len(ids), 1, dtype=torch.float16) for ids in top_ids]
    scored = list(range(len(tokens))) if soft_targets else [i for i, h in enumerate(heldout) if h]
    ids, probs = teacher_topk(model, model_dir, [tokens[i] for i in scored], [plens[i] for i in scored], cfg,
                              work / ("teacher" if soft_targets else "teacher-heldout"), progress=progress)
    for i, row_ids, row_probs in zip(scored, ids, probs):
        top_ids[i], top_probs[i] = row_ids, row_probs
    return DistillSet(tokens, plens, [prompts[i].source for i in keep], heldout, top_ids, top_probs)
