"""A tiny scaling ladder on the session's local Ray cluster: 3 sizes × 2 attention types, trained
for the steps their budgets give, fitted, predicted at a target, plotted."""
from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_tiny_ladder_trains_each_rung_for_its_budget_and_predicts_the_target(ray_cluster, train_char_data,
                                                                            tmp_path):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand

    spec = SweepSpec(
        name="ladder", storage_path=str(tmp_path),
        base={"data_dir": str(train_char_data), "n_head": 4, "block_size": 32, "batch_size": 8,
              "total_batch_size_str": "8*32", "learning_rate": 1e-2, "warmup_steps": 2,
              "eval_interval": 1000, "eval_iters": 2, "log_interval": 1000, "ckpt_interval": 1000,
              "n_layer": 2},
        layers={"groups": [2], "attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2},
                                        "mla": {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16,
                                                "rope_head_dim": 4}}},
        ladder={"sizes": [{"n_embd": 16, "n_layer": 1, "up_dim": 32}, {"n_embd": 24, "n_layer": 1, "up_dim": 48},
                          {"n_embd": 32, "n_layer": 2, "up_dim": 64}],
                "tokens_per_param": 0.5, "target_flops": 1e11},
        max_concurrent=2, decode_tokens=4)
    plan = expand(spec)
    assert len(plan.trials) == 6 and all(t.train["max_iters"] <= 80 for t in plan.trials)
    rep = run_sweep(plan, verbose=0)
    root = tmp_path / "ladder"
    assert rep["counts"]["finished"] == 6, rep["table"]

    doc = json.loads((root / "results.json").read_text())
    for t in plan.trials:                    # each trial trained exactly its rung's budget
        s = json.loads((root / "runs" / t.name / "summary.json").read_text())
        assert s["step"] == t.ladder["steps"] and s["tokens"] == t.ladder["tokens"]
        assert s["flops_per_token"] == t.ladder["flops_per_token"]      # as the model reports it
    sec = doc["ladder"]
    assert {f["config"] for f in sec["fits"]} == {"g0.attn=gqa2", "g0.attn=mla"}
    for f in sec["fits"]:
        assert f["n_fit"] == 3 and f["method"].startswith("none (3 points")
        pts = sorted(f["points"], key=lambda p: p["flops"])
        assert [p["loss"] for p in pts] == [next(r for r in doc["trials"] if r["trial_id"] == p["trial"])["val_loss"]
                                            for p in pts]
        assert math.isfinite(f["predicted"]["value"]) and 0 <= f["E"]["value"] <= min(p["loss"] for p in pts)
    assert sec["winner"]["config"] in {"g0.attn=gqa2", "g0.attn=mla"}
    md = (root / "results.md").read_text()
    assert "## Scaling ladder" in md and f"predicted winner at 1e+11 FLOPs: {sec['winner']['config']}" in md
    png = (root / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert str(root / "scaling.png") in rep["files"]
