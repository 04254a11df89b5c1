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
