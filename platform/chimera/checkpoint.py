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
    <dir>/adapter.safetensors a LoRA run's adapters (models.lora: `<linear>.lora_A` / `lora_B`)
    <dir>/adapter.json        their rank, alpha, targets, the base's source and base_sha256
A LoRA checkpoint's model.safetensors holds the frozen base weights, unchanged: a checkpoint
stays whole on its own (a restart, load_model, an export or a replica needs nothing else, even
when the base came from hf: or a deleted folder), at the cost of a copy of the base per kept
checkpoint; adapter.safetensors alone is what `jobs/serve.py --adapter` adds to a base.
load_model merges the adapters, so every reader gets a plain model.
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
from safetensors.torch import load_file, load_model as load_safetensors, save_file, save_model

from chimera import storage

WEIGHTS, CONFIG, TOKENIZER, STATE, META = ("model.safetensors", "config.json", "tokenizer.json",
                                           "train_state.pt", "meta.json")
ADAPTER_WEIGHTS, ADAPTER = "adapter.safetensors", "adapter.json"


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, model_config: dict,
                    tokenizer: dict | None = None, train_state: dict | None = None,
                    meta: dict | None = None, adapter: dict | None = None) -> Path:
    """`adapter`: adapter.json of a model with LoRA adapters (rank, alpha, targets, base,
    base_sha256), required exactly when it has them: the base weights go to model.safetensors
    and the adapters to adapter.safetensors."""
    from models import lora
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    adapters = lora.adapter_state(model)
    if bool(adapters) != (adapter is not None):
        raise ValueError("save_checkpoint: adapter.json is given exactly when the model has "
                         f"LoRA adapters (adapters: {len(adapters)}, adapter: {adapter is not None})")
    if adapters:
        save_file(base_state(model), str(p / WEIGHTS))
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(p / ADAPTER_WEIGHTS))
        (p / ADAPTER).write_text(json.dumps(adapter, indent=2) + "\n")
    else:
        save_model(model, str(p / WEIGHTS))
    (p / CONFIG).write_text(json.dumps(model_config, indent=2) + "\n")
    if tokenizer is not None:
        (p / TOKENIZER).write_text(json.dumps(tokenizer) + "\n")
    if train_state is not None:
        torch.save(train_state, p / STATE)
    (p / META).write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")
    return p


def load_weights(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """model.safetensors into `model` (strict); a model with LoRA adapters (models.lora) also
    takes adapter.safetensors, and every key of both files must be one of its own."""
    from models import lora
    keys = lora.adapter_keys(model)
    if not keys:
        load_safetensors(model, str(Path(path) / WEIGHTS), strict=True, device=str(device))
        return
    missing, unexpected = load_safetensors(model, str(Path(path) / WEIGHTS), strict=False,
                                           device=str(device))
    if set(missing) != keys or unexpected:
        raise ValueError(f"{path}/{WEIGHTS}: not this model's base weights (missing "
                         f"{sorted(set(missing) - keys)[:5]}, unexpected {sorted(unexpected)[:5]})")
    load_adapters(model, path, device)


def load_adapters(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """adapter.safetensors into a model that has the same adapters (strict on their keys)."""
    from models import lora
    f = Path(path) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS} (not a LoRA checkpoint)")
    sd = load_file(str(f), device=str(device))
    keys = lora.adapter_keys(model)
    if set(sd) != keys:
        raise ValueError(f"{f}: adapters {sorted(set(sd) ^ keys)[:5]} do not match the model's "
                         f"(rank, targets: see {ADAPTER})")
    model.load_state_dict(sd, strict=False)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without LoRA adapters, each storage once (the tied LM head is the
    embedding: safetensors stores shared tensors once, and load_model re-ties them)."""
    from models import lora
    skip, seen, out = lora.adapter_keys(model), set(), {}
    for k, v in model.state_dict().items():
        if k in skip or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.contiguous()
    return out


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 (hex) of a model's base weights: every key of its state dict except LoRA
    adapters, sorted, with dtype, shape and bytes. What adapter.json records of its base, and
    what `jobs/serve.py --adapter` checks a base against."""
    import hashlib
    from models import lora
    skip = lora.adapter_keys(model)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k in skip:
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_adapter(path: str | Path) -> dict | None:
    """adapter.json of a checkpoint, or None when it is not a LoRA checkpoint."""
    f = Path(path) / ADAPTER
    return json.loads(f.read_text()) if f.is_file() else None


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


SERVED = (WEIGHTS, CONFIG, TOKENIZER, META, ADAPTER_WEIGHTS, ADAPTER)   # what loading a model needs (not the train state)


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


def load_model(path: str | Path, device: str | torch.device = "cpu", adapter: str | Path | None = None):
    """(model in eval mode on `device`, tokenizer, meta) from a checkpoint or run directory
    (local, or a URI: see resolve_checkpoint): the model rebuilt from config.json only,
    weights from model.safetensors (strict), the tokenizer from tokenizer.json. A LoRA
    checkpoint (adapter.json) comes back merged: a plain model. `adapter`: a LoRA checkpoint
    (or run dir) whose adapters are merged into `path`'s weights instead — its config and
    tokenizer, path's weights, which must be the ones it was trained on (check_adapter).
    ValueError (ConfigError, TokenizerError, StorageError) when unusable."""
    from chimera.data.tokenizers import Tokenizer
    from models import LLM, ModelConfig, lora

    p = resolve_checkpoint(path)
    if adapter is None:
        model = LLM(ModelConfig.from_dict(read_config(p)))
        info = read_adapter(p)
        if info is not None:
            lora.apply_lora(model, info["rank"], info["alpha"], info["targets"])
        load_weights(model, p, device)
        files = p
    else:
        base, _, _ = load_model(p, device)
        files = resolve_checkpoint(adapter)
        info = check_adapter(base, files)
        model = LLM(ModelConfig.from_dict(read_config(files)))
        lora.apply_lora(model, info["rank"], info["alpha"], info["targets"])
        load_init_state(model, base.state_dict(), f"{p}")
        load_adapters(model, files, device)
        del base
    lora.merge_lora(model)
    tok = Tokenizer.from_dict(json.loads((files / TOKENIZER).read_text()))
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{files}: tokenizer vocab {tok.vocab_size} > model vocab {model.cfg.vocab_size}")
    meta = {**read_meta(files), "path": str(files)}
    if adapter is not None:
        meta["base"] = str(p)
    if storage.is_uri(path):
        meta["source"] = str(path)
    return model.to(device).eval(), tok, meta


def check_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> dict:
    """adapter.json of a LoRA checkpoint, checked against the base model it is to be merged
    into: the sha256 of the base weights it was trained on must be `base`'s
    (weights_sha256). ValueError naming both otherwise."""
    info = read_adapter(adapter_dir)
    if info is None:
        raise ValueError(f"adapter {adapter_dir}: not a LoRA checkpoint (no {ADAPTER})")
    have = weights_sha256(base)
    if info.get("base_sha256") != have:
        raise ValueError(f"adapter {adapter_dir} was trained on base weights with sha256 "
                         f"{str(info.get('base_sha256'))[:16]}... (from {info.get('base')}), but "
                         f"the base given has sha256 {have[:16]}...: not the same base")
    return info


def load_init_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a source model's state dict into `model`, whose config may differ from the
    source's only in block_size (<= the source's: tables of block_size rows, the learned
    positions, keep their first rows) and dropout. Every key of `model` but its LoRA adapters
    must be in `state` and nothing else; ValueError naming the key otherwise."""
    from models import lora
    skip = lora.adapter_keys(model)
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{source}: its weights do not fit this model (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    T = model.cfg.block_size
    with torch.no_grad():
        for k, dst in own.items():
            src = state[k]
            if src.shape != dst.shape:
                if not (src.dim() >= 1 and src.shape[1:] == dst.shape[1:] and dst.shape[0] == T
                        and src.shape[0] > T):
                    raise ValueError(f"{source}: {k} has shape {tuple(src.shape)}, this model "
                                     f"needs {tuple(dst.shape)}")
                src = src[:T]
            dst.copy_(src)


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
