"""A scaling ladder expanded into trials: every configuration of the sweep at every rung (a
model size or a training FLOP budget), each rung's steps derived from its budget.

    plan = expand(load_spec("configs/sweeps/exp1-ladder-tiny.yaml"))   # trials.expand calls here
    plan.trials[0].ladder     # {"rung": 0, "label": "n_embd=16 n_layer=1 up_dim=64",
                              #  "held_out": False, "params": 5_936, "flops_per_token": 47_904,
                              #  "steps": 46, "tokens": 23_552, "flops": 1.13e9,
                              #  "config": "g0.attn=gqa2", ...}

Each rung is a spec of its own - the base with the rung's size (or the base size), no ladder -
expanded by trials.expand, so the rung's trials are resolved and checked exactly as a plain
sweep's. Then, per trial:
    sizes:  tokens = tokens_per_param × active params       flops:  tokens = C ÷ FLOPs/token
    steps  = round(tokens ÷ tokens per optimizer step), at least 1; the trial trains that many
    C      = FLOPs/token (the model's own flops_per_token) × steps × tokens per step
A size's `n_layer` scales the depth of every group (layers.groups), every stack (each run of
identical consecutive layers) or base's own layer file by one factor, so a configuration keeps
its shape across the ladder. A configuration rejected at any rung is rejected at all of them:
every configuration in the fit has every rung. The `validate` rung is one more rung, marked
held out: chimera.sweep.scaling fits the others and checks it against its predicted interval.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

from chimera.sweep.spec import SweepSpec, SweepSpecError, flops_value


@dataclasses.dataclass(frozen=True)
class Rung:
    index: int
    label: str                       # "n_embd=32 n_layer=2" or "3.0e+12 FLOPs"
    size: dict | None                # model keys over base (sizes) ...
    flops: float | None              # ... or a training FLOP budget (flops)
    held_out: bool                   # the validate rung: run, not fitted


def rungs(spec: SweepSpec) -> list[Rung]:
    """The ladder's rungs in order, the validate rung (if any) last."""
    lad = spec.ladder
    items = list(lad.get("sizes") or lad["flops"])
    held = [False] * len(items)
    if "validate" in lad:
        items.append(lad["validate"])
        held.append(True)
    out = []
    for i, (item, h) in enumerate(zip(items, held)):
        if "sizes" in lad:
            out.append(Rung(i, " ".join(f"{k}={v}" for k, v in item.items()), dict(item), None, h))
        else:
            c = flops_value("ladder.flops", item)
            out.append(Rung(i, f"{c:.2g} FLOPs", None, c, h))
    return out


def scale_depth(layers: list[dict], n_layer: int, where: str) -> list[dict]:
    """A layer list at another depth: each run of identical consecutive layers keeps its share
    (2×[mla] + 2×[gqa] at 8 layers: 4×[mla] + 4×[gqa])."""
    runs: list[list] = []
    for ld in layers:
        if runs and runs[-1][0] == ld:
            runs[-1][1] += 1
        else:
            runs.append([dict(ld), 1])
    total = sum(n for _, n in runs)
    if any(n * n_layer % total for _, n in runs):
        raise SweepSpecError(f"{where}: {' + '.join(f'{n}×' for _, n in runs)} layers cannot be "
                             f"scaled to n_layer={n_layer} (each run × {n_layer}/{total} must be a "
                             f"whole number)")
    return [dict(ld) for ld, n in runs for _ in range(n * n_layer // total)]


def rung_spec(spec: SweepSpec, rung: Rung, stack_layers: Callable[[SweepSpec, str], list]) -> SweepSpec:
    """The plain spec of one rung: base with the rung's size, depths scaled, no ladder."""
    from chimera.train.config import TrainConfig
    base, layers, stacks = dict(spec.base), spec.layers, spec.stacks
    size = dict(rung.size or {})
    n = size.pop("n_layer", None)
    base.update(size)
    if n is not None:
        if layers is not None:              # spec checked: groups given, scalable to n
            groups = layers["groups"]
            layers = {**layers, "groups": [g * n // sum(groups) for g in groups]}
            base["n_layer"] = n
        elif stacks is not None:
            stacks = {name: scale_depth(stack_layers(spec, name), n, f"ladder rung {rung.label}: "
                                        f"stacks.{name}") for name in stacks}
            base.pop("n_layer", None)
        else:
            own = TrainConfig.from_dict(spec.base).layer_list()
            if own is not None:
                base.pop("layer_configs_jsonl", None)
                base["layer_configs"] = json.dumps(scale_depth(own, n, f"ladder rung {rung.label}: "
                                                               f"base's layer stack"))
            base["n_layer"] = n
    try:
        return dataclasses.replace(spec, base=base, layers=layers, stacks=stacks, ladder=None)
    except SweepSpecError as e:
        raise SweepSpecError(f"ladder rung {rung.label}: {e}") from None


def _config_label(choices: Mapping[str, Any], varying: set[str]) -> str:
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in choices.items() if k in varying]
    return ", ".join(parts) or "base"


def expand_ladder(spec: SweepSpec, expand: Callable, stack_layers: Callable, measure: Callable):
    """Every rung expanded (`expand`: trials.expand, given here because trials imports this
    module and not the other way round), the trials' steps set by their budgets."""
    from chimera.train.config import TrainConfig
    from models import ModelConfig

    lad = spec.ladder
    per_rung = []
    for r in rungs(spec):
        try:
            plan = expand(rung_spec(spec, r, stack_layers))
        except SweepSpecError as e:
            msg = str(e)
            raise SweepSpecError(msg if msg.startswith("ladder") else f"ladder rung {r.label}: {msg}") from None
        per_rung.append((r, plan))

    def key(t):                               # the same trial at another rung (seeds stay apart)
        return json.dumps([t.choices, t.train.get("seed")], sort_keys=True, default=str)

    everywhere = set.intersection(*({key(t) for t in p.trials} for _, p in per_rung))
    rejected = []
    for r, p in per_rung:
        rejected += [(c, f"ladder rung {r.label}: {m}") for c, m in p.rejected]
        rejected += [(t.choices, f"ladder: rejected at another rung, so left out at rung {r.label}")
                     for t in p.trials if key(t) not in everywhere]
    if not everywhere:
        raise SweepSpecError("ladder: no configuration is valid at every rung ("
                             + "; ".join(sorted({m for _, m in rejected}))[:500] + ")")
    all_choices = [t.choices for _, p in per_rung for t in p.trials]
    varying = {k for c in all_choices for k in c
               if k != "seed" and len({json.dumps(x.get(k), default=str) for x in all_choices}) > 1}
    trials = []
    for r, p in per_rung:
        for t in p.trials:
            if key(t) not in everywhere:
                continue
            cfg = ModelConfig.from_dict(t.model_config)
            params, fpt = measure(cfg, "active_params"), measure(cfg, "flops_per_token")
            per_step = TrainConfig.from_dict(t.train).total_batch_size
            tokens = float(lad.get("tokens_per_param", 20)) * params if r.flops is None else r.flops / fpt
            steps = int(round(tokens / per_step))
            if steps < 1:
                raise SweepSpecError(f"ladder rung {r.label}: {t.arch} gets {tokens:,.0f} tokens, less "
                                     f"than one optimizer step of {per_step:,} tokens")
            warm = TrainConfig.from_dict(t.train).warmup_steps
            if warm >= steps:
                raise SweepSpecError(f"ladder rung {r.label}: {t.arch} trains {steps} steps, not more "
                                     f"than base.warmup_steps={warm}; lower it or raise the rung's budget")
            group = {k: v for k, v in t.choices.items() if k != "seed"}
            info = {"rung": r.index, "label": r.label, "held_out": r.held_out, "params": params,
                    "flops_per_token": fpt, "tokens_per_step": per_step, "steps": steps,
                    "tokens": steps * per_step, "flops": float(fpt) * steps * per_step,
                    "config": _config_label(group, varying),
                    "config_key": json.dumps(group, sort_keys=True, default=str)}
            trials.append(dataclasses.replace(
                t, name=f"t{len(trials):03d}", train={**t.train, "max_iters": steps},
                arch=f"{t.arch} @ {r.label}", ladder=info,
                # seeds > 1: replicas group per rung (the rung's own names repeat across rungs)
                config=f"r{r.index}.{t.config}" if t.config else None))
    _check_budgets(trials)
    return dataclasses.replace(per_rung[0][1], spec=spec, trials=trials, rejected=rejected)


def _check_budgets(trials: list) -> None:
    """Per configuration: >= 3 distinct fitted budgets, and the held-out one above them all."""
    by: dict[str, list] = {}
    for t in trials:
        by.setdefault(t.ladder["config"], []).append(t.ladder)
    for cfg, pts in by.items():
        fit = {p["flops"] for p in pts if not p["held_out"]}
        if len(fit) < 3:
            raise SweepSpecError(f"ladder: configuration {cfg} has {len(fit)} distinct training budgets "
                                 f"after rounding to whole steps; a fit needs >= 3 (widen the ladder)")
        held = [p["flops"] for p in pts if p["held_out"]]
        if held and min(held) <= max(fit):
            raise SweepSpecError(f"ladder.validate: configuration {cfg} would train {min(held):.3g} FLOPs "
                                 f"there, not more than its largest fitted rung ({max(fit):.3g}); the "
                                 f"held-out rung checks an extrapolation, so make it larger")
