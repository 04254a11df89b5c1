"""KV-cached decoding equals uncached decoding — for every attention x position type and a
heterogeneous mix, within and beyond block_size — and generate() rejects bad arguments.

Models run in float64: an untrained model's logits are nearly flat, and the cached and
uncached paths sum in different orders (MLA's absorbed path most of all), so fp32 rounding
could flip a near-tie in argmax without any bug. float64 makes the comparison exact in practice.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from models import LLM, ModelConfig
from models.sampling import sample_next
from models.positions import SIN_SCALE

V, BLOCK = 53, 16


def build(seed=0, **kw) -> LLM:
    base = dict(vocab_size=V, block_size=BLOCK, n_embd=32, n_layer=3, n_head=4, n_kv_heads=2,
                q_latent_dim=12, kv_latent_dim=10, rope_head_dim=4, up_dim=24)
    base.update(kw)
    if base.get("pos_emb", "rope") != "rope":
        base["rope_head_dim"] = 0
    torch.manual_seed(seed)
    return _varied(LLM(ModelConfig.from_dict(base)))


def _varied(m: LLM) -> LLM:
    """Scale the untrained weights (not the embedding) up, so that greedy decoding does not
    settle on one repeated token and the comparison covers varied contexts."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 and not name.startswith("wte"):
                p.mul_(10)
        if m.pos is not None and m.pos.kind == "sin":
            m.pos.table.mul_(1 / SIN_SCALE)           # positions at full strength, too
    return m.double().eval()


def hetero(pos_emb="rope") -> LLM:
    r = 4 if pos_emb == "rope" else 0
    layers = [
        {"attn": "mla", "n_head": 4, "q_latent_dim": 12, "kv_latent_dim": 10, "rope_head_dim": r,
         "moe": True, "n_exp": 6, "n_shared": 1, "n_act": 3, "aux_free": True, "up_dim": 16},
        {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": False, "up_dim": 40},
        {"attn": "mqa", "n_head": 2, "moe": True, "n_exp": 4, "n_shared": 0, "n_act": 2,
         "aux_free": False, "up_dim": 20},
        {"attn": "mha", "n_head": 4, "moe": False, "non_linearity": "gelu"},
    ]
    torch.manual_seed(1)
    return _varied(LLM(ModelConfig.from_dict({"vocab_size": V, "block_size": BLOCK, "n_embd": 32,
                                              "pos_emb": pos_emb, "layers": layers})))


CASES = list(itertools.product(["mha", "mqa", "gqa", "mla"], ["learn", "sin", "rope"]))

# The knobs that imported checkpoints need (chimera.hf), each on the layers it applies to.
_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.8,
         "mscale_all_dim": 0.6}
_MOE = dict(moe=True, n_exp=9, n_shared=1, n_act=3, up_dim=12)
KNOBS = {
    "bias_qkv": dict(attn="gqa", bias="qkv"),
    "bias_attn": dict(attn="gqa", bias="attn", tie_embeddings=False),
    "bias_all_gelu_tanh": dict(attn="mha", pos_emb="learn", bias="all", non_linearity="gelu_tanh"),
    "untied_norm_eps": dict(attn="gqa", norm="rmsnorm", norm_eps=1e-2, tie_embeddings=False),
    "rope_theta_llama3": dict(attn="gqa", rope_theta=500.0, rope_scaling={
        "type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
        "original_max_position_embeddings": 8}),
    "yarn_gqa": dict(attn="mqa", rope_scaling=_YARN),
    "mla_dims_no_q_latent": dict(attn="mla", q_latent_dim=None, qk_nope_head_dim=6, v_head_dim=10,
                                 norm="rmsnorm", norm_eps=1e-3),
    "mla_yarn": dict(attn="mla", rope_scaling=_YARN),
    "moe_softmax_groups": dict(attn="gqa", **_MOE, aux_free=False, norm_topk_prob=False,
                               routed_scaling_factor=2.5, n_group=4, topk_group=2),
    "moe_sigmoid_groups": dict(attn="mla", **_MOE, aux_free=True, norm_topk_prob=True,
                               routed_scaling_factor=1.5, n_group=2, topk_group=1),
    # issue 18: ALiBi (6 heads: the slopes' non-power-of-two rule) and sliding windows smaller
    # than the prompt (5 tokens) and than block_size, with every position type
    "alibi_gqa": dict(attn="gqa", pos_emb="alibi"),
    "alibi_6_heads_mha": dict(attn="mha", pos_emb="alibi", n_embd=24, n_head=6),
    "window3_gqa": dict(attn="gqa", window=3),
    "window4_mqa_alibi": dict(attn="mqa", window=4, pos_emb="alibi"),
    "window6_mha_learn": dict(attn="mha", window=6, pos_emb="learn"),
    "window1_gqa_sin": dict(attn="gqa", window=1, pos_emb="sin"),
}

# local/global: windowed and full gqa-family layers next to an MLA layer (issue 18)
LOCAL_GLOBAL = [
    {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "window": 3, "up_dim": 24},
    {"attn": "mla", "n_head": 4, "q_latent_dim": 12, "kv_latent_dim": 10, "up_dim": 24},
    {"attn": "mqa", "n_head": 2, "window": 5, "moe": True, "n_exp": 4, "n_shared": 0, "n_act": 2,
     "aux_free": True, "up_dim": 20},
    {"attn": "mha", "n_head": 4, "up_dim": 24},
]


def local_global(pos_emb="rope") -> LLM:
    layers = [dict(l, rope_head_dim=4 if pos_emb == "rope" else 0) if l["attn"] == "mla" else l
              for l in LOCAL_GLOBAL]
    if pos_emb == "alibi":
        layers[1] = {"attn": "gqa", "n_head": 4, "n_kv_heads": 1, "window": 16, "up_dim": 24}
    torch.manual_seed(2)
    return _varied(LLM(ModelConfig.from_dict({"vocab_size": V, "block_size": BLOCK, "n_embd": 32,
                                              "pos_emb": pos_emb, "layers": layers})))


def build_knob(name: str) -> LLM:
    """build() with KNOBS[name]; biases and MoE selection biases randomised (they start at 0,
    which would hide a bias that is dropped on one path)."""
    m = build(**KNOBS[name])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in m.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor) and b.dim() == 1 and not isinstance(mod, torch.nn.LayerNorm):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.5)
    return m


@pytest.mark.parametrize("attn,pos_emb", CASES)
@pytest.mark.parametrize("new_tokens", [10, 3 * BLOCK], ids=["within", "beyond"])
def test_cached_equals_uncached_greedy(attn, pos_emb, new_tokens):
    m = build(attn=attn, pos_emb=pos_emb)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    cached = m.generate(prompt, new_tokens, temperature=0.0, use_cache=True)
    plain = m.generate(prompt, new_tokens, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, 5:].tolist())) > 1          # not one repeated token


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("new_tokens", [10, 3 * BLOCK], ids=["within", "beyond"])
def test_cached_equals_uncached_knobs(knob, new_tokens):
    m = build_knob(knob)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    cached = m.generate(prompt, new_tokens, temperature=0.0, use_cache=True)
    assert torch.equal(cached, m.generate(prompt, new_tokens, temperature=0.0, use_cache=False))
    assert len(set(cached[0, 5:].tolist())) > 1


def test_knobs_change_the_model():
    """Each knob reaches the computation: the same seed without it gives other logits."""
    prompt = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = {"bias_qkv": dict(attn="gqa"), "rope_theta_llama3": dict(attn="gqa"),
             "yarn_gqa": dict(attn="mqa"), "mla_yarn": dict(attn="mla"),
             "moe_softmax_groups": dict(attn="gqa", **_MOE, aux_free=False)}
    for name, kw in plain.items():
        with_knob, without = build_knob(name), build(**kw)
        if name == "bias_qkv":
            without = build_knob(name)
            for mod in without.modules():
                if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                    mod.bias.data.zero_()
        a, b = with_knob(prompt)[0], without(prompt)[0]
        assert not torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("pos_emb", ["rope", "learn"])
def test_cached_equals_uncached_heterogeneous(pos_emb):
    m = hetero(pos_emb)
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(3))
    for n in (8, 2 * BLOCK + 3):
        assert torch.equal(m.generate(prompt, n, temperature=0.0),
                           m.generate(prompt, n, temperature=0.0, use_cache=False))


def test_prompt_longer_than_block_size_uses_last_window():
    m = build(attn="gqa")
    long = torch.randint(0, V, (1, BLOCK + 9), generator=torch.Generator().manual_seed(5))
    out = m.generate(long, 4, temperature=0.0)
    same = m.generate(long[:, -BLOCK:], 4, temperature=0.0)
    assert torch.equal(out[:, -4:], same[:, -4:])


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_cached_logits_match_full_forward(attn):
    """Stronger than equal argmax: every cached step's logits equal the full forward's, also
    for a prefix prefilled in two chunks (explicit causal mask over the cached prefix)."""
    m = build(attn=attn)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(9))
    full = m(x)[0]                                               # (B, T, V)
    cache = m.new_cache(2)
    m.next_logits(x[:, :5], cache, 0)
    torch.testing.assert_close(m.next_logits(x[:, 5:9], cache, 5), full[:, 8])
    for t in range(9, 12):
        torch.testing.assert_close(m.next_logits(x[:, t:t + 1], cache, t), full[:, t])
    assert cache.length == 12


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    m = build(attn="mla")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = m.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    c = m.generate(prompt, 20, temperature=1.0, top_k=5, use_cache=False,
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = {int(sample_next(probs.log(), 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1}                                  # 0.5 + 0.3 covers 0.8
    draws = {int(sample_next(probs.log(), 1.0, top_p=0.1, generator=g)) for _ in range(50)}
    assert draws == {0}                                     # the top token always stays
    assert int(sample_next(probs.log(), 0.0)) == 0          # greedy


def test_eos_stops_and_pads():
    m = build(attn="gqa")
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(2))
    ref = m.generate(prompt, 12, temperature=0.0)
    eos = int(ref[0, 5])                                    # row 0 emits it at step 3
    out = m.generate(prompt, 12, temperature=0.0, eos_id=eos)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    assert out.size(1) <= ref.size(1)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer"),
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(top_k=0), r"top_k must be None or an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
])
def test_generate_argument_errors(kw, msg):
    m = build(attn="gqa")
    args = dict(max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        m.generate(torch.zeros(1, 2, dtype=torch.long), **args)


def test_generate_rejects_bad_prompts():
    m = build(attn="gqa")
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        m.generate(torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside"):
        m.generate(torch.full((1, 2), V), 2)


# --- ALiBi and sliding windows (issue 18) -----------------------------------------------------
WINDOWED = [k for k in KNOBS if k.startswith(("alibi", "window"))]


def test_alibi_slopes_follow_the_paper():
    from models.positions import alibi_slopes
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (2^-1, 2^-3)
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert alibi_slopes(1).tolist() == [2.0 ** -8]


def _naive_attention(attn, x, window, slopes):
    """Reference GQA: an explicit loop over heads and queries, softmax over the keys a query
    may see (window: its last `window` positions), ALiBi's -slope*(q-k) added to the scores."""
    B, T, C = x.shape
    H, K, D = attn.n_head, attn.n_kv, attn.head_dim
    q, k, v = attn.c_attn(x).split([H * D, K * D, K * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
    if attn.rotary is not None:
        q, k = (attn.rotary(t.transpose(1, 2)).transpose(1, 2) for t in (q, k))
    y = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        kh = h // (H // K)
        for t in range(T):
            lo = 0 if window is None else max(0, t - window + 1)
            s = (k[:, lo:t + 1, kh] @ q[:, t, h].unsqueeze(-1)).squeeze(-1) / D ** 0.5   # (B, n)
            if slopes is not None:
                s = s - slopes[h] * (t - torch.arange(lo, t + 1, dtype=x.dtype))
            y[:, t, h] = (s.softmax(-1).unsqueeze(-1) * v[:, lo:t + 1, kh]).sum(1)
    return attn.c_proj(y.reshape(B, T, C))


@pytest.mark.parametrize("knob", ["alibi_6_heads_mha", "window3_gqa", "window4_mqa_alibi"])
def test_window_and_alibi_attention_match_a_naive_reference(knob):
    m = build_knob(knob)
    attn = m.blocks[0].attn
    x = torch.randn(2, 11, m.cfg.n_embd, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = _naive_attention(attn, x, KNOBS[knob].get("window"), attn.alibi)
    torch.testing.assert_close(attn(x), ref)                         # training path
    cache = m.new_cache(2).layers[0]
    got = torch.cat([attn(x[:, :5], cache, 0), attn(x[:, 5:10], cache, 5), attn(x[:, 10:], cache, 10)], 1)
    torch.testing.assert_close(got, ref)                             # ring / full cache, chunked


@pytest.mark.parametrize("knob", WINDOWED)
def test_windowed_cached_logits_match_full_forward(knob):
    """Chunks longer than the window at start > 0 (the ring is read before it is overwritten)."""
    m = build_knob(knob)
    x = torch.randint(0, V, (2, BLOCK), generator=torch.Generator().manual_seed(9))
    full = m(x)[0]                                                   # (B, T, V)
    cache = m.new_cache(2)
    torch.testing.assert_close(m.next_logits(x[:, :6], cache, 0), full[:, 5])
    torch.testing.assert_close(m.next_logits(x[:, 6:13], cache, 6), full[:, 12])
    for t in range(13, BLOCK):
        torch.testing.assert_close(m.next_logits(x[:, t:t + 1], cache, t), full[:, t])


@pytest.mark.parametrize("pos_emb", ["rope", "learn", "alibi"])
@pytest.mark.parametrize("new_tokens", [8, 2 * BLOCK + 3], ids=["within", "beyond"])
def test_cached_equals_uncached_local_global(pos_emb, new_tokens):
    m = local_global(pos_emb)
    prompt = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    cached = m.generate(prompt, new_tokens, temperature=0.0)
    assert torch.equal(cached, m.generate(prompt, new_tokens, temperature=0.0, use_cache=False))
    assert len(set(cached[0, 7:].tolist())) > 1


def test_a_window_changes_the_model_and_one_of_block_size_does_not():
    x = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(2))
    full = build(attn="gqa")
    assert not torch.allclose(build(attn="gqa", window=3)(x)[0], full(x)[0], atol=1e-6)
    wide = build(attn="gqa", window=BLOCK)                           # covers every context
    torch.testing.assert_close(wide(x)[0], full(x)[0])
    assert wide.blocks[0].attn.cache_len == BLOCK
    no_slopes = build(attn="gqa", pos_emb="alibi")
    no_slopes.blocks[0].attn.alibi.zero_()
    assert not torch.allclose(build(attn="gqa", pos_emb="alibi")(x)[0], no_slopes(x)[0], atol=1e-6)
