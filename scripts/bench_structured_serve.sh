#!/usr/bin/env bash
# Structured outputs through the OpenAI API, the validity number in README's "Structured outputs
# under tree speculation": `specinfer-dist serve` with configs/serve.yaml (default LLM, shipped SSMs)
# and SERVE_ARGS (default: the in-process bench's tree 1,1,1,1,1,1 with prompt lookup, drafting at
# any batch size; on a 2-core CPU tree auto picks incremental decoding), every schema prompt sent by
# `python -m specinfer_dist.bench.structured --url` (openai client, greedy), then the server stopped.
# Smaller: LIMIT=4 MAX_TOKENS=32 OUT=/tmp/structured-serve ./scripts/bench_structured_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
OUT="${OUT:-docs/bench/cpu/structured-serve}"
MAX_TOKENS="${MAX_TOKENS:-200}"  # as the in-process bench's README run
CONCURRENCY="${CONCURRENCY:-4}"
SERVE_ARGS="${SERVE_ARGS---tree 1,1,1,1,1,1 --drafter ngram --speculation-max-batch 16}"
START_TIMEOUT_S="${START_TIMEOUT_S:-600}"
port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
log=$(mktemp)
# shellcheck disable=SC2086  # SERVE_ARGS: several flags
.venv/bin/specinfer-dist serve --config configs/serve.yaml --port "$port" --grpc-port 0 $SERVE_ARGS > "$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null && wait "$server"; rm -f "$log"' EXIT  # SIGTERM: it shuts down Serve and Ray
deadline=$((SECONDS + START_TIMEOUT_S))
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
  if ! kill -0 "$server" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "bench_structured_serve.sh: the server did not come up; its log:" >&2 && tail -n 50 "$log" >&2 && exit 1
  fi
  sleep 2
done
.venv/bin/python -m specinfer_dist.bench.structured --url "http://127.0.0.1:$port" --out "$OUT" \
  --max-tokens "$MAX_TOKENS" --concurrency "$CONCURRENCY" ${LIMIT:+--limit "$LIMIT"} \
  --server "specinfer-dist serve --config configs/serve.yaml $SERVE_ARGS"
