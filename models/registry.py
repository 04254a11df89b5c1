"""The one place where config names become module classes (imported on first use).

`attn` names map to attention classes, the FFN kind ("mlp" or "moe") to FFN classes. Every
other module asks here; an unknown name lists the valid choices.
"""
from __future__ import annotations

import importlib

from torch import nn

from models.config import ModelConfig


ATTENTION = {"mha": "models.attention.gqa:GQA", "mqa": "models.attention.gqa:GQA",
             "gqa": "models.attention.gqa:GQA", "mla": "models.attention.mla:MLA"}
FFN = {"mlp": "models.ffn.mlp:MLP", "moe": "models.ffn.moe:MoE"}


def _lookup(table: dict[str, str], name: str, what: str) -> type[nn.Module]:
    try:
        module, cls = table[name].split(":")
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None
    return getattr(importlib.import_module(module), cls)


def build_attention(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer `index`'s attention; it reads its own AttnConfig and the model-wide settings
    (n_embd, block_size, positions, biases, norm eps) from cfg."""
    block = cfg.layers[index]
    cls = _lookup(ATTENTION, block.attn.attn, "attention")
    return cls(cfg, block.attn, dropout=block.dropout)


def build_ffn(cfg: ModelConfig, index: int) -> nn.Module:
    block = cfg.layers[index]
    cls = _lookup(FFN, "moe" if block.ffn.moe else "mlp", "ffn")
    if block.ffn.moe:
        return cls(cfg.n_embd, block.ffn, dropout=block.dropout)
    return cls(cfg.n_embd, block.ffn, dropout=block.dropout, bias=cfg.bias == "all")
