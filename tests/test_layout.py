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


def test_demo_prints_sizes_and_a_generation():
    out = subprocess.run([sys.executable, "jobs/demo.py", "--max_new_tokens", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "parameters          total" in out.stdout and "active" in out.stdout
    assert "KV cache bytes/tok" in out.stdout
    assert "2×[mla+moe8/3] + 2×[gqa2+mlp]" in out.stdout
    assert "generation (untrained" in out.stdout


def test_demo_rejects_bad_flags_before_doing_any_work():
    for args, msg in ((["--max_new_tokens", "0"], "max_new_tokens must be a positive integer"),
                      (["--n_embd", "100"], "layers[0].attn: n_embd=100 is not divisible by n_head=8")):
        out = subprocess.run([sys.executable, "jobs/demo.py", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and msg in out.stderr
        assert "parameters" not in out.stdout


def test_demo_rejects_a_bad_layer_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"attn": "gqa", "n_head": 8, "n_kv_heads": 3}\n')
    out = subprocess.run([sys.executable, "jobs/demo.py", "--layers", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "layers[0].attn: n_head=8 is not divisible by n_kv_heads=3" in out.stderr
