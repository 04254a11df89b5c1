"""What to serve: checkpoint / run-directory / sweep resolution, and loading a checkpoint.

    resolve_checkpoint("runs/my_run")              # a run dir -> its best (else latest) checkpoint
    parse_models(["runs/a", "small=runs/b/checkpoint_000300"])   # [(name, path), ...]
    sweep_models("sweeps/s1", top_k=2)             # the 2 best trials of a sweep
    model, tok = load_checkpoint(path, device)     # weights (safetensors) + config + tokenizer

A checkpoint is a directory as training writes it (platform/chimera/checkpoint.py): the model
is rebuilt only from its config.json, weights come from model.safetensors (no pickle), the
tokenizer from tokenizer.json. A run directory holds checkpoint_NNNNNN/ folders and
<file_name>_best/ (default llm_model_best); the best one is served, else the latest.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from chimera.checkpoint import CONFIG, TOKENIZER, WEIGHTS, list_checkpoints, load_weights, read_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _is_checkpoint(p: Path) -> bool:
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as is; a run dir -> its *_best checkpoint, else its latest one."""
    p = Path(path).expanduser().resolve()
    if _is_checkpoint(p):
        if not (p / TOKENIZER).is_file():
            raise ValueError(f"{path}: checkpoint has no {TOKENIZER} (needed to serve text)")
        return p
    if p.is_dir():
        best = sorted(d for d in p.glob("*_best") if _is_checkpoint(d))
        if best:
            return resolve_checkpoint(next((d for d in best if d.name == "llm_model_best"), best[0]))
        latest = [d for d in list_checkpoints(p) if _is_checkpoint(d)]
        if latest:
            return resolve_checkpoint(latest[-1])
    raise ValueError(f"{path}: neither a checkpoint directory ({CONFIG} + {WEIGHTS}) nor a run "
                     f"directory holding *_best/ or checkpoint_*/ checkpoints")


def default_name(ckpt: Path) -> str:
    """runs/<run>/llm_model_best -> <run>; runs/<run>/checkpoint_000300 -> <run>-000300."""
    name = ckpt.name
    if name.endswith("_best"):
        name = ckpt.parent.name
    elif name.startswith("checkpoint_"):
        name = f"{ckpt.parent.name}-{name[len('checkpoint_'):]}"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("-._")[:64]
    return name or "model"


def parse_models(specs: list[str]) -> list[tuple[str, Path]]:
    """--checkpoint values, each PATH or NAME=PATH -> [(name, checkpoint dir)]; names unique."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        ckpt = resolve_checkpoint(path)
        name = name or default_name(ckpt)
        if not NAME.match(name):
            raise ValueError(f"model name {name!r}: use letters, digits, '.', '_', '-' (max 64)")
        out.append((name, ckpt))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two models named {', '.join(dup)}: give names as --checkpoint NAME=PATH")
    return out


def sweep_models(sweep_dir: str | Path, top_k: int) -> list[tuple[str, Path]]:
    """The top_k best trials of a sweep: <sweep_dir>/results.json holds
    {"metric": ..., "mode": "min"|"max", "trials": [{"trial_id", "<metric>", "best_checkpoint",
    ...}]}. Trials without a checkpoint or a finite metric are skipped. Names are trial ids."""
    f = Path(sweep_dir).expanduser() / "results.json"
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {top_k}")
    try:
        data = json.loads(f.read_text())
        metric, mode, trials = data["metric"], data.get("mode", "min"), data["trials"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a readable sweep result ({type(e).__name__}: {e})") from None
    if mode not in ("min", "max"):
        raise ValueError(f"{f}: mode must be 'min' or 'max', got {mode!r}")
    ok = [t for t in trials if isinstance(t, dict) and t.get("best_checkpoint")
          and isinstance(t.get(metric), (int, float)) and math.isfinite(t[metric])]
    ok.sort(key=lambda t: t[metric], reverse=mode == "max")
    if not ok:
        raise ValueError(f"{f}: no trial has a checkpoint and a finite {metric}")
    return parse_models([f"{default_name(Path(str(t['trial_id'])))}={t['best_checkpoint']}"
                         for t in ok[:top_k]])


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model in eval mode on device, tokenizer) from a checkpoint directory."""
    from chimera.data.tokenizers import Tokenizer
    from models import LLM, ModelConfig

    p = resolve_checkpoint(path)
    model = LLM(ModelConfig.from_dict(read_config(p)))
    load_weights(model, p, device)
    tok = Tokenizer.from_dict(json.loads((p / TOKENIZER).read_text()))
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{p}: tokenizer vocab {tok.vocab_size} > model vocab {model.cfg.vocab_size}")
    return model.to(device).eval(), tok
