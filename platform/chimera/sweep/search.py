"""Sweeps whose trials are chosen while they run: `search: optuna` (Optuna's TPE through Ray
Tune's OptunaSearch) and `search: evolution` (chimera.sweep.evolution). Both search the
per-layer choices (`g<i>.attn`, `g<i>.ffn` per group of layers.groups, or `stack`) and the
`space` hyperparameters (a `{grid: [...]}` is a categorical choice for them).

    plan = expand(spec)                 # trials.search_plan: no trials yet; the space is checked
    alg = make_searcher(plan, root)     # the Tune Searcher run_sweep gives TuneConfig(search_alg=...)

Every suggestion is resolved into a trial by chimera.sweep.trials.resolve_trial, as the fixed
lists are (budget solved, model and training config validated). An invalid one is recorded as
rejected (with its validation message), the searcher is told it ended without a result (a
pruned trial, for Optuna), and the searcher is asked again, so `num_samples` counts launched
trials only. A valid one is written into sweep.json before Tune launches it: the trial process
reads its resolved config from there (the sweep directory is local or a shared mount, as the
trials' runs are).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ray.tune.search import Searcher

from chimera.sweep.evolution import PickledSearcher
from chimera.sweep.pareto import result_key
from chimera.sweep.spec import SweepSpec, SweepSpecError
from chimera.sweep.trials import SweepPlan, Trial, resolve_trial, search_space

MAX_REJECTED = 100          # invalid suggestions in a row before the search gives up


def inner_searcher(spec: SweepSpec) -> Searcher:
    """OptunaSearch (TPE, seeded, `population` random start-up trials) or EvolutionSearch
    over the spec's space, minimising / maximising its objectives."""
    space, _ = search_space(spec)
    modes = spec.objective_modes
    keys, dirs = [result_key(n) for n in modes], list(modes.values())
    metric, mode = (keys[0], dirs[0]) if len(keys) == 1 else (keys, dirs)
    if spec.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # TPE handles one or several objectives (multi-objective TPE)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.population)
        return OptunaSearch(OptunaSearch.convert_search_space(space), metric=metric, mode=mode,
                            sampler=sampler)
    from chimera.sweep.evolution import EvolutionSearch
    groups = (spec.layers or {}).get("groups") if spec.layers is not None else None
    return EvolutionSearch(space, metric=metric, mode=mode, groups=groups, population=spec.population,
                           seed=spec.seed)


def make_searcher(plan: SweepPlan, root: Path) -> "TrialSearcher":
    _, consts = search_space(plan.spec)
    return TrialSearcher(inner_searcher(plan.spec), plan.spec, root, consts)


class TrialSearcher(PickledSearcher):
    """A searcher whose suggestions become resolved, recorded trials (see the module
    docstring). Tune sees `{"trial": "t007", **choices}`; the inner searcher sees the Tune
    results of its own suggestions (only final ones: neither searcher uses intermediate
    results; a result lacking an objective is passed on as none, i.e. a pruned trial)."""

    def __init__(self, inner: Searcher, spec: SweepSpec, root: Path, constants: Mapping[str, Any]):
        # Tune checks every report for this searcher's metric: the spec's, in every eval report;
        # the inner searcher's objectives (decode speed...) are only in a trial's final result
        super().__init__(metric=spec.metric, mode=spec.mode)
        self.inner, self.spec, self.root = inner, spec, root
        self.data: dict = {}                       # data folder -> tokenizer (trials.trial_data)
        # no callables held: Tune pickles the searcher with its config (tuner.pkl)
        self.constants = dict(constants)
        self.trials: list[Trial] = []
        self.rejected: list[tuple[dict, str]] = []
        self._ids: dict[str, str] = {}             # Tune's trial id -> the inner searcher's

    def _write(self) -> None:
        from chimera.sweep.store import write_plan
        write_plan(SweepPlan(spec=self.spec, trials=self.trials, rejected=self.rejected), self.root)

    def suggest(self, trial_id: str):
        for k in range(MAX_REJECTED):
            inner_id = trial_id if k == 0 else f"{trial_id}-r{k}"
            cfg = self.inner.suggest(inner_id)
            if cfg is None or cfg == Searcher.FINISHED:
                return cfg
            choices = {**self.constants, **cfg}
            try:
                trial = resolve_trial(self.spec, choices, f"t{len(self.trials):03d}", self.data)
            except SweepSpecError as e:
                self.rejected.append((choices, str(e)))
                # told as pruned (no result, no error): Optuna's TPE ranks pruned trials below
                # every completed one, so it learns to avoid the invalid option; a failed trial
                # it ignores, and it kept proposing the never-completed option (TPE favours
                # unexplored categories). Evolution drops either and never suggests it again.
                self.inner.on_trial_complete(inner_id, None, error=False)
                self._write()
                continue
            self._ids[trial_id] = inner_id
            self.trials.append(trial)
            self._write()
            return {"trial": trial.name, **cfg}
        print(f"search {self.spec.search}: {MAX_REJECTED} invalid suggestions in a row; no more trials")
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self._ids.pop(trial_id, None)
        if inner_id is None:
            return
        keys = self.inner.metric if isinstance(self.inner.metric, list) else [self.inner.metric]
        if result is not None and any(result.get(k) is None for k in keys):
            result = None
        self.inner.on_trial_complete(inner_id, result, error=error)

