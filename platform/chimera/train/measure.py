"""Measuring a run: peak FLOP/s for MFU, means over workers, eval losses, the parameter hash.

    peak_flops(torch.device("cuda"), None)      # by GPU name (H100: 989e12), else per CPU thread
    all_mean(t, world)                          # all-reduced mean of a tensor over the workers
    eval_losses(raw, {"val": loader}, iters, amp, world, token_bytes)
                                                # {"val_loss": .., "val_aux": .., "val_bpb": ..}
    state_hash(model)                           # sha256 of every parameter and buffer, 16 hex

Bits per byte (`{name}_bpb`): the cross-entropy in nats summed over the same targets as the
loss, / ln 2, / the UTF-8 bytes of text those targets stand for (chimera.data.tokenizers
.token_bytes), so models with different tokenizers compare on the same text (nanochat's
evaluate_bpb). Targets of 0 bytes (gpt2's end of text) are left out of both sums: they are no
text, and char/byte data has none. Both sums are all-reduced like the losses.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from chimera.data.loader import ShardLoader

# peak dense FLOP/s per worker for MFU when --peak_flops is not given
GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
            "V100": 125e12, "T4": 65e12}
CPU_PEAK_PER_THREAD = 1e11          # ~32 fp32 FLOP/cycle (AVX2 FMA x2) at ~3 GHz


def peak_flops(device: torch.device, given: float | None) -> float:
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK.items() if k in name), 100e12)
    return CPU_PEAK_PER_THREAD * torch.get_num_threads()


def all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (MoE biases included)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def eval_losses(raw, loaders: dict[str, ShardLoader], iters: int, amp, world: int,
                token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """{name}_loss and {name}_aux per loader: means over `iters` batches and over workers; with
    `token_bytes` ((vocab,) bytes of text per id, on the model's device) also {name}_bpb."""
    raw.eval()
    out: dict[str, float] = {}
    for name, ld in loaders.items():
        ld.reset()
        # mean CE, mean aux, nats summed over targets with bytes, their bytes summed
        acc = torch.zeros(4, dtype=torch.float64, device=next(raw.parameters()).device)
        for _ in range(iters):
            x, y = ld.next_batch()                                      # (B, T) each
            with amp():
                logits, _, aux = raw.forward_with_aux(x)                # (B, T, V)
                nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                      reduction="none")                 # (B*T,) nats
            nb = (token_bytes[y.flatten()] if token_bytes is not None
                  else torch.zeros_like(nll))                           # (B*T,) bytes
            acc += torch.stack([nll.mean().double(), aux.double(),
                                (nll * (nb > 0)).sum().double(), nb.sum().double()])
        acc[:2] /= iters
        acc = all_mean(acc, world)               # the ratio of the sums is the ratio of means
        ce, ax, nats, nbytes = acc.tolist()                             # sync: read
        out[f"{name}_loss"], out[f"{name}_aux"] = ce, ax
        if token_bytes is not None:
            out[f"{name}_bpb"] = nats / math.log(2) / nbytes if nbytes else math.nan
    raw.train()
    return out
