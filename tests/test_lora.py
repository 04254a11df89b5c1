"""LoRA adapters (models/lora.py) and LoRA checkpoints (chimera.checkpoint), on CPU without Ray:
targets checked against the model, only adapters train, merged == adapted (logits), cached ==
uncached decoding with adapters (GQA and MLA targets), the base stored untouched beside the
adapters, load_model merging them, and an adapter refused on the wrong base."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from chimera import checkpoint as ckpt
from models import LLM, ModelConfig, lora

GQA = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=32,
           vocab_size=64)
MLA = dict(n_layer=2, n_embd=32, n_head=4, attn="mla", q_latent_dim=16, kv_latent_dim=16,
           rope_head_dim=8, up_dim=64, block_size=32, vocab_size=64)
MOE = dict(MLA, moe=True, n_exp=4, n_shared=1, n_act=2, aux_free=True)


def _model(d, seed=0):
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_dict(d))


def _train(model, steps=5, lr=1e-2):
    """A few AdamW steps on random tokens over the trainable parameters; returns them."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 16), generator=g)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params


def test_targets_named_and_checked():
    with pytest.raises(lora.LoRAError, match=r"unknown target 'q_proj'; valid targets: c_attn, c_proj"):
        lora.parse_targets("c_attn,q_proj")
    with pytest.raises(lora.LoRAError, match="'w_up' cannot be a target: MoE experts are stacked"):
        lora.parse_targets("w_up")
    with pytest.raises(lora.LoRAError, match="'lm_head' cannot be a target: the token embedding and the LM head"):
        lora.parse_targets(["lm_head"])
    with pytest.raises(lora.LoRAError, match="lora_targets is empty"):
        lora.parse_targets(" , ")
    assert lora.parse_targets(" c_attn, c_fc,c_attn") == ("c_attn", "c_fc")
    m = _model(GQA)
    with pytest.raises(lora.LoRAError, match=r"W_uk match no module of this model \(its targets: "
                                             r"c_attn, c_proj, c_fc\)"):
        lora.apply_lora(m, 4, 8.0, "c_attn,W_uk")
    assert not lora.adapted(m)                        # refused before anything changed
    with pytest.raises(lora.LoRAError, match="lora_rank=0 must be >= 1"):
        lora.apply_lora(m, 0, 8.0, None)
    # MoE layers: the router is a Linear of the block but not a target; experts are not Linears
    moe = _model(MOE)
    assert lora.present_targets(moe) == ("c_proj", "W_dq", "W_uq", "W_dkv", "W_uk", "W_uv")
    assert lora.apply_lora(moe, 2, 4.0, None) == lora.present_targets(moe)
    assert not any("router" in k or "w_up" in k for k in lora.adapter_keys(moe))


def test_every_block_linear_is_a_declared_target():
    """TARGETS names every Linear of every mechanism's block (drift: a new projection must be
    declared there), the MoE router excepted."""
    names = set()
    for d in (GQA, MLA, MOE, dict(GQA, attn="mha", n_kv_heads=4), dict(GQA, non_linearity="gelu"),
              dict(MLA, q_latent_dim=None), dict(GQA, bias="all", tie_embeddings=False)):
        for q, m in _model(d).named_modules():
            if q.startswith("blocks.") and isinstance(m, torch.nn.Linear):
                names.add(q.rsplit(".", 1)[-1])
    assert names - {"router"} <= set(lora.TARGETS)
    assert set(lora.TARGETS) <= names


@pytest.mark.parametrize("d,targets", [(GQA, "c_attn,c_proj,c_fc"), (MLA, "W_uk,W_uv,W_dq,c_proj"),
                                       (dict(GQA, bias="all", tie_embeddings=False), None)])
def test_only_adapters_train_and_merge_equals_adapted(d, targets):
    base = _model(d)
    m = copy.deepcopy(base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 64, (2, 12))
    assert set(lora.apply_lora(m, 4, 8.0, targets)) == set(lora.parse_targets(targets) if targets
                                                           else lora.present_targets(m))
    m.eval()
    assert torch.equal(m(x)[0], base.eval()(x)[0])     # B = 0: the base model until it trains
    m.train()
    trained = _train(m)
    keys = lora.adapter_keys(m)
    assert {id(p) for p in trained} == {id(p) for n, p in m.named_parameters() if n in keys}
    assert len(keys) == 2 * len(lora.find_targets(m, targets))
    sd = m.state_dict()
    for k, v in before.items():                        # every base tensor untouched
        assert torch.equal(sd[k], v), k
    assert ckpt.weights_sha256(m) == ckpt.weights_sha256(base)
    assert all(sd[k].abs().sum() > 0 for k in keys if k.endswith("lora_B"))   # adapters moved
    m.eval()
    adapted_logits = m(x)[0]
    assert (adapted_logits - base(x)[0]).abs().max() > 1e-3
    merged = lora.merge_lora(copy.deepcopy(m))
    assert not lora.adapted(merged) and set(merged.state_dict()) == set(base.state_dict())
    assert (merged(x)[0] - adapted_logits).abs().max() <= 1e-5


def _cached_last_logits(m, x):
    cache = m.new_cache(x.size(0))
    return m.next_logits(x, cache, 0)                                # (B, V), cached path


@pytest.mark.parametrize("d,targets", [(GQA, "c_attn"), (MLA, "W_uk,W_uv"), (MLA, None),
                                       (dict(MLA, q_latent_dim=None, v_head_dim=4), "W_q,W_uv"),
                                       (dict(GQA, bias="all", tie_embeddings=False), None)])
def test_cached_equals_uncached_with_adapters(d, targets, monkeypatch):
    """MLA's cached path reads W_uk.weight / W_uv.weight directly: the adapter must show."""
    m = _model(d)
    lora.apply_lora(m, 4, 8.0, targets)
    torch.manual_seed(3)
    for _, mod in lora.adapted(m):                     # a strong adapter, so a miss shows
        torch.nn.init.normal_(mod.lora_B, std=0.2)
    m.eval()
    x = torch.randint(0, 64, (2, 5))
    cached = m.generate(x, 20, temperature=0.0, use_cache=True)
    assert torch.equal(cached, m.generate(x, 20, temperature=0.0, use_cache=False))
    uncached = m(x)[0][:, -1]
    assert (_cached_last_logits(m, x) - uncached).abs().max() <= 1e-5
    merged = lora.merge_lora(copy.deepcopy(m))         # and the merged model says the same
    assert torch.equal(cached, merged.generate(x, 20, temperature=0.0, use_cache=True))
    if d is MLA:       # were the adapter not in `.weight`, MLA's cached logits would differ
        monkeypatch.setattr(lora.LoRALinear, "weight", property(lambda s: s._parameters["weight"]))
        assert (_cached_last_logits(m, x) - uncached).abs().max() > 1e-3


TOK = {"name": "char", "vocab_size": 60, "eot_id": None, "vocab": [chr(32 + i) for i in range(60)]}


def _lora_checkpoint(tmp_path, d=MLA):
    base = _model(d)
    base_dir = ckpt.save_checkpoint(tmp_path / "base", base, model_config=base.cfg.to_dict(),
                                    tokenizer=TOK)
    m = copy.deepcopy(base)
    targets = lora.apply_lora(m, 4, 8.0, None)
    _train(m)
    info = {"rank": 4, "alpha": 8.0, "targets": list(targets), "base": str(base_dir),
            "base_sha256": ckpt.weights_sha256(base)}
    out = ckpt.save_checkpoint(tmp_path / "lora", m, model_config=m.cfg.to_dict(), tokenizer=TOK,
                               adapter=info)
    return base, base_dir, m.eval(), out


def test_lora_checkpoint_holds_the_base_and_loads_merged(tmp_path):
    base, base_dir, m, out = _lora_checkpoint(tmp_path)
    from safetensors.torch import load_file
    stored = load_file(str(out / ckpt.WEIGHTS))
    assert not any("lora_" in k for k in stored)                     # the base, untouched
    for k, v in stored.items():
        assert torch.equal(v, base.state_dict()[k]), k
    assert set(load_file(str(out / ckpt.ADAPTER_WEIGHTS))) == lora.adapter_keys(m)
    assert json.loads((out / ckpt.ADAPTER).read_text())["base_sha256"] == ckpt.weights_sha256(base)
    loaded, tok, _ = ckpt.load_model(out)                            # the one door: merged
    assert not lora.adapted(loaded) and tok.vocab_size == 60
    x = torch.randint(0, 60, (2, 10))
    assert (loaded(x)[0] - m(x)[0]).abs().max() <= 1e-5
    # the same model as base + adapter (what `jobs/serve.py --adapter` loads)
    served, _, meta = ckpt.load_model(base_dir, adapter=out)
    assert (served(x)[0] - m(x)[0]).abs().max() <= 1e-5 and meta["base"] == str(base_dir)
    g = served.generate(x[:, :3], 12, temperature=0.0)
    assert torch.equal(g, loaded.generate(x[:, :3], 12, temperature=0.0))
    # a trainer restoring the run: the model with adapters takes both files, strictly
    again = _model(MLA, seed=5)
    lora.apply_lora(again, 4, 8.0, None)
    ckpt.load_weights(again, out)
    assert (again.eval()(x)[0] - m(x)[0]).abs().max() == 0
    plain = _model(MLA, seed=5)                                      # no adapters: base only
    ckpt.load_weights(plain, out)
    assert ckpt.weights_sha256(plain) == ckpt.weights_sha256(base)


def test_adapter_on_the_wrong_base_is_refused(tmp_path):
    base, base_dir, m, out = _lora_checkpoint(tmp_path)
    other = _model(MLA, seed=9)                                      # same config, other weights
    other_dir = ckpt.save_checkpoint(tmp_path / "other", other, model_config=other.cfg.to_dict(),
                                     tokenizer=TOK)
    with pytest.raises(ValueError, match=r"adapter .* was trained on base weights with sha256 "
                                         r"[0-9a-f]{16}\.\.\. .*not the same base"):
        ckpt.load_model(other_dir, adapter=out)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        ckpt.load_model(base_dir, adapter=other_dir)
    with pytest.raises(ValueError, match="adapter.json is given exactly when"):
        ckpt.save_checkpoint(tmp_path / "x", m, model_config=m.cfg.to_dict())


def test_block_size_slices_learned_positions(tmp_path):
    src = _model(dict(GQA, pos_emb="learn"))
    small = _model(dict(GQA, pos_emb="learn", block_size=16), seed=4)
    ckpt.load_init_state(small, src.state_dict(), "src")
    assert torch.equal(small.pos.wpe.weight, src.pos.wpe.weight[:16])
    x = torch.randint(0, 64, (2, 16))
    assert torch.allclose(small.eval()(x)[0], src.eval()(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"src: pos.wpe.weight has shape \(16, 32\), this model needs \(32, 32\)"):
        ckpt.load_init_state(src, small.state_dict(), "src")
    with pytest.raises(ValueError, match="do not fit this model"):
        ckpt.load_init_state(_model(MLA), src.state_dict(), "src")
