"""jobs/sample.py: local sampling from a trained checkpoint (checkpoint dir or run dir), KV
cache on and off giving the same tokens, and bad flags refused with exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sample(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/sample.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("opts", [["--temperature", "0"],
                                  ["--temperature", "1.1", "--top_k", "10", "--top_p", "0.9", "--seed", "4"]])
def test_cached_and_uncached_agree_and_run_dir_means_best(tiny_checkpoint, opts):
    run_dir = tiny_checkpoint.parent
    a = sample("--model_path", str(run_dir), "--prompt", "KING:", "--max_new_tokens", "90", *opts)
    b = sample("--model_path", str(tiny_checkpoint), "--prompt", "KING:", "--max_new_tokens", "90",
               "--no_kv_cache", *opts)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("KING:") and len(a.stdout) == len("KING:") + 91
    assert "90 tokens in" in a.stderr and "tokens/s (KV cache on" in a.stderr
    assert "tokens/s (KV cache off" in b.stderr


def test_decode_modes_agree(tiny_checkpoint):
    """--decode static (the static-shape step) prints what the default (eager on CPU) prints."""
    args = ["--model_path", str(tiny_checkpoint), "--prompt", "KING:", "--max_new_tokens", "70",
            "--temperature", "0"]
    a, b = sample(*args), sample(*args, "--decode", "static")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "decode eager" in a.stderr and "decode static" in b.stderr


def test_long_prompt_keeps_the_last_block(tiny_checkpoint):
    r = sample("--model_path", str(tiny_checkpoint), "--prompt", "a" * 100, "--max_new_tokens", "3",
               "--temperature", "0")
    assert r.returncode == 0 and "keeps its last 64" in r.stderr


def test_long_prompt_cached_and_uncached_agree(tiny_checkpoint):
    """Past block_size both paths condition on the last block and print only the new text."""
    long = "KING: " * 15                                                  # 90 tokens, block 64
    a = sample("--model_path", str(tiny_checkpoint), "--prompt", long, "--max_new_tokens", "5",
               "--temperature", "0")
    b = sample("--model_path", str(tiny_checkpoint), "--prompt", long, "--max_new_tokens", "5",
               "--temperature", "0", "--no_kv_cache")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and len(a.stdout) == len(long) + 5 + 1
    assert "5 tokens in" in a.stderr and "5 tokens in" in b.stderr


@pytest.mark.parametrize("args, msg", [
    (["--max_new_tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top_p", "1.5"], r"top_p must be None or in (0, 1]"),
    (["--top_k", "0"], "top_k must be None or an integer >= 1"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "€"], "error: "),
    (["--device", "tpu"], "--device tpu"),
    (["--decode", "fast"], "argument --decode: invalid choice: 'fast'"),
])
def test_bad_flags_exit_2(tiny_checkpoint, args, msg):
    r = sample("--model_path", str(tiny_checkpoint), *args)
    assert r.returncode == 2 and msg in r.stderr and r.stdout == ""


def test_missing_checkpoint_exit_2(tmp_path):
    r = sample("--model_path", str(tmp_path))
    assert r.returncode == 2 and "neither a checkpoint directory" in r.stderr
