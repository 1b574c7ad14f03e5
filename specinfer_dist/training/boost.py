"""Collective boost-tuning (SpecInfer, Sec. 3): train SSM 1 on every sample, drop the samples
it already predicts, train SSM 2 on the rest, and so on; write checkpoints and a report.

A *sample* is a window of ``window`` consecutive continuation positions of one training
sequence. An SSM *predicts* a sample when its teacher-forced argmax equals the LLM's argmax
(the LLM's greedy token) at every position of the window: then, drafting greedily from that
context, it would propose the LLM's own next ``window`` tokens. Windows instead of whole
responses (the paper's unit) keep enough samples droppable at our scale.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from transformers import PreTrainedModel

from specinfer_dist.engine.builder import eos_ids
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.draft_vocab import frequent_tokens, write_draft_vocab
from specinfer_dist.models.loader import parse_dtype, resolve_model_dir
from specinfer_dist.training.data import DataConfig, DistillSet, build_distill_set
from specinfer_dist.training.jobs import load_hf
from specinfer_dist.training.model import init_ssm, save_ssm
from specinfer_dist.training.train import TrainConfig, distill, hidden_rows

REPORT_NAME = "boost_report.json"


@dataclass
class BoostConfig:
    out: Path
    llm: str = "default"
    num_ssms: int = 2
    layers: int = 1
    window: int = 8
    work_dir: Path | None = None  # default: under the cache, keyed by ``out``
    threads: int | None = None  # torch threads of this process (None: torch's default)
    save_dtype: str = "float16"
    soft_targets: bool = True  # LLM top-k targets (False: its own next token; see build_distill_set)
    later_steps: int | None = None  # training steps of SSMs 2..k (None: train.steps); they see less data
    draft_vocab: int = 8192  # tokens in each SSM's draft_vocab.json (models/draft_vocab.py); 0: none
    vocab_only: bool = False  # only (re)write the draft vocabularies of a finished run's SSMs
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("num_ssms", "layers", "window"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.later_steps is not None and self.later_steps < 1:
            raise InvalidConfigError(f"later-steps must be positive, got {self.later_steps}")
        if self.data.num_prompts < 2 or self.train.steps < 1 or self.train.batch_size < 1:
            raise InvalidConfigError("prompts must be at least 2; steps and batch size positive")
        if self.data.max_new_tokens < 1 or self.data.workers < 1:
            raise InvalidConfigError("max-new-tokens and workers must be positive")
        if self.draft_vocab < 0 or (self.vocab_only and not self.draft_vocab):
            raise InvalidConfigError(f"draft-vocab must be positive, got {self.draft_vocab}")
        parse_dtype(self.save_dtype)


def default_work_dir(out: Path) -> Path:
    """Resumable state lives outside ``out`` (which may be inside the package), one per ``out``."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]
    return cache_root() / "boost-tune" / key


def make_windows(data: DistillSet, seqs: list[int], window: int) -> torch.Tensor:
    """Samples as rows (sequence, start, end) over each sequence's continuation positions."""
    rows = [(i, s, min(s + window, len(data.top_ids[i]))) for i in seqs for s in range(0, len(data.top_ids[i]), window)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def window_masks(data: DistillSet, samples: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per sequence, which continuation positions the given samples cover."""
    masks: dict[int, torch.Tensor] = {}
    for i, s, e in samples.tolist():
        if i not in masks:
            masks[i] = torch.zeros(len(data.top_ids[i]), dtype=torch.bool)
        masks[i][s:e] = True
    return masks


@torch.inference_mode()
def argmax_matches(ssm: PreTrainedModel, data: DistillSet, seqs: list[int], fast: bool = False,
                   batch: int = 16) -> dict[int, torch.Tensor]:
    """Per sequence: does the SSM's teacher-forced argmax equal the LLM's at each continuation position?

    ``fast`` runs the matmuls in bf16 (the filtering pass over all training data); held-out
    numbers use fp32, as the engine does.
    """
    out = {}
    for b in range(0, len(seqs), batch):
        part = seqs[b : b + batch]
        masks = {i: torch.ones(len(data.top_ids[i]), dtype=torch.bool) for i in part}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            pred = ssm.lm_head(hidden_rows(ssm, data, part, masks)).argmax(-1)
        for i, p in zip(part, pred.split([len(masks[i]) for i in part])):
            out[i] = p == data.top_ids[i][:, 0].long()
    return out


def boost_tune(cfg: BoostConfig, corpus: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse) the distillation set, train ``num_ssms`` SSMs by collective boost-tuning,
    write ``out/ssm-<k>/`` checkpoints and ``out/boost_report.json``; return the report.

    Rerunning with the same ``out`` resumes where an interrupted run stopped.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    llm_dir = resolve_model_dir(cfg.llm, progress=progress)
    work = Path(cfg.work_dir) if cfg.work_dir else default_work_dir(cfg.out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    llm = load_hf(llm_dir).requires_grad_(False)
    data = build_distill_set(llm, tokenizer, llm_dir, cfg.llm, cfg.data, work / "data", corpus, progress,
                             cfg.soft_targets)
    data_s = time.perf_counter() - start
    eos = eos_ids(llm_dir, llm.config, tokenizer)
    if cfg.vocab_only:
        return _rewrite_draft_vocabs(cfg, data, llm.config.vocab_size, eos)

    train_seqs, held_seqs = data.indices(False), data.indices(True)
    samples = make_windows(data, train_seqs, cfg.window)
    remaining = torch.arange(len(samples))
    held_targets = data.num_targets(held_seqs)
    untrained = init_ssm(llm, cfg.layers).eval()
    baseline = _rate(argmax_matches(untrained, data, held_seqs))
    any_correct = {i: torch.zeros(len(data.top_ids[i]), dtype=torch.bool) for i in held_seqs}
    stages = []
    for k in range(1, cfg.num_ssms + 1):
        if len(remaining) == 0:
            break
        t0 = time.perf_counter()
        ssm = init_ssm(llm, cfg.layers)
        steps = cfg.train.steps if k == 1 or cfg.later_steps is None else cfg.later_steps
        tcfg = replace(cfg.train, seed=cfg.train.seed + k - 1, steps=steps)
        masks = window_masks(data, samples[remaining])
        curve = distill(ssm, data, masks, tcfg, work / f"ssm-{k}.pt", desc=f"SSM {k}/{cfg.num_ssms}", progress=progress)
        ssm.eval()
        save_ssm(ssm, Path(cfg.out) / f"ssm-{k}", llm_dir, parse_dtype(cfg.save_dtype))
        train_s = time.perf_counter() - t0
        stage_file = work / f"stage-{k}.pt"
        if stage_file.is_file():
            missed = torch.load(stage_file)["missed"]
        else:
            match = argmax_matches(ssm, data, sorted(masks), fast=True)
            predicted = torch.tensor([bool(match[i][s:e].all()) for i, s, e in samples[remaining].tolist()])
            missed = remaining[~predicted]
            torch.save({"trained": remaining, "missed": missed}, stage_file)
        held = argmax_matches(ssm, data, held_seqs)
        for i in held_seqs:
            any_correct[i] |= held[i]
        stages.append({
            "ssm": f"ssm-{k}",
            "trained_samples": len(remaining),
            "trained_positions": int(sum(int(m.sum()) for m in masks.values())),
            "trained_sequences": len(masks),
            "predicted_samples": len(remaining) - len(missed),
            "missed_samples": len(missed),
            "trained_sample_ids_sha256": _digest(remaining),
            "heldout_top1": _rate(held),
            "heldout_collective_top1": _rate(any_correct),
            "steps": tcfg.steps,
            "train_s": round(train_s, 1),
            "loss_curve": curve,
        })
        if progress:
            tqdm.write(f"ssm-{k}: held-out top-1 {stages[-1]['heldout_top1']:.3f}, collective "
                       f"{stages[-1]['heldout_collective_top1']:.3f}; missed {len(missed)}/{len(remaining)} samples")
        remaining = missed

    report = {
        "llm": str(cfg.llm),
        "llm_dir": str(llm_dir),
        "config": _jsonable(asdict(cfg)),
        "ssm": {"layers": cfg.layers, "init": f"the LLM's layers 0..{cfg.layers - 1} + final norm",
                "shared_from_llm": ["model.embed_tokens.weight", "lm_head.weight"],
                "trainable_parameters": sum(p.numel() for p in untrained.parameters() if p.requires_grad),
                "save_dtype": cfg.save_dtype},
        "data": {
            "sequences": len(data.tokens),
            "train_sequences": len(train_seqs),
            "heldout_sequences": len(held_seqs),
            "prompt_tokens": sum(data.prompt_lens),
            "train_target_tokens": data.num_targets(train_seqs),
            "heldout_target_tokens": held_targets,
            "samples": len(samples),
            "window": cfg.window,
            "sources": {s: data.sources.count(s) for s in sorted(set(data.sources))},
        },
        "sample_definition": "window of `window` continuation positions; predicted = SSM's teacher-forced "
                             "argmax equals the LLM's token (its argmax with soft targets, its own output "
                             "otherwise) at every position",
        "targets": f"LLM top-{cfg.data.topk}" if cfg.soft_targets else "LLM's own next token (one-hot)",
        "heldout_top1_untrained": baseline,
        "stages": stages,
        "heldout_collective_top1": stages[-1]["heldout_collective_top1"] if stages else baseline,
        "draft_vocab": write_draft_vocabs(data, cfg.out, cfg.draft_vocab, llm.config.vocab_size, eos),
        "data_s": round(data_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def write_draft_vocabs(data: DistillSet, out: Path, size: int, vocab_size: int, eos: set[int]) -> dict[str, Any]:
    """Give every ``out/ssm-*`` the ``size`` tokens the LLM emitted most often in the training
    continuations (plus EOS); report how much of the held-out continuations they cover."""
    if not size:
        return {"size": 0}
    emitted = [data.tokens[i][data.prompt_lens[i]:] for i in data.indices(False)]
    token_ids = frequent_tokens(emitted, vocab_size, size, eos)
    held = [data.tokens[i][data.prompt_lens[i]:] for i in data.indices(True)]
    kept = torch.zeros(vocab_size, dtype=torch.bool)
    kept[token_ids] = True
    info = {
        "size": len(token_ids),
        "counted": f"the LLM's continuations of the {len(emitted)} training prompts, plus its EOS ids",
        "heldout_coverage": float(kept[torch.cat(held).long()].float().mean()) if held else None,
    }
    for ssm_dir in sorted(Path(out).glob("ssm-*")):
        write_draft_vocab(ssm_dir, token_ids, info)
    return info


def _rewrite_draft_vocabs(cfg: BoostConfig, data: DistillSet, vocab_size: int, eos: set[int]) -> dict[str, Any]:
    """``vocab_only``: the finished run's report, with its ``draft_vocab`` entry (re)written."""
    path = Path(cfg.out) / REPORT_NAME
    if not path.is_file():
        raise InvalidConfigError(f"--vocab-only needs a finished run in {cfg.out} ({REPORT_NAME} is missing)")
    report = json.loads(path.read_text())
    report["draft_vocab"] = write_draft_vocabs(data, cfg.out, cfg.draft_vocab, vocab_size, eos)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _rate(matches: dict[int, torch.Tensor]) -> float:
    total = sum(len(m) for m in matches.values())
    return round(sum(int(m.sum()) for m in matches.values()) / max(1, total), 4)


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value
