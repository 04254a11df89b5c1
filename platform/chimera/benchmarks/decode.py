"""The decode rows of `python jobs/bench.py models` (chimera/benchmarks/models.py calls them).

  * Bandwidth fraction: (bytes a batch-1 decode step must read per token: the active weights
    and the KV cache of the context it attends × tokens/s) ÷ this machine's read bandwidth
    measured in the same run (torch.sum over 256 MB, best of 5), for GQA, MLA and
    configs/hetero.jsonl at n_embd 384, per decode mode (models/decode.py) side by side, with
    the compiled step's compile time. The static step reads every cache slot, not only the
    filled ones; the row counts the bytes a step needs, the same for every mode.
  * Peer: Chimera tokens/s ÷ `transformers` generate (greedy, KV cache) on the same
    Llama-shaped weights (chimera.hf.llama.to_hf), batch 1 and 8, with a check that both
    produce identical tokens.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from models import LLM, ModelConfig

HETERO = Path(__file__).resolve().parents[3] / "configs" / "hetero.jsonl"
PROMPT = 16
MODES = ("eager", "static", "compiled")


def read_bandwidth(device: str, mb: int = 256) -> float:
    """Bytes/s of torch.sum over an fp32 tensor of `mb` MB, best of 5 (after one warm-up)."""
    x = torch.ones(mb * 2 ** 20 // 4, device=device)
    best = float("inf")
    for i in range(6):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_bytes(model: LLM, new_tokens: int) -> float:
    """Bytes one batch-1 decode step must read, averaged over the steps of a generate(PROMPT
    tokens, new_tokens): every active weight once (embedding rows and position tables are
    lookups: left out unless tied to the LM head) plus each layer's KV entries of the context
    it attends (a sliding-window layer at most its window)."""
    elem = next(model.parameters()).element_size()
    n = model.num_params().active
    if model.pos is not None and model.pos.kind == "learn":
        n -= model.pos.wpe.weight.numel()
    if not model.cfg.tie_embeddings:
        n -= model.wte.weight.numel()
    lengths = range(PROMPT + 1, PROMPT + new_tokens)                # context of each decode step
    kv = statistics.mean(sum(b.attn.kv_values_per_token() * min(L, b.attn.cache_len)
                             for b in model.blocks) for L in lengths)
    return elem * (n + kv)


def decode_models(base: dict) -> dict[str, ModelConfig]:
    gqa = {**base, "vocab_size": 65, "block_size": 512, "attn": "gqa", "n_kv_heads": 2}
    mla = {**base, "vocab_size": 65, "block_size": 512, "attn": "mla", "q_latent_dim": 192,
           "kv_latent_dim": 128, "rope_head_dim": 32, "pos_emb": "rope"}
    return {"gqa": ModelConfig.from_dict(gqa), "mla": ModelConfig.from_dict(mla),
            "hetero.jsonl": ModelConfig.from_layer_file(
                HETERO, n_embd=base["n_embd"], vocab_size=65, block_size=512, pos_emb="rope")}


def _gen(model, prompt, n, mode) -> torch.Tensor:
    return model.generate(prompt, n, temperature=0.0, decode=mode)


def bandwidth_rows(base: dict, device: str, new_tokens: int, repeats: int) -> list[tuple[str, str, str]]:
    bw = read_bandwidth(device)
    rows = [("read bandwidth, torch.sum over 256 MB (reference)", f"{bw / 1e9:,.1f} GB/s", "")]
    for label, cfg in decode_models(base).items():
        torch.manual_seed(0)
        model = LLM(cfg).to(device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
        t0 = time.perf_counter()
        _gen(model, prompt, 3, "compiled")                          # compiles the step
        compile_s = time.perf_counter() - t0
        out, times = {}, {m: [] for m in MODES}
        for m in MODES:
            _gen(model, prompt, 8, m)                               # warm-up
        for _ in range(repeats):                                    # interleaved
            for m in MODES:
                _sync(device)
                t0 = time.perf_counter()
                out[m] = _gen(model, prompt, new_tokens, m)
                _sync(device)
                times[m].append(time.perf_counter() - t0)
        need = step_bytes(model, new_tokens)
        tok_s = {m: new_tokens / statistics.median(t) for m, t in times.items()}
        same = all(torch.equal(out[m], out["eager"]) for m in MODES)
        cells = ", ".join(f"{m} {need * tok_s[m] / bw:.2f} ({tok_s[m]:,.0f} tok/s)" for m in MODES)
        rows.append((f"bandwidth fraction, batch 1, {label} ({cfg.summary()}, {need / 1e6:.1f} MB/token)",
                     f"{cells}; compile {compile_s:.1f} s; identical tokens: {'yes' if same else 'NO'}",
                     "≥ 0.6"))
    return rows


def llama_pair(base: dict, device: str):
    """A Llama-shaped Chimera model (rope, rmsnorm, swiglu, gqa) and the HF LlamaForCausalLM
    holding the same weights."""
    from transformers import AutoModelForCausalLM

    from chimera.hf.llama import to_hf
    cfg = ModelConfig.from_dict({**base, "vocab_size": 65, "block_size": 512, "attn": "gqa",
                                 "n_kv_heads": 2, "pos_emb": "rope", "norm": "rmsnorm",
                                 "non_linearity": "swiglu", "up_dim": 1024})
    torch.manual_seed(0)
    model = LLM(cfg).to(device).eval()
    hf_cfg, sd = to_hf(cfg, model.state_dict())
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    hf.load_state_dict(sd, strict=True)
    return model, hf.to(device).eval()


def peer_rows(base: dict, device: str, new_tokens: int, repeats: int, modes) -> list[tuple[str, str, str]]:
    model, hf = llama_pair(base, device)
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, 65, (batch, PROMPT), generator=torch.Generator().manual_seed(2)).to(device)

        def theirs():
            with torch.no_grad():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=0, eos_token_id=None)
        fns = {"transformers": theirs, **{m: (lambda m=m: _gen(model, prompt, new_tokens, m)) for m in modes}}
        out, times = {}, {k: [] for k in fns}
        for f in fns.values():
            f()                                                     # warm-up (and compile)
        for _ in range(repeats):
            for k, f in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                out[k] = f()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
        tok_s = {k: batch * new_tokens / statistics.median(t) for k, t in times.items()}
        for m in modes:
            same = torch.equal(out[m].cpu(), out["transformers"].cpu())
            rows.append((f"peer: Chimera {m} ÷ transformers generate tok/s, batch {batch}",
                         f"{tok_s[m] / tok_s['transformers']:.2f}  ({tok_s[m]:,.0f} vs "
                         f"{tok_s['transformers']:,.0f} tok/s; identical tokens: {'yes' if same else 'NO'})",
                         "≥ 1.5" if batch == 1 else ""))
    return rows


def profile_table(base: dict, device: str, mode: str, steps: int = 64, top: int = 12) -> str:
    """torch.profiler's top ops (self CPU time) over `steps` batch-1 decode steps of the GQA model."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = LLM(decode_models(base)["gqa"]).to(device).eval()
    prompt = torch.randint(0, 65, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    _gen(model, prompt, 8, mode)                                    # warm-up (and compile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _gen(model, prompt, steps, mode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
