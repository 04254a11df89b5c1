"""The dispatch between Chimera checkpoints and HF folders: which family, then the file work.

    cfg, state, tok = import_hf("path/to/hf_folder", block_size=None)   # (config dict, weights, tokenizer dict | None)
    export_hf("runs/my_run", "exports/my_run", overwrite=False)          # -> out; out may be s3://...
    family_for(model_cfg)                                                # chimera.hf.gpt2 / llama / deepseek

Families are the modules chimera.hf.<name> for name in FAMILIES, imported on first use, tried in
that order (the first whose `misfit(cfg)` is empty exports a stack). A family module that does
not exist is skipped; any other import error is raised.
"""
from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

FAMILIES = ("gpt2", "llama", "deepseek")


def families() -> list[ModuleType]:
    out = []
    for name in FAMILIES:
        full = f"chimera.hf.{name}"
        try:
            out.append(importlib.import_module(full))
        except ModuleNotFoundError as e:
            if e.name != full:                  # the module exists but an import inside it failed
                raise
    return out


def family_for(cfg) -> ModuleType:
    """The first family that can express the stack; ValueError with every family's reasons."""
    reasons = []
    for fam in families():
        why = fam.misfit(cfg)
        if not why:
            return fam
        reasons.append(f"{fam.__name__.rsplit('.', 1)[-1]}: " + "; ".join(why))
    raise ValueError(f"no Hugging Face family can express this stack ({cfg.summary()}):\n  "
                     + "\n  ".join(reasons))


def family_of_model_type(model_type: str) -> ModuleType:
    fams = families()
    for fam in fams:
        if model_type in fam.MODEL_TYPES:
            return fam
    known = [t for f in fams for t in f.MODEL_TYPES]
    raise ValueError(f"HF model_type {model_type!r} is not supported; supported: {', '.join(known)}")


def import_hf(path: str, block_size: int | None = None):
    """(Chimera model config dict, Chimera state dict, Chimera tokenizer dict or None) from an HF
    folder (or a hub id, on a machine with network). The weights are loaded in fp32 through
    transformers, so families see the module's state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(path)
    fam = family_of_model_type(hf_cfg.model_type)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg, state = fam.from_hf(model.config, model.state_dict(), block_size)
    from chimera.hf.tokenizer import chimera_tokenizer
    local = Path(path)
    tok = chimera_tokenizer(local) if local.is_dir() else _hub_tokenizer(path)
    return cfg, state, tok


def _hub_tokenizer(repo_id: str) -> dict | None:
    from huggingface_hub import snapshot_download
    from chimera.hf.tokenizer import chimera_tokenizer
    d = snapshot_download(repo_id, allow_patterns=["tokenizer*", "vocab.json", "merges.txt",
                                                    "special_tokens_map.json", "config.json"])
    return chimera_tokenizer(d)


def export_hf(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """Write checkpoint (a checkpoint or run dir, local or URI) as an HF folder at `out` (local or
    URI): config.json + model.safetensors + generation_config.json, tokenizer files and
    README.md. A non-empty `out` is refused unless `overwrite`. Returns `out` (resolved); the
    stack no family fits is a ValueError naming every family's reasons. A model trained with
    multi-token prediction (mtp_depth > 0) is exported without its MTP modules (models.mtp
    drop_mtp; no HF family runs them, and inference never uses them: the logits are the same),
    which README.md says."""
    from chimera import storage

    target = storage.resolve(out)
    if storage.is_uri(target):
        busy = bool(storage.listdir(target))
    else:
        if Path(target).is_file():
            raise ValueError(f"--out {out}: is a file, not a folder")
        busy = Path(target).is_dir() and any(Path(target).iterdir())
    if busy and not overwrite:
        raise ValueError(f"--out {out}: not empty (pass --overwrite to replace what is there)")
    from chimera.checkpoint import load_model

    from models.mtp import drop_mtp

    model, tok, meta = load_model(checkpoint)
    depth = model.cfg.mtp_depth
    model = drop_mtp(model)
    fam = family_for(model.cfg)
    if storage.is_uri(target):
        stage = Path(tempfile.mkdtemp(prefix="hf-export-"))
    else:                                        # beside out: the final move is a rename
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.", dir=Path(target).parent))
    try:
        _write(fam, model, tok, meta, stage, dropped_mtp=depth)
        if storage.is_uri(target):
            storage.upload_dir(stage, target, replace=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            stage.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _write(fam: ModuleType, model, tok, meta: dict, folder: Path, dropped_mtp: int = 0) -> None:
    """save_pretrained + tokenizer files + README.md into `folder`."""
    from transformers import AutoModelForCausalLM
    from chimera.hf.tokenizer import special_ids, write_tokenizer

    hf_cfg, sd = fam.to_hf(model.cfg, model.state_dict())
    for k, v in special_ids(tok).items():
        setattr(hf_cfg, k, v)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    hf.load_state_dict(sd, strict=True)
    hf.generation_config.bos_token_id = hf_cfg.bos_token_id
    hf.generation_config.eos_token_id = hf_cfg.eos_token_id
    hf.save_pretrained(str(folder))
    arch = type(hf).__name__
    notes = write_tokenizer(tok, folder, model.cfg.block_size)
    lines = [f"# {arch} exported from a Chimera checkpoint", "",
             f"Source: `{meta.get('source', meta.get('path'))}` (step {meta.get('step', '?')}); "
             f"stack {model.cfg.summary()}, block_size {model.cfg.block_size}.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
             "tok = AutoTokenizer.from_pretrained(FOLDER)", "```", "",
             *(f"{n}\n" for n in notes)]
    if dropped_mtp:
        lines.append(f"The checkpoint's {dropped_mtp} multi-token-prediction module(s) (mtp_depth="
                     f"{dropped_mtp}, training-only) are not exported: {arch} has none, and "
                     f"next-token logits never use them.\n")
    (folder / "README.md").write_text("\n".join(lines))
