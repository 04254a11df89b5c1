"""An evolutionary per-layer search, as a Ray Tune Searcher: a population of stacks, children
that differ from their parent in one choice, parents selected by Pareto rank.

    from ray import tune
    s = EvolutionSearch({"g0.attn": tune.choice(["gqa2", "mla"]), "g0.ffn": tune.choice(["mlp", "moe"]),
                         "g1.attn": ..., "learning_rate": tune.loguniform(1e-4, 1e-2)},
                        metric=["best_val_loss", "kv_bytes_per_token"], mode=["min", "min"],
                        groups=[2, 2], population=8, seed=0)
    tune.TuneConfig(search_alg=s, num_samples=40)        # or suggest / on_trial_complete by hand

How it chooses a trial:
  1. the first `population` suggestions are random samples of the space (Tune's own samplers),
     with the spec's group sizes;
  2. after that, while no trial has completed, random samples again; otherwise a child of a
     parent: the completed trials are sorted by (Pareto rank over the objectives, the first
     objective), the best `population` of them form the pool (elitist), two pool members are
     drawn and the better one is the parent (a binary tournament);
  3. the child changes ONE gene of its parent: a group's attention or FFN option (another
     category), another value of a searched hyperparameter (a fresh sample of its domain), or
     one group boundary moved by one layer (`layers.groups`, every group keeping >= 1 layer);
  4. a configuration already suggested is not suggested again (up to `retries` new draws).
A trial that errors, was rejected, or lacks an objective (e.g. stopped before its decode speed
was measured) is never a parent. One numpy Generator seeded with `seed` drives every draw: with
the same results in the same order, the suggestions are the same (one trial at a time makes
the order deterministic; with several, completion order can differ between runs).
"""
from __future__ import annotations

import json
import pickle
from typing import Any, Mapping

from ray.tune.search import Searcher
from ray.tune.search.sample import Categorical, Domain

from chimera.sweep.pareto import minimised, pareto_ranks

GROUPS = "layers.groups"          # the gene holding the group sizes (trials.resolve_trial reads it)


def _key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class PickledSearcher(Searcher):
    """Tune's save/restore of a searcher: its whole state, pickled (both searchers here)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class EvolutionSearch(PickledSearcher):
    """See the module docstring. `space`: name -> Tune Domain (constants are left to the
    caller); `groups`: the layer counts of the groups whose boundaries may move (None: none)."""

    def __init__(self, space: Mapping[str, Domain], metric: str | list[str], mode: str | list[str],
                 groups: list[int] | None = None, population: int = 8, seed: int = 0, retries: int = 50):
        import numpy as np
        metric, mode = ([metric], [mode]) if isinstance(metric, str) else (list(metric), list(mode))
        super().__init__(metric=metric, mode=mode)
        if population < 1:
            raise ValueError(f"population={population} must be >= 1")
        self._space = dict(space)
        for k, d in self._space.items():
            if not isinstance(d, Domain):
                raise ValueError(f"space.{k}: expected a Tune domain (tune.choice, ...), got {d!r}")
        self._groups = list(groups) if groups and len(groups) > 1 else None
        self._population, self._retries = population, retries
        self._rng = np.random.default_rng(seed)
        self._suggested = 0
        self._seen: set[str] = set()
        self._live: dict[str, dict] = {}              # trial id -> config, until it completes
        self._done: list[tuple[dict, tuple[float, ...]]] = []   # (config, objectives to minimise)

    # --- genes -------------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """A random configuration (the spec's group sizes)."""
        out = {k: d.sample(random_state=self._rng) for k, d in self._space.items()}
        if self._groups:
            out[GROUPS] = list(self._groups)
        return out

    def _moves(self, groups: list[int]) -> list[list[int]]:
        """Every group-size list with one boundary moved by one layer (groups stay >= 1)."""
        out = []
        for b in range(len(groups) - 1):
            for step in (-1, 1):                      # -1: the boundary moves down (left group shrinks)
                g = list(groups)
                g[b] += step
                g[b + 1] -= step
                if min(g) >= 1:
                    out.append(g)
        return out

    def _mutable(self, config: Mapping[str, Any]) -> list[str]:
        genes = [k for k, d in self._space.items() if not (isinstance(d, Categorical) and len(d.categories) < 2)]
        if self._groups and self._moves(config[GROUPS]):
            genes.append(GROUPS)
        return genes

    def mutate(self, parent: Mapping[str, Any]) -> dict[str, Any]:
        """A child of `parent` differing in exactly one gene (the parent itself if no gene can
        change: every option list has one entry and no boundary can move)."""
        genes = self._mutable(parent)
        child = dict(parent)
        if not genes:
            return child
        gene = genes[int(self._rng.integers(len(genes)))]
        if gene == GROUPS:
            moves = self._moves(parent[GROUPS])
            child[GROUPS] = moves[int(self._rng.integers(len(moves)))]
            return child
        d = self._space[gene]
        if isinstance(d, Categorical):
            others = [c for c in d.categories if c != parent[gene]]
            child[gene] = others[int(self._rng.integers(len(others)))]
        else:                                          # a numeric domain: a fresh sample of it
            for _ in range(self._retries):
                child[gene] = d.sample(random_state=self._rng)
                if child[gene] != parent[gene]:
                    break
        return child

    # --- selection ---------------------------------------------------------------------------
    def pool(self) -> list[dict]:
        """The completed configurations that may be parents: the best `population` by
        (Pareto rank, first objective)."""
        ranks = pareto_ranks([v for _, v in self._done])
        order = sorted(range(len(self._done)), key=lambda i: (ranks[i], self._done[i][1][0], i))
        return [self._done[i][0] for i in order[:self._population]]

    def _parent(self) -> dict:
        pool = self.pool()
        a, b = (int(i) for i in self._rng.integers(len(pool), size=2))
        return pool[min(a, b)]                         # the pool is sorted: the lower index wins

    # --- the Searcher API --------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(self._retries):
            if self._suggested < self._population or not self._done:
                config = self.sample()
            else:
                config = self.mutate(self._parent())
            if _key(config) not in self._seen:
                break
        self._suggested += 1
        self._seen.add(_key(config))
        self._live[trial_id] = config
        return dict(config)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self._live.pop(trial_id, None)
        if config is None or error:
            return
        values = minimised(result, dict(zip(self.metric, self.mode)))
        if values is not None:                         # an objective missing: never a parent
            self._done.append((config, values))

