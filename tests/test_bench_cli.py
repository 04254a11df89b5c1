"""jobs/bench.py answers bad input with a clear error and exit code 2 (no timing here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/bench.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_unknown_suite_is_refused_with_the_choices():
    out = bench("nope")
    assert out.returncode == 2
    assert "invalid choice: 'nope'" in out.stderr and "models" in out.stderr


@pytest.mark.parametrize("args, msg", [
    (["--repeats", "0"], "--repeats, --batch_size and --new_tokens must be >= 1"),
    (["--dtype", "bf16"], "--dtype bf16 is for CUDA"),
    (["--device", "cuda"], "no CUDA device is visible"),
    (["--n_embd", "100", "--skip", "moe", "decode", "kv"], "n_embd=100 is not divisible by n_head=6"),
])
def test_models_suite_rejects_bad_flags(args, msg):
    out = bench("models", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert msg in out.stdout + out.stderr


def test_models_suite_rejects_unknown_skip_section():
    out = bench("models", "--skip", "everything")
    assert out.returncode == 2 and "invalid choice" in out.stderr


@pytest.mark.parametrize("args, msg", [
    (["--trials", "1"], "--trials=1 must be >= 2"),
    (["--max_iters", "10", "--eval_interval", "20"], "--eval_interval=20 must be <= --max_iters=10"),
    (["--reduction_factor", "1"], "--reduction_factor=1.0 must be > 1"),
    (["--source", "/nonexistent/input.txt"], "--source /nonexistent/input.txt does not exist"),
    (["--skip", "overhead", "asha", "search"], "every section is skipped"),
    (["--search_seeds", "0"], "--search_seeds and --search_cap must be >= 1"),
])
def test_sweep_suite_rejects_bad_flags_before_starting_ray(args, msg):
    out = bench("sweep", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert msg in out.stderr


@pytest.mark.parametrize("args, msg", [
    (["--soak_requests", "0"], "--soak_requests must be >= 1"),
    (["--soak_conc", "0"], "--soak_conc must be >= 1"),
    (["--kills", "-1"], "--kills must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_serve_suite_rejects_bad_flags_before_starting_ray(args, msg):
    out = bench("serve", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert msg in out.stderr
