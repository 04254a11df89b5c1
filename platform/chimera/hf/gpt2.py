"""GPT-2 (`GPT2LMHeadModel`, model_type "gpt2") <-> Chimera.

GPT-2 in Chimera terms: mha attention, pos_emb "learn", layernorm, bias "all", a dense MLP with
non_linearity gelu (HF activation_function "gelu") or gelu_tanh ("gelu_new" /
"gelu_pytorch_tanh"), norm_eps = layer_norm_epsilon, up_dim = n_inner or 4 * n_embd.
HF's GPT-2 uses Conv1D layers, whose weights are stored transposed: (in, out).

Weight map (i = layer; C = n_embd, U = up_dim):
    transformer.wte.weight (V, C)            <-> wte.weight
    transformer.wpe.weight (P, C)            <-> pos.wpe.weight (block_size, C): rows [:block_size]
    transformer.h.i.ln_1 / ln_2 .weight/.bias <-> blocks.i.ln_1 / ln_2
    transformer.h.i.attn.c_attn (C, 3C) + (3C,)  <-> blocks.i.attn.c_attn (3C, C) rows [q | k | v]
    transformer.h.i.attn.c_proj (C, C)       <-> blocks.i.attn.c_proj (C, C)
    transformer.h.i.mlp.c_fc (C, U)          <-> blocks.i.ffn.c_fc (U, C)
    transformer.h.i.mlp.c_proj (U, C)        <-> blocks.i.ffn.c_proj (C, U)
    transformer.ln_f                         <-> ln_f
    lm_head.weight                           <-> lm_head.weight (its own only when untied)
Export of a Chimera stack with fewer biases (bias "none", "qkv", "attn") writes zero biases
where Chimera has none: the same function.
"""
from __future__ import annotations

from typing import Mapping

import torch

from chimera.hf.mapping import Taker, contiguous, mismatched, norm_eps

MODEL_TYPES = ("gpt2",)
NAME = "GPT-2"
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# HF settings whose behaviour Chimera's layers do not have: (field, the value Chimera matches)
_MUST = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
         ("reorder_and_upcast_attn", False), ("add_cross_attention", False))


def misfit(cfg) -> list[str]:
    why = []
    if cfg.pos_emb != "learn":
        why.append(f"pos_emb={cfg.pos_emb} (gpt2 needs learned positions: learn)")
    if cfg.norm != "layernorm":
        why.append(f"norm={cfg.norm} (gpt2 needs layernorm)")
    for i, b in enumerate(cfg.layers):
        if b.attn.window is not None:
            why.append(f"layers[{i}]: window={b.attn.window} (gpt2 has no sliding-window attention)")
        a, f = b.attn, b.ffn
        if a.attn == "mla" or a.n_kv_heads != a.n_head:
            why.append(f"layers[{i}]: {a.attn} attention"
                       + (f" with n_kv_heads={a.n_kv_heads}" if a.attn != "mla" else "")
                       + " (gpt2 needs mha: n_kv_heads == n_head)")
        if f.moe:
            why.append(f"layers[{i}]: moe ffn (gpt2 needs a dense MLP)")
        elif f.non_linearity not in _ACT_OUT:
            why.append(f"layers[{i}]: non_linearity={f.non_linearity} (gpt2 needs gelu or gelu_tanh)")
    why += mismatched(cfg.layers, lambda b: b.attn.n_head, "n_head", "gpt2")
    why += mismatched(cfg.layers, lambda b: b.ffn.up_dim, "up_dim", "gpt2")
    why += mismatched(cfg.layers, lambda b: b.ffn.non_linearity, "non_linearity", "gpt2")
    return why


def from_hf(hf_cfg, state: Mapping[str, torch.Tensor], block_size: int | None = None
            ) -> tuple[dict, dict[str, torch.Tensor]]:
    c = hf_cfg
    for field, want in _MUST:
        if bool(getattr(c, field, want)) != want:
            raise ValueError(f"gpt2 config {field}={getattr(c, field)!r}: Chimera supports only {want}")
    act = c.activation_function
    if act not in _ACT_IN:
        raise ValueError(f"gpt2 config activation_function={act!r}: Chimera supports "
                         f"{', '.join(_ACT_IN)}")
    n_pos = c.n_positions
    block_size = n_pos if block_size is None else block_size
    if not 1 <= block_size <= n_pos:
        raise ValueError(f"block_size={block_size} must be in [1, n_positions={n_pos}] "
                         f"(the learned position table has {n_pos} rows)")
    tied = bool(c.tie_word_embeddings)
    up = c.n_inner if c.n_inner is not None else 4 * c.n_embd
    cfg = {"vocab_size": c.vocab_size, "block_size": block_size, "n_embd": c.n_embd,
           "n_layer": c.n_layer, "dropout": 0.0, "pos_emb": "learn", "norm": "layernorm",
           "bias": "all", "tie_embeddings": tied, "norm_eps": float(c.layer_norm_epsilon),
           "attn": "mha", "n_head": c.n_head, "moe": False, "up_dim": up,
           "non_linearity": _ACT_IN[act]}

    take = Taker(state, "gpt2")
    t = lambda k: contiguous(take(k))                                   # noqa: E731
    tt = lambda k: contiguous(take(k).t())                              # Conv1D (in, out) -> (out, in)
    sd = {"wte.weight": t("transformer.wte.weight"),
          "pos.wpe.weight": contiguous(take("transformer.wpe.weight")[:block_size])}
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for n in ("ln_1", "ln_2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = t(h + n + ".weight"), t(h + n + ".bias")
        for hn, cn in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                       ("mlp.c_fc", "ffn.c_fc"), ("mlp.c_proj", "ffn.c_proj")):
            sd[b + cn + ".weight"], sd[b + cn + ".bias"] = tt(h + hn + ".weight"), t(h + hn + ".bias")
    sd["ln_f.weight"], sd["ln_f.bias"] = t("transformer.ln_f.weight"), t("transformer.ln_f.bias")
    take.lm_head(sd, tied)
    take.done()
    return cfg, sd


def to_hf(cfg, state: Mapping[str, torch.Tensor]):
    from transformers import GPT2Config

    why = misfit(cfg)
    if why:
        raise ValueError("cannot export as gpt2: " + "; ".join(why))
    b0 = cfg.layers[0]
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=b0.attn.n_head, n_inner=b0.ffn.up_dim,
        activation_function=_ACT_OUT[b0.ffn.non_linearity], resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=norm_eps(cfg),
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        architectures=["GPT2LMHeadModel"])
    take = Taker(state, "chimera")
    t = lambda k: contiguous(take(k))                                   # noqa: E731

    def bias(key: str, n: int) -> torch.Tensor:
        got = take.maybe(key)
        return contiguous(got) if got is not None else torch.zeros(n, dtype=state["wte.weight"].dtype)

    C, U = cfg.n_embd, b0.ffn.up_dim
    sd = {"transformer.wte.weight": t("wte.weight"), "transformer.wpe.weight": t("pos.wpe.weight")}
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for n in ("ln_1", "ln_2"):
            sd[h + n + ".weight"], sd[h + n + ".bias"] = t(b + n + ".weight"), t(b + n + ".bias")
        for hn, cn, out in (("attn.c_attn", "attn.c_attn", 3 * C), ("attn.c_proj", "attn.c_proj", C),
                            ("mlp.c_fc", "ffn.c_fc", U), ("mlp.c_proj", "ffn.c_proj", C)):
            sd[h + hn + ".weight"] = contiguous(take(b + cn + ".weight").t())
            sd[h + hn + ".bias"] = bias(b + cn + ".bias", out)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = t("ln_f.weight"), t("ln_f.bias")
    head = take("lm_head.weight")
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if cfg.tie_embeddings else contiguous(head)
    take.done()
    return hf_cfg, sd
