"""One request inside the engine: its tokens, sampling parameters, generator, detokenizer and
how far it got. The scheduler (serve/scheduler.py) moves Sequences between its queues and cache
rows, the model runner (serve/model_runner.py) feeds their tokens, the sampler
(serve/sampler.py) draws their next token, and the engine (serve/engine.py) appends it and
decides when they finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import models.context as context
from models.sampling import SamplingParams
from serve.detokenizer import Detokenizer
from serve.logprobs import TokenLogprob


@dataclass(eq=False)
class Sequence:
    rid: str
    params: SamplingParams
    tokens: list[int]                   # the prompt, then the generated tokens
    prompt_tokens: int
    gen: torch.Generator                # this request's own: its tokens do not depend on others
    detok: Detokenizer
    cached: int = 0                     # positions of this row held in the KV cache
    generated: list[int] = field(default_factory=list)
    done: str | None = None             # why it finished: 'stop', 'length', 'abort' or 'error'
    first: bool = False                 # jump the queue (health checks)
    logprobs: int | None = None         # score each generated token, with the k most likely
    prompt_logprobs: int | None = None  # score the prompt at prefill (echo), k most likely
    generate: bool = True               # False: score the prompt only, generate nothing
    prompt_scores: list[TokenLogprob | None] | None = None     # set by the prefill
    prefix_keys: list[bytes] = field(default_factory=list)     # its window's block keys
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None       # when it took a batch row (the scheduler)

    def feed(self, block_size: int) -> context.Feed:
        """What its next forward pass feeds, and where (the context-window rule)."""
        return context.next_input(len(self.tokens), self.cached, block_size)
