"""Activation functions for MLPs and experts, by the seed's `non_linearity` names.

`activation(name)` returns f(h) -> (..., up_dim) where h is the up-projection: (..., up_dim)
for plain activations and (..., 2*up_dim) for the gated ones (glu, swiglu), whose first half is
the value and second half the gate. An unknown name is an error, never a silent fallback.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,                                    # exact (erf)
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),   # GPT-2's "gelu_new"
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "selu": F.selu,
    "celu": F.celu,
    "elu": F.elu,
    "lrelu": lambda h: F.leaky_relu(h, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _glu(h: torch.Tensor) -> torch.Tensor:
    a, g = h.chunk(2, dim=-1)
    return a * torch.sigmoid(g)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    a, g = h.chunk(2, dim=-1)
    return a * F.silu(g)


_GATED = {"glu": _glu, "swiglu": _swiglu}
NAMES = tuple(_PLAIN) + tuple(_GATED)


def is_gated(name: str) -> bool:
    return name in _GATED


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in _PLAIN:
        return _PLAIN[name]
    if name in _GATED:
        return _GATED[name]
    raise ValueError(f"unknown non_linearity {name!r}; choose one of {', '.join(NAMES)}")
