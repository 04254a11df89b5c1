"""LLM: every mechanism's shapes and backward pass, init, recomputation, and the
parameter / FLOP / KV-cache formulas checked against hand counts and measured allocations."""
from __future__ import annotations

import itertools

import pytest
import torch

from models import LLM, ModelConfig
from models.ffn.activations import NAMES as ACTIVATIONS

V, T, C = 61, 12, 32


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=16, n_embd=C, n_layer=2, n_head=4, n_kv_heads=2,
                q_latent_dim=12, kv_latent_dim=10, rope_head_dim=4, up_dim=24)
    base.update(kw)
    if base.get("pos_emb", "rope") != "rope":
        base["rope_head_dim"] = 0
    return ModelConfig.from_dict(base)


@pytest.mark.parametrize("attn,pos_emb,norm", list(itertools.product(
    ["mha", "mqa", "gqa", "mla"], ["learn", "sin", "rope"], ["layernorm", "rmsnorm"])))
def test_attention_position_norm_shapes_and_backward(attn, pos_emb, norm):
    torch.manual_seed(0)
    m = LLM(small(attn=attn, pos_emb=pos_emb, norm=norm))
    x = torch.randint(0, V, (3, T))
    logits, loss = m(x, x)
    assert logits.shape == (3, T, V) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    logits, loss = m(x)
    assert loss is None and logits.shape == (3, T, V)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_trains(act):
    m = LLM(small(attn="gqa", non_linearity=act))
    x = torch.randint(0, V, (2, T))
    _, loss = m(x, x)
    loss.backward()
    assert m.blocks[0].ffn.c_fc.weight.grad.abs().sum() > 0


def test_moe_layers_shapes_and_backward():
    m = LLM(small(moe=True, n_exp=4, n_shared=1, n_act=2, aux_free=False, coeff=0.01))
    x = torch.randint(0, V, (2, T))
    logits, ce, aux = m.forward_with_aux(x, x)
    assert aux > 0                                  # the balancing loss is part of the loss
    _, loss = m(x, x)
    torch.testing.assert_close(loss, ce + aux)
    loss.backward()


def test_causality_future_tokens_do_not_change_the_past():
    for attn in ["gqa", "mla"]:
        m = LLM(small(attn=attn)).double().eval()
        x = torch.randint(0, V, (1, T))
        y = x.clone()
        y[0, -1] = (x[0, -1] + 1) % V
        torch.testing.assert_close(m(x)[0][:, :-1], m(y)[0][:, :-1])


def test_gpt2_init_weight_tying_and_residual_scaling():
    torch.manual_seed(0)
    cfg = small(attn="gqa", n_layer=8, n_embd=128, n_head=4, up_dim=512)
    m = LLM(cfg)
    assert m.lm_head.weight is m.wte.weight
    assert abs(m.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(m.blocks[0].attn.c_proj.weight.std().item() - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(m.blocks[0].ffn.c_proj.weight.std().item() - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_activation_recomputation_gives_the_same_gradients():
    torch.manual_seed(0)
    a = LLM(small(attn="mla")).double()
    b = LLM(small(attn="mla", act_recomp=True)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, V, (2, T))
    for m in (a, b):
        m(x, x)[1].backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_dropout_only_in_training():
    m = LLM(small(attn="gqa", dropout=0.5))
    x = torch.randint(0, V, (2, T))
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


def test_sequence_longer_than_block_size_is_refused():
    m = LLM(small())
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


# --- accounting -------------------------------------------------------------------------------
def _norm_params(cfg):
    return (2 if cfg.norm == "layernorm" else 1) * cfg.n_embd


def hand_count(cfg: ModelConfig) -> tuple[int, int]:
    """Independent parameter count from the architecture's definition."""
    Cm = cfg.n_embd
    total = cfg.vocab_size * Cm + (cfg.block_size * Cm if cfg.pos_emb == "learn" else 0)
    total += _norm_params(cfg)                                       # final norm
    active = total
    for b in cfg.layers:
        a, f = b.attn, b.ffn
        H = a.n_head
        D = Cm // H
        if a.attn == "mla":
            R = a.rope_head_dim
            attn = (Cm * a.q_latent_dim + a.q_latent_dim + a.q_latent_dim * H * (D + R)
                    + Cm * (a.kv_latent_dim + R) + a.kv_latent_dim + 2 * a.kv_latent_dim * H * D
                    + H * D * Cm)
        else:
            attn = Cm * (H + 2 * a.n_kv_heads) * D + Cm * Cm
        mult = 2 if f.non_linearity in ("glu", "swiglu") else 1
        expert = Cm * f.up_dim * mult + f.up_dim * Cm
        if f.moe:
            ffn_total = f.n_exp * expert + Cm * f.n_routed
            ffn_active = f.n_act * expert + Cm * f.n_routed
        else:
            ffn_total = ffn_active = expert
        total += 2 * _norm_params(cfg) + attn + ffn_total
        active += 2 * _norm_params(cfg) + attn + ffn_active
    return total, active


HETERO = [
    {"attn": "mla", "n_head": 4, "q_latent_dim": 12, "kv_latent_dim": 10, "rope_head_dim": 4,
     "moe": True, "n_exp": 6, "n_shared": 1, "n_act": 3, "aux_free": True, "up_dim": 16},
    {"attn": "gqa", "n_head": 4, "n_kv_heads": 1, "moe": False, "up_dim": 40, "non_linearity": "gelu"},
    {"attn": "mha", "n_head": 2, "moe": True, "n_exp": 4, "n_shared": 0, "n_act": 2,
     "non_linearity": "relu", "up_dim": 20},
]


@pytest.mark.parametrize("cfg", [
    small(attn="gqa", pos_emb="learn", norm="layernorm"),
    small(attn="mla", pos_emb="rope", norm="rmsnorm"),
    small(attn="mla", pos_emb="sin", non_linearity="gelu"),
    ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C, "layers": HETERO}),
], ids=["gqa-learn", "mla-rope", "mla-sin", "hetero-moe"])
def test_param_count_matches_hand_count(cfg):
    m = LLM(cfg)
    total, active = hand_count(cfg)
    got = m.num_params()
    assert got.total == total == sum(p.numel() for p in m.parameters())
    assert got.active == active


def test_flops_per_token_formula():
    cfg = ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C, "pos_emb": "learn",
                                 "layers": [{**HETERO[0], "rope_head_dim": 0}] + HETERO[1:]})
    m = LLM(cfg)
    _, active = hand_count(cfg)
    n = active - cfg.block_size * C                                 # position table excluded
    Tb = cfg.block_size
    attn = 6 * 4 * Tb * (8 + 8) + 6 * 4 * Tb * (8 + 8) + 6 * 2 * Tb * (16 + 16)
    assert m.flops_per_token() == 6 * n + attn
    rope = ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C, "layers": HETERO[:1]})
    _, active = hand_count(rope)
    assert LLM(rope).flops_per_token() == 6 * active + 6 * 4 * 16 * ((8 + 4) + 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kv_cache_bytes_formula_equals_measured_allocation(dtype):
    cfg = ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C, "layers": HETERO})
    m = LLM(cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    # MLA: kv_latent + rope; GQA n_kv=1: 2*1*8; MHA n_head=2: 2*2*16
    expected = elem * ((10 + 4) + 2 * 1 * 8 + 2 * 2 * 16)
    assert m.kv_cache_bytes_per_token(dtype) == expected
    cache = m.new_cache(batch=3, dtype=dtype)
    assert cache.nbytes() == 3 * cfg.block_size * expected
    for attn in ["mha", "mqa", "gqa", "mla"]:
        mm = LLM(small(attn=attn))
        c = mm.new_cache(batch=2, dtype=dtype)
        assert c.nbytes() / (2 * 16) == mm.kv_cache_bytes_per_token(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_with_sliding_windows(dtype):
    """A windowed layer allocates min(window, block_size) positions; the formula's bytes per
    token is the bytes of a full block_size context ÷ block_size."""
    layers = [{"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "window": 4},     # ring of 4
              {"attn": "mla", "n_head": 4, "q_latent_dim": 12, "kv_latent_dim": 10, "rope_head_dim": 4},
              {"attn": "mqa", "n_head": 4, "window": 64},                     # >= block: full
              {"attn": "mha", "n_head": 2, "window": 3}]
    cfg = ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C, "layers": layers})
    m = LLM(cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    per_row = elem * (2 * 2 * 8 * 4 + (10 + 4) * 16 + 2 * 1 * 8 * 16 + 2 * 2 * 16 * 3)
    assert m.kv_cache_bytes(dtype) == per_row
    assert m.kv_cache_bytes_per_token(dtype) == per_row / 16
    cache = m.new_cache(batch=3, dtype=dtype)
    assert [layer["k" if "k" in layer else "c_kv"].shape[1] for layer in cache.layers] == [4, 16, 16, 3]
    assert cache.nbytes() == 3 * 16 * m.kv_cache_bytes_per_token(dtype) == 3 * per_row
    full = LLM(ModelConfig.from_dict({"vocab_size": V, "block_size": 16, "n_embd": C,
                                      "layers": [{k: v for k, v in l.items() if k != "window"}
                                                 for l in layers]}))
    assert full.kv_cache_bytes(dtype) - m.kv_cache_bytes(dtype) == elem * (2 * 2 * 8 * 12 + 2 * 2 * 16 * 13)


def test_sinusoidal_positions_do_not_drown_the_token_embeddings_at_init():
    # the raw sin/cos table (RMS 0.71) is ~35x the N(0, 0.02) token embeddings; unscaled, a
    # 4-layer char model stayed at the unigram loss for 300 steps (docs/sweeps.md)
    torch.manual_seed(0)
    m = LLM(ModelConfig.from_dict({"n_layer": 1, "n_embd": 64, "n_head": 4, "attn": "mha",
                                   "pos_emb": "sin", "block_size": 32, "vocab_size": 96}))
    tok_rms = m.wte.weight.pow(2).mean().sqrt()
    pos_rms = m.pos(torch.arange(32)).pow(2).mean().sqrt()
    assert 0.5 < (pos_rms / tok_rms).item() < 2.0
