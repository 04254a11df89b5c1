"""Measuring a run: peak FLOP/s for MFU, means over workers, eval losses, the parameter hash.

    peak_flops(torch.device("cuda"), None)      # by GPU name (H100: 989e12), else per CPU thread
    all_mean(t, world)                          # all-reduced mean of a tensor over the workers
    eval_losses(raw, {"val": loader}, iters, amp, world)    # {"val_loss": .., "val_aux": ..}
    state_hash(model)                           # sha256 of every parameter and buffer, 16 hex
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

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
def eval_losses(raw, loaders: dict[str, ShardLoader], iters: int, amp, world: int) -> dict[str, float]:
    """{name}_loss and {name}_aux per loader: means over `iters` batches and over workers."""
    raw.eval()
    out: dict[str, float] = {}
    for name, ld in loaders.items():
        ld.reset()
        acc = torch.zeros(2, dtype=torch.float64, device=next(raw.parameters()).device)
        for _ in range(iters):
            x, y = ld.next_batch()
            with amp():
                _, ce, aux = raw.forward_with_aux(x, y)
            acc += torch.stack([ce.double(), aux.double()])
        acc = all_mean(acc / iters, world)
        out[f"{name}_loss"], out[f"{name}_aux"] = acc[0].item(), acc[1].item()   # sync: read
    raw.train()
    return out
