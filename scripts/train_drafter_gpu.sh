#!/usr/bin/env bash
# Train the default LLM's EAGLE-3 feature drafter on one GPU within one lease, then race it (issue 24).
#
#   scripts/train_drafter_gpu.sh [RESULTS_DIR]            # on a machine with one CUDA GPU and the default LLM's GGUF
#   scripts/train_drafter_gpu.sh --dry-run [RESULTS_DIR]  # the same steps on this CPU: a tiny random LLM, ~2 minutes
#
# What runs (one command each, all on the GPU):
#   1. `specinfer-dist train-feature-drafter --budget-minutes $BUDGET_MINUTES` (default 6): the LLM answers prompts of
#      the project's prompt set (training/prompts.py; none of them a benchmark prompt) with batched generate() until
#      40% of the budget has passed, keeping every answer in a growable store (answers/: manifest.json +
#      answers.jsonl; answers already there are not generated again); the head, started from the shipped one, trains
#      on them until 80% (training-time test over 3 depths, loss on answer rows only); then held-out top-1/top-3 per
#      depth and tokens/step on held-out prompts (the head alone and with the SSMs and prompt lookup, budget-64
#      dynamic tree, greedy checked equal to incremental decoding, MSS at T = 1), and the head is saved in the
#      vLLM/SGLang EAGLE-3 format with train_report.json.
#   2. `specinfer-dist bench` on the benchmark prompts with the new head: incremental decoding, the default tree auto
#      (`tree`), `feature-merged` (tree auto racing the new head against the SSMs and prompt lookup, as a service
#      with it configured would), the budget-64 dynamic trees greedy and MSS, and HF generate(): tokens/step and
#      speed side by side.
# Results (RESULTS_DIR, default drafter-gpu-<UTC time>/; 7 files, ~11 MB): eagle3/{config.json,model.safetensors,
# train_report.json}, bench.json, manifest.json (the answers' manifest), answers.tar.xz (the whole store, for the next
# lease: pass it back as ANSWERS_XZ and the store grows instead of starting again), log.txt.
#
# Lease recipe (device tool: 64 MiB travel per call including the working tree, a machine stays warm ~30 s after a
# call with /tmp kept, a cold start costs ~2.5 minutes, at most 10 minutes per call, 15 per session). What travels:
# this project (the tree), the wheels the image lacks and the default LLM's GGUF, split as scripts/gpu_check.sh's
# header describes (.lease/whl, .lease/gguf.xz.0 ... .3; the prompts travel as code). Then:
#   calls 1-3, carry .lease/whl .lease/gguf.xz.0, then .lease/gguf.xz.1, then .lease/gguf.xz.2, each within ~30 s:
#        mkdir -p /tmp/lease && cp -r .lease/* /tmp/lease/
#   call 4, carry .lease/gguf.xz.3 (and .lease/answers.tar.xz from an earlier lease, if any), timeout_s 600:
#        cp -r .lease/* /tmp/lease/ && cat /tmp/lease/gguf.xz.? | xz -d > /tmp/lease/d.gguf &&
#        WHEELHOUSE=/tmp/lease/whl DEFAULT_GGUF=/tmp/lease/d.gguf ANSWERS_XZ=/tmp/lease/answers.tar.xz \
#        scripts/train_drafter_gpu.sh /tmp/drafter && cp -r /tmp/drafter/. $OUT/
#   Budget of call 4: install ~20 s, GGUF conversion ~50 s, training BUDGET_MINUTES (6), bench ~1.5 minutes.
#   Back here: copy eagle3/ over specinfer_dist/ssms/smollm2-135m-instruct/eagle3/ if bench.json says it drafts
#   better, keep answers.tar.xz under .lease/ for the next lease, and put the numbers in the README with this
#   command and the GPU named.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0 RESULTS=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -*) echo "train_drafter_gpu: unknown option $arg" >&2; exit 2 ;;
        *) RESULTS="$arg" ;;
    esac
done
RESULTS="${RESULTS:-drafter-gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}/specinfer-drafter-gpu}"  # installs, caches, the answers store: not results
mkdir -p "$WORK"
exec > >(tee -a "$RESULTS/log.txt") 2>&1
echo "train_drafter_gpu: results in $RESULTS"
source scripts/lease_env.sh

ANSWERS="$WORK/answers"
if [[ -n "${ANSWERS_XZ:-}" && -f "$ANSWERS_XZ" && ! -f "$ANSWERS/answers.jsonl" ]]; then
    mkdir -p "$ANSWERS" && xz -dc "$ANSWERS_XZ" | tar -x -C "$ANSWERS"  # an earlier lease's store, grown on
fi
if [[ $DRY == 1 ]]; then
    # A tiny random Llama with a chat template stands in for the default LLM; no SSMs, no shipped head to start from.
    LLM=$("$PY" -c 'import sys; from pathlib import Path; from helpers import make_tiny_checkpoint
print(make_tiny_checkpoint(Path(sys.argv[1]), "llama", seed=1, chat_template=True, max_position_embeddings=512))' \
        "$WORK")
    printf '{"prompt": "%s"}\n' "The river ran past the old mill and" "def add(a, b):" "Once upon a time" \
        "The three rules of the game are" > "$WORK/plain-prompts.jsonl"  # a generated tokenizer has no chat template
    train=(--llm "$LLM" --device cpu --prompts 96 --max-new-tokens 24 --gen-batch-size 32 --batch-size 8
           --draft-vocab 64 --eval-prompts 4 --eval-max-tokens 16)
    BUDGET_MINUTES="${BUDGET_MINUTES:-1}"
    bench=(--llm "$LLM" --device cpu --ssm none --max-tokens 16 --prompts "$WORK/plain-prompts.jsonl"
           --modes incremental,feature-merged,feature-merged-dynamic,feature-merged-dynamic-mss,hf)
else
    [[ -n "${DEFAULT_GGUF:-}" ]] && install_default_llm
    LLM=default
    train=(--llm default --device cuda --init specinfer_dist/ssms/smollm2-135m-instruct/eagle3
           --prompts "${PROMPTS:-16384}" --max-new-tokens 128 --seq-len 384 --gen-batch-size 256 --batch-size 32
           --lr 3e-4)  # seq-len 384: a multi-turn prompt with its parent's answer is up to ~250 tokens
    BUDGET_MINUTES="${BUDGET_MINUTES:-6}"
    bench=(--llm default --device cuda --max-tokens 64
           --modes incremental,tree,feature-merged,feature-merged-dynamic,feature-merged-dynamic-mss,hf)
fi
"$PY" -m specinfer_dist.cli train-feature-drafter "${train[@]}" --out "$RESULTS/eagle3" --work-dir "$WORK/train" \
    --data-dir "$ANSWERS" --budget-minutes "$BUDGET_MINUTES" --corpus-sequences 0 --tokens 1000000000
rm -rf "$RESULTS/eagle3/.work"
"$PY" -m specinfer_dist.cli bench "${bench[@]}" --feature-drafter "$RESULTS/eagle3" --out "$WORK/bench"
cp "$WORK/bench/results.json" "$RESULTS/bench.json"
cp "$ANSWERS/manifest.json" "$RESULTS/manifest.json"
tar -C "$ANSWERS" -c manifest.json answers.jsonl | xz -6 -T0 > "$RESULTS/answers.tar.xz"
echo "train_drafter_gpu: done; $(du -sh "$RESULTS" | cut -f1) in $RESULTS"
