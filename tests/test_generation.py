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
