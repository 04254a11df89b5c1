"""Learning-rate schedule: linear warmup, then cosine decay to 10 % of the maximum.

    lr = lr_at(step, max_lr=1e-3, warmup_steps=100, max_iters=2000)

`step` counts optimizer steps from 0. Warmup: lr rises linearly to max_lr over warmup_steps
(step 0 already gets max_lr / warmup_steps, never 0). Then cosine from max_lr at
step = warmup_steps down to min_ratio * max_lr at step = max_iters, and flat after.
"""
from __future__ import annotations

import math

MIN_RATIO = 0.1


def lr_at(step: int, max_lr: float, warmup_steps: int, max_iters: int,
          min_ratio: float = MIN_RATIO) -> float:
    min_lr = max_lr * min_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_iters:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_iters - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
