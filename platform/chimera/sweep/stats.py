"""Statistics over seed replicas: per configuration n, mean, std and a 95% confidence interval
of the mean, and a two-sided Welch t-test of every configuration against the best one.

    from chimera.sweep.stats import compare
    rows = compare({"t000": [2.041, 2.047, 2.039], "t001": [2.087, 2.079, 2.091]},
                   mode="min", significance=0.05)
    rows[0].verdict, rows[1].p, rows[1].tied       # 'best', 0.0009..., False (-> 'worse')

What is computed (scipy.stats):
    std     sample standard deviation (ddof=1)
    ci      mean ± t(1 - (1-0.95)/2, n-1) · std / √n: the t-distribution interval of the mean
    p       Welch's two-sided t-test (`ttest_ind(equal_var=False)`) of the configuration's runs
            against the best configuration's (the best mean; lowest for mode min)
    tied    p >= significance: not distinguishable from the best at that level
A configuration with fewer than 2 runs, or compared with a best that has fewer than 2, gets no
std/CI (n < 2) and no p-value: its verdict is `untested`, and says so.

Assumptions, stated in docs/sweeps.md too: the runs of a configuration are independent (they
differ only in the train seed: init and data order) and their metric is roughly normally
distributed across seeds; Welch's test does not assume equal variances. With 3 seeds the test
has little power: `tied` means "not shown to differ", not "equal". The best is picked by the
same data it is tested with, and every configuration is tested against it without a
multiple-comparison correction, so a p-value near the level is weak evidence. Two
configurations whose runs are all identical (zero variance on both sides) get p = 1 when their
means are equal and p = 0 otherwise (scipy's statistic is undefined there).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

CONFIDENCE = 0.95
TEST = "Welch's two-sided t-test (scipy.stats.ttest_ind, equal_var=False) against the best configuration"
VERDICTS = ("best", "tied", "worse", "untested", "no data")


@dataclass(frozen=True)
class ConfigStats:
    config: str
    n: int                                  # runs with a value
    mean: float | None
    std: float | None                       # ddof=1; None when n < 2
    ci: tuple[float, float] | None          # CONFIDENCE interval of the mean; None when n < 2
    p: float | None                         # against the best; None for the best and when untested
    tied: bool | None                       # p >= significance; None where there is no p
    verdict: str                            # one of VERDICTS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        return d


def summarize(values: Sequence[float], confidence: float = CONFIDENCE):
    """(n, mean, std, ci) of one configuration's values; std and ci None when n < 2."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"non-finite value among {list(values)}")
    n = len(x)
    if n == 0:
        return 0, None, None, None
    mean = float(x.mean())
    if n < 2:
        return n, mean, None, None
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return n, mean, std, (mean - half, mean + half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test of a against b (each at least 2 values)."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs 2 or more values on each side, got {len(a)} and {len(b)}")
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:       # the statistic is 0/0 or x/0
        return 1.0 if a.mean() == b.mean() else 0.0
    with warnings.catch_warnings():                     # near-identical samples: precision notes
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(groups: Mapping[str, Sequence[float]], mode: str = "min", significance: float = 0.05,
            confidence: float = CONFIDENCE) -> list[ConfigStats]:
    """Every configuration's statistics, best first: configurations with values by mean (lowest
    first for mode min), then those without (in the given order). See the module docstring."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r} must be 'min' or 'max'")
    if not 0 < significance < 1:
        raise ValueError(f"significance={significance!r} must be in (0, 1)")
    summ = {k: summarize(v, confidence) for k, v in groups.items()}
    sign = 1 if mode == "min" else -1
    ranked = sorted((k for k in groups if summ[k][0] > 0), key=lambda k: sign * summ[k][1])
    ranked += [k for k in groups if summ[k][0] == 0]
    best = ranked[0] if ranked and summ[ranked[0]][0] > 0 else None
    out = []
    for k in ranked:
        n, mean, std, ci = summ[k]
        p = tied = None
        if n == 0:
            verdict = "no data"
        elif k == best:
            verdict = "best"
        elif n < 2 or summ[best][0] < 2:
            verdict = "untested"
        else:
            p = welch_p(groups[k], groups[best])
            tied = p >= significance
            verdict = "tied" if tied else "worse"
        out.append(ConfigStats(config=k, n=n, mean=mean, std=std, ci=ci, p=p, tied=tied, verdict=verdict))
    return out
