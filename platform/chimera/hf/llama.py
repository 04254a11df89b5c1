"""Llama (`LlamaForCausalLM`, model_type "llama") and Qwen2 (`Qwen2ForCausalLM`, "qwen2") <->
Chimera.

Llama in Chimera terms: gqa / mha / mqa attention with RoPE (rotate half, HF's non-interleaved
layout: no row permutation), rmsnorm with norm_eps = rms_norm_eps, a dense swiglu MLP (HF
hidden_act "silu"), tie_embeddings = tie_word_embeddings, rope_theta / rope_scaling from
rope_parameters (chimera.hf.rope). Biases: Llama attention_bias (q, k, v, o) = bias "attn",
attention_bias + mlp_bias = "all"; Qwen2 (q, k, v biases, none on o) = "qkv". Export always
writes LlamaForCausalLM; bias "qkv" as attention_bias with a zero o_proj bias (the same
function): transformers' AutoTokenizer replaces any tokenizer of a "qwen2" folder by its own
Qwen2Tokenizer (pre-tokenizer included), which would not encode like Chimera's tokenizer.

Weight map (i = layer; HF prefix model.layers.i.):
    model.embed_tokens.weight                 <-> wte.weight
    input_layernorm / post_attention_layernorm <-> blocks.i.ln_1 / ln_2
    self_attn.q_proj, k_proj, v_proj (+bias)  <-> blocks.i.attn.c_attn rows [q H*D | k K*D | v K*D]
    self_attn.o_proj (+bias)                  <-> blocks.i.attn.c_proj
    mlp.up_proj, mlp.gate_proj (+bias)        <-> blocks.i.ffn.c_fc rows [value = up | gate]
    mlp.down_proj (+bias)                     <-> blocks.i.ffn.c_proj
    model.norm.weight                         <-> ln_f.weight
    lm_head.weight                            <-> lm_head.weight (its own only when untied)
"""
from __future__ import annotations

from typing import Mapping

import torch

from chimera.hf.mapping import Taker, contiguous, mismatched, norm_eps
from chimera.hf.rope import rope_from_hf, rope_to_hf

MODEL_TYPES = ("llama", "qwen2")
NAME = "Llama"
_ATTN_BIAS = ("attn", "all", "qkv")          # Chimera bias values with q/k/v biases


def misfit(cfg) -> list[str]:
    why = []
    if cfg.pos_emb != "rope":
        why.append(f"pos_emb={cfg.pos_emb} (llama needs rope)")
    if cfg.norm != "rmsnorm":
        why.append(f"norm={cfg.norm} (llama needs rmsnorm)")
    for i, b in enumerate(cfg.layers):
        if b.attn.window is not None:
            why.append(f"layers[{i}]: window={b.attn.window} (llama has no sliding-window attention)")
        if b.attn.attn == "mla":
            why.append(f"layers[{i}]: mla attention (llama needs gqa/mha/mqa)")
        if b.ffn.moe:
            why.append(f"layers[{i}]: moe ffn (llama needs a dense MLP)")
        elif b.ffn.non_linearity != "swiglu":
            why.append(f"layers[{i}]: non_linearity={b.ffn.non_linearity} (llama needs swiglu)")
    gqa = [b for b in cfg.layers if b.attn.attn != "mla"]
    if len(gqa) == len(cfg.layers):
        why += mismatched(cfg.layers, lambda b: b.attn.n_head, "n_head", "llama")
        why += mismatched(cfg.layers, lambda b: b.attn.n_kv_heads, "n_kv_heads", "llama")
    if not any(b.ffn.moe for b in cfg.layers):
        why += mismatched(cfg.layers, lambda b: b.ffn.up_dim, "up_dim", "llama")
    return why


def _bias(c) -> str:
    if c.model_type == "qwen2":
        return "qkv"
    attn, mlp = bool(c.attention_bias), bool(c.mlp_bias)
    if mlp and not attn:
        raise ValueError("llama config mlp_bias=True with attention_bias=False: Chimera's bias "
                         "options are none, qkv, attn or all (MLP biases come with attention biases)")
    return "all" if mlp else ("attn" if attn else "none")


def from_hf(hf_cfg, state: Mapping[str, torch.Tensor], block_size: int | None = None
            ) -> tuple[dict, dict[str, torch.Tensor]]:
    c = hf_cfg
    mt = c.model_type
    if c.hidden_act != "silu":
        raise ValueError(f"{mt} config hidden_act={c.hidden_act!r}: Chimera supports silu (swiglu)")
    H, K, C = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    D = C // H
    if getattr(c, "head_dim", None) not in (None, D) or C % H:
        raise ValueError(f"{mt} config head_dim={getattr(c, 'head_dim', None)}: Chimera needs "
                         f"head_dim = hidden_size // num_attention_heads = {C // H}")
    sliding = [i for i, t in enumerate(getattr(c, "layer_types", None) or []) if t != "full_attention"]
    if getattr(c, "use_sliding_window", False) and sliding:
        raise ValueError(f"{mt} config use_sliding_window=True (layer_types {sliding} use sliding "
                         f"window attention): Chimera attends over the whole context")
    if sliding:
        raise ValueError(f"{mt} config layer_types: layers {sliding} are not full_attention")
    n_pos = c.max_position_embeddings
    block_size = n_pos if block_size is None else block_size
    if not 1 <= block_size <= n_pos:
        raise ValueError(f"block_size={block_size} must be in [1, max_position_embeddings={n_pos}]")
    theta, scaling = rope_from_hf(c)
    bias = _bias(c)
    tied = bool(c.tie_word_embeddings)
    attn = "mha" if K == H else ("mqa" if K == 1 else "gqa")
    L = c.num_hidden_layers
    cfg = {"vocab_size": c.vocab_size, "block_size": block_size, "n_embd": C, "n_layer": L,
           "dropout": 0.0, "pos_emb": "rope", "norm": "rmsnorm", "bias": bias,
           "tie_embeddings": tied, "norm_eps": float(c.rms_norm_eps), "rope_theta": theta,
           "rope_scaling": scaling, "attn": attn, "n_head": H, "n_kv_heads": K, "moe": False,
           "up_dim": c.intermediate_size, "non_linearity": "swiglu"}

    take = Taker(state, mt)
    t = lambda k: contiguous(take(k))                                   # noqa: E731
    cat = lambda *ks: torch.cat([take(k) for k in ks]).contiguous()     # noqa: E731
    sd = {"wte.weight": t("model.embed_tokens.weight")}
    for i in range(L):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        sd[b + "ln_1.weight"] = t(h + "input_layernorm.weight")
        sd[b + "ln_2.weight"] = t(h + "post_attention_layernorm.weight")
        qkv = [h + f"self_attn.{p}_proj" for p in "qkv"]
        sd[b + "attn.c_attn.weight"] = cat(*(k + ".weight" for k in qkv))
        sd[b + "attn.c_proj.weight"] = t(h + "self_attn.o_proj.weight")
        sd[b + "ffn.c_fc.weight"] = cat(h + "mlp.up_proj.weight", h + "mlp.gate_proj.weight")
        sd[b + "ffn.c_proj.weight"] = t(h + "mlp.down_proj.weight")
        if bias in _ATTN_BIAS:
            sd[b + "attn.c_attn.bias"] = cat(*(k + ".bias" for k in qkv))
        if bias in ("attn", "all"):
            sd[b + "attn.c_proj.bias"] = t(h + "self_attn.o_proj.bias")
        if bias == "all":
            sd[b + "ffn.c_fc.bias"] = cat(h + "mlp.up_proj.bias", h + "mlp.gate_proj.bias")
            sd[b + "ffn.c_proj.bias"] = t(h + "mlp.down_proj.bias")
    sd["ln_f.weight"] = t("model.norm.weight")
    take.lm_head(sd, tied)
    take.done()
    return cfg, sd


def to_hf(cfg, state: Mapping[str, torch.Tensor]):
    from transformers import LlamaConfig

    why = misfit(cfg)
    if why:
        raise ValueError("cannot export as llama: " + "; ".join(why))
    b0 = cfg.layers[0]
    H, K, U = b0.attn.n_head, b0.attn.n_kv_heads, b0.ffn.up_dim
    C, D = cfg.n_embd, cfg.n_embd // H
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=C, intermediate_size=U, num_hidden_layers=cfg.n_layer,
        num_attention_heads=H, num_key_value_heads=K, head_dim=D, hidden_act="silu",
        max_position_embeddings=cfg.block_size, rms_norm_eps=norm_eps(cfg),
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_to_hf(cfg),
        attention_dropout=cfg.dropout, attention_bias=cfg.bias in _ATTN_BIAS,
        mlp_bias=cfg.bias == "all", bos_token_id=None, eos_token_id=None,
        architectures=["LlamaForCausalLM"])
    take = Taker(state, "chimera")
    t = lambda k: contiguous(take(k))                                   # noqa: E731
    sd = {"model.embed_tokens.weight": t("wte.weight")}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        sd[h + "input_layernorm.weight"] = t(b + "ln_1.weight")
        sd[h + "post_attention_layernorm.weight"] = t(b + "ln_2.weight")
        for suffix in ("weight", "bias"):
            qkv = take.maybe(b + "attn.c_attn." + suffix)
            if qkv is not None:
                for p, part in zip("qkv", qkv.split([H * D, K * D, K * D])):
                    sd[h + f"self_attn.{p}_proj.{suffix}"] = contiguous(part)
            o = take.maybe(b + "attn.c_proj." + suffix)
            if o is not None:
                sd[h + "self_attn.o_proj." + suffix] = contiguous(o)
            fc = take.maybe(b + "ffn.c_fc." + suffix)
            if fc is not None:
                up, gate = fc.split([U, U])
                sd[h + "mlp.up_proj." + suffix], sd[h + "mlp.gate_proj." + suffix] = \
                    contiguous(up), contiguous(gate)
            down = take.maybe(b + "ffn.c_proj." + suffix)
            if down is not None:
                sd[h + "mlp.down_proj." + suffix] = contiguous(down)
        if cfg.bias == "qkv":                   # Llama's attention_bias covers o_proj too
            sd[h + "self_attn.o_proj.bias"] = torch.zeros(C, dtype=sd[h + "self_attn.o_proj.weight"].dtype)
    sd["model.norm.weight"] = t("ln_f.weight")
    head = take("lm_head.weight")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else contiguous(head)
    take.done()
    return hf_cfg, sd
