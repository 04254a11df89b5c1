"""The sweep's "decode tok/s": batch-1 generation by the serving engine (serve/engine.py, the
KV cache, the scheduler, the sampler) from a trial's checkpoint, loaded by
chimera.checkpoint.load_model as a Serve replica loads it.

    from chimera.sweep.measure import measure_decode
    tok_s = measure_decode("sweeps/s1/runs/t0/llm_model_best", tokens=32)   # one CPU thread

A short warm-up request runs first (first-call allocations, the scratch cache), then one
timed request of `tokens` new tokens (at most block_size - 1, so the window never slides),
temperature 1, seed 0. The engine gets no tokenizer: an end-of-text token does not end the
timed request early, so every trial times the same number of tokens (detokenisation is the
same work for every architecture). On CPU the measurement uses one torch thread, so that
every trial of a sweep is timed the same way whatever the actor's CPU count.
"""
from __future__ import annotations

import time
from pathlib import Path


def measure_decode(ckpt_dir: str | Path, tokens: int, device: str = "cpu") -> float:
    """Tokens/s of batch-1 KV-cached generation by the serving engine from a checkpoint."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _decode(ckpt_dir, tokens, device)
    finally:
        torch.set_num_threads(threads)


def _decode(ckpt_dir: str | Path, tokens: int, device: str) -> float:
    from chimera.checkpoint import load_model
    from models.sampling import SamplingParams
    from serve.engine import Engine

    model, _, _ = load_model(ckpt_dir, device)
    engine = Engine(model, max_batch=1)
    n = max(1, min(tokens, model.cfg.block_size - 1))
    engine.run({"warm-up": ([0], SamplingParams(min(4, n), temperature=1.0, seed=0))})
    t0 = time.perf_counter()
    done = engine.run({"timed": ([0], SamplingParams(n, temperature=1.0, seed=0))})["timed"]
    # each step ends with the sampled ids on the host (.tolist()): the device is done
    return len(done.token_ids) / (time.perf_counter() - t0)
