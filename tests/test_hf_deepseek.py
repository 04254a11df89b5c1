"""chimera.hf.deepseek: tiny random DeepSeek-V2/V3 models from transformers configs (no network)
imported into Chimera and exported back, matched on logits (fp32, <= 1e-4) and greedy tokens
(HF generate == Chimera with and without its KV cache); misfit reasons and refused HF settings.

Run: HOME=$(mktemp -d) .venv/bin/python -m pytest tests/test_hf_deepseek.py -q
"""
from __future__ import annotations

import re

import pytest
import torch
import transformers                      # a dev dependency: the reference implementation

from chimera.hf import deepseek
from models import LLM, ModelConfig

TOL = 1e-4
V, N_NEW = 320, 8

BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=128, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 1.0}

# name -> (HF config class name, overrides of BASE)
CASES = {
    # V2: softmax, never renormalised, routed scaling, greedy top-k, query latent
    # (rms_norm_eps 1e-2: the block norms take it, the MLA latent norms stay at 1e-6 as in HF)
    "v2": ("DeepseekV2Config", dict(topk_method="greedy", routed_scaling_factor=1.5, rms_norm_eps=1e-2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    # V2-Lite shape: no query latent; group-limited routing; two shared experts; tied head
    "v2_lite_groups": ("DeepseekV2Config", dict(q_lora_rank=None, topk_method="group_limited_greedy",
                                                n_group=4, topk_group=2, routed_scaling_factor=2.0,
                                                n_shared_experts=2, tie_word_embeddings=True)),
    # V3: sigmoid + correction bias, groups, renormalised, scaling, YaRN, interleaved rope rows
    "v3_yarn": ("DeepseekV3Config", dict(n_group=4, topk_group=2, norm_topk_prob=True,
                                         routed_scaling_factor=2.5, rope_parameters=YARN,
                                         rope_interleave=True)),
    # V3 without renormalisation or interleave, no query latent, all groups, 2 dense layers
    "v3_plain": ("DeepseekV3Config", dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                          routed_scaling_factor=1.7, rope_interleave=False,
                                          q_lora_rank=None, first_k_dense_replace=2)),
    # V3 with Llama-3 RoPE scaling, a tied head and two shared experts
    "v3_llama3": ("DeepseekV3Config", dict(n_group=2, topk_group=1, n_shared_experts=2,
                                           tie_word_embeddings=True, rope_parameters={
                                               "rope_type": "llama3", "rope_theta": 20000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16})),
}


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that attention is far from uniform (RoPE rows and the softmax scale
    matter), norm gains away from 1, and a non-zero V3 correction bias (it must pick experts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def hf_model(case: str):
    cls, over = CASES[case]
    cfg = getattr(transformers, cls)(**{**BASE, **over})
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    _randomise(m)
    return m


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(m, idx):
    return m(idx).logits


@torch.no_grad()
def hf_greedy(m, idx):
    return m.generate(idx, max_new_tokens=N_NEW, do_sample=False, attention_mask=torch.ones_like(idx))


def chimera(cfg: dict, sd: dict) -> LLM:
    model = LLM(ModelConfig.from_dict(cfg)).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only wait on each other on the shared test machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_matches(hf, ch: LLM, idx: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Logits within TOL; HF's greedy tokens == Chimera's with and without the KV cache (or,
    given `greedy`, Chimera's tokens checked before: only HF's are generated again)."""
    with torch.no_grad():
        err = (hf_logits(hf, idx) - ch(idx)[0]).abs().max().item()
    assert err <= TOL, err
    want = hf_greedy(hf, idx)
    if greedy is not None:
        assert torch.equal(want, greedy)
        return want
    assert torch.equal(ch.generate(idx, N_NEW, temperature=0.0), want)
    assert torch.equal(ch.generate(idx, N_NEW, temperature=0.0, use_cache=False), want)
    return want


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf(case):
    hf = hf_model(case)
    cfg, sd = deepseek.from_hf(hf.config, hf.state_dict())
    assert_matches(hf, chimera(cfg, sd), prompt())


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(case, tmp_path):
    """HF -> Chimera -> HF (module state dict, then save_pretrained / from_pretrained)."""
    hf = hf_model(case)
    idx = prompt(2)
    ch = chimera(*deepseek.from_hf(hf.config, hf.state_dict()))
    hf_cfg, sd = deepseek.to_hf(ch.cfg, ch.state_dict())
    assert hf_cfg.model_type == hf.config.model_type            # sigmoid -> V3, softmax -> V2
    out = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    out.load_state_dict(sd, strict=True)
    greedy = assert_matches(out, ch, idx)
    out.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert_matches(back, ch, idx, greedy)


def test_export_native_chimera_models():
    """Chimera-made stacks (not imported): aux-free + groups -> V3, softmax without renorm -> V2,
    an all-dense MLA stack -> V3; the selection bias is live (non-zero)."""
    mla = dict(attn="mla", n_head=4, q_latent_dim=32, kv_latent_dim=32, rope_head_dim=8,
               qk_nope_head_dim=8, v_head_dim=16, non_linearity="swiglu")
    moe = dict(moe=True, up_dim=32, n_exp=10, n_shared=2, n_act=4, n_group=4, topk_group=2,
               routed_scaling_factor=1.3)
    stacks = {
        "deepseek_v3": [{**mla, "up_dim": 48}, {**mla, **moe, "aux_free": True, "norm_topk_prob": True}],
        "deepseek_v2": [{**mla, **moe, "aux_free": False, "norm_topk_prob": False}] * 2,
    }
    stacks["deepseek_v3_dense"] = [{**mla, "up_dim": 48}] * 2
    for want, layers in stacks.items():
        cfg = ModelConfig.from_dict({"vocab_size": V, "block_size": 64, "n_embd": 64, "norm": "rmsnorm",
                                     "pos_emb": "rope", "tie_embeddings": want != "deepseek_v2",
                                     "layers": layers})
        torch.manual_seed(0)
        ch = LLM(cfg).eval()
        _randomise(ch)
        with torch.no_grad():
            for _, m in ch.moe_layers():
                if m.aux_free:
                    m.bias.normal_(0.0, 0.3)
        hf_cfg, sd = deepseek.to_hf(cfg, ch.state_dict())
        assert hf_cfg.model_type == want.removesuffix("_dense")
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
        hf.load_state_dict(sd, strict=True)
        assert_matches(hf, ch, prompt(3))


def test_rope_reordering_is_needed():
    """Telling the importer that interleaved rows are rotate-half breaks parity (so the
    reordering the parity tests rely on is exercised, not a no-op)."""
    hf = hf_model("v3_yarn")
    hf.config.rope_interleave = False
    cfg, sd = deepseek.from_hf(hf.config, hf.state_dict())
    hf.config.rope_interleave = True
    with torch.no_grad():
        err = (hf_logits(hf, prompt()) - chimera(cfg, sd)(prompt())[0]).abs().max().item()
    assert err > 1e-2


def test_import_config_mapping():
    hf = hf_model("v3_yarn")
    cfg, _ = deepseek.from_hf(hf.config, hf.state_dict(), block_size=64)
    mc = ModelConfig.from_dict(cfg)
    assert mc.block_size == 64 and mc.norm == "rmsnorm" and mc.tie_embeddings is False
    assert mc.rope_scaling.type == "yarn" and mc.rope_scaling.mscale_all_dim == 1.0
    dense, moe = mc.layers[0], mc.layers[1]
    assert not dense.ffn.moe and dense.ffn.up_dim == 64
    f = moe.ffn
    assert (f.n_exp, f.n_shared, f.n_act, f.up_dim, f.aux_free) == (9, 1, 3, 32, True)
    assert (f.n_group, f.topk_group, f.routed_scaling_factor, f.norm_topk_prob) == (4, 2, 2.5, True)
    a = moe.attn
    assert (a.q_latent_dim, a.kv_latent_dim, a.rope_head_dim, a.qk_nope_head_dim, a.v_head_dim) == \
        (32, 32, 8, 16, 16)
    with pytest.raises(ValueError, match="block_size=256 exceeds"):
        deepseek.from_hf(hf.config, hf.state_dict(), block_size=256)


@pytest.mark.parametrize("field,value,match", [
    ("attention_bias", True, "attention_bias=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("topk_method", "noaux_tc", "topk_method='noaux_tc'"),
    ("num_key_value_heads", 2, "num_key_value_heads=2"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_type='linear'"),
])
def test_import_refuses_unsupported_settings(field, value, match):
    hf = hf_model("v2")
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=match):
        deepseek.from_hf(hf.config, hf.state_dict())


def test_import_refuses_other_model_types():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(ValueError, match="model_type='llama': this family imports deepseek_v2, deepseek_v3"):
        deepseek.from_hf(cfg, {})


def test_import_refuses_unknown_weights():
    hf = hf_model("v2")
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="weights no mapping uses: model.layers.0.self_attn.extra.weight"):
        deepseek.from_hf(hf.config, state)


def _stack(layers, **glob):
    return ModelConfig.from_dict({"vocab_size": V, "block_size": 64, "n_embd": 64, "norm": "rmsnorm",
                                  "pos_emb": "rope", **glob, "layers": layers})


MLA = dict(attn="mla", n_head=4, q_latent_dim=16, kv_latent_dim=16, rope_head_dim=8,
           non_linearity="swiglu", up_dim=32)
SIG = dict(moe=True, n_exp=5, n_shared=1, n_act=3, aux_free=True)


def test_misfit_fits():
    assert deepseek.misfit(_stack([MLA, {**MLA, **SIG}, {**MLA, **SIG}])) == []


@pytest.mark.parametrize("layers,glob,match", [
    ([{"attn": "gqa", "n_head": 4, "n_kv_heads": 2}, MLA], {}, r"layers\[0\]: gqa attention"),
    ([{**MLA, **SIG}, MLA, {**MLA, **SIG}], {}, r"layers\[1\]: dense MLP after the first moe layer 0"),
    ([MLA, {**MLA, **SIG}, {**MLA, **SIG, "n_act": 2}], {}, r"moe settings differ .*layers\[2\]"),
    ([MLA, {**MLA, "up_dim": 48}, {**MLA, **SIG}], {}, r"dense up_dim differ .*layers\[1\]: 48"),
    ([MLA, {**MLA, "kv_latent_dim": 8}], {}, r"mla dims differ .*layers\[1\]"),
    ([MLA, {**MLA, "non_linearity": "gelu"}], {}, r"layers\[1\]: non_linearity gelu"),
    ([MLA, MLA], {"norm": "layernorm"}, "norm='layernorm'"),
    ([{**MLA, "rope_head_dim": 0}], {"pos_emb": "learn"}, "pos_emb='learn'"),
    ([{"attn": "gqa", "n_head": 4, "n_kv_heads": 2}], {"bias": "qkv"}, "bias='qkv'"),
    ([MLA, {**MLA, **SIG, "aux_free": False}], {}, r"layers\[1\]: softmax routing with norm_topk_prob true"),
    ([{**MLA, **SIG, "n_group": 4, "topk_group": 2, "n_act": 2}], {},
     r"layers\[0\]: aux_free routing with fewer than 2 routed experts per group"),
    ([{**MLA, **SIG, "aux_free": False, "norm_topk_prob": False, "n_head": 3, "qk_nope_head_dim": 16,
       "v_head_dim": 16}], {}, r"layers\[0\]: n_embd=64 is not divisible by n_head"),
])
def test_misfit_reasons(layers, glob, match):
    cfg = _stack(layers, **glob)
    reasons = deepseek.misfit(cfg)
    assert any(re.search(match, r) for r in reasons), reasons
    with pytest.raises(ValueError, match="does not fit deepseek"):
        deepseek.to_hf(cfg, LLM(cfg).state_dict())
