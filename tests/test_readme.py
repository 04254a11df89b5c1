"""The README, executed: its command blocks run as written, in order, in one shell of a new
user's machine (fresh HOME and TMPDIR, a copy of the repository, ../shared beside it), and the
transcripts print what the README shows. See tests/readme_runner.py for the conventions."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from readme_runner import (Sandbox, copy_tree, match_output, readme_blocks, transcript,
                           user_path)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# what a user of the README does, each in a block that the README test runs
MUST_RUN = ["make demo SOURCE=", "source .venv/bin/activate", "jobs/prepare.py",
            "ray get-auth-token --generate", "ray start --head", "ray job submit", "jobs/train.py",
            "ray stop", "jobs/sweep.py --spec", "jobs/sweep.py --report", "jobs/serve.py",
            "curl -s localhost:8000/v1/completions", "from openai import OpenAI", "jobs/sample.py",
            "kill %1", "jobs/eval.py --from_sweep"]


@pytest.fixture(scope="module")
def blocks():
    return readme_blocks(README.read_text())


def test_every_command_block_is_run_or_says_why_not(blocks):
    runnable = [b for b in blocks if b.runnable]
    skipped = [b for b in blocks if b.lang in ("bash", "python") and b.skip is not None]
    assert runnable and skipped
    for b in skipped:
        assert len(b.skip) > 20, f"{b.where()}: say why it is not run"
    text = "\n".join(b.code for b in runnable)
    for cmd in MUST_RUN:
        assert cmd in text, f"no README block that the tests run holds {cmd!r}"
    # every marker sits right above a command block (a marker elsewhere would skip nothing)
    src = README.read_text()
    assert len(re.findall(r"^<!--\s*not run by tests:", src, re.M)) == len(skipped)
    for b in runnable:
        if b.lang == "bash":
            transcript(b.code)                 # parses (text before the first `$ ` is an error)


def test_readme_parser_and_output_matcher():
    text = "# A\n```bash\necho 1\n```\n<!-- not run by tests: because it downloads\n the web -->\n\n" \
           "```bash\ncurl x\n```\n```\nout\n```\n```python\nprint(1)\n```\n"
    bs = readme_blocks(text)
    assert [(b.lang, b.runnable, b.skip) for b in bs] == [
        ("bash", True, None), ("bash", False, "because it downloads the web"), ("", False, None),
        ("python", True, None)]
    assert bs[0].heading == "A" and bs[0].line == 2
    assert transcript("echo 1") is None
    assert transcript("$ a \\\n  b\nout1\n\nout2\n$ c") == [("a \\\n  b", ["out1", "", "out2"]), ("c", [])]
    with pytest.raises(ValueError, match="before its first"):
        transcript("stray\n$ a")
    shown = ['{"model":"demo","n":1,"t":{"a":0.1},"l":[{"x":null}]}', "data: [DONE]", "took ... s"]
    assert match_output(shown, '{"model":"x","n":7,"t":{"a":3},"l":[{"x":"y"}]}\n\ndata: [DONE]\ntook 12 s\n') is None
    assert "shape" in match_output(shown, '{"model":"x","n":7,"t":{"b":3},"l":[{"x":1}]}\ndata: [DONE]\ntook 1 s')
    assert "shape" in match_output(shown, '{"model":"x","n":"7","t":{"a":3},"l":[{"x":1}]}\ndata: [DONE]\ntook 1 s')
    assert "expected 'data: [DONE]'" in match_output(shown, '{"model":"x","n":7,"t":{"a":3},"l":[{"x":2}]}\n'
                                                            'data: [NOPE]\ntook 1 s')
    assert "expected JSON" in match_output(shown, 'Traceback\ndata: [DONE]\ntook 1 s')
    assert "2 output lines" in match_output(shown, '{"model":"x"}\ndata: [DONE]')


@pytest.fixture
def sandbox(tmp_path):
    """A Sandbox in tmp_path, its HOME and TMPDIR in a short folder under /tmp (Ray's socket
    paths under TMPDIR must stay < 108 characters)."""
    why = Sandbox.available()
    if why:
        if os.environ.get("CHIMERA_README_TEST") == "required":
            pytest.fail(f"the README test cannot make its sandbox: {why}")
        pytest.skip(f"cannot make PID/network namespaces here ({why}); CI requires them")
    short = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    for d in (short / "h", short / "t", tmp_path / "scratch"):
        d.mkdir()
    yield Sandbox(tmp_path, home=short / "h", tmp=short / "t", scratch=tmp_path / "scratch")
    shutil.rmtree(short, ignore_errors=True)


def test_sandbox_shell_keeps_state_and_reports_failed_commands(sandbox, tmp_path):
    with sandbox as sh:
        assert sh.run("export X=41; cd scratch", timeout=30).failed == []
        s = sh.run("echo $((X + 1)) $(basename $PWD)\nfalse\nls /nonexistent-dir\necho still", timeout=30)
        assert s.failed == ["2: false", "3: ls /nonexistent-dir"], s
        assert "42 scratch" in s.output and "still" in s.output
        s = sh.run("echo $HOME; echo $PATH; ip -o link | wc -l; ps -e --no-headers | wc -l", timeout=30)
        home, path, links, procs = s.output.split()
        assert home == str(sh.home) and ".venv" not in path
        assert links == "1"                      # loopback only: a network of its own
        assert int(procs) <= 6                   # unshare's init, bash, the pipeline: PIDs of its own
        s = sh.run("echo '{\"a\": 1}'; echo x >&2", timeout=30, capture_to_file=True)
        assert s.output.splitlines() == ['{"a": 1}', "x"]
        s = sh.run("printf 'no newline at the end'", timeout=30)    # print(..., end="")
        assert s.rc == 0 and s.output == "no newline at the end\n" and s.failed == []


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2700)
def test_readme_runs_as_written(blocks, sandbox, tmp_path):
    """Every runnable block, in order; stops at the first block that fails and shows it."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "python").is_file():
        pytest.fail(f"{venv} is missing: run the README's set-up (`make test` creates it)")
    work = tmp_path / "w"
    repo = work / ROOT.name
    copy_tree(ROOT, repo)
    (work / "shared").symlink_to(ROOT.parent / "shared")
    (repo / ".venv").symlink_to(venv)
    dry = subprocess.run(["make", "-n", "demo"], cwd=repo, capture_output=True, text=True,
                         env={"PATH": user_path(), "HOME": str(tmp_path)})
    assert "pip install" not in dry.stdout, f"make would reinstall into {venv}: run `make install` first"
    sh = sandbox
    sh.root = repo
    ran, outputs = [], []
    with sh:
        for b in blocks:
            if not b.runnable:
                continue
            if b.lang == "python":
                f = sh.scratch / f"block{b.line}.py"
                f.write_text(b.code + "\n")
                steps = [(f"python - < {f}", None)]
            else:
                steps = transcript(b.code) or [(b.code, None)]
            for cmd, shown in steps:
                t0 = time.monotonic()
                s = sh.run(cmd, timeout=1200, capture_to_file=shown is not None)
                ran.append(f"{b.where()} {time.monotonic() - t0:6.1f} s  {cmd.splitlines()[0][:70]}")
                tail = s.output[-4000:]
                assert not s.failed and s.rc == 0, (
                    f"{b.where()}: a README command failed: {s.failed or s.rc}\n--- its output:\n{tail}"
                    "\n--- ran:\n" + "\n".join(ran))
                if shown is not None or b.lang == "python":
                    outputs.append(f"$ {cmd}\n{s.output}")
                if shown is not None:
                    diff = match_output(shown, s.output)
                    assert diff is None, f"{b.where()}: `$ {cmd}` printed other than the README shows: {diff}"
                _check(cmd, s.output, repo)
        # the README's own stop commands (ray stop, kill %1) leave nothing running
        for _ in range(60):
            left = sh.run("ps -eo comm= | grep -vxE 'bash|ps|grep|sleep|unshare' || true", timeout=30).output.split()
            if not left:
                break
            time.sleep(1)
        assert not left, f"processes left running after the README's commands: {left}"
    print("\n".join(ran + outputs))       # with -s: the timings, and the outputs to show


def _check(cmd: str, out: str, repo: Path) -> None:
    """What the README says these commands do, beyond exiting 0."""
    if cmd.startswith("make demo"):             # the whole platform, and nothing of it left
        for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "dashboard http://127.0.0.1:", "serving demo-"):
            assert step in out, out[-3000:]
        assert "Job 'raysubmit_" in out and "succeeded" in out, out[-3000:]
        assert "\ngenerated 200 tokens (length)" in out, out[-3000:]
        assert "model        2×[mla+moe8/3] + 2×[gqa2+mlp]" in out, out[-3000:]
        ckpt = next((repo / "runs").glob("demo-*/llm_model_best"))
        assert (ckpt / "model.safetensors").is_file() and str(ckpt) in out
        assert "Ray processes of the demo left: 0" in out, out[-3000:]
    if "ray job submit" in cmd:
        assert "succeeded" in out and "finished at step 40" in out, out[-3000:]
    if "jobs/sweep.py --spec" in cmd:
        assert "trials: 12 finished" in out and "best: t0" in out, out[-3000:]     # 4 configs × 3 seeds
