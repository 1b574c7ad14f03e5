"""The package's layering: arrows point down, no two modules import each other, and every
module imports on its own (no hidden reliance on another module having been imported first)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import grimp

import specinfer_dist

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(specinfer_dist.__path__, "specinfer_dist.") if ".ssms" not in m.name
)


def test_layering_contracts_hold() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_two_modules_import_each_other() -> None:
    graph = grimp.build_graph("specinfer_dist", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # Package __init__ files re-export their children; a child importing a sibling
            # through the package is no cycle of files.
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert not cycles, f"import cycles between files: {cycles}"


# One interpreter loads the third-party modules our package imports (found by a first child that
# imports all of it), then forks a child per module: each child starts with none of
# specinfer_dist imported, so it sees exactly what a fresh interpreter would of our own package,
# at a fraction of the cost of 100 interpreters (each re-importing ray.serve, transformers' model
# classes...). The price: a module that touches a third-party submodule at import time without
# importing it would pass here.
_IMPORT_EACH = """
import importlib, os, sys, tempfile, traceback
seen = tempfile.NamedTemporaryFile("r", suffix=".txt")
pid = os.fork()
if pid == 0:
    for name in sys.argv[1:]:
        try:
            __import__(name)
        except BaseException:
            pass  # reported by its own child below
    with open(seen.name, "w") as out:
        out.write("\\n".join(m for m in list(sys.modules) if m.partition(".")[0] not in ("specinfer_dist", "__main__")))
    os._exit(0)
os.waitpid(pid, 0)
for name in seen.read().split():
    try:
        importlib.import_module(name)
    except BaseException:
        pass  # private or platform modules that only load as their package's side effect
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone() -> None:
    assert "specinfer_dist.engine.engine" in MODULES and len(MODULES) > 40
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *MODULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
