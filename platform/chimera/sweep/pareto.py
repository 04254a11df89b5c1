"""Several objectives at once: where each is found in a trial's results, and Pareto ranks.

    modes = {"val_loss": "min", "kv_bytes_per_token": "min", "decode_tokens_per_s": "max"}
    vec = objective_vector(result, modes)     # (best val loss, KV B/tok, -decode tok/s) or None
    ranks = pareto_ranks([vec, ...])          # 0: non-dominated (the Pareto front), 1: the next front ...

The evolutionary searcher selects parents by these ranks and the report draws the front from
them, so both read the same numbers the same way. Non-dominated sorting is Optuna's (the one
its multi-objective samplers use); it lives in a private module of Optuna 5.0, which
constraints.txt pins — tests/test_sweep_search.py checks it on known points.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# a trial's `val_loss` objective is the run's best eval, as the report ranks it
RESULT_KEYS = {"val_loss": "best_val_loss"}


def result_key(name: str) -> str:
    """The key of a Tune result / report row holding objective `name`."""
    return RESULT_KEYS.get(name, name)


def objective_vector(result: Mapping[str, Any] | None, modes: Mapping[str, str]) -> tuple[float, ...] | None:
    """The objectives of one result as values to minimise (max objectives negated), in the
    order of `modes`; None if one is missing or not a finite number (a failed trial, or one
    stopped before its decode speed was measured)."""
    return minimised(result, {result_key(n): m for n, m in modes.items()})


def minimised(result: Mapping[str, Any] | None, key_modes: Mapping[str, str]) -> tuple[float, ...] | None:
    """result[key] for each key (negated where its mode is max); None if one is missing or
    not a finite number."""
    if not result:
        return None
    out = []
    for key, mode in key_modes.items():
        v = result.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
        out.append(float(v) if mode == "min" else -float(v))
    return tuple(out)


def pareto_ranks(vectors: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting of vectors to minimise: rank 0 for the points no other point
    dominates, rank 1 for those only rank-0 points dominate, and so on. Equal points share a
    rank; with one objective the rank orders the distinct values."""
    import numpy as np
    from optuna.study._multi_objective import _calculate_nondomination_rank

    if not len(vectors):
        return []
    return [int(r) for r in _calculate_nondomination_rank(np.asarray(vectors, dtype=float))]
