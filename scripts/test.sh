#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the whole test suite (default model included).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
