"""Helpers the family converters share: consuming a state dict key by key (so that no HF
weight is silently dropped) and checking that every layer of a stack agrees on a setting that
an HF config holds once.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch


class Taker:
    """Hands out the tensors of a state dict once each; `done()` raises a ValueError naming
    every key that no mapping consumed (an HF feature the converter does not know about)."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str):
        self._left = dict(state)
        self.what = what

    def __call__(self, key: str) -> torch.Tensor:
        try:
            return self._left.pop(key)
        except KeyError:
            raise ValueError(f"{self.what}: the state dict has no {key!r}") from None

    def maybe(self, key: str) -> torch.Tensor | None:
        return self._left.pop(key, None)

    def drop(self, key: str) -> None:
        """Consume a key on purpose (e.g. the tied lm_head.weight, which *is* the embedding)."""
        self._left.pop(key, None)

    def lm_head(self, sd: dict, tied: bool, hf_key: str = "lm_head.weight",
                embedding: str = "wte.weight") -> None:
        """sd["lm_head.weight"]: with tied embeddings the embedding itself (sd[embedding]),
        consuming HF's `hf_key` copy unread (mapping it too would be a second copy that could
        overwrite the first: the tied-embedding trap); else HF's own head."""
        if tied:
            self.drop(hf_key)
            sd["lm_head.weight"] = sd[embedding]
        else:
            sd["lm_head.weight"] = self(hf_key)

    def done(self) -> None:
        if self._left:
            names = sorted(self._left)
            raise ValueError(f"{self.what}: weights no mapping uses: {', '.join(names[:8])}"
                             + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))


def mismatched(layers, value: Callable, field: str, family: str) -> list[str]:
    """Reasons naming the layers whose `value(layer)` differs from layers[0]'s: an HF config of
    `family` holds `field` once for the whole stack."""
    first = value(layers[0])
    bad = [i for i, b in enumerate(layers) if value(b) != first]
    if not bad:
        return []
    got = sorted({str(value(layers[i])) for i in bad})
    return [f"{', '.join(f'layers[{i}]' for i in bad)}: {field}={'/'.join(got)} but layers[0] has "
            f"{field}={first} ({family} has one {field} for every layer)"]


def contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def norm_eps(cfg) -> float:
    """The eps every norm of the model uses: cfg.norm_eps, or the norm's own default."""
    from models.norms import DEFAULT_EPS
    return float(DEFAULT_EPS[cfg.norm] if cfg.norm_eps is None else cfg.norm_eps)
