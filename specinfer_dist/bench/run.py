"""Side-by-side benchmark: our engine's decoding modes against Hugging Face greedy generate().

Every mode runs the same prompts in the same process, so the ratios are measured side by
side: one at a time (``batch`` 1), or ``batch`` prompts at once (our engine decodes them as
one continuous batch; Hugging Face runs a left-padded batched ``generate()`` on the same
groups; the prompt set is cycled to fill a batch). Greedy outputs are compared with
incremental decoding's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm

from specinfer_dist.bench.common import BENCH_PROMPTS, PeakMemory
from specinfer_dist.bench.plots import write_plots
from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.builder import load_target
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.default import ssm_sources
from specinfer_dist.models.loader import load_model
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tree.spec import DEFAULT_WIDTHS
from specinfer_dist.tuning.prompts import load_prompts
from specinfer_dist.tuning.tree_cost import SWEEP_SIZES, forward_cost

# Engine options per mode, over the bench's engine options (whose tree, like the CLI's and
# the service's, defaults to auto: "tree" is what users get by default). "-mss"/"-naive"
# modes sample at the bench temperature.
ENGINE_MODES: dict[str, dict[str, Any]] = {
    "incremental": {"mode": "incremental"},
    "sequence": {"mode": "sequence"},
    "tree": {"mode": "tree"},
    "tree-specinfer": {"mode": "tree", "tree": ",".join(map(str, DEFAULT_WIDTHS))},  # the paper's shape
    "tree-full-vocab": {"mode": "tree", "draft_vocab": False},  # SSM heads over the whole vocabulary
    "tree-auto": {"mode": "tree", "tree": "auto"},  # the shape `tune-tree` picks on this machine
    "ngram": {"mode": "sequence", "ssms": ["none"], "drafters": ["ngram"]},
    "merged": {"mode": "tree", "drafters": ["ngram"]},  # the SSMs' tree plus prompt lookup
    "sequence-naive": {"mode": "sequence", "verify": "naive"},
    "sequence-mss": {"mode": "sequence", "verify": "mss"},
    "tree-naive": {"mode": "tree", "verify": "naive"},
    "tree-mss": {"mode": "tree", "verify": "mss"},
    # Feature drafter (EAGLE-3 head, --feature-drafter, default: the shipped one): alone, merged, dynamic.
    "feature": {"mode": "tree", "ssms": ["none"], "feature": True},
    "feature-merged": {"mode": "tree", "drafters": ["ngram"], "feature": True},  # + the SSMs + prompt lookup
    "feature-dynamic": {"mode": "tree", "ssms": ["none"], "feature": True, "tree": "dynamic"},
    "dynamic": {"mode": "tree", "tree": "dynamic"},  # the SSMs, EAGLE-2 dynamic tree
    "feature-merged-dynamic": {"mode": "tree", "drafters": ["ngram"], "feature": True, "tree": "dynamic"},
    "feature-mss": {"mode": "tree", "ssms": ["none"], "feature": True, "verify": "mss"},
    "feature-merged-dynamic-mss": {"mode": "tree", "drafters": ["ngram"], "feature": True, "tree": "dynamic",
                                   "verify": "mss"},
}
MODES = (*ENGINE_MODES, "hf", "hf-assisted")  # hf-assisted: HF generate(assistant_model=our first SSM)
DEFAULT_MODES = "incremental,sequence,tree,tree-specinfer,ngram,merged,hf"
SWEEP_CONTEXTS = (128, 512, 1024)


@dataclass
class BenchConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # every mode starts from these options
    modes: list[str] = field(default_factory=lambda: DEFAULT_MODES.split(","))
    prompts: str | None = None  # JSONL with "prompt" and optional "chat"; None: the shipped set
    max_tokens: int = 64
    temperature: float = 1.0  # for the sampled (-mss / -naive) modes
    sweep: bool = False  # also time LLM forwards for 1..128 tree tokens at a few context lengths
    batch: int = 1  # prompts decoded together (ours: one engine batch; HF: one padded generate())
    out: str = "bench-out"

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise InvalidConfigError(f"batch must be positive, got {self.batch}")


def _groups(items: list, batch: int) -> list[list]:
    return [items[i : i + batch] for i in range(0, len(items), batch)]


def _run_engine(
    engine: LLMEngine, prompt_ids: list[list[int]], params: list[SamplingParams], batch: int
) -> dict[str, Any]:
    engine.generate(prompt_ids[:batch], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    engine.timing = {"draft_s": 0.0, "verify_s": 0.0}
    outs, start = [], time.perf_counter()
    for ids, sp in zip(_groups(prompt_ids, batch), _groups(params, batch)):
        outs.extend(engine.generate(ids, sp))
    elapsed = time.perf_counter() - start
    depth_counts: list[int] = []
    for o in outs:
        for d, n in enumerate(o.stats.accepted_at_depth):
            depth_counts.extend([0] * (d + 1 - len(depth_counts)))
            depth_counts[d] += n
    steps = sum(o.stats.steps for o in outs)
    return {
        "outputs": [o.token_ids for o in outs],
        "tree": str(engine.spec) if engine.drafters else "",  # what tree auto chose, e.g. "dynamic:4,6"
        "drafters": [d.name for d in engine.drafters],
        "elapsed_s": elapsed,
        "steps": steps,
        "accepted_tokens": sum(o.stats.accepted_tokens for o in outs),
        "drafted_tokens": sum(o.stats.drafted_tokens for o in outs),
        "acceptance_by_depth": [n / steps for n in depth_counts],
        "draft_time_fraction": engine.timing["draft_s"] / elapsed,
    }


def _hf_assistant(ssm: Transformer) -> transformers.PreTrainedModel:
    """Our SSM as a Hugging Face model (same parameter names), for assisted generation."""
    hf = transformers.AutoModelForCausalLM.from_config(ssm.config).to(next(ssm.parameters()).dtype)
    hf.load_state_dict(ssm.state_dict())
    return hf.eval()


def _first_ssm(config: EngineConfig, llm: Transformer, dtype: torch.dtype) -> Transformer:
    """The first SSM as stored (whole head): HF assisted generation has no draft vocabulary."""
    sources = ssm_sources(config.llm, config.ssms)
    if not sources:
        raise InvalidConfigError("mode hf-assisted needs an SSM (--ssm)")
    return load_model(sources[0], dtype=dtype, shared_from=llm)[0]


def _run_hf(
    llm_dir: Path, dtype: torch.dtype, prompt_ids: list[list[int]], max_tokens: int, batch: int = 1,
    assistant: transformers.PreTrainedModel | None = None,
) -> dict[str, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = next(iter(eos_ids), 0)

    def generate(group: list[list[int]], n: int) -> list[list[int]]:
        width = max(map(len, group))  # left padding, as batched generation needs
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                assistant_model=assistant,
            )
        rows = []
        for row in out[:, width:].tolist():  # cut each row after its EOS (the rest is padding)
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            rows.append(row[:end])
        return rows

    generate(prompt_ids[:batch], 4)  # warm-up
    forwards = []  # LLM forward passes: one per token, or one per verified draft when assisted
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    start = time.perf_counter()
    outs = [row for group in _groups(prompt_ids, batch) for row in generate(group, max_tokens)]
    elapsed = time.perf_counter() - start
    hook.remove()
    return {"outputs": outs, "elapsed_s": elapsed, "steps": len(forwards)}


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise InvalidConfigError(f"unknown bench mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if config.batch > 1 and "hf-assisted" in config.modes:
        raise InvalidConfigError("Hugging Face assisted generation runs one prompt at a time: drop hf-assisted or --batch")
    rows = load_prompts(config.prompts or BENCH_PROMPTS)
    # Decoding speed, not prefix reuse: the warm-up and every mode send the same prompts.
    engine_config = config.engine.replace(max_num_seqs=max(config.engine.max_num_seqs, config.batch),
                                          enable_prefix_caching=False)
    target = load_target(engine_config, progress)  # every engine mode shares these weights
    dtype = target.model.model.norm.weight.dtype  # the configured dtype, or the device's default
    base = LLMEngine.from_config(engine_config.replace(mode="incremental"), target=target)
    prompt_ids = [base.encode(r["prompt"], chat=bool(r.get("chat"))) for r in rows]
    if config.batch > len(prompt_ids):  # cycle the set to fill one batch
        prompt_ids = [prompt_ids[i % len(prompt_ids)] for i in range(config.batch)]
    greedy = [SamplingParams(max_tokens=config.max_tokens, temperature=0)] * len(prompt_ids)
    sampled = [
        SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=i)
        for i in range(len(prompt_ids))
    ]
    raw: dict[str, dict[str, Any]] = {}
    for mode in tqdm(config.modes, desc="bench modes", disable=not progress):
        if mode.startswith("hf"):
            assistant = None
            if mode == "hf-assisted":
                assistant = _hf_assistant(_first_ssm(config.engine, target.model, dtype))
            llm_dir = target.model_dir
            with PeakMemory() as peak:
                raw[mode] = _run_hf(llm_dir, dtype, prompt_ids, config.max_tokens, config.batch, assistant)
            raw[mode].update(peak.as_dict())
            continue
        settings = dict(ENGINE_MODES[mode])
        # Feature modes use the engine options' head (default: the shipped one); the others none.
        feature = settings.pop("feature", False)
        settings["feature_drafter"] = (config.engine.feature_drafter or "default") if feature else None
        is_sampled = "verify" in settings
        with PeakMemory() as peak:
            engine = base if mode == "incremental" else LLMEngine.from_config(
                engine_config.replace(**settings), progress=progress, target=target)
            raw[mode] = _run_engine(engine, prompt_ids, sampled if is_sampled else greedy, config.batch)
        raw[mode].update(sampled=is_sampled, **peak.as_dict())
        del engine
    reference = raw.get("incremental") or raw.get("hf")
    summary = {}
    for mode, r in raw.items():
        tokens = sum(len(o) for o in r["outputs"])
        s = summary[mode] = {
            "generated_tokens": tokens,
            "verification_steps": r["steps"],  # LLM forward passes (the first one includes the prompt)
            "tokens_per_step": tokens / r["steps"],
            "tokens_per_s": tokens / r["elapsed_s"],
            "ms_per_token": 1000 * r["elapsed_s"] / tokens,
        }
        for key in ("tree", "drafters", "accepted_tokens", "drafted_tokens", "acceptance_by_depth", "draft_time_fraction",
                    "peak_rss_mb", "peak_gpu_mb"):
            if key in r:
                s[key] = r[key]
        if reference and not r.get("sampled"):
            s["outputs_equal_reference"] = sum(a == b for a, b in zip(r["outputs"], reference["outputs"]))
    for s in summary.values():
        for other in ("incremental", "hf"):
            if other in summary:
                s[f"speedup_vs_{other}"] = s["tokens_per_s"] / summary[other]["tokens_per_s"]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "config": asdict(config),
        "num_prompts": len(prompt_ids),
        "summary": summary,
        "outputs": {mode: r["outputs"] for mode, r in raw.items()},
    }
    if config.sweep:
        result["verify_cost_s"] = {ctx: forward_cost(target.model, SWEEP_SIZES, ctx) for ctx in SWEEP_CONTEXTS}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_plots(result, out)
    return result


def format_summary(result: dict[str, Any]) -> str:
    cols = ("tree", "tokens_per_step", "ms_per_token", "speedup_vs_incremental", "speedup_vs_hf",
            "draft_time_fraction", "outputs_equal_reference")
    lines = [f"machine: {result['machine']}; prompts: {result['num_prompts']}; batch: {result['config']['batch']}",
             "| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for mode, s in result["summary"].items():
        cells = [f"{s[c]:.3g}" if isinstance(s.get(c), float) else str(s.get(c) or "-") for c in cols]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
