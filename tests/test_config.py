"""ModelConfig: the three input forms, round-trips, and error messages that name path and values."""
from __future__ import annotations

import dataclasses
import json

import pytest

from models import ConfigError, ModelConfig
from models.config import AttnConfig, FFNConfig

SEED_LAYER = {"attn": "mla", "n_head": 8, "moe": True, "up_dim": 256, "non_linearity": "swiglu",
              "dropout": 0.02, "n_kv_heads": 4, "q_latent_dim": 64, "kv_latent_dim": 64,
              "rope_head_dim": 32, "n_exp": 16, "n_shared": 1, "n_act": 4, "coeff": 0.01,
              "aux_free": True, "alpha": 0.0001, "gamma": 0.001}
SEED_GQA = {**SEED_LAYER, "attn": "gqa", "moe": False, "up_dim": 512, "n_kv_heads": 2}


def test_flat_flags_build_a_homogeneous_stack():
    cfg = ModelConfig.from_dict({"n_layer": 3, "n_embd": 64, "attn": "gqa", "n_head": 4,
                                 "n_kv_heads": 2, "pos_emb": "rope", "moe": True, "n_exp": 4,
                                 "n_shared": 1, "n_act": 2, "aux_free": True})
    assert cfg.n_layer == 3 and len(cfg.layers) == 3 and cfg.is_homogeneous
    b = cfg.layers[0]
    assert (b.attn.attn, b.attn.n_head, b.attn.n_kv_heads) == ("gqa", 4, 2)
    assert b.attn.q_latent_dim is None                  # other mechanism's keys are dropped
    assert b.ffn.moe and b.ffn.top_k == 1 and b.ffn.n_routed == 3
    assert b.ffn.coeff is None and b.ffn.gamma == 0.001  # aux-free uses alpha/gamma, not coeff
    assert cfg.summary() == "3×[gqa2+moe4/2]"


def test_seed_jsonl_file_is_accepted(tmp_path):
    f = tmp_path / "layers.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in [SEED_LAYER] * 4 + [SEED_GQA] * 4) + "\n")
    cfg = ModelConfig.from_layer_file(f, n_embd=256, block_size=128, vocab_size=100, n_layer=8)
    assert cfg.summary() == "4×[mla+moe16/4] + 4×[gqa2+mlp]"
    assert cfg.layers[0].attn.rope_head_dim == 32 and cfg.layers[0].dropout == 0.02
    assert cfg.layers[4].attn.n_kv_heads == 2 and cfg.layers[4].ffn.n_exp is None


def test_layer_list_json_string_and_n_layer_mismatch():
    text = json.dumps([SEED_GQA, SEED_GQA])
    assert ModelConfig.from_layer_list(text, n_embd=64).n_layer == 2
    with pytest.raises(ConfigError, match=r"n_layer=3 but 2 layer configs were given"):
        ModelConfig.from_layer_list(text, n_embd=64, n_layer=3)
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_layer_list("[{", n_embd=64)


def test_resolved_json_round_trips_exactly(tmp_path):
    cfg = ModelConfig.from_dict({"n_embd": 256, "pos_emb": "sin", "norm": "rms",
                                 "layers": [SEED_LAYER, SEED_GQA, {"attn": "mqa", "moe": False,
                                                                    "non_linearity": "gelu"}]})
    assert cfg.norm == "rmsnorm" and cfg.layers[0].attn.rope_head_dim == 0   # no RoPE -> 0
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    p = tmp_path / "config.json"
    cfg.to_json(p)
    assert ModelConfig.from_json(p) == cfg
    # the resolved layers are themselves seed-format JSONL lines
    f = tmp_path / "best.jsonl"
    f.write_text(cfg.layers_jsonl())
    assert ModelConfig.from_layer_file(f, n_embd=256, pos_emb="sin", norm="rmsnorm") == cfg


def test_configs_are_frozen():
    cfg = ModelConfig.from_dict({"n_layer": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_embd = 12


@pytest.mark.parametrize("d, msg", [
    ({"layers": [SEED_GQA, SEED_GQA, SEED_GQA, {**SEED_GQA, "n_head": 8, "n_kv_heads": 3}]},
     r"layers\[3\]\.attn: n_head=8 is not divisible by n_kv_heads=3"),
    ({"n_embd": 100, "n_head": 8, "attn": "gqa"}, r"layers\[0\]\.attn: n_embd=100 is not divisible by n_head=8"),
    ({"n_heads": 8}, r"unknown key 'n_heads' \(did you mean 'n_head'\?\)"),
    ({"layers": [{**SEED_GQA, "up_dimm": 3}]}, r"layers\[0\]: unknown key 'up_dimm' \(did you mean 'up_dim'\?\)"),
    ({"attn": "flash"}, r"layers\[0\]\.attn: unknown attention 'flash'; choose one of mha, mqa, gqa, mla"),
    ({"non_linearity": "swishy"}, r"layers\[0\]\.ffn: unknown non_linearity 'swishy'"),
    ({"pos_emb": "xpos"}, r"unknown pos_emb 'xpos'; choose one of learn, sin, rope, alibi"),
    ({"norm": "batch"}, r"unknown norm 'batch'"),
    ({"n_layer": 0}, r"n_layer=0 must be >= 1"),
    ({"dropout": 1.5}, r"dropout=1.5 must be in \[0, 1\)"),
    ({"n_head": "8"}, r"layers\[0\]\.n_head='8' must be of type int, got str"),
    ({"moe": 1}, r"layers\[0\]\.moe=1 must be of type bool"),
    ({"vocab_size": True}, r"vocab_size=True must be of type int"),
    ({"moe": True, "n_exp": 4, "n_shared": 2, "n_act": 2}, r"layers\[0\]\.ffn: n_act=2 must be > n_shared=2"),
    ({"moe": True, "n_exp": 1}, r"layers\[0\]\.ffn: n_exp=1 must be >= 2"),
    ({"moe": True, "n_exp": 4, "n_act": 5}, r"n_act=5 must be > n_shared=1 \(at least one routed expert\) and <= n_exp=4"),
    ({"attn": "gqa", "n_head": 4, "n_kv_heads": 8}, r"n_kv_heads=8 must be <= n_head=4"),
    ({"attn": "mla", "rope_head_dim": 3}, r"rope_head_dim=3 must be an even number"),
    ({"attn": "mla", "rope_head_dim": 0}, r"mla with pos_emb='rope' needs rope_head_dim >= 2"),
    ({"attn": "gqa", "n_embd": 36, "n_head": 4, "n_kv_heads": 2}, r"RoPE needs an even head_dim, got n_embd/n_head=9"),
    ({"layers": []}, r"layers must be a non-empty list"),
    ({"layers": [3]}, r"layers\[0\] must be a dict, got int"),
    ({"moe": True, "coeff": -1.0}, r"coeff=-1.0 must be >= 0"),
    ({"dropout": float("nan")}, r"must be a finite number"),
    # the knobs imported checkpoints need
    ({"bias": "some"}, r"unknown bias 'some'; choose one of none, qkv, attn, all"),
    ({"bias": "qkv", "attn": "mla"}, r"layers\[0\]\.attn: bias='qkv' is for gqa-family layers"),
    ({"bias": "all", "attn": "gqa", "moe": True}, r"layers\[0\]\.ffn: bias='all' puts biases on dense MLPs"),
    ({"tie_embeddings": "no"}, r"tie_embeddings='no' must be of type bool"),
    ({"norm_eps": 0.0}, r"norm_eps=0.0 must be in \(0, 1\)"),
    ({"norm_eps": "1e-5"}, r"norm_eps='1e-5' must be of type float"),
    ({"rope_theta": 1.0}, r"rope_theta=1.0 must be > 1"),
    ({"rope_scaling": "yarn"}, r"rope_scaling='yarn' must be of type dict"),
    ({"rope_scaling": {"type": "ntk"}}, r"rope_scaling: type='ntk' must be one of llama3, yarn"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"rope_scaling: yarn needs original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fsat": 2}},
     r"rope_scaling: \(yarn\) unknown key 'beta_fsat' \(did you mean 'beta_fast'\?\)"),
    ({"rope_scaling": {"type": "llama3", "factor": -2.0, "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8}}, r"rope_scaling: factor=-2.0 must be a number > 0"),
    ({"rope_scaling": {"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                       "original_max_position_embeddings": 8}}, r"high_freq_factor=1.0 must be > low_freq_factor=4.0"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, "pos_emb": "learn",
      "attn": "gqa"}, r"rope_scaling needs pos_emb='rope'"),
    ({"attn": "mla", "qk_nope_head_dim": 0}, r"layers\[0\]\.attn: qk_nope_head_dim=0 must be >= 1"),
    ({"attn": "mla", "v_head_dim": "8"}, r"layers\[0\]\.v_head_dim='8' must be of type int"),
    ({"attn": "mla", "q_latent_dim": 0}, r"layers\[0\]\.attn: q_latent_dim=0 must be >= 1"),
    ({"attn": "gqa", "qk_nope_head_dim": 8, "layers": [{"attn": "gqa", "n_kv_heads": 2}]}, None),
    ({"moe": True, "routed_scaling_factor": 0.0}, r"layers\[0\]\.ffn: routed_scaling_factor=0.0 must be a number > 0"),
    ({"moe": True, "norm_topk_prob": 1}, r"layers\[0\]\.norm_topk_prob=1 must be of type bool"),
    ({"moe": True, "n_group": 3}, r"layers\[0\]\.ffn: n_group=3 must divide the 7 routed experts"),
    ({"moe": True, "n_exp": 9, "n_group": 4, "topk_group": 5}, r"topk_group=5 must be <= n_group=4"),
    ({"moe": True, "n_exp": 9, "n_act": 4, "n_group": 4, "topk_group": 1},
     r"top-k=3 routed experts \(n_act - n_shared\) do not fit in topk_group=1 groups of 2"),
    ({"moe": True, "n_group": 0}, r"n_group=0 must be >= 1"),
    # sliding windows and ALiBi (issue 18)
    ({"attn": "gqa", "window": 0}, r"layers\[0\]\.attn: window=0 must be an int >= 1 \(null: full attention\)"),
    ({"attn": "mqa", "window": -4}, r"layers\[0\]\.attn: window=-4 must be an int >= 1"),
    ({"attn": "gqa", "window": 2.5}, r"layers\[0\]\.window=2.5 must be of type int, got float"),
    ({"attn": "gqa", "window": True}, r"layers\[0\]\.window=True must be of type int, got bool"),
    ({"layers": [{"attn": "gqa", "n_kv_heads": 2, "window": 8}, {"attn": "mla", "window": 8}]},
     r"layers\[1\]\.attn: window=8 is for gqa-family layers \(mha, mqa, gqa\); an mla layer"),
    ({"pos_emb": "alibi", "layers": [{"attn": "gqa", "n_kv_heads": 2}, {"attn": "mla"}]},
     r"layers\[1\]\.attn: pos_emb='alibi' is not defined for mla layers"),
])
def test_errors_name_the_path_and_values(d, msg):
    if msg is None:                  # MLA-only keys on gqa layers are dropped like the latent dims
        assert "qk_nope_head_dim" not in ModelConfig.from_dict(d).to_dict()["layers"][0]
        return
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(d)


def test_config_errors_are_value_errors_and_files_are_checked(tmp_path):
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="layer file not found"):
        ModelConfig.from_layer_file(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SEED_GQA) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        ModelConfig.from_layer_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ConfigError, match="holds no layers"):
        ModelConfig.from_layer_file(empty)
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "missing.json")


def test_sub_configs_validate_on_their_own():
    with pytest.raises(ValueError, match=r"attn: mha needs n_kv_heads == n_head"):
        AttnConfig(attn="mha", n_head=4, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"ffn: a dense MLP does not use MoE fields"):
        FFNConfig(moe=False, n_exp=4)
    with pytest.raises(ValueError, match=r"aux_free moe uses alpha and gamma"):
        FFNConfig(moe=True, n_exp=4, n_shared=0, n_act=2, aux_free=True, coeff=0.1)


def test_shipped_configs_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    hetero = ModelConfig.from_layer_file(root / "hetero.jsonl", n_embd=256)
    assert not hetero.is_homogeneous
    kinds = {(b.attn.attn, b.ffn.moe) for b in hetero.layers}
    assert ("mla", True) in kinds and ("gqa", False) in kinds
    homo = ModelConfig.from_json(root / "homogeneous.json")
    assert homo.is_homogeneous
