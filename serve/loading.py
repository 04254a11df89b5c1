"""What to serve: model names for checkpoints and run directories, and a sweep's best trials.

    parse_models(["runs/a", "small=runs/b/checkpoint_000300"])   # [(name, checkpoint dir), ...]
    sweep_models("sweeps/s1", top_k=2)             # the 2 best trials of a sweep

A run directory serves its best checkpoint, else its latest (chimera.checkpoint
.resolve_checkpoint); replicas load it with chimera.checkpoint.load_model. A checkpoint in
object storage (s3://...) stays a URI here, resolved to the concrete checkpoint and fetched
once into this node's cache (so a bad one fails before any replica starts); each replica then
loads the URI into its own node's cache.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath

from chimera import storage
from chimera.checkpoint import remote_checkpoint, resolve_checkpoint

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_name(ckpt: Path | str) -> str:
    """runs/<run>/llm_model_best -> <run>; runs/<run>/checkpoint_000300 -> <run>-000300."""
    ckpt = PurePosixPath(str(ckpt).rstrip("/")) if storage.is_uri(ckpt) else Path(ckpt)
    name = ckpt.name
    if name.endswith("_best"):
        name = ckpt.parent.name
    elif name.startswith("checkpoint_"):
        name = f"{ckpt.parent.name}-{name[len('checkpoint_'):]}"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("-._")[:64]
    return name or "model"


def checkpoint_of(path: str | Path) -> Path | str:
    """The concrete checkpoint of a checkpoint or run dir: a local Path, or for a URI the
    checkpoint's URI (fetched into this node's cache on the way, which checks it)."""
    if storage.is_uri(path):
        uri = remote_checkpoint(str(path))
        resolve_checkpoint(uri)
        return uri
    return resolve_checkpoint(path)


def adapter_of(path: str | Path) -> Path | str:
    """The concrete LoRA checkpoint of --adapter (a checkpoint or run dir, local or a URI)."""
    return checkpoint_of(path)


def check_adapter(base: Path | str, adapter: str | Path) -> None:
    """--adapter against its base, before Serve starts: a LoRA checkpoint trained on exactly
    `base`'s weights (chimera.checkpoint.check_adapter: sha256). ValueError otherwise."""
    from chimera.checkpoint import check_adapter as check, load_model
    model, _, _ = load_model(base)
    check(model, resolve_checkpoint(adapter_of(adapter)))


def parse_models(specs: list[str]) -> list[tuple[str, Path | str]]:
    """--checkpoint values, each PATH or NAME=PATH -> [(name, checkpoint dir or URI)]; names
    unique."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        ckpt = checkpoint_of(path)
        name = name or default_name(ckpt)
        if not NAME.match(name):
            raise ValueError(f"model name {name!r}: use letters, digits, '.', '_', '-' (max 64)")
        out.append((name, ckpt))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two models named {', '.join(dup)}: give names as --checkpoint NAME=PATH")
    return out


def sweep_models(sweep_dir: str | Path, top_k: int) -> list[tuple[str, Path | str]]:
    """The top_k best trials of a sweep: <sweep_dir>/results.json holds
    {"metric": ..., "mode": "min"|"max", "trials": [{"trial_id", "<metric>", "best_checkpoint",
    ...}]}. Trials without a checkpoint or a finite metric are skipped. Names are trial ids.
    A sweep with seed replicas ("seeds" > 1) also lists "configurations" (best first) and each
    trial's "config": then the best trial of each of the top_k best configurations is served."""
    f = storage.join(sweep_dir if storage.is_uri(sweep_dir) else Path(sweep_dir).expanduser(),
                     "results.json")
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    try:
        data = json.loads(storage.read_text(f))
        metric, mode, trials = data["metric"], data.get("mode", "min"), data["trials"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a readable sweep result ({type(e).__name__}: {e})") from None
    if mode not in ("min", "max"):
        raise ValueError(f"{f}: mode must be 'min' or 'max', got {mode!r}")
    ok = [t for t in trials if isinstance(t, dict) and t.get("best_checkpoint")
          and isinstance(t.get(metric), (int, float)) and math.isfinite(t[metric])]
    ok.sort(key=lambda t: t[metric], reverse=mode == "max")
    confs = data.get("configurations")
    if (isinstance(data.get("seeds"), int) and data["seeds"] > 1 and isinstance(confs, list)
            and all(isinstance(t.get("config"), str) for t in ok)):
        rank = {c.get("config"): i for i, c in enumerate(confs) if isinstance(c, dict)}
        firsts = {}
        for t in ok:                              # sorted: the first of a configuration is its best
            firsts.setdefault(t["config"], t)
        ok = sorted(firsts.values(), key=lambda t: rank.get(t["config"], len(rank)))
    if not ok:
        raise ValueError(f"{f}: no trial has a checkpoint and a finite {metric}")
    return parse_models([f"{default_name(Path(str(t['trial_id'])))}={t['best_checkpoint']}"
                         for t in ok[:top_k]])
