"""The continuous-batching engine (serve/engine.py), on CPU without Ray: every request's
tokens equal `model.generate()` for that request alone — greedy and seeded sampling, mixed
prompt lengths, requests joining mid-run and leaving early, past block_size — for every
attention x position type and heterogeneous stacks; plus stop conditions, cancellation and
scheduling. Models run in float64 (see tests/test_generation.py for why)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chimera.data.tokenizers import get_tokenizer
from models import LLM, ModelConfig
from serve.detokenizer import Detokenizer as TextStream
from serve.engine import Engine, SamplingParams
from test_generation import BLOCK, CASES, KNOBS, V, _varied, build, build_knob, hetero, local_global

ROOT_LAYERS = Path(__file__).resolve().parents[1] / "configs" / "hetero.jsonl"


def reference(m, prompt, p: SamplingParams) -> list[int]:
    g = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    out = m.generate(torch.tensor([prompt]), p.max_new_tokens, temperature=p.temperature,
                     top_k=p.top_k, top_p=p.top_p, generator=g)
    return out[0, len(prompt[-BLOCK:]) if len(prompt) > BLOCK else len(prompt):].tolist()


def requests(n_tok=(6, 11, 3, 2 * BLOCK + 5, 9), temperature=0.0, seed0=None):
    g = torch.Generator().manual_seed(11)
    lens = (1, 5, BLOCK, 7, 3)
    return {f"r{i}": (torch.randint(0, V, (lens[i],), generator=g).tolist(),
                      SamplingParams(max_new_tokens=n_tok[i], temperature=temperature, top_k=7,
                                     seed=None if seed0 is None else seed0 + i))
            for i in range(len(lens))}


def run_staggered(engine, reqs, every=2):
    """Add one request every `every` steps (joins a running batch) and run to completion."""
    pending, toks, done = list(reqs.items()), {r: [] for r in reqs}, set()
    step = 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            rid, (ids, p) = pending.pop(0)
            engine.add(rid, ids, p)
        for o in engine.step():
            toks[o.request_id] += o.token_ids
            if o.finish_reason:
                done.add(o.request_id)
        step += 1
    assert done == set(reqs)
    return toks


@pytest.mark.parametrize("attn,pos_emb", CASES)
def test_batched_equals_unbatched_greedy(attn, pos_emb):
    m = build(attn=attn, pos_emb=pos_emb)
    reqs = requests()
    together = Engine(m, max_batch=8).run(reqs)
    staggered = run_staggered(Engine(m, max_batch=3), reqs)
    for rid, (ids, p) in reqs.items():
        ref = reference(m, ids, p)
        assert len(ref) == p.max_new_tokens
        assert together[rid].token_ids == ref, rid
        assert staggered[rid] == ref, rid
        assert together[rid].finish_reason == "length"


@pytest.mark.parametrize("knob", list(KNOBS))
def test_batched_equals_unbatched_knobs(knob):
    m = build_knob(knob)
    reqs = requests()
    together = Engine(m, max_batch=8).run(reqs)
    staggered = run_staggered(Engine(m, max_batch=3), reqs)
    for rid, (ids, p) in reqs.items():
        ref = reference(m, ids, p)
        assert together[rid].token_ids == ref, rid
        assert staggered[rid] == ref, rid


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_batched_equals_unbatched_seeded_sampling(attn):
    m = build(attn=attn, pos_emb="rope")
    reqs = requests(temperature=1.3, seed0=100)
    got = Engine(m, max_batch=4).run(reqs)
    alone = {rid: Engine(m, max_batch=1).run({rid: r})[rid] for rid, r in reqs.items()}
    for rid, (ids, p) in reqs.items():
        assert got[rid].token_ids == alone[rid].token_ids == reference(m, ids, p), rid
    other = Engine(m).run({"x": (reqs["r1"][0], SamplingParams(11, 1.3, 7, seed=999))})
    assert other["x"].token_ids != got["r1"].token_ids          # the seed matters


@pytest.mark.parametrize("pos_emb", ["rope", "learn"])
def test_batched_equals_unbatched_heterogeneous(pos_emb):
    m = hetero(pos_emb)
    reqs = requests()
    got = run_staggered(Engine(m, max_batch=4), reqs, every=1)
    for rid, (ids, p) in reqs.items():
        assert got[rid] == reference(m, ids, p), rid


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_batched_equals_unbatched_local_global(pos_emb):
    """Windowed (ring-buffer) and full layers, and an MLA layer: rows at different lengths,
    prompts longer than the windows prefilled in one padded pass, rows moved when one leaves."""
    m = local_global(pos_emb)
    reqs = requests()
    together = Engine(m, max_batch=8).run(reqs)
    staggered = run_staggered(Engine(m, max_batch=3), reqs, every=1)
    for rid, (ids, p) in reqs.items():
        ref = reference(m, ids, p)
        assert together[rid].token_ids == ref, rid
        assert staggered[rid] == ref, rid


def test_hetero_layer_file_stack():
    torch.manual_seed(0)
    m = _varied(LLM(ModelConfig.from_layer_file(ROOT_LAYERS, n_embd=64, block_size=BLOCK,
                                                 vocab_size=V)))
    reqs = requests(temperature=0.8, seed0=7)
    got = Engine(m, max_batch=5).run(reqs)
    for rid, (ids, p) in reqs.items():
        assert got[rid].token_ids == reference(m, ids, p), rid


def test_short_request_leaves_while_long_ones_run_and_newcomers_join():
    m = build(attn="gqa")
    e = Engine(m, max_batch=3)
    e.add("long1", [1, 2], SamplingParams(40, 0.0))
    e.add("long2", [3], SamplingParams(40, 0.0))
    e.step()
    e.add("short", [4, 5, 6], SamplingParams(3, 0.0))
    e.add("late", [7], SamplingParams(2, 0.0))        # no free row until `short` leaves
    finished_at, step = {}, 1
    while e.has_work():
        for o in e.step():
            if o.finish_reason:
                finished_at[o.request_id] = step
        step += 1
        if "short" not in finished_at:
            assert e.num_running == 3 and e.num_waiting == 1
    assert finished_at["short"] == 3 and finished_at["late"] == 5
    assert finished_at["long1"] == finished_at["long2"] == 39     # token 40 at step 39


def test_cancel_frees_the_row_at_the_next_step():
    m = build(attn="mla")
    e = Engine(m, max_batch=2)
    e.add("a", [1], SamplingParams(50, 0.0))
    e.add("b", [2], SamplingParams(50, 0.0))
    e.step()
    e.cancel("a")
    e.add("c", [3, 4], SamplingParams(50, 0.0))
    outs = {o.request_id: o for o in e.step()}
    assert outs["a"].finish_reason == "abort" and outs["a"].token_ids == []
    assert set(outs) == {"a", "b", "c"} and e.num_running == 2
    ref = reference(m, [2], SamplingParams(50, 0.0))   # b moved rows: its cache moved too
    toks = {"b": [], "c": []}
    while e.has_work():
        for o in e.step():
            toks[o.request_id] += o.token_ids
    assert toks["b"] == ref[2:]


def test_stop_strings_eot_and_text():
    tok = get_tokenizer("char", vocab="abcdefgh\n")
    stream = TextStream(tok, ("fg", "\n\n"))
    pieces = [stream.push(t) for t in tok.encode("abcf")]
    assert "".join(p[0] for p in pieces) == "abc" and not any(p[1] for p in pieces)  # "f" held
    assert stream.push(tok.encode("g")[0]) == ("", True)
    s2 = TextStream(tok, ("fg",))
    assert [s2.push(t) for t in tok.encode("fa")] == [("", False), ("fa", False)]

    torch.manual_seed(0)
    m = LLM(ModelConfig.from_dict(dict(vocab_size=9, block_size=BLOCK, n_embd=32, n_layer=2,
                                       n_head=4))).double().eval()
    free = Engine(m, tok).run({"x": ([0, 1], SamplingParams(12, 0.0))})["x"]
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[3:5]
    got = Engine(m, tok).run({"x": ([0, 1], SamplingParams(12, 0.0, stop=(stop,)))})["x"]
    assert got.finish_reason == "stop" and got.text == free.text[:free.text.index(stop)]
    tok.eot_id = free.token_ids[2]                      # pretend: an end-of-text token
    got = Engine(m, tok).run({"x": ([0, 1], SamplingParams(12, 0.0))})["x"]
    first = free.token_ids.index(tok.eot_id)
    assert got.finish_reason == "stop" and got.token_ids == free.token_ids[:first + 1]
    assert got.text == tok.decode(free.token_ids[:first])


def test_bad_requests_are_refused():
    m = build(attn="gqa")
    e = Engine(m)
    with pytest.raises(ValueError, match="prompt is empty"):
        e.add("a", [], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        e.add("a", [V], SamplingParams())
    for kw, msg in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                    (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"),
                    (dict(seed=1.5), "seed"), (dict(stop=("",)), "stop")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)


def test_only_ids_the_tokenizer_knows_are_sampled():
    """A padded embedding (vocab 53 here) with a 20-symbol tokenizer: padded ids have no text,
    so neither the engine nor generate(vocab_limit=...) samples them, and the two agree."""
    tok = get_tokenizer("char", vocab="abcdefghijklmnopqrst")
    m = build(attn="gqa")
    p = SamplingParams(40, temperature=2.0, seed=3)
    got = Engine(m, tok).run({"x": ([0, 1, 2], p)})["x"]
    assert max(got.token_ids) < 20 and got.text == tok.decode(got.token_ids)
    ref = m.generate(torch.tensor([[0, 1, 2]]), 40, temperature=2.0, vocab_limit=20,
                     generator=torch.Generator().manual_seed(3))[0, 3:].tolist()
    assert got.token_ids == ref
    free = m.generate(torch.tensor([[0, 1, 2]]), 40, temperature=2.0,
                      generator=torch.Generator().manual_seed(3))[0, 3:].tolist()
    assert max(free) >= 20                                   # without the limit they do occur
