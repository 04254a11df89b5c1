"""chimera.hf import: tiny random GPT-2 / Llama / Qwen2 models built from configs (no network),
saved with save_pretrained, imported with import_hf, must give HF's logits (<= 1e-4, fp32) and
HF's greedy tokens (Chimera cached == uncached). Unsupported HF settings are refused by name."""
from __future__ import annotations

import pytest
import torch

from hf_parity import TOL, greedy_both, max_logit_diff, randomize

V = 320


def _gpt2(**kw):
    from transformers import GPT2Config
    return GPT2Config(**{"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": V, "n_positions": 64,
                         "bos_token_id": None, "eos_token_id": None, **kw})


def _llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": V,
                          "max_position_embeddings": 64, "bos_token_id": None, "eos_token_id": None,
                          **kw})


def _qwen2(**kw):
    from transformers import Qwen2Config
    return Qwen2Config(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                          "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": V,
                          "max_position_embeddings": 64, **kw})


def _import(hf_cfg, tmp_path, block_size=None):
    """(HF model, Chimera model, Chimera config dict): random HF weights, saved and imported."""
    from transformers import AutoModelForCausalLM
    from chimera.hf.convert import import_hf
    from models import LLM, ModelConfig

    torch.manual_seed(0)
    hf = randomize(AutoModelForCausalLM.from_config(hf_cfg))
    hf.save_pretrained(tmp_path / "hf")
    cfg, state, tok = import_hf(str(tmp_path / "hf"), block_size=block_size)
    assert tok is None                                   # no tokenizer files in the folder
    model = LLM(ModelConfig.from_dict(cfg))
    model.load_state_dict(state, strict=True)
    return hf, model.eval(), cfg


CASES = {
    "gpt2-gelu": (_gpt2, dict(activation_function="gelu"), {"non_linearity": "gelu", "bias": "all"}),
    "gpt2-gelu_new-untied": (_gpt2, dict(activation_function="gelu_new", tie_word_embeddings=False,
                                         n_inner=96, layer_norm_epsilon=1e-4),
                             {"non_linearity": "gelu_tanh", "tie_embeddings": False, "up_dim": 96,
                              "norm_eps": 1e-4}),
    "llama-gqa-tied": (_llama, dict(tie_word_embeddings=True),
                       {"attn": "gqa", "n_kv_heads": 2, "bias": "none", "tie_embeddings": True}),
    "llama-mha-attention_bias-untied-theta": (
        _llama, dict(num_key_value_heads=4, attention_bias=True, rope_theta=500000.0, rms_norm_eps=1e-5),
        {"attn": "mha", "bias": "attn", "tie_embeddings": False, "rope_theta": 500000.0, "norm_eps": 1e-5}),
    "llama-mlp_bias": (_llama, dict(attention_bias=True, mlp_bias=True), {"bias": "all"}),
    "llama-llama3-rope": (
        _llama, dict(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
        {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "llama-yarn-rope": (
        _llama, dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 16}),
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                          "attention_factor": None, "truncate": True}}),
    "qwen2-qkv-bias-mqa": (_qwen2, dict(), {"attn": "mqa", "bias": "qkv", "tie_embeddings": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_matches_hf_logits_and_greedy_tokens(case, tmp_path):
    make, kw, expect = CASES[case]
    hf, model, cfg = _import(make(**kw), tmp_path)
    for k, v in expect.items():                       # the knob the case is about was mapped
        assert cfg[k] == v, (k, cfg[k])
    assert max_logit_diff(hf, model, V) <= TOL
    ref, cached, uncached = greedy_both(hf, model, V)
    assert cached == ref and uncached == ref


def test_block_size_below_the_hf_context_slices_the_position_table(tmp_path):
    hf, model, cfg = _import(_gpt2(), tmp_path, block_size=32)
    assert cfg["block_size"] == 32 and model.pos.wpe.weight.shape == (32, 64)
    assert max_logit_diff(hf, model, V, T=32) <= TOL
    from chimera.hf.convert import import_hf
    with pytest.raises(ValueError, match=r"block_size=65 must be in \[1, n_positions=64\]"):
        import_hf(str(tmp_path / "hf"), block_size=65)


def test_tied_embeddings_are_mapped_once_from_the_embedding():
    """The trap: with tied weights the HF state dict holds lm_head.weight AND the embedding; the
    embedding is the one source (a diverging lm_head.weight in a tied dict is ignored)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from chimera.hf import gpt2, llama

    for mod, hf in ((gpt2, GPT2LMHeadModel(_gpt2())), (llama, LlamaForCausalLM(_llama(tie_word_embeddings=True)))):
        state = dict(hf.state_dict())
        emb_key = "transformer.wte.weight" if mod is gpt2 else "model.embed_tokens.weight"
        state["lm_head.weight"] = torch.randn_like(state[emb_key])      # a wrong second copy
        _, sd = mod.from_hf(hf.config, state)
        assert torch.equal(sd["wte.weight"], state[emb_key])
        assert sd["lm_head.weight"] is sd["wte.weight"]


def test_an_hf_weight_no_mapping_uses_is_an_error():
    from transformers import LlamaForCausalLM
    from chimera.hf import llama

    hf = LlamaForCausalLM(_llama())
    state = {**hf.state_dict(), "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match=r"weights no mapping uses: model\.layers\.0\.self_attn\.q_norm"):
        llama.from_hf(hf.config, state)


REFUSED = [
    (_gpt2, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (_gpt2, dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
    (_gpt2, dict(add_cross_attention=True), "add_cross_attention=True"),
    (_gpt2, dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (_gpt2, dict(activation_function="relu"), "activation_function='relu'"),
    (_llama, dict(mlp_bias=True), "mlp_bias=True with attention_bias=False"),
    (_llama, dict(head_dim=32), "head_dim=32"),
    (_llama, dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (_llama, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='linear'"),
    (_llama, dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_type='dynamic'"),
    (_qwen2, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "use_sliding_window=True"),
]


@pytest.mark.parametrize("make,kw,msg", REFUSED, ids=[m for _, _, m in REFUSED])
def test_hf_settings_chimera_cannot_express_are_refused_by_name(make, kw, msg):
    from chimera.hf.convert import family_of_model_type

    c = make(**kw)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        family_of_model_type(c.model_type).from_hf(c, {})


def test_an_unknown_architecture_lists_the_supported_ones(tmp_path):
    from transformers import MistralConfig
    from chimera.hf.convert import import_hf

    MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'mistral' is not supported; supported: gpt2, "
                                         r"llama, qwen2"):
        import_hf(str(tmp_path))
