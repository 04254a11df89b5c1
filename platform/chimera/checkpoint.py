"""Checkpoints: one directory per checkpoint, loadable without unpickling arbitrary objects,
and the one door from a checkpoint to a model.

    model, tok, meta = load_model("runs/my_run", device="cpu")   # a run dir: its best checkpoint
    save_checkpoint(dir, model, model_config=..., tokenizer=..., train_state={...})
    load_weights(model, dir)                 # safetensors (training resumes with this)
    state = load_train_state(dir)            # torch.load(weights_only=True)
    resolve_checkpoint("runs/my_run")        # run dir -> <file_name>_best, else its latest

Layout:
    <dir>/model.safetensors   model weights and buffers (MoE biases too); tied weights stored once
    <dir>/config.json         the resolved ModelConfig (serving and sampling rebuild from it)
    <dir>/tokenizer.json      the tokenizer entry of the dataset manifest
    <dir>/train_state.pt      step, optimizer, GradScaler, loader state, RNG states of every rank,
                              best val loss, train config: tensors and plain containers only
    <dir>/meta.json           step, losses, time: for people and listings
A run directory holds checkpoint_NNNNNN/ folders and <file_name>_best/ (default llm_model_best).
Reading (resolve_checkpoint, load_model, read_config, list_checkpoints) takes local paths and
object-store URIs alike; a URI's checkpoint is fetched once into a local cache.
Sampling, serving, the sweep's decode measurement and the benchmarks all load through
load_model, so a checkpoint means the same model everywhere.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors, save_model

from chimera import storage

WEIGHTS, CONFIG, TOKENIZER, STATE, META = ("model.safetensors", "config.json", "tokenizer.json",
                                           "train_state.pt", "meta.json")


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, model_config: dict,
                    tokenizer: dict | None = None, train_state: dict | None = None,
                    meta: dict | None = None) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    save_model(model, str(p / WEIGHTS))
    (p / CONFIG).write_text(json.dumps(model_config, indent=2) + "\n")
    if tokenizer is not None:
        (p / TOKENIZER).write_text(json.dumps(tokenizer) + "\n")
    if train_state is not None:
        torch.save(train_state, p / STATE)
    (p / META).write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")
    return p


def load_weights(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    load_safetensors(model, str(Path(path) / WEIGHTS), strict=True, device=str(device))


def load_train_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def read_config(path: str | Path) -> dict:
    return json.loads(storage.read_text(storage.join(path, CONFIG)))


def read_meta(path: str | Path) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(path, META)))
    except FileNotFoundError:
        return {}


def is_checkpoint(p: str | Path) -> bool:
    return storage.is_file(storage.join(p, CONFIG)) and storage.is_file(storage.join(p, WEIGHTS))


SERVED = (WEIGHTS, CONFIG, TOKENIZER, META)   # what loading a model needs (not the train state)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as is; a run dir -> its *_best checkpoint (llm_model_best first), else
    its latest checkpoint_*. ValueError naming the path when neither, or without a tokenizer.
    A URI (s3://...) is resolved in the store, then its SERVED files are fetched into the local
    cache (chimera.storage.cached_dir; reused while the store's listing is unchanged): the
    returned path is always a local folder."""
    if storage.is_uri(path):
        uri = remote_checkpoint(str(path))
        return storage.cached_dir(uri, "checkpoints", only=SERVED)
    p = Path(path).expanduser().resolve()
    if is_checkpoint(p):
        if not (p / TOKENIZER).is_file():
            raise ValueError(f"{path}: checkpoint has no {TOKENIZER} (needed to serve text)")
        return p
    if p.is_dir():
        best = sorted(d for d in p.glob("*_best") if is_checkpoint(d))
        if best:
            return resolve_checkpoint(next((d for d in best if d.name == "llm_model_best"), best[0]))
        latest = [d for d in list_checkpoints(p) if is_checkpoint(d)]
        if latest:
            return resolve_checkpoint(latest[-1])
    raise ValueError(f"{path}: neither a checkpoint directory ({CONFIG} + {WEIGHTS}) nor a run "
                     f"directory holding *_best/ or checkpoint_*/ checkpoints")


def remote_checkpoint(uri: str) -> str:
    """resolve_checkpoint's rule applied to a URI's listing: the checkpoint's URI."""
    uri = storage.resolve(uri).rstrip("/")
    names = storage.listdir(uri)
    if CONFIG in names and WEIGHTS in names:
        if TOKENIZER not in names:
            raise ValueError(f"{uri}: checkpoint has no {TOKENIZER} (needed to serve text)")
        return uri
    best = sorted(n for n in names if n.endswith("_best") and is_checkpoint(storage.join(uri, n)))
    if best:
        return remote_checkpoint(storage.join(uri, "llm_model_best" if "llm_model_best" in best else best[0]))
    latest = [c for c in list_checkpoints(uri) if is_checkpoint(c)]
    if latest:
        return remote_checkpoint(str(latest[-1]))
    raise ValueError(f"{uri}: neither a checkpoint ({CONFIG} + {WEIGHTS}) nor a run holding "
                     f"*_best/ or checkpoint_*/ checkpoints" + ("" if names else " (nothing is stored there)"))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, tokenizer, meta) from a checkpoint or run directory
    (local, or a URI: see resolve_checkpoint): the model rebuilt from config.json only,
    weights from model.safetensors (strict), the tokenizer from tokenizer.json. ValueError
    (ConfigError, TokenizerError, StorageError) when unusable."""
    from chimera.data.tokenizers import Tokenizer
    from models import LLM, ModelConfig

    p = resolve_checkpoint(path)
    model = LLM(ModelConfig.from_dict(read_config(p)))
    load_weights(model, p, device)
    tok = Tokenizer.from_dict(json.loads((p / TOKENIZER).read_text()))
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{p}: tokenizer vocab {tok.vocab_size} > model vocab {model.cfg.vocab_size}")
    meta = {**read_meta(p), "path": str(p)}
    if storage.is_uri(path):
        meta["source"] = str(path)
    return model.to(device).eval(), tok, meta


# --- RNG states as tensors / plain lists (weights_only-loadable) ------------------------------
def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]),
                      float(st[4])],
            "python": _to_lists(random.getstate())}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(s["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def list_checkpoints(run_dir: str | Path) -> list:
    """checkpoint_NNNNNN directories of a run (each with its config), oldest first: Paths for a
    local run, URIs for one in object storage."""
    if storage.is_uri(run_dir):
        base = str(run_dir).rstrip("/")
        names = [n for n in storage.listdir(base) if re.fullmatch(r"checkpoint_\d+", n)]
        return [u for u in (storage.join(base, n) for n in sorted(names))
                if storage.is_file(storage.join(u, CONFIG))]
    d = Path(run_dir)
    return sorted(p for p in d.glob("checkpoint_*") if (p / CONFIG).is_file()) if d.is_dir() else []


def prune(run_dir: str | Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        storage.remove_dir(p)
