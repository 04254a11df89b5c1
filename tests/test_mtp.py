"""Multi-token prediction (models/mtp.py): shapes, the loss against a hand computation, depth 0
is today's model, inference never sees the modules, gradients reach them and the shared
embedding, config errors name the field, parameter / FLOP accounting, checkpoints (new and
old), the HF export that drops them, and an in-process training run logging both losses."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models import LLM, ConfigError, ModelConfig
from models.mtp import drop_mtp

TINY = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=16,
            vocab_size=64, norm="rmsnorm", pos_emb="rope", moe=False)


def _model(seed: int = 0, **kw) -> LLM:
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_dict({**TINY, **kw}))


def _batch(B: int = 3, T: int = 16, V: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_shapes_and_modules():
    m = _model(mtp_depth=2, layers=[{"attn": "gqa"}, {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16,
                                                     "rope_head_dim": 4}])
    x, y = _batch()
    logits, loss, parts = m(x, y, parts=True)
    assert logits.shape == (3, 16, 64) and loss.shape == () and parts.mtp.shape == ()
    assert len(m.mtp) == 2
    for mod in m.mtp:                                    # the last layer's attention and FFN
        assert type(mod.block.attn) is type(m.blocks[-1].attn) and type(mod.block.attn).__name__ == "MLA"
        assert mod.eh_proj.weight.shape == (32, 64)
        assert isinstance(mod.hnorm, torch.nn.RMSNorm) and isinstance(mod.enorm, torch.nn.RMSNorm)
    names = {n for n, _ in m.named_parameters()}         # no embedding / head of their own
    assert not any(n.startswith("mtp.") and ("wte" in n or "lm_head" in n or "ln_f" in n) for n in names)
    assert m.cfg.summary().endswith(" + mtp2")
    logits, loss = m(x)                                  # no targets: no loss, no MTP
    assert loss is None and m(x, parts=True)[2] is None


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ce(logits, target):                                 # mean -log softmax[target]
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp.gather(-1, target.unsqueeze(-1)).mean()


def test_loss_equals_a_hand_computation_depth_1():
    m = _model(mtp_depth=1, mtp_lambda=0.25)
    with torch.no_grad():                                # non-trivial norm weights
        for mod in m.mtp:
            mod.hnorm.weight.uniform_(0.5, 1.5)
            mod.enorm.weight.uniform_(0.5, 1.5)
    m.eval()
    x, y = _batch()
    with torch.no_grad():
        _, loss, parts = m(x, y, parts=True)
        h = m.wte(x)                                     # the main stack, block by block
        for b in m.blocks:
            h, _ = b(h)
        W = m.wte.weight                                 # tied head
        main = _ce(_rms(h, m.ln_f.weight) @ W.T, y)
        mod = m.mtp[0]
        hin = torch.cat([_rms(h[:, :-1], mod.hnorm.weight), _rms(W[x[:, 1:]], mod.enorm.weight)], -1)
        h1, _ = mod.block(hin @ mod.eh_proj.weight.T)    # (B, T-1, C)
        mtp = _ce(_rms(h1, m.ln_f.weight) @ W.T, y[:, 1:])   # targets two tokens ahead
    assert parts.ce.item() == pytest.approx(main.item(), rel=1e-5)
    assert parts.mtp.item() == pytest.approx(mtp.item(), rel=1e-5)
    assert loss.item() == pytest.approx(main.item() + 0.25 * mtp.item(), rel=1e-5)
    assert parts.main.item() == pytest.approx(main.item(), rel=1e-5)


def test_depth_2_is_the_mean_of_two_losses_and_ignores_minus_one():
    m = _model(mtp_depth=2, mtp_lambda=1.0)
    x, y = _batch()
    y = y.clone()
    y[0, 5] = -1                                         # ignored, as in the main loss
    _, loss, p = m(x, y, parts=True)
    assert math.isfinite(p.mtp.item())
    assert loss.item() == pytest.approx((p.ce + p.mtp).item(), rel=1e-6)
    with pytest.raises(ValueError, match="mtp_depth=2 needs sequences of more than 2 tokens"):
        m(x[:, :2], y[:, :2])


def test_depth_0_is_todays_model():
    torch.manual_seed(0)
    plain = LLM(ModelConfig.from_dict(TINY))             # no mtp keys at all
    zero = _model(mtp_depth=0, mtp_lambda=0.7)
    assert zero.mtp is None
    sd0, sd1 = plain.state_dict(), zero.state_dict()
    assert list(sd0) == list(sd1) and not any("mtp" in k for k in sd0)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x, y = _batch()
    logits, loss, parts = zero(x, y, parts=True)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert parts.mtp is None and torch.equal(loss, parts.ce + parts.aux) and torch.equal(parts.ce, ref)
    assert torch.equal(plain(x, y)[1], loss) and torch.equal(plain(x)[0], logits)


def test_inference_logits_do_not_see_the_modules():
    base, m = _model(mtp_depth=0), _model(mtp_depth=2)   # same seed: MTP is initialised last
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in base.state_dict().items())
    with torch.no_grad():                                # the modules' weights do not matter
        for p in m.mtp.parameters():
            p.normal_(0, 1.0)
    base.eval(), m.eval()
    x, y = _batch()
    assert torch.equal(m(x)[0], base(x)[0]) and torch.equal(m(x, y)[0], base(x)[0])
    assert torch.equal(m.forward_with_aux(x, y)[1], base.forward_with_aux(x, y)[1])
    assert torch.equal(m.next_logits(x), base.next_logits(x))
    cache_m, cache_b = m.new_cache(3), base.new_cache(3)
    assert cache_m.nbytes() == cache_b.nbytes()
    assert m.kv_cache_bytes_per_token() == base.kv_cache_bytes_per_token()
    p = x[:, :4]
    assert torch.equal(m.generate(p, 8, temperature=0.0), base.generate(p, 8, temperature=0.0))
    d = drop_mtp(m)
    assert d.cfg.mtp_depth == 0 and torch.equal(d(x)[0], m(x)[0])


def test_gradients_reach_the_modules_and_the_shared_embedding():
    m = _model(mtp_depth=2)
    x, y = _batch()
    _, _, parts = m(x, y, parts=True)
    parts.mtp.backward()                                 # the MTP term alone
    for n, p in m.mtp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert m.wte.weight.grad.abs().sum() > 0             # shared embedding (and tied head)
    assert m.ln_f.weight.grad.abs().sum() > 0            # shared final norm
    assert m.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0   # through h^0 into the trunk


def test_untied_head_is_shared_too():
    m = _model(mtp_depth=1, tie_embeddings=False)
    x, y = _batch()
    m(x, y, parts=True)[2].mtp.backward()
    assert m.lm_head.weight.grad.abs().sum() > 0 and m.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,match", [
    ({"mtp_depth": -1}, r"mtp_depth=-1 must be >= 0"),
    ({"mtp_depth": 16}, r"mtp_depth=16 must be >= 0 \(0: off\) and < block_size=16"),
    ({"mtp_lambda": -0.1}, r"mtp_lambda=-0.1 must be >= 0"),
    ({"mtp_depth": 1.5}, r"mtp_depth=1.5 must be of type int, got float"),
    ({"mtp_depth": "2"}, r"mtp_depth='2' must be of type int, got str"),
    ({"mtp_depth": True}, r"mtp_depth=True must be of type int, got bool"),
    ({"mtp_lambda": "big"}, r"mtp_lambda='big' must be of type float"),
    ({"mtp_lambda": float("nan")}, r"mtp_lambda=nan must be a finite number"),
    ({"layers": [{}, {"mtp_depth": 1}]}, r"layers\[1\]: unknown key 'mtp_depth'"),
])
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({**TINY, **kw})


def test_train_cli_rejects_bad_mtp_values(train_char_data, tmp_path, capsys, monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "jobs"))
    import train as train_job
    base = ["--data_dir", str(train_char_data), "--storage_path", str(tmp_path)]
    assert train_job.main(base + ["--mtp_depth", "-1"]) == 2
    assert "mtp_depth=-1 must be >= 0" in capsys.readouterr().err
    assert train_job.main(base + ["--mtp_lambda", "-0.1"]) == 2
    assert "mtp_lambda=-0.1 must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                 # argparse: not an int
        train_job.main(base + ["--mtp_depth", "one"])
    assert e.value.code == 2 and "--mtp_depth" in capsys.readouterr().err


def test_params_and_flops_count_the_modules():
    base, m = _model(), _model(mtp_depth=2)
    extra = sum(p.numel() for p in m.mtp.parameters())
    assert extra == 2 * (2 * 32 + 2 * 32 * 32 + sum(p.numel() for p in base.blocks[-1].parameters()))
    assert m.num_params() == (base.num_params().total + extra, base.num_params().active + extra)
    attn = base.blocks[-1].attn.attn_flops_per_token(16)
    assert m.flops_per_token() == base.flops_per_token() + 6 * (extra + 2 * 64 * 32) + 2 * attn


def test_moe_last_layer_mtp_blocks_balance_and_report():
    m = _model(mtp_depth=1, layers=[{}, {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2,
                                         "aux_free": True}])
    base = _model(layers=[{}, {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2, "aux_free": True}])
    per_expert = 32 * 64 * 2 + 64 * 32                   # gated up + down
    inactive = lambda model: model.num_params().total - model.num_params().active   # noqa: E731
    assert inactive(base) == 2 * per_expert              # 3 routed experts, 1 of them active
    assert inactive(m) == 2 * inactive(base)             # and as many in the MTP block
    x, y = _batch()
    m(x, y)[1].backward()
    m.update_moe_biases()
    stats = m.moe_stats()
    assert set(stats) == {"layer1", "mtp1"} and len(stats["mtp1"]["load"]) == 3
    assert m.mtp[0].block.ffn.bias.abs().sum() > 0       # its aux-free bias moved


def test_checkpoint_save_load_strict_and_old_checkpoints(tmp_path):
    from chimera.checkpoint import load_model, save_checkpoint
    from chimera.data.tokenizers import ByteTokenizer
    m = _model(mtp_depth=1, vocab_size=256)
    tok = ByteTokenizer()
    save_checkpoint(tmp_path / "new", m, model_config=m.cfg.to_dict(), tokenizer=tok.to_dict())
    back, _, _ = load_model(tmp_path / "new")            # strict
    assert back.cfg.mtp_depth == 1 and back.cfg.mtp_lambda == 0.3
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
    assert any(k.startswith("mtp.0.") for k in back.state_dict())
    old = _model(vocab_size=256)                         # a checkpoint from before MTP existed
    cfg = old.cfg.to_dict()
    del cfg["mtp_depth"], cfg["mtp_lambda"]
    save_checkpoint(tmp_path / "old", old, model_config=cfg, tokenizer=tok.to_dict())
    back, _, _ = load_model(tmp_path / "old")
    assert back.mtp is None and all(torch.equal(v, back.state_dict()[k]) for k, v in old.state_dict().items())


def test_hf_export_drops_the_modules_with_a_note(tmp_path):
    from transformers import AutoModelForCausalLM
    from chimera.checkpoint import save_checkpoint
    from chimera.data.tokenizers import ByteTokenizer
    from chimera.hf.convert import export_hf
    from hf_parity import TOL, max_logit_diff, randomize
    m = randomize(_model(mtp_depth=1, vocab_size=256, block_size=32, norm_eps=1e-6)).eval()
    save_checkpoint(tmp_path / "ckpt", m, model_config=m.cfg.to_dict(), tokenizer=ByteTokenizer().to_dict())
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "1 multi-token-prediction module(s) (mtp_depth=1, training-only) are not exported" in readme
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert max_logit_diff(hf, m, 256) <= TOL


# --- training, in-process -----------------------------------------------------------------------
def _plan(data, tmp_path, **kw):
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    d = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=32,
             batch_size=8, total_batch_size_str="8*32", learning_rate=3e-3, warmup_steps=2,
             eval_iters=2, num_threads=1, max_iters=6, log_interval=1, eval=True, eval_interval=6,
             data_dir=str(data), storage_path=str(tmp_path / "runs"), **kw)
    return plan_run(load_train_config(d))


def test_training_logs_the_main_loss_and_the_mtp_loss_apart(train_char_data, tmp_path):
    from chimera.checkpoint import load_model
    from chimera.train.loop import train_fn_per_worker
    plain = train_fn_per_worker(_plan(train_char_data, tmp_path, run_name="plain")
                                .worker_config)["history"]
    mtp0 = train_fn_per_worker(_plan(train_char_data, tmp_path, run_name="lam0", mtp_depth=1,
                                     mtp_lambda=0.0).worker_config)["history"]
    p = _plan(train_char_data, tmp_path, run_name="mtp", mtp_depth=1, save_model=True, ckpt_interval=6)
    mtp = train_fn_per_worker(p.worker_config)["history"]
    logs = [h for h in mtp if "loss" in h]
    assert len(logs) == 6 and all(math.isfinite(h["loss"]) and math.isfinite(h["mtp_loss"]) for h in logs)
    assert all("mtp_loss" not in h for h in plain)
    # with mtp_lambda 0 the main model trains exactly as without MTP: `loss` is the main loss
    for a, b in zip([h for h in plain if "loss" in h], [h for h in mtp0 if "loss" in h]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and "mtp_loss" in b
    # step 1 starts from the same main weights on the same batch: the same main loss (a logged
    # total would be larger by mtp_lambda * mtp_loss, ~1.3 here)
    first = [h for h in plain if "loss" in h][0]
    assert logs[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert logs[0]["mtp_loss"] > 1.0
    evals = [h for h in mtp if "val_loss" in h]
    assert evals and all(math.isfinite(h["val_loss"]) and math.isfinite(h["val_bpb"]) for h in evals)
    assert logs[0]["params_total"] > [h for h in plain if "loss" in h][0]["params_total"]
    model, _, _ = load_model(tmp_path / "runs" / "mtp" / "checkpoint_000006")   # strict
    assert model.cfg.mtp_depth == 1 and len(model.mtp) == 1
    assert json.loads((tmp_path / "runs" / "mtp" / "checkpoint_000006" / "config.json")
                      .read_text())["mtp_depth"] == 1


# --- self-speculative decoding (models/speculative.py) ----------------------------------------
def _trained_on_a_cycle(steps: int = 80, **kw) -> LLM:
    """A tiny MTP model trained on the cycle 0..9: main model and draft both learn it."""
    m = _model(mtp_depth=1, mtp_lambda=1.0, **kw)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = (torch.arange(17) + torch.randint(0, 10, (8, 1), generator=g)) % 10
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_speculative_decoding_gives_the_plain_greedy_tokens_and_accepts_drafts():
    from models.speculative import speculative_generate
    m = _trained_on_a_cycle()
    prompt = torch.tensor([[3, 4, 5], [7, 8, 9]])
    plain = m.generate(prompt, 10, temperature=0.0)
    spec, stats = speculative_generate(m, prompt, 10)
    assert torch.equal(spec, plain) and torch.equal(m.generate(prompt, 10, temperature=0.0,
                                                               speculative=True), plain)
    assert stats["acceptance_rate"] > 0.5 and stats["main_passes"] < 2 * 10  # fewer passes than tokens
    assert stats["accepted"] <= stats["drafted"]


@pytest.mark.parametrize("kw", [dict(), dict(pos_emb="learn", norm="layernorm"),
                                dict(attn="mla", q_latent_dim=16, kv_latent_dim=16, rope_head_dim=4),
                                dict(layers=[{}, {"moe": True, "n_exp": 4, "n_shared": 1, "n_act": 2}]),
                                dict(layers=[{"window": 4}, {"window": 3}]), dict(pos_emb="alibi")])
def test_speculative_equals_plain_on_random_models_past_block_size_with_eos(kw):
    from hf_parity import randomize
    from models.speculative import speculative_generate
    m = randomize(_model(mtp_depth=2, **kw)).eval()
    prompt = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    for n, eos, limit in ((20, None, None), (12, 7, 40)):     # 5 + 20 > block_size 16
        plain = m.generate(prompt, n, temperature=0.0, eos_id=eos, vocab_limit=limit)
        spec, stats = speculative_generate(m, prompt, n, eos_id=eos, vocab_limit=limit)
        assert torch.equal(spec, plain), (kw, n, eos)
        assert stats["drafted"] > 0


def test_speculative_refuses_what_it_cannot_do():
    x = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="mtp_depth=0"):
        _model().generate(x, 4, temperature=0.0, speculative=True)
    with pytest.raises(ValueError, match="temperature must be 0"):
        _model(mtp_depth=1).generate(x, 4, temperature=0.8, speculative=True)
