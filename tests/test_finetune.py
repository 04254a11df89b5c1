"""Fine-tuning runs without Ray (in-process, world size 1): --init_from from a Chimera
checkpoint starts at its val loss and lowers it; a LoRA run trains only the adapters and its
checkpoint loads merged; every bad combination is refused by the run plan, naming the field."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chimera import checkpoint as ckpt
from chimera.train.config import TrainConfigError, load_train_config
from chimera.train.loop import train_fn_per_worker
from chimera.train.plan import plan_run

ROOT = Path(__file__).resolve().parents[1]
# the tiny_checkpoint's run settings (tests/conftest.py) that its val loss depends on
SAME = {"batch_size": 8, "total_batch_size_str": "8*64", "eval_iters": 2}


def _cfg(data, tmp_path, init, name="ft", **kw):
    return load_train_config({"data_dir": str(data), "storage_path": str(tmp_path), "run_name": name,
                              "init_from": str(init), **SAME, **kw})


def test_bad_combinations_are_refused_by_the_config(tiny_checkpoint):
    with pytest.raises(TrainConfigError, match="give init_from .* or resume_from .*, not both"):
        load_train_config({"init_from": str(tiny_checkpoint), "resume_from": str(tiny_checkpoint)})
    with pytest.raises(TrainConfigError, match="lora_rank=4 needs init_from"):
        load_train_config({"lora_rank": 4})
    with pytest.raises(TrainConfigError, match="lora_targets needs lora_rank >= 1"):
        load_train_config({"lora_targets": "c_fc"})
    with pytest.raises(TrainConfigError, match="unknown target 'qproj'; valid targets: c_attn"):
        load_train_config({"lora_rank": 4, "init_from": "x", "lora_targets": "qproj"})
    with pytest.raises(TrainConfigError, match="'w_up' cannot be a target: MoE experts"):
        load_train_config({"lora_rank": 4, "init_from": "x", "lora_targets": "w_up"})
    with pytest.raises(TrainConfigError, match="lora_alpha=0.0 must be > 0"):
        load_train_config({"lora_rank": 4, "init_from": "x", "lora_alpha": 0})


def test_bad_init_is_refused_by_the_plan(tiny_checkpoint, train_char_data, tmp_path):
    d = train_char_data
    with pytest.raises(TrainConfigError, match=r"model flags differ from its config: n_head=8 "
                                               r"\(it has 4\); n_embd=32 \(it has 64\).*only "
                                               r"block_size and dropout may be given"):
        plan_run(_cfg(d, tmp_path, tiny_checkpoint, n_head=8, n_embd=32, dropout=0.1))
    with pytest.raises(TrainConfigError, match="attn='gqa' \\(it has 'mla'\\)"):
        plan_run(_cfg(d, tmp_path, tiny_checkpoint, attn="gqa"))
    with pytest.raises(TrainConfigError, match="block_size=128 is larger than the checkpoint's 64"):
        plan_run(_cfg(d, tmp_path, tiny_checkpoint, block_size=128))
    with pytest.raises(TrainConfigError, match="the layer stack is the init checkpoint's"):
        plan_run(_cfg(d, tmp_path, tiny_checkpoint, layer_configs='[{"attn": "mla"}]'))
    with pytest.raises(TrainConfigError, match="init_from: .*neither a checkpoint directory"):
        plan_run(_cfg(d, tmp_path, tmp_path / "nothing"))
    with pytest.raises(TrainConfigError, match=r"lora_targets: c_attn match no module of this "
                                               r"model \(its targets: c_proj, c_fc, W_dq"):
        plan_run(_cfg(d, tmp_path, tiny_checkpoint, lora_rank=2, lora_targets="c_attn"))
    # a flag equal to the checkpoint's, or one of another mechanism (dropped), is fine
    plan = plan_run(_cfg(d, tmp_path, tiny_checkpoint, n_head=4, n_kv_heads=2, block_size=32,
                         total_batch_size_str="8*32"))
    assert plan.model_config["block_size"] == 32 and plan.train.init_from == str(tiny_checkpoint)


def test_tokenizer_mismatch_is_refused(tiny_checkpoint, tmp_path):
    from chimera.data.prepare import prepare
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh ijklmnop\n" * 4000)
    for tok in ("char", "byte"):
        prepare("shakespeare", sources=[text], tokenizer=tok, out=tmp_path / tok, progress=False,
                log=lambda *_: None)
    with pytest.raises(TrainConfigError, match=r"another tokenizer than the checkpoint's "
                                               r"\(vocab_size: data 18, checkpoint 65\)"):
        plan_run(_cfg(tmp_path / "char", tmp_path, tiny_checkpoint))
    with pytest.raises(TrainConfigError, match=r"the data's tokenizer \(byte, vocab 256\) does not "
                                               r"fit the model's vocab_size=128"):
        plan_run(_cfg(tmp_path / "byte", tmp_path, tiny_checkpoint))


def test_full_finetune_starts_at_the_checkpoint_and_lowers_val_loss(tiny_checkpoint,
                                                                    train_char_data, tmp_path):
    start = ckpt.read_meta(tiny_checkpoint)["val_loss"]
    plan = plan_run(_cfg(train_char_data, tmp_path, tiny_checkpoint, max_iters=20, eval=True,
                         eval_interval=20, learning_rate=3e-3, warmup_steps=2, save_model=True,
                         ckpt_interval=20))
    s = train_fn_per_worker(plan.worker_config)
    evals = [r for r in s["history"] if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(start, abs=1e-5)
    fresh = 4.17                 # ln(65): what an untrained model starts at (not this run)
    assert start < fresh - 0.5
    assert evals[-1]["val_loss"] < start - 0.02
    assert s["init_from"] == str(tiny_checkpoint)
    meta = json.loads((Path(s["last_checkpoint"]) / "meta.json").read_text())
    assert meta["init_from"] == str(tiny_checkpoint)
    assert not (Path(s["last_checkpoint"]) / ckpt.ADAPTER).exists()


def test_lora_run_trains_only_the_adapters(tiny_checkpoint, train_char_data, tmp_path):
    base, _, _ = ckpt.load_model(tiny_checkpoint)
    sha = ckpt.weights_sha256(base)
    plan = plan_run(_cfg(train_char_data, tmp_path, tiny_checkpoint, max_iters=20, eval=True,
                         eval_interval=20, learning_rate=1e-2, warmup_steps=2, save_model=True,
                         ckpt_interval=20, lora_rank=4, lora_alpha=8,
                         lora_targets="W_uk,W_uv,c_fc"))
    s = train_fn_per_worker(plan.worker_config)
    evals = [r for r in s["history"] if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    out = Path(s["last_checkpoint"])
    info = json.loads((out / ckpt.ADAPTER).read_text())
    assert info == {"rank": 4, "alpha": 8.0, "targets": ["c_fc", "W_uk", "W_uv"],
                    "base": str(tiny_checkpoint), "base_sha256": sha}
    from safetensors.torch import load_file
    stored, sd = load_file(str(out / ckpt.WEIGHTS)), base.state_dict()
    assert set(stored) <= set(sd) and not any("lora" in k for k in stored)
    for k, v in stored.items():                                   # every base tensor equal
        assert torch.equal(v, sd[k]), k
    adapters = load_file(str(out / ckpt.ADAPTER_WEIGHTS))
    assert len(adapters) == 2 * 3 * 2                             # 2 layers x 3 targets x (A, B)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))   # changed
    merged, _, _ = ckpt.load_model(out)
    x = torch.randint(0, 65, (2, 32))
    assert (merged(x)[0] - base(x)[0]).abs().max() > 1e-4         # the adapters do something
    again, _, _ = ckpt.load_model(tiny_checkpoint, adapter=out)  # base + adapter, as served
    assert torch.equal(merged.generate(x[:, :4], 16, temperature=0.0),
                       again.generate(x[:, :4], 16, temperature=0.0))


def test_serve_refuses_an_adapter_on_the_wrong_base(tiny_checkpoint, tmp_path):
    """jobs/serve.py --adapter: the base sha256 is checked before Serve (or Ray) starts."""
    from models import lora
    base, tok, _ = ckpt.load_model(tiny_checkpoint)
    adapted = ckpt.load_model(tiny_checkpoint)[0]
    lora.apply_lora(adapted, 2, 4.0, "c_fc")
    other = ckpt.save_checkpoint(tmp_path / "other", adapted, model_config=base.cfg.to_dict(),
                                 tokenizer=tok.to_dict(),
                                 adapter={"rank": 2, "alpha": 4.0, "targets": ["c_fc"],
                                          "base": "elsewhere", "base_sha256": "0" * 64})
    def serve_job(*args):
        r = subprocess.run([sys.executable, "jobs/serve.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=180)
        assert "Started a local Ray instance" not in r.stderr + r.stdout
        return r.returncode, r.stderr
    rc, err = serve_job("--checkpoint", str(tiny_checkpoint), "--adapter", str(other))
    assert rc == 2 and "was trained on base weights with sha256 0000000000000000..." in err, err
    rc, err = serve_job("--checkpoint", str(tiny_checkpoint), "--checkpoint", f"b={tiny_checkpoint}",
                        "--adapter", str(other))
    assert rc == 2 and "--adapter needs exactly one --checkpoint" in err, err


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, train_char_data, shakespeare_path) -> Path:
    """A tiny Llama trained a little by transformers itself on Tiny Shakespeare's characters
    (so that its loss is far below a fresh model's ln 65 = 4.17), saved as an HF folder."""
    import transformers
    from chimera.data.shards import read_manifest
    from chimera.data.tokenizers import Tokenizer
    tok = Tokenizer.from_dict(read_manifest(train_char_data)["tokenizer"])
    ids = torch.tensor(tok.encode(shakespeare_path.read_text()[:200_000]))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        x = ids[starts.unsqueeze(1) + torch.arange(33)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.3
    out = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(out)
    return out


def test_finetune_from_an_imported_hf_model_lowers_val_loss(hf_llama, train_char_data, tmp_path):
    """--init_from hf:PATH through the real converter: the run starts at the HF model's loss
    (not at a fresh model's) and lowers it; its checkpoint records the source."""
    plan = plan_run(_cfg(train_char_data, tmp_path, f"hf:{hf_llama}", block_size=32,
                         total_batch_size_str="8*32", max_iters=30, eval=True, eval_interval=30,
                         learning_rate=3e-3, warmup_steps=2, save_model=True, ckpt_interval=30))
    assert plan.train.init_from == f"hf:{hf_llama}" and plan.model_config["block_size"] == 32
    assert plan.model_config["tie_embeddings"] is False and plan.model_config["norm"] == "rmsnorm"
    s = train_fn_per_worker(plan.worker_config)
    evals = [r for r in s["history"] if "val_loss" in r]
    fresh = 4.17                 # ln(65): an untrained model's loss
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] < fresh - 0.8
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.05
    meta = json.loads((Path(s["last_checkpoint"]) / "meta.json").read_text())
    assert meta["init_from"] == f"hf:{hf_llama}"


def test_lora_from_an_imported_hf_model_keeps_the_base(hf_llama, train_char_data, tmp_path):
    plan = plan_run(_cfg(train_char_data, tmp_path, f"hf:{hf_llama}", name="ft-lora", block_size=32,
                         total_batch_size_str="8*32", max_iters=4, eval=True, eval_interval=4,
                         lora_rank=2, save_model=True, ckpt_interval=4))
    s = train_fn_per_worker(plan.worker_config)
    from chimera.hf.convert import import_hf
    from models import LLM, ModelConfig
    cfg, state, _ = import_hf(str(hf_llama), block_size=32)
    base = LLM(ModelConfig.from_dict(cfg))
    base.load_state_dict(state, strict=True)
    last = Path(s["last_checkpoint"])
    info = json.loads((last / ckpt.ADAPTER).read_text())
    assert info["base"] == f"hf:{hf_llama}" and info["base_sha256"] == ckpt.weights_sha256(base)
    # the export of the LoRA checkpoint (merged weights) answers as the unmerged adapter model
    from transformers import AutoModelForCausalLM
    from chimera.hf.convert import export_hf
    from models import lora
    adapted = LLM(ModelConfig.from_dict(ckpt.read_config(last)))
    lora.apply_lora(adapted, info["rank"], info["alpha"], info["targets"])
    ckpt.load_weights(adapted, last)
    adapted.eval()
    assert any(b.abs().sum() > 0 for n, b in adapted.named_parameters() if n.endswith("lora_B"))
    export_hf(str(last), str(tmp_path / "merged_hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 65, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - adapted(ids)[0]).abs().max().item() <= 1e-4
        assert (hf(ids).logits - base(ids)[0]).abs().max().item() > 1e-3     # the adapters matter


def test_an_hf_folder_of_another_architecture_is_refused_by_the_plan(train_char_data, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(TrainConfigError, match=r"init_from='hf:.*bert.*(gpt2|llama)"):
        plan_run(_cfg(train_char_data, tmp_path, f"hf:{folder}"))
    with pytest.raises(TrainConfigError, match=r"init_from='hf:"):
        plan_run(_cfg(train_char_data, tmp_path, f"hf:{tmp_path / 'missing'}"))


def test_served_base_plus_adapter_answers_as_the_merged_model(tiny_checkpoint, tmp_path):
    """The replica's ModelServer(checkpoint=BASE, adapter=LORA) over real HTTP (uvicorn, as
    tests/test_serve_openai.py serves it): greedy completion == the merged model's greedy."""
    import threading
    import time

    import httpx
    import uvicorn

    from chimera.localcluster import free_port
    from models import lora
    from serve.backends import Local
    from serve.frontend import Frontend, make_api
    from serve.server import ModelServer
    base, tok, _ = ckpt.load_model(tiny_checkpoint)
    m, _, _ = ckpt.load_model(tiny_checkpoint)
    targets = lora.apply_lora(m, 4, 8.0, "W_uk,W_uv,c_fc")
    torch.manual_seed(0)
    for _, mod in lora.adapted(m):
        torch.nn.init.normal_(mod.lora_B, std=0.3)
    out = ckpt.save_checkpoint(tmp_path / "lora", m, model_config=m.cfg.to_dict(), tokenizer=tok.to_dict(),
                               adapter={"rank": 4, "alpha": 8.0, "targets": list(targets),
                                        "base": str(tiny_checkpoint),
                                        "base_sha256": ckpt.weights_sha256(base)})
    merged, _, _ = ckpt.load_model(out)
    front = Frontend({"ft": Local(ModelServer("ft", str(tiny_checkpoint), max_batch=2, metrics=False,
                                              adapter=str(out)))}, 100, 1 << 16)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_api(lambda: front), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        while not server.started:
            time.sleep(0.05)
        prompt = "ROMEO:\nWhat"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"model": "ft", "prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        ids = torch.tensor([tok.encode(prompt)])
        want = [merged.generate(ids, 16, temperature=0.0, vocab_limit=tok.vocab_size)[0, ids.size(1):].tolist(),
                base.generate(ids, 16, temperature=0.0, vocab_limit=tok.vocab_size)[0, ids.size(1):].tolist()]
        assert want[0] != want[1]                          # the adapter changes the answer
        assert r.json()["choices"][0]["text"] == tok.decode(want[0])
    finally:
        server.should_exit = True
        t.join(10)
