"""`python jobs/bench.py train`: bad arguments exit with code 2 before any data or Ray work;
its timed worker stamps log steps through a hook (no timing is asserted here; the benchmark
itself is run by hand, see docs/benchmarks.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import bench
    return bench.main


def test_bad_skip_value_is_a_usage_error(bench_main, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["train", "--skip", "bogus"])
    assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--n_layer", "-2"], "--n_layer must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--max_iters", "0"], "--max_iters must be >= 1"),
    (["--threads", "0", "--skip", "dp"], "--threads must be >= 1"),
    (["--threads", "1"], "the dp section needs --threads >= 2"),
    (["--steps", "3", "--log_interval", "5"], "--steps (3) must be >= --log_interval (5)"),
    (["--target_loss", "-1"], "--target_loss must be > 0"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--n_embd", "65"], "not divisible by n_head"),
    (["--skip", "tax", "startup", "overhead", "dp", "quality"], "nothing to measure"),
    (["--tax_from", "150"], "--tax_from (150) must be a multiple of 100"),
    (["--tax_iters", "250", "--tax_from", "200"], "--tax_iters (250) at least 100 more"),
])
def test_bad_values_exit_2_with_a_message(bench_main, capsys, argv, message):
    assert bench_main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_missing_data_exits_2(bench_main, capsys, tmp_path):
    assert bench_main(["train", "--data_dir", str(tmp_path / "nope")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert bench_main(["train", "--source", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_timed_worker_stamps_every_log_step_through_a_hook(train_char_data, tmp_path):
    import json

    from chimera.benchmarks.train import timed_worker
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    plan = plan_run(load_train_config({
        "data_dir": str(train_char_data), "storage_path": str(tmp_path), "run_name": "t",
        "n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32, "batch_size": 4,
        "total_batch_size_str": "4*32", "max_iters": 6, "log_interval": 2, "num_threads": 1}))
    timed_worker(plan.worker_config)
    stamps = json.loads((tmp_path / "t.stamps.json").read_text())
    assert [s for s, _ in stamps] == [2, 4, 6]
    assert all(a[1] < b[1] for a, b in zip(stamps, stamps[1:]))


def test_bare_loop_trains_the_platform_s_model_the_same_way(train_char_data, tmp_path):
    """The benchmark's bare loop is the platform's recipe without the platform: same init,
    data order, optimizer and evaluation give the same losses as the in-process Trainer."""
    from chimera.benchmarks.bare import run
    from chimera.train.config import load_train_config
    from chimera.train.loop import train_fn_per_worker
    from chimera.train.plan import plan_run
    model = {"n_layer": 2, "n_embd": 32, "n_head": 4, "attn": "mha", "block_size": 32,
             "up_dim": 64, "pos_emb": "learn", "non_linearity": "gelu", "norm": "layernorm"}
    recipe = dict(batch_size=4, learning_rate=1e-3, warmup_steps=3, weight_decay=0.1, beta1=0.9,
                  beta2=0.99, grad_clip=1.0, seed=7)
    out = run(str(train_char_data), model, recipe["batch_size"], recipe["learning_rate"],
              recipe["warmup_steps"], 10, 5, 2, recipe["weight_decay"], recipe["beta1"],
              recipe["beta2"], recipe["grad_clip"], recipe["seed"])
    plan = plan_run(load_train_config({**model, **recipe, "data_dir": str(train_char_data),
                                       "total_batch_size_str": "4*32", "max_iters": 10,
                                       "eval": True, "eval_interval": 5, "eval_iters": 2,
                                       "storage_path": str(tmp_path), "run_name": "same"}))
    s = train_fn_per_worker(plan.worker_config)
    platform = [(r["step"], r["val_loss"]) for r in s["history"] if "val_loss" in r]
    assert [st for st, _ in platform] == [st for st, _, _ in out["evals"]] == [0, 5, 10]
    for (_, a), (_, b, _) in zip(platform, out["evals"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert [st for st, _ in out["stamps"]] == [10] and out["first_step_s"] > 0
