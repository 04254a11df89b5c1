"""The report of a sweep directory: table, best config, plots. Reads files only (no Ray).

    rep = write_report("runs/exp1-tiny")      # also `python jobs/sweep.py --report DIR`
    print(rep["table"])

Writes into the sweep directory (a local folder, or an s3:// URI: read there, made in a
temporary folder and uploaded, each file whole):
    results.md, results.csv   every trial (and every rejected combination) with its architecture
                              summary and metrics, sorted by the spec's metric; results.md first
                              groups the trials by configuration (all but the seed, spec `seeds`):
                              n, mean ± 95% CI, p against the best, tied / worse (sweep/stats.py)
    results.json              {"metric", "mode", "trials": [...] best first (serving reads it),
                              "configurations": [{config, n, mean, std, ci, p, tied, verdict,
                              trials, best_trial}] best first, "seeds", "significance", "test"}
    best_layers.jsonl         the best trial of the best configuration: its resolved layer stack
                              (jobs/train.py --layer_configs_jsonl), best_train.yaml its full
                              flags (--config)
    val_loss_curves.png       val loss against training steps, every trial
    val_bpb_curves.png        the same in bits per byte, when the metric is val_bpb / train_bpb
    pareto.png                best val loss against KV-cache bytes/token and decode tokens/s,
                              with the Pareto front
    (eval.json, from jobs/eval.py --from_sweep, adds a column per dataset's bits per byte
    `bpb:<dataset>` and per task's main metric `<task>:<metric>`, blank for trials not evaluated)
    pareto_front.png          with two or more `objectives` (searcher sweeps): every trial by its
                              Pareto rank over all of them, the front circled, and the search's
                              progress; results.md lists the front, results.json each trial's
                              `pareto_rank`
    scaling.png               a ladder's loss against training FLOPs with the fits and the
                              prediction at target_flops (chimera.sweep.scaling); its
                              section in results.md and results.json["ladder"]
Losses are per token (nats); `best val bpb` is the best val loss in bits per byte of text, the
measure that compares across tokenizers (a sweep over tokenizers is ranked by it).
A trial's status: finished, stopped (ended before max_iters: the scheduler stopped it early, or
the sweep was interrupted), failed (with Tune's error), not run, or rejected (never launched).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from chimera import storage

COLUMNS = [("rank", "#"), ("trial", "trial"), ("seed", "seed"), ("status", "status"), ("arch", "architecture"),
           ("hparams", "hyperparameters"), ("step", "steps"), ("best_val_loss", "best val"),
           ("best_val_bpb", "best val bpb"),
           ("train_loss", "train"), ("tokens_per_s", "tok/s"), ("mfu", "MFU"),
           ("params_total", "params"), ("params_active", "active"), ("flops_per_token", "FLOPs/tok"),
           ("budget_value", "budget"),
           ("kv_bytes_per_token", "KV B/tok"), ("moe_maxvio", "MaxVio"),
           ("decode_tokens_per_s", "decode tok/s"), ("error", "error")]


def _error(root: Path | str, name: str) -> str | None:
    try:
        text = storage.read_bytes(storage.join(root, name, "error.txt")).decode(errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = [ln for ln in lines if "Error" in ln or "error" in ln or "died" in ln]
    return (pick[-1] if pick else lines[-1] if lines else "failed")[:300]


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key in ("best_val_loss", "train_loss", "moe_maxvio", "best_val_bpb", "val_bpb", "train_bpb") \
            or ":" in key:                                     # jobs/eval.py's columns
        return f"{v:.4f}"
    if key in ("tokens_per_s", "decode_tokens_per_s"):
        return f"{v:,.0f}"
    if isinstance(v, int) and key not in ("rank", "seed"):
        return f"{v:,}"
    return str(v).replace("|", "/")


def collect(root: str | Path, decode_missing: bool = False) -> dict[str, Any]:
    """Rows for every trial of a sweep directory, best first (see the module docstring)."""
    from chimera.sweep.measure import measure_decode
    from chimera.sweep.spec import check_metric_tokenizers
    from chimera.sweep.store import SUMMARY, eval_columns, history, read_plan

    root = root if storage.is_uri(root) else Path(root)
    plan = read_plan(root)
    spec = plan["spec"]
    metric, mode = spec["metric"], spec["mode"]
    check_metric_tokenizers(metric, {t["train"].get("tokenizer") for t in plan["trials"]})
    rows, evals = [], eval_columns(root)
    for t in plan["trials"]:
        run = storage.join(root, "runs", t["name"])
        hist = history(run)
        latest: dict = {}
        for m in hist:
            latest.update(m)
        summary = _read_json(storage.join(run, SUMMARY))
        err = _error(root, t["name"])
        if summary is not None:
            latest.update(summary)
            status = "finished"
        elif err:
            status = "failed"
        else:
            status = "stopped" if hist else "not run"
        vals = [m["val_loss"] for m in hist if isinstance(m.get("val_loss"), (int, float))]
        bpbs = [m["val_bpb"] for m in hist if isinstance(m.get("val_bpb"), (int, float))]
        best_ckpt = storage.join(run, f"{t['train'].get('file_name', 'llm_model')}_best")
        row = {"trial": t["name"], "config": t.get("config") or t["name"], "seed": t.get("seed"),
               "status": status, "arch": t["arch"],
               "hparams": ", ".join(f"{k}={_short(v)}" for k, v in t["choices"].items()
                                    if "." not in k and k != "stack"),
               "choices": t["choices"], "budget_value": t.get("budget_value"),
               "best_val_loss": min(vals) if vals else None,
               "best_val_bpb": min(bpbs) if bpbs else None, "tokenizer": t["train"].get("tokenizer"),
               "best_checkpoint": best_ckpt if storage.is_file(storage.join(best_ckpt, "config.json")) else None,
               "error": err, "curve": [(m["step"], m["val_loss"]) for m in hist if "val_loss" in m],
               "bpb_curve": [(m["step"], m["val_bpb"]) for m in hist if "val_bpb" in m],
               **evals.get(t["name"], {})}
        for k in ("step", "train_loss", "tokens_per_s", "mfu", "params_total", "params_active",
                  "flops_per_token", "kv_bytes_per_token", "moe_maxvio", "decode_tokens_per_s", "val_loss", "tokens",
                  "trial_time_s", "trial_started_at", "val_bpb", "train_bpb"):
            row.setdefault(k, latest.get(k))
        if row["decode_tokens_per_s"] is None and row["best_checkpoint"] and decode_missing:
            cache = storage.join(run, "decode.json")     # stopped trials: measured here, once
            cached = _read_json(cache)
            if cached is not None:
                row["decode_tokens_per_s"] = cached["decode_tokens_per_s"]
            elif spec.get("decode_tokens"):
                try:
                    v = measure_decode(row["best_checkpoint"], spec["decode_tokens"])
                except Exception:             # e.g. a best checkpoint cut by a kill: no number
                    v = None
                if v is not None:
                    storage.write_text(cache, json.dumps({"decode_tokens_per_s": v}) + "\n")
                row["decode_tokens_per_s"] = v
        rows.append(row)

    def score(r):
        v = metric_value(r, metric)
        if v is None:
            return (1, 0.0)
        return (0, v if mode == "min" else -v)

    rows.sort(key=score)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    rejected = [{"trial": "-", "status": "rejected", "arch": "", "choices": x["choices"],
                 "hparams": ", ".join(f"{k}={_short(v)}" for k, v in x["choices"].items()),
                 "error": x["error"]} for x in plan["rejected"]]
    return {"metric": metric, "mode": mode, "rows": rows, "rejected": rejected, "spec": spec,
            "trials": plan["trials"]}


def _read_json(path: str) -> Any:
    """A small JSON file's content, None when it is not there."""
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def metric_value(row: dict, metric: str) -> Any:
    """What ranks a row: the run's best for val_loss / val_bpb, else the latest value."""
    return row.get({"val_loss": "best_val_loss", "val_bpb": "best_val_bpb"}.get(metric, metric))


def configurations(c: dict) -> list[dict]:
    """collect()'s trials grouped by configuration, best first, each with its statistics
    (chimera.sweep.stats.compare over its finished trials' metric). A stopped or failed
    trial is listed under its configuration but not counted: its metric is from a shorter run."""
    from chimera.sweep.stats import compare

    spec, metric = c["spec"], c["metric"]
    members: dict[str, list[dict]] = {}
    for r in c["rows"]:                      # best trial first, so ties in order keep that order
        members.setdefault(r["config"], []).append(r)
    def counted(r):
        v = metric_value(r, metric)
        return r["status"] == "finished" and isinstance(v, (int, float)) and math.isfinite(v)
    values = {k: [metric_value(r, metric) for r in rs if counted(r)] for k, rs in members.items()}
    out = []
    for i, st in enumerate(compare(values, c["mode"], spec.get("significance", 0.05))):
        rs = members[st.config]
        best = next((r for r in rs if r["best_checkpoint"]), None)
        out.append({"rank": i + 1, **st.to_dict(), "arch": rs[0]["arch"], "hparams": rs[0]["hparams"],
                    "trials": [r["trial"] for r in rs], "best_trial": best["trial"] if best else None})
    return out


_VERDICT = {"best": "**best**", "tied": "tied", "worse": "significantly worse",
            "untested": "n < 2: no test", "no data": "no finished run"}


def configurations_markdown(confs: list[dict], c: dict) -> str:
    """The configuration table of results.md (mean ± CI half-width, CI, p vs best, verdict);
    with seeds: 1 a plain statement that no significance is claimed instead."""
    from chimera.sweep.stats import CONFIDENCE, TEST

    spec, metric = c["spec"], c["metric"]
    seeds, level = spec.get("seeds", 1), spec.get("significance", 0.05)
    if seeds == 1:
        return ("One run per configuration (`seeds: 1`): no significance is claimed. A difference "
                "between trials may be seed noise; set `seeds: 3` or more to test it.\n")
    name = {"val_loss": "best val loss", "val_bpb": "best val bpb"}.get(metric, metric)

    def num(v):
        return "" if v is None else f"{v:.4f}"
    lines = [f"## Configurations: {seeds} seeds each, {name} over finished runs",
             "", f"mean ± half-width of the {CONFIDENCE:.0%} CI of the mean (t distribution); p: {TEST}; "
             f"tied: p ≥ {level:g} (not distinguishable from the best at that level), worse: p < {level:g}. "
             f"Assumes independent, roughly normal runs (docs/sweeps.md).", ""]
    heads = ["#", "config", "architecture", "hyperparameters", "n", "mean ± CI", "std", "95% CI",
             "p vs best", "verdict"]
    rows = []
    for r in confs:
        ci = r["ci"]
        mean = num(r["mean"]) + (f" ± {(ci[1] - ci[0]) / 2:.4f}" if ci else "")
        rows.append([str(r["rank"]), r["config"], r["arch"], r["hparams"], str(r["n"]), mean, num(r["std"]),
                     f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "", "" if r["p"] is None else f"{r['p']:.3g}",
                     _VERDICT[r["verdict"]]])
    keep = [i for i, h in enumerate(heads) if h != "hyperparameters" or any(x[i] for x in rows)]
    lines += ["| " + " | ".join(heads[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(x[i].replace("|", "/") for i in keep) + " |" for x in rows]
    return "\n".join(lines) + "\n"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def eval_keys(rows: list[dict]) -> list[str]:
    """The columns jobs/eval.py added (store.eval_columns): bpb:<dataset>, <task>:<metric>."""
    return sorted({k for r in rows for k in r if ":" in k})


def markdown(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    at = len(cols) - bool(cols and cols[-1][0] == "error")          # before the error column
    cols[at:at] = [(k, k) for k in eval_keys(rows)]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _pareto(points: list[tuple[float, float]], larger_x_better: bool) -> list[tuple[float, float]]:
    """Points not dominated (lower y is better; x better when smaller unless larger_x_better)."""
    front = []
    for x, y in points:
        dominated = any((x2 >= x if larger_x_better else x2 <= x) and y2 <= y and (x2, y2) != (x, y)
                        for x2, y2 in points)
        if not dominated:
            front.append((x, y))
    return sorted(front)


def plots(root: Path, rows: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = [_curves(root, rows, "curve", "val loss", "val_loss_curves.png")]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label, larger in ((axes[0], "kv_bytes_per_token", "KV-cache bytes / token", False),
                                   (axes[1], "decode_tokens_per_s", "decode tokens/s (batch 1, KV cache)", True)):
        pts = [(r[key], r["best_val_loss"], r) for r in rows
               if r.get(key) is not None and r.get("best_val_loss") is not None]
        for x, y, r in pts:
            ax.scatter([x], [y], s=30)
            ax.annotate(r["trial"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto([(x, y) for x, y, _ in pts], larger)
        if front:
            fx, fy = zip(*front)
            ax.plot(fx, fy, "r-", lw=1.2, marker="o", ms=11, mfc="none", mec="r", label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("best val loss")
        ax.grid(alpha=0.3)
    fig.suptitle("val loss against inference cost")
    fig.tight_layout()
    fig.savefig(root / "pareto.png", dpi=110)
    plt.close(fig)
    out.append(str(root / "pareto.png"))
    return out


def pareto_front(rows: list[dict], spec: dict) -> dict | None:
    """With two or more objectives: every trial's Pareto rank over them (0 = on the front),
    set as row["pareto_rank"] (None where an objective is missing), and the front, best first
    by the first objective. None with fewer objectives."""
    from chimera.sweep.pareto import objective_vector, pareto_ranks

    modes = dict(spec.get("objectives") or {})
    if len(modes) < 2:
        return None
    pts = [(r, objective_vector(r, modes)) for r in rows if r["status"] != "failed"]
    pts = [(r, v) for r, v in pts if v is not None]
    ranks = pareto_ranks([v for _, v in pts])
    for r in rows:
        r["pareto_rank"] = None
    for (r, v), k in zip(pts, ranks):
        r["pareto_rank"] = k
    front = sorted((r for r, _ in pts if r["pareto_rank"] == 0), key=lambda r: objective_vector(r, modes))
    return {"objectives": modes, "front": [r["trial"] for r in front], "evaluated": len(pts),
            "rows": front}


def pareto_markdown(front: dict | None) -> str:
    if front is None:
        return ""
    from chimera.sweep.pareto import result_key
    names = list(front["objectives"])
    head = ("\n## Pareto front\n\n" + f"{len(front['front'])} of {front['evaluated']} trials with every "
            "objective measured are not dominated on (" + ", ".join(f"{n} {m}" for n, m in
                                                               front["objectives"].items()) + "):\n\n")
    out = ["| trial | architecture | hyperparameters | " + " | ".join(names) + " |",
           "|" + "---|" * (3 + len(names))]
    for r in front["rows"]:
        out.append(f"| {r['trial']} | {_fmt('arch', r['arch'])} | {_fmt('hparams', r['hparams'])} | "
                   + " | ".join(_fmt(result_key(n), r.get(result_key(n))) for n in names) + " |")
    return head + "\n".join(out) + "\n"


def pareto_front_plot(root: Path, rows: list[dict], front: dict | None) -> list[str]:
    """pareto_front.png: the first objective against each other one, every trial coloured by
    its Pareto rank over all objectives, the front circled; last panel, the first objective
    per trial in suggestion order with the best so far."""
    if front is None:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from chimera.sweep.pareto import result_key

    names = list(front["objectives"])
    modes = front["objectives"]
    pts = [r for r in rows if r.get("pareto_rank") is not None]
    y0 = result_key(names[0])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), squeeze=False)
    top = max([r["pareto_rank"] for r in pts], default=0)
    for ax, name in zip(axes[0], names[1:]):
        x = result_key(name)
        sc = ax.scatter([r[x] for r in pts], [r[y0] for r in pts], c=[r["pareto_rank"] for r in pts],
                        cmap="viridis", vmin=0, vmax=max(1, top), s=28, zorder=2)
        on = [r for r in pts if r["pareto_rank"] == 0]
        ax.scatter([r[x] for r in on], [r[y0] for r in on], s=150, facecolors="none", edgecolors="r",
                   lw=1.4, zorder=3, label=f"Pareto front ({len(on)})")
        for r in on:
            ax.annotate(r["trial"], (r[x], r[y0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{name} ({modes[name]})")
        ax.set_ylabel(f"{names[0]} ({modes[names[0]]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.colorbar(sc, ax=list(axes[0][:-1]), label="Pareto rank (0 = front)", ticks=range(max(1, top) + 1))
    ax = axes[0][-1]                            # the search's progress, in suggestion order
    seq = sorted((r for r in rows if r.get(y0) is not None), key=lambda r: r["trial"])
    if seq:
        ys = [r[y0] for r in seq]
        best = [min(ys[:i + 1]) if modes[names[0]] == "min" else max(ys[:i + 1]) for i in range(len(ys))]
        ax.plot(range(len(ys)), ys, "o", ms=4, label="trial")
        ax.plot(range(len(ys)), best, "r-", lw=1.2, label="best so far")
        ax.legend(fontsize=8)
    ax.set_xlabel("trial (suggestion order)")
    ax.set_ylabel(f"{names[0]} ({modes[names[0]]})")
    ax.grid(alpha=0.3)
    fig.suptitle(f"Pareto front over ({', '.join(f'{n} {m}' for n, m in modes.items())}): "
                 f"{len(front['front'])} of {front['evaluated']} trials")
    fig.savefig(root / "pareto_front.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [str(root / "pareto_front.png")]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(root: str | Path, wall_time_s: float | None = None,
                 decode_missing: bool = True) -> dict[str, Any]:
    import yaml
    from models.config import ModelConfig
    from chimera import checkpoint as ckpt

    from chimera.sweep.spec import SweepSpecError
    try:
        root = storage.resolve(root)                  # results.json carries absolute paths
    except storage.StorageError as e:
        raise SweepSpecError(str(e)) from None
    remote = storage.is_uri(root)
    root = root.rstrip("/") if remote else Path(root)
    c = collect(root, decode_missing=decode_missing)
    # the files are made in `out`: the sweep folder, or (object storage) a temporary folder
    # uploaded to the sweep's URI at the end; the paths the report names are the final ones
    import tempfile
    out_dir = Path(tempfile.mkdtemp(prefix="chimera_report_")) if remote else root

    def final(p) -> str:                       # where a file made in out_dir ends up
        return storage.join(root, Path(p).name)
    rows, rejected = c["rows"], c["rejected"]
    front = pareto_front(rows, c["spec"])          # sets each row's pareto_rank (results.json)
    table = markdown(rows + rejected)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped", "failed", "not run")}
    counts["rejected"] = len(rejected)
    toks = sorted({str(r["tokenizer"]) for r in rows if r.get("tokenizer")})
    head = (f"# Sweep {c['spec']['name']}\n\nmetric {c['metric']} ({c['mode']}); "
            + (f"tokenizers {', '.join(toks)} (compared in bits per byte); " if len(toks) > 1 else "")
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + (f"; wall time {wall_time_s:.0f} s" if wall_time_s else "") + "\n\n")
    ladder = None
    if c["spec"].get("ladder"):             # scaling fits and scaling.png (chimera.sweep.scaling)
        from chimera.sweep.scaling import write_ladder
        ladder = write_ladder(out_dir, rows, c["trials"], c["spec"])
        table += "\n" + ladder["markdown"]
    confs = configurations(c)
    conf_table = configurations_markdown(confs, c)
    _atomic(out_dir / "results.md", head + conf_table + "\n" + ("## Trials\n\n" if confs and
                                                              c["spec"].get("seeds", 1) > 1 else "") + table
            + pareto_markdown(front))
    fields = [k for k, _ in COLUMNS] + ["config", "best_checkpoint", "val_loss", "tokens", "trial_time_s",
                                        "tokenizer", "val_bpb", "train_bpb"] + eval_keys(rows)
    with open(out_dir / "results.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows + rejected:
            w.writerow(r)
    os.replace(out_dir / "results.csv.tmp", out_dir / "results.csv")
    trials_json = [{"trial_id": r["trial"], **{k: v for k, v in r.items()
                                               if k not in ("curve", "bpb_curve", "trial")},
                    c["metric"]: metric_value(r, c["metric"])}
                   for r in rows]
    from chimera.sweep.stats import CONFIDENCE, TEST
    _atomic(out_dir / "results.json", json.dumps({"metric": c["metric"], "mode": c["mode"],
                                               "trials": trials_json, "rejected": rejected,
                                               "seeds": c["spec"].get("seeds", 1),
                                               "significance": c["spec"].get("significance", 0.05),
                                               "confidence": CONFIDENCE, "test": TEST,
                                               "configurations": confs,
                                               **({"ladder": {k: v for k, v in ladder.items()
                                                              if k not in ("markdown", "summary")}}
                                                  if ladder else {})},
                                              indent=2, default=str) + "\n")
    best = next((r for r in rows if r["best_checkpoint"]), None)
    if c["spec"].get("seeds", 1) > 1:          # the best single trial of the best configuration
        by_name = {r["trial"]: r for r in rows}
        best = next((by_name[k["best_trial"]] for k in confs if k["best_trial"]), None)
    out = {"table": table, "config_table": conf_table, "configurations": confs, "counts": counts,
           "best": None, "files": [str(out_dir / "results.md"),
           str(out_dir / "results.csv"), str(out_dir / "results.json")]}
    if best is not None:
        cfg = ModelConfig.from_dict(ckpt.read_config(best["best_checkpoint"]))
        _atomic(out_dir / "best_layers.jsonl", cfg.layers_jsonl())
        trial = next(t for t in c["trials"] if t["name"] == best["trial"])
        glob = {k: v for k, v in cfg.to_dict().items() if k not in ("layers", "n_layer")}
        flags = {**trial["train"], **glob, "layer_configs_jsonl": final("best_layers.jsonl")}
        _atomic(out_dir / "best_train.yaml", f"# best trial {best['trial']}: {best['arch']}\n"
                + yaml.safe_dump(flags, sort_keys=True))
        out["best"] = {"trial": best["trial"], "config": best["config"], "arch": best["arch"],
                       "best_val_loss": best["best_val_loss"], "best_val_bpb": best["best_val_bpb"],
                       "checkpoint": best["best_checkpoint"], "layers_jsonl": final("best_layers.jsonl"),
                       "train_config": final("best_train.yaml")}
        out["files"] += [str(out_dir / "best_layers.jsonl"), str(out_dir / "best_train.yaml")]
    out["files"] += plots(out_dir, rows)
    from chimera.sweep.spec import BPB_METRICS
    if c["metric"] in BPB_METRICS:
        out["files"].append(bpb_curves(out_dir, rows))
    if ladder:
        out["ladder"] = ladder
        out["files"].append(ladder["plot"])
    out["files"] += pareto_front_plot(out_dir, rows, front)
    out["pareto"] = pareto_markdown(front)
    if remote:                     # each file one PUT: whole or absent; results.json last
        import shutil
        files = sorted(out["files"], key=lambda f: Path(f).name == "results.json")
        for f in files:
            storage.upload_file(f, final(f))
        shutil.rmtree(out_dir, ignore_errors=True)
        out["files"] = [final(f) for f in out["files"]]
        if out.get("ladder"):
            out["ladder"]["plot"] = final(out["ladder"]["plot"])
    return out


def bpb_curves(root: Path, rows: list[dict]) -> str:
    """val_bpb_curves.png: val bits per byte against steps, every trial (with its tokenizer)."""
    return _curves(root, rows, "bpb_curve", "val bits per byte", "val_bpb_curves.png", tokenizer=True)


def _curves(root: Path, rows: list[dict], key: str, name: str, file: str, tokenizer: bool = False) -> str:
    """One line per trial of its (step, value) curve `row[key]`, the seeds of a configuration in
    one colour, dashed when the trial did not finish; saved as root/file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    for r in rows:
        if r.get(key):
            s, v = zip(*r[key])
            color = colors.setdefault(r.get("config", r["trial"]), f"C{len(colors) % 10}")
            label = f"{r['trial']} {r['arch']} {r['hparams']}" + (f" ({r['tokenizer']})" if tokenizer else "")
            ax.plot(s, v, marker="o", ms=3, label=label[:80], color=color,
                    ls="-" if r["status"] == "finished" else "--")
    ax.set_xlabel("training step")
    ax.set_ylabel(name)
    ax.set_title(f"{name} of every trial (dashed: stopped early / failed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / file, dpi=110)
    plt.close(fig)
    return str(root / file)
