"""Training without Ray: batch expressions, lr schedule, config validation, the in-process loop,
checkpoint round trip and resume, the Trainer's hooks, fault injection and in-process context."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from chimera.train.batchexpr import BatchExprError, parse_batch_expr
from chimera.checkpoint import load_train_state, load_weights, read_config
from chimera.train.schedule import lr_at
from chimera.train.config import TrainConfigError, load_train_config
from chimera.train.plan import plan_run
from chimera.train.loop import train_fn_per_worker
from chimera.train.context import InProcess, worker_context
from chimera.train.faults import CrashAtStep
from chimera.train.hooks import Hook
from chimera.train.measure import state_hash
from chimera.train.trainer import Trainer

TINY = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=32,
            batch_size=8, total_batch_size_str="8*32", learning_rate=3e-3, warmup_steps=5,
            eval_iters=4, num_threads=1)


def _plan(data, tmp_path, **kw):
    d = {**TINY, "data_dir": str(data), "storage_path": str(tmp_path / "runs"), **kw}
    return plan_run(load_train_config(d))


# --- batch expressions ----------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("2**13", 8192), ("8*1024", 8192), ("(4+4)*2**10", 8192),
                                        ("1024//2", 512), ("  512 ", 512), ("-(-3)", 3), (64, 64)])
def test_batchexpr_values(text, value):
    assert parse_batch_expr(text) == value


@pytest.mark.parametrize("text,match", [
    ("__import__('os').system('x')", "Call is not allowed"), ("2.5*4", "not an integer"),
    ("8/2", "Div is not allowed"), ("a*2", "Name is not allowed"), ("2**1000", "too large"),
    ("", "expected an integer"), ("0", "positive"), ("1-2", "positive"), ("2**", "not a valid"),
    ("True*8", "not an integer"), ("4//0", "division by zero"), ("2 % 3", "Mod is not allowed"),
    ("[1][0]", "Subscript is not allowed")])
def test_batchexpr_rejects(text, match):
    with pytest.raises(BatchExprError, match=match):
        parse_batch_expr(text)


# --- schedule --------------------------------------------------------------------------------
def test_schedule_warmup_then_cosine_to_ten_percent():
    lr = [lr_at(s, 1e-3, 10, 100) for s in range(120)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))
    assert lr[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[10:100], lr[11:101]))
    assert lr[55] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr[100] == pytest.approx(1e-4) and lr[119] == pytest.approx(1e-4)


# --- config validation ----------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"n_heads": 4}, "unknown key 'n_heads' \\(did you mean 'n_head'\\?\\)"),
    ({"lr": 1.0}, "unknown key 'lr'"),
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0 must be > 0"),
    ({"max_iters": "ten"}, "max_iters='ten' must be of type int"),
    ({"total_batch_size_str": "2**x"}, "Name is not allowed"),
    ({"layer_configs": "[]", "layer_configs_jsonl": "f.jsonl"}, "at most one of"),
    ({"max_failures": -2}, "max_failures=-2"),
])
def test_config_rejects(kw, match):
    with pytest.raises(TrainConfigError, match=match):
        load_train_config(kw)


def test_config_file_with_cli_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_iters: 7\nn_embd: 48\nlearning_rate: 1e-3\n")
    tc = load_train_config({"max_iters": 9}, f)
    assert (tc.max_iters, tc.learning_rate, tc.model) == (9, 1e-3, {"n_embd": 48})
    f.write_text("max_iter: 7\n")
    with pytest.raises(TrainConfigError, match="did you mean 'max_iters'"):
        load_train_config({}, f)


def test_plan_checks(train_char_data, tmp_path):
    p = _plan(train_char_data, tmp_path)
    assert p.model_config["vocab_size"] == 128 and p.grad_accum == 1         # 65 padded to 64k
    assert p.run_name == _plan(train_char_data, tmp_path).run_name              # deterministic
    assert _plan(train_char_data, tmp_path, total_batch_size_str="4*8*32").grad_accum == 4
    with pytest.raises(TrainConfigError, match="not divisible by batch_size\\*block_size\\*num_workers"
                                               " = 8\\*32\\*3 = 768"):
        _plan(train_char_data, tmp_path, num_workers=3, total_batch_size_str="1024")
    with pytest.raises(TrainConfigError, match="data_dir .* does not exist"):
        _plan(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainConfigError, match="manifest"):
        _plan(tmp_path / "empty", tmp_path)
    with pytest.raises(TrainConfigError, match="model config: .*n_head=3"):
        _plan(train_char_data, tmp_path, n_head=3)
    with pytest.raises(TrainConfigError, match="vocab_size=32 is smaller"):
        _plan(train_char_data, tmp_path, vocab_size=32)


def test_main_rejects_before_workers(train_char_data, tmp_path, capsys):
    import train as train_job  # jobs/ is on sys.path via the fixture below
    base = ["--data_dir", str(train_char_data), "--storage_path", str(tmp_path)]
    assert train_job.main(base + ["--total_batch_size_str", "2**13+1"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert train_job.main(base + ["--layer_configs", "[{}]", "--layer_configs_jsonl", "x"]) == 2
    assert "at most one" in capsys.readouterr().err
    assert train_job.main(["--data_dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_job.main(base + ["--max_iters", "many"])
    assert e.value.code == 2


def test_where_jobs_train_runs(train_char_data, tmp_path, monkeypatch, object_store):
    """One worker, no restarts, local storage, no cluster: in this process; anything else (or
    --no-in_process): Ray Train. --in_process cannot run what needs Ray Train."""
    from chimera.train.loop import runs_in_process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_in_process(_plan(train_char_data, tmp_path))
    assert not runs_in_process(_plan(train_char_data, tmp_path, in_process=False))
    assert not runs_in_process(_plan(train_char_data, tmp_path, num_workers=2,
                                     total_batch_size_str="2*8*32"))
    assert not runs_in_process(_plan(train_char_data, tmp_path, max_failures=1))
    assert not runs_in_process(_plan(train_char_data, tmp_path, storage_path="s3://chimera-test/where"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")              # as `ray job submit` sets it
    assert not runs_in_process(_plan(train_char_data, tmp_path))
    assert runs_in_process(_plan(train_char_data, tmp_path, in_process=True))
    with pytest.raises(TrainConfigError, match="in_process runs one worker without restarts"):
        _plan(train_char_data, tmp_path, in_process=True, max_failures=2)


def test_in_process_job_resumes_by_run_name_without_importing_ray(train_char_data, tmp_path):
    """jobs/train.py in this process, twice with the same run name: the second run continues
    from the first's latest checkpoint, as a Ray Train run would; Ray is never imported."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    args = ["--data_dir", str(train_char_data), "--storage_path", str(tmp_path), "--run_name", "again",
            "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
            "--block_size", "32", "--batch_size", "8", "--total_batch_size_str", "8*32",
            "--log_interval", "2", "--save_model", "--ckpt_interval", "4"]
    code = ("import sys; sys.path.insert(0, 'jobs'); import train; rc = train.main(sys.argv[1:]); "
            "print('ray imported:', 'ray' in sys.modules); sys.exit(rc)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    for iters in ("6", "10"):
        out = subprocess.run([sys.executable, "-c", code, *args, "--max_iters", iters], cwd=root,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "(in this process," in out.stdout and "ray imported: False" in out.stdout
    assert "resumed from step 6" in out.stdout and "finished at step 10" in out.stdout
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]                 # no step of the first run trained twice
    assert sorted(p.name for p in (tmp_path / "again").glob("checkpoint_*")) == [
        "checkpoint_000004", "checkpoint_000006", "checkpoint_000008", "checkpoint_000010"][-3:]


# --- the loop, in-process (world size 1) ------------------------------------------------------
def test_in_process_training_loss_falls(train_char_data, tmp_path):
    p = _plan(train_char_data, tmp_path, max_iters=60, eval=True, eval_interval=30, log_interval=10)
    s = train_fn_per_worker(p.worker_config)
    evals = [h for h in s["history"] if "val_loss" in h]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0          # ~4.9 -> ~3.3
    logs = [h for h in s["history"] if "loss" in h]
    for k in ("lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"):
        assert all(math.isfinite(h[k]) for h in logs), k


def test_checkpoint_round_trip_and_resume(train_char_data, tmp_path):
    kw = dict(max_iters=20, log_interval=1, save_model=True, ckpt_interval=10, keep_checkpoints=5,
              n_layer=2, moe=True, aux_free=True, n_exp=4, n_shared=1, n_act=2, dropout=0.1)
    a = _plan(train_char_data, tmp_path, run_name="a", **kw)
    sa = train_fn_per_worker(a.worker_config)
    c10 = tmp_path / "runs" / "a" / "checkpoint_000010"
    assert sorted(f.name for f in c10.iterdir()) == ["config.json", "meta.json", "model.safetensors",
                                                      "tokenizer.json", "train_state.pt"]
    st = load_train_state(c10)                        # weights_only=True inside
    assert st["step"] == 10 and st["loader"]["position"] == 80 and len(st["rng"]) == 1
    from models import LLM, ModelConfig
    m = LLM(ModelConfig.from_dict(read_config(c10)))
    load_weights(m, c10)
    assert any(b.abs().sum() > 0 for n, b in m.named_buffers() if n.endswith("bias"))  # MoE bias
    assert json.loads((c10 / "tokenizer.json").read_text())["vocab_size"] == 65

    b = _plan(train_char_data, tmp_path, run_name="b", resume_from=str(c10), **kw)
    sb = train_fn_per_worker(b.worker_config)
    assert sb["resumed_from_step"] == 10 and [h["step"] for h in sb["history"]] == list(range(11, 21))
    la = {h["step"]: h["loss"] for h in sa["history"]}
    for h in sb["history"]:                            # the same loss curve, step for step
        assert h["loss"] == pytest.approx(la[h["step"]], rel=1e-5), h["step"]
    m20a, m20b = (LLM(ModelConfig.from_dict(a.model_config)) for _ in range(2))
    load_weights(m20a, tmp_path / "runs" / "a" / "checkpoint_000020")
    load_weights(m20b, tmp_path / "runs" / "b" / "checkpoint_000020")
    assert state_hash(m20a) == state_hash(m20b)


def test_resume_from_rejects_other_model(train_char_data, tmp_path):
    a = _plan(train_char_data, tmp_path, run_name="a", max_iters=2, save_model=True, ckpt_interval=2)
    train_fn_per_worker(a.worker_config)
    c = tmp_path / "runs" / "a" / "checkpoint_000002"
    with pytest.raises(TrainConfigError, match="model config differs"):
        _plan(train_char_data, tmp_path, n_embd=64, resume_from=str(c))
    with pytest.raises(TrainConfigError, match="not a checkpoint directory"):
        _plan(train_char_data, tmp_path, resume_from=str(tmp_path))


# --- the Trainer's pieces: hooks, fault injection, the in-process context ----------------------
class _Recorder(Hook):
    def __init__(self):
        self.before, self.after = [], []

    def before_step(self, trainer, step):
        self.before.append(step)

    def on_step(self, trainer, step, metrics):
        self.after.append((step, metrics))


def test_a_hook_sees_every_step_and_the_row_recorded_there(train_char_data, tmp_path):
    p = _plan(train_char_data, tmp_path, max_iters=7, log_interval=3, eval=True, eval_interval=5)
    rec = _Recorder()
    s = train_fn_per_worker(p.worker_config, hooks=[rec])
    assert rec.before == list(range(7)) and [st for st, _ in rec.after] == list(range(1, 8))
    rows = {h["step"]: h for h in s["history"]}                      # step 0: the first eval
    assert [st for st, m in rec.after if m] == [3, 5, 6, 7]
    assert all(m is rows[st] if m else st not in rows for st, m in rec.after)


class _Exit(Exception):
    pass


def _fake_exit(code):
    raise _Exit(code)


def test_crash_at_step_exits_once_per_run(train_char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "_exit", _fake_exit)
    p = _plan(train_char_data, tmp_path, run_name="c", max_iters=5, log_interval=1, crash_at_step=3)
    with pytest.raises(_Exit) as e:
        train_fn_per_worker(p.worker_config)
    assert e.value.args == (1,) and "rank 0: injected crash at step 3" in capsys.readouterr().out
    run = tmp_path / "runs" / "c"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in rows] == [1, 2, 3]
    assert (run / ".crashed_at_3").exists()
    assert train_fn_per_worker(p.worker_config)["step"] == 5          # the same run again: passes 3


def test_crash_hook_fires_on_the_last_rank_only(tmp_path, monkeypatch):
    """(its marker goes through chimera.storage: tests/test_storage_ray.py crashes a run on s3)"""
    monkeypatch.setattr(os, "_exit", _fake_exit)
    hook = CrashAtStep(4)
    for rank, world, step in [(0, 2, 4), (1, 2, 3), (0, 1, 3)]:
        hook.before_step(SimpleNamespace(rank=rank, world=world, run_dir=str(tmp_path)), step)  # no crash
    assert not list(tmp_path.iterdir())
    last = SimpleNamespace(rank=1, world=2, run_dir=str(tmp_path))
    with pytest.raises(_Exit):
        hook.before_step(last, 4)
    hook.before_step(last, 4)                                          # once: the marker is there
    assert [f.name for f in tmp_path.iterdir()] == [".crashed_at_4"]


def test_in_process_context_copies_and_prunes_checkpoints(tmp_path):
    run = tmp_path / "run"
    ctx = worker_context(str(run), keep_checkpoints=2)                 # no Ray Train here
    assert isinstance(ctx, InProcess) and (ctx.rank, ctx.world) == (0, 1)
    assert ctx.device(use_gpu=False) == torch.device("cpu")
    m = torch.nn.Linear(2, 2)
    assert ctx.prepare_model(m) is m and ctx.latest_checkpoint() is None and ctx.node_id() is None
    ctx.report({"step": 1})                                            # metrics alone go nowhere
    assert not run.exists()
    src = tmp_path / "tmp"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for step in (1, 2, 3):
        ctx.report({"step": step}, checkpoint=str(src), name=f"checkpoint_{step:06d}")
    assert sorted(f.name for f in run.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    assert (run / "checkpoint_000003" / "config.json").read_text() == "{}"


class _Reports(InProcess):
    def __init__(self, *a):
        super().__init__(*a)
        self.calls = []

    def report(self, metrics, checkpoint=None, name=None):
        self.calls.append((metrics["step"], name, "val_loss" in metrics))
        super().report(metrics, checkpoint, name)


def test_ray_sees_checkpoints_and_evals_only_when_asked(train_char_data, tmp_path):
    """Each report is a barrier over the workers under Ray Train: the Trainer reports every
    checkpoint, and eval rows only with report_evals (a sweep's Train trial); metrics.jsonl
    keeps every row either way, and result.json the summary that fit() returns."""
    p = _plan(train_char_data, tmp_path, max_iters=6, log_interval=2, eval=True, eval_interval=3,
              save_model=True, ckpt_interval=4)
    ctx = _Reports(p.run_dir, p.train.keep_checkpoints)
    s = Trainer(p.worker_config, ctx).run()
    assert [h["step"] for h in s["history"]] == [0, 2, 3, 4, 6]
    assert ctx.calls == [(4, "checkpoint_000004", True), (6, "checkpoint_000006", True)]
    run = tmp_path / "runs" / p.run_name
    assert sorted(f.name for f in run.iterdir()) == ["checkpoint_000004", "checkpoint_000006",
                                                     "llm_model_best", "metrics.jsonl", "result.json"]
    result = json.loads((run / "result.json").read_text())             # what fit() returns
    assert result["step"] == 6 and result["metrics"] == s["metrics"]
    assert result["last_checkpoint"] == s["last_checkpoint"] and result["best_checkpoint"] == s["best_checkpoint"]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 2, 3, 4, 6]
    assert s["last_checkpoint"] == f"{run}/checkpoint_000006"

    q = _plan(train_char_data, tmp_path, max_iters=6, log_interval=2, eval=True, eval_interval=3,
              save_model=True, ckpt_interval=4, run_name="evals")
    ctx = _Reports(q.run_dir, q.train.keep_checkpoints)
    Trainer({**q.worker_config, "report_evals": True}, ctx).run()
    assert ctx.calls == [(0, None, True), (3, None, True), (4, "checkpoint_000004", True),
                         (6, "checkpoint_000006", True)]

    r = _plan(train_char_data, tmp_path, max_iters=6, log_interval=2, run_name="plain")
    ctx = _Reports(r.run_dir, r.train.keep_checkpoints)
    s = Trainer(r.worker_config, ctx).run()
    assert ctx.calls == []                              # no checkpoints, no evals asked: nothing
    assert s["metrics"]["step"] == 6 and s["metrics"]["done"] is True
    result = json.loads((tmp_path / "runs" / "plain" / "result.json").read_text())
    assert result["step"] == 6 and result["metrics"]["loss"] == s["metrics"]["loss"]


@pytest.fixture(autouse=True)
def _jobs_on_path(monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "jobs"))
