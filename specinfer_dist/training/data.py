"""The distillation set: the LLM's own answers to prompts (``answers.py``, a growable store)
as token ids, plus the LLM's top-k next-token distribution at every answer position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from specinfer_dist.engine.builder import eos_ids
from specinfer_dist.training import prompts as P
from specinfer_dist.training.answers import Answer, AnswerStore, GenerationSettings
from specinfer_dist.training.jobs import run_chunks


@dataclass
class DataConfig:
    num_prompts: int = 2048
    max_new_tokens: int = 128
    temperature: float = 0.8  # every other prompt is answered by sampling at this temperature
    batch_size: int = 64
    topk: int = 32  # teacher distribution kept per position (renormalised)
    seed: int = 0
    workers: int = 1  # processes for generation and teacher passes, one thread each

    def settings(self, chat: bool) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed,
                                  chat=chat)


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


def teacher_topk(
    model: PreTrainedModel, model_dir: Path, tokens: list[torch.Tensor], prompt_lens: list[int], cfg: DataConfig,
    chunk_dir: Path, token_budget: int = 4096, progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The LLM's renormalised top-k next-token distribution at every continuation position.

    Computed once in batched full-sequence forwards (far cheaper per token than generation)
    and cached, so every boosting stage and epoch reuses it instead of re-running the LLM. A
    batch's file is named by its contents, so a grown data set reuses what it can.
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
    paths = [chunk_dir / f"{_digest([tokens[i] for i in b], [prompt_lens[i] for i in b], cfg.topk)}.pt" for b in batches]
    for batch, rows in zip(batches, run_chunks(model, model_dir, jobs, paths, cfg.workers, "teacher top-k", progress)):
        for i, (ids, probs) in zip(batch, rows):
            ids_out[i], probs_out[i] = ids, probs
    return ids_out, probs_out


def _digest(seqs: list[torch.Tensor], prompt_lens: list[int], topk: int) -> str:
    h = hashlib.sha256(f"{topk}:{prompt_lens}".encode())
    for s in seqs:
        h.update(s.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


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


def llm_answers(model: PreTrainedModel, model_dir: Path, tokenizer: Any, llm: str, cfg: DataConfig, data_dir: Path,
                corpus: str, progress: bool, deadline: float | None = None) -> tuple[list[Answer], list[bool]]:
    """The LLM's answers to the first ``cfg.num_prompts`` prompts of the prompt set (those
    stored are read, the rest generated; by ``deadline``, what is done) and which are held out
    (the prompt set's rule: about 5%, a function of the id)."""
    chat = bool(getattr(tokenizer, "chat_template", None))  # a base model (or a test model): raw text only
    store = AnswerStore(data_dir, llm, model_dir, cfg.settings(chat))
    eos = eos_ids(model_dir, model.config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    specs = P.prompt_set(cfg.num_prompts, corpus, cfg.seed, chat)
    answers = store.extend(specs, model, model_dir, tokenizer, eos, pad_id, cfg.batch_size, cfg.workers, deadline,
                           progress)
    return answers, [P.is_heldout(a.id) for a in answers]


def build_distill_set(model: PreTrainedModel, tokenizer: Any, model_dir: Path, llm: str, cfg: DataConfig, work: Path,
                      corpus: str | None = None, progress: bool = True, soft_targets: bool = True) -> DistillSet:
    """Prompts -> LLM answers (half greedy, half sampled; ``work/answers``) -> targets
    (``work/teacher*``).

    ``soft_targets``: the LLM's top-k at every position (one extra LLM pass over all data).
    Otherwise training sequences target the LLM's own next token, one-hot: for a greedy
    continuation that is the LLM's argmax, for a sampled one an unbiased draw from its
    distribution (at the sampling temperature). On a CPU the teacher pass costs about as
    much per token as generation itself; held-out sequences always get the real top-k, so
    evaluation compares against the LLM's argmax.
    """
    corpus = P.fetch_corpus(progress) if corpus is None else corpus
    answers, held = llm_answers(model, model_dir, tokenizer, llm, cfg, work / "answers", corpus, progress)
    keep = [i for i, a in enumerate(answers) if a.answer]
    tokens = [torch.tensor(answers[i].prompt + answers[i].answer) for i in keep]
    plens = [len(answers[i].prompt) for i in keep]
    heldout = [held[i] for i in keep]
    top_ids = [t[p:, None].to(torch.int32) for t, p in zip(tokens, plens)]
    top_probs = [torch.ones(len(ids), 1, dtype=torch.float16) for ids in top_ids]
    scored = list(range(len(tokens))) if soft_targets else [i for i, h in enumerate(heldout) if h]
    ids, probs = teacher_topk(model, model_dir, [tokens[i] for i in scored], [plens[i] for i in scored], cfg,
                              work / ("teacher" if soft_targets else "teacher-heldout"), progress=progress)
    for i, row_ids, row_probs in zip(scored, ids, probs):
        top_ids[i], top_probs[i] = row_ids, row_probs
    return DistillSet(tokens, plens, [answers[i].source for i in keep], heldout, top_ids, top_probs)
