"""Scaling ladders without Ray: the power-law fit and its bootstrap on synthetic points, ladder
specs (bad ones refused), their expansion into rungs, and the report of a ladder sweep
directory whose runs are written here with known losses."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from chimera.sweep.scaling import PowerLaw, bootstrap, fit_power_law
from chimera.sweep.spec import SweepSpec, SweepSpecError

E, A, ALPHA = 1.8, 400.0, 0.3
C = np.geomspace(1e10, 1e14, 6)


def law(c, e=E, a=A, alpha=ALPHA):
    return e + a * np.asarray(c, float) ** -alpha


# --- the fit --------------------------------------------------------------------------------------
def test_the_fit_recovers_known_parameters_exactly_without_noise():
    f = fit_power_law(C, law(C))
    assert f.E == pytest.approx(E, rel=1e-6) and f.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert f.A == pytest.approx(A, rel=1e-5)
    assert float(f(1e16)) == pytest.approx(float(law(1e16)), rel=1e-7)
    # any FLOP scale: the same curve a million times further out is fitted as well
    g = fit_power_law(C * 1e6, law(C * 1e6))
    assert (g.E, g.alpha) == pytest.approx((E, ALPHA), rel=1e-6)


def test_the_fit_recovers_known_parameters_within_tolerance_with_small_noise():
    rng = np.random.default_rng(1)
    for _ in range(5):
        f = fit_power_law(C, law(C) + rng.normal(0, 0.003, len(C)))
        assert abs(f.E - E) < 0.05 and abs(f.alpha - ALPHA) < 0.05
        assert abs(float(f(1e15)) - float(law(1e15))) < 0.02


def test_the_fit_refuses_fewer_than_three_budgets():
    with pytest.raises(ValueError, match=">= 3 distinct budgets"):
        fit_power_law([1e10, 1e10, 1e12], [3.0, 3.0, 2.5])


def test_bootstrap_intervals_cover_the_true_values_on_synthetic_ladders():
    """Over 20 noisy ladders the 95% intervals of α, E and the loss at 10× beyond the largest
    budget cover the truth in most of them (a bootstrap blind to noise would cover none)."""
    target, cover, widths = 1e15, {"E": 0, "alpha": 0, "pred": 0}, []
    for s in range(20):
        rng = np.random.default_rng(s)
        draws, method = bootstrap(C, law(C) + rng.normal(0, 0.01, len(C)), 150, rng)
        assert method == "residual" and len(draws) == 150
        for k, truth, vals in (("E", E, [d.E for d in draws]), ("alpha", ALPHA, [d.alpha for d in draws]),
                               ("pred", float(law(target)), [float(d(target)) for d in draws])):
            lo, hi = np.quantile(vals, [0.025, 0.975])
            cover[k] += lo <= truth <= hi
            if k == "pred":
                widths.append(hi - lo)
    assert all(n >= 15 for n in cover.values()), cover
    assert 0.005 < np.median(widths) < 0.2


def test_seeds_at_three_rungs_give_intervals_three_single_runs_do_not():
    rng = np.random.default_rng(0)
    c3 = C[[0, 2, 5]]
    assert bootstrap(c3, law(c3), 100, rng) == ([], "none (3 points for 3 parameters: the fit is "
                                                     "exact; add a rung or seeds)")
    c9 = np.repeat(c3, 3)
    draws, method = bootstrap(c9, law(c9) + rng.normal(0, 0.01, 9), 100, rng)
    assert method == "residual" and len(draws) == 100
    assert np.std([d.E for d in draws]) > 0


# --- ladder specs ---------------------------------------------------------------------------------
BASE = {"n_embd": 32, "n_head": 4, "block_size": 32, "batch_size": 4, "total_batch_size_str": "4*32",
        "warmup_steps": 2, "eval_interval": 50, "eval_iters": 1, "vocab_size": 128}
SIZES = [{"n_embd": 16, "n_layer": 2}, {"n_embd": 24, "n_layer": 2}, {"n_embd": 32, "n_layer": 4}]
LAYERS = {"groups": [2], "attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2},
                                  "mla": {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16,
                                          "rope_head_dim": 4}}}


@pytest.fixture(autouse=True)
def _data(request):
    BASE["data_dir"] = str(request.getfixturevalue("train_char_data"))


def spec(**kw) -> SweepSpec:
    ladder = kw.pop("ladder", {"sizes": SIZES, "target_flops": 1e12})
    return SweepSpec(**{"name": "lad", "base": {**BASE, "n_layer": 2}, "layers": LAYERS, "ladder": ladder, **kw})


@pytest.mark.parametrize("ladder, kw, match", [
    ({"sizes": SIZES[:2], "target_flops": 1e12}, {}, r"ladder.sizes: expected a list of >= 3 rungs"),
    ({"flops": [1e9, 2e9], "target_flops": 1e12}, {}, r"ladder.flops: expected a list of >= 3"),
    ({"sizes": SIZES, "flops": [1, 2, 3], "target_flops": 1e12}, {}, "exactly one of sizes"),
    ({"target_flops": 1e12}, {}, "exactly one of sizes"),
    ({"sizes": SIZES}, {}, r"ladder.target_flops: required"),
    ({"sizes": SIZES, "target_flops": "lots"}, {}, r"ladder.target_flops='lots' must be a number"),
    ({"sizes": SIZES, "target_flops": -1}, {}, r"target_flops=-1 must be a number of FLOPs > 0"),
    ({"sizes": SIZES, "target_flop": 1e12}, {}, "did you mean 'target_flops'"),
    ({"sizes": [*SIZES[:2], {"n_emb": 8}], "target_flops": 1e12}, {}, r"ladder.sizes\[2\]: unknown key 'n_emb'"),
    ({"sizes": [*SIZES[:2], {}], "target_flops": 1e12}, {}, r"ladder.sizes\[2\]: an empty size"),
    ({"sizes": [*SIZES, SIZES[0]], "target_flops": 1e12}, {}, "two rungs are the same size"),
    ({"sizes": [*SIZES[:2], {"vocab_size": 256}], "target_flops": 1e12}, {}, "unknown key 'vocab_size'"),
    ({"sizes": [*SIZES[:2], {"n_embd": 48, "n_layer": 3}], "target_flops": 1e12},
     {"layers": {**LAYERS, "groups": [1, 1]}}, r"n_layer=3: layers.groups=\[1, 1\] cannot be scaled to 3"),
    ({"sizes": SIZES, "target_flops": 1e12, "tokens_per_param": 0}, {}, "tokens_per_param=0 must be"),
    ({"flops": [1e9, 2e9, 4e9], "target_flops": 1e12, "tokens_per_param": 20}, {}, "only with ladder.sizes"),
    ({"flops": [1e9, 1e9, 4e9], "target_flops": 1e12}, {}, "two rungs have the same budget"),
    ({"flops": [1e9, 2e9, 4e9], "target_flops": 1e12, "validate": {"n_embd": 64}}, {},
     r"ladder.validate=\{'n_embd': 64\} must be a number of FLOPs"),
    ({"sizes": SIZES, "target_flops": 1e12, "validate": 1e12}, {}, r"ladder.validate: expected a mapping"),
    ({"sizes": SIZES, "target_flops": 1e12, "bootstrap": 10}, {}, r"bootstrap=10 must be 0 .* or an integer >= 100"),
    ({"sizes": SIZES, "target_flops": 1e12, "confidence": 95}, {}, r"confidence=95 must be a fraction"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"mode": "max"}, "mode must be 'min'"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"scheduler": {"type": "asha"}}, "scheduler must be fifo"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"budget": {"active_params": 10_000}},
     "ladder.sizes and budget exclude each other"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"space": {"max_iters": {"grid": [10, 20]}}},
     "space.max_iters: a ladder derives each rung's steps"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"space": {"n_embd": {"grid": [16, 32]}}},
     r"ladder.sizes\[0\].n_embd: searched in space too"),
    ({"sizes": SIZES, "target_flops": 1e12}, {"layers": {"attn": LAYERS["attn"]}},
     r"ladder.sizes\[0\].n_layer: layers without `groups` choose per layer"),
])
def test_bad_ladder_spec_is_refused_with_its_reason(ladder, kw, match):
    with pytest.raises(SweepSpecError, match=match):
        spec(ladder=ladder, **kw)


def test_base_max_iters_is_refused_with_a_ladder():
    with pytest.raises(SweepSpecError, match="base.max_iters: a ladder derives"):
        SweepSpec(name="x", base={**BASE, "n_layer": 2, "max_iters": 10}, layers=LAYERS,
                  ladder={"sizes": SIZES, "target_flops": 1e12})


def test_yaml_exponents_without_a_sign_are_numbers():
    s = spec(ladder={"flops": ["1.0e9", "2e9", 4e9], "target_flops": "1.0e15"})
    assert s.ladder["target_flops"] == "1.0e15"          # kept as written, read as 1e15


# --- expansion ------------------------------------------------------------------------------------
def test_sizes_ladder_runs_every_configuration_at_every_rung_with_steps_from_the_rule():
    from chimera.sweep.trials import expand
    from models import LLM, ModelConfig

    plan = expand(spec(ladder={"sizes": SIZES, "tokens_per_param": 2, "target_flops": 1e12,
                               "validate": {"n_embd": 48, "n_layer": 4}}))
    assert len(plan.trials) == 2 * 4 and not plan.rejected
    assert [t.name for t in plan.trials] == [f"t{i:03d}" for i in range(8)]
    assert {t.ladder["config"] for t in plan.trials} == {"g0.attn=gqa2", "g0.attn=mla"}
    assert [t.ladder["held_out"] for t in plan.trials] == [False] * 6 + [True] * 2
    for t in plan.trials:
        m = LLM(ModelConfig.from_dict(t.model_config))     # counted independently of the ladder
        size = (SIZES + [{"n_embd": 48, "n_layer": 4}])[t.ladder["rung"]]
        assert (m.cfg.n_embd, m.cfg.n_layer) == (size["n_embd"], size["n_layer"])
        active = m.num_params().active
        assert t.ladder["params"] == active
        assert t.train["max_iters"] == t.ladder["steps"] == round(2 * active / 128)
        assert t.ladder["flops"] == m.flops_per_token() * t.ladder["steps"] * 128
        assert t.arch.endswith(f"@ {t.ladder['label']}")


def test_flops_ladder_trains_the_base_size_for_each_budget():
    from chimera.sweep.trials import expand
    plan = expand(spec(ladder={"flops": [2e9, 4e9, 8e9], "target_flops": 1e11, "validate": 1.6e10}))
    for t in plan.trials:
        budget = [2e9, 4e9, 8e9, 1.6e10][t.ladder["rung"]]
        assert abs(t.ladder["flops"] / budget - 1) < 0.5 * 128 * t.ladder["flops_per_token"] / budget + 1e-9
        assert t.ladder["tokens"] == t.train["max_iters"] * 128


def test_stacks_scale_by_runs_and_a_configuration_rejected_at_one_rung_is_left_out_everywhere():
    from chimera.sweep.trials import expand
    stacks = {"hetero": [{"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4,
                          "repeat": 2}, {"attn": "gqa", "n_kv_heads": 2, "repeat": 2}],
              # 3 kv heads divide the 6 heads of the last rung only
              "odd": [{"attn": "gqa", "n_kv_heads": 3, "repeat": 4}]}
    sizes = [{"n_embd": 16, "n_layer": 2}, {"n_embd": 32, "n_layer": 4}, {"n_embd": 48, "n_layer": 8,
                                                                           "n_head": 6}]
    s = SweepSpec(name="st", base=BASE, stacks=stacks,
                  ladder={"sizes": sizes, "tokens_per_param": 1, "target_flops": 1e12})
    plan = expand(s)
    assert [t.arch for t in plan.trials] == ["1×[mla+mlp] + 1×[gqa2+mlp] @ n_embd=16 n_layer=2",
                                             "2×[mla+mlp] + 2×[gqa2+mlp] @ n_embd=32 n_layer=4",
                                             "4×[mla+mlp] + 4×[gqa2+mlp] @ n_embd=48 n_layer=8 n_head=6"]
    assert len(plan.rejected) == 3
    assert any("not divisible" in m for _, m in plan.rejected)
    assert any("rejected at another rung, so left out at rung n_embd=48" in m for _, m in plan.rejected)
    with pytest.raises(SweepSpecError, match=r"stacks.hetero: 2× \+ 2× layers cannot be scaled to n_layer=3"):
        expand(SweepSpec(name="st", base=BASE, stacks={"hetero": stacks["hetero"]},
                         ladder={"sizes": [*sizes[:2], {"n_embd": 48, "n_layer": 3}], "target_flops": 1e12}))


@pytest.mark.parametrize("ladder, match", [
    ({"sizes": SIZES, "tokens_per_param": 2, "target_flops": 1e12, "validate": {"n_embd": 8, "n_layer": 2}},
     r"ladder.validate: configuration g0.attn=gqa2 would train .* not more than its largest"),
    ({"sizes": SIZES, "tokens_per_param": 0.001, "target_flops": 1e12},
     r"gets \d+ tokens, less than one optimizer step of 128 tokens"),
    ({"flops": [1e9, 1.0001e9, 1.0002e9], "target_flops": 1e12}, r"1 distinct training budgets"),
])
def test_ladders_that_cannot_be_fitted_or_checked_are_refused_before_launch(ladder, match):
    from chimera.sweep.trials import expand
    with pytest.raises(SweepSpecError, match=match):
        expand(spec(ladder=ladder))


def test_warmup_longer_than_a_rung_is_refused():
    from chimera.sweep.trials import expand
    s = SweepSpec(name="w", base={**BASE, "n_layer": 2, "warmup_steps": 10_000}, layers=LAYERS,
                  ladder={"sizes": SIZES, "tokens_per_param": 2, "target_flops": 1e12})
    with pytest.raises(SweepSpecError, match=r"trains \d+ steps, not more than base.warmup_steps=10000"):
        expand(s)


# --- the report -----------------------------------------------------------------------------------
def _fake_runs(plan, root, loss_of):
    """What finished trials leave behind (summary.json, metrics.jsonl) with chosen losses."""
    from chimera.sweep.store import write_plan
    write_plan(plan, root)
    for t in plan.trials:
        run = root / "runs" / t.name
        run.mkdir(parents=True)
        v = loss_of(t)
        m = {"step": t.ladder["steps"], "val_loss": v, "train_loss": v,
             "tokens": t.ladder["tokens"], "params_active": t.ladder["params"]}
        (run / "metrics.jsonl").write_text(json.dumps(m) + "\n")
        (run / "summary.json").write_text(json.dumps(m))


def test_report_of_a_ladder_predicts_the_winner_checks_the_held_out_rung_and_plots(tmp_path):
    from chimera.sweep.report import write_report
    from chimera.sweep.trials import expand

    # two seeds per rung: replicates of one configuration, so 3 rungs leave residuals to resample
    s = spec(ladder={"sizes": SIZES, "tokens_per_param": 4, "target_flops": 1e14,
                     "validate": {"n_embd": 48, "n_layer": 4}, "bootstrap": 300},
             space={"seed": {"grid": [1, 2]}})
    plan = expand(s)
    assert len(plan.trials) == 2 * 2 * 4
    noise = iter(np.random.default_rng(3).normal(0, 0.004, len(plan.trials)))
    truth = {"g0.attn=gqa2": (1.3, 0.25), "g0.attn=mla": (1.5, 0.25)}      # (E, α); same A

    def loss(t):
        e, a = truth[t.ladder["config"]]
        if t.ladder["held_out"] and "mla" in t.ladder["config"]:
            return float(law(t.ladder["flops"], e, 300.0, a)) + 0.3      # far off its curve
        return float(law(t.ladder["flops"], e, 300.0, a)) + next(noise)
    _fake_runs(plan, tmp_path, loss)
    rep = write_report(tmp_path, decode_missing=False)

    sec = json.loads((tmp_path / "results.json").read_text())["ladder"]
    fits = {f["config"]: f for f in sec["fits"]}
    assert set(fits) == set(truth) and all(f["method"] == "residual" and f["n_fit"] == 6 for f in fits.values())
    for cfg, (e, a) in truth.items():
        f = fits[cfg]
        true_at = float(law(1e14, e, 300.0, a))
        assert f["predicted"]["lo"] < f["predicted"]["value"] < f["predicted"]["hi"]
        assert abs(f["predicted"]["value"] - true_at) < 0.1
    assert sec["winner"]["config"] == "g0.attn=gqa2" and sec["winner"]["p_best"] > 0.9
    assert fits["g0.attn=gqa2"]["validate"]["inside"] is True
    assert fits["g0.attn=mla"]["validate"]["inside"] is False
    assert sec["validate"] == {"inside": 1, "checked": 2, "of": 2, "observed_winner": "g0.attn=gqa2",
                               "predicted_winner": "g0.attn=gqa2"}
    md = (tmp_path / "results.md").read_text()
    assert "## Scaling ladder" in md and "predicted winner at 1e+14 FLOPs: g0.attn=gqa2" in md
    assert "OUTSIDE" in md and "(held out)" in md and "bootstrap residual (300 resamples)" in md
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert str(tmp_path / "scaling.png") in rep["files"]
    assert any(line.startswith("predicted winner") for line in rep["ladder"]["summary"])


def test_report_with_three_rungs_predicts_without_claiming_an_interval(tmp_path):
    from chimera.sweep.report import write_report
    from chimera.sweep.trials import expand
    plan = expand(spec(ladder={"sizes": SIZES, "tokens_per_param": 2, "target_flops": 1e12}))
    _fake_runs(plan, tmp_path, lambda t: float(law(t.ladder["flops"], 1.4 + 0.1 * ("mla" in t.ladder["config"]))))
    rep = write_report(tmp_path, decode_missing=False)
    sec = rep["ladder"]
    assert all(f["predicted"]["lo"] is None and f["method"].startswith("none (3 points") for f in sec["fits"])
    assert sec["winner"]["config"] == "g0.attn=gqa2" and sec["winner"]["clear"] is None
    assert "no interval: not a claim" in "\n".join(sec["summary"])
    assert math.isclose(next(f for f in sec["fits"] if f["config"] == "g0.attn=gqa2")["E"]["value"], 1.4,
                        rel_tol=1e-3)
    assert PowerLaw(**sec["fits"][0]["law"])(1e12) > 0


def test_every_shipped_ladder_spec_expands_with_intervals_possible_and_a_held_out_rung():
    import dataclasses
    from pathlib import Path

    from chimera.sweep.spec import load_spec
    from chimera.sweep.trials import expand
    specs = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("exp*-ladder*.yaml"))
    assert [p.stem for p in specs] == ["exp1-ladder-tiny", "exp1-ladder", "exp2-ladder-tiny", "exp2-ladder",
                                       "exp3-ladder-tiny", "exp3-ladder"]
    for p in specs:
        s = load_spec(p)
        s = dataclasses.replace(s, base={**s.base, "data_dir": BASE["data_dir"], "tokenizer": "char"})
        plan = expand(s)
        assert not plan.rejected, (p.name, plan.rejected)
        by: dict = {}
        for t in plan.trials:
            by.setdefault(t.ladder["config"], []).append(t.ladder)
        assert len(by) == 2, p.name
        for pts in by.values():                   # > 3 fitted runs: the bootstrap has residuals
            assert sum(not x["held_out"] for x in pts) >= 4 and sum(x["held_out"] for x in pts) == 1


def test_two_configurations_on_one_curve_are_not_called_a_clear_winner():
    from chimera.sweep.scaling import ladder_section, summary_lines
    rng = np.random.default_rng(5)
    trials, rows = [], []
    for cfg in ("a", "b"):
        for i, c in enumerate(C):
            name = f"{cfg}{i}"
            trials.append({"name": name, "ladder": {"config": cfg, "rung": i, "label": f"r{i}", "held_out": False,
                                                    "params": 1, "tokens": 1, "steps": 1, "flops": float(c)}})
            rows.append({"trial": name, "status": "finished", "val_loss": float(law(c)) + rng.normal(0, 0.01)})
    sec = ladder_section(rows, trials, {"metric": "val_loss", "ladder": {"target_flops": 1e15, "bootstrap": 200}})
    assert sec["winner"]["clear"] is False
    assert sum(f["p_best"] for f in sec["fits"]) == pytest.approx(1.0)
    assert 0.5 <= sec["winner"]["p_best"] < 0.95
    assert "95% intervals overlap: not a clear winner" in "\n".join(summary_lines(sec))
