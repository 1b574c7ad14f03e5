"""Structured outputs: schema-constrained generation with and without the grammar drafter,
incremental and tree speculation side by side in one process on one loaded LLM.

    python -m specinfer_dist.bench.structured --out docs/bench/cpu/structured

The workload (structured_prompts.jsonl, written for this bench): extraction from a short text
(invoice, event, product, ticket, recipe, booking, CV, ...: the values are in the prompt, which
prompt lookup copies), tool-call arguments and enum classification, each with its JSON schema
(nested objects, arrays with maxItems, enums, bounded numbers, booleans, strings with pattern and
maxLength, optional fields). The default LLM, greedy, chat template on, prefix caching off (every
setup sends the same prompts), the same max_tokens everywhere. Setups:

- ``incremental``: no drafting, grammar drafter off (``grammar_draft_tokens=0``): the baseline;
- ``incremental+grammar``: the grammar drafter's jump-forward only (tokens that are the only ones
  the grammar allows are appended without a forward);
- ``tree`` and ``tree+grammar``: the drafters (``--ssm``, default the shipped SSMs, and
  ``--drafter``, default prompt lookup) on ``--tree``, without and with the grammar drafter
  (forced tokens drafted below the tree's leaves, and jump-forward);
- ``tree+grammar+confident``: the same with ``draft_confidence`` (``--draft-confidence``,
  default 0.8): the SSMs propose only tokens they give that probability (after the grammar's
  mask, so forced tokens always pass), which on a CPU keeps rows nobody accepts out of the verify;
- ``lookup+grammar``: the model-free drafters alone (no SSM) and the grammar drafter.

For each ``--batches`` size (``max_num_seqs``; every prompt is sent at once to
``LLMEngine.generate``, which runs that many together): tokens/step (generated tokens over
verification steps; jump-forward tokens count as generated), tokens/s (wall clock), the share of
outputs that are valid JSON under their schema (``jsonschema``), and whether every setup's token ids
equal the baseline's (greedy: they must; a mismatch is a bug and the command exits 1). Before the
timed run each engine generates once and compiles every schema (compilation is cached per engine,
so the timed run measures decoding).

Grammar overhead (``--overhead-batch``, default 16): the tree+grammar setup runs that many prompts
together with timing wrappers installed on the grammar's work: ``Grammar.constrain`` (pruning the
tree, forced-token drafting), ``Grammar.node_masks`` (the tree nodes' masks, after the forward
started), ``Grammar.forbidden``/``Grammar.mask``/``Grammar.accepts`` (the SSM drafters' masks,
path checks), ``Grammar.forced``, ``Grammar.only_token``, ``Grammar.advance`` (committing tokens),
``mask_logits`` (the LLM's logits) and ``LLMEngine._jump_forward``; nested calls count once
(in the outermost). Reported as a share of ``LLMEngine.step`` time, the mean of ``--overhead-repeats``
runs (it varies from run to run on a shared CPU: masking full-vocabulary rows is memory-bound);
``--profile`` adds a cProfile of the last run's top functions.

Through a server (``--url http://HOST:PORT``, the README's validity number;
``scripts/bench_structured_serve.sh`` starts ``specinfer-dist serve`` for it): every prompt goes
to /v1/chat/completions through the ``openai`` client (``--concurrency`` at a time) with
``response_format`` ``json_schema`` (strict), greedy, ``--max-tokens``; each reply is checked with
``jsonschema``. results.json has the valid share, finish reasons, usage, latencies and the server's
speculative-decoding counters over the run (/metrics). Exit 1 when a reply not cut by max_tokens
(finish_reason "length", counted apart) is invalid, or a request failed. Needs the test extras
(``openai``, ``jsonschema``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import re
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from specinfer_dist.bench.prefix_cache import Busy
from specinfer_dist.config import EngineConfig
from specinfer_dist.engine import engine as engine_module
from specinfer_dist.engine.builder import Target, load_target
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.runtime import grammar as grammar_module
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tuning.prompts import load_prompts

STRUCTURED_PROMPTS = str(resources.files(__package__).joinpath("structured_prompts.jsonl"))
SETUPS = ("incremental", "incremental+grammar", "tree", "tree+grammar", "tree+grammar+confident", "lookup+grammar")
GRAMMAR_DRAFT_TOKENS = 16
# The confident setup's. On the 2-core CPU 0.5, 0.8 and 0.9 made the tree 1.61x, 1.37x and 1.71x faster than
# without (docs/bench/cpu/structured-confidence/, one run each: within the runs' noise of one another).
DRAFT_CONFIDENCE = 0.8
OVERHEAD_TARGET = 0.10  # grammar work at most this share of step time


def load_structured_prompts(path: str) -> list[dict[str, Any]]:
    rows = load_prompts(path)
    for row in rows:
        if not isinstance(row.get("schema"), dict) or not isinstance(row.get("name"), str):
            raise InvalidConfigError(f"{path}: every line needs a 'name', a 'prompt' and a JSON 'schema' object")
    return rows


def setup_options(setup: str, tree: str, ssms: list[str] | None, drafters: list[str],
                  confidence: float = DRAFT_CONFIDENCE) -> dict[str, Any]:
    parts = setup.split("+")
    grammar = GRAMMAR_DRAFT_TOKENS if "grammar" in parts else 0
    if parts[0] == "incremental":
        return {"mode": "incremental", "ssms": ["none"], "grammar_draft_tokens": grammar}
    if parts[0] == "lookup" and not drafters:
        raise InvalidConfigError("the lookup setups need a model-free drafter (--drafter)")
    return {"mode": "tree", "tree": tree, "ssms": ["none"] if parts[0] == "lookup" else ssms, "drafters": list(drafters),
            "grammar_draft_tokens": grammar, "draft_confidence": confidence if "confident" in parts else 0.0}


def validity(rows: list[dict[str, Any]], texts: list[str]) -> list[bool]:
    """Whether each output parses as JSON and its schema accepts it."""
    try:
        import jsonschema
    except ImportError as err:  # a test extra: pip install specinfer_dist[test]
        raise InvalidConfigError("the structured bench checks outputs with jsonschema: pip install jsonschema") from err
    ok = []
    for row, text in zip(rows, texts):
        try:
            jsonschema.validate(json.loads(text), row["schema"], cls=jsonschema.Draft202012Validator)
            ok.append(True)
        except (ValueError, jsonschema.ValidationError):
            ok.append(False)
    return ok


def build(config: EngineConfig, target: Target, rows: list[dict[str, Any]], params: list[SamplingParams],
          **options: Any) -> LLMEngine:
    """An engine on ``target``'s weights, warmed up: every schema compiled (cached by the engine's
    compiler), and a short constrained generation of a full batch (the first allocations of a batch's
    tensors are slow page faults on a CPU: the timed run then finds the allocator warm)."""
    engine = LLMEngine.from_config(config.replace(**options), target=target)
    for p in params:
        engine.grammar_compiler().grammar(p.structured_outputs)
    batch = rows[: config.max_num_seqs]
    warm = [replace(p, max_tokens=8) for p in params[: len(batch)]]
    engine.generate([r["prompt"] for r in batch], warm, chat=True)
    return engine


def run_setup(engine: LLMEngine, rows: list[dict[str, Any]], params: list[SamplingParams]) -> dict[str, Any]:
    engine.timing = {"draft_s": 0.0, "verify_s": 0.0}
    start = time.perf_counter()
    with Busy() as busy:  # the machine's load: timings on a shared CPU are only as good as it was idle
        outs = engine.generate([r["prompt"] for r in rows], params, chat=True)
    wall = time.perf_counter() - start
    errors = [o.error for o in outs if o.error]
    steps = sum(o.stats.steps for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    valid = validity(rows, [o.text for o in outs])
    return {
        "wall_s": round(wall, 3),
        "steps": steps,
        "generated_tokens": tokens,
        "forced_tokens": sum(o.stats.forced_tokens for o in outs),  # appended by jump-forward
        "accepted_tokens": sum(o.stats.accepted_tokens for o in outs),
        "drafted_tokens": sum(o.stats.drafted_tokens for o in outs),
        "tokens_per_step": round(tokens / steps, 3) if steps else 0.0,
        "tokens_per_s": round(tokens / wall, 2),
        "valid_json": sum(valid),
        "valid_json_pct": round(100 * sum(valid) / len(valid), 1),
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
        "draft_time_fraction": round(engine.timing["draft_s"] / wall, 3),
        "errors": errors,
        **busy.as_dict(),
        "per_prompt": [
            {"name": row["name"], "tokens": len(o.token_ids), "steps": o.stats.steps,
             "forced_tokens": o.stats.forced_tokens, "valid": ok, "finish_reason": o.finish_reason}
            for row, o, ok in zip(rows, outs, valid)
        ],
        "outputs": [o.token_ids for o in outs],
        "texts": [o.text for o in outs],
    }


def compare(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per setup, the prompts whose token ids differ from ``reference``'s (and where first)."""
    ref = results[reference]["outputs"]
    out = {}
    for setup, r in results.items():
        bad = []
        for row, a, b in zip(rows, r["outputs"], ref):
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                bad.append({"name": row["name"], "first_diff_at": first, "len": len(a), "reference_len": len(b)})
        out[setup] = bad
    return out


# ---- grammar overhead ----------------------------------------------------------------------------


class GrammarTimer:
    """Timing wrappers on the grammar's work (see the module docstring), installed on the classes and
    on the engine module's ``mask_logits``; ``remove`` puts the originals back. Only the outermost of
    nested timed calls counts, under its own name."""

    GRAMMAR_METHODS = ("constrain", "node_masks", "forbidden", "mask", "accepts", "forced", "only_token", "advance")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.step_s = 0.0
        self.steps = 0
        self.masked_rows = 0  # logits rows mask_logits masked (its size)
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []
        for name in self.GRAMMAR_METHODS:
            self._wrap(grammar_module.Grammar, name, f"Grammar.{name}")
        self._wrap(engine_module, "mask_logits", "mask_logits")
        self._wrap(LLMEngine, "_jump_forward", "LLMEngine._jump_forward")
        step = LLMEngine.step
        self._saved.append((LLMEngine, "step", step))

        @functools.wraps(step)
        def timed_step(engine: LLMEngine, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return step(engine, *args, **kwargs)
            finally:
                self.step_s += time.perf_counter() - start
                self.steps += 1

        LLMEngine.step = timed_step

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        self._saved.append((owner, attr, original))

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return original(*args, **kwargs)
            if label == "mask_logits":
                self.masked_rows += len(args[1])
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, attr, timed)

    def remove(self) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()

    def as_dict(self) -> dict[str, Any]:
        grammar = sum(self.seconds.values())
        return {
            "step_s": round(self.step_s, 3), "steps": self.steps, "grammar_s": round(grammar, 3),
            "grammar_fraction": round(grammar / self.step_s, 4) if self.step_s else 0.0,
            "by_function_s": {k: round(v, 4) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])},
            "calls": dict(self.calls), "mask_logits_rows": self.masked_rows,
        }


def grammar_overhead(config: EngineConfig, target: Target, rows: list[dict[str, Any]], params: list[SamplingParams],
                     options: dict[str, Any], batch: int, profile: bool, repeats: int = 2) -> dict[str, Any]:
    """``repeats`` timed runs of the first ``batch`` prompts on one engine: the share of step time
    spent in grammar work, per run and on average (it varies between runs on a shared CPU: the
    full-vocabulary masks are memory-bound). ``profile``: cProfile of the last run."""
    rows, params = rows[:batch], params[:batch]
    engine = build(config.replace(max_num_seqs=batch), target, rows, params, **options)
    runs = []
    for i in range(repeats):
        timer = GrammarTimer()
        profiler = cProfile.Profile() if profile and i == repeats - 1 else None
        try:
            if profiler:
                profiler.enable()
            result = run_setup(engine, rows, params)
            if profiler:
                profiler.disable()
        finally:
            timer.remove()
        runs.append({**timer.as_dict(), "tokens_per_s": result["tokens_per_s"],
                     "tokens_per_step": result["tokens_per_step"]})
    out = {"batch": batch, "prompts": len(rows), "setup": "tree+grammar", "repeats": repeats,
           "grammar_fraction": round(sum(r["grammar_fraction"] for r in runs) / repeats, 4),
           "grammar_fraction_per_run": [r["grammar_fraction"] for r in runs],
           "by_function_s": {k: round(sum(r["by_function_s"].get(k, 0.0) for r in runs) / repeats, 4)
                             for k in dict.fromkeys(k for r in runs for k in r["by_function_s"])},
           "step_s": round(sum(r["step_s"] for r in runs) / repeats, 3),
           "grammar_s": round(sum(r["grammar_s"] for r in runs) / repeats, 3),
           "target_fraction_le": OVERHEAD_TARGET, "runs": runs}
    out["met"] = out["grammar_fraction"] <= OVERHEAD_TARGET
    if profile:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out["profile_top_tottime"] = text.getvalue()
    return out


# ---- all of it -------------------------------------------------------------------------------------


def run(llm: str = "default", prompts: str | None = None, max_tokens: int = 160, batches: tuple[int, ...] = (8, 1),
        tree: str = "1,1,1,1,1,1", ssms: list[str] | None = None, drafters: tuple[str, ...] = ("ngram",),
        setups: tuple[str, ...] = SETUPS, limit: int | None = None, overhead_batch: int = 16,
        profile: bool = False, overhead_repeats: int = 2, progress: bool = True,
        draft_confidence: float = DRAFT_CONFIDENCE, **options: Any) -> dict[str, Any]:
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise InvalidConfigError(f"unknown setup(s) {sorted(unknown)}; choose from {', '.join(SETUPS)}")
    rows = load_structured_prompts(prompts or STRUCTURED_PROMPTS)[:limit]
    config = EngineConfig(llm=llm, enable_prefix_caching=False, **options)
    target = load_target(config)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=StructuredOutputsParams(
        json=row["schema"])) for row in rows]
    say = print if progress else (lambda *a, **k: None)
    result: dict[str, Any] = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "llm": llm,
        "dtype": str(target.model.model.norm.weight.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "greedy": True, "chat": True, "prefix_caching": False, "max_tokens": max_tokens, "num_prompts": len(rows),
        "tree": tree, "ssms": ssms, "drafters": list(drafters), "grammar_draft_tokens": GRAMMAR_DRAFT_TOKENS,
        "draft_confidence": draft_confidence, "setups": list(setups), "prompt_names": [r["name"] for r in rows], "batches": {},
    }
    start = time.perf_counter()
    for batch in batches:
        results: dict[str, dict[str, Any]] = {}
        for setup in setups:
            engine = build(config.replace(max_num_seqs=batch), target, rows, params,
                           **setup_options(setup, tree, ssms, drafters, draft_confidence))
            results[setup] = run_setup(engine, rows, params)
            results[setup]["drafting"] = str(engine.spec) if engine.drafters else ""
            results[setup]["drafter_names"] = [d.name for d in engine.drafters]
            del engine
            r = results[setup]
            say(f"batch {batch} {setup}: {r['tokens_per_step']} tokens/step, {r['tokens_per_s']} tokens/s, "
                f"valid {r['valid_json']}/{len(rows)}", flush=True)
        reference = setups[0]
        mismatches = compare(results, rows, reference)
        summary = {}
        for setup, r in results.items():
            base = results[reference]
            summary[setup] = {
                **{k: r[k] for k in ("drafting", "tokens_per_step", "tokens_per_s", "valid_json_pct", "generated_tokens",
                                     "steps", "forced_tokens", "accepted_tokens", "drafted_tokens",
                                     "draft_time_fraction", "wall_s")},
                "tokens_per_step_vs_baseline": round(r["tokens_per_step"] / base["tokens_per_step"], 3),
                "tokens_per_s_vs_baseline": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                "outputs_equal_baseline": f"{len(rows) - len(mismatches[setup])}/{len(rows)}",
            }
        result["batches"][str(batch)] = {"reference": reference, "summary": summary, "mismatches": mismatches,
                                         "outputs_equal": not any(mismatches.values()), "setups": results}
        say(table(result, batch), flush=True)
        if not result["batches"][str(batch)]["outputs_equal"]:
            say(f"!!! GREEDY OUTPUTS DIFFER across setups at batch {batch} (a bug): {mismatches}", flush=True)
    firsts = [result["batches"][str(b)]["setups"][setups[0]]["outputs"] for b in batches]
    result["outputs_equal_across_batches"] = all(f == firsts[0] for f in firsts)
    result["outputs_equal"] = all(b["outputs_equal"] for b in result["batches"].values())
    if overhead_batch and "tree+grammar" in setups:
        if len(rows) < overhead_batch:
            say(f"(overhead: only {len(rows)} prompts for batch {overhead_batch})")
        result["grammar_overhead"] = grammar_overhead(config, target, rows, params,
                                                      setup_options("tree+grammar", tree, ssms, drafters),
                                                      overhead_batch, profile, overhead_repeats)
        o = result["grammar_overhead"]
        say(f"grammar work: {100 * o['grammar_fraction']:.1f}% of step time (batch {o['batch']}, {o['prompts']} prompts, "
            f"mean of {o['grammar_fraction_per_run']}; target <= {100 * OVERHEAD_TARGET:.0f}%): {o['by_function_s']}",
            flush=True)
        if profile:
            say(o["profile_top_tottime"])
    result["bench_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def table(result: dict[str, Any], batch: int) -> str:
    b = result["batches"][str(batch)]
    cols = [("tokens/step", "tokens_per_step"), ("x baseline", "tokens_per_step_vs_baseline"),
            ("tokens/s", "tokens_per_s"), ("x baseline", "tokens_per_s_vs_baseline"),
            ("valid JSON %", "valid_json_pct"), ("jump-forward tokens", "forced_tokens"),
            ("equal to baseline", "outputs_equal_baseline")]
    lines = [f"\nbatch {batch} (max_num_seqs), {result['num_prompts']} prompts, max_tokens {result['max_tokens']}, "
             f"tree {result['tree']}, drafters {result['ssms'] or 'shipped SSMs'} + {result['drafters']}; baseline "
             f"{b['reference']}; outputs equal: {b['outputs_equal']}",
             "| setup | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for setup, s in b["summary"].items():
        lines.append(f"| {setup} | " + " | ".join(str(s[k]) for _, k in cols) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    parts = [f"# Structured outputs bench\n\nmachine: {result['machine']}; {result['date']}; LLM {result['llm']} "
             f"({result['dtype']}, {result['torch_threads']} threads), greedy, chat template, prefix caching off; "
             f"grammar drafter: {result['grammar_draft_tokens']} tokens; confident setups: draft_confidence "
             f"{result['draft_confidence']}."]
    parts += [table(result, int(b)) for b in result["batches"]]
    if "grammar_overhead" in result:
        o = result["grammar_overhead"]
        parts.append(f"\ngrammar work: {100 * o['grammar_fraction']:.1f}% of step time ({o['setup']}, batch {o['batch']}, "
                     f"{o['prompts']} prompts; mean of {o['repeats']} runs: {o['grammar_fraction_per_run']}; target <= "
                     f"{100 * o['target_fraction_le']:.0f}%)\n\n| function | s (mean per run) |\n|---|---|\n"
                     + "\n".join(f"| {k} | {v} |" for k, v in o["by_function_s"].items())
                     + f"\n| (all steps) | {o['step_s']} |")
    return "\n".join(parts) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    """results.json (each list of token ids on one line) and results.md."""
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(text + "\n")
    (out / "results.md").write_text(markdown(result))


# ---- through a running server (--url) -------------------------------------------------------------


def spec_counters(url: str) -> dict[str, float]:
    """The server's speculative-decoding and token counters (/metrics; a sum over replicas only with one)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    names = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
             "generation_tokens")
    return {s.name.removeprefix("specinfer_").removesuffix("_total"): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.removeprefix("specinfer_").removesuffix("_total") in names}


def ask(openai: Any, client: Any, model: str, row: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """One schema prompt as a chat completion; a failed request is returned with its error."""
    start = time.perf_counter()
    schema = {"name": row["name"], "schema": row["schema"], "strict": True}
    try:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": row["prompt"]}],
                                             max_tokens=max_tokens, temperature=0,
                                             response_format={"type": "json_schema", "json_schema": schema})
    except openai.OpenAIError as err:
        return {"name": row["name"], "finish_reason": "error", "error": f"{type(err).__name__}: {err}"[:500],
                "latency_s": round(time.perf_counter() - start, 3)}
    return {"name": row["name"], "finish_reason": out.choices[0].finish_reason,
            "latency_s": round(time.perf_counter() - start, 3), "prompt_tokens": out.usage.prompt_tokens,
            "completion_tokens": out.usage.completion_tokens, "text": out.choices[0].message.content}


def served_summary(rows: list[dict[str, Any]], replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Validity of the replies (each gets ``valid``); ``failed``: invalid and not cut by max_tokens."""
    for row, reply in zip(rows, replies):
        reply["valid"] = "text" in reply and validity([row], [reply["text"] or ""])[0]
    reasons = [r["finish_reason"] for r in replies]
    latencies = [r["latency_s"] for r in replies]
    return {
        "num_prompts": len(rows), "valid": sum(r["valid"] for r in replies),
        "valid_pct": round(100 * sum(r["valid"] for r in replies) / len(rows), 1),
        "finish_reasons": {reason: reasons.count(reason) for reason in sorted(set(reasons))},
        "length_cut": [r["name"] for r in replies if r["finish_reason"] == "length"],
        "failed": [r["name"] for r in replies if not r["valid"] and r["finish_reason"] != "length"],
        "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in replies),
        "completion_tokens": sum(r.get("completion_tokens", 0) for r in replies),
        "latency_p50_s": round(statistics.median(latencies), 3), "latency_max_s": max(latencies),
    }


def run_served(url: str, prompts: str | None, max_tokens: int, concurrency: int, limit: int | None = None,
               model: str | None = None, api_key: str | None = None, server: str = "") -> dict[str, Any]:
    try:
        import jsonschema  # noqa: F401  (validity's)
        import openai
    except ImportError as err:
        raise SystemExit(f"structured --url needs {err.name}: pip install 'specinfer_dist[test]'") from None
    url = url.rstrip("/")
    rows = load_structured_prompts(prompts or STRUCTURED_PROMPTS)[:limit]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=900)
    model = model or client.models.list().data[0].id
    before, start = spec_counters(url), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda row: ask(openai, client, model, row, max_tokens), rows))
    wall, after = time.perf_counter() - start, spec_counters(url)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "url": url, "model": model, "server": server,
              "max_tokens": max_tokens, "concurrency": concurrency, "temperature": 0, "wall_s": round(wall, 2),
              **served_summary(rows, replies), "server_counters": {k: int(after[k] - before.get(k, 0)) for k in after}}
    result["completion_tokens_per_s"] = round(result["completion_tokens"] / wall, 2)
    result["per_prompt"] = replies
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--prompts", help="JSONL with name, prompt and schema (default: the shipped set)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--batches", default="8,1", help="max_num_seqs values, each a run of every setup")
    parser.add_argument("--tree", default="1,1,1,1,1,1", help="tree of the tree setups (widths, or dynamic[:K,DEPTH])")
    parser.add_argument("--ssm", action="append", dest="ssms", help="SSM source, repeatable ('none': no SSM); "
                        "default: the shipped SSMs")
    parser.add_argument("--drafter", action="append", dest="drafters",
                        help="model-free drafter, repeatable; default: ngram ('none': no model-free drafter)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="the first is the baseline")
    parser.add_argument("--draft-confidence", type=float, default=DRAFT_CONFIDENCE,
                        help="draft_confidence of the +confident setups")
    parser.add_argument("--overhead-batch", type=int, default=16, help="0: skip the grammar overhead run")
    parser.add_argument("--overhead-repeats", type=int, default=2, help="timed runs of the overhead batch")
    parser.add_argument("--profile", action="store_true", help="cProfile the last overhead run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", help="default: float32 on a CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--url", help="a running server's root: send the prompts through the openai client instead")
    parser.add_argument("--concurrency", type=int, default=4, help="--url: requests in flight")
    parser.add_argument("--model", help="--url: model id (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", help="--url: default $SPECINFER_API_KEY")
    parser.add_argument("--server", default="", help="--url: what the server runs, stored in results.json")
    parser.add_argument("--out", help="directory for results.json and results.md (default: docs/bench/cpu/structured, "
                        "with --url docs/bench/cpu/structured-serve)")
    args = parser.parse_args(argv)
    if args.url:
        result = run_served(args.url, args.prompts, args.max_tokens, args.concurrency, args.limit, args.model,
                            args.api_key or os.environ.get("SPECINFER_API_KEY"), args.server)
        out = Path(args.out or "docs/bench/cpu/structured-serve")
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{result['valid']}/{result['num_prompts']} valid ({result['valid_pct']}%), finish reasons "
              f"{result['finish_reasons']}, {result['completion_tokens']} tokens in {result['wall_s']} s at concurrency "
              f"{result['concurrency']}; server counters {result['server_counters']}")
        for name in result["failed"]:
            print(f"!!! {name}: invalid: {next(r for r in result['per_prompt'] if r['name'] == name)}")
        return 1 if result["failed"] else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    drafters = [] if args.drafters == ["none"] else (args.drafters or ["ngram"])
    options = {"device": args.device, **({"dtype": args.dtype} if args.dtype else {})}
    result = run(args.llm, args.prompts, args.max_tokens, tuple(int(b) for b in args.batches.split(",")), args.tree,
                 args.ssms, tuple(drafters), tuple(args.setups.split(",")), args.limit, args.overhead_batch,
                 args.profile, args.overhead_repeats, draft_confidence=args.draft_confidence, **options)
    write(result, Path(args.out or "docs/bench/cpu/structured"))
    print(markdown(result))
    if not result["outputs_equal"]:
        print("!!! greedy outputs differ across setups: see 'mismatches' in results.json")
    return 0 if result["outputs_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
