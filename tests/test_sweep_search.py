"""Searcher sweeps without Ray running: evolution's mutations and selection, reproducibility,
Pareto ranks, and suggestions resolved (or rejected) like the fixed trial lists."""
from __future__ import annotations

import json

import pytest

from chimera.sweep.spec import SweepSpec, SweepSpecError

BASE = {"n_embd": 32, "n_head": 4, "block_size": 32, "n_layer": 3, "batch_size": 4,
        "total_batch_size_str": "4*32", "max_iters": 10}
GQA2 = {"attn": "gqa", "n_kv_heads": 2}
MLA = {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4}
BAD = {"attn": "gqa", "n_kv_heads": 3}                       # n_head=4 is not divisible by 3
MOE = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True, "up_dim": 64}
LAYERS = {"groups": [2, 1], "attn": {"gqa2": GQA2, "mla": MLA}, "ffn": {"mlp": {"moe": False}, "moe": MOE}}


@pytest.fixture(autouse=True)
def _data(request):
    BASE["data_dir"] = str(request.getfixturevalue("train_char_data"))


def spec(**kw) -> SweepSpec:
    return SweepSpec(**{"name": "s", "base": BASE, "search": "evolution", "layers": LAYERS,
                        "space": {"learning_rate": {"loguniform": [1e-4, 1e-2]},
                                  "warmup_steps": {"grid": [0, 2, 4]}}, **kw})


def evolution(**kw):
    from chimera.sweep.search import inner_searcher
    return inner_searcher(spec(**kw))


def synthetic(cfg: dict) -> dict:
    """A known objective of the per-layer choices: MLA+MoE in group 0, GQA+MLP in group 1 is best."""
    loss = (1.0 * (cfg["g0.attn"] != "mla") + 0.5 * (cfg["g0.ffn"] != "moe")
            + 0.7 * (cfg["g1.attn"] != "gqa2") + 0.3 * (cfg["g1.ffn"] != "mlp")
            + 0.1 * abs(cfg["layers.groups"][0] - 2) + 0.01 * cfg["warmup_steps"])
    kv = 100 * (cfg["g0.attn"] == "gqa2") + 60 * (cfg["g1.attn"] == "gqa2")
    return {"best_val_loss": loss, "kv_bytes_per_token": kv}


@pytest.mark.parametrize("kw, match", [
    ({"objectives": {"val_los": "min"}}, "objectives: unknown key 'val_los' .*did you mean 'val_loss'"),
    ({"objectives": {"val_loss": "down"}}, "objectives.val_loss='down' must be 'min' or 'max'"),
    ({"objectives": {}}, "at least one"),
    ({"objectives": {"val_loss": "min"}, "search": "grid"}, "only a searcher optimises them"),
    ({"population": 0}, "population=0 must be an integer >= 1"),
    ({"search": "bayes"}, "'grid' or 'random' .*or a searcher: 'optuna' or 'evolution'"),
])
def test_bad_search_keys_are_refused_with_their_reason(kw, match):
    with pytest.raises(SweepSpecError, match=match):
        spec(**kw)


def test_a_mutation_changes_exactly_one_choice_and_stays_a_valid_trial():
    from chimera.sweep.trials import resolve_trial
    s = spec(seed=3)
    ev = evolution(seed=3)
    kinds = set()
    for _ in range(60):
        parent = ev.sample()
        child = ev.mutate(parent)
        diff = [k for k in parent if parent[k] != child[k]]
        assert len(diff) == 1, (parent, child)
        k = diff[0]
        kinds.add(k.split(".")[-1] if k.startswith("g") else k)
        if k == "layers.groups":                 # one boundary moved by one layer
            p, c = parent[k], child[k]
            assert sum(c) == sum(p) == 3 and min(c) >= 1
            assert sorted(abs(a - b) for a, b in zip(p, c)) == [1, 1]
        elif k == "warmup_steps":
            assert child[k] in (0, 2, 4)
        elif k == "learning_rate":
            assert 1e-4 <= child[k] <= 1e-2
        else:
            assert child[k] in LAYERS[k.split(".")[1]]
        t = resolve_trial(s, child, "x")      # a neighbour is a trial that can run
        assert len(t.model_config["layers"]) == 3
    # every kind of gene gets mutated: attention, FFN, boundary, both hyperparameters
    assert kinds == {"attn", "ffn", "layers.groups", "warmup_steps", "learning_rate"}


def _drive(ev, n: int) -> list[dict]:
    out = []
    for i in range(n):
        cfg = ev.suggest(f"t{i}")
        out.append(cfg)
        ev.on_trial_complete(f"t{i}", synthetic(cfg))
    return out


def test_evolution_is_reproducible_under_its_seed_and_breeds_from_the_best():
    a, b = _drive(evolution(seed=5, population=4), 24), _drive(evolution(seed=5, population=4), 24)
    assert a == b
    assert _drive(evolution(seed=6, population=4), 24) != a
    assert len({json.dumps(c, sort_keys=True) for c in a}) == 24        # never the same trial twice
    # after the 4 random ones, each child differs from some earlier trial in one gene
    for i, c in enumerate(a[4:], start=4):
        assert any(sum(p[k] != c[k] for k in c) == 1 for p in a[:i]), c
    ev = evolution(seed=5, population=4, objectives={"val_loss": "min"})
    best = min(synthetic(c)["best_val_loss"] for c in _drive(ev, 40))
    assert best < 0.05                           # found the known best stack (loss 0) or next to it


def test_a_trial_without_its_objectives_is_never_a_parent():
    ev = evolution(seed=0, population=2, objectives={"val_loss": "min", "decode_tokens_per_s": "max"})
    for i in range(3):
        ev.suggest(f"t{i}")
    ev.on_trial_complete("t0", {"best_val_loss": 1.0, "decode_tokens_per_s": 50.0})
    ev.on_trial_complete("t1", {"best_val_loss": 0.5})           # stopped before decoding was timed
    ev.on_trial_complete("t2", {"best_val_loss": 0.1, "decode_tokens_per_s": 9.0}, error=True)
    assert [round(v[0], 3) for _, v in ev._done] == [1.0]


def test_pareto_ranks_on_known_points():
    from chimera.sweep.pareto import objective_vector, pareto_ranks
    pts = [(1, 5), (2, 2), (5, 1), (3, 3), (4, 4), (2, 2), (6, 6)]
    assert pareto_ranks(pts) == [0, 0, 0, 1, 2, 0, 3]
    assert pareto_ranks([(3,), (1,), (2,), (1,)]) == [2, 0, 1, 0]
    assert pareto_ranks([(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 1, 1)]) == [0, 0, 0, 1]
    modes = {"val_loss": "min", "decode_tokens_per_s": "max"}
    rows = [{"best_val_loss": 2.0, "decode_tokens_per_s": 100.0},       # fast
            {"best_val_loss": 1.9, "decode_tokens_per_s": 50.0},        # good
            {"best_val_loss": 2.1, "decode_tokens_per_s": 60.0}]        # dominated by the first
    vecs = [objective_vector(r, modes) for r in rows]
    assert vecs[0] == (2.0, -100.0) and pareto_ranks(vecs) == [0, 0, 1]
    assert objective_vector({"best_val_loss": 2.0}, modes) is None
    assert objective_vector({"best_val_loss": float("nan"), "decode_tokens_per_s": 1.0}, modes) is None


def test_the_report_ranks_trials_and_lists_the_front():
    from chimera.sweep.report import pareto_front, pareto_markdown
    rows = [{"trial": t, "status": s, "arch": a, "hparams": "", "best_val_loss": v, "kv_bytes_per_token": kv}
            for t, s, a, v, kv in [("t000", "finished", "3×[gqa2+mlp]", 2.0, 128),
                                   ("t001", "finished", "3×[mla+mlp]", 1.9, 64),
                                   ("t002", "finished", "3×[mla+moe4/2]", 2.2, 64),
                                   ("t003", "failed", "x", None, 64)]]
    front = pareto_front(rows, {"objectives": {"val_loss": "min", "kv_bytes_per_token": "min"}})
    assert front["front"] == ["t001"] and front["evaluated"] == 3
    assert [r["pareto_rank"] for r in rows] == [1, 0, 1, None]
    md = pareto_markdown(front)
    assert "1 of 3 trials" in md and "| t001 | 3×[mla+mlp] |  | 1.9000 | 64 |" in md
    assert pareto_front(rows, {"objectives": {"val_loss": "min"}}) is None


def test_optuna_searcher_suggests_within_the_space_reproducibly():
    from ray.tune.search.optuna import OptunaSearch
    from chimera.sweep.search import inner_searcher

    def run(seed):
        s = inner_searcher(spec(search="optuna", seed=seed, population=3,
                                objectives={"val_loss": "min", "kv_bytes_per_token": "min"}))
        assert isinstance(s, OptunaSearch) and s.metric == ["best_val_loss", "kv_bytes_per_token"]
        out = []
        for i in range(6):
            cfg = s.suggest(f"t{i}")
            out.append(cfg)
            s.on_trial_complete(f"t{i}", {**synthetic({**cfg, "layers.groups": [2, 1]}), "training_iteration": 1})
        return out
    a = run(1)
    assert a == run(1) and a != run(2)
    for c in a:
        assert set(c) == {"g0.attn", "g0.ffn", "g1.attn", "g1.ffn", "learning_rate", "warmup_steps"}
        assert c["g0.attn"] in ("gqa2", "mla") and c["warmup_steps"] in (0, 2, 4)


class _Scripted:
    """An inner searcher suggesting a fixed list; records what it is told."""
    metric, mode = "best_val_loss", "min"      # what it optimises (TrialSearcher reads it)

    def __init__(self, configs):
        self.configs, self.told = list(configs), []

    def suggest(self, trial_id):
        return self.configs.pop(0) if self.configs else "FINISHED"

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result, error))


def test_suggestions_are_resolved_like_fixed_trials_and_invalid_ones_rejected(tmp_path):
    from chimera.sweep.search import TrialSearcher
    from chimera.sweep.trials import search_plan
    from chimera.sweep.store import read_plan
    from chimera.sweep.trials import resolve_trial

    s = spec(layers={"groups": [2, 1], "attn": {"gqa2": GQA2, "bad": BAD}, "ffn": {"mlp": {"moe": False}}},
             space={"learning_rate": {"loguniform": [1e-4, 1e-2]}, "warmup_steps": 3})
    with pytest.raises(SweepSpecError, match="n_head=4 is not divisible by n_kv_heads=3"):
        resolve_trial(s, {"g0.attn": "bad", "g0.ffn": "mlp", "g1.attn": "gqa2", "g1.ffn": "mlp"}, "x")
    assert search_plan(s).trials == []
    good = {"g0.attn": "gqa2", "g0.ffn": "mlp", "g1.attn": "gqa2", "g1.ffn": "mlp", "learning_rate": 1e-3}
    inner = _Scripted([{**good, "g1.attn": "bad"}, good])
    ts = TrialSearcher(inner, s, tmp_path, {"warmup_steps": 3})
    cfg = ts.suggest("abc")
    assert cfg == {"trial": "t000", **good}
    # the invalid suggestion: told to the searcher (no result: pruned), recorded as rejected
    assert inner.told == [("abc", None, False)]
    doc = read_plan(tmp_path)
    assert [t["name"] for t in doc["trials"]] == ["t000"]
    assert doc["trials"][0]["train"]["warmup_steps"] == 3 and doc["trials"][0]["arch"] == "3×[gqa2+mlp]"
    assert "not divisible by n_kv_heads=3" in doc["rejected"][0]["error"]
    ts.on_trial_complete("abc", {"best_val_loss": 1.5})
    assert inner.told[-1] == ("abc-r1", {"best_val_loss": 1.5}, False)
    assert ts.suggest("def") == "FINISHED"

    bad = spec(layers={"attn": {"bad": BAD}})
    with pytest.raises(SweepSpecError, match="no valid trial among 32 random samples .*n_kv_heads=3"):
        search_plan(bad)


def test_resume_of_a_searcher_sweep_is_refused_clearly(tmp_path):
    from chimera.sweep.run import run_sweep
    from chimera.sweep.trials import expand
    with pytest.raises(SweepSpecError, match="with search: evolution cannot be resumed .*--report"):
        run_sweep(expand(spec(storage_path=str(tmp_path))), resume=True)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("search", ["optuna", "evolution"])
def test_the_searcher_pickles_as_tune_saves_it_even_with_print_patched(search, tmp_path, monkeypatch):
    """Tune pickles the search algorithm with its config (tuner.pkl), and Ray Train patches
    builtins.print in the driver: the searcher must hold no such callable."""
    import builtins
    import pickle

    from ray import cloudpickle
    from chimera.sweep.search import make_searcher
    from chimera.sweep.trials import expand

    s = make_searcher(expand(spec(search=search)), tmp_path)
    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)
    again = pickle.loads(cloudpickle.dumps(s))
    assert again.suggest("a")["trial"] == "t000"


@pytest.mark.parametrize("extra,match", [({"seeds": 3}, "seeds=3: not with search='evolution'"),
                                         ({"ladder": {"sizes": [{"n_embd": 16}, {"n_embd": 32},
                                                                {"n_embd": 48}],
                                                      "target_flops": 1e12}},
                                          "ladder: not with search='evolution'")])
def test_a_searcher_refuses_seeds_and_ladders(extra, match):
    with pytest.raises(SweepSpecError, match=match):
        spec(**extra)
