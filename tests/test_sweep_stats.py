"""Seeds and significance without Ray: the statistics against their formulas, ties, seed
replicas in expand() and --dry_run, bad `seeds`/`significance`, and the grouped report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from chimera.sweep.spec import SweepSpec, SweepSpecError
from chimera.sweep.stats import compare, summarize, welch_p
from chimera.sweep.trials import expand

ROOT = Path(__file__).resolve().parents[1]
BASE = {"n_embd": 32, "n_head": 4, "block_size": 32, "n_layer": 2, "batch_size": 4,
        "total_batch_size_str": "4*32", "max_iters": 10}
ATTN = {"gqa2": {"attn": "gqa", "n_kv_heads": 2}, "gqa1": {"attn": "gqa", "n_kv_heads": 1}}
T975 = {2: 4.302652729911275, 4: 2.7764451051977987}     # t(0.975, df), from printed tables


@pytest.fixture
def spec(train_char_data):
    return lambda **kw: SweepSpec(**{"name": "s", "base": {**BASE, "data_dir": str(train_char_data)}, **kw})


# --- the statistics ------------------------------------------------------------------------------
def test_mean_std_and_ci_follow_the_t_formula():
    rng = np.random.default_rng(0)
    for x in ([2.041, 2.047, 2.039], list(rng.normal(3.0, 0.1, 5))):
        n, mean, std, (lo, hi) = summarize(x)
        m = sum(x) / len(x)
        s = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
        half = T975[len(x) - 1] * s / math.sqrt(len(x))
        assert n == len(x) and mean == pytest.approx(m, rel=1e-12) and std == pytest.approx(s, rel=1e-12)
        assert (lo, hi) == (pytest.approx(m - half, rel=1e-9), pytest.approx(m + half, rel=1e-9))
    assert summarize([1.5]) == (1, 1.5, None, None)
    assert summarize([]) == (0, None, None, None)
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])


def test_welch_p_is_the_welch_satterthwaite_formula_not_the_pooled_test():
    rng = np.random.default_rng(1)
    for na, nb, sa, sb in ((3, 3, 0.01, 0.01), (3, 5, 0.005, 0.05), (4, 6, 0.1, 0.02)):
        a, b = rng.normal(2.0, sa, na), rng.normal(2.02, sb, nb)
        va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
        t = (a.mean() - b.mean()) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
        p = 2 * sps.t.sf(abs(t), df)
        assert welch_p(a, b) == pytest.approx(p, rel=1e-9) == welch_p(b, a)
        if sa != sb:             # unequal variances: Student's pooled test gives another number
            assert abs(sps.ttest_ind(a, b, equal_var=True).pvalue - p) > 1e-3 * p
    with pytest.raises(ValueError, match="2 or more values on each side"):
        welch_p([1.0], [1.0, 2.0])


def test_ties_and_verdicts_on_constructed_data():
    groups = {"c": [1.50, 1.51, 1.49], "b": [1.005, 1.015, 0.995], "a": [1.00, 1.01, 0.99],
              "d": [1.2], "e": []}
    rows = compare(groups, mode="min", significance=0.05)
    by = {r.config: r for r in rows}
    assert [r.config for r in rows] == ["a", "b", "d", "c", "e"]           # by mean; no data last
    assert [by[k].verdict for k in "abcde"] == ["best", "tied", "worse", "untested", "no data"]
    assert by["a"].p is None and by["a"].tied is None
    assert by["b"].p == pytest.approx(sps.ttest_ind(groups["b"], groups["a"], equal_var=False).pvalue)
    assert by["b"].p > 0.5 and by["b"].tied is True
    assert by["c"].p < 1e-4 and by["c"].tied is False
    assert by["d"].n == 1 and by["d"].p is None and by["d"].std is None and by["d"].ci is None
    assert by["e"].n == 0 and by["e"].mean is None
    # the level decides: p == level is tied, a level just above p is not
    pb = by["b"].p
    assert next(r for r in compare(groups, significance=pb) if r.config == "b").verdict == "tied"
    assert next(r for r in compare(groups, significance=pb * 1.001) if r.config == "b").verdict == "worse"
    # mode max: the largest mean is the best
    top = compare(groups, mode="max")
    assert top[0].config == "c" and {r.config: r.verdict for r in top}["a"] == "worse"
    # a best with one run cannot be tested against
    one = {r.config: r for r in compare({"x": [0.5], "y": [1.0, 1.1, 1.2]})}
    assert one["x"].verdict == "best" and one["y"].verdict == "untested" and one["y"].p is None
    # identical runs: zero variance on both sides
    assert compare({"a": [1.0] * 3, "b": [1.0] * 3})[1].p == 1.0
    assert compare({"a": [1.0] * 3, "b": [2.0] * 3})[1].verdict == "worse"


# --- spec keys and trial expansion -----------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"seeds": 0}, "seeds=0 must be an integer >= 1"),
    ({"seeds": 2.5}, "seeds=2.5 must be an integer >= 1"),
    ({"seeds": True}, "seeds=True must be an integer >= 1"),
    ({"seeds": "3"}, "seeds='3' must be an integer >= 1"),
    ({"significance": 0}, r"significance=0 must be a level in \(0, 1\)"),
    ({"significance": 1.0}, r"significance=1.0 must be a level in \(0, 1\)"),
    ({"significance": -0.05}, "significance=-0.05 must be a level"),
    ({"significance": "0.05"}, "significance='0.05' must be a level"),
    ({"significance": True}, "significance=True must be a level"),
    ({"significance": float("nan")}, "significance=nan must be a level"),
    ({"seeds": 3, "space": {"seed": {"grid": [1, 2]}}}, r"space.seed: with seeds=3 the sweep sets"),
])
def test_bad_seeds_and_significance_are_refused(spec, kw, match):
    with pytest.raises(SweepSpecError, match=match):
        spec(**kw)


def test_a_typo_of_seeds_in_a_spec_file_is_named(tmp_path):
    from chimera.sweep.spec import load_spec
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": BASE, "seedss": 3}))
    with pytest.raises(SweepSpecError, match="unknown key 'seedss' \\(did you mean 'seeds'\\?\\)"):
        load_spec(tmp_path / "s.yaml")


def test_seeds_run_every_configuration_once_per_seed(spec):
    one = expand(spec(layers={"groups": [2], "attn": ATTN}))
    assert [t.name for t in one.trials] == ["t000", "t001"]
    assert all(t.config is None and t.seed is None and "seed" not in t.train for t in one.trials)
    three = expand(spec(layers={"groups": [2], "attn": ATTN}, seeds=3))
    assert [t.name for t in three.trials] == ["t000s0", "t001s0", "t000s1", "t001s1", "t000s2", "t001s2"]
    for t in three.trials:
        cfg = next(c for c in one.trials if c.name == t.config)
        assert t.seed == 1337 + int(t.name[-1]) == t.train["seed"]        # TrainConfig's default seed
        assert (t.model_config, t.choices, t.arch) == (cfg.model_config, cfg.choices, cfg.arch)
        assert {k: v for k, v in t.train.items() if k != "seed"} == cfg.train
    based = expand(spec(base={**BASE, "seed": 5, "data_dir": one.spec.base["data_dir"]},
                        layers={"groups": [2], "attn": ATTN}, seeds=2))
    assert [t.seed for t in based.trials] == [5, 5, 6, 6]
    # a rejected configuration is rejected once, not once per seed
    bad = expand(spec(layers={"groups": [2], "attn": {**ATTN, "bad": {"attn": "gqa", "n_kv_heads": 3}}},
                      seeds=3))
    assert len(bad.trials) == 6 and len(bad.rejected) == 1


@pytest.fixture
def sweep_job(monkeypatch, capsys):
    """jobs/sweep.py's main(argv) -> (exit code, captured output)."""
    import importlib
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    job = importlib.import_module("sweep")
    return lambda argv: (job.main(argv), capsys.readouterr())


def test_dry_run_lists_the_replicas_with_their_seeds(tmp_path, sweep_job, train_char_data):
    f = tmp_path / "seeds.yaml"
    f.write_text(yaml.safe_dump({"base": {**BASE, "data_dir": str(train_char_data)}, "seeds": 3,
                                 "layers": {"groups": [2], "attn": ATTN}, "storage_path": str(tmp_path)}))
    rc, out = sweep_job(["--spec", str(f), "--dry_run"])
    assert rc == 0, out.err
    assert "6 trial(s) (2 configuration(s) × 3 seeds), 0 rejected" in out.out
    assert "t001s2  2×[gqa2+mlp]  {'g0.attn': 'gqa2'}  seed 1339" in out.out
    assert not (tmp_path / "seeds").exists()


# --- the grouped report, from files (no training) -------------------------------------------------
def _fake_sweep(root: Path, spec, values: dict[str, float]) -> None:
    """A sweep directory as a finished sweep leaves it: sweep.json, and per trial a metrics
    file, summary.json and a best 'checkpoint' holding only its config.json."""
    from chimera.sweep.store import write_plan
    plan = expand(spec)
    write_plan(plan, root)
    for t in plan.trials:
        run = root / "runs" / t.name
        (run / "llm_model_best").mkdir(parents=True)
        (run / "llm_model_best" / "config.json").write_text(json.dumps(t.model_config))
        facts = {"params_total": 1000, "params_active": 800, "flops_per_token": 4800}   # as a run logs
        rows = [{"step": 0, "val_loss": 4.0, **facts},
                {"step": 10, "val_loss": values[t.name], "train_loss": 3.0, **facts}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"step": 10}))


def test_report_groups_seeds_tests_against_the_best_and_picks_its_best_run(spec, tmp_path):
    from chimera.sweep.report import write_report
    # configuration t000 is the best on average; the single best run is t001s0 (a lucky seed)
    values = {"t000s0": 2.00, "t000s1": 2.01, "t000s2": 2.02, "t001s0": 1.95, "t001s1": 2.20,
              "t001s2": 2.25, "t002s0": 2.50, "t002s1": 2.51, "t002s2": 2.52}
    attn = {**ATTN, "mla": {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4}}
    _fake_sweep(tmp_path, spec(layers={"groups": [2], "attn": attn}, seeds=3, decode_tokens=0), values)
    rep = write_report(tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["seeds"] == 3 and doc["significance"] == 0.05 and "Welch" in doc["test"]
    confs = {c["config"]: c for c in doc["configurations"]}
    assert [c["config"] for c in doc["configurations"]] == ["t000", "t001", "t002"]
    for k, c in confs.items():
        x = [values[f"{k}s{s}"] for s in range(3)]
        lo, hi = sps.t.interval(0.95, 2, loc=np.mean(x), scale=sps.sem(x))
        assert c["n"] == 3 and c["trials"] and c["mean"] == pytest.approx(np.mean(x))
        assert c["std"] == pytest.approx(np.std(x, ddof=1))
        assert c["ci"] == [pytest.approx(lo), pytest.approx(hi)]
        if k != "t000":
            p = sps.ttest_ind(x, [2.00, 2.01, 2.02], equal_var=False).pvalue
            assert c["p"] == pytest.approx(p) and c["tied"] == (p >= 0.05)
    assert confs["t000"]["verdict"] == "best" and confs["t001"]["verdict"] == "tied"
    assert confs["t002"]["verdict"] == "worse" and confs["t001"]["best_trial"] == "t001s0"
    assert doc["trials"][0]["trial_id"] == "t001s0" and doc["trials"][0]["config"] == "t001"
    # best_train.yaml / best_layers.jsonl: the best run of the best configuration, not the best run
    assert rep["best"]["trial"] == "t000s0" and rep["best"]["config"] == "t000"
    assert (tmp_path / "best_train.yaml").read_text().startswith("# best trial t000s0")
    md = (tmp_path / "results.md").read_text()
    assert "## Configurations: 3 seeds each" in md and "Welch" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 3 | t002 |"))
    assert f"2.5100 ± {(confs['t002']['ci'][1] - confs['t002']['ci'][0]) / 2:.4f}" in row and "worse" in row
    assert f"{confs['t002']['p']:.3g}" in row
    assert "| 1 | t001s0 | 1337 | finished |" in md                  # the per-trial table, with seeds


def test_one_seed_claims_no_significance(spec, tmp_path):
    from chimera.sweep.report import write_report
    _fake_sweep(tmp_path, spec(layers={"groups": [2], "attn": ATTN}, decode_tokens=0),
                {"t000": 2.1, "t001": 2.0})
    rep = write_report(tmp_path)
    assert "no significance is claimed" in rep["config_table"]
    assert "no significance is claimed" in (tmp_path / "results.md").read_text()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(c["config"], c["n"], c["p"], c["tied"]) for c in doc["configurations"]] == \
        [("t001", 1, None, None), ("t000", 1, None, None)]
    # the budget triad MoE comparisons need, for every trial: total and active params, FLOPs/token
    assert all((r["params_total"], r["params_active"], r["flops_per_token"]) == (1000, 800, 4800)
               for r in doc["trials"])
    head = next(ln for ln in (tmp_path / "results.md").read_text().splitlines() if "| trial |" in ln)
    assert "| params | active | FLOPs/tok |" in head
    assert rep["best"]["trial"] == "t001"


def test_serving_a_seeded_sweep_takes_the_best_run_of_each_best_configuration(tmp_path, tiny_checkpoint):
    from serve.loading import sweep_models
    ck = str(tiny_checkpoint)
    trials = [{"trial_id": "t001s0", "config": "t001", "val_loss": 1.95, "best_checkpoint": ck},
              {"trial_id": "t000s0", "config": "t000", "val_loss": 2.00, "best_checkpoint": ck},
              {"trial_id": "t000s1", "config": "t000", "val_loss": 2.01, "best_checkpoint": ck},
              {"trial_id": "t001s1", "config": "t001", "val_loss": 2.20, "best_checkpoint": ck}]
    doc = {"metric": "val_loss", "mode": "min", "trials": trials, "seeds": 2,
           "configurations": [{"config": "t000"}, {"config": "t001"}]}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert [n for n, _ in sweep_models(tmp_path, 2)] == ["t000s0", "t001s0"]
    (tmp_path / "results.json").write_text(json.dumps({**doc, "seeds": 1}))     # one seed: by trial
    assert [n for n, _ in sweep_models(tmp_path, 2)] == ["t001s0", "t000s0"]
