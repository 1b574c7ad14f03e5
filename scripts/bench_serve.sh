#!/usr/bin/env bash
# The service benchmark behind docs/bench/cpu/serve (long on a CPU; best on a quiet machine).
# `specinfer-dist serve` with configs/serve.yaml (default LLM, shipped SSMs) runs twice, once
# with incremental decoding and once with the default tree speculation; each is load-tested
# over HTTP by `specinfer-dist bench-serve` (streaming clients, greedy, ignore_eos). Then the
# speedup and latency plots, and summary.md with the table.
# Smaller runs: CONCURRENCY=1,2 NUM_REQUESTS=4 MAX_TOKENS=8 OUT=/tmp/serve ./scripts/bench_serve.sh
# Mixed lengths (short requests' TTFT behind long prompts): LONG_FRACTION=0.1 LONG_PROMPT_TOKENS=8000
# Other setups: SETUPS="label:key=value,key=value ..." (engine options over configs/serve.yaml,
# values in YAML; the first label is the baseline of the table), e.g. chunked prefill off vs on:
#   SETUPS="whole-prompts:max_num_batched_tokens=null chunked:" LONG_FRACTION=0.1 ...
# Against an older commit in the same run: BASELINE=<commit> also serves that commit's code (a
# temporary worktree on PYTHONPATH, its configs/serve.yaml, this venv) as labels <label>-<commit>.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
CONCURRENCY="${CONCURRENCY:-1,4,16,64}"
MAX_TOKENS="${MAX_TOKENS:-64}"
NUM_REQUESTS="${NUM_REQUESTS:-}"  # empty: bench-serve's default, max(2 x concurrency, 8) per level
LONG_FRACTION="${LONG_FRACTION:-0}"  # > 0: that share of requests has a LONG_PROMPT_TOKENS-token prompt
LONG_PROMPT_TOKENS="${LONG_PROMPT_TOKENS:-8000}"
OUT="${OUT:-docs/bench/cpu/serve}"
START_TIMEOUT_S="${START_TIMEOUT_S:-600}"
SETUPS="${SETUPS:-incremental:mode=incremental tree:mode=tree}"
BASELINE="${BASELINE:-}"
venv="$PWD/.venv"

work=$(mktemp -d)
server_pid=""
stop_server() {  # SIGTERM: the server shuts down Serve and the Ray cluster it started
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || echo "bench_serve.sh: the server exited with status $?" >&2
  fi
  server_pid=""
}
cleanup() {
  stop_server
  if [ -n "$BASELINE" ]; then git worktree remove --force "$work/base" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# A random API key in a file only we can read: the server reads the file, the client the
# environment (neither shows it on a command line).
(umask 077 && .venv/bin/python -c "import secrets; print('sk-bench-' + secrets.token_hex(16))" > "$work/api_key")

free_port() {
  .venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

run_setup() {  # $1 engine overrides (key=value,...), $2 label, $3 the checkout whose code and configs/serve.yaml serve
  local overrides=$1 label=$2 checkout=$3
  .venv/bin/python - "$overrides" "$checkout/configs/serve.yaml" "$work/$label.yaml" <<'EOF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[2]))
for pair in filter(None, sys.argv[1].split(",")):  # e.g. mode=incremental: drafts nothing
    key, _, value = pair.partition("=")
    config["engine"][key] = yaml.safe_load(value)
open(sys.argv[3], "w").write(yaml.safe_dump(config))
EOF
  port=$(free_port)
  grpc_port=$(free_port)
  # No --address: a private local Ray cluster, with Ray's token authentication on (its default).
  # Started from the checkout: Ray puts the driver's directory first on its workers' sys.path.
  (cd "$checkout" && PYTHONPATH="$checkout" SPECINFER_API_KEY_FILE="$work/api_key" exec "$venv/bin/specinfer-dist" \
    serve --config "$work/$label.yaml" --port "$port" --grpc-port "$grpc_port" > "$work/$label.log" 2>&1) &
  server_pid=$!
  deadline=$((SECONDS + START_TIMEOUT_S))
  until .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
      "http://127.0.0.1:$port/health" > /dev/null 2>&1; do
    if ! kill -0 "$server_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      echo "bench_serve.sh: the $label server did not come up; its log:" >&2
      tail -n 50 "$work/$label.log" >&2
      exit 1
    fi
    sleep 2
  done
  SPECINFER_API_KEY="$(cat "$work/api_key")" .venv/bin/specinfer-dist bench-serve \
    --url "http://127.0.0.1:$port" --label "$label" --out "$OUT" --concurrency "$CONCURRENCY" \
    --max-tokens "$MAX_TOKENS" ${NUM_REQUESTS:+--num-requests "$NUM_REQUESTS"} \
    --long-fraction "$LONG_FRACTION" --long-prompt-tokens "$LONG_PROMPT_TOKENS"
  stop_server
}

if [ -n "$BASELINE" ]; then
  git worktree add --detach "$work/base" "$BASELINE" > /dev/null
  for setup in $SETUPS; do run_setup "${setup#*:}" "${setup%%:*}-$BASELINE" "$work/base"; done
fi
for setup in $SETUPS; do run_setup "${setup#*:}" "${setup%%:*}" "$PWD"; done
first=${SETUPS%% *}
.venv/bin/specinfer-dist bench-serve --compare "$OUT" --baseline "${first%%:*}${BASELINE:+-$BASELINE}" | tee "$OUT/summary.md"
