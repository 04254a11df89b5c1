"""`make demo` (jobs/demo.py): the whole platform end to end, and nothing of it left running."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def demo_processes() -> list[str]:
    """Command lines of processes belonging to any demo cluster (its temp dirs are chimera_ray_*)."""
    import psutil
    out = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "chimera_ray_" in line:
            out.append(line[:200])
    return out


@pytest.mark.parametrize("args, msg", [
    (["--max_iters", "0"], "--max_iters=0 must be >= 1"),
    (["--num_cpus", "1"], "--num_cpus=1 must be >= 2"),
    (["--source", "/nonexistent/input.txt"], "pass --source PATH"),
])
def test_demo_refuses_bad_input_before_starting_anything(args, msg, tmp_path):
    out = subprocess.run([sys.executable, "jobs/demo.py", *args, "--data_dir", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and msg in out.stderr, out.stdout + out.stderr
    assert "[2/4]" not in out.stdout


@pytest.mark.slow
def test_demo_trains_serves_answers_and_leaves_no_ray_process(shakespeare_path, tmp_path):
    before = demo_processes()
    out = subprocess.run([sys.executable, "jobs/demo.py", "--source", str(shakespeare_path),
                          "--data_dir", str(tmp_path / "data"), "--storage_path", str(tmp_path / "runs"),
                          "--max_iters", "20", "--max_new_tokens", "24"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "dashboard http://127.0.0.1:", "serving demo-"):
        assert step in text
    assert "Job 'raysubmit_" in text + out.stderr and "succeeded" in text + out.stderr
    assert "generated 24 tokens (length)" in text
    assert "model        2×[mla+moe8/3] + 2×[gqa2+mlp]" in text
    ckpt = next(Path(tmp_path / "runs").glob("demo-*/llm_model_best"))
    assert (ckpt / "model.safetensors").is_file() and str(ckpt) in text
    assert "Ray processes of the demo left: 0" in text
    assert demo_processes() == before


@pytest.mark.slow
def test_demo_interrupted_with_ctrl_c_leaves_no_ray_process(shakespeare_path, tmp_path):
    before = demo_processes()
    p = subprocess.Popen([sys.executable, "jobs/demo.py", "--source", str(shakespeare_path),
                          "--data_dir", str(tmp_path / "data"), "--storage_path", str(tmp_path / "runs"),
                          "--max_iters", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 300
    for line in p.stdout:                    # wait until training runs on the demo's cluster
        lines.append(line)
        if "step 25/" in line or time.time() > deadline:
            break
    assert any("step 25/" in ln for ln in lines), "".join(lines)[-3000:]
    # Ctrl-C in a terminal reaches the whole foreground process group
    import os
    os.killpg(p.pid, signal.SIGINT)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == 130, rest[-3000:]
    assert "Ray processes of the demo left: 0" in rest
    assert demo_processes() == before
