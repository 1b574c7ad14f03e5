#!/usr/bin/env bash
# The CPU evidence behind README's Performance section (best on a quiet machine).
# Greedy modes side by side with Hugging Face plus the verify-cost sweep; then sampled MSS vs
# naive at two temperatures. Results: docs/bench/cpu/*/results.json + PNG plots.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
out=docs/bench/cpu
.venv/bin/specinfer-dist bench --modes incremental,sequence,tree,tree-auto,tree-full-vocab,ngram,merged,hf,hf-assisted \
  --max-tokens 64 --sweep --out "$out/greedy"
for t in 1.0 0.7; do
  .venv/bin/specinfer-dist bench --modes sequence-naive,sequence-mss,tree-naive,tree-mss \
    --temperature "$t" --max-tokens 32 --out "$out/sampled-t$t"
done
