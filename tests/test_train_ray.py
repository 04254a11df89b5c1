"""Training on a real local Ray cluster (one per session, see conftest.ray_cluster): data
parallelism, DDP sync incl. MoE biases, restart by run name, worker failure recovery,
heterogeneous stacks, W&B offline, early rejection."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
        "--up_dim", "64", "--block_size", "32", "--batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "5", "--eval_iters", "4"]


@pytest.fixture
def train_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import train
    return train.main


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _args(data, tmp_path, name, *extra):
    return ["--data_dir", str(data), "--storage_path", str(tmp_path), "--run_name", name, *extra]


def test_two_workers_hetero_moe_learn_and_stay_in_sync(ray_cluster, train_char_data, tmp_path,
                                                       train_main, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")        # and a W&B offline run directory
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    # MLA+MoE (aux-free) then GQA+MLP from the JSONL file, n_embd overridden small
    rc = train_main(_args(train_char_data, tmp_path, "hetero",
                          "--layer_configs_jsonl", str(ROOT / "configs" / "hetero.jsonl"),
                          "--n_embd", "64", "--block_size", "32", "--batch_size", "8",
                          "--total_batch_size_str", "2*8*32", "--num_workers", "2",
                          "--max_iters", "60", "--learning_rate", "3e-3", "--warmup_steps", "5",
                          "--eval", "--eval_interval", "30", "--eval_iters", "4",
                          "--log_interval", "10", "--save_model", "--ckpt_interval", "30",
                          "--wandb_log", "--wandb_project", "chimera-test"))
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(tmp_path / "hetero")
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert "moe/layer0/maxvio" in evals[-1] and "moe/layer1/maxvio" in evals[-1]
    h = rows[-1]["param_hashes"]                        # parameters + buffers (MoE biases)
    assert len(h) == 2 and h[0] == h[1]
    cfg = json.loads((tmp_path / "hetero" / "checkpoint_000060" / "config.json").read_text())
    assert [l["attn"] for l in cfg["layers"]] == ["mla", "mla", "gqa", "gqa"]
    assert [l["moe"] for l in cfg["layers"]] == [True, True, False, False]
    assert "last checkpoint: " + str(tmp_path / "hetero" / "checkpoint_000060") in out
    assert "best checkpoint: " + str(tmp_path / "hetero" / "llm_model_best") in out
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))




def test_killed_run_restarted_by_name_resumes_and_survives_worker_failure(
        ray_cluster, train_char_data, tmp_path, train_main):
    base = _args(train_char_data, tmp_path, "restart", *TINY, "--total_batch_size_str", "2*8*32",
                 "--num_workers", "2", "--max_iters", "8", "--log_interval", "1",
                 "--save_model", "--ckpt_interval", "4")
    # 1) a worker dies at step 6 and no restarts are allowed: the run fails (exit code 1)
    assert train_main(base + ["--crash_at_step", "6", "--max_failures", "0"]) == 1
    first = _rows(tmp_path / "restart")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    # 2) the same run name again: resumes at its checkpoint (step 4), not at step 0; a worker
    #    killed at step 7 (os._exit) is then recovered by FailureConfig and the run finishes
    assert train_main(base + ["--crash_at_step", "7", "--max_failures", "1"]) == 0
    again = _rows(tmp_path / "restart")[len(first):]
    assert (tmp_path / "restart" / ".crashed_at_7").exists()
    assert [r["step"] for r in again] == [5, 6, 7, 5, 6, 7, 8]
    assert all(r["resumed_from_step"] == 4 for r in again) and again[-1]["done"]
    for r in again:                                    # the same curve from the checkpoint on
        if r["step"] <= 6:
            assert r["loss"] == pytest.approx(first[r["step"] - 1]["loss"], rel=1e-5)
    assert again[0]["loss"] == pytest.approx(again[3]["loss"], rel=1e-5)


@pytest.mark.parametrize("extra,match", [
    (["--total_batch_size_str", "1000"], "not divisible"),
    (["--total_batch_size_str", "__import__('os')"], "Call is not allowed"),
    (["--num_workers", "0"], "num_workers=0 must be >= 1"),
    (["--layer_configs", "[{\"attn\": \"mla\", \"n_kv_heads\": 3}]", "--n_embd", "30"], "model config"),
    (["--layer_configs_jsonl", "/nonexistent.jsonl"], "layer file not found"),
    (["--n_layer", "3", "--layer_configs", "[{}, {}]"], "n_layer=3 but 2 layer configs"),
    (["--resume_from", "/nonexistent"], "not a checkpoint directory"),
])
def test_bad_flags_rejected_before_workers(train_char_data, tmp_path, train_main, capsys, extra, match):
    import ray
    started = ray.is_initialized()
    assert train_main(_args(train_char_data, tmp_path, "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err
    assert ray.is_initialized() == started and not (tmp_path / "bad").exists()


def test_driver_output_has_each_rank0_line_once_and_a_true_summary(ray_cluster, train_char_data,
                                                                   tmp_path):
    """`python jobs/train.py` on 2 workers (the session's cluster, as `ray job submit` would run
    it): every rank-0 log line once, no per-report INFO dump, and without --save_model the last
    line still says where training ended and its losses."""
    import os
    import re
    import subprocess

    import ray
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "jobs/train.py", *TINY,
                          *_args(train_char_data, tmp_path, "logs"), "--num_workers", "2",
                          "--total_batch_size_str", "2*8*32", "--max_iters", "20",
                          "--log_interval", "5", "--eval", "--eval_interval", "10"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for step in (5, 10, 15, 20):
        lines = [ln for ln in text.splitlines() if re.search(rf"\bstep {step}/20\b", ln)]
        assert len(lines) == 1, f"step {step}/20 printed {len(lines)} times:\n" + "\n".join(lines)
    assert len(re.findall(r"step 10: val", text)) == 1
    assert "Reporting training result" not in text
    last = [ln for ln in text.splitlines() if ln.startswith("finished at step")]
    assert len(last) == 1 and re.match(r"finished at step 20: loss \d+\.\d{4}  train_loss \d+\.\d{4}  "
                                       r"val_loss \d+\.\d{4}  best_val_loss \d+\.\d{4}$", last[0]), last


def test_compile_under_a_ray_train_worker_matches_eager(ray_cluster, train_char_data, tmp_path,
                                                        train_main):
    """--compile (torch.compile, inductor) inside a Ray Train worker: same losses as the eager
    in-process run, and the checkpoint holds the plain model's weights (load_model reads it)."""
    from chimera.checkpoint import load_model
    common = [*TINY, "--max_iters", "6", "--log_interval", "2", "--seed", "3"]
    assert train_main(_args(train_char_data, tmp_path, "eager", *common)) == 0
    assert train_main(_args(train_char_data, tmp_path, "compiled", *common, "--compile",
                            "--no-in_process", "--num_workers", "1", "--save_model",
                            "--ckpt_interval", "6")) == 0
    eager, compiled = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [2, 4, 6]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    model, _, _ = load_model(str(tmp_path / "compiled" / "checkpoint_000006"))
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_local_two_worker_run_logs_no_placement_group_cleaner_noise(train_char_data, tmp_path):
    """`python jobs/train.py --num_workers 2` with no cluster: a private Ray instance, without
    Ray Train's PlacementGroupCleaner (whose state-API checks fail every second there)."""
    import os
    import subprocess
    env = {**os.environ, "RAY_ADDRESS": "local"}
    out = subprocess.run([sys.executable, "jobs/train.py", *TINY,
                          *_args(train_char_data, tmp_path, "local2"), "--num_workers", "2",
                          "--total_batch_size_str", "2*8*32", "--max_iters", "4",
                          "--log_interval", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Started a local Ray instance" in text and "world 2" in text
    assert "PlacementGroupCleaner" not in text and "Failed to query" not in text, text[-3000:]
    assert [ln for ln in text.splitlines() if ln.startswith("finished at step 4: loss ")]
