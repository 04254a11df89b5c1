"""Prefix caching in the serving engine (serve/prefix_cache.py), on CPU without Ray: every
request's tokens and logprobs — generated tokens' and echo's prompt logprobs — are the same
with and without the prefix cache (fp32; logprobs within 1e-5, tokens and top ids exact), for
GQA, MQA, MLA and a heterogeneous stack with rope, learned, sinusoidal and ALiBi positions;
requests sharing prefixes of different lengths, run together, staggered and one after
another, with evictions; the hit/query counters; windowed models bypass it; bad values fail.
"""
from __future__ import annotations

import pytest
import torch

from serve.engine import Engine, SamplingParams
from serve.metrics import ServeMetrics
from models import LLM, ModelConfig
from test_generation import V, _varied, build, local_global

BLOCK, B = 64, 8                    # model block_size, prefix-cache block tokens
TOL = 1e-5


def hetero(pos_emb: str):
    """configs/hetero.jsonl's shape, tiny: MLA + MoE, MLA + MoE, GQA + MLP, GQA + MLP."""
    r = 4 if pos_emb == "rope" else 0
    mla = {"attn": "mla", "n_head": 4, "q_latent_dim": 12, "kv_latent_dim": 10,
           "rope_head_dim": r, "moe": True, "n_exp": 6, "n_shared": 1, "n_act": 3,
           "aux_free": True, "up_dim": 16, "non_linearity": "swiglu"}
    gqa = {"attn": "gqa", "n_head": 4, "n_kv_heads": 2, "moe": False, "up_dim": 40,
           "non_linearity": "swiglu"}
    torch.manual_seed(1)
    return _varied(LLM(ModelConfig.from_dict({"vocab_size": V, "block_size": BLOCK, "n_embd": 32,
                                              "pos_emb": pos_emb,
                                              "layers": [mla, mla, gqa, gqa]})))


def model(kind: str, pos_emb: str):
    m = hetero(pos_emb) if kind == "hetero" else build(attn=kind, pos_emb=pos_emb, block_size=BLOCK)
    return m.float().eval()


def prompts(seed: int = 3) -> dict[str, tuple[list[int], dict]]:
    """Prompts sharing a 40-token context to different depths (B = 8 tokens a block)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(0, V, (n,), generator=g).tolist()         # noqa: E731
    ctx, other = r(40), r(30)
    echo = dict(prompt_logprobs=2)
    gen = dict(logprobs=2)
    return {
        "mid_block": (ctx[:37] + r(3), {**echo, **gen}),          # shares 37: ends mid-block
        "mid_block_2": (ctx[:37] + r(5), {**echo, **gen}),
        "whole_blocks": (ctx[:32], {**echo, "generate": False}),  # = a cached prefix, 4 blocks
        "short": (ctx[:5], {**echo, **gen}),                      # shorter than one block
        "two_blocks": (ctx[:16] + r(2), gen),                     # unscored: blocks w/o hidden
        "all_ctx": (ctx, {**echo, "generate": False}),
        "all_ctx_sampled": (ctx + r(1), {**gen, "seed": 7}),
        "mid_block_k1": (ctx[:37] + r(2), {"prompt_logprobs": 1}),  # other k: from hidden
        "unrelated": (other, {**echo, **gen}),
        "unrelated_2": (other[:24] + r(9), {**echo, **gen}),
    }


def params(opts: dict) -> SamplingParams:
    seed = opts.get("seed")
    return SamplingParams(max_new_tokens=5, temperature=0.0 if seed is None else 1.0, seed=seed)


def _add(engine, rid, ids, opts):
    kw = {k: v for k, v in opts.items() if k != "seed"}
    engine.add(rid, ids, params(opts), **kw)


def collect(engine, outs, res):
    for o in outs:
        r = res.setdefault(o.request_id, {"tokens": [], "lp": [], "prompt": None})
        r["tokens"] += o.token_ids
        if o.logprobs is not None:
            r["lp"].append(o.logprobs)
        if o.prompt_logprobs is not None:
            r["prompt"] = o.prompt_logprobs


def run(engine, reqs, mode: str, check=None) -> dict:
    """mode: 'together' (all added at once), 'staggered' (one every 2 steps), 'serial' (each
    to completion before the next)."""
    res: dict = {}
    items = list(reqs.items())
    step = 0
    while items or engine.has_work():
        if items and (mode == "together" or (mode == "staggered" and step % 2 == 0)
                      or (mode == "serial" and not engine.has_work())):
            for rid, (ids, opts) in (items if mode == "together" else items[:1]):
                _add(engine, rid, ids, opts)
            items = [] if mode == "together" else items[1:]
        collect(engine, engine.step(), res)
        if check is not None:
            check(engine)
        step += 1
    return res


def assert_same(ref: dict, got: dict) -> None:
    assert set(ref) == set(got)
    for rid in ref:
        a, b = ref[rid], got[rid]
        assert a["tokens"] == b["tokens"], rid
        pairs = list(zip(a["lp"], b["lp"]))
        assert len(a["lp"]) == len(b["lp"])
        assert (a["prompt"] is None) == (b["prompt"] is None), rid
        if a["prompt"] is not None:
            assert len(a["prompt"]) == len(b["prompt"]) and a["prompt"][0] is b["prompt"][0] is None
            pairs += list(zip(a["prompt"][1:], b["prompt"][1:]))
        for x, y in pairs:
            assert x.token == y.token, rid
            assert [i for i, _ in x.top] == [i for i, _ in y.top], rid
            assert abs(x.logprob - y.logprob) <= TOL, (rid, x.logprob, y.logprob)
            for (_, p), (_, q) in zip(x.top, y.top):
                assert abs(p - q) <= TOL, rid


CASES = [("gqa", "rope"), ("gqa", "learn"), ("mqa", "rope"), ("mqa", "learn"), ("mla", "rope"),
         ("mla", "learn"), ("mha", "sin"), ("gqa", "alibi"), ("hetero", "rope"),
         ("hetero", "learn")]


@pytest.mark.parametrize("kind,pos_emb", CASES)
def test_prefix_cache_changes_no_token_and_no_logprob(kind, pos_emb):
    m = model(kind, pos_emb)
    reqs = prompts()
    for mode in ("together", "staggered", "serial"):
        ref = run(Engine(m, max_batch=4), reqs, mode)
        eng = Engine(m, max_batch=4, prefix_cache_bytes=1 << 22, prefix_block_tokens=B)
        got = run(eng, reqs, mode)
        assert_same(ref, got)
        again = run(eng, {f"{r}'": v for r, v in reqs.items()}, mode)     # the cache is warm
        assert_same({f"{r}'": v for r, v in ref.items()}, again)
        queries, hits = eng.prefix_cache_counts()
        assert hits > 0 and queries == 2 * sum(len(ids) for ids, _ in reqs.values())


def test_evictions_keep_results_and_the_budget():
    m = model("gqa", "rope")
    probe = Engine(m, max_batch=4, prefix_cache_bytes=1 << 20, prefix_block_tokens=B)
    budget = 3 * probe.prefix_cache.block_bytes                 # three blocks (with hidden states)
    reqs = {}
    for s in range(4):                                          # 4 contexts x 3 prompts each
        for rid, v in list(prompts(seed=s).items())[:4]:
            reqs[f"{s}{rid}"] = v

    def within(engine):
        pc = engine.prefix_cache
        assert pc.nbytes <= budget
        assert pc.nbytes == sum(b.nbytes for b in pc.blocks.values())
    for mode in ("serial", "together", "staggered"):
        ref = run(Engine(m, max_batch=4), reqs, mode)
        eng = Engine(m, max_batch=4, prefix_cache_bytes=budget, prefix_block_tokens=B)
        got = run(eng, reqs, mode, check=within)
        assert_same(ref, got)
        assert eng.prefix_cache.evictions > 0
        assert eng.prefix_cache_counts()[1] > 0


def _finish(engine, rid, ids, **kw):
    engine.add(rid, ids, SamplingParams(max_new_tokens=1, temperature=0.0), **kw)
    while engine.has_work():
        engine.step()


def test_counters_count_prompt_tokens_looked_up_and_hit():
    m = model("mla", "rope")
    eng = Engine(m, max_batch=4, prefix_cache_bytes=1 << 22, prefix_block_tokens=B)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, V, (24,), generator=g).tolist()             # 3 full blocks
    _finish(eng, "a", a)
    assert eng.prefix_cache_counts() == (24, 0)
    _finish(eng, "b", a[:16] + [1, 2, 3, 4])                        # 2 blocks shared
    assert eng.prefix_cache_counts() == (44, 16)
    _finish(eng, "c", a)                                            # all 3: the last token is fed
    assert eng.prefix_cache_counts() == (68, 39)
    _finish(eng, "d", a[:5])                                        # under one block: no hit
    assert eng.prefix_cache_counts() == (73, 39)
    # a scored prompt needs the blocks' hidden states; "a" and "b" stored none
    _finish(eng, "e", a, prompt_logprobs=1)
    assert eng.prefix_cache_counts() == (97, 39)
    _finish(eng, "f", a, prompt_logprobs=1)                         # "e" stored them
    assert eng.prefix_cache_counts() == (121, 62)
    assert len(eng.prefix_cache.blocks) == 3                        # a's, hidden states added


def test_metrics_export_the_new_counts_once():
    class Rec:
        def __init__(self):
            self.total = 0

        def inc(self, v=1):
            self.total += v

        def observe(self, v): ...
        def set(self, v): ...
    m = model("gqa", "learn")
    eng = Engine(m, max_batch=4, prefix_cache_bytes=1 << 22, prefix_block_tokens=B)
    met = ServeMetrics("t", enabled=False)
    met.prefix_queries, met.prefix_hits = Rec(), Rec()
    ids = list(range(20))
    for rid in ("x", "y"):
        eng.add(rid, ids, SamplingParams(max_new_tokens=1, temperature=0.0))
        while eng.has_work():
            eng.step()
            met.on_step(eng, 0.0)
    met.on_step(eng, 0.0)                                           # nothing new: no increment
    assert (met.prefix_queries.total, met.prefix_hits.total) == (40, 16) == eng.prefix_cache_counts()


def test_a_windowed_model_bypasses_the_prefix_cache():
    m = local_global("rope").float()
    eng = Engine(m, max_batch=4, prefix_cache_bytes=1 << 22, prefix_block_tokens=4)
    assert eng.prefix_cache is None and "sliding-window" in eng.prefix_cache_off
    ids = list(range(12))
    ref = Engine(m, max_batch=4).run({"a": (ids, SamplingParams(4, 0.0))})
    for rid in ("a", "b"):
        assert eng.run({rid: (ids, SamplingParams(4, 0.0))})[rid].token_ids == ref["a"].token_ids
    assert eng.prefix_cache_counts() == (0, 0)


@pytest.mark.parametrize("kw,match", [
    (dict(prefix_cache_bytes=-1), "prefix_cache_bytes must be an int >= 0"),
    (dict(prefix_cache_bytes=1.5), "prefix_cache_bytes must be an int >= 0"),
    (dict(prefix_cache_bytes=True), "prefix_cache_bytes must be an int >= 0"),
    (dict(prefix_cache_bytes=100), "prefix_cache_bytes=100 holds no block"),
    (dict(prefix_cache_bytes=1 << 20, prefix_block_tokens=0), "prefix_block_tokens must be an int >= 1"),
    (dict(prefix_cache_bytes=1 << 20, prefix_block_tokens=BLOCK + 1),
     f"prefix_block_tokens={BLOCK + 1} exceeds block_size={BLOCK}"),
])
def test_bad_prefix_cache_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Engine(model("gqa", "rope"), **kw)


def test_a_long_prefix_beside_a_long_rest_prefills_in_two_passes():
    """A row starting at 48 and a fresh 60-token row cannot share one right-padded pass in a
    block_size of 64 (48 + 60 > 64): they go in two, and nothing changes."""
    m = model("gqa", "learn")
    g = torch.Generator().manual_seed(4)
    ctx, fresh = (torch.randint(0, V, (n,), generator=g).tolist() for n in (48, 60))
    reqs = {"warm": (ctx + [1], {"prompt_logprobs": 1, "logprobs": 1})}
    later = {"hit": (ctx + [2, 3], {"prompt_logprobs": 1, "logprobs": 1}),
             "fresh": (fresh, {"prompt_logprobs": 1, "logprobs": 1})}
    ref_eng = Engine(m, max_batch=4)
    ref = {**run(ref_eng, reqs, "serial"), **run(ref_eng, later, "together")}
    eng = Engine(m, max_batch=4, prefix_cache_bytes=1 << 22, prefix_block_tokens=B)
    got = run(eng, reqs, "serial")
    passes = []
    inner = eng.runner._pass
    eng.runner._pass = lambda seqs, *a: passes.append([s.rid for s in seqs]) or inner(seqs, *a)
    got.update(run(eng, later, "together"))
    assert_same(ref, got)
    assert passes[0] == ["hit"] and passes[1] == ["fresh"]
    assert eng.prefix_cache_counts()[1] == 48


def test_the_serving_flag_refuses_a_negative_budget():
    from pydantic import ValidationError

    from serve.app import AppArgs
    assert AppArgs(checkpoint=["x"]).prefix_cache_bytes == 0
    with pytest.raises(ValidationError, match="prefix_cache_bytes"):
        AppArgs(checkpoint=["x"], prefix_cache_bytes=-1)


def test_the_prefill_budget_counts_only_what_the_prefix_cache_does_not_serve():
    """Four prompts sharing 40 tokens (5 blocks) + 3 of their own, a prefill budget of 60:
    with the prefix cache, one prefills 43 tokens and three 3 each (52): all four start in
    one step; without it, 43 + 43 > 60: one per step."""
    m = model("gqa", "rope")
    g = torch.Generator().manual_seed(6)
    ctx = torch.randint(0, V, (40,), generator=g).tolist()
    firsts = []
    for on in (1 << 22, 0):
        eng = Engine(m, max_batch=8, max_prefill_tokens=60, prefix_cache_bytes=on,
                     prefix_block_tokens=B)
        for i in range(4):
            eng.add(str(i), ctx + [i, i, i], SamplingParams(1, 0.0), prompt_logprobs=1,
                    generate=False)
        firsts.append(len(eng.step()))
    assert firsts == [4, 1]
