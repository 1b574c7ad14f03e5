"""``specinfer-dist boost-tune`` (SSMs) and ``train-feature-drafter`` (EAGLE-3 heads) for an LLM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.training import feature
from specinfer_dist.training.boost import REPORT_NAME, BoostConfig, boost_tune
from specinfer_dist.training.data import DataConfig
from specinfer_dist.training.feature import FeatureTrainConfig, train_feature_drafter
from specinfer_dist.training.train import TrainConfig


def add_boost_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    d, t = DataConfig(), TrainConfig()
    p = subparsers.add_parser("boost-tune", help="train SSMs for an LLM by collective boost-tuning")
    p.add_argument("--llm", default="default", help="'default', a HF checkpoint dir, a .gguf file or a hub id")
    p.add_argument("--num-ssms", type=int, default=2)
    p.add_argument("--layers", type=int, default=1, help="layers per SSM (initialised from the LLM's first)")
    p.add_argument("--out", default="boost-out", help="where ssm-<k>/ and boost_report.json go")
    p.add_argument("--work-dir", help="resumable state (default: under the cache, keyed by --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=d.num_prompts, help="prompts to generate from (5%% held out)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="continuation length per prompt")
    p.add_argument("--gen-batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=d.workers, help="processes for generation (one thread each)")
    p.add_argument("--steps", type=int, default=t.steps, help="training steps of SSM 1")
    p.add_argument("--later-steps", type=int, help="training steps of SSMs 2.. (default: --steps)")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="sequences per training step")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--window", type=int, default=8, help="continuation positions per boosting sample")
    p.add_argument("--threads", type=int, help="torch threads for training (default: torch's)")
    p.add_argument("--targets", choices=("topk", "tokens"), default="topk",
                   help="distil the LLM's top-32 (an extra LLM pass) or its own next tokens (no extra pass)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="tokens in each SSM's draft vocabulary, the LLM's most frequent outputs (0: none)")
    p.add_argument("--vocab-only", action="store_true",
                   help="only (re)write the draft vocabularies of a finished run (same data flags)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = BoostConfig(
        out=Path(args.out), llm=args.llm, num_ssms=args.num_ssms, layers=args.layers, window=args.window,
        work_dir=Path(args.work_dir) if args.work_dir else None, threads=args.threads,
        soft_targets=args.targets == "topk", later_steps=args.later_steps,
        draft_vocab=args.draft_vocab, vocab_only=args.vocab_only,
        data=DataConfig(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=args.gen_batch_size, workers=args.workers, seed=args.seed),
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
    )
    report = boost_tune(cfg)
    print(f"held-out top-1 (any SSM): {report['heldout_collective_top1']:.3f}; "
          f"report: {Path(args.out) / REPORT_NAME}", file=sys.stderr)
    return 0


def add_train_feature_parser(subparsers: argparse._SubParsersAction) -> None:
    c = FeatureTrainConfig(out=Path("."))
    p = subparsers.add_parser("train-feature-drafter",
                              help="train an EAGLE-3 feature drafter for an LLM (saved in the vLLM/SGLang format)")
    p.add_argument("--llm", default="default", help="'default', a HF checkpoint dir, a .gguf file or a hub id")
    p.add_argument("--out", required=True, help="the head's directory (config.json, model.safetensors, report)")
    p.add_argument("--work-dir", help="the resumable checkpoint, and the answers unless --data-dir (default: OUT/.work)")
    p.add_argument("--data-dir", help="the LLM's answers, kept and grown by later runs (default: WORK/answers)")
    p.add_argument("--budget-minutes", type=float,
                   help="wall time for the whole run: answers, training, evaluation (one GPU lease: 6-8)")
    p.add_argument("--tokens", type=int, default=c.tokens, help="target tokens to train on")
    p.add_argument("--prompts", type=int, default=c.prompts, help="prompts the LLM answers (5%% held out)")
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens)
    p.add_argument("--corpus-sequences", type=int, default=c.corpus_sequences, help="teacher-forced corpus windows")
    p.add_argument("--seq-len", type=int, default=c.seq_len)
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=c.lr)
    p.add_argument("--ttt-steps", type=int, default=c.ttt_steps, help="draft depths unrolled in training")
    p.add_argument("--draft-vocab", type=int, default=c.draft_vocab)
    p.add_argument("--intermediate-size", type=int, help="the head's MLP width (default: the LLM's)")
    p.add_argument("--gen-batch-size", type=int, default=c.gen_batch_size, help="prompts per generate() batch")
    p.add_argument("--workers", type=int, default=c.workers, help="processes for generation")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--init", help="a trained head's directory to start from (fine-tuning; its draft vocabulary is kept)")
    p.add_argument("--eval-prompts", type=int, default=c.eval_prompts,
                   help="held-out prompts decoded with the head to measure tokens per step (0: skip)")
    p.add_argument("--eval-max-tokens", type=int, default=c.eval_max_tokens)
    p.set_defaults(run=_run_feature)


def _run_feature(args: argparse.Namespace) -> int:
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise InvalidConfigError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    cfg = FeatureTrainConfig(
        out=Path(args.out), llm=args.llm, work_dir=Path(args.work_dir) if args.work_dir else None, tokens=args.tokens,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        budget_s=None if args.budget_minutes is None else 60 * args.budget_minutes,
        gen_batch_size=args.gen_batch_size, eval_prompts=args.eval_prompts, eval_max_tokens=args.eval_max_tokens,
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, corpus_sequences=args.corpus_sequences,
        seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, ttt_steps=args.ttt_steps,
        draft_vocab=args.draft_vocab, intermediate_size=args.intermediate_size, workers=args.workers,
        threads=args.threads, device=args.device, seed=args.seed, init=Path(args.init) if args.init else None,
    )
    report = train_feature_drafter(cfg)
    held = report["heldout"]
    top1 = ", ".join(f"{x:.3f}" for x in held["top1_by_depth"])
    init = ", ".join(f"{x:.3f}" for x in held["init"]["top1_by_depth"]) if "init" in held else None
    print(f"held-out top-1 by depth: {top1}{f' (the --init head: {init})' if init else ''}; "
          f"report: {Path(args.out) / feature.REPORT_NAME}", file=sys.stderr)
    for setup, row in (report["drafting"] or {}).items():
        if isinstance(row, dict):
            print(f"  {setup}: {row['tokens_per_step']:.2f} tokens/step, {row['speedup_vs_incremental']:.2f}x "
                  "incremental", file=sys.stderr)
    return 0
