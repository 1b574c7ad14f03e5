"""Command line: ``specinfer-dist generate | bench | tune-tree | serve | boost-tune | bench-serve``.

Every subcommand that builds an engine takes the same engine options, derived from
``EngineConfig`` (config.py) over an optional ``--config`` YAML file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace

from specinfer_dist.bench.run import (
    DEFAULT_MODES,
    BenchConfig,
    format_summary,
    run_bench,
)
from specinfer_dist.bench.run import MODES as BENCH_MODES
from specinfer_dist.bench.serve_load import add_bench_serve_parser
from specinfer_dist.config import (
    ClusterConfig,
    EngineConfig,
    add_options,
    apply_options,
    load_cluster_config,
    load_config,
)
from specinfer_dist.engine.builder import load_ssms, load_target
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.errors import InvalidConfigError, SpecInferError
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.serve.cli import add_serve_parser
from specinfer_dist.training.cli import add_boost_tune_parser, add_train_feature_parser
from specinfer_dist.tuning.tune import tune_tree


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The 'engine:' section of --config (if any) with the engine flags applied over it."""
    return apply_options(load_config(args.config) if args.config else EngineConfig(), args)


def _cluster_config(args: argparse.Namespace) -> ClusterConfig:
    config = load_cluster_config(args.config) if args.config else ClusterConfig()
    flags = {f.name: getattr(args, f.name) for f in fields(ClusterConfig) if getattr(args, f.name, None) is not None}
    return replace(config, **flags)


def _generate(args: argparse.Namespace) -> int:
    config = _engine_config(args)  # a bad option fails here, before any model loads
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    if args.ray:
        from specinfer_dist.distributed import (
            CoordinatorClient,  # Ray is imported only when asked for
        )

        client = CoordinatorClient.from_config(config, _cluster_config(args))
        try:
            start = time.perf_counter()
            out = client.complete(args.prompt, params, chat=args.chat)
            elapsed = time.perf_counter() - start
            info = client.info()
        finally:
            client.shutdown()
    else:
        engine = LLMEngine.from_config(config, progress=True)
        start = time.perf_counter()
        [out] = engine.generate(args.prompt, params, chat=args.chat)
        elapsed = time.perf_counter() - start
        info = {"mode": engine.mode, "spec": engine.spec, "verify": engine.verify,
                "sampling_defaults": engine.sampling_defaults}
    resolved = params.with_defaults(info["sampling_defaults"])  # what the engine ran with
    result = {
        **out.to_dict(),
        "mode": info["mode"],
        "tree": str(info["spec"]) if info["mode"] != "incremental" else None,
        "verify": "greedy" if resolved.greedy else info["verify"],
        "sampling": {"temperature": resolved.temperature, "top_p": resolved.top_p, "top_k": resolved.top_k},
        "elapsed_s": round(elapsed, 4),
        "ms_per_token": round(1000 * elapsed / max(1, len(out.token_ids)), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(out.text)
        print(
            f"[{info['mode']}] {len(out.token_ids)} tokens in {out.stats.steps} steps "
            f"({out.stats.tokens_per_step:.2f} tokens/step, {result['ms_per_token']} ms/token), "
            f"finish: {out.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        engine=_engine_config(args), modes=args.modes.split(","), prompts=args.prompts, max_tokens=args.max_tokens,
        temperature=args.temperature, sweep=args.sweep, batch=args.batch, out=args.out,
    )
    result = run_bench(config)
    print(format_summary(result))
    print(f"results: {args.out}/results.json", file=sys.stderr)
    return 0


def _tune_tree(args: argparse.Namespace) -> int:
    config = _engine_config(args)
    target = load_target(config, progress=True)
    ssms = load_ssms(config, target, progress=True)  # every SSM, not just the ones an earlier tuning kept
    if not ssms:
        raise InvalidConfigError("tune-tree needs at least one SSM (--ssm)")
    result = tune_tree(target.model, target.tokenizer, ssms, context=args.context, budget=config.tree_budget)
    print(json.dumps(result, indent=2))
    return 0


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with an 'engine:' section (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specinfer-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--prompt", required=True)
    _config_arg(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config.json, "
                     "else 1.0; see --generation-config)")
    gen.add_argument("--top-p", type=float, help="default: the model's, else 1.0 (off)")
    gen.add_argument("--top-k", type=int, help="0 = off (default: the model's, else 0)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string; repeat for several")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    ray_args = gen.add_argument_group("Ray runtime (--config: its 'cluster:' section, see configs/ray.yaml)")
    ray_args.add_argument("--ray", action="store_true", help="run on Ray: verifier shards, draft workers, a coordinator")
    ray_args.add_argument("--address", help="Ray cluster to join (default: start Ray here; 'auto': the local `ray start`)")
    ray_args.add_argument("--tp", type=int, help="tensor-parallel verifier shards (default 1)")
    ray_args.add_argument("--draft-workers", type=int, help="data-parallel draft workers (default 1)")
    ray_args.add_argument("--no-pipeline", dest="pipeline", action="store_const", const=False,
                          help="do not overlap drafting and verification")
    ray_args.add_argument("--colocate-drafters", dest="colocate_drafters", action="store_const", const=True,
                          help="draft inside the coordinator instead of draft workers (needed by --feature-drafter)")
    add_options(gen, EngineConfig)
    gen.set_defaults(run=_generate)

    bench = sub.add_parser("bench", help="compare decoding modes and Hugging Face side by side")
    _config_arg(bench)
    bench.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {','.join(BENCH_MODES)}")
    bench.add_argument("--temperature", type=float, default=1.0, help="for the sampled -mss/-naive modes")
    bench.add_argument("--prompts", help="JSONL file with 'prompt' and optional 'chat' (default: shipped set)")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--sweep", action="store_true", help="also time LLM forwards for 1..128 tree tokens")
    bench.add_argument("--batch", type=int, default=1, help="prompts decoded at once (HF: one padded generate())")
    add_options(bench, EngineConfig)
    bench.set_defaults(run=_bench)

    tune = sub.add_parser("tune-tree", help="measure verify/draft cost and SSM coverage; print the best tree")
    _config_arg(tune)
    tune.add_argument("--context", type=int, default=256, help="cached tokens during the cost sweep")
    add_options(tune, EngineConfig)
    tune.set_defaults(run=_tune_tree)

    add_boost_tune_parser(sub)
    add_train_feature_parser(sub)
    add_serve_parser(sub)
    add_bench_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecInferError as err:
        print(f"specinfer-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
