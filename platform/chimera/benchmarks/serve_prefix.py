"""The prefix-cache rows of `python jobs/bench.py serve` (chimera/benchmarks/serve.py runs them).

Multiple-choice scoring the way lm-eval does it: each item is a 200-token context from Tiny
Shakespeare followed by 4 endings of 10 tokens, and each (context + ending) is scored through
`/v1/completions` with `echo: true, max_tokens: 0, logprobs: 1` (token-id prompts; one item's
4 prompts per request, as lm-eval batches them). Throughput (items/s) with the prefix cache ÷
without it, on the same Serve app deployed twice in one run (`prefix_cache_bytes` on, then
off), and the same ratio for the in-process engine (serve/engine.py, same items, same torch
threads), which also checks that both engines give the same prompt logprobs. Both for the
bench's trained checkpoint (4 layers, n_embd 128: 1 M parameters, where formatting the echo
response costs more than the model) and for the issue's 6L/384 GQA shape with random weights.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

CONTEXT, ENDINGS, ENDING = 200, 4, 10
PREFIX_BYTES = 256 << 20


def items(tok, text: str, n: int, seed: int = 0) -> list[list[list[int]]]:
    """n items: ENDINGS token-id prompts each, sharing a CONTEXT-token context."""
    ids = tok.encode(text[:400_000])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(0, len(ids) - CONTEXT - ENDING)
        ctx = ids[a:a + CONTEXT]
        ends = []
        for _ in range(ENDINGS):
            b = rng.randrange(0, len(ids) - ENDING)
            ends.append(ctx + ids[b:b + ENDING])
        out.append(ends)
    return out


def engine_rate(model, tok, its, prefix_bytes: int) -> tuple[float, list, tuple[int, int]]:
    """(items/s, the prompt logprobs of every prompt, (prefix queries, hits)) in-process."""
    from models.sampling import SamplingParams
    from serve.engine import Engine
    engine = Engine(model, tok, max_batch=16, prefix_cache_bytes=prefix_bytes)
    scores: dict[str, list] = {}
    t0 = time.perf_counter()
    for i, prompts in enumerate(its):
        for j, p in enumerate(prompts):
            engine.add(f"{i}.{j}", p, SamplingParams(1, 0.0), prompt_logprobs=1, generate=False)
    while engine.has_work():
        for o in engine.step():
            if o.prompt_logprobs is not None:
                scores[o.request_id] = [x.logprob for x in o.prompt_logprobs[1:]]
    rate = len(its) / (time.perf_counter() - t0)
    return rate, [scores[k] for k in sorted(scores)], engine.prefix_cache_counts()


def http_rate(url: str, its, conc: int) -> float:
    """Items/s through POST /v1/completions (echo scoring), `conc` requests in flight."""
    import httpx
    local = threading.local()

    def one(prompts):
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=600)
        r = local.c.post(url + "/v1/completions", json={
            "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0.0})
        r.raise_for_status()
        assert len(r.json()["choices"]) == len(prompts)
    one(its[0])                                                 # warm-up (not timed)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, its[1:]))
    return (len(its) - 1) / (time.perf_counter() - t0)


def wide_checkpoint(ckpt, out):
    """The issue's reference shape (6 layers of GQA, n_embd 384, 9.6 M parameters) with random
    weights and `ckpt`'s tokenizer: scoring throughput does not depend on training, and at the
    bench model's 1 M parameters the echo response's formatting, not the model, dominates."""
    import json

    import torch

    from chimera.checkpoint import read_config, resolve_checkpoint, save_checkpoint
    from models import LLM, ModelConfig
    src = resolve_checkpoint(ckpt)
    layer = {"attn": "gqa", "n_head": 6, "n_kv_heads": 2, "moe": False, "up_dim": 1024,
             "non_linearity": "swiglu", "dropout": 0.0}
    cfg = {**read_config(src), "n_layer": 6, "n_embd": 384, "layers": [layer] * 6}
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_dict(cfg))
    return save_checkpoint(out, model, model_config=cfg,
                           tokenizer=json.loads((src / "tokenizer.json").read_text()),
                           meta={"note": "random weights: serve benchmark only"})


def _rows(ckpt, label: str, text: str, threads: int, n_items: int, deploy) -> list[tuple]:
    import torch

    from chimera.checkpoint import load_model
    torch.set_num_threads(threads)
    model, tok, _ = load_model(ckpt)
    if model.cfg.block_size < CONTEXT + ENDING:
        return [(f"prefix cache ({label}): multiple-choice scoring", f"skipped: block_size "
                 f"{model.cfg.block_size} < {CONTEXT + ENDING}", ">= 2", False)]
    its = items(tok, text, n_items)
    engine_rate(model, tok, its[:2], 0)                         # warm-up
    off, s_off, _ = engine_rate(model, tok, its, 0)
    on, s_on, (q, h) = engine_rate(model, tok, its, PREFIX_BYTES)
    off = max(off, engine_rate(model, tok, its, 0)[0])          # interleaved: best of two each
    on = max(on, engine_rate(model, tok, its, PREFIX_BYTES)[0])
    diff = max(abs(a - b) for x, y in zip(s_on, s_off) for a, b in zip(x, y))
    inproc = (f"prefix cache, in-process engine ({label}): MC scoring items/s with ÷ without",
              f"{on / off:.2f}  ({on:.1f} vs {off:.1f} items/s; hits {h}/{q} prompt tokens; "
              f"max |Δ logprob| {diff:.1e})", ">= 2", on / off >= 2)
    del model
    rates: dict[int, float] = {}
    for b in (0, PREFIX_BYTES, 0, PREFIX_BYTES):                # interleaved: best of two each
        r = http_rate(deploy(b, ckpt), its, 4)
        rates[b] = max(rates.get(b, 0.0), r)
    ratio = rates[PREFIX_BYTES] / rates[0]
    http = (f"prefix cache ({label}): MC scoring items/s via /v1/completions echo, with ÷ without",
            f"{ratio:.2f}  ({rates[PREFIX_BYTES]:.1f} vs {rates[0]:.1f} items/s, {len(its) - 1} "
            f"items x {ENDINGS} endings, {CONTEXT}+{ENDING} tokens, conc 4)", ">= 2", ratio >= 2)
    return [http, inproc]


def rows(ckpt, tmp, text: str, threads: int, quick: bool, deploy) -> list[tuple]:
    """The benchmark rows, for the bench checkpoint and for the 6L/384 shape (random weights);
    `deploy(prefix_cache_bytes, checkpoint)` (re)deploys the Serve app -> its URL."""
    wide = wide_checkpoint(ckpt, tmp / "wide_6x384")
    return (_rows(ckpt, "bench model, 4L/128", text, threads, 12 if quick else 48, deploy)
            + _rows(wide, "6L/384 GQA, random weights", text, threads, 8 if quick else 24, deploy))
