"""A sweep across tokenizers on the session's local Ray cluster: each trial trains on its own
data folder, reports val_bpb to Tune, and the report ranks the trials by bits per byte."""
from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_sweep_over_tokenizers_is_ranked_by_bits_per_byte(ray_cluster, shakespeare_path, tmp_path):
    from chimera.data.prepare import prepare
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.trials import expand

    src = tmp_path / "text.txt"
    src.write_text(shakespeare_path.read_text()[:30000] + "½ ∞ café\n")   # a few multi-byte chars
    dirs = {}
    for t in ("char", "byte"):
        dirs[t] = tmp_path / f"shakespeare_{t}"
        prepare("shakespeare", sources=[src], tokenizer=t, out=dirs[t], progress=False,
                log=lambda *_: None)
    spec = SweepSpec(
        name="bpb", storage_path=str(tmp_path / "sweeps"), metric="val_bpb",
        base={"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32, "batch_size": 8,
              "total_batch_size_str": "8*32", "max_iters": 20, "warmup_steps": 2,
              "learning_rate": 3e-3, "eval_interval": 10, "eval_iters": 2, "log_interval": 10},
        space={"data_dir": {"grid": [str(dirs["char"]), str(dirs["byte"])]}},
        max_concurrent=2, decode_tokens=0)
    plan = expand(spec)
    assert {t.train["tokenizer"] for t in plan.trials} == {"char", "byte"}
    rep = run_sweep(plan, verbose=0)
    assert rep["counts"]["finished"] == 2, rep["table"]

    root = tmp_path / "sweeps" / "bpb"
    doc = json.loads((root / "results.json").read_text())
    assert doc["metric"] == "val_bpb"
    rows = doc["trials"]
    assert {r["tokenizer"] for r in rows} == {"char", "byte"}
    assert rows[0]["val_bpb"] <= rows[1]["val_bpb"]                  # ranked by the run's best bpb
    for r in rows:
        hist = [json.loads(ln) for ln in (root / "runs" / r["trial_id"] / "metrics.jsonl")
                .read_text().splitlines()]
        bpbs = [m["val_bpb"] for m in hist if "val_bpb" in m]
        assert [m["step"] for m in hist if "val_bpb" in m] == [0, 10, 20]
        assert r["val_bpb"] == r["best_val_bpb"] == min(bpbs) and math.isfinite(r["val_bpb"])
    table = (root / "results.md").read_text()
    assert "metric val_bpb (min)" in table and "| best val bpb |" in table
    assert rep["best"]["trial"] == rows[0]["trial_id"] and rep["best"]["best_val_bpb"] == rows[0]["val_bpb"]
