"""`make demo` (jobs/demo.py): bad input refused before anything starts, Ctrl-C leaves nothing
running, and its cluster's private token (token auth on, a token-less client refused)."""
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


# The demo end to end (`make demo SOURCE=...`: every step, the generated text, the checkpoint,
# no Ray process left) runs in tests/test_readme.py, as the README shows it, on a fresh HOME.


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


@pytest.mark.slow
def test_demo_cluster_has_its_own_token_and_refuses_clients_without_it(tmp_path):
    """ray start --head on a machine where Ray never ran (this session's HOME has no token of
    it): the cluster generates its own token, auth is on, and ~/.ray is neither read nor written."""
    import os
    import urllib.error
    import urllib.request

    from chimera.localcluster import LocalCluster

    home_ray = Path(os.environ["HOME"]) / ".ray"
    had_token = (home_ray / "auth_token").exists()
    before = (home_ray / "auth_token").read_text() if had_token else None
    c = LocalCluster(num_cpus=2)
    try:
        c.start()
        assert Path(c.token_path).stat().st_mode & 0o777 == 0o600
        ok = subprocess.run([c.ray_bin, "job", "list", "--address", c.dashboard_url], env=c.env,
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        with pytest.raises(urllib.error.HTTPError) as e:             # no token at all: 401
            urllib.request.urlopen(f"{c.dashboard_url}/api/jobs/", timeout=30)
        assert e.value.code == 401
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        bad = subprocess.run([c.ray_bin, "job", "list", "--address", c.dashboard_url],
                             env={**c.env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and ("403" in bad.stderr or "Invalid" in bad.stderr), bad.stderr[-2000:]
    finally:
        c.stop()
    assert c.processes() == []
    now = (home_ray / "auth_token").read_text() if (home_ray / "auth_token").exists() else None
    assert now == before                      # the user's ~/.ray is left as it was
