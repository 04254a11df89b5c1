"""What jobs/serve.py serves: checkpoint / run dir / sweep resolution and names, typed app
arguments, and bad flags refused (exit 2) before Ray starts."""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chimera.checkpoint import resolve_checkpoint
from serve.loading import default_name, parse_models, sweep_models

ROOT = Path(__file__).resolve().parents[1]


def test_run_dir_resolves_to_best_then_latest(tiny_checkpoint, tmp_path):
    run = tiny_checkpoint.parent
    assert resolve_checkpoint(run) == tiny_checkpoint
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    copy = tmp_path / "r2"
    shutil.copytree(run / "checkpoint_000030", copy / "checkpoint_000030")
    shutil.copytree(run / "checkpoint_000030", copy / "checkpoint_000010")
    assert resolve_checkpoint(copy).name == "checkpoint_000030"
    assert default_name(copy / "checkpoint_000030") == "r2-000030"
    assert default_name(tiny_checkpoint) == "tiny"
    (copy / "checkpoint_000030" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        resolve_checkpoint(copy / "checkpoint_000030")
    with pytest.raises(ValueError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_names_are_unique_and_valid(tiny_checkpoint):
    assert parse_models([f"a={tiny_checkpoint}", str(tiny_checkpoint)]) == \
        [("a", tiny_checkpoint), ("tiny", tiny_checkpoint)]
    with pytest.raises(ValueError, match="two models named tiny"):
        parse_models([str(tiny_checkpoint), str(tiny_checkpoint.parent)])
    with pytest.raises(ValueError, match="model name"):
        parse_models([f"bad name={tiny_checkpoint}"])


def test_sweep_top_k(tiny_checkpoint, tmp_path):
    trials = [{"trial_id": "t002", "status": "TERMINATED", "val_loss": 1.5, "best_checkpoint": str(tiny_checkpoint)},
              {"trial_id": "t000", "status": "TERMINATED", "val_loss": 1.2, "best_checkpoint": str(tiny_checkpoint)},
              {"trial_id": "t001", "status": "ERROR", "val_loss": None, "best_checkpoint": None},
              {"trial_id": "t003", "status": "TERMINATED", "val_loss": 1.3, "best_checkpoint": str(tiny_checkpoint.parent)}]
    (tmp_path / "results.json").write_text(json.dumps({"metric": "val_loss", "mode": "min", "trials": trials}))
    assert sweep_models(tmp_path, 2) == [("t000", tiny_checkpoint), ("t003", tiny_checkpoint)]
    assert [n for n, _ in sweep_models(tmp_path, 10)] == ["t000", "t003", "t002"]
    with pytest.raises(ValueError, match="not a readable sweep result"):
        sweep_models(tmp_path / "missing", 1)


def test_app_args():
    from pydantic import ValidationError

    from serve.app import AppArgs, deployment_options
    a = AppArgs(checkpoint="x,y", max_batch=4, max_replicas=3, min_replicas=0)
    assert a.checkpoint == ["x", "y"]
    opts = deployment_options(a, "m")
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4}
    assert opts["max_ongoing_requests"] == 8 and "num_replicas" not in opts
    assert deployment_options(AppArgs(checkpoint=["x"], num_replicas=2), "m")["num_replicas"] == 2
    for bad, msg in (({}, "give --checkpoint"), ({"checkpoint": ["x"], "max_batch": 0}, "max_batch"),
                     ({"checkpoint": ["x"], "min_replicas": 3, "max_replicas": 2}, "min_replicas=3"),
                     ({"checkpoint": ["x"], "nope": 1}, "nope"),
                     ({"checkpoint": ["x"], "decode": "fast"}, "decode\n.*must be one of eager")):
        with pytest.raises(ValidationError, match=msg):
            AppArgs(**bad)


@pytest.mark.parametrize("args, msg", [
    ([], "give --checkpoint PATH"),
    (["--checkpoint", "/no/such/dir"], "neither a checkpoint directory"),
    (["--checkpoint", "x", "--port", "0"], "--port must be in 1..65535"),
    (["--checkpoint", "x", "--max_batch", "0"], "--max_batch: Input should be greater than or equal to 1"),
    (["--from_sweep", "/no/sweep"], "not a readable sweep result"),
])
def test_serve_job_rejects_bad_flags_before_ray(args, msg):
    r = subprocess.run([sys.executable, "jobs/serve.py", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


@pytest.mark.parametrize("args, msg", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--checkpoint", "/no/such/ckpt"], "neither a checkpoint directory"),
])
def test_serve_bench_rejects_bad_flags(args, msg):
    r = subprocess.run([sys.executable, "jobs/bench.py", "serve", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stdout + r.stderr


def test_chat_template_flag_is_checked_before_serving(tiny_checkpoint, tmp_path):
    """--chat_template [NAME=]FILE: unreadable, not Jinja2, failing to render, or naming no
    served model -> ValueError naming the flag (jobs/serve.py: exit 2 before Ray)."""
    from serve.app import AppArgs, resolve_templates
    good, broken, failing = tmp_path / "t.jinja", tmp_path / "b.jinja", tmp_path / "f.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    broken.write_text("{% for m in messages %}")
    failing.write_text("{{ messages[0].content + 1 }}")
    args = lambda *t: AppArgs(checkpoint=[str(tiny_checkpoint)], chat_template=list(t))
    src = good.read_text()
    assert resolve_templates(args(str(good)), ["a", "b"]) == {"a": src, "b": src}
    assert resolve_templates(args(f"b={good}"), ["a", "b"]) == {"b": src}
    for spec, msg in ((str(tmp_path / "none.jinja"), "cannot read it"),
                      (str(broken), "not a valid Jinja2 template"),
                      (str(failing), "failed to render"),
                      (f"c={good}", "no model named 'c'")):
        with pytest.raises(ValueError, match=msg):
            resolve_templates(args(spec), ["a", "b"])
    r = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(tiny_checkpoint),
                        "--chat_template", str(broken)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not a valid Jinja2 template" in r.stderr, r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_keys_timeouts_and_colocation_are_checked_before_serving(tiny_checkpoint, tmp_path):
    """--api_key(_file), CHIMERA_API_KEY, --request_timeout_s and --colocate_ingress: refused
    with the flag named (exit 2, no Ray), never echoing a key; the app's topology follows."""
    from serve.app import AppArgs, build_app, resolve_keys, resolve_models
    ck = str(tiny_checkpoint)
    keys = tmp_path / "keys.txt"
    keys.write_text("k-1\n")
    assert resolve_keys(AppArgs(checkpoint=[ck], api_key=["a", "b"], api_key_file=str(keys))
                        ).accepts("k-1")
    assert AppArgs(checkpoint=[ck], api_key="a,b").api_key == ["a", "b"]   # serve run's k=v
    for bad, msg in (({"colocate_ingress": True, "num_replicas": 2}, "colocate_ingress: only"),
                     ({"colocate_ingress": True, "max_replicas": 2}, "colocate_ingress: only"),
                     ({"request_timeout_s": 0}, "request_timeout_s")):
        with pytest.raises(ValueError, match=msg):
            AppArgs(checkpoint=[ck], **bad)
    with pytest.raises(ValueError, match=r"--prefix_cache_bytes for model tiny: "
                                         r"prefix_cache_bytes=100 holds no block"):
        resolve_models(AppArgs(checkpoint=[f"tiny={ck}"], prefix_cache_bytes=100))
    assert resolve_models(AppArgs(checkpoint=[f"tiny={ck}"], prefix_cache_bytes=1 << 24))
    with pytest.raises(ValueError, match="colocate_ingress: only with one model, got 2"):
        resolve_models(AppArgs(checkpoint=[f"a={ck}", f"b={ck}"], colocate_ingress=True))
    # the default: its own front end before the model; colocated: the model's deployment only
    assert build_app(AppArgs(checkpoint=[ck]))._bound_deployment.name == "Ingress"
    assert build_app(AppArgs(checkpoint=[f"m={ck}"], colocate_ingress=True)
                     )._bound_deployment.name == "LLMServer-m"
    with pytest.raises(ValueError, match="--api_key #1: an API key must be printable") as e:
        resolve_keys(AppArgs(checkpoint=[ck], api_key=["sec ret"]))
    assert "sec ret" not in str(e.value)
    env = {**os.environ, "CHIMERA_API_KEY": "good,bad key"}
    for args, msg, environ in (
            (["--api_key_file", str(tmp_path / "none.txt")], "--api_key_file", None),
            ([], "CHIMERA_API_KEY entry 2", env),
            (["--colocate_ingress", "--num_replicas", "2"], "colocate_ingress: only", None)):
        r = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", ck, *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env=environ)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert "sec ret" not in r.stderr and "bad key" not in r.stderr
        assert "Started a local Ray instance" not in r.stderr + r.stdout
