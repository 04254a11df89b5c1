"""Sweep specs: the frozen `SweepSpec` (every key with its default and meaning) and its YAML
loader. chimera.sweep.trials expands a spec into checked trials.

    spec = load_spec("configs/sweeps/exp1-tiny.yaml")      # SweepSpecError on any bad key

A spec (YAML) holds:
    name, storage_path            the sweep directory is <storage_path>/<name>
    base:                         jobs/train.py keys (model and training mixed, as in --config)
    layers:                       per-layer choices: `groups` (layer counts, summing to the
      groups: [2, 2]              model depth; one group per layer if absent), and named
      attn: {gqa2: {...}, ...}    attention / FFN options (layer-dict keys); each group picks
      ffn: {mlp: {...}, ...}      one attention and one FFN option
    stacks:                       or whole stacks as candidates: name -> JSONL path or a list
      hetero: configs/hetero.jsonl   of layer dicts (an item may hold `repeat: N`)
    space:                        hyperparameters: key -> {loguniform|uniform: [lo, hi]},
      learning_rate: {loguniform: [1.0e-4, 1.0e-2]}   {randint: [lo, hi)}, {choice: [...]},
      pos_emb: {grid: [rope, sin]}                {grid: [...]} or a constant
      tokenizer: {grid: [char, gpt2]}             each trial reads data/<dataset>_<tokenizer>
    search: grid | random         architecture options as a grid (default) or sampled,
            | optuna | evolution  or chosen while the sweep runs (chimera.sweep.search)
    num_samples: 1                samples of the random parts (times every grid point);
                                  with a searcher: the number of trials
    objectives: {val_loss: min, kv_bytes_per_token: min, decode_tokens_per_s: max}
    population: 8                 searchers: random trials first (evolution's population)
    seed: 0
    metric: val_loss | train_loss | val_bpb | train_bpb, mode: min
    budget: {active_params: N | flops_per_token: N, tolerance: 0.02, multiple: 8}
    scheduler: {type: fifo | asha, time_attr: step | tokens, grace_period, reduction_factor}
    max_concurrent: 2
    resources: {num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    decode_tokens: 32             tokens timed after training (batch 1, KV cache)
    seeds: 3                      runs of every configuration (train seeds base.seed + 0, 1, 2)
    significance: 0.05            the level of the test against the best configuration
    ladder: {sizes: [...] | flops: [...], target_flops, validate, ...}   a scaling ladder
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chimera.train.config import TrainConfig, TrainConfigError, config_keys, opt

SAMPLERS = ("loguniform", "uniform", "randint", "choice", "grid")
METRICS = ("val_loss", "train_loss", "val_bpb", "train_bpb")   # measured at every eval, so in
                                                                # every report to Tune
BPB_METRICS = ("val_bpb", "train_bpb")    # bits per byte of text: comparable across tokenizers
SEARCHERS = ("optuna", "evolution")       # suggest trials while the sweep runs (chimera.sweep.search)
# what a searcher may optimise, besides METRICS: measured for every trial (the report's columns)
OBJECTIVES = METRICS + ("kv_bytes_per_token", "decode_tokens_per_s", "params_active", "params_total",
                        "flops_per_token", "tokens_per_s")


class SweepSpecError(ValueError):
    """A sweep spec key is unknown, of the wrong type, or inconsistent."""


def _hint(key: str, valid) -> str:
    m = difflib.get_close_matches(key, sorted(valid), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _keys(where: str, d: Any, valid) -> dict:
    if not isinstance(d, Mapping):
        raise SweepSpecError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            raise SweepSpecError(f"{where}: unknown key {k!r}{_hint(str(k), valid)}")
    return dict(d)


def check_int(where: str, v: Any, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise SweepSpecError(f"{where}={v!r} must be an integer >= {lo}")
    return v


@dataclass(frozen=True)
class SweepSpec:
    """Every key of a sweep spec, declared once with its meaning: load_spec accepts exactly
    these, and docs/parameters.md's sweep spec table is generated from them."""
    name: str = field(metadata={"help": "the sweep directory is `<storage_path>/<name>`",
                                "doc_default": "the spec file's name"})
    base: Mapping[str, Any] = field(metadata={
        "help": "`jobs/train.py` keys every trial starts from (model and training keys mixed, as in "
                "`--config`)", "doc_default": "required"})
    storage_path: str | None = opt(None, "where sweeps go (`--storage_path` overrides)", "<repo>/runs")
    layers: Mapping[str, Any] | None = opt(None, (
        "per-layer choices: `groups` (layer counts summing to the depth; one group per layer if "
        "absent), `attn` and `ffn`: named options, each a dict of layer keys. Every group picks one "
        "attention and one FFN option"))
    stacks: Mapping[str, Any] | None = opt(None, (
        "whole stacks as candidates instead: name → a JSONL layer file (seed format) or a list of "
        "layer dicts; an item may carry `repeat: N`"))
    space: Mapping[str, Any] = opt({}, (
        "other keys → `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi "
        "excluded), `{choice: [...]}`, `{grid: [...]}` or a constant. `tokenizer` (or `data_dir`) "
        "gives each trial its own data folder, `<repo>/data/<dataset>_<tokenizer>` (rank those by "
        "`val_bpb`)"))
    search: str = opt("grid", ("`grid`: every architecture option combination; `random`: options "
                               "sampled (`num_samples` times); `optuna` (TPE) or `evolution` (per-layer "
                               "mutations): a searcher picks each trial from the completed ones, as the "
                               "sweep runs (docs/sweeps.md)"))
    num_samples: int = opt(1, ("samples of the random parts (each grid point is sampled that often); "
                               "with a searcher: the number of trials"))
    seed: int = opt(0, "seed of the sampling (the trial list is reproducible); the trials' train seed "
                       "is `base.seed`, replicas are `seeds`")
    metric: str = opt("val_loss", (
        "what ranks trials and drives ASHA: `val_loss` (ranked by the run's best) or `train_loss`, "
        "per token; `val_bpb` (ranked by the run's best) or `train_bpb`, in bits per byte of text "
        "(all measured at every eval). Trials on different tokenizers (`space.tokenizer` / "
        "`space.data_dir`) must be ranked by a bpb metric. The table holds every other metric for "
        "sorting by hand"))
    mode: str = opt("min", "`min` or `max` of the metric")
    budget: Mapping[str, Any] | None = opt(None, (
        "`{active_params: N}` or `{flops_per_token: N}`, `tolerance` (fraction, 0.02), `multiple` "
        "(8): every trial's FFN widths are scaled by one factor until the measure is within the "
        "tolerance; the achieved value is recorded"))
    scheduler: Mapping[str, Any] = opt({"type": "fifo"}, (
        "`{type: fifo}` or `{type: asha, time_attr: step | tokens, grace_period, reduction_factor}` "
        "(ASHA's rungs are the eval points; grace period defaults to one eval interval)"))
    max_concurrent: int = opt(1, "trials at a time")
    resources: Mapping[str, Any] = opt({}, (
        "`num_workers` (Ray Train workers per trial, 1), `cpus_per_worker` (also its torch "
        "threads, 1), `gpus_per_worker` (0 or 1; 0)"))
    decode_tokens: int = opt(32, "tokens timed after training (batch 1, KV cache) for the decode speed; 0 skips")
    ladder: Mapping[str, Any] | None = opt(None, (
        "a scaling ladder: every configuration runs at every rung. `sizes: [{n_embd, n_layer, ...}, "
        "...]` (model keys over `base`; tokens = `tokens_per_param` (20) × active params) or `flops: "
        "[C, ...]` (training FLOP budgets of the base size; tokens = C ÷ FLOPs/token), >= 3 rungs; "
        "each rung's steps = tokens ÷ tokens per step. `target_flops` (required): where the fits "
        "L(C) = E + A·C^(−α) predict each configuration's loss and the winner; `validate`: one more "
        "size / FLOP budget, run but held out of the fit, checked against its predicted interval; "
        "`bootstrap` (1000; 0: no intervals), `confidence` (0.95). See docs/sweeps.md"))
    description: str = opt("", "free text, for people")
    # --- replicas and their statistics (chimera.sweep.stats) ---
    seeds: int = opt(1, (
        "runs of every configuration, as separate Tune trials `t003s0`, `t003s1`, ... with train "
        "`seed` = base seed + 0, 1, ... (init and data order). The report groups them: mean ± 95% CI "
        "per configuration and Welch's t-test against the best. 1: one run each, no significance "
        "claimed"))
    significance: float = opt(0.05, (
        "the level of the two-sided Welch t-test of each configuration against the best one: p >= "
        "this is `tied` with the best, below it `worse` (0 < level < 1)"))
    # --- searchers (search: optuna | evolution; chimera.sweep.search) ------------------------------
    objectives: Mapping[str, str] | None = opt(None, (
        "what `search: optuna | evolution` optimise: an ordered mapping name → `min` | `max`, e.g. "
        "`{val_loss: min, kv_bytes_per_token: min, decode_tokens_per_s: max}` (names: "
        + ", ".join(f"`{o}`" for o in OBJECTIVES) + "). Two or more: multi-objective (Optuna's "
        "multi-objective TPE; evolution selects parents by Pareto rank) and the report shows the "
        "Pareto front. `val_loss` counts as the run's best"), "`{metric: mode}`")
    population: int = opt(8, (
        "searchers: the first `population` suggestions are random samples; evolution then breeds "
        "from the best `population` completed trials (binary tournament by Pareto rank, one change "
        "per child); for optuna it is TPE's `n_startup_trials`"))

    def __post_init__(self) -> None:
        if self.storage_path is not None and not isinstance(self.storage_path, str):
            raise SweepSpecError(f"storage_path={self.storage_path!r} must be a path (a string)")
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name in (".", ".."):
            raise SweepSpecError(f"name={self.name!r} must be a plain non-empty name (no '/')")
        base = _keys("base", self.base, config_keys())
        for k in ("storage_path", "run_name", "resume_from"):
            if k in base:
                raise SweepSpecError(f"base.{k}: set by the sweep, not in base")
        for k in ("init_from", "lora_rank", "lora_alpha", "lora_targets"):
            if k in base:             # a trial's model is the sweep's; a fine-tuning run's is its source's
                raise SweepSpecError(f"base.{k}: sweeps train their trials' own architectures; "
                                     f"fine-tuning runs (init_from, LoRA) are not swept — use jobs/train.py")
        try:
            TrainConfig.from_dict(base)
        except TrainConfigError as e:
            raise SweepSpecError(f"base: {e}") from None
        if self.layers is not None and self.stacks is not None:
            raise SweepSpecError("give at most one of layers (per-layer choices) and stacks")
        if self.layers is not None:
            lay = _keys("layers", self.layers, {"groups", "attn", "ffn"})
            for part in ("attn", "ffn"):
                opts = lay.get(part)
                if opts is None:
                    continue
                if not isinstance(opts, Mapping) or not opts:
                    raise SweepSpecError(f"layers.{part}: expected a non-empty mapping name -> layer keys")
                for n, o in opts.items():
                    if not isinstance(o, Mapping):
                        raise SweepSpecError(f"layers.{part}.{n}: expected a mapping of layer keys")
            if "groups" in lay and (not isinstance(lay["groups"], list) or not lay["groups"]
                                    or any(not isinstance(g, int) or isinstance(g, bool) or g < 1
                                           for g in lay["groups"])):
                raise SweepSpecError(f"layers.groups={lay['groups']!r} must be a list of layer counts >= 1")
        if (self.layers is not None or self.stacks is not None) and (
                base.get("layer_configs") or base.get("layer_configs_jsonl")):
            raise SweepSpecError("base.layer_configs(_jsonl) and layers/stacks choices exclude each other")
        if (self.layers is not None and self.layers.get("groups") and "n_layer" in base
                and sum(self.layers["groups"]) != base["n_layer"]):
            raise SweepSpecError(f"layers.groups={list(self.layers['groups'])} sums to "
                                 f"{sum(self.layers['groups'])} layers but base.n_layer={base['n_layer']}")
        if self.stacks is not None and (not isinstance(self.stacks, Mapping) or not self.stacks):
            raise SweepSpecError("stacks: expected a non-empty mapping name -> JSONL path or layer list")
        space = _keys("space", self.space or {}, config_keys())
        for k, v in space.items():
            if k in ("storage_path", "run_name", "resume_from", "init_from", "lora_rank", "lora_alpha",
                     "lora_targets", "dataset", "vocab_size",
                     "num_workers", "use_gpu", "num_threads", "layer_configs", "layer_configs_jsonl"):
                raise SweepSpecError(f"space.{k}: cannot be searched"
                                     + (" (use `stacks` for layer files)" if "layer" in k else ""))
            if k == "n_layer" and (self.layers is not None or self.stacks is not None):
                raise SweepSpecError("space.n_layer: the depth comes from layers.groups / stacks")
            tune_domain(f"space.{k}", v)         # checks the sampler form
        check_data_space(base, space)
        if self.search not in ("grid", "random") + SEARCHERS:
            raise SweepSpecError(f"search={self.search!r} must be 'grid' or 'random' (trials listed before "
                                 f"launch), or a searcher: {' or '.join(map(repr, SEARCHERS))}")
        check_int("num_samples", self.num_samples, 1)
        check_int("seed", self.seed, 0)
        check_int("max_concurrent", self.max_concurrent, 1)
        check_int("decode_tokens", self.decode_tokens, 0)
        check_int("seeds", self.seeds, 1)
        if (not isinstance(self.significance, (int, float)) or isinstance(self.significance, bool)
                or not 0 < self.significance < 1):
            raise SweepSpecError(f"significance={self.significance!r} must be a level in (0, 1), e.g. 0.05")
        if self.seeds > 1 and "seed" in space:
            raise SweepSpecError(f"space.seed: with seeds={self.seeds} the sweep sets every trial's seed "
                                 f"(base seed + 0..{self.seeds - 1}); remove space.seed or set seeds: 1")
        if self.metric not in METRICS:
            raise SweepSpecError(f"metric={self.metric!r} must be one of {', '.join(METRICS)}")
        if self.mode not in ("min", "max"):
            raise SweepSpecError(f"mode={self.mode!r} must be 'min' or 'max'")
        if self.budget is not None:
            b = _keys("budget", self.budget, {"active_params", "flops_per_token", "tolerance", "multiple"})
            kinds = [k for k in ("active_params", "flops_per_token") if k in b]
            if len(kinds) != 1:
                raise SweepSpecError("budget: give exactly one of active_params and flops_per_token")
            check_int(f"budget.{kinds[0]}", b[kinds[0]], 1)
            tol = b.get("tolerance", 0.02)
            if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 < tol < 1:
                raise SweepSpecError(f"budget.tolerance={tol!r} must be a fraction in (0, 1)")
            check_int("budget.multiple", b.get("multiple", 8), 1)
            if "up_dim" in space:
                raise SweepSpecError("space.up_dim: the budget solves up_dim; do not search it")
        sch = _keys("scheduler", self.scheduler, {"type", "time_attr", "grace_period", "reduction_factor"})
        if sch.get("type", "fifo") not in ("fifo", "asha"):
            raise SweepSpecError(f"scheduler.type={sch.get('type')!r} must be 'fifo' or 'asha'")
        if sch.get("time_attr", "step") not in ("step", "tokens"):
            raise SweepSpecError(f"scheduler.time_attr={sch.get('time_attr')!r} must be 'step' or 'tokens'")
        if "grace_period" in sch:
            check_int("scheduler.grace_period", sch["grace_period"], 1)
        rf = sch.get("reduction_factor", 2)
        if not isinstance(rf, (int, float)) or isinstance(rf, bool) or not 1 < rf < float("inf"):
            raise SweepSpecError(f"scheduler.reduction_factor={rf!r} must be a number > 1")
        self._check_search()
        res = _keys("resources", self.resources, {"num_workers", "cpus_per_worker", "gpus_per_worker"})
        check_int("resources.num_workers", res.get("num_workers", 1), 1)
        check_int("resources.cpus_per_worker", res.get("cpus_per_worker", 1), 1)
        if res.get("gpus_per_worker", 0) not in (0, 1) or isinstance(res.get("gpus_per_worker"), bool):
            raise SweepSpecError(f"resources.gpus_per_worker={res.get('gpus_per_worker')!r} must be 0 or 1")
        if self.ladder is not None:
            check_ladder(self)

    def _check_search(self) -> None:
        """The searcher keys (objectives, population)."""
        if self.objectives is not None:
            obj = _keys("objectives", self.objectives, OBJECTIVES)
            if not obj:
                raise SweepSpecError("objectives: expected at least one name -> min | max")
            for k, d in obj.items():
                if d not in ("min", "max"):
                    raise SweepSpecError(f"objectives.{k}={d!r} must be 'min' or 'max'")
            if self.search not in SEARCHERS:
                raise SweepSpecError(f"objectives: only a searcher optimises them (search: "
                                     f"{' or '.join(SEARCHERS)}), not search={self.search!r}")
        check_int("population", self.population, 1)
        if self.search in SEARCHERS:         # a searcher picks each trial once, from a flat space
            if self.seeds != 1:
                raise SweepSpecError(f"seeds={self.seeds}: not with search={self.search!r} (a searcher "
                                     f"suggests each configuration once); use grid or random search "
                                     f"for replicas, or seeds: 1")
            if self.ladder is not None:
                raise SweepSpecError(f"ladder: not with search={self.search!r} (a ladder runs every "
                                     f"configuration at every rung); use grid or random search")

    @property
    def objective_modes(self) -> dict[str, str]:
        """name -> min | max, in order; the first is the primary one (`{metric: mode}` by default)."""
        return dict(self.objectives) if self.objectives else {self.metric: self.mode}

    # --- derived ---------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return int(self.resources.get("num_workers", 1))

    @property
    def cpus_per_worker(self) -> float:
        return float(self.resources.get("cpus_per_worker", 1))

    @property
    def gpus_per_worker(self) -> float:
        return float(self.resources.get("gpus_per_worker", 0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_data_space(base: Mapping[str, Any], space: Mapping[str, Any]) -> None:
    """`space.tokenizer` / `space.data_dir`: each trial reads its own data folder (the default
    folder of its tokenizer, or the folder given), so the search can compare tokenizers."""
    from chimera.data.tokenizers import TOKENIZERS
    if "tokenizer" in space and "data_dir" in space:
        raise SweepSpecError("space: give at most one of tokenizer and data_dir (a data folder "
                             "fixes its tokenizer)")
    if "tokenizer" in space and base.get("data_dir"):
        raise SweepSpecError("space.tokenizer: base.data_dir fixes one tokenizer; drop it so that "
                             "each trial reads <repo>/data/<dataset>_<tokenizer>, or search "
                             "space.data_dir instead")
    v = space.get("tokenizer")
    names = v if not isinstance(v, Mapping) else next(iter(v.values()))
    for n in (names if isinstance(names, list) else [names] if "tokenizer" in space else []):
        if n not in TOKENIZERS:
            raise SweepSpecError(f"space.tokenizer: {n!r} is not a tokenizer; choose from "
                                 f"{', '.join(TOKENIZERS)}")


def check_metric_tokenizers(metric: str, tokenizers) -> None:
    """Loss per token depends on the tokenizer: trials on different ones rank by bits per byte."""
    names = sorted({str(t) for t in tokenizers if t is not None})
    if len(names) > 1 and metric not in BPB_METRICS:
        raise SweepSpecError(
            f"metric={metric!r}: the trials use different tokenizers ({', '.join(names)}) and a "
            f"loss per token does not compare across tokenizers; use metric: val_bpb (bits per "
            f"byte of text) or train_bpb")


LADDER_KEYS = ("sizes", "flops", "tokens_per_param", "target_flops", "validate", "bootstrap", "confidence")


def flops_value(where: str, v: Any) -> float:
    """A FLOP count > 0; YAML reads `1.0e15` (no exponent sign) as a string, so numeric text counts."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
        raise SweepSpecError(f"{where}={v!r} must be a number of FLOPs > 0")
    return float(v)


def _ladder_size(spec: SweepSpec, where: str, size: Any) -> dict:
    from models.config import MODEL_KEYS
    d = _keys(where, size, set(MODEL_KEYS) - {"vocab_size"})
    if not d:
        raise SweepSpecError(f"{where}: an empty size (give model keys such as n_embd, n_layer)")
    for k, v in d.items():
        if k in (spec.space or {}):
            raise SweepSpecError(f"{where}.{k}: searched in space too; a size must not set it")
    if "n_layer" in d:
        n = check_int(f"{where}.n_layer", d["n_layer"], 1)
        lay = spec.layers
        if lay is not None and not lay.get("groups"):
            raise SweepSpecError(f"{where}.n_layer: layers without `groups` choose per layer, so the "
                                 f"depth cannot change; give layers.groups (scaled to each depth)")
        if lay is not None and any(g * n % sum(lay["groups"]) for g in lay["groups"]):
            raise SweepSpecError(f"{where}.n_layer={n}: layers.groups={list(lay['groups'])} cannot be "
                                 f"scaled to {n} layers (each group × {n}/{sum(lay['groups'])} must be "
                                 f"a whole number)")
    return d


def check_ladder(spec: SweepSpec) -> None:
    """The `ladder` section (SweepSpec.ladder's help; chimera.sweep.ladder expands it)."""
    lad = _keys("ladder", spec.ladder, LADDER_KEYS)
    kinds = [k for k in ("sizes", "flops") if k in lad]
    if len(kinds) != 1:
        raise SweepSpecError("ladder: give exactly one of sizes (model sizes, tokens by "
                             "tokens_per_param) and flops (training FLOP budgets of the base size)")
    kind = kinds[0]
    rungs = lad[kind]
    if not isinstance(rungs, list) or len(rungs) < 3:
        raise SweepSpecError(f"ladder.{kind}: expected a list of >= 3 rungs (a power law has 3 "
                             f"parameters), got {rungs!r}")
    if kind == "sizes":
        sizes = [_ladder_size(spec, f"ladder.sizes[{i}]", s) for i, s in enumerate(rungs)]
        if len({tuple(sorted(s.items())) for s in sizes}) < len(sizes):
            raise SweepSpecError("ladder.sizes: two rungs are the same size")
        if spec.budget is not None:
            raise SweepSpecError("ladder.sizes and budget exclude each other (the budget fixes the "
                                 "size every rung changes); use ladder.flops with a budget")
        tpp = lad.get("tokens_per_param", 20)
        if not isinstance(tpp, (int, float)) or isinstance(tpp, bool) or not 0 < tpp < float("inf"):
            raise SweepSpecError(f"ladder.tokens_per_param={tpp!r} must be a number > 0")
        if "validate" in lad:
            _ladder_size(spec, "ladder.validate", lad["validate"])
    else:
        budgets = [flops_value(f"ladder.flops[{i}]", c) for i, c in enumerate(rungs)]
        if len(set(budgets)) < len(budgets):
            raise SweepSpecError("ladder.flops: two rungs have the same budget")
        if "tokens_per_param" in lad:
            raise SweepSpecError("ladder.tokens_per_param: only with ladder.sizes (a FLOP budget sets "
                                 "the tokens itself)")
        if "validate" in lad:
            flops_value("ladder.validate", lad["validate"])
    if "target_flops" not in lad:
        raise SweepSpecError("ladder.target_flops: required (the compute at which the fits predict "
                             "each configuration's loss)")
    flops_value("ladder.target_flops", lad["target_flops"])
    b = lad.get("bootstrap", 1000)
    if not isinstance(b, int) or isinstance(b, bool) or not (b == 0 or b >= 100):
        raise SweepSpecError(f"ladder.bootstrap={b!r} must be 0 (no intervals) or an integer >= 100")
    conf = lad.get("confidence", 0.95)
    if not isinstance(conf, float) or not 0.5 <= conf < 1:
        raise SweepSpecError(f"ladder.confidence={conf!r} must be a fraction in [0.5, 1)")
    if spec.mode != "min":
        raise SweepSpecError("ladder: mode must be 'min' (the fit is of a loss falling with compute)")
    if dict(spec.scheduler).get("type", "fifo") != "fifo":
        raise SweepSpecError("ladder: scheduler must be fifo (a rung's point is its run's final loss; "
                             "ASHA would stop runs early)")
    for where, d in (("base", spec.base), ("space", spec.space or {})):
        if "max_iters" in d:
            raise SweepSpecError(f"{where}.max_iters: a ladder derives each rung's steps from its "
                                 f"budget; remove it")


def spec_keys() -> tuple[str, ...]:
    """The keys a spec file may hold: SweepSpec's fields."""
    return tuple(f.name for f in dataclasses.fields(SweepSpec))


def load_spec(path: str | Path, **overrides: Any) -> SweepSpec:
    """Read a YAML (.yaml/.yml) or JSON spec; `overrides` (e.g. storage_path from the CLI) win;
    `data_dir` goes into its base (the data of every trial).
    Relative paths in it resolve against the current directory."""
    from chimera.train.config import read_config_file
    p = Path(path)
    d = read_config_file(p, "--spec", SweepSpecError)
    _keys(f"--spec {p}", d, spec_keys())
    data_dir = overrides.pop("data_dir", None)
    d.update({k: v for k, v in overrides.items() if v is not None})
    if data_dir is not None:            # --data_dir: every trial's data (e.g. s3://.../x)
        if not isinstance(d.get("base"), dict):
            raise SweepSpecError(f"--spec {p}: missing 'base' (the jobs/train.py keys of every trial)")
        d["base"] = {**d["base"], "data_dir": data_dir}
    if "name" not in d:
        d["name"] = p.stem
    if "base" not in d:
        raise SweepSpecError(f"--spec {p}: missing 'base' (the jobs/train.py keys of every trial)")
    try:
        return SweepSpec(**d)
    except TypeError as e:                 # e.g. wrong structure under a known key
        raise SweepSpecError(f"--spec {p}: {e}") from None


def tune_domain(where: str, v: Any):
    """A spec value -> a Tune sampling object (or the constant itself)."""
    from ray import tune
    if not isinstance(v, Mapping):
        return v
    if len(v) != 1 or next(iter(v)) not in SAMPLERS:
        raise SweepSpecError(f"{where}: expected a constant or one of "
                             f"{{{', '.join(SAMPLERS)}: ...}}, got {dict(v)!r}")
    kind, arg = next(iter(v.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise SweepSpecError(f"{where}.{kind}: expected a non-empty list")
        return tune.choice(arg) if kind == "choice" else tune.grid_search(arg)
    if (not isinstance(arg, list) or len(arg) != 2
            or any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in arg) or not arg[0] < arg[1]):
        raise SweepSpecError(f"{where}.{kind}: expected [low, high] with low < high, got {arg!r}")
    if kind == "loguniform":
        if arg[0] <= 0:
            raise SweepSpecError(f"{where}.loguniform: bounds must be > 0, got {arg!r}")
        return tune.loguniform(float(arg[0]), float(arg[1]))
    if kind == "uniform":
        return tune.uniform(float(arg[0]), float(arg[1]))
    return tune.randint(int(arg[0]), int(arg[1]))

