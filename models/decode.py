"""The decode step: how one token per row is run once the prompt is in the KV cache.

    step = decode_step(model, "compiled")          # or "static"; None for "eager"
    logits = step(idx, cache, pos)                 # idx (B, 1), pos (B,) -> (B, V)

Modes (DECODE_MODES; model.generate's and the serving engine's `decode` argument):
  eager     the general forward pass (models/model.py next_logits): the cache is sliced to the
            filled length, masks are built for it, so every step has new shapes.
  static    LLM.decode_step, the same numbers with static shapes: the token is written into the
            preallocated cache in place (models/attention/cache.py write_slots) and attention
            covers every slot, masked from pos (B,); nothing reads a tensor on the host.
  compiled  the static step under torch.compile (dynamic=False): one graph per batch size and
            dtype. On CUDA with mode="reduce-overhead" (CUDA graphs; the cache buffers are marked
            static, and the engine pads every batch to max_batch so one graph serves all steps).
Prefill and the re-prefill past block_size (models/context.py) stay eager in every mode.
Which one is the default is decided by measurement (docs/benchmarks.md): DEFAULT_DECODE.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

DECODE_MODES = ("eager", "static", "compiled")
# measured (jobs/bench.py models, docs/benchmarks.md): the fastest correct mode per device type
# CPU: eager. Compiled steps were ~1.6x faster than eager on the 6L/384 GQA model, but compiling
# takes 6-20 s on 2 cores, more than a few hundred tokens save; the static step without
# compiling runs more small ops than eager (masks over every slot) and was slower.
DEFAULT_DECODE = {"cpu": "eager", "cuda": "compiled"}

Step = Callable[..., torch.Tensor]
_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, Step]" = weakref.WeakKeyDictionary()


def check_decode(mode: str | None, device: torch.device | str = "cpu", field: str = "decode") -> str:
    """mode, or the device's default for None; ValueError naming `field` otherwise."""
    if mode is None:
        return DEFAULT_DECODE.get(torch.device(device).type, "eager")
    if mode not in DECODE_MODES:
        raise ValueError(f"{field} must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode


def batch_bucket(n: int, max_batch: int, mode: str, device: torch.device | str) -> int:
    """Rows the step runs for n live rows: n (eager, static); compiled: the next power of two
    (at most max_batch) so a few graphs cover every batch, and on CUDA max_batch (one graph)."""
    if mode != "compiled":
        return n
    if torch.device(device).type == "cuda":
        return max_batch
    return min(max_batch, 1 << (n - 1).bit_length())


def decode_step(model, mode: str) -> Step | None:
    """The step function for `mode`: None for eager (the caller runs next_logits), the model's
    static step, or its compiled form (compiled once per model, reused by every caller)."""
    mode = check_decode(mode)
    if mode == "eager":
        return None
    if mode == "static":
        return model.decode_step
    step = _compiled.get(model)
    if step is None:
        import torch._dynamo
        # one graph per (model, batch size, dtype): the default limit of 8 would send a test
        # process or a server with several batch sizes back to eager without a word
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        cuda = next(model.parameters()).device.type == "cuda"
        fn = torch.compile(model.decode_step, dynamic=False,
                           mode="reduce-overhead" if cuda else None)
        step = _CudaGraphStep(fn) if cuda else fn
        _compiled[model] = step
    return step


class _CudaGraphStep:
    """CUDA graphs replay fixed addresses: mark the cache buffers static before the first call
    (once per cache) so that writing them in place does not make the graph fall back.
    Untested here (no GPU on the development machine)."""

    def __init__(self, fn: Step):
        self.fn, self.seen = fn, weakref.WeakSet()

    def __call__(self, idx, cache, pos, valid=None):
        if cache not in self.seen:
            for layer in cache.layers:
                for t in layer.values():
                    torch._dynamo.mark_static_address(t)
            self.seen.add(cache)
        return self.fn(idx, cache, pos, valid)
