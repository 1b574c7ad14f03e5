"""Command line: ``specinfer-dist generate``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from specinfer_dist.bench.run import DEFAULT_MODES, BenchConfig, format_summary, run_bench
from specinfer_dist.bench.run import MODES as BENCH_MODES
from specinfer_dist.config import EngineConfig, load_config
from specinfer_dist.engine.engine import MODES, VERIFIERS, LLMEngine
from specinfer_dist.engine.sampling_params import SamplingParams
from specinfer_dist.errors import SpecInferError


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with an 'engine:' section (flags override it)")
    parser.add_argument("--llm", help="'default', a HF checkpoint dir, a .gguf file or a hub id")
    parser.add_argument("--ssm", dest="ssms", action="append", help="SSM source; repeat for several")
    parser.add_argument("--drafter", dest="drafters", action="append",
                        help="model-free drafter: ngram or ngram:<widths>; repeat for several")
    parser.add_argument("--tree", help="children per node at each depth, e.g. 1,1,3,1,1,1,1,1")
    parser.add_argument("--tree-budget", type=int, help="most drafted tokens per step (default 64)")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--verify", choices=tuple(VERIFIERS), help="verifier for sampled requests (default mss)")
    parser.add_argument("--draft-temperature", type=float, help="SSM sampling temperature (default: the request's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    config = load_config(args.config) if args.config else EngineConfig()
    for f in fields(EngineConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(config, f.name, value)
    return config


def _generate(args: argparse.Namespace) -> int:
    engine = LLMEngine.from_config(_engine_config(args), progress=True)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    [out] = engine.generate(args.prompt, params, chat=args.chat)
    elapsed = time.perf_counter() - start
    result = {
        **out.to_dict(),
        "mode": engine.mode,
        "tree": str(engine.spec) if engine.mode != "incremental" else None,
        "verify": "greedy" if params.greedy else engine.verify,
        "elapsed_s": round(elapsed, 4),
        "ms_per_token": round(1000 * elapsed / max(1, len(out.token_ids)), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(out.text)
        print(
            f"[{engine.mode}] {len(out.token_ids)} tokens in {out.stats.steps} steps "
            f"({out.stats.tokens_per_step:.2f} tokens/step, {result['ms_per_token']} ms/token), "
            f"finish: {out.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig(
        llm=args.llm or "default", ssms=args.ssms, tree=args.tree or BenchConfig.tree,
        modes=args.modes.split(","), prompts=args.prompts, max_tokens=args.max_tokens,
        temperature=args.temperature, dtype=args.dtype or "float32", out=args.out,
    )
    result = run_bench(config)
    print(format_summary(result))
    print(f"results: {args.out}/results.json", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specinfer-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--prompt", required=True)
    _engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string; repeat for several")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(run=_generate)

    bench = sub.add_parser("bench", help="compare decoding modes and Hugging Face side by side")
    bench.add_argument("--llm")
    bench.add_argument("--ssm", dest="ssms", action="append")
    bench.add_argument("--tree")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"))
    bench.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {','.join(BENCH_MODES)}")
    bench.add_argument("--temperature", type=float, default=1.0, help="for the sampled -mss/-naive modes")
    bench.add_argument("--prompts", help="JSONL file with 'prompt' and optional 'chat' (default: shipped set)")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--out", default="bench-out")
    bench.set_defaults(run=_bench)
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
