"""chimera/sweep/measure.py: the sweep's decode tok/s is measured by the serving engine (batch
1, KV cache) on the checkpoint as chimera.checkpoint.load_model loads it, with one torch thread
on CPU (restored after), a short warm-up, and exactly the requested tokens (at most
block_size - 1). No Ray: the tiny trained checkpoint of conftest."""
from __future__ import annotations

import torch

import chimera.checkpoint
import serve.engine
from chimera.sweep.measure import measure_decode


def test_decode_speed_is_the_serving_engines(tiny_checkpoint, monkeypatch):
    runs, loads = [], []
    real_run, real_load = serve.engine.Engine.run, chimera.checkpoint.load_model

    def run(self, requests):
        out = real_run(self, requests)
        runs.append((self.scheduler.max_batch, torch.get_num_threads(), requests, out))
        return out

    def load(path, device="cpu"):
        loads.append((path, device))
        return real_load(path, device)
    monkeypatch.setattr(serve.engine.Engine, "run", run)
    monkeypatch.setattr(chimera.checkpoint, "load_model", load)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        v = measure_decode(tiny_checkpoint, 20)
        assert v > 0 and torch.get_num_threads() == 2                   # restored
    finally:
        torch.set_num_threads(threads)
    assert loads == [(tiny_checkpoint, "cpu")]
    (warm_batch, warm_threads, warm, _), (batch, n_threads, timed, out) = runs
    assert warm_batch == batch == 1 and warm_threads == n_threads == 1
    assert [p.max_new_tokens for _, p in warm.values()] == [4]
    (ids, p), = timed.values()
    assert ids == [0] and (p.max_new_tokens, p.temperature, p.seed) == (20, 1.0, 0)
    done, = out.values()
    assert len(done.token_ids) == 20 and done.finish_reason == "length"

    runs.clear()
    measure_decode(tiny_checkpoint, 500)                                 # block_size 64
    assert len(next(iter(runs[-1][3].values())).token_ids) == 63
