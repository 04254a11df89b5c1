"""chimera.hf export: Chimera checkpoints of each family (random weights, one trained a few
steps) written with export_hf load in transformers with the same logits (<= 1e-4, fp32) and
the same greedy tokens, with a tokenizer AutoTokenizer loads and that encodes like Chimera's.
Stacks no family can express, a non-empty --out and a bad --format are refused (jobs/export.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_parity import TOL, greedy_both, max_logit_diff, randomize

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "You are all resolved rather to die than to famish?\n")
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None, "attention_factor": None,
        "truncate": True}
BASE = {"n_embd": 64, "n_layer": 2, "block_size": 64, "n_head": 4, "moe": False}
GPT2_LIKE = {**BASE, "pos_emb": "learn", "norm": "layernorm", "attn": "mha", "up_dim": 128,
             "non_linearity": "gelu_tanh", "bias": "all", "norm_eps": 1e-5}
LLAMA_LIKE = {**BASE, "pos_emb": "rope", "norm": "rmsnorm", "attn": "gqa", "n_kv_heads": 2,
              "up_dim": 96, "non_linearity": "swiglu", "norm_eps": 1e-6}
FAMILIES = {   # name: (model config, tokenizer, HF architecture, optimizer steps before saving)
    "gpt2-char-untied-trained": ({**GPT2_LIKE, "tie_embeddings": False}, "char", "GPT2LMHeadModel", 5),
    "gpt2-gelu-nobias-byte": ({**GPT2_LIKE, "non_linearity": "gelu", "bias": "none"}, "byte",
                              "GPT2LMHeadModel", 0),
    "llama-attnbias-llama3-char-trained": ({**LLAMA_LIKE, "bias": "attn", "rope_theta": 50000.0,
                                            "rope_scaling": LLAMA3}, "char", "LlamaForCausalLM", 5),
    "llama-all-yarn-untied-byte": ({**LLAMA_LIKE, "bias": "all", "rope_scaling": YARN,
                                    "tie_embeddings": False, "attn": "mqa"}, "byte", "LlamaForCausalLM", 0),
    "qwen2-qkv-char": ({**LLAMA_LIKE, "bias": "qkv"}, "char", "LlamaForCausalLM", 0),
    # chimera.hf.deepseek's own tests cover that family in depth; these check that export_hf
    # dispatches trained MLA+MoE checkpoints to it: V3 (sigmoid routing, a dense first layer)
    # and V2 (softmax routing, no renormalisation, routed scaling, group-limited)
    "deepseek-v3-byte-trained": ({**LLAMA_LIKE, "attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16,
                                  "rope_head_dim": 8, "n_layer": None, "layers": [
                                      {"moe": False, "up_dim": 48},
                                      {"moe": True, "n_exp": 5, "n_shared": 1, "n_act": 3,
                                       "aux_free": True, "up_dim": 32}]},
                                 "byte", "DeepseekV3ForCausalLM", 5),
    "deepseek-v2-char-trained": ({**LLAMA_LIKE, "attn": "mla", "q_latent_dim": None, "kv_latent_dim": 16,
                                  "rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 20,
                                  "moe": True, "n_exp": 9, "n_shared": 1, "n_act": 3, "aux_free": False,
                                  "norm_topk_prob": False, "routed_scaling_factor": 2.0, "n_group": 4,
                                  "topk_group": 2, "up_dim": 32, "tie_embeddings": False},
                                 "char", "DeepseekV2ForCausalLM", 5),
}


def _tokenizer(name: str):
    from chimera.data.tokenizers import CharTokenizer, get_tokenizer
    return CharTokenizer.from_text(TEXT) if name == "char" else get_tokenizer(name)


def _checkpoint(path: Path, cfg: dict, tok, steps: int = 0):
    """A Chimera checkpoint with random weights; `steps` AdamW steps on random tokens first
    (a trained checkpoint's weights, optimizer moments aside)."""
    from chimera.checkpoint import save_checkpoint
    from models import LLM, ModelConfig
    from models.config import pad_vocab

    torch.manual_seed(0)
    cfg = {k: v for k, v in cfg.items() if v is not None}           # n_layer None: from `layers`
    model = randomize(LLM(ModelConfig.from_dict({**cfg, "vocab_size": pad_vocab(tok.vocab_size)})))
    if steps:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            x = torch.randint(0, tok.vocab_size, (4, 17))
            _, loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    save_checkpoint(path, model, model_config=model.cfg.to_dict(), tokenizer=tok.to_dict(),
                    meta={"step": steps})
    return model


@pytest.mark.parametrize("case", list(FAMILIES))
def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from chimera.hf.convert import export_hf, import_hf

    cfg, tok_name, arch, steps = FAMILIES[case]
    tok = _tokenizer(tok_name)
    model = _checkpoint(tmp_path / "ckpt", cfg, tok, steps)
    out = tmp_path / "hf"
    assert export_hf(str(tmp_path / "ckpt"), str(out)) == str(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    V = model.cfg.vocab_size
    assert max_logit_diff(hf, model, V) <= TOL
    ref, cached, uncached = greedy_both(hf, model, V)
    assert cached == ref and uncached == ref
    # the tokenizer: AutoTokenizer loads it; same ids both ways, and back to the text
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = TEXT[:80] if tok_name == "char" else TEXT + "ünïcödé 你好 😀"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert "Tokenizer: Chimera's" in (out / "README.md").read_text()
    # and back: the same config and weights (import of our own export)
    back_cfg, back_state, back_tok = import_hf(str(out))
    from models import ModelConfig
    want = model.cfg.to_dict()
    if arch == "GPT2LMHeadModel":
        want["bias"] = "all"                       # GPT-2 always has biases: zeros where Chimera had none
    if cfg.get("bias") == "qkv":
        want["bias"] = "attn"                      # exported as Llama attention_bias, o_proj bias zero
    assert ModelConfig.from_dict(back_cfg).to_dict() == want
    mine = model.state_dict()
    assert set(mine) <= set(back_state) and all(torch.equal(back_state[k], mine[k]) for k in mine)
    assert all(k.endswith(".bias") and not back_state[k].any() for k in set(back_state) - set(mine))
    assert back_tok is None                        # char / byte: not Chimera's gpt2


def test_gpt2_tokenizer_export_encodes_like_tiktoken_and_imports_back(tmp_path, tiktoken_cache):
    from transformers import AutoTokenizer
    from chimera.data.tokenizers import get_tokenizer
    from chimera.hf.convert import export_hf, import_hf

    tok = get_tokenizer("gpt2")
    _checkpoint(tmp_path / "ckpt", {**GPT2_LIKE, "n_layer": 1}, tok)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXT + "  don't 12345 ünïcödé 你好 😀\r\n\t x"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.encode("a<|endoftext|>b", add_special_tokens=False) == tok.encode_with_special("a<|endoftext|>b")
    assert hf_tok.eos_token_id == tok.eot_id == 50256
    assert import_hf(str(tmp_path / "hf"))[2] == tok.to_dict()


def test_stacks_no_family_fits_are_refused_naming_the_layers():
    from chimera.hf.convert import family_for
    from models import ModelConfig

    mixed = ModelConfig.from_dict({**LLAMA_LIKE, "layers": [
        {"attn": "gqa"}, {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 8}]})
    with pytest.raises(ValueError, match=r"(?s)gpt2: pos_emb=rope.*llama: layers\[1\]: mla attention "
                                         r"\(llama needs gqa/mha/mqa\)"):
        family_for(mixed)
    kv = ModelConfig.from_dict({**LLAMA_LIKE, "n_layer": 3, "layers": [{}, {"n_kv_heads": 1}, {"n_kv_heads": 1}]})
    with pytest.raises(ValueError, match=r"layers\[1\], layers\[2\]: n_kv_heads=1 but layers\[0\] has "
                                         r"n_kv_heads=2"):
        family_for(kv)
    windowed = ModelConfig.from_dict({**LLAMA_LIKE, "n_layer": 2, "layers": [{}, {"window": 4}]})
    with pytest.raises(ValueError, match=r"llama: layers\[1\]: window=4 \(llama has no sliding-window attention\)"):
        family_for(windowed)
    assert family_for(ModelConfig.from_dict(LLAMA_LIKE)).__name__ == "chimera.hf.llama"


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path):
    from chimera.hf.convert import export_hf

    _checkpoint(tmp_path / "ckpt", {**LLAMA_LIKE, "n_layer": 1}, _tokenizer("byte"))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty .*--overwrite"):
        export_hf(str(tmp_path / "ckpt"), str(out))
    export_hf(str(tmp_path / "ckpt"), str(out), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging left


def test_export_to_an_object_store_uri(tmp_path, s3_prefix):
    from transformers import AutoModelForCausalLM
    from chimera import storage
    from chimera.hf.convert import export_hf

    model = _checkpoint(tmp_path / "ckpt", {**LLAMA_LIKE, "n_layer": 1}, _tokenizer("byte"))
    uri = f"{s3_prefix}/hf"
    export_hf(str(tmp_path / "ckpt"), uri)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(storage.listdir(uri))
    local = storage.download_dir(uri, tmp_path / "down")
    hf = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    assert max_logit_diff(hf, model, model.cfg.vocab_size) <= TOL
    with pytest.raises(ValueError, match="not empty"):
        export_hf(str(tmp_path / "ckpt"), uri)


def _job(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/export.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _main(argv: list[str]) -> int:
    """jobs/export.py's main() in this process (transformers is already imported here)."""
    import importlib.util
    sys.path.append(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("export_job", ROOT / "jobs" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_export_job(tmp_path, capsys):
    """jobs/export.py: a bad --format and a misfit stack as a user runs it (subprocesses: exit 2
    and the reason), then a non-empty --out and a successful export through its main()."""
    _checkpoint(tmp_path / "mixed", {**LLAMA_LIKE, "layers": [
        {"attn": "gqa"}, {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 16, "rope_head_dim": 8}]},
        _tokenizer("byte"))
    r = _job("--checkpoint", str(tmp_path / "mixed"), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "invalid choice: 'onnx' (choose from 'hf')" in r.stderr, r.stderr
    r = _job("--checkpoint", str(tmp_path / "mixed"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "layers[1]: mla attention (llama needs gqa/mha/mqa)" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    _checkpoint(tmp_path / "ok", {**LLAMA_LIKE, "n_layer": 1}, _tokenizer("byte"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    capsys.readouterr()
    assert _main(["--checkpoint", str(tmp_path / "ok"), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty (pass --overwrite" in capsys.readouterr().err
    assert _main(["--checkpoint", str(tmp_path / "ok"), "--format", "hf", "--out",
                  str(tmp_path / "busy"), "--overwrite"]) == 0
    assert "as LlamaForCausalLM to" in capsys.readouterr().out
    assert (tmp_path / "busy" / "model.safetensors").is_file()


def test_a_missing_family_module_is_skipped_but_a_broken_one_raises(monkeypatch):
    import importlib
    from chimera.hf import convert

    real = importlib.import_module

    def fake(name, missing):
        if name == "chimera.hf.deepseek":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name)

    monkeypatch.setattr(convert.importlib, "import_module", lambda n: fake(n, "chimera.hf.deepseek"))
    assert [f.__name__ for f in convert.families()] == ["chimera.hf.gpt2", "chimera.hf.llama"]
    monkeypatch.setattr(convert.importlib, "import_module", lambda n: fake(n, "some_dependency"))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        convert.families()
