"""DeepSeek-V2 and DeepSeek-V3 (transformers `deepseek_v2` / `deepseek_v3`) <-> Chimera.

A DeepSeek model is a homogeneous MLA stack (RMSNorm, RoPE, no biases) whose first
`first_k_dense_replace` layers have a dense SwiGLU MLP and the rest a mixture of experts with
shared experts; in Chimera that is one heterogeneous stack: `attn: mla` everywhere, `moe: false`
then `moe: true` layers.

Shapes: C = hidden_size, H = heads, Dn = qk_nope_head_dim, Dv = v_head_dim, R = qk_rope_head_dim,
Lq = q_lora_rank, Lkv = kv_lora_rank, E = routed experts, S = shared experts, I = expert width.

  HF                                         Chimera
  q_a_proj (Lq, C), q_a_layernorm (Lq)       W_dq, q_norm
  q_b_proj (H*(Dn+R), Lq) / q_proj (.., C)   W_uq / W_q           rows per head [nope Dn | rope R]
  kv_a_proj_with_mqa (Lkv+R, C)              W_dkv                rows [c_kv Lkv | k_rope R]
  kv_a_layernorm (Lkv)                       kv_norm
  kv_b_proj (H*(Dn+Dv), Lkv) per head        W_uk (H*Dn, Lkv), W_uv (H*Dv, Lkv)
             [k_nope Dn | v Dv]
  o_proj (C, H*Dv)                           c_proj
  mlp gate/up/down_proj                      ffn.c_fc rows [up | gate], ffn.c_proj
  experts.gate_up_proj (E, 2I, C) [gate|up]  ffn.w_up (E, C, 2I) columns [up | gate]
  experts.down_proj (E, C, I)                ffn.w_down (E, I, C)
  shared_experts (one MLP of width S*I)      ffn.shared_up (S, C, 2I), ffn.shared_down (S, I, C)
  gate.weight (E, C)                         ffn.router.weight
  gate.e_score_correction_bias (E,)  (V3)    ffn.bias (aux-free selection bias)

RoPE layout: Chimera rotates halves (channel i with i + R/2). DeepSeek-V2 always, and V3 with
`rope_interleave` (its default), rotate interleaved pairs (2i, 2i+1). Scores only see dot
products over the rope channels, so reordering the rope OUTPUT rows of the query projection
(per head) and of kv_a_proj_with_mqa by `_HALF_FROM_PAIRS` turns one layout into the other.
Export writes V3 with `rope_interleave: false` (no reordering) and V2 with the inverse order.

Routing: V2 = softmax scores, top-k (within the best `topk_group` of `n_group` groups, group
score = max, for `topk_method: group_limited_greedy`), never renormalised, times
`routed_scaling_factor`: Chimera aux-loss MoE with norm_topk_prob false. V3 = sigmoid scores,
selection by score + e_score_correction_bias with group score = sum of the top-2, optional
renormalisation, times routed_scaling_factor: Chimera aux_free MoE. Chimera counts shared
experts in n_exp and n_act; HF does not.

Norm epsilons: `rms_norm_eps` is Chimera's norm_eps (block and final norms); the MLA latent
norms (q_a_layernorm, kv_a_layernorm) are 1e-6 on both sides, whatever rms_norm_eps says.

    from chimera.hf import deepseek
    cfg_dict, sd = deepseek.from_hf(hf_model.config, hf_model.state_dict())
    hf_cfg, hf_sd = deepseek.to_hf(model.cfg, model.state_dict())
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from chimera.hf.mapping import Taker
from chimera.hf.rope import rope_from_hf, rope_to_hf

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_HF_EPS = 1e-6          # HF's MLA latent norms and Chimera's RMSNorm default


# --- RoPE row order -----------------------------------------------------------------------------
def _half_from_pairs(R: int) -> Tensor:
    """Row order taking an interleaved rope block (pairs 2i, 2i+1) to rotate-half (i, i + R/2):
    new[j] = old[order[j]], order = [0, 2, .., R-2, 1, 3, .., R-1]."""
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])


def _rope_rows(R: int, order: Tensor | None):
    """f(w, groups, nope): w (groups*(nope+R), K) with the last R rows of each group of nope+R
    rows put in `order` (identity when order is None)."""
    def f(w: Tensor, groups: int, nope: int) -> Tensor:
        if order is None:
            return w
        g = w.reshape(groups, nope + R, -1)
        return torch.cat([g[:, :nope], g[:, nope:][:, order]], dim=1).reshape(w.shape)
    return f


# --- HF -> Chimera ------------------------------------------------------------------------------
def _fail(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF config {field}={value!r}: {why}")


def _config_from_hf(hf_cfg, block_size: int | None) -> tuple[dict, bool]:
    """(Chimera config dict, whether HF's rope rows are interleaved)."""
    mt = getattr(hf_cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        raise _fail("model_type", mt, f"this family imports {', '.join(MODEL_TYPES)}")
    v3 = mt == "deepseek_v3"
    if getattr(hf_cfg, "attention_bias", False):
        raise _fail("attention_bias", True, "Chimera's MLA has no biases")
    if getattr(hf_cfg, "mlp_bias", False):
        raise _fail("mlp_bias", True, "Chimera's MoE experts have no biases")
    if hf_cfg.hidden_act != "silu":
        raise _fail("hidden_act", hf_cfg.hidden_act, "Chimera's swiglu needs silu")
    H = hf_cfg.num_attention_heads
    if getattr(hf_cfg, "num_key_value_heads", None) not in (None, H):
        raise _fail("num_key_value_heads", hf_cfg.num_key_value_heads,
                    f"MLA expands keys and values to every head (num_attention_heads={H})")
    L = hf_cfg.num_hidden_layers
    n_dense = hf_cfg.first_k_dense_replace or 0
    if not 0 <= n_dense <= L:
        raise _fail("first_k_dense_replace", n_dense, f"must be in [0, num_hidden_layers={L}]")
    max_pos = hf_cfg.max_position_embeddings
    if block_size is None:
        block_size = max_pos
    elif block_size > max_pos:
        raise ValueError(f"block_size={block_size} exceeds the HF max_position_embeddings={max_pos}")
    theta, scaling = rope_from_hf(hf_cfg)

    attn = {"attn": "mla", "n_head": H, "q_latent_dim": hf_cfg.q_lora_rank,
            "kv_latent_dim": hf_cfg.kv_lora_rank, "rope_head_dim": hf_cfg.qk_rope_head_dim,
            "qk_nope_head_dim": hf_cfg.qk_nope_head_dim, "v_head_dim": hf_cfg.v_head_dim}
    dense = {**attn, "moe": False, "up_dim": hf_cfg.intermediate_size, "non_linearity": "swiglu"}
    layers = [dense] * n_dense
    if n_dense < L:
        layers += [{**attn, **_moe_from_hf(hf_cfg, v3)}] * (L - n_dense)
    cfg = {"vocab_size": hf_cfg.vocab_size, "block_size": block_size,
           "n_embd": hf_cfg.hidden_size, "n_layer": L, "dropout": 0.0, "pos_emb": "rope",
           "norm": "rmsnorm", "bias": "none", "tie_embeddings": bool(hf_cfg.tie_word_embeddings),
           "norm_eps": float(hf_cfg.rms_norm_eps), "rope_theta": theta, "rope_scaling": scaling,
           "layers": [dict(d) for d in layers]}
    interleaved = bool(getattr(hf_cfg, "rope_interleave", True)) if v3 else True
    return cfg, interleaved


def _moe_from_hf(hf_cfg, v3: bool) -> dict:
    E, S, k = hf_cfg.n_routed_experts, hf_cfg.n_shared_experts or 0, hf_cfg.num_experts_per_tok
    if not E or not k:
        raise _fail("n_routed_experts / num_experts_per_tok", (E, k), "MoE layers need both >= 1")
    n_group, topk_group = hf_cfg.n_group or 1, hf_cfg.topk_group or 1
    if v3:
        norm = bool(hf_cfg.norm_topk_prob)
    else:
        method = hf_cfg.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise _fail("topk_method", method, "deepseek_v2 routes by greedy or group_limited_greedy")
        if method == "greedy":
            n_group, topk_group = 1, 1
        norm = False                       # HF's V2 router never renormalises (norm_topk_prob unread)
    return {"moe": True, "up_dim": hf_cfg.moe_intermediate_size, "non_linearity": "swiglu",
            "n_exp": E + S, "n_shared": S, "n_act": k + S, "aux_free": v3,
            "norm_topk_prob": norm, "routed_scaling_factor": float(hf_cfg.routed_scaling_factor),
            "n_group": n_group, "topk_group": topk_group}


def from_hf(hf_cfg, state: Mapping[str, Tensor], block_size: int | None = None
            ) -> tuple[dict, dict[str, Tensor]]:
    """HF DeepSeek-V2/V3 config + module state dict -> (Chimera config dict, Chimera state dict)."""
    cfg, interleaved = _config_from_hf(hf_cfg, block_size)
    H, R = hf_cfg.num_attention_heads, hf_cfg.qk_rope_head_dim
    Dn, Dv, Lkv = hf_cfg.qk_nope_head_dim, hf_cfg.v_head_dim, hf_cfg.kv_lora_rank
    rope = _rope_rows(R, _half_from_pairs(R) if interleaved else None)
    take = Taker(state, "HF state dict")
    sd: dict[str, Tensor] = {}
    sd["wte.weight"] = take("model.embed_tokens.weight")
    take.lm_head(sd, cfg["tie_embeddings"])
    sd["ln_f.weight"] = take("model.norm.weight")
    for i, layer in enumerate(cfg["layers"]):
        hf, ch = f"model.layers.{i}.", f"blocks.{i}."
        a, c = hf + "self_attn.", ch + "attn."
        sd[ch + "ln_1.weight"] = take(hf + "input_layernorm.weight")
        sd[ch + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
        if hf_cfg.q_lora_rank is None:
            sd[c + "W_q.weight"] = rope(take(a + "q_proj.weight"), H, Dn)
        else:
            sd[c + "W_dq.weight"] = take(a + "q_a_proj.weight")
            sd[c + "q_norm.weight"] = take(a + "q_a_layernorm.weight")
            sd[c + "W_uq.weight"] = rope(take(a + "q_b_proj.weight"), H, Dn)
        sd[c + "W_dkv.weight"] = rope(take(a + "kv_a_proj_with_mqa.weight"), 1, Lkv)
        sd[c + "kv_norm.weight"] = take(a + "kv_a_layernorm.weight")
        kv_b = take(a + "kv_b_proj.weight").reshape(H, Dn + Dv, Lkv)
        sd[c + "W_uk.weight"] = kv_b[:, :Dn].reshape(H * Dn, Lkv)
        sd[c + "W_uv.weight"] = kv_b[:, Dn:].reshape(H * Dv, Lkv)
        sd[c + "c_proj.weight"] = take(a + "o_proj.weight")
        m, f = hf + "mlp.", ch + "ffn."
        if not layer["moe"]:
            sd[f + "c_fc.weight"] = torch.cat([take(m + "up_proj.weight"),
                                               take(m + "gate_proj.weight")], dim=0)
            sd[f + "c_proj.weight"] = take(m + "down_proj.weight")
            continue
        I, S = layer["up_dim"], layer["n_shared"]
        sd[f + "router.weight"] = take(m + "gate.weight")
        if layer["aux_free"]:
            sd[f + "bias"] = take(m + "gate.e_score_correction_bias")
        gate_up = take(m + "experts.gate_up_proj")                        # (E, 2I, C) [gate | up]
        sd[f + "w_up"] = torch.cat([gate_up[:, I:], gate_up[:, :I]], dim=1).transpose(1, 2)
        sd[f + "w_down"] = take(m + "experts.down_proj").transpose(1, 2)   # (E, I, C)
        s = m + "shared_experts."
        gate, up = take(s + "gate_proj.weight"), take(s + "up_proj.weight")   # (S*I, C)
        down = take(s + "down_proj.weight")                                 # (C, S*I)
        if S:
            C = gate.shape[1]
            sd[f + "shared_up"] = torch.cat([up.reshape(S, I, C), gate.reshape(S, I, C)],
                                            dim=1).transpose(1, 2)          # (S, C, 2I)
            sd[f + "shared_down"] = down.t().reshape(S, I, C)
    take.done()
    return cfg, {k: v.contiguous() for k, v in sd.items()}


# --- Chimera -> HF ------------------------------------------------------------------------------
def _where(idx: list[int]) -> str:
    return f"layers[{', '.join(map(str, idx))}]"


def _attn_dims(cfg, b) -> tuple:
    a, d = b.attn, cfg.n_embd // b.attn.n_head
    return (a.n_head, a.q_latent_dim, a.kv_latent_dim, a.rope_head_dim,
            a.qk_nope_head_dim or d, a.v_head_dim or d)


def _moe_key(b) -> tuple:
    f = b.ffn
    return (f.n_exp, f.n_shared, f.n_act, f.up_dim, f.aux_free, f.norm_topk_prob,
            f.routed_scaling_factor, f.n_group, f.topk_group)


def _differ(cfg, idx: list[int], key, what: str, names: str) -> list[str]:
    """One reason when the layers idx do not all agree on key(layer)."""
    vals = {}
    for i in idx:
        vals.setdefault(key(cfg.layers[i]), []).append(i)
    if len(vals) < 2:
        return []
    parts = "; ".join(f"{_where(v)}: {k}" for k, v in vals.items())
    return [f"{what} differ ({names}): {parts} (deepseek has one value per model)"]


def misfit(cfg) -> list[str]:
    """Why this Chimera stack cannot be exported as DeepSeek-V2/V3 ([] = it fits)."""
    out: list[str] = []
    n = range(len(cfg.layers))
    if cfg.pos_emb != "rope":
        out.append(f"pos_emb={cfg.pos_emb!r} (deepseek needs rope)")
    if cfg.norm != "rmsnorm":
        out.append(f"norm={cfg.norm!r} (deepseek needs rmsnorm)")
    if cfg.bias != "none":
        out.append(f"bias={cfg.bias!r} (deepseek has no biases)")
    gqa = [i for i in n if cfg.layers[i].attn.attn != "mla"]
    if gqa:
        kinds = sorted({cfg.layers[i].attn.attn for i in gqa})
        out.append(f"{_where(gqa)}: {'/'.join(kinds)} attention (deepseek needs mla)")
    act = [i for i in n if cfg.layers[i].ffn.non_linearity != "swiglu"]
    if act:
        out.append(f"{_where(act)}: non_linearity "
                   f"{'/'.join(sorted({cfg.layers[i].ffn.non_linearity for i in act}))} "
                   f"(deepseek needs swiglu)")
    moe = [i for i in n if cfg.layers[i].ffn.moe]
    dense = [i for i in n if not cfg.layers[i].ffn.moe]
    if moe and dense and max(dense) > min(moe):
        late = [i for i in dense if i > min(moe)]
        out.append(f"{_where(late)}: dense MLP after the first moe layer {min(moe)} "
                   f"(deepseek puts its first_k_dense_replace dense layers first)")
    mla = [i for i in n if cfg.layers[i].attn.attn == "mla"]
    out += _differ(cfg, mla, lambda b: _attn_dims(cfg, b), "mla dims",
                   "n_head, q_latent_dim, kv_latent_dim, rope_head_dim, qk_nope_head_dim, v_head_dim")
    out += _differ(cfg, dense, lambda b: b.ffn.up_dim, "dense up_dim", "up_dim")
    out += _differ(cfg, moe, _moe_key, "moe settings",
                   "n_exp, n_shared, n_act, up_dim, aux_free, norm_topk_prob, "
                   "routed_scaling_factor, n_group, topk_group")
    soft_norm = [i for i in moe if not cfg.layers[i].ffn.aux_free and cfg.layers[i].ffn.norm_topk_prob]
    if soft_norm:
        out.append(f"{_where(soft_norm)}: softmax routing with norm_topk_prob true (deepseek_v2 "
                   f"never renormalises; deepseek_v3 routes by sigmoid, i.e. aux_free)")
    small = [i for i in moe if cfg.layers[i].ffn.aux_free
             and cfg.layers[i].ffn.n_routed // cfg.layers[i].ffn.n_group < 2]
    if small:
        out.append(f"{_where(small)}: aux_free routing with fewer than 2 routed experts per group "
                   f"(deepseek_v3 scores a group by its top-2)")
    softmax = [i for i in moe if not cfg.layers[i].ffn.aux_free]
    odd = [i for i in mla if cfg.n_embd % cfg.layers[i].attn.n_head]
    if softmax and odd:
        out.append(f"{_where(odd)}: n_embd={cfg.n_embd} is not divisible by n_head (deepseek_v2, "
                   f"the family of softmax routing, requires it)")
    return out


def to_hf(cfg, state: Mapping[str, Tensor]) -> tuple[Any, dict[str, Tensor]]:
    """Chimera ModelConfig + state dict -> (transformers DeepseekV2Config/V3Config, HF module
    state dict). V3 when the MoE layers route by sigmoid (aux_free) or there are none, V2 for
    softmax routing (which must not renormalise). ValueError with misfit()'s reasons."""
    reasons = misfit(cfg)
    if reasons:
        raise ValueError("this model does not fit deepseek_v2/v3: " + "; ".join(reasons))
    import transformers

    L, b0 = cfg.n_layer, cfg.layers[0]
    H, Lq, Lkv, R, Dn, Dv = _attn_dims(cfg, b0)
    moe = [i for i in range(L) if cfg.layers[i].ffn.moe]
    n_dense = moe[0] if moe else L
    f = cfg.layers[moe[0]].ffn if moe else None
    v3 = f is None or bool(f.aux_free)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=H, q_lora_rank=Lq, kv_lora_rank=Lkv,
        qk_rope_head_dim=R, qk_nope_head_dim=Dn, v_head_dim=Dv, hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=_HF_EPS if cfg.norm_eps is None else float(cfg.norm_eps),
        tie_word_embeddings=bool(cfg.tie_embeddings), rope_parameters=rope_to_hf(cfg),
        attention_bias=False, attention_dropout=0.0, first_k_dense_replace=n_dense,
        # token ids are the tokenizer's business (convert.py); HF's defaults would stop
        # generation at an arbitrary id
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if f is not None:
        common.update(n_routed_experts=f.n_routed, n_shared_experts=f.n_shared,
                      num_experts_per_tok=f.top_k, moe_intermediate_size=f.up_dim,
                      routed_scaling_factor=float(f.routed_scaling_factor),
                      n_group=f.n_group, topk_group=f.topk_group)
    else:           # no MoE layer: HF still wants valid (unused) expert settings
        common.update(n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1,
                      moe_intermediate_size=1, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    common["intermediate_size"] = cfg.layers[0].ffn.up_dim if n_dense else f.up_dim
    if v3:
        hf_cfg = transformers.DeepseekV3Config(
            **common, norm_topk_prob=bool(f.norm_topk_prob) if f is not None else True,
            rope_interleave=False)
        order = None
    else:
        hf_cfg = transformers.DeepseekV2Config(
            **common, norm_topk_prob=False, mlp_bias=False,
            topk_method="greedy" if f.n_group == 1 else "group_limited_greedy")
        order = torch.argsort(_half_from_pairs(R))       # rotate-half -> interleaved pairs
    return hf_cfg, _state_to_hf(cfg, state, order, (H, Lq, Lkv, R, Dn, Dv), v3)


def _state_to_hf(cfg, state: Mapping[str, Tensor], order: Tensor | None, dims: tuple,
                 v3: bool) -> dict[str, Tensor]:
    H, Lq, Lkv, R, Dn, Dv = dims
    take = Taker(state, "Chimera state dict")
    rope = _rope_rows(R, order)
    sd: dict[str, Tensor] = {}
    sd["model.embed_tokens.weight"] = take("wte.weight")
    take.lm_head(sd, cfg.tie_embeddings, embedding="model.embed_tokens.weight")
    sd["model.norm.weight"] = take("ln_f.weight")
    for i, b in enumerate(cfg.layers):
        hf, ch = f"model.layers.{i}.", f"blocks.{i}."
        a, c = hf + "self_attn.", ch + "attn."
        sd[hf + "input_layernorm.weight"] = take(ch + "ln_1.weight")
        sd[hf + "post_attention_layernorm.weight"] = take(ch + "ln_2.weight")
        if Lq is None:
            sd[a + "q_proj.weight"] = rope(take(c + "W_q.weight"), H, Dn)
        else:
            sd[a + "q_a_proj.weight"] = take(c + "W_dq.weight")
            sd[a + "q_a_layernorm.weight"] = take(c + "q_norm.weight")
            sd[a + "q_b_proj.weight"] = rope(take(c + "W_uq.weight"), H, Dn)
        sd[a + "kv_a_proj_with_mqa.weight"] = rope(take(c + "W_dkv.weight"), 1, Lkv)
        sd[a + "kv_a_layernorm.weight"] = take(c + "kv_norm.weight")
        sd[a + "kv_b_proj.weight"] = torch.cat(
            [take(c + "W_uk.weight").reshape(H, Dn, Lkv), take(c + "W_uv.weight").reshape(H, Dv, Lkv)],
            dim=1).reshape(H * (Dn + Dv), Lkv)
        sd[a + "o_proj.weight"] = take(c + "c_proj.weight")
        m, f = hf + "mlp.", ch + "ffn."
        I = b.ffn.up_dim
        if not b.ffn.moe:
            up_gate = take(f + "c_fc.weight")                                  # (2I, C) [up | gate]
            sd[m + "up_proj.weight"], sd[m + "gate_proj.weight"] = up_gate[:I], up_gate[I:]
            sd[m + "down_proj.weight"] = take(f + "c_proj.weight")
            continue
        sd[m + "gate.weight"] = take(f + "router.weight")
        if v3:
            sd[m + "gate.e_score_correction_bias"] = take(f + "bias")
        w_up = take(f + "w_up")                                                # (E, C, 2I) [up | gate]
        sd[m + "experts.gate_up_proj"] = torch.cat([w_up[..., I:], w_up[..., :I]], dim=-1).transpose(1, 2)
        sd[m + "experts.down_proj"] = take(f + "w_down").transpose(1, 2)     # (E, C, I)
        s, S, C = m + "shared_experts.", b.ffn.n_shared, cfg.n_embd
        if S:
            su, sdn = take(f + "shared_up"), take(f + "shared_down")          # (S, C, 2I), (S, I, C)
            sd[s + "up_proj.weight"] = su[..., :I].transpose(1, 2).reshape(S * I, C)
            sd[s + "gate_proj.weight"] = su[..., I:].transpose(1, 2).reshape(S * I, C)
            sd[s + "down_proj.weight"] = sdn.reshape(S * I, C).t()
        else:               # HF builds a zero-width shared MLP
            ref = sd[m + "gate.weight"]                           # its dtype and device
            for k, shape in (("up_proj", (0, C)), ("gate_proj", (0, C)), ("down_proj", (C, 0))):
                sd[s + k + ".weight"] = ref.new_zeros(shape)
    take.done()
    return {k: v.contiguous() for k, v in sd.items()}
