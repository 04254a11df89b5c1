"""A sweep spec expanded into trials: every combination resolved, validated, its budget
solved, before anything is launched.

    plan = expand(load_spec("configs/sweeps/exp1-tiny.yaml"))
    plan.trials                  # [Trial(name, choices, train, arch, model_config, budget_value, up_scale,
                                 #        config, seed)]
    plan.rejected                # [(choices, message)] invalid combinations, not launched

Trial configs are resolved here with Tune's own variant generator (its grid expansion and
sampling functions) so that every combination can be validated - and invalid ones counted and
reported - before anything is launched; Tune then runs exactly the valid list.

Data: every trial reads base's data folder, or, when `space` searches `tokenizer` (each trial
then reads <repo>/data/<dataset>_<tokenizer>) or `data_dir`, its own; each folder must be
prepared. Trials on different tokenizers must be ranked by bits per byte (spec.BPB_METRICS).
With a searcher (search: optuna | evolution) the plan starts empty: chimera.sweep.search
resolves each suggestion with resolve_trial, the function expand uses for every listed trial,
from the space search_space gives the searcher.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from chimera.sweep.spec import (SEARCHERS, SweepSpec, SweepSpecError, check_int,
                                check_metric_tokenizers, tune_domain)
from chimera.train.config import TrainConfig, TrainConfigError
from models import config as mconfig


@dataclass(frozen=True)
class Trial:
    name: str                       # short id, stable for a spec: t000, t001, ... (t000s0, t000s1,
                                    # ... with `seeds` > 1: configuration t000, replicas 0, 1, ...)
    choices: dict                   # what was picked: {"g0.attn": "mla", ..., "learning_rate": ...}
    train: dict                     # flat jobs/train.py training keys (data_dir absolute)
    arch: str                       # ModelConfig.summary()
    model_config: dict              # the resolved model (ModelConfig.to_dict()), as trained
    budget_value: int | None = None
    up_scale: float | None = None
    config: str | None = None       # with `seeds` > 1: its configuration (t000), shared by the replicas
    seed: int | None = None         # with `seeds` > 1: this replica's train seed
    ladder: dict | None = None      # a ladder's rung, budget and compute (chimera.sweep.ladder)


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    trials: list[Trial]
    rejected: list[tuple[dict, str]]


def _stack_layers(spec: SweepSpec, name: str) -> list[dict]:
    from models.config import ConfigError, read_layer_file
    src = spec.stacks[name]
    if isinstance(src, str):
        path = Path(src).expanduser().resolve()
        try:
            return read_layer_file(path)
        except (ConfigError, OSError) as e:
            raise SweepSpecError(f"stacks.{name}: {e}") from None
    if not isinstance(src, list) or not src:
        raise SweepSpecError(f"stacks.{name}: expected a JSONL path or a non-empty list of layer dicts")
    out: list[dict] = []
    for i, item in enumerate(src):
        if not isinstance(item, Mapping):
            raise SweepSpecError(f"stacks.{name}[{i}]: expected a layer dict")
        item = dict(item)
        n = check_int(f"stacks.{name}[{i}].repeat", item.pop("repeat", 1), 1)
        out += [dict(item) for _ in range(n)]
    return out


def _arch_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune
    pick = tune.grid_search if spec.search == "grid" else tune.choice
    if spec.stacks is not None:
        return {"stack": pick(sorted(spec.stacks))}
    if spec.layers is None:
        return {}
    lay = spec.layers
    groups = lay.get("groups") or [1] * int(spec.base.get("n_layer", 0) or 0)
    if not groups:
        raise SweepSpecError("layers: give `groups` or base.n_layer (one group per layer)")
    out: dict[str, Any] = {}
    for g in range(len(groups)):
        for part in ("attn", "ffn"):
            if lay.get(part):
                out[f"g{g}.{part}"] = pick(list(lay[part]))
    return out


def _layer_list(spec: SweepSpec, choices: Mapping[str, Any]) -> list[dict] | None:
    if spec.stacks is not None:
        return _stack_layers(spec, choices["stack"])
    if spec.layers is None:                  # base's own stack, if any, as jobs/train.py reads it
        return TrainConfig.from_dict(spec.base).layer_list()
    lay = spec.layers
    # an evolutionary search moves group boundaries: its trials carry their own group sizes
    groups = choices.get("layers.groups") or lay.get("groups") or [1] * int(spec.base["n_layer"])
    layers: list[dict] = []
    for g, count in enumerate(groups):
        d: dict = {}
        for part in ("attn", "ffn"):
            if lay.get(part):
                d.update(lay[part][choices[f"g{g}.{part}"]])
        layers += [dict(d) for _ in range(count)]
    return layers


def _model_config(train: Mapping[str, Any], layers: list[dict] | None, up_scale: float | None,
                  multiple: int, data_vocab: int):
    """A trial's ModelConfig (chimera.train.config.resolve_model, as plan_run resolves a run's),
    its layers' FFN widths scaled by up_scale when a budget is solved."""
    from chimera.train.plan import resolve_model
    flags = {k: v for k, v in train.items() if k in mconfig.MODEL_KEYS}
    if layers is not None:
        flags.pop("n_layer", None)
        base_up = flags.pop("up_dim", None)
        if up_scale is not None:
            layers = [{**ld, "up_dim": max(multiple, int(round(up_scale * ld.get("up_dim", base_up or 512)
                                                                 / multiple)) * multiple)}
                      for ld in layers]
        elif base_up is not None:
            layers = [{"up_dim": base_up, **ld} for ld in layers]
        return resolve_model(flags, layers, data_vocab)
    if up_scale is not None:
        flags["up_dim"] = max(multiple, int(round(up_scale * flags.get("up_dim", 512) / multiple)) * multiple)
    return resolve_model(flags, None, data_vocab)


def measure(cfg, kind: str) -> int:
    """Active params or training FLOPs/token of a config, on the meta device (no memory)."""
    import torch
    from models import LLM
    with torch.device("meta"):
        m = LLM(cfg)
    return m.num_params().active if kind == "active_params" else m.flops_per_token()


def solve_budget(train: Mapping[str, Any], layers: list[dict] | None, budget: Mapping[str, Any],
                 data_vocab: int):
    """Scale every layer's up_dim by one factor so the measure hits the budget.
    Returns (model config, achieved value, scale); SweepSpecError if out of tolerance."""
    kind = "active_params" if "active_params" in budget else "flops_per_token"
    target, tol, mult = budget[kind], float(budget.get("tolerance", 0.02)), int(budget.get("multiple", 8))

    def at(s):
        c = _model_config(train, layers, s, mult, data_vocab)
        return c, measure(c, kind)

    # the measure is affine in the widths (up to rounding to `multiple`): secant steps
    (c, v), s0 = at(1.0), 1.0
    best = (c, v, 1.0)
    s1 = 2.0
    for _ in range(4):
        c1, v1 = at(s1)
        if abs(v1 - target) < abs(best[1] - target):
            best = (c1, v1, s1)
        if v1 == v or abs(v1 / target - 1) <= tol / 4:
            break
        s0, v, s1 = s1, v1, max(1e-3, s1 + (target - v1) * (s1 - s0) / (v1 - v))
    c, v, s = best
    if abs(v / target - 1) > tol:
        floor = at(1e-3)[1]
        why = (f"the rest of the model alone has {floor:,}" if floor > target
               else f"the closest up_dim gives {v:,}")
        raise SweepSpecError(f"budget {kind}={target:,} cannot be met within {tol:.0%}: {why}")
    return c, v, s


def base_data_dir(spec: SweepSpec, train: Mapping[str, Any] | None = None) -> Path:
    """The trials' data folder: base.data_dir, else the default folder of base.dataset and
    base.tokenizer (chimera.paths); absolute, since trials run elsewhere (Ray changes the cwd).
    `train` (base + a trial's choices): that trial's folder, when space searches tokenizer or
    data_dir."""
    from chimera.paths import resolve_data_dir
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    d = spec.base if train is None else train
    return resolve_data_dir(d.get("data_dir"), d.get("dataset", fields["dataset"]), d.get("tokenizer"))


def data_tokenizer(spec: SweepSpec, train: Mapping[str, Any] | None = None) -> dict:
    """The tokenizer (manifest dict) of the trials' data, or of one trial's (`train`, as in
    base_data_dir); the data directory must be prepared already, with the tokenizer named, and
    base.vocab_size, when given, must hold its vocabulary."""
    from chimera.data.shards import read_manifest
    d = spec.base if train is None else train
    space = (spec.space or {}) if train is not None else {}
    data_dir = base_data_dir(spec, train)
    where = (f"space.data_dir {data_dir}" if "data_dir" in space else
             f"space.tokenizer={d.get('tokenizer')!r}: {data_dir}" if "tokenizer" in space else
             f"base.data_dir {data_dir}")
    try:
        tok = read_manifest(data_dir)["tokenizer"]
        v = int(tok["vocab_size"])
    except Exception as e:
        from chimera.paths import job_copy_hint
        hint = job_copy_hint("base.data_dir") if "data_dir" not in d else ""
        raise SweepSpecError(f"{where}: {e} (prepare it with jobs/prepare.py){hint}") from None
    if d.get("tokenizer") not in (None, tok.get("name")):
        raise SweepSpecError(f"{'space' if 'tokenizer' in space else 'base'}.tokenizer="
                             f"{d['tokenizer']!r} but {data_dir} was prepared with {tok.get('name')!r}")
    if "vocab_size" in spec.base:
        if int(spec.base["vocab_size"]) < v:
            raise SweepSpecError(f"base.vocab_size={spec.base['vocab_size']} is smaller than the "
                                 f"dataset's tokenizer vocabulary ({v})")
    return tok


def data_vocab(spec: SweepSpec) -> int:
    """The vocabulary of the trials' data (its tokenizer's); see data_tokenizer."""
    return int(data_tokenizer(spec)["vocab_size"])


def _train_keys(spec: SweepSpec, choices: Mapping[str, Any]) -> dict[str, Any]:
    """base + a trial's train.py choices (not its architecture keys)."""
    return {**spec.base, **{k: v for k, v in choices.items() if "." not in k and k != "stack"}}


def trial_data(spec: SweepSpec, train: Mapping[str, Any], data: dict) -> tuple[Path, dict]:
    """A trial's data folder and tokenizer (data_tokenizer), checked once per folder (`data`)."""
    d = base_data_dir(spec, train)
    if d not in data:
        data[d] = data_tokenizer(spec, train)
    return d, data[d]


def resolve_trial(spec: SweepSpec, choices: Mapping[str, Any], name: str,
                  data: dict | None = None) -> Trial:
    """One trial from its choices (arch keys `g<i>.attn`, `g<i>.ffn`, `stack`, `layers.groups`;
    the rest train.py keys): its data folder and tokenizer (its own with space.tokenizer /
    data_dir), its layers built, its budget solved, model and training config validated. Both
    the fixed trial lists (expand) and the searchers' suggestions (chimera.sweep.search) go
    through here. `data`: a cache folder -> tokenizer, filled here. SweepSpecError with the
    validation message; a folder that is not prepared is one too."""
    from models.config import ConfigError

    choices = dict(choices)
    train = _train_keys(spec, choices)
    data_dir, tok = trial_data(spec, train, {} if data is None else data)
    vocab = int(tok["vocab_size"])
    try:
        layers = _layer_list(spec, choices)
        if spec.budget is not None:
            cfg, value, scale = solve_budget(train, layers, spec.budget, vocab)
        else:
            cfg, value, scale = _model_config(train, layers, None, 8, vocab), None, None
        # the trial carries its resolved model; `train` keeps the training keys only
        out = {k: v for k, v in train.items()
               if k not in mconfig.MODEL_KEYS and k not in ("layer_configs", "layer_configs_jsonl")}
        out["data_dir"] = str(data_dir)          # trials run elsewhere (Ray changes the cwd)
        out["tokenizer"] = tok["name"]
        TrainConfig.from_dict(out)
    except (ConfigError, TrainConfigError) as e:
        raise SweepSpecError(str(e)) from None
    return Trial(name=name, choices=choices, train=out, arch=cfg.summary(),
                 model_config=cfg.to_dict(), budget_value=value, up_scale=scale)


def expand(spec: SweepSpec) -> SweepPlan:
    """Resolve every trial (Tune's variant generator), validate it, solve its budget. With a
    searcher (search: optuna | evolution) trials are chosen while the sweep runs: the plan
    starts empty, once the space is checked (search_plan)."""
    if spec.ladder is not None:          # each rung expanded by this function (chimera.sweep.ladder)
        from chimera.sweep.ladder import expand_ladder
        return expand_ladder(spec, expand, _stack_layers, measure)
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    if spec.search in SEARCHERS:
        return search_plan(spec)

    space = {**_arch_space(spec), **{k: tune_domain(f"space.{k}", v) for k, v in (spec.space or {}).items()}}
    random_parts = spec.search == "random" or any(
        isinstance(v, Mapping) and next(iter(v)) != "grid" for v in (spec.space or {}).values())
    data: dict[Path, dict] = {}        # data folder -> its tokenizer; checked once per folder
    rng = np.random.RandomState(spec.seed)
    variants: list[dict] = []
    for _ in range(spec.num_samples if random_parts else 1):     # a pure grid needs one pass
        variants += [resolved for _, resolved in generate_variants(space, random_state=rng)]
    trials, rejected = [], []
    for choices in variants:
        trial_data(spec, _train_keys(spec, choices), data)    # a folder not prepared fails the spec
        try:
            trials.append(resolve_trial(spec, choices, f"t{len(trials):03d}", data))
        except SweepSpecError as e:
            rejected.append((choices, str(e)))
    if not trials:
        msgs = "; ".join(sorted({m for _, m in rejected}))[:500]
        raise SweepSpecError(f"no valid trial in the search space ({len(rejected)} rejected: {msgs})")
    check_metric_tokenizers(spec.metric, {t.train["tokenizer"] for t in trials})
    return SweepPlan(spec=spec, trials=replicate(trials, spec.seeds), rejected=rejected)


def replicate(configs: list[Trial], seeds: int) -> list[Trial]:
    """`seeds` > 1: every configuration once per seed, t000 -> t000s0, t000s1, ... with train
    seed = the configuration's seed + 0, 1, ... (init and data order differ; model, budget and
    choices are the same). Round by round (every configuration's s0, then s1, ...), so an
    interrupted sweep holds whole rounds. seeds == 1: the trials as they are."""
    if seeds == 1:
        return configs
    out = []
    for s in range(seeds):
        for t in configs:
            seed = TrainConfig.from_dict(t.train).seed + s
            out.append(dataclasses.replace(t, name=f"{t.name}s{s}", config=t.name, seed=seed,
                                           train={**t.train, "seed": seed}))
    return out


# --- the space a searcher (chimera.sweep.search) picks from ----------------------------------------
def search_space(spec: SweepSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Tune domains the searcher picks from, constants every trial gets)."""
    from ray import tune
    from ray.tune.search.sample import Domain

    space: dict[str, Any] = dict(_arch_space(spec))        # tune.choice per group / of the stacks
    consts: dict[str, Any] = {}
    for k, v in (spec.space or {}).items():
        if isinstance(v, Mapping) and next(iter(v)) == "grid":
            tune_domain(f"space.{k}", v)                   # its checks
            space[k] = tune.choice(list(v["grid"]))
        else:
            d = tune_domain(f"space.{k}", v)
            (space if isinstance(d, Domain) else consts)[k] = d
    if not space:
        raise SweepSpecError(f"search={spec.search!r}: nothing to search (give layers, stacks or a "
                             f"sampled space key)")
    return space, consts


def search_plan(spec: SweepSpec, tries: int = 32) -> SweepPlan:
    """The plan of a searcher sweep: no trials yet. Refused early when the data is missing or
    none of `tries` random samples of the space is a valid trial."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    space, consts = search_space(spec)
    data: dict = {}
    rng = np.random.RandomState(spec.seed)
    errors = []
    for _ in range(tries):
        _, choices = next(generate_variants({**space, **consts}, random_state=rng))
        try:
            resolve_trial(spec, choices, "check", data)
            return SweepPlan(spec=spec, trials=[], rejected=[])
        except SweepSpecError as e:
            errors.append(str(e))
    raise SweepSpecError(f"no valid trial among {tries} random samples of the search space "
                         f"({'; '.join(sorted(set(errors)))[:500]})")
