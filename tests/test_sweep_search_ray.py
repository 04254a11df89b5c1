"""Searcher sweeps on the session's local Ray cluster: Optuna's TPE and the evolutionary search
each run 6 tiny trials chosen as the sweep runs, with three objectives and the Pareto report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
GQA2 = {"attn": "gqa", "n_kv_heads": 2}
MLA = {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4}
BAD = {"attn": "gqa", "n_kv_heads": 3}                       # n_head=4 is not divisible by 3
MOE = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True, "up_dim": 64}
OBJECTIVES = {"val_loss": "min", "kv_bytes_per_token": "min", "decode_tokens_per_s": "max"}


def _sweep(search: str, data: Path, tmp_path: Path, **kw):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand

    spec = SweepSpec(
        name=search, storage_path=str(tmp_path), search=search, num_samples=6, population=4, seed=1,
        objectives=OBJECTIVES,
        base={"data_dir": str(data), "n_layer": 3, "n_embd": 32, "n_head": 4, "block_size": 32,
              "batch_size": 8, "total_batch_size_str": "8*32", "max_iters": 10, "warmup_steps": 2,
              "eval_interval": 5, "eval_iters": 2, "log_interval": 5, "ckpt_interval": 1000},
        layers={"groups": [2, 1], "attn": {"gqa2": GQA2, "mla": MLA, "bad": BAD},
                "ffn": {"mlp": {"moe": False}, "moe": MOE}},
        space={"learning_rate": {"loguniform": [1e-3, 1e-2]}},
        max_concurrent=2, decode_tokens=4, **kw)
    plan = expand(spec)
    assert plan.trials == []                  # chosen while the sweep runs
    rep = run_sweep(plan, verbose=0)
    root = tmp_path / search
    doc = json.loads((root / "results.json").read_text())
    saved = json.loads((root / "sweep.json").read_text())
    return rep, root, doc, saved


def _checks(rep, root, doc, saved):
    rows = doc["trials"]
    assert rep["counts"]["finished"] == 6 and rep["counts"]["failed"] == 0, rep["table"]
    assert sorted(r["trial_id"] for r in rows) == [f"t{i:03d}" for i in range(6)]
    # every trial resolved like a fixed one: its model in sweep.json, the budget triad measured
    assert [t["name"] for t in saved["trials"]] == [f"t{i:03d}" for i in range(6)]
    assert all(t["model_config"]["layers"] and len(t["model_config"]["layers"]) == 3 for t in saved["trials"])
    for r in rows:
        for k in ("best_val_loss", "kv_bytes_per_token", "decode_tokens_per_s", "params_active"):
            assert isinstance(r[k], (int, float)), (k, r)
        assert r["pareto_rank"] is not None and r["pareto_rank"] >= 0
    front = [r for r in rows if r["pareto_rank"] == 0]
    assert front
    for r in rows:                             # nothing on the front is dominated by another trial
        if r["pareto_rank"] == 0:
            assert not any(o["best_val_loss"] <= r["best_val_loss"] and o["kv_bytes_per_token"]
                           <= r["kv_bytes_per_token"] and o["decode_tokens_per_s"] >= r["decode_tokens_per_s"]
                           and o is not r and (o["best_val_loss"], o["kv_bytes_per_token"],
                                               o["decode_tokens_per_s"]) != (r["best_val_loss"],
                                                                             r["kv_bytes_per_token"],
                                                                             r["decode_tokens_per_s"])
                           for o in rows)
    md = (root / "results.md").read_text()
    assert "## Pareto front" in md and f"{len(front)} of 6 trials" in md
    for png in ("pareto_front.png", "pareto.png", "val_loss_curves.png"):
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    # rejected suggestions (the `bad` attention) are listed with their reason, never launched
    assert all("not divisible by n_kv_heads=3" in x["error"] for x in doc["rejected"])
    assert all(x["choices"]["g0.attn"] == "bad" or x["choices"]["g1.attn"] == "bad" for x in doc["rejected"])
    assert all(ld.get("n_kv_heads") != 3 for t in saved["trials"] for ld in t["model_config"]["layers"])


def test_optuna_search_runs_six_trials_and_reports_the_pareto_front(ray_cluster, train_char_data, tmp_path):
    rep, root, doc, saved = _sweep("optuna", train_char_data, tmp_path)
    _checks(rep, root, doc, saved)
    assert all(1e-3 <= t["choices"]["learning_rate"] <= 1e-2 for t in saved["trials"])


def test_evolution_search_breeds_one_change_children_and_reports_the_pareto_front(ray_cluster, train_char_data,
                                                                                 tmp_path):
    rep, root, doc, saved = _sweep("evolution", train_char_data, tmp_path)
    _checks(rep, root, doc, saved)
    trials = [t["choices"] for t in saved["trials"]]
    assert trials[0]["layers.groups"] == [2, 1]
    # after the 4 random trials, each child is one change away from an earlier trial
    for i, c in enumerate(trials[4:], start=4):
        assert any(sum(p[k] != c[k] for k in c) == 1 for p in trials[:i]), (c, trials[:i])
    assert len({json.dumps(c, sort_keys=True) for c in trials}) == 6
