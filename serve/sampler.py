"""The engine's sampler: one next token per running request, each with its own temperature,
top-k, top-p and torch.Generator, over logits restricted to ids the tokenizer can decode.

    tokens = Sampler(vocab_limit=tok.vocab_size)(logits, seqs)      # (n, V) -> n ints

Greedy rows are taken together (one argmax); every other row draws with models/sampling.py
`sample_next` and its own generator, as model.generate would for that request alone.
"""
from __future__ import annotations

import torch

from models.sampling import limit_vocab, sample_next
from serve.sequence import Sequence


class Sampler:
    def __init__(self, vocab_limit: int | None = None):
        # sample only ids the tokenizer can decode (the embedding may be padded past them)
        self.vocab_limit = vocab_limit

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits (n, V), row i for seqs[i] -> the n next tokens."""
        logits = limit_vocab(logits, self.vocab_limit)
        out = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                out[i] = t
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature != 0:
                out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.gen))
        return out
