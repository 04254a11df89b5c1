"""Scoring in the engine (serve/logprobs.py, serve/engine.py), on CPU without Ray: prompt
log-probabilities from the prefill (echo) and generated tokens' log-probabilities equal the
model's own log-softmax of an uncached forward pass, for every attention x position type and a
heterogeneous stack, in a mixed batch; top entries and token strings."""
from __future__ import annotations

import pytest
import torch

from chimera.data.tokenizers import get_tokenizer
from serve.engine import Engine, SamplingParams
from serve.logprobs import pieces, score, token_string
from test_generation import BLOCK, CASES, V, build, hetero


def reference(m, ids: list[int]) -> torch.Tensor:
    """log_softmax of the uncached model over every position: (T, V), fp64 here."""
    with torch.no_grad():
        logits, _ = m(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), -1)


def run(engine, reqs):
    outs = {r: [] for r in reqs}
    for rid, (ids, p, kw) in reqs.items():
        engine.add(rid, ids, p, **kw)
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


@pytest.mark.parametrize("attn,pos_emb", CASES + [("hetero", "rope")])
def test_prompt_and_generated_logprobs_equal_the_uncached_model(attn, pos_emb):
    m = (hetero() if attn == "hetero" else build(attn=attn, pos_emb=pos_emb)).double()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, BLOCK, 2, 9)]
    reqs = {"a": (prompts[0], SamplingParams(4, 0.0), {"logprobs": 2, "prompt_logprobs": 2}),
            "b": (prompts[1], SamplingParams(1, 0.0), {"prompt_logprobs": 1, "generate": False}),
            "c": (prompts[2], SamplingParams(6, 0.9, seed=4), {"logprobs": 0}),
            "d": (prompts[3], SamplingParams(3, 0.0), {})}                   # no scores asked
    outs = run(Engine(m, max_batch=4), reqs)
    for rid, (ids, p, kw) in reqs.items():
        gen = [t for o in outs[rid] for t in o.token_ids]
        full = ids + gen
        ref = reference(m, full[:BLOCK]) if len(full) > 1 else None
        prompt = outs[rid][0].prompt_logprobs
        if "prompt_logprobs" in kw:
            assert prompt[0] is None and len(prompt) == len(ids)
            for t in range(1, len(ids)):
                e = prompt[t]
                assert e.token == ids[t]
                assert abs(e.logprob - ref[t - 1, ids[t]].item()) < 1e-9
                best = ref[t - 1].topk(kw["prompt_logprobs"])
                assert [j for j, _ in e.top[:kw["prompt_logprobs"]]] == best.indices.tolist()
        else:
            assert all(o.prompt_logprobs is None for o in outs[rid])
        scored = [o.logprobs for o in outs[rid] if o.token_ids]
        if kw.get("logprobs") is None:
            assert all(s is None for s in scored)
            continue
        assert len(scored) == len(gen) == p.max_new_tokens
        for j, s in enumerate(scored):                      # generated token j at position n+j
            assert s.token == gen[j]
            assert abs(s.logprob - ref[len(ids) - 1 + j, gen[j]].item()) < 1e-9
            assert len(s.top) == kw["logprobs"] + (gen[j] not in [i for i, _ in s.top[:kw["logprobs"]]])
        if not kw.get("generate", True):
            assert gen == [] and outs[rid][-1].finish_reason == "length"


def test_score_top_entries_follow_vllm():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    a, b = score(logits, [0, 0], [2, 0])
    lp = torch.log_softmax(logits, -1)
    assert [j for j, _ in a.top] == [1, 3, 0]              # the 2 most likely, then the chosen
    assert a.logprob == pytest.approx(lp[0, 0].item()) and max(v for _, v in a.top) == a.top[0][1]
    assert b.top == ((0, b.logprob),)                      # k = 0: the chosen one alone


def test_engine_refuses_scoring_it_cannot_do():
    m = build()
    e = Engine(m, max_batch=2)
    with pytest.raises(ValueError, match="must fit in block_size"):
        e.add("x", [1] * (BLOCK + 1), SamplingParams(1, 0.0), prompt_logprobs=1)
    with pytest.raises(ValueError, match="generate=False needs prompt_logprobs"):
        e.add("y", [1, 2], SamplingParams(1, 0.0), generate=False)


def test_token_strings_and_pieces():
    byte = get_tokenizer("byte")
    ids = list("é€!".encode())
    assert "".join(pieces(byte, ids)) == "é€!"
    assert [len(x) for x in pieces(byte, ids)] == [0, 1, 0, 0, 1, 1]     # a char at its last byte
    assert token_string(byte, ids[0]) == "bytes:\\xc3" and token_string(byte, 33) == "!"
    assert token_string(byte, 300) == "<|id_300|>"
    char = get_tokenizer("char", vocab="ab\n")
    assert token_string(char, 2) == "\n" and pieces(char, [0, 2, 1]) == ["a", "\n", "b"]
