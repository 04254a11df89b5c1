"""A seeded sweep on the session's local Ray cluster: every configuration runs with 3 seeds as
separate Tune trials, and the grouped report (mean, std, CI, Welch p) matches the runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from test_sweep_ray import MLA, base

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_three_seeds_over_two_stacks_give_cis_and_p_values_of_the_runs(ray_cluster, train_char_data, tmp_path):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.store import history
    from chimera.sweep.trials import expand

    spec = SweepSpec(name="seeds", storage_path=str(tmp_path),
                     base=base(train_char_data, max_iters=20, eval_interval=10),
                     stacks={"gqa": [{"attn": "gqa", "n_kv_heads": 2}], "mla": [MLA]},
                     seeds=3, max_concurrent=2, decode_tokens=4)
    rep = run_sweep(expand(spec), verbose=0)
    root = tmp_path / "seeds"
    assert rep["counts"]["finished"] == 6, rep["table"]
    doc = json.loads((root / "results.json").read_text())
    runs = {t["trial_id"]: t for t in doc["trials"]}
    assert sorted(runs) == ["t000s0", "t000s1", "t000s2", "t001s0", "t001s1", "t001s2"]
    plan = json.loads((root / "sweep.json").read_text())
    assert sorted(t["train"]["seed"] for t in plan["trials"]) == [1337, 1337, 1338, 1338, 1339, 1339]

    confs = doc["configurations"]
    assert [c["n"] for c in confs] == [3, 3] and {c["config"] for c in confs} == {"t000", "t001"}
    # each configuration's statistics, recomputed from its runs' own metrics files
    x = {c["config"]: [min(m["val_loss"] for m in history(root / "runs" / t) if "val_loss" in m)
                       for t in c["trials"]] for c in confs}
    for c in confs:
        v = x[c["config"]]
        assert sorted(c["trials"]) == [f"{c['config']}s{s}" for s in range(3)]
        assert v == [runs[t]["best_val_loss"] for t in c["trials"]]
        assert len(set(v)) == 3                     # the seeds really differ: three other runs
        lo, hi = sps.t.interval(0.95, 2, loc=np.mean(v), scale=sps.sem(v))
        assert c["mean"] == pytest.approx(np.mean(v)) and c["std"] == pytest.approx(np.std(v, ddof=1))
        assert c["ci"] == [pytest.approx(lo), pytest.approx(hi)]
    best, other = confs
    assert best["mean"] <= other["mean"] and best["verdict"] == "best" and best["p"] is None
    p = sps.ttest_ind(x[other["config"]], x[best["config"]], equal_var=False).pvalue
    assert other["p"] == pytest.approx(p) and other["tied"] == (p >= 0.05)
    assert other["verdict"] == ("tied" if p >= 0.05 else "worse")
    # the report: the configuration table above the per-trial one; the best run of the best config
    md = (root / "results.md").read_text()
    assert "## Configurations: 3 seeds each" in md and md.index("## Configurations") < md.index("## Trials")
    assert f"| 2 | {other['config']} |" in md and f"{p:.3g}" in md
    assert rep["best"]["config"] == best["config"]
    assert rep["best"]["trial"] == min(best["trials"], key=lambda t: runs[t]["best_val_loss"])
    assert "# best trial " + rep["best"]["trial"] in (root / "best_train.yaml").read_text()
