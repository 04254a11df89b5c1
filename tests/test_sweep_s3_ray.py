"""A sweep whose storage is the real S3-compatible store (conftest.object_store): trials,
sweep.json, summaries, Tune's state, the report and the trials' data (--data_dir) all in s3://; the report read back from
there (`--report s3://...`); an interrupted sweep resumed from s3:// (`--resume`) without
rerunning finished trials; `--from_sweep s3://...` picks the winner's checkpoint in the store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chimera import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> subprocess.Popen:
    import ray
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def s3_sweep(ray_cluster, object_store, train_char_data, tmp_path_factory):
    """jobs/sweep.py on s3:// storage, Ctrl-C once the first trial finished, then --resume."""
    prefix = "s3://chimera-test/sweeps"
    data = f"{prefix}-data/shakespeare_char"             # the trials read their shards from s3
    storage.upload_dir(train_char_data, data)
    spec = {"name": "s3sweep", "storage_path": prefix,
            "base": {"data_dir": "/nonexistent/replaced-by-the-flag", "n_layer": 1, "n_embd": 32, "n_head": 4,
                     "block_size": 32, "batch_size": 8, "total_batch_size_str": "8*32",
                     "max_iters": 30, "warmup_steps": 2, "eval_interval": 10, "eval_iters": 2,
                     "log_interval": 10, "ckpt_interval": 1000},
            "space": {"learning_rate": {"grid": [3e-3, 1e-3, 2e-3]}},
            "max_concurrent": 1, "decode_tokens": 4}
    f = tmp_path_factory.mktemp("spec") / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    root = f"{prefix}/s3sweep"
    p = _cli(["--spec", str(f), "--data_dir", data])
    deadline = time.time() + 240
    while not storage.is_file(f"{root}/runs/t000/summary.json"):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "the first trial did not finish"
        time.sleep(1)
    p.send_signal(signal.SIGINT)                       # Ctrl-C: Tune saves its state and stops
    out1, _ = p.communicate(timeout=120)
    done = {t: storage.read_text(f"{root}/runs/{t}/metrics.jsonl") for t in ("t000", "t001", "t002")
            if storage.is_file(f"{root}/runs/{t}/summary.json")}
    p = _cli(["--spec", str(f), "--resume", "--data_dir", data])
    out2, _ = p.communicate(timeout=300)
    return {"root": root, "out1": out1, "out2": out2, "rc2": p.returncode, "done": done,
            "spec": f, "data": data}


def test_interrupted_s3_sweep_resumes_from_the_store(s3_sweep):
    root = s3_sweep["root"]
    assert "t000" in s3_sweep["done"] and len(s3_sweep["done"]) < 3, s3_sweep["out1"][-3000:]
    assert s3_sweep["rc2"] == 0, s3_sweep["out2"][-3000:]
    for t, text in s3_sweep["done"].items():           # finished trials were not trained again
        assert storage.read_text(f"{root}/runs/{t}/metrics.jsonl") == text
    doc = storage.read_json(f"{root}/results.json")
    assert sorted(r["status"] for r in doc["trials"]) == ["finished"] * 3
    assert "trials: 3 finished" in s3_sweep["out2"]
    plan = storage.read_json(f"{root}/sweep.json")
    assert {t["train"]["data_dir"] for t in plan["trials"]} == {s3_sweep["data"]}
    names = set(storage.listdir(root))
    assert {"sweep.json", "results.md", "results.csv", "results.json", "best_layers.jsonl",
            "best_train.yaml", "val_loss_curves.png", "runs"} <= names
    best = doc["trials"][0]["best_checkpoint"]
    assert best.startswith(f"{root}/runs/") and storage.is_file(f"{best}/model.safetensors")
    assert f"checkpoint   {best}" in s3_sweep["out2"]


def test_report_is_read_back_from_s3(s3_sweep, tmp_path):
    root = s3_sweep["root"]
    before = {k: storage.sha256(f"{root}/{k}") for k in ("results.md", "results.json")}
    p = subprocess.run([sys.executable, "jobs/sweep.py", "--report", root], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "trials: 3 finished" in p.stdout and f"{root}/results.md" in p.stdout
    assert storage.sha256(f"{root}/results.json") == before["results.json"]   # same facts again
    local = storage.download_dir(root, tmp_path / "copy")                   # every byte there
    for rel in ("results.json", "best_layers.jsonl", "best_train.yaml"):
        assert storage.sha256(local / rel) == storage.sha256(f"{root}/{rel}")
    flags = yaml.safe_load(storage.read_text(f"{root}/best_train.yaml"))
    assert flags["layer_configs_jsonl"] == f"{root}/best_layers.jsonl"


def test_best_train_yaml_in_s3_retrains_the_winner(s3_sweep):
    """--config s3://.../best_train.yaml (its layer file also in s3) plans the winner's model."""
    from chimera import checkpoint as ckpt
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    root = s3_sweep["root"]
    plan = plan_run(load_train_config({"run_name": "again", "storage_path": "s3://chimera-test/x"},
                                      config_file=f"{root}/best_train.yaml"))
    best = storage.read_json(f"{root}/results.json")["trials"][0]["best_checkpoint"]
    assert plan.model_config == ckpt.read_config(best)


def test_from_sweep_s3_serves_the_winner_checkpoint(s3_sweep):
    from serve.loading import sweep_models
    root = s3_sweep["root"]
    best = storage.read_json(f"{root}/results.json")["trials"][0]
    (name, ck), = sweep_models(root, top_k=1)
    assert name == best["trial_id"] and ck == best["best_checkpoint"]


@pytest.mark.parametrize("args,match", [
    (["--report", "s3://chimera-test/sweeps/none"], "is not a sweep directory"),
    (["--report", "s3:/chimera-test/sweeps"], "looks like a URI without '//'"),
])
def test_bad_sweep_uris_are_refused(s3_sweep, args, match):
    p = subprocess.run([sys.executable, "jobs/sweep.py", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and match in p.stderr, p.stderr


def test_a_second_sweep_into_the_same_s3_dir_is_refused(s3_sweep):
    p = _cli(["--spec", str(s3_sweep["spec"]), "--data_dir", s3_sweep["data"]])
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "pass --resume to continue it" in out
