"""The sweep directory, as files: where it is, the plan it runs, and what each trial left.

    root = sweep_dir(spec)                 # <storage_path>/<name>: a Path, or an s3:// URI
    write_plan(plan, root); doc = read_plan(root)      # sweep.json
    rows = history(root / "runs" / "t000")             # a trial's metrics.jsonl, one dict per step

Layout of <storage_path>/<name>/:
    sweep.json                the spec, the checked trials (each with its resolved model
                              config) and the rejected combinations
    runs/<trial>/             each trial's training run: checkpoints, metrics.jsonl,
                              llm_model_best/, summary.json (written when the trial completed)
    <trial>/ , *.pkl, ...     Tune's own experiment state (what --resume restores from)
    results.{md,csv,json}, best_layers.jsonl, best_train.yaml, *.png    the report
    eval.json                 jobs/eval.py --from_sweep: {"models": {name: {"trial", "bpb":
                              {dataset: {"bpb", ...}}, "tasks": {task: {"metric", "value",
                              "stderr", ...}}}}}; the report adds its columns (eval_columns)

Both the Tune run (sweep/run.py) and the report (sweep/report.py) read it through here, so
neither imports the other's internals. Every function takes a local folder or an object-store
URI (chimera.storage): a sweep on s3:// keeps all of the above in the bucket, and trials on
any node read their plan from there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chimera import storage
from chimera.paths import resolve_storage_path
from chimera.sweep.spec import SweepSpec, SweepSpecError
from chimera.sweep.trials import SweepPlan

PLAN = "sweep.json"
SUMMARY = "summary.json"          # runs/<trial>/summary.json: the trial's final report
EVAL = "eval.json"                # jobs/eval.py's results (chimera.eval.run)


def sweep_dir(spec: SweepSpec) -> Path | str:
    """<storage_path>/<name>: a local Path, or a URI string (s3://...) for object storage."""
    try:
        base = resolve_storage_path(spec.storage_path)
    except storage.StorageError as e:
        raise SweepSpecError(f"storage_path: {e}") from None
    return storage.join(base, spec.name) if storage.is_uri(base) else Path(base) / spec.name


def write_plan(plan: SweepPlan, root: Path | str) -> None:
    doc = {"spec": plan.spec.to_dict(),
           "trials": [t.__dict__ for t in plan.trials],
           "rejected": [{"choices": c, "error": m} for c, m in plan.rejected]}
    storage.write_text(storage.join(root, PLAN), json.dumps(doc, indent=2, default=str) + "\n")


def read_plan(root: Path | str, log=print) -> dict:
    """sweep.json as written by write_plan; trials of older versions are upgraded here."""
    f = storage.join(root, PLAN)
    try:
        text = storage.read_text(f)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SweepSpecError(f"{root} is not a sweep directory (no {PLAN})") from None
    except storage.StorageError as e:
        raise SweepSpecError(f"{root}: {e}") from None
    try:
        doc = json.loads(text)
        doc["spec"], doc["trials"], doc["rejected"]
        doc["trials"] = [_upgrade_trial(t, log) for t in doc["trials"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SweepSpecError(f"{f}: not a sweep plan this version wrote ({type(e).__name__}: {e})") from None
    return doc


def _upgrade_trial(t: dict[str, Any], log) -> dict[str, Any]:
    """Trials written before they carried `model_config` held the model as flags plus a
    layer_configs JSON string in `train`: resolve it once, the way the trial ran."""
    if "model_config" in t:
        return t
    from models.config import MODEL_KEYS, ModelConfig, parse_layer_list
    train = dict(t["train"])
    flags = {k: train.pop(k) for k in list(train) if k in MODEL_KEYS}
    layers = parse_layer_list(train.pop("layer_configs"))
    flags.pop("n_layer", None)
    log(f"note: sweep.json trial {t['name']}: upgraded (model flags + layer_configs -> model_config)")
    return {**t, "train": train, "model_config": ModelConfig.from_dict({**flags, "layers": layers}).to_dict()}


def history(run_dir: Path) -> list[dict]:
    """A trial run's metrics.jsonl, one merged dict per step (a resumed run repeats steps;
    a line cut by a kill is skipped)."""
    try:
        text = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    by_step: dict[int, dict] = {}
    for line in text.splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step.setdefault(int(m.get("step", 0)), {}).update(m)
    return [by_step[k] for k in sorted(by_step)]


def eval_columns(root: Path) -> dict[str, dict[str, float]]:
    """{trial: {"bpb:<dataset>": bits per byte, "<task>:<metric>": value}} from <root>/eval.json
    (models evaluated as a trial of this sweep); {} without one."""
    f = storage.join(root, EVAL)
    try:
        text = storage.read_text(f)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {}
    try:
        models = json.loads(text)["models"]
        out: dict[str, dict[str, float]] = {}
        for m in models.values():
            if m.get("trial"):
                cols = out.setdefault(m["trial"], {})
                cols.update({f"bpb:{d}": v["bpb"] for d, v in m.get("bpb", {}).items()})
                cols.update({f"{t}:{v['metric']}": v["value"] for t, v in m.get("tasks", {}).items()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SweepSpecError(f"{f}: not an eval result jobs/eval.py wrote ({type(e).__name__}: {e})") from None
    return out
