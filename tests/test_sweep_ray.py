"""Sweeps on the session's local Ray cluster: end to end, ASHA, budgets, failures, resume."""
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

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
MLA = {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4}
MOE = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True}


def base(data: Path, **kw) -> dict:
    return {"data_dir": str(data), "n_embd": 32, "n_head": 4, "block_size": 32, "batch_size": 8,
            "total_batch_size_str": "8*32", "max_iters": 30, "warmup_steps": 2, "eval_interval": 10,
            "eval_iters": 2, "log_interval": 10, "ckpt_interval": 1000, **kw}


def test_sweep_end_to_end_with_budget_asha_rejections_and_report(ray_cluster, train_char_data, tmp_path):
    from chimera import checkpoint as ckpt
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run

    spec = SweepSpec(
        name="e2e", storage_path=str(tmp_path), base=base(train_char_data),
        layers={"groups": [2], "attn": {"mla": MLA, "bad": {"attn": "gqa", "n_kv_heads": 3}},
                "ffn": {"mlp": {"moe": False}, "moe": MOE}},
        # the good learning rate comes first in the grid, so ASHA has a rung to compare with
        space={"learning_rate": {"grid": [3e-3, 1e-5]}},
        budget={"active_params": 40_000, "tolerance": 0.02},
        scheduler={"type": "asha", "time_attr": "step", "grace_period": 10, "reduction_factor": 2},
        max_concurrent=1, decode_tokens=8)
    plan = expand(spec)
    assert len(plan.trials) == 4 and len(plan.rejected) == 4
    rep = run_sweep(plan, verbose=0)
    root = tmp_path / "e2e"

    assert rep["counts"]["rejected"] == 4 and rep["counts"]["failed"] == 0
    doc = json.loads((root / "results.json").read_text())
    rows = doc["trials"]
    assert len(rows) == 4 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    losses = [r["best_val_loss"] for r in rows]
    assert losses == sorted(losses)
    assert all("n_head=4 is not divisible by n_kv_heads=3" in r["error"] for r in doc["rejected"])
    # equal active parameters on every trial, as the trial itself measured them
    assert all(abs(r["params_active"] / 40_000 - 1) <= 0.02 for r in rows)
    assert {r["arch"] for r in rows} == {"2×[mla+mlp]", "2×[mla+moe4/2]"}
    # ASHA: the tiny learning rate gets stopped at the first rung, good ones run to the end
    stopped = [r for r in rows if r["status"] == "stopped"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert stopped and finished and len(stopped) + len(finished) == 4
    assert all(r["step"] < 30 for r in stopped) and all(r["step"] == 30 for r in finished)
    slow = [r for r in rows if r["choices"]["learning_rate"] == 1e-5]
    assert len(slow) == 2 and all(r["status"] == "stopped" and r["step"] == 10 for r in slow)
    assert next(r for r in rows if r["trial_id"] == "t000")["status"] == "finished"
    for r in rows:
        for k in ("val_loss", "train_loss", "tokens_per_s", "mfu", "params_total", "kv_bytes_per_token"):
            assert isinstance(r[k], (int, float)), (k, r)
        assert r["decode_tokens_per_s"] > 0
        if "moe" in r["arch"]:
            assert r["moe_maxvio"] >= 0
    # the report: table, CSV, plots, and a best config that jobs/train.py accepts as is
    table = (root / "results.md").read_text()
    assert "2×[mla+moe4/2]" in table and "rejected" in table and "best val" in table
    assert len((root / "results.csv").read_text().splitlines()) == 1 + 4 + 4
    for png in ("val_loss_curves.png", "pareto.png"):
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    best = rep["best"]
    assert best["trial"] == rows[0]["trial_id"] and Path(best["checkpoint"]).is_dir()
    again = plan_run(load_train_config({"storage_path": str(tmp_path / "retrain")}, best["train_config"]))
    assert again.model_config == ckpt.read_config(best["checkpoint"])
    assert (root / "best_layers.jsonl").read_text().count("\n") == 2


def test_a_failing_trial_leaves_the_others_finished(ray_cluster, train_char_data, tmp_path):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand

    spec = SweepSpec(name="fail", storage_path=str(tmp_path),
                     base=base(train_char_data, n_layer=1, max_iters=12, eval_interval=6),
                     space={"crash_at_step": {"grid": [0, 4]}},     # the second trial's worker dies
                     max_concurrent=2, decode_tokens=4)
    rep = run_sweep(expand(spec), verbose=0)
    rows = {r["trial_id"]: r for r in json.loads((tmp_path / "fail" / "results.json").read_text())["trials"]}
    assert rows["t000"]["status"] == "finished" and rows["t000"]["step"] == 12
    assert rows["t001"]["status"] == "failed" and rows["t001"]["error"]
    assert rep["counts"] == {"finished": 1, "stopped": 0, "failed": 1, "not run": 0, "rejected": 0}


def _cli(args: list[str], **kw) -> subprocess.Popen:
    import ray
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, train_char_data, tmp_path):
    spec = {"name": "resume", "storage_path": str(tmp_path),
            "base": base(train_char_data, n_layer=1, max_iters=40, eval_interval=10),
            "space": {"learning_rate": {"grid": [1e-3, 2e-3, 3e-3]}},
            "max_concurrent": 1, "decode_tokens": 4}
    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "resume" / "runs"
    p = _cli(["--spec", str(f)])
    deadline = time.time() + 240
    while not (runs / "t000" / "summary.json").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "the first trial did not finish"
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)                       # Ctrl-C: Tune saves its state and stops
    out1, _ = p.communicate(timeout=120)
    done = {t: (runs / t / "metrics.jsonl").read_text() for t in ("t000", "t001", "t002")
            if (runs / t / "summary.json").exists()}
    assert "t000" in done and len(done) < 3, out1[-3000:]

    p = _cli(["--spec", str(f)])                       # without --resume: refused, nothing touched
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "pass --resume to continue it" in out

    p = _cli(["--spec", str(f), "--resume"])
    out2, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out2[-3000:]
    for t, text in done.items():                       # finished trials were not trained again
        assert (runs / t / "metrics.jsonl").read_text() == text
    rows = json.loads((tmp_path / "resume" / "results.json").read_text())["trials"]
    assert sorted(r["status"] for r in rows) == ["finished"] * 3, out2[-3000:]
    assert "trials: 3 finished" in out2


def test_trials_on_ray_train_workers_report_what_in_process_trials_report(ray_cluster, train_char_data,
                                                                          tmp_path):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand

    rows = {}
    for workers in (1, 2):
        spec = SweepSpec(name=f"w{workers}", storage_path=str(tmp_path),
                         base=base(train_char_data, n_layer=1, max_iters=10, eval_interval=5,
                                   total_batch_size_str="2*8*32"),
                         layers={"attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2}},
                                 "ffn": {"moe": MOE}},
                         resources={"num_workers": workers, "cpus_per_worker": 1}, decode_tokens=4)
        rep = run_sweep(expand(spec), verbose=0)
        assert rep["counts"]["finished"] == 1, rep["table"]
        rows[workers] = json.loads((tmp_path / f"w{workers}" / "results.json").read_text())["trials"][0]
        summary = json.loads((tmp_path / f"w{workers}" / "runs" / "t000" / "summary.json").read_text())
        rows[workers]["summary_keys"] = {k for k in summary if not k.startswith("moe/")}
        assert summary["world_size"] == workers
    one, two = rows[1], rows[2]
    assert one["summary_keys"] == two["summary_keys"]
    for k in ("val_loss", "best_val_loss", "tokens_per_s", "mfu", "moe_maxvio", "decode_tokens_per_s",
              "params_active", "kv_bytes_per_token"):
        assert isinstance(two[k], (int, float)) and isinstance(one[k], (int, float)), k
    assert one["params_total"] == two["params_total"] and one["step"] == two["step"] == 10
    assert two["best_checkpoint"] and Path(two["best_checkpoint"], "model.safetensors").is_file()
