"""One context-window rule (models/context.py) for model.generate and the serving engine: the
rule itself, and a proof that both paths follow it — swap in another rule (a window of half
the block) and generate (cached and uncached) and the engine (batched, rows joining and
leaving) still agree token for token, and differ from what the real rule gives."""
from __future__ import annotations

import pytest
import torch

from models import context
from models.context import Feed, fits, next_input
from models.sampling import SamplingParams
from serve.engine import Engine
from test_generation import BLOCK, V, build


def test_the_rule():
    assert next_input(5, 0, 16) == Feed(0, 0)           # a new sequence: prefill all of it
    assert next_input(6, 5, 16) == Feed(5, 5)           # then only the newest token
    assert next_input(16, 15, 16) == Feed(15, 15)       # the last position that fits
    assert next_input(17, 16, 16) == Feed(1, 0)         # slid: re-prefill the last 16 from 0
    assert next_input(40, 0, 16) == Feed(24, 0)         # a long prompt keeps its last 16
    assert next_input(40, 16, 16) == next_input(40, 0, 16)      # past the block, cache or not
    assert fits(16, 16) and not fits(17, 16)


def _engine_tokens(m, prompts, p):
    e, toks = Engine(m, max_batch=2), {}
    pending = list(enumerate(prompts))
    while pending or e.has_work():                      # one request joins every step
        if pending:
            i, ids = pending.pop(0)
            e.add(str(i), ids, p)
        for o in e.step():
            toks.setdefault(int(o.request_id), []).extend(o.token_ids)
    return [toks[i] for i in range(len(prompts))]


def _generate_tokens(m, prompts, p, use_cache):
    out = []
    for ids in prompts:
        g = torch.Generator().manual_seed(p.seed)
        seq = m.generate(torch.tensor([ids]), p.max_new_tokens, p.temperature, p.top_k,
                         use_cache=use_cache, generator=g)
        out.append(seq[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("attn,pos_emb", [("gqa", "rope"), ("mla", "learn")])
def test_generate_and_the_engine_follow_the_one_rule(monkeypatch, attn, pos_emb):
    m = build(attn=attn, pos_emb=pos_emb)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, BLOCK + 4, 9)]
    p = SamplingParams(2 * BLOCK, temperature=0.9, top_k=9, seed=4)

    def runs():
        eng = _engine_tokens(m, prompts, p)
        assert eng == _generate_tokens(m, prompts, p, True) == _generate_tokens(m, prompts, p, False)
        return eng

    real = runs()
    calls = []

    def half_window(length, cached, block_size):        # another rule: a context of BLOCK/2
        calls.append(length)
        return next_input(length, cached, block_size // 2)
    monkeypatch.setattr(context, "next_input", half_window)
    half = runs()
    assert calls and half != real
    assert all(a != b for a, b in zip(half, real))     # every request conditioned otherwise
