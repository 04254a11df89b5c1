"""How fast a trained trial decodes: tokens/s of batch-1 KV-cached sampling from its best
checkpoint, the sweep report's "decode tok/s" column.

    measure_decode("runs/exp1-tiny/runs/t000/llm_model_best", tokens=32)
"""
from __future__ import annotations

import time
from pathlib import Path


def measure_decode(ckpt_dir: str | Path, tokens: int, device: str = "cpu") -> float:
    """Tokens/s of batch-1 KV-cached sampling from a checkpoint (after a short warm-up), on
    one CPU thread by default, so that every trial of a sweep is timed the same way."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return _decode(ckpt_dir, tokens, device, torch)
    finally:
        torch.set_num_threads(threads)


def _decode(ckpt_dir, tokens, device, torch) -> float:
    from chimera.checkpoint import load_model
    model, _, _ = load_model(ckpt_dir, device)
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    n = max(1, min(tokens, model.cfg.block_size - 1))
    model.generate(idx, min(4, n), temperature=1.0, generator=g)              # warm-up
    t0 = time.perf_counter()
    model.generate(idx, n, temperature=1.0, generator=g)
    if device != "cpu":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)
