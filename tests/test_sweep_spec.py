"""Sweep specs without Ray running: loading, errors, expansion, rejected combinations, budgets."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from chimera.sweep.spec import SweepSpec, SweepSpecError, load_spec

from chimera.sweep.trials import expand

ROOT = Path(__file__).resolve().parents[1]
BASE = {"n_embd": 32, "n_head": 4, "block_size": 32, "n_layer": 2, "batch_size": 4,
        "total_batch_size_str": "4*32", "max_iters": 10, "vocab_size": 128}
MLA = {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 4}
MOE = {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True, "up_dim": 64}


@pytest.fixture(autouse=True)
def _data(request):
    """Every spec here points at the prepared Tiny Shakespeare (expand checks the data)."""
    BASE["data_dir"] = str(request.getfixturevalue("train_char_data"))


def spec(**kw) -> SweepSpec:
    return SweepSpec(**{"name": "s", "base": BASE, **kw})


@pytest.mark.parametrize("kw, match", [
    ({"name": "a/b"}, "plain non-empty name"),
    ({"base": {**BASE, "lerning_rate": 1e-3}}, "did you mean 'learning_rate'"),
    ({"base": {**BASE, "batch_size": 0}}, "base: batch_size=0 must be >= 1"),
    ({"base": {**BASE, "run_name": "x"}}, "base.run_name: set by the sweep"),
    ({"base": {**BASE, "init_from": "runs/x"}}, "base.init_from: sweeps train their trials' own architectures"),
    ({"space": {"lora_rank": {"grid": [4, 8]}}}, "space.lora_rank: cannot be searched"),
    ({"space": {"learning_rate": {"logunifrom": [1e-4, 1e-2]}}}, "expected a constant or one of"),
    ({"space": {"learning_rate": {"loguniform": [1e-2, 1e-4]}}}, "low < high"),
    ({"space": {"learning_rate": {"loguniform": [0, 1e-2]}}}, "bounds must be > 0"),
    ({"space": {"pos_emb": {"grid": []}}}, "non-empty list"),
    ({"space": {"vocab_size": {"grid": [128, 256]}}}, "cannot be searched"),
    ({"layers": {"groups": [1, 2]}}, "sums to 3 layers but base.n_layer=2"),
    ({"layers": {"atn": {}}}, "did you mean 'attn'"),
    ({"layers": {"attn": {"x": 1}}}, r"layers.attn.x: expected a mapping"),
    ({"layers": {"attn": {"g": {}}}, "stacks": {"a": []}}, "at most one of layers"),
    ({"budget": {"active_params": 10, "flops_per_token": 10}}, "exactly one of"),
    ({"budget": {"active_params": 10, "tolerance": 2}}, r"fraction in \(0, 1\)"),
    ({"budget": {"active_params": 10}, "space": {"up_dim": {"grid": [1, 2]}}}, "solves up_dim"),
    ({"scheduler": {"type": "hyperband"}}, "'fifo' or 'asha'"),
    ({"scheduler": {"type": "asha", "time_attr": "epoch"}}, "'step' or 'tokens'"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "must be a number > 1"),
    ({"metric": "accuracy"}, "metric='accuracy' must be one of"),
    ({"metric": "mfu"}, "metric='mfu' must be one of val_loss, train_loss"),
    ({"storage_path": 5}, "storage_path=5 must be a path"),
    ({"layers": {"attn": {"g": {"attn": "gqa"}}}, "space": {"n_layer": {"grid": [2, 4]}}},
     "the depth comes from layers.groups"),
    ({"space": {"layer_configs_jsonl": {"grid": ["a", "b"]}}}, "use `stacks` for layer files"),
    ({"resources": {"gpus_per_worker": 0.5}}, "must be 0 or 1"),
    ({"scheduler": {"type": "asha", "reduction_factor": float("nan")}}, "must be a number > 1"),
    ({"mode": "up"}, "'min' or 'max'"),
    ({"max_concurrent": 0}, "max_concurrent=0 must be an integer >= 1"),
    ({"resources": {"num_workers": 2, "gpu": 1}}, "unknown key 'gpu'"),
    ({"search": "bayes"}, "'grid' or 'random'"),
])
def test_bad_spec_is_refused_with_its_reason(kw, match):
    with pytest.raises(SweepSpecError, match=match):
        spec(**kw)


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(SweepSpecError, match="No such file"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    with pytest.raises(SweepSpecError, match="cannot parse"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "nobase.yaml").write_text("num_samples: 2\n")
    with pytest.raises(SweepSpecError, match="missing 'base'"):
        load_spec(tmp_path / "nobase.yaml")
    (tmp_path / "typo.yaml").write_text("base: {}\nnum_sample: 2\n")
    with pytest.raises(SweepSpecError, match="did you mean 'num_samples'"):
        load_spec(tmp_path / "typo.yaml")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"base": BASE}))
    s = load_spec(tmp_path / "ok.yaml", storage_path="/x")
    assert s.name == "ok" and s.storage_path == "/x"       # name from the file, CLI override wins


def test_grid_expands_per_layer_choices_and_rejects_invalid_combinations():
    s = spec(layers={"groups": [1, 1], "attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2},
                                                 "bad": {"attn": "gqa", "n_kv_heads": 3}},
                     "ffn": {"mlp": {"moe": False}}},
             space={"pos_emb": {"grid": ["rope", "sin"]}})
    plan = expand(s)
    # 2 groups x 2 attention options x 2 positions = 8; every combination with "bad" is invalid
    assert len(plan.trials) == 2 and len(plan.rejected) == 6
    assert all("n_head=4 is not divisible by n_kv_heads=3" in m for _, m in plan.rejected)
    assert {t.choices["pos_emb"] for t in plan.trials} == {"rope", "sin"}
    assert all(t.arch == "2×[gqa2+mlp]" for t in plan.trials)
    assert [t.name for t in plan.trials] == ["t000", "t001"]


def test_random_search_is_seeded_and_samples_the_given_ranges():
    s = spec(search="random", num_samples=5, seed=7,
             layers={"attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2}, "mla": MLA}},
             space={"learning_rate": {"loguniform": [1e-4, 1e-2]}, "warmup_steps": {"choice": [0, 5]}})
    a, b = expand(s), expand(s)
    assert [t.choices for t in a.trials] == [t.choices for t in b.trials]
    assert len(a.trials) == 5
    assert all(1e-4 <= t.train["learning_rate"] <= 1e-2 for t in a.trials)
    assert len({t.train["learning_rate"] for t in a.trials}) == 5
    assert expand(dataclasses.replace(s, seed=8)).trials[0].choices != a.trials[0].choices


def test_stacks_read_jsonl_files_and_repeat_items():
    s = spec(base={k: v for k, v in BASE.items() if k != "n_layer"},
             stacks={"hetero": str(ROOT / "configs" / "hetero.jsonl"),
                     "dense": [{"attn": "gqa", "n_kv_heads": 2, "repeat": 3}]})
    plan = expand(s)
    arch = {t.choices["stack"]: t.arch for t in plan.trials}
    assert arch == {"dense": "3×[gqa2+mlp]", "hetero": "2×[mla+moe8/3] + 2×[gqa2+mlp]"}


@pytest.mark.parametrize("kind", ["active_params", "flops_per_token"])
def test_budget_mode_hits_the_budget_on_every_trial(kind):
    from models import LLM, ModelConfig

    target = 60_000 if kind == "active_params" else 400_000
    s = spec(layers={"groups": [1, 1], "attn": {"gqa1": {"attn": "gqa", "n_kv_heads": 1}, "mla": MLA},
                     "ffn": {"mlp": {"moe": False}, "moe": MOE}},
             budget={kind: target, "tolerance": 0.02, "multiple": 4})
    plan = expand(s)
    assert len(plan.trials) == 16 and not plan.rejected
    widths = set()
    for t in plan.trials:
        cfg = ModelConfig.from_layer_list(json.dumps(t.model_config["layers"]), n_embd=32, block_size=32,
                                          vocab_size=128)
        m = LLM(cfg)                         # a real model, counted independently of the solver
        got = m.num_params().active if kind == "active_params" else m.flops_per_token()
        assert abs(got / target - 1) <= 0.02, (t.arch, got)
        assert got == t.budget_value
        widths.add(tuple(b.ffn.up_dim for b in cfg.layers))
    assert len(widths) > 4                   # the solver really moved up_dim per architecture


def test_budget_out_of_reach_is_a_rejection_with_the_reason():
    s = spec(layers={"attn": {"gqa1": {"attn": "gqa", "n_kv_heads": 1}}, "ffn": {"mlp": {"moe": False}}},
             budget={"active_params": 1000})
    with pytest.raises(SweepSpecError, match=r"no valid trial .*cannot be met within 2%: the rest of "
                                             r"the model alone has"):
        expand(s)


def test_every_shipped_spec_loads_and_expands(tmp_path):
    specs = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    names, counts = {p.stem for p in specs}, {}
    assert {"exp1", "exp1-tiny", "exp2", "exp2-tiny", "exp3", "exp3-tiny"} <= names
    for p in specs:
        s = load_spec(p)
        # checked against the prepared Tiny Shakespeare (TinyStories is not prepared here)
        if "tokenizer" in (s.space or {}):            # a sweep across tokenizers (exp4-tokenizers)
            assert "tokenizer" not in s.base and s.metric == "val_bpb", p.name
            s = dataclasses.replace(s, space={k: v for k, v in s.space.items() if k != "tokenizer"})
        else:
            assert s.base["tokenizer"] == ("char" if p.stem.endswith("tiny") else "gpt2"), p.name
        s = dataclasses.replace(s, base={**s.base, "data_dir": BASE["data_dir"], "tokenizer": "char"})
        plan = expand(s)
        # a searcher's trials are chosen as it runs: expand only checks its space
        assert (plan.trials or s.search in ("optuna", "evolution")) and not plan.rejected, (p.name, plan.rejected)
        if p.stem.endswith("tiny"):
            assert s.resources.get("gpus_per_worker", 0) == 0 and s.base["dataset"] == "shakespeare"
        else:
            assert s.resources.get("gpus_per_worker", 0) >= 1 and s.base["dataset"] == "tinystories"
        if s.budget:
            assert all(t.budget_value for t in plan.trials)
        counts[p.stem] = len({t.config or t.name for t in plan.trials})    # configurations
        assert len(plan.trials) == counts[p.stem] * s.seeds, p.name
    # exp1/exp2: {GQA, MLA} x {RoPE, sinusoidal}; exp3: homogeneous vs heterogeneous
    assert {k: counts[k] for k in ("exp1-tiny", "exp2-tiny", "exp3-tiny")} == \
        {"exp1-tiny": 4, "exp2-tiny": 4, "exp3-tiny": 2}


# --- jobs/sweep.py: bad input answered before Ray starts ----------------------------------------
@pytest.fixture
def sweep_job(monkeypatch, capsys):
    """jobs/sweep.py's main(argv) -> (exit code, captured output)."""
    import importlib
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    job = importlib.import_module("sweep")
    return lambda argv: (job.main(argv), capsys.readouterr())


def test_cli_refuses_bad_input_with_exit_code_2(tmp_path, sweep_job, train_char_data):
    rc, out = sweep_job(["--spec", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "No such file" in out.err
    rc, out = sweep_job(["--report", str(tmp_path)])
    assert rc == 2 and "is not a sweep directory (no sweep.json)" in out.err
    (tmp_path / "sweep.json").write_text('{"spec": {"name": "x"}')          # cut short
    rc, out = sweep_job(["--report", str(tmp_path)])
    assert rc == 2 and "not a sweep plan this version wrote" in out.err
    (tmp_path / "sweep.json").unlink()
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": {**BASE, "data_dir": str(tmp_path / "missing")},
                                 "storage_path": str(tmp_path)}))
    rc, out = sweep_job(["--spec", str(f)])
    assert rc == 2 and "prepare it with jobs/prepare.py" in out.err
    f.write_text(yaml.safe_dump({"base": {**BASE, "data_dir": str(train_char_data)}}))
    rc, out = sweep_job(["--spec", str(f), "--storage_path", "s3:/bucket/x"])   # a typo, not a folder
    assert rc == 2 and "looks like a URI without '//'" in out.err
    rc, out = sweep_job(["--spec", str(f), "--storage_path", "nosuch://bucket/x"])
    assert rc == 2 and "cannot open nosuch:// storage" in out.err
    rc, out = sweep_job(["--spec", str(f), "--storage_path", "s3://no-such-bucket-chimera/x"])
    assert rc == 2 and "s3://no-such-bucket-chimera" in out.err      # no such bucket / no network
    with pytest.raises(SystemExit):                    # argparse: --spec or --report is required
        sweep_job([])


def test_cli_dry_run_lists_trials_and_rejections(tmp_path, sweep_job, train_char_data):
    spec = {"base": {k: v for k, v in BASE.items() if k != "vocab_size"} | {"data_dir": str(train_char_data)},
            "layers": {"attn": {"gqa2": {"attn": "gqa", "n_kv_heads": 2},
                                "bad": {"attn": "gqa", "n_kv_heads": 3}}},
            "storage_path": str(tmp_path)}
    f = tmp_path / "dry.yaml"
    f.write_text(yaml.safe_dump(spec))
    rc, out = sweep_job(["--spec", str(f), "--dry_run"])
    assert rc == 0, out.err
    assert f"sweep dry -> {tmp_path / 'dry'}: 1 trial(s), 3 rejected" in out.out
    assert "t000  2×[gqa2+mlp]" in out.out and "not divisible by n_kv_heads=3" in out.out
    assert not (tmp_path / "dry").exists()             # a dry run writes nothing


def test_the_report_hook_sees_eval_records_only_also_after_a_resume(tmp_path):
    """Tune needs the metric in every report: a run resumed mid-way must not report its first
    log-only record (its val loss is not known yet)."""
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    from chimera.train.loop import train_fn_per_worker

    flags = {**{k: v for k, v in BASE.items() if k != "vocab_size"}, "n_layer": 1, "max_iters": 8,
             "eval": True, "eval_interval": 4, "eval_iters": 1, "log_interval": 1, "ckpt_interval": 4,
             "save_model": True, "storage_path": str(tmp_path)}
    first: list[dict] = []
    train_fn_per_worker(plan_run(load_train_config({**flags, "run_name": "a"})).worker_config,
                        report=first.append)
    assert [m["step"] for m in first] == [0, 4, 8]
    again: list[dict] = []
    resumed = {**flags, "run_name": "b", "resume_from": str(tmp_path / "a" / "checkpoint_000004")}
    train_fn_per_worker(plan_run(load_train_config(resumed)).worker_config, report=again.append)
    assert [m["step"] for m in again] == [8] and "val_loss" in again[0]


def test_trials_carry_their_resolved_model_and_old_sweep_files_are_upgraded(tmp_path, train_char_data):
    """A trial's model_config is what plan_run resolves for it; a sweep.json written before
    trials carried it (flags + a layer_configs JSON string in `train`) reads the same."""
    import json as _json

    from chimera.sweep.store import read_plan, write_plan
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    s = spec(layers={"groups": [1, 1], "attn": {"mla": MLA}, "ffn": {"moe": MOE}})
    plan = expand(s)
    t = plan.trials[0]
    assert "layer_configs" not in t.train and "n_embd" not in t.train
    flags = {**t.train, **{k: v for k, v in t.model_config.items() if k not in ("layers", "n_layer")},
             "layer_configs": _json.dumps(t.model_config["layers"])}
    assert plan_run(load_train_config(flags)).model_config == t.model_config
    write_plan(plan, tmp_path)
    doc = _json.loads((tmp_path / "sweep.json").read_text())
    for d in doc["trials"]:                              # what the older version wrote
        mc = d.pop("model_config")
        d["train"].update({k: v for k, v in mc.items() if k != "layers"},
                          layer_configs=_json.dumps(mc["layers"]))
    (tmp_path / "sweep.json").write_text(_json.dumps(doc))
    notes = []
    again = read_plan(tmp_path, log=notes.append)
    assert [d["model_config"] for d in again["trials"]] == [x.model_config for x in plan.trials]
    assert [d["train"] for d in again["trials"]] == [x.train for x in plan.trials]
    assert len(notes) == len(plan.trials) and "upgraded" in notes[0]


@pytest.mark.parametrize("data_dir,match", [
    ("s3:/bad", "looks like a URI without '//'"),
    ("/nonexistent/x", "base.data_dir /nonexistent/x: no manifest.json"),
])
def test_sweep_data_dir_flag_is_checked_before_anything_runs(sweep_job, data_dir, match):
    rc, out = sweep_job(["--spec", str(ROOT / "configs" / "sweeps" / "exp1-tiny.yaml"),
                         "--data_dir", data_dir, "--dry_run"])
    assert rc == 2 and match in out.err
