"""Repository layout: `platform/` is a source root that must not shadow the standard library,
the three packages resolve into this checkout, and importing them does no work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_stdlib_platform_is_not_shadowed_and_packages_resolve_here():
    code = f"""
import sys, json
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'platform')!r}]
import platform
assert platform.system(), 'platform.system() returned nothing'
import numpy, pytest   # both import `platform` themselves
import models, serve, chimera
print(json.dumps({{"platform": platform.__file__, "system": platform.system(),
                  "models": models.__file__, "serve": serve.__file__, "chimera": chimera.__file__}}))
"""
    got = json.loads(run_py(code))
    assert got["system"] == "Linux" or got["system"]
    assert not got["platform"].startswith(str(ROOT))                # the stdlib module
    assert got["models"] == str(ROOT / "models" / "__init__.py")
    assert got["serve"] == str(ROOT / "serve" / "__init__.py")
    assert got["chimera"] == str(ROOT / "platform" / "chimera" / "__init__.py")


def test_importing_the_packages_does_no_work():
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'platform')!r}]
argv = list(sys.argv)
import models, serve, chimera, models.model, models.generation
assert 'ray' not in sys.modules, 'importing the packages imported ray'
assert sys.argv == argv
import torch
assert not torch.distributed.is_initialized()
print('ok')
"""
    assert run_py(code).strip() == "ok"


# --- the pipeline's import direction -----------------------------------------------------------
# models <- data <- checkpoint <- train / serve <- sweep <- benchmarks, eval, paramdocs. A module may
# import its own folder and the ranks below its own, never above, and no two modules may import
# each other (directly or round a longer loop). Imports inside functions count too.
# chimera.hf (HF import/export) sits between checkpoint and train (train's --init_from uses it).
# chimera.runtime (Ray start-up; it imports only chimera.paths) sits below data: preparation
# runs its tokenizer workers on Ray (issue 16).
# chimera.storage (local paths and object-store URIs) is below everything that reads or writes
# files; chimera.localstore (a SeaweedFS server for tests and benchmarks) uses localcluster's ports.
RANKS = [("models", 0), ("chimera.storage", 0), ("chimera.paths", 0.25), ("chimera.runtime", 0.5),
         ("chimera.localcluster", 1), ("chimera.localstore", 1.5),
         ("chimera.data", 1), ("chimera.checkpoint", 2), ("chimera.hf", 2.5), ("chimera.train", 3), ("serve", 3),
         ("chimera.sweep", 4), ("chimera.benchmarks", 5), ("chimera.eval", 5), ("chimera.paramdocs", 5),
         ("chimera", 0)]


def _rank(mod: str) -> tuple[str, int] | None:
    for prefix, r in RANKS:
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix, r
    return None


def _our_modules() -> dict[str, Path]:
    out = {}
    for base, pkg_root in ((ROOT, "models"), (ROOT, "serve"), (ROOT / "platform", "chimera")):
        for f in (base / pkg_root).rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(f: Path, me: str, known) -> set[str]:
    import ast
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # relative: resolve against me
                base = me.split(".")[: len(me.split(".")) - node.level + (f.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:                      # longest known prefix
                n = n.rpartition(".")[0]
            if n and n != me:
                found.add(n)
    return found


def test_imports_flow_one_way_and_have_no_cycles():
    mods = _our_modules()
    graph = {m: _imports(f, m, mods) for m, f in mods.items()}
    wrong = []
    for m, deps in graph.items():
        (mp, mr) = _rank(m)
        for d in deps:
            dp, dr = _rank(d)
            if dp != mp and dr >= mr and not (mp == "chimera" or dp == "chimera"):
                wrong.append(f"{m} imports {d} (rank {mr} -> {dr})")
    assert not wrong, "imports running back up the pipeline:\n" + "\n".join(sorted(wrong))
    # cycles: a depth-first search over the module graph
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
