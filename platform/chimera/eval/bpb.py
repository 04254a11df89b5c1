"""Bits per byte of a checkpoint on the validation shards of prepared datasets.

    check_data_dir(data_dir, tokenizer_info)      # manifest.json readable, same tokenizer, else ValueError
    bits_per_byte(model, tok, data_dir, batch_size=32)   # {"bpb", "loss", "tokens", "windows"}

The measure is training's own (chimera.train.measure.eval_losses with the tokenizer's byte
table): nats summed over the targets, / ln 2, / the UTF-8 bytes of text they stand for. Here
it runs over the whole val split, not eval_iters batches: every window of block_size + 1 tokens
(the loader's val windows, in order) that fills a full batch; the rest of the split, under one
batch, is left out and `tokens` says how many targets were counted. A data folder whose
tokenizer differs from the checkpoint's is refused: its ids would mean other symbols.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch


def describe(info: dict) -> str:
    vocab = f", vocab {info['vocab_size']}" if "vocab_size" in info else ""
    return f"{info.get('name')}{vocab}"


def _identity(info: dict) -> dict:
    return {k: info.get(k) for k in ("name", "vocab", "vocab_size", "eot_id")}


def check_data_dir(data_dir: str | Path, tokenizer_info: dict, what: str = "the checkpoint") -> dict:
    """The manifest of a prepared data folder whose tokenizer is `tokenizer_info` (the
    checkpoint's tokenizer.json); ValueError naming the folder otherwise."""
    from chimera.data.shards import read_manifest
    try:
        manifest = read_manifest(data_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--data_dir {data_dir}: not a prepared data folder ({e})") from None
    theirs = manifest.get("tokenizer") or {}
    if _identity(theirs) != _identity(tokenizer_info):
        raise ValueError(f"--data_dir {data_dir}: prepared with tokenizer {describe(theirs)}, but "
                         f"{what} uses {describe(tokenizer_info)}: bits per byte need the model's "
                         f"own tokens (prepare the data with that tokenizer)")
    if not manifest.get("splits", {}).get("val", {}).get("tokens"):
        raise ValueError(f"--data_dir {data_dir}: its val split is empty")
    return manifest


def bits_per_byte(model, tok, data_dir: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """{"bpb", "loss" (nats/token), "tokens" (targets counted), "windows"} of `model` on the val
    split of `data_dir`, in fp32 on the model's device."""
    from chimera.data.loader import ShardLoader
    from chimera.data.tokenizers import token_bytes
    from chimera.train.measure import eval_losses

    check_data_dir(data_dir, tok.to_dict())
    device = next(model.parameters()).device
    T = model.cfg.block_size
    probe = ShardLoader(data_dir, "val", batch_size=1, block_size=T)
    batch = max(1, min(batch_size, probe.windows))
    loader = ShardLoader(data_dir, "val", batch_size=batch, block_size=T, device=device)
    iters = loader.windows // batch                      # whole batches: no window twice
    nb = torch.from_numpy(token_bytes(tok.to_dict()).copy()).to(device)     # (V,) bytes per id
    m = eval_losses(model, {"val": loader}, iters, contextlib.nullcontext, 1, nb)
    model.eval()                                         # eval_losses leaves it in train mode
    return {"bpb": m["val_bpb"], "loss": m["val_loss"], "tokens": iters * batch * T,
            "windows": iters * batch}
