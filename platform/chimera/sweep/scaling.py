"""Scaling-ladder fits: L(C) = E + A·C^(−α) per configuration, bootstrap intervals, the
prediction at a target compute and its winner, the held-out check, and scaling.png.

    law = fit_power_law(flops, losses)              # PowerLaw(E, A, alpha); law(1e15) -> loss
    draws, method = bootstrap(flops, losses, n=1000, rng=np.random.default_rng(0))
    section = ladder_section(rows, trials, spec)    # what results.md / results.json carry
    plot_scaling(section, "runs/exp1-ladder-tiny/scaling.png")

The fit. Least squares in the loss (scipy.optimize.curve_fit, trust-region reflective) in the
parametrisation L = E + exp(b − α·x), x = ln(C / C0), C0 the geometric mean of the budgets:
x is O(1) whatever the FLOP scale, so the problem is well conditioned (A = exp(b + α ln C0)).
Bounds: 0 <= E <= the smallest loss (the asymptote lies below every point), 0 <= α <= 5. The
start is the best of a grid over E, each E solved for (b, α) by a line through ln(L − E).

The bootstrap (percentile intervals at `confidence`) is a residual bootstrap: the budgets are a
fixed design, so the fit's residuals - scaled by sqrt(n / (n − 3)) for the 3 fitted parameters,
centred - are resampled onto the fitted curve and the curve refitted, `bootstrap` times. It
assumes independent errors of one size (seed noise, misfit) around a true power law. Runs at
the same budget (seeds) are separate points, so with seeds even 3 rungs have residuals to
resample. With one run per rung and only 3 rungs the fit is exact (3 points, 3 parameters):
the points say nothing about its error and no interval is claimed (add a rung or seeds).
On synthetic ladders (6 budgets, noise 0.01) the 95% intervals cover the true E, α and loss
at the target in about 90% of datasets (tests/test_scaling.py): slightly narrow, as
small-sample bootstraps are.

The interval at target_flops is of the curve (the expected loss of a run there). P(best) is the
fraction of bootstrap draws (independent per configuration, paired by index) in which a
configuration predicts the lowest loss at the target. The held-out check uses a prediction
interval for the mean of the k held-out runs: each draw's curve plus noise s·t(n − 3) / √k,
s = sqrt(RSS / (n − 3)).
The t (not a resampled residual) is there because with few rungs s rests on 1-3 degrees of
freedom: a ladder that happens to sit on a curve must not claim to know its noise. The same
caveat holds for the curve's intervals, which only resample the residuals seen: with one run
per rung they are as good as 3-6 points can make them; seeds (several runs per rung) make them
trustworthy.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ALPHA_MAX = 5.0


@dataclass(frozen=True)
class PowerLaw:
    E: float
    b: float                  # ln of the reducible loss at C0
    alpha: float
    log_c0: float             # ln C0, the centre of the fitted budgets

    @property
    def A(self) -> float:
        return math.exp(self.b + self.alpha * self.log_c0)

    def __call__(self, c):
        import numpy as np
        return self.E + np.exp(self.b - self.alpha * (np.log(c) - self.log_c0))


def _curve(x, E, b, alpha):
    import numpy as np
    return E + np.exp(b - alpha * x)


def _start(x, y):
    """(E, b, α) from a grid over E: for each, a line through ln(y − E) against x."""
    import numpy as np
    best = None
    for E in y.min() * np.linspace(0.0, 0.995, 60):
        slope, b = np.polyfit(x, np.log(y - E), 1)
        alpha = float(np.clip(-slope, 0.0, ALPHA_MAX))
        sse = float(np.sum((_curve(x, E, b, alpha) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, (float(E), float(b), alpha))
    return best[1]


def fit_power_law(c: Sequence[float], y: Sequence[float], p0: PowerLaw | None = None) -> PowerLaw:
    """Least-squares L(C) = E + A·C^(−α) through (C, L) points (>= 3 distinct C, L > 0)."""
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    c, y = np.asarray(c, float), np.asarray(y, float)
    if len(np.unique(c)) < 3 or np.any(c <= 0) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError(f"a power-law fit needs >= 3 distinct budgets > 0 and losses > 0; got "
                         f"C={c.tolist()}, L={y.tolist()}")
    log_c0 = float(np.mean(np.log(c))) if p0 is None else p0.log_c0
    x = np.log(c) - log_c0
    ymin = float(y.min())
    hi = [ymin, math.log(float(y.max())) + 5.0, ALPHA_MAX]
    lo = [0.0, -40.0, 0.0]
    start = _start(x, y) if p0 is None else (min(p0.E, 0.995 * ymin), p0.b, p0.alpha)
    start = tuple(float(np.clip(v, lo[i], hi[i])) for i, v in enumerate(start))
    try:
        with warnings.catch_warnings():      # an exact fit (3 points) has no covariance: expected
            warnings.simplefilter("ignore", OptimizeWarning)
            (E, b, alpha), _ = curve_fit(_curve, x, y, p0=start, bounds=(lo, hi), method="trf",
                                         max_nfev=2000, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    except (RuntimeError, ValueError):       # no convergence: the grid start is still a fit
        E, b, alpha = start
    return PowerLaw(float(E), float(b), float(alpha), log_c0)


def _scaled_residuals(law: PowerLaw, c, y):
    import numpy as np
    r = np.asarray(y, float) - law(np.asarray(c, float))
    n = len(r)
    r = r * math.sqrt(n / (n - 3)) if n > 3 else r
    return r - r.mean()


def _noise_scale(law: PowerLaw, c, y) -> float:
    """sqrt(RSS / (n − 3)): the residuals' estimate of one run's noise."""
    import numpy as np
    r = np.asarray(y, float) - law(np.asarray(c, float))
    return float(np.sqrt(np.sum(r ** 2) / (len(r) - 3)))


def bootstrap(c, y, n: int, rng) -> tuple[list[PowerLaw], str]:
    """Refits of the ladder with resampled residuals (the module docstring) and the method."""
    import numpy as np
    c, y = np.asarray(c, float), np.asarray(y, float)
    if n == 0:
        return [], "none (bootstrap: 0)"
    if len(y) <= 3:
        return [], "none (3 points for 3 parameters: the fit is exact; add a rung or seeds)"
    full = fit_power_law(c, y)
    fitted, resid = full(c), _scaled_residuals(full, c, y)
    draws = []
    for _ in range(n):
        ys = fitted + rng.choice(resid, size=len(y))
        if np.all(ys > 0):
            draws.append(fit_power_law(c, ys, p0=full))
    return draws, "residual"


def _interval(values, conf: float) -> tuple[float, float]:
    import numpy as np
    q = (1 - conf) / 2
    lo, hi = np.quantile(np.asarray(values, float), [q, 1 - q])
    return float(lo), float(hi)


def _est(value: float, draws: list[float], conf: float) -> dict:
    if not draws:
        return {"value": value, "lo": None, "hi": None}
    lo, hi = _interval(draws, conf)
    return {"value": value, "lo": lo, "hi": hi}


def ladder_section(rows: list[dict], trials: list[dict], spec: dict, seed: int = 0) -> dict[str, Any]:
    """The ladder part of the report: per configuration its points, fit, intervals, the
    prediction at target_flops, P(best) and the held-out check; the predicted winner."""
    import numpy as np

    lad, metric = spec["ladder"], spec["metric"]
    target = float(lad["target_flops"])
    conf, n_boot = float(lad.get("confidence", 0.95)), int(lad.get("bootstrap", 1000))
    by_name = {r["trial"]: r for r in rows}
    configs: dict[str, dict] = {}
    for t in trials:
        info, row = t["ladder"], by_name.get(t["name"], {})
        value = row.get(metric)
        cfg = configs.setdefault(info["config"], {"config": info["config"], "points": [], "missing": []})
        if row.get("status") != "finished" or not isinstance(value, (int, float)):
            cfg["missing"].append(t["name"])
            continue
        cfg["points"].append({"trial": t["name"], "rung": info["rung"], "label": info["label"],
                              "held_out": info["held_out"], "params": info["params"],
                              "tokens": info["tokens"], "steps": info["steps"], "flops": info["flops"],
                              "loss": float(value)})
    fits, preds = [], {}
    for i, cfg in enumerate(configs.values()):
        pts = [p for p in cfg["points"] if not p["held_out"]]
        c, y = [p["flops"] for p in pts], [p["loss"] for p in pts]
        if len({p["rung"] for p in pts}) < 3:
            cfg["error"] = f"{len({p['rung'] for p in pts})} rung(s) finished: a fit needs 3"
            fits.append(cfg)
            continue
        law = fit_power_law(c, y)
        rng = np.random.default_rng([seed, i])
        draws, method = bootstrap(c, y, n_boot, rng)
        at = [float(d(target)) for d in draws]
        cfg.update(method=method, n_fit=len(pts), E=_est(law.E, [d.E for d in draws], conf),
                   A=_est(law.A, [d.A for d in draws], conf),
                   alpha=_est(law.alpha, [d.alpha for d in draws], conf),
                   predicted=_est(float(law(target)), at, conf),
                   law={"E": law.E, "b": law.b, "alpha": law.alpha, "log_c0": law.log_c0},
                   draws=[[d.E, d.b, d.alpha, d.log_c0] for d in draws])
        preds[cfg["config"]] = at
        held = [p for p in cfg["points"] if p["held_out"]]
        if held:                              # the mean of its runs (seeds) at the held-out rung
            h_c = float(np.mean([h["flops"] for h in held]))
            h_y = float(np.mean([h["loss"] for h in held]))
            pred = float(law(h_c))
            check = {"trials": [h["trial"] for h in held], "flops": h_c, "observed": h_y,
                     "predicted": pred, "lo": None, "hi": None, "inside": None}
            if draws:                         # new runs: a curve draw plus their mean noise
                noise = (_noise_scale(law, c, y) / math.sqrt(len(held))
                         * rng.standard_t(len(y) - 3, size=len(draws)))
                new_run = [max(0.0, float(d(h_c)) + float(e)) for d, e in zip(draws, noise)]   # a loss >= 0
                check["lo"], check["hi"] = _interval(new_run, conf)
                check["inside"] = bool(check["lo"] <= h_y <= check["hi"])
            cfg["validate"] = check
        fits.append(cfg)
    fitted = [f for f in fits if "predicted" in f]
    if preds and all(preds.values()):
        n = min(len(v) for v in preds.values())
        names = list(preds)
        best = np.argmin(np.array([preds[k][:n] for k in names]), axis=0)
        for f in fitted:
            f["p_best"] = float(np.mean(best == names.index(f["config"])))
    out: dict[str, Any] = {"metric": metric, "target_flops": target, "confidence": conf,
                           "bootstrap": n_boot, "fits": fits, "winner": None, "validate": None}
    if fitted:
        w = min(fitted, key=lambda f: f["predicted"]["value"])
        others = [f for f in fitted if f is not w]
        clear = None
        if others and all(f["predicted"]["lo"] is not None for f in fitted):
            clear = all(w["predicted"]["hi"] < f["predicted"]["lo"] for f in others)
        out["winner"] = {"config": w["config"], "predicted": w["predicted"], "p_best": w.get("p_best"),
                         "clear": clear}
    checks = [f for f in fitted if "validate" in f]
    if checks:
        obs = min(checks, key=lambda f: f["validate"]["observed"])["config"]
        pre = min(checks, key=lambda f: f["validate"]["predicted"])["config"]
        known = [f for f in checks if f["validate"]["inside"] is not None]
        out["validate"] = {"inside": sum(f["validate"]["inside"] for f in known), "checked": len(known),
                           "of": len(checks), "observed_winner": obs, "predicted_winner": pre}
    return out


def _g(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _ci(e: dict, fmt: str) -> str:
    s = _g(e["value"], fmt)
    return s if e["lo"] is None else f"{s} [{_g(e['lo'], fmt)}, {_g(e['hi'], fmt)}]"


def summary_lines(sec: dict) -> list[str]:
    """The ladder's verdict in a few lines (printed by jobs/sweep.py, atop the markdown)."""
    pct = f"{100 * sec['confidence']:.0f}%"
    lines = []
    for f in sec["fits"]:
        if "predicted" not in f:
            lines.append(f"  {f['config']}: no fit ({f['error']})")
            continue
        extra = f", P(best) {f['p_best']:.2f}" if f.get("p_best") is not None else ""
        lines.append(f"  {f['config']}: {sec['metric']} {_ci(f['predicted'], '.4f')} at "
                     f"{sec['target_flops']:.3g} FLOPs (α {_ci(f['alpha'], '.3f')}{extra})")
    w = sec["winner"]
    if w:
        how = ("the only configuration fitted" if len([f for f in sec["fits"] if "predicted" in f]) == 1
               else "no interval: not a claim" if w["clear"] is None
               else f"its {pct} interval clear of the others'" if w["clear"]
               else f"{pct} intervals overlap: not a clear winner")
        lines.append(f"predicted winner at {sec['target_flops']:.3g} FLOPs: {w['config']} ({how})")
    v = sec["validate"]
    if v:
        lines.append(f"held-out rung: {v['inside']}/{v['checked']} inside their {pct} prediction "
                     f"intervals; lowest there {v['observed_winner']} (predicted {v['predicted_winner']})")
    return lines


def markdown(sec: dict) -> str:
    pct = f"{100 * sec['confidence']:.0f}%"
    methods = sorted({f["method"] for f in sec["fits"] if "method" in f})
    out = ["## Scaling ladder", "",
           f"L(C) = E + A·C^(−α) fitted per configuration to each run's final {sec['metric']} "
           f"(C = training FLOPs = FLOPs/token × tokens trained); {pct} percentile intervals, "
           f"bootstrap {', '.join(methods) or 'none'} ({sec['bootstrap']} resamples).", "",
           f"| configuration | runs | E | A | α | {sec['metric']} at {sec['target_flops']:.3g} FLOPs "
           f"| P(best) | held-out run |", "|---|---|---|---|---|---|---|---|"]
    for f in sec["fits"]:
        if "predicted" not in f:
            out.append(f"| {f['config']} | {len(f['points'])} | no fit: {f['error']} | | | | | |")
            continue
        v = f.get("validate")
        held = ""
        if v:
            held = f"{v['observed']:.4f} at {v['flops']:.3g}"
            held += (f": {'inside' if v['inside'] else 'OUTSIDE'} [{v['lo']:.4f}, {v['hi']:.4f}]"
                     if v["inside"] is not None else f" (predicted {v['predicted']:.4f}, no interval)")
        out.append(f"| {f['config']} | {f['n_fit']} | {_ci(f['E'], '.3f')} | {_ci(f['A'], '.3g')} | "
                   f"{_ci(f['alpha'], '.3f')} | {_ci(f['predicted'], '.4f')} | "
                   f"{_g(f.get('p_best'), '.2f')} | {held} |")
    out += [""] + [ln.strip() for ln in summary_lines(sec) if not ln.startswith("  ")] + [""]
    out += ["| trial | configuration | rung | active params | tokens | steps | C (FLOPs) | "
            f"{sec['metric']} |", "|---|---|---|---|---|---|---|---|"]
    for f in sec["fits"]:
        for p in sorted(f["points"], key=lambda p: p["flops"]):
            out.append(f"| {p['trial']} | {f['config']} | {p['label']}{' (held out)' if p['held_out'] else ''}"
                       f" | {p['params']:,} | {p['tokens']:,} | {p['steps']:,} | {p['flops']:.3g} | "
                       f"{p['loss']:.4f} |")
        if f["missing"]:
            out.append(f"| {', '.join(f['missing'])} | {f['config']} | not finished: left out | | | | | |")
    return "\n".join(out) + "\n"


def plot_scaling(sec: dict, path: str | Path) -> str:
    """Loss against training FLOPs (log-log): each configuration's runs, its fit with the
    bootstrap band, the held-out runs (stars) and the prediction at the target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogLocator, ScalarFormatter

    target = sec["target_flops"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    allc = [p["flops"] for f in sec["fits"] for p in f["points"]] + [target]
    grid = np.geomspace(min(allc) / 1.5, max(allc) * 1.5, 200)
    for i, f in enumerate(sec["fits"]):
        color = f"C{i}"
        fit_pts = [p for p in f["points"] if not p["held_out"]]
        held = [p for p in f["points"] if p["held_out"]]
        if fit_pts:
            ax.scatter([p["flops"] for p in fit_pts], [p["loss"] for p in fit_pts], color=color, s=28,
                       zorder=3)
        if held:
            ax.scatter([p["flops"] for p in held], [p["loss"] for p in held], color=color, marker="*",
                       s=160, edgecolor="k", zorder=4)
        if "law" not in f:
            ax.plot([], [], color=color, label=f"{f['config']}: no fit")
            continue
        law = PowerLaw(**f["law"])
        inside = max(p["flops"] for p in fit_pts)
        ax.plot(grid[grid <= inside], law(grid[grid <= inside]), color=color,
                label=f"{f['config']}: E={f['E']['value']:.2f}, α={f['alpha']['value']:.2f}")
        ax.plot(grid[grid >= inside], law(grid[grid >= inside]), color=color, ls="--")
        if f["draws"]:
            band = np.array([PowerLaw(*d)(grid) for d in f["draws"]])
            q = (1 - sec["confidence"]) / 2
            ax.fill_between(grid, np.quantile(band, q, axis=0), np.quantile(band, 1 - q, axis=0),
                            color=color, alpha=0.15, lw=0)
        p = f["predicted"]
        err = None if p["lo"] is None else [[p["value"] - p["lo"]], [p["hi"] - p["value"]]]
        ax.errorbar([target], [p["value"]], yerr=err, color=color, marker="D", ms=6, capsize=4, zorder=4)
    ax.axvline(target, color="0.4", ls=":", lw=1)
    ax.annotate("target", (target, 1), xycoords=("data", "axes fraction"), xytext=(-4, -12),
                textcoords="offset points", ha="right", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=np.arange(1, 10) / 1.0))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(10, 100) / 10.0))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"final {sec['metric']}")
    w = sec["winner"]
    title = "L(C) = E + A·C^(−α) per configuration (dashed: extrapolated; stars: held out)"
    if w:
        title += f"\npredicted winner at {target:.3g} FLOPs: {w['config']}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_ladder(root: Path, rows: list[dict], trials: list[dict], spec: dict) -> dict[str, Any]:
    """The section (without the bootstrap draws, which only the plot needs) and scaling.png."""
    sec = ladder_section(rows, trials, spec)
    png = plot_scaling(sec, Path(root) / "scaling.png")
    for f in sec["fits"]:
        f.pop("draws", None)
    json.dumps(sec)                      # the section must be plain JSON (results.json)
    return {**sec, "markdown": markdown(sec), "summary": summary_lines(sec), "plot": png}
