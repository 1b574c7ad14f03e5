"""Train an EAGLE-3 feature drafter (models/eagle3.py) for any supported LLM.

Data: the LLM's own continuations of prompts (generated once, cached in the work dir) and
teacher-forced text (corpus windows). Each training step runs ONE prompt-shaped LLM forward
over its sequences, which yields both the inputs (the residual stream entering the captured
layers) and the targets (the LLM's next-token distribution); nothing else is stored, so the
data costs no disk and a run resumes from its last checkpoint (weights, optimizer, step).

The head is unrolled EAGLE-3 style ("training-time test"): step 0 reads the LLM's features;
step j reads step j-1's own outputs one row back, with the true tokens (a drafted chain is
only useful where it is right), and attends to the feature rows up to its chain's start plus
its chain's earlier steps, exactly the rows it sees when drafting. Row t of every step
predicts token t + 2; the loss is soft cross-entropy against the LLM's distribution over the
draft vocabulary, weighted 0.8^j. Targets are soft (the whole draft-vocabulary
distribution, cheap next to the LLM forward). Trained heads share the LLM's embedding and
its head's draft-vocabulary rows (frozen) and save without them (models/eagle3.py).

Scored rows are the ones drafting uses: in an LLM answer, a chain rooted at or after the
prompt's last token (drafting starts once the LLM has answered one token), as SpecForge's
loss mask scores assistant tokens only; in a corpus window, every chain. Prompt rows are
context, never targets: a chat template's fixed tokens are trivial to predict and would
inflate held-out agreement. ``init`` fine-tunes a trained head (its draft vocabulary kept).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.builder import eos_ids, load_target
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.draft_vocab import frequent_tokens
from specinfer_dist.models.eagle3 import (
    Eagle3Head,
    default_aux_layers,
    eagle3_config,
    WEIGHTS_FILE,
    save_eagle3,
)
from specinfer_dist.models.loader import resolve_model_dir
from specinfer_dist.runtime.model_runner import RunItem, chain_parents
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.training import prompts as P
from specinfer_dist.training.data import DataConfig, llm_answers
from specinfer_dist.training.jobs import load_hf
from specinfer_dist.training.train import TrainConfig, batch_order, lr_at

SHARED = ["embed_tokens.weight", "lm_head.weight"]
REPORT_NAME = "train_report.json"
CKPT_NAME = "feature-ckpt.pt"


@dataclass
class FeatureTrainConfig:
    out: Path
    llm: str = "default"
    work_dir: Path | None = None
    data_dir: Path | None = None  # the LLM's answers, kept and grown across runs (default: WORK/answers)
    budget_s: float | None = None  # wall time for the whole run (see BUDGET_SHARES); None: no limit
    prompts: int = 256  # prompts the LLM answers (its own outputs; 5% held out for evaluation)
    gen_batch_size: int = 64  # prompts per generate() batch
    max_new_tokens: int = 128
    corpus_sequences: int = 1024  # teacher-forced corpus windows
    seq_len: int = 192  # tokens per sequence (longer ones are cut)
    tokens: int = 1_000_000  # training stops after this many scored target tokens
    batch_size: int = 4  # sequences per step
    lr: float = 5e-4
    warmup: int = 20
    ttt_steps: int = 3  # unrolled draft depths
    draft_vocab: int = 8192
    intermediate_size: int | None = None  # None: the LLM's
    ckpt_every: int = 25
    log_every: int = 10  # steps per loss-curve point
    seed: int = 0
    workers: int = 1  # generation processes
    threads: int | None = None
    save_dtype: str = "bfloat16"
    device: str | None = None  # None: cuda when present
    compare_ssms: list[str] | None = None  # SSM sources scored on the same held-out rows (None: the default's)
    init: Path | None = None  # a trained head to start from (fine-tuning); its draft vocabulary is kept
    eval_prompts: int = 8  # held-out prompts decoded with the head to measure tokens per step (0: none)
    eval_max_tokens: int = 64


class UnrolledAttention:
    """The head's attention during training (a ``StepAttention``, models/attention.py): keeps
    every unrolled step's K/V rows, with gradients, and lets row t of step j see exactly the rows
    it sees when drafting: its sequence's feature rows <= t - j and, at each step i in 1..j, its
    own chain's row t - (j - i). Rows of all sequences are flat; they never see each other."""

    def __init__(self, rows: list[int], device: torch.device) -> None:
        self.seq = torch.cat([torch.full((r,), b, device=device) for b, r in enumerate(rows)])
        self.t = torch.cat([torch.arange(r, device=device) for r in rows])
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def mask(self, step: int) -> torch.Tensor:
        """Bool [rows, (step + 1) * rows] for unrolled step ``step``."""
        same = self.seq[:, None] == self.seq[None, :]
        blocks = [same & (self.t[None, :] <= (self.t - step)[:, None])]
        for i in range(1, step + 1):
            blocks.append(same & (self.t[None, :] == (self.t - (step - i))[:, None]))
        return torch.cat(blocks, dim=1)

    def attend(self, q, k, v, pool, scale, sliding_window, softcap):
        assert pool is None and sliding_window is None and softcap is None, "an EAGLE-3 head's plain attention"
        self.k.append(k)
        self.v.append(v)
        step = len(self.k) - 1
        keys, values = (torch.cat(t).transpose(0, 1)[None] for t in (self.k, self.v))  # [1, kv_heads, keys, d]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=self.mask(step), scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)


def unroll(head: Eagle3Head, aux: torch.Tensor, ids: torch.Tensor, lengths: list[int], steps: int) -> list[torch.Tensor]:
    """Draft-vocabulary logits of every unrolled step, [sum(rows), draft_vocab] each; a sequence
    of length n has rows t = 0..n-2 (its LLM feature of token t with token t + 1, at position t)."""
    device = aux.device
    rows = [n - 1 for n in lengths]
    tokens = torch.cat([ids[b, 1:n] for b, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(r, device=device) for r in rows])
    hidden = head.fuse(torch.cat([aux[b, : n - 1] for b, n in enumerate(lengths)]))
    attention = UnrolledAttention(rows, device)
    starts = [0, *torch.tensor(rows).cumsum(0).tolist()]
    logits = []
    for _ in range(steps):
        out = head.step(tokens, hidden, positions, attention, None)
        logits.append(head.draft_logits(out))
        # Next step: row t reads this step's output of row t - 1 (row 0 has none: zeros, never scored).
        hidden = torch.cat([torch.cat((out[s : s + 1] * 0, out[s : e - 1])) for s, e in zip(starts, starts[1:])])
    return logits


@dataclass
class TrainSequence:
    """Token ids, and the first chain root drafting would use (the prompt's last token; 0 in
    a corpus window): rows t of unrolled step j are scored when t - j >= ``root``."""

    ids: torch.Tensor
    root: int = 0


def step_targets(llm_logits: torch.Tensor, lengths: list[int], draft_ids: torch.Tensor) -> torch.Tensor:
    """The LLM's distribution over the draft vocabulary for token t + 2, per row t: [rows, draft_vocab]."""
    return torch.cat([llm_logits[b, 1:n, :][:, draft_ids].float().softmax(-1) for b, n in enumerate(lengths)])


def valid_rows(seqs: list[TrainSequence], step: int, device: torch.device) -> torch.Tensor:
    """Rows of unrolled step j whose chain (rooted at t - j) drafting would run: t - j >= root."""
    return torch.cat([torch.arange(len(s.ids) - 1, device=device) >= step + s.root for s in seqs])


@torch.no_grad()
def llm_forward(llm: transformers.PreTrainedModel, batch: list[torch.Tensor], layers: list[int], device: torch.device):
    """One forward over right-padded sequences: (captured features [B, T, 3H], logits [B, T, V], ids)."""
    width = max(len(s) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(batch):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = llm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # hidden_states[i] is the residual stream entering layer i (0 = embeddings).
    return torch.cat([out.hidden_states[i] for i in layers], dim=-1), out.logits, ids


def init_head(llm: transformers.PreTrainedModel, draft_ids: torch.Tensor, cfg: FeatureTrainConfig) -> Eagle3Head:
    """A head for ``llm``: its last layer's weights as a starting point, fc reading the highest
    captured layer, its embedding and head's draft rows shared and frozen."""
    config = eagle3_config(llm.config, len(draft_ids), default_aux_layers(llm.config.num_hidden_layers),
                           cfg.intermediate_size)
    torch.manual_seed(cfg.seed)
    head = Eagle3Head(config, config.eagle_aux_hidden_state_layer_ids)
    head.set_draft_vocab(draft_ids)
    last = llm.model.layers[-1]
    hidden = llm.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * hidden :].copy_(torch.eye(hidden))
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(last.self_attn, name).weight
            getattr(head.midlayer.self_attn, name).weight.copy_(torch.cat((0.5 * w, w), dim=1))
        head.midlayer.self_attn.o_proj.weight.copy_(last.self_attn.o_proj.weight)
        if cfg.intermediate_size in (None, llm.config.intermediate_size):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(head.midlayer.mlp, name).weight.copy_(getattr(last.mlp, name).weight)
        for norm in (head.midlayer.input_layernorm, head.midlayer.hidden_norm):
            norm.weight.copy_(last.input_layernorm.weight)
        head.midlayer.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
        head.norm.weight.copy_(llm.model.norm.weight)
    head.embed_tokens.weight = llm.model.embed_tokens.weight  # shared, frozen
    head.lm_head.weight = nn.Parameter(llm.lm_head.weight.detach()[draft_ids].clone(), requires_grad=False)
    return head


def trainable(head: Eagle3Head) -> dict[str, nn.Parameter]:
    return {n: p for n, p in head.named_parameters() if not any(n.startswith(s.split(".")[0]) for s in SHARED)}


def build_sequences(cfg: FeatureTrainConfig, llm, tokenizer, llm_dir: Path, data_dir: Path, corpus: str | None,
                    progress: bool, deadline: float | None = None
                    ) -> tuple[list[TrainSequence], list[TrainSequence], dict[str, Any]]:
    """(train, held-out) sequences: the LLM's answers to prompts (the growable store in
    ``data_dir``; by ``deadline``, those answered then) and teacher-forced corpus windows;
    held-out = the held-out prompts' answers only."""
    data_cfg = DataConfig(num_prompts=cfg.prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          workers=cfg.workers, batch_size=cfg.gen_batch_size)
    corpus = P.fetch_corpus(progress) if corpus is None else corpus
    t = time.perf_counter()
    answers, heldout = llm_answers(llm, llm_dir, tokenizer, cfg.llm, data_cfg, data_dir, corpus, progress, deadline)
    data_s = time.perf_counter() - t
    train, held = [], []
    for a, h in zip(answers, heldout):
        if a.answer and len(a.prompt) < cfg.seq_len:
            (held if h else train).append(TrainSequence(torch.tensor(a.prompt + a.answer)[: cfg.seq_len], len(a.prompt) - 1))
    rng = random.Random(cfg.seed)
    text_ids = tokenizer(corpus[: 40 * cfg.seq_len * cfg.corpus_sequences], add_special_tokens=False).input_ids
    starts = list(range(0, max(0, len(text_ids) - cfg.seq_len), cfg.seq_len))
    windows = [TrainSequence(torch.tensor(text_ids[s : s + cfg.seq_len]))
               for s in rng.sample(starts, min(len(starts), cfg.corpus_sequences))]
    info = {"data_dir": str(data_dir), "answered_prompts": len(answers), "answers_s": round(data_s, 1),
            "generated_sequences": len(train), "heldout_sequences": len(held), "corpus_windows": len(windows),
            "generated_tokens": sum(len(s.ids) for s in train), "corpus_tokens": sum(len(s.ids) for s in windows),
            "generated_scored_tokens": sum(len(s.ids) - 1 - s.root for s in train)}
    return train + windows, held, info


@torch.no_grad()
def evaluate(head: Eagle3Head, llm, seqs: list[TrainSequence], steps: int, device: torch.device,
             batch_size: int = 8) -> dict[str, list[float]]:
    """Held-out agreement per draft depth on the scored rows: how often the LLM's argmax (full
    vocabulary) is the head's top-1 / in its top-3, given the true tokens before it."""
    hits = {1: [0] * steps, 3: [0] * steps}
    counts = [0] * steps
    draft_ids = head.draft_ids
    for s in range(0, len(seqs), batch_size):
        batch = [q for q in seqs[s : s + batch_size] if len(q.ids) > 1]
        if not batch:
            continue
        aux, logits, ids = llm_forward(llm, [q.ids.to(device) for q in batch], head.aux_layers, device)
        lengths = [len(q.ids) for q in batch]
        truth = torch.cat([logits[b, 1:n].argmax(-1) for b, n in enumerate(lengths)])
        for j, step_logits in enumerate(unroll(head, aux, ids, lengths, steps)):
            ok = valid_rows(batch, j, device)
            top = draft_ids[step_logits.topk(3, dim=-1).indices]
            counts[j] += int(ok.sum())
            hits[1][j] += int((ok & (top[:, 0] == truth)).sum())
            hits[3][j] += int((ok & (top == truth[:, None]).any(-1)).sum())
    return {f"top{k}_by_depth": [h / max(1, c) for h, c in zip(v, counts)] for k, v in hits.items()}


@torch.no_grad()
def ssm_agreement(llm_source: str, ssms: list[str], llm, seqs: list[TrainSequence], device: torch.device) -> dict[str, Any]:
    """The same held-out targets scored for SSMs (the tokens after the first answer token),
    loaded by the engine as it drafts with them (draft vocabulary included); an SSM sees the
    true tokens, so its agreement is the same at every depth."""
    engine = LLMEngine.load(llm_source, ssms=ssms, tree="1", mode="tree", dtype="float32")
    out = {}
    for drafter in engine.drafters:
        runner = drafter.runner
        hits, count = [0, 0], 0
        for seq in seqs:
            n, first = len(seq.ids), seq.root + 1  # row i predicts token i + 1; scored: i >= root + 1
            if n <= first:
                continue
            truth = llm(input_ids=seq.ids[None].to(device)).logits[0, first : n - 1].argmax(-1).cpu()
            item = RunItem(runner.new_cache(), seq.ids.tolist(), chain_parents(n), list(range(first, n - 1)))
            top = runner.forward([item])[0].topk(3, dim=-1).indices
            item.cache.free()
            hits[0] += int((top[:, 0] == truth).sum())
            hits[1] += int((top == truth[:, None]).any(-1).sum())
            count += len(truth)
        out[drafter.name] = {"top1": hits[0] / max(1, count), "top3": hits[1] / max(1, count)}
    return out


def drafting_on_heldout(cfg: FeatureTrainConfig, prompts: list[list[int]], device: torch.device) -> dict[str, Any]:
    """The trained head drafting held-out prompts in the engine, as a user runs it: alone and with
    the SSMs and prompt lookup, in a budget-64 dynamic tree; greedy (outputs must equal incremental
    decoding's) and MSS at T = 1. Tokens per step, and tokens/s against incremental decoding side by
    side (one request batch each, the same prompts)."""
    ssms = cfg.compare_ssms if cfg.compare_ssms is not None else (["default"] if cfg.llm == "default" else [])
    head = {"mode": "tree", "feature_drafter": str(cfg.out), "tree": "dynamic"}
    every = {**head, "ssms": ssms or ["none"], "drafters": ["ngram"]}
    setups = {"incremental": {"mode": "incremental"}, "head-dynamic": {**head, "ssms": ["none"]},
              "all-dynamic": every, "all-dynamic-mss": {**every, "verify": "mss"}}
    base = EngineConfig(llm=cfg.llm, dtype="float32", device=device.type, max_num_seqs=len(prompts),
                        enable_prefix_caching=False)
    target = load_target(base, progress=False)
    greedy = SamplingParams(max_tokens=cfg.eval_max_tokens, temperature=0)
    sampled = [SamplingParams(max_tokens=cfg.eval_max_tokens, temperature=1.0, seed=i) for i in range(len(prompts))]
    out: dict[str, Any] = {"prompts": len(prompts), "max_tokens": cfg.eval_max_tokens, "tree_budget": base.tree_budget}
    reference = None
    for name, options in setups.items():
        engine = LLMEngine.from_config(base.replace(**options), target=target)
        is_mss = options.get("verify") == "mss"
        t = time.perf_counter()
        outs = engine.generate(prompts, sampled if is_mss else greedy)
        elapsed = time.perf_counter() - t
        tokens, steps = sum(len(o.token_ids) for o in outs), sum(o.stats.steps for o in outs)
        row = out[name] = {"drafters": [d.name for d in engine.drafters], "tokens_per_step": round(tokens / steps, 3),
                           "tokens_per_s": round(tokens / elapsed, 2)}
        if reference is None:
            reference = [o.token_ids for o in outs]
        elif not is_mss:
            row["outputs_equal_incremental"] = f"{sum(o.token_ids == r for o, r in zip(outs, reference))}/{len(outs)}"
        row["speedup_vs_incremental"] = round(row["tokens_per_s"] / out["incremental"]["tokens_per_s"], 3)
    return out


# With a time budget: answers are generated until this share of it has passed (stored ones are
# read at once, so a grown data set leaves more for training), training runs until the second,
# the rest is for held-out agreement, the drafting measurement and saving.
BUDGET_SHARES = (0.4, 0.8)


def train_feature_drafter(cfg: FeatureTrainConfig, corpus: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the data, train (resuming from the work dir), write ``out`` (EAGLE-3 format) and a report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start, t0 = time.perf_counter(), time.monotonic()
    data_deadline, train_deadline = ((None, None) if cfg.budget_s is None else
                                     (t0 + BUDGET_SHARES[0] * cfg.budget_s, t0 + BUDGET_SHARES[1] * cfg.budget_s))
    llm_dir = resolve_model_dir(cfg.llm, progress=progress)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(cfg.out) / ".work"
    data_dir = Path(cfg.data_dir) if cfg.data_dir else work / "answers"
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    llm = load_hf(llm_dir, device).requires_grad_(False)
    train_seqs, held_seqs, data_info = build_sequences(cfg, llm, tokenizer, llm_dir, data_dir, corpus, progress,
                                                       data_deadline)
    if not train_seqs:
        raise InvalidConfigError("no training sequences: raise the time budget or the prompts, or add corpus windows")
    eos = eos_ids(llm_dir, llm.config, tokenizer)
    if cfg.init is not None:  # fine-tune: the trained head's weights and draft vocabulary
        init = load_file(Path(cfg.init) / WEIGHTS_FILE)
        draft_ids = torch.arange(len(init["d2t"])) + init["d2t"].long()
    else:
        draft_ids = frequent_tokens([s.ids for s in train_seqs], llm.config.vocab_size,
                                    min(cfg.draft_vocab, llm.config.vocab_size), eos)
    head = init_head(llm, draft_ids, cfg).to(device)
    if cfg.init is not None:
        head.load_state_dict({k: v.to(device, torch.float32) for k, v in init.items() if k not in ("d2t", "t2d")},
                             strict=False)
    ckpt_path = work / CKPT_NAME
    # The head fine-tuning starts from, on the same held-out rows: did training help?
    before = evaluate(head.eval(), llm, held_seqs, cfg.ttt_steps, device) if cfg.init and not ckpt_path.is_file() else None
    params = trainable(head)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    scored_per_seq = sum(len(q.ids) - 1 - q.root for q in train_seqs) / len(train_seqs)
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * scored_per_seq))
    step, seen, curve = 0, 0, []
    if ckpt_path.is_file():  # resume
        ckpt = torch.load(ckpt_path, map_location=device)
        head.load_state_dict(ckpt["head"], strict=False)
        opt.load_state_dict(ckpt["opt"])
        step, seen, curve = ckpt["step"], ckpt["seen"], ckpt["curve"]
    schedule = TrainConfig(steps=total_steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, seed=cfg.seed)
    weights = [0.8**j for j in range(cfg.ttt_steps)]
    t_train = time.monotonic()
    head.train()
    with tqdm(total=cfg.tokens, initial=seen, desc="feature drafter", unit="tok", disable=not progress) as bar:
        while seen < cfg.tokens and (train_deadline is None or time.monotonic() < train_deadline):
            batch = [train_seqs[i] for i in batch_order(len(train_seqs), step, schedule)]
            aux, llm_logits, ids = llm_forward(llm, [q.ids.to(device) for q in batch], head.aux_layers, device)
            lengths = [len(q.ids) for q in batch]
            target = step_targets(llm_logits, lengths, draft_ids.to(device))
            for group in opt.param_groups:
                group["lr"] = lr_at(min(_schedule_step(step, total_steps, t_train, train_deadline), total_steps),
                                    schedule)
            loss = 0.0
            for w, (k, logits) in zip(weights, enumerate(unroll(head, aux, ids, lengths, cfg.ttt_steps))):
                ok = valid_rows(batch, k, device)
                ce = -(target[ok] * logits[ok].float().log_softmax(-1)).sum(-1).mean()
                loss = loss + w * ce
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            step += 1
            n_tok = int(valid_rows(batch, 0, device).sum())
            seen += n_tok
            bar.update(n_tok)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.log_every == 0:
                curve.append([step, seen, round(loss.item(), 4)])
            if step % cfg.ckpt_every == 0 or seen >= cfg.tokens or (
                    train_deadline is not None and time.monotonic() >= train_deadline):
                work.mkdir(parents=True, exist_ok=True)
                state = {n: p.detach() for n, p in params.items()}
                torch.save({"head": state, "opt": opt.state_dict(), "step": step, "seen": seen, "curve": curve},
                           ckpt_path.with_suffix(".tmp"))
                ckpt_path.with_suffix(".tmp").replace(ckpt_path)
    train_s = time.monotonic() - t_train
    head.eval()
    metrics = evaluate(head, llm, held_seqs, cfg.ttt_steps, device)
    if before is not None:
        metrics["init"] = before
    ssms = cfg.compare_ssms if cfg.compare_ssms is not None else (["default"] if cfg.llm == "default" else [])
    if ssms:
        metrics["ssms"] = ssm_agreement(cfg.llm, ssms, llm, held_seqs, device)
    save_eagle3(head, cfg.out, shared=SHARED, dtype=getattr(torch, cfg.save_dtype))
    del llm  # the drafting measurement loads the LLM as the engine does
    drafting = (drafting_on_heldout(cfg, [q.ids[: q.root + 1].tolist() for q in held_seqs[: cfg.eval_prompts]], device)
                if cfg.eval_prompts and held_seqs else None)
    report = {
        "llm": cfg.llm, "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "data": data_info, "trained_tokens": seen, "steps": step, "train_s_this_run": round(train_s, 1),
        "total_s_this_run": round(time.perf_counter() - start, 1), "device": str(device),
        "threads": torch.get_num_threads(), "trainable_parameters": sum(p.numel() for p in params.values()),
        "aux_layers": head.aux_layers, "draft_vocab": len(draft_ids), "heldout": metrics, "drafting": drafting,
        "budget_s": cfg.budget_s, "loss_curve": curve,
    }
    (Path(cfg.out) / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _schedule_step(step: int, total_steps: int, t_train: float, deadline: float | None) -> int:
    """Where the learning-rate schedule stands: the steps done or, with a deadline, the share of
    the training time passed, whichever is further (so the rate decays within the budget)."""
    if deadline is None:
        return step
    return max(step, int(total_steps * (time.monotonic() - t_train) / max(1e-9, deadline - t_train)))
