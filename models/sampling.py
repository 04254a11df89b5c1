"""What a request may ask of the sampler, checked in one place, and how one token is drawn.

    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_k=50, seed=1)  # ValueError if bad
    nxt = sample_next(limit_vocab(logits, vocab), 0.8, top_k=50, generator=g)    # (B, V) -> (B, 1)

SamplingParams is the one check of sampling arguments: model.generate (models/generation.py),
the serving engine (serve/engine.py), jobs/sample.py and the HTTP ingress (serve/schemas.py
builds one per request) all construct it, and its errors are what users read. The numeric
bounds are declared once, in RULES; serve/schemas.py hands the same bounds to pydantic, so that
an HTTP client is told which field is wrong (a 400 with `param`) before a SamplingParams exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class Rule(NamedTuple):
    integer: bool                   # an int (never a bool); else an int or a finite float
    optional: bool                  # None allowed (the filter is off)
    bounds: dict[str, float]        # pydantic's names: ge (>=), gt (>), le (<=)
    message: str                    # the error; ", got <value>" follows

    def accepts(self, v) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return False
        if not self.integer and not math.isfinite(v):
            return False
        b = self.bounds
        return v >= b.get("ge", -math.inf) and v > b.get("gt", -math.inf) and v <= b.get("le", math.inf)


RULES = {
    "max_new_tokens": Rule(True, False, {"ge": 1}, "max_new_tokens must be a positive integer"),
    "temperature": Rule(False, False, {"ge": 0.0},
                        "temperature must be a finite number >= 0 (0 = greedy)"),
    "top_k": Rule(True, True, {"ge": 1}, "top_k must be None or an integer >= 1"),
    "top_p": Rule(False, True, {"gt": 0.0, "le": 1.0}, "top_p must be None or in (0, 1]"),
}


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0         # 0 = greedy
    top_k: int | None = None         # sample among the k most likely tokens
    top_p: float | None = None       # nucleus: the smallest set with probability >= top_p
    seed: int | None = None          # None: a fresh random seed per request (serving engine)
    stop: tuple[str, ...] = ()       # stop strings (not included in the text)

    def __post_init__(self):
        for name, rule in RULES.items():
            v = getattr(self, name)
            if not rule.accepts(v):
                raise ValueError(f"{rule.message}, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


def limit_vocab(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """logits (B, V) with ids >= vocab_limit made impossible (-inf): the embedding may be
    padded past the tokenizer's vocabulary (e.g. 65 chars in a 128-row table), and a padded id
    has no text."""
    if vocab_limit is None or vocab_limit >= logits.size(-1):
        return logits
    return logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= vocab_limit,
                              float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)
