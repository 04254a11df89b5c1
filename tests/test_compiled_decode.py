"""The static-shape decode step (models/decode.py) gives the same greedy tokens as the eager
path and as uncached decoding — for every attention x position type, heterogeneous stacks with
sliding-window (ring-buffer) layers and MoE, within and past block_size, in model.generate and
in the serving engine (rows of different lengths, padding rows) — and its logits match the
eager step's in fp32. The whole grid runs the static step eagerly; torch.compile runs on three
representative models (slow). Bad `decode` values are refused, naming the field.

Models run in float64 like tests/test_generation.py: the static step sums over all cache
slots (masked), the eager one over the filled ones, which may flip an fp32 near-tie in argmax.
"""
from __future__ import annotations

import pytest
import torch

from models import LLM, ModelConfig
from models.decode import DECODE_MODES, batch_bucket, check_decode, decode_step
from serve.engine import Engine, SamplingParams
from test_generation import BLOCK, CASES, V, _varied, build, hetero, local_global
from test_serve_engine import ROOT_LAYERS, requests, run_staggered

GRID = CASES + [(a, "alibi") for a in ("mha", "mqa", "gqa")]
STACKS = {"hetero_rope": lambda: hetero("rope"), "hetero_sin": lambda: hetero("sin"),
          "local_global_rope": lambda: local_global("rope"),
          "local_global_alibi": lambda: local_global("alibi"),
          "hetero_jsonl": lambda: hetero_jsonl()}


def hetero_jsonl() -> LLM:
    """configs/hetero.jsonl (MLA + MoE, GQA + SwiGLU) at a tiny width."""
    torch.manual_seed(3)
    cfg = ModelConfig.from_layer_file(str(ROOT_LAYERS), n_embd=32, vocab_size=V, block_size=BLOCK)
    return _varied(LLM(cfg))


def greedy(m, prompt, n, **kw) -> torch.Tensor:
    return m.generate(prompt, n, temperature=0.0, **kw)


def assert_same_tokens(m, modes=("static",), batch=2):
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, V, (batch, 5), generator=g)
    for n in (10, 3 * BLOCK):                                   # within and past block_size
        ref = greedy(m, prompt, n, use_cache=False)
        assert torch.equal(greedy(m, prompt, n, decode="eager"), ref)
        for mode in modes:
            assert torch.equal(greedy(m, prompt, n, decode=mode), ref), (mode, n)


@pytest.mark.parametrize("attn,pos_emb", GRID)
def test_static_step_gives_the_tokens_of_eager_and_uncached(attn, pos_emb):
    assert_same_tokens(build(attn=attn, pos_emb=pos_emb))


@pytest.mark.parametrize("stack", STACKS)
def test_static_step_heterogeneous_and_windowed(stack):
    assert_same_tokens(STACKS[stack](), batch=1)


@pytest.mark.parametrize("case", ["gqa_rope", "mla_rope", "local_global_alibi", "hetero_jsonl"])
def test_static_logits_match_eager_in_fp32(case):
    m = {"gqa_rope": lambda: build(attn="gqa"), "mla_rope": lambda: build(attn="mla"),
         **STACKS}[case]().float()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (2, 3), generator=g)
    eager, static = m.new_cache(2), m.new_cache(2)
    m.next_logits(prompt, eager, 0)
    m.next_logits(prompt, static, 0)
    for t in range(3, BLOCK):
        tok = torch.randint(0, V, (2, 1), generator=g)
        a = m.next_logits(tok, eager, t)
        b = m.decode_step(tok, static, torch.full((2,), t))
        scale = a.abs().max()
        torch.testing.assert_close(b / scale, a / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stack", ["gqa_rope", "mla_rope", "local_global_rope", "hetero_rope"])
def test_engine_static_step_rows_of_different_lengths(stack):
    """Mixed prompt lengths, requests joining a running batch, one row past block_size: each
    request's tokens equal the eager engine's and uncached model.generate's."""
    m = {"gqa_rope": lambda: build(attn="gqa"), "mla_rope": lambda: build(attn="mla"),
         **STACKS}[stack]()
    reqs = requests()
    eager = Engine(m, max_batch=4, decode="eager").run(reqs)
    static = run_staggered(Engine(m, max_batch=4, decode="static"), reqs)
    for rid, (ids, p) in reqs.items():
        window = ids[-BLOCK:]
        ref = m.generate(torch.tensor([window]), p.max_new_tokens, temperature=0.0,
                         use_cache=False)[0, len(window):].tolist()
        assert eager[rid].token_ids == ref, rid
        assert static[rid] == ref, rid


def test_padding_rows_write_nothing():
    """A bucketed batch's padding rows (valid False) leave their cache rows untouched."""
    m = build(attn="gqa").float()
    cache = m.new_cache(4)
    for layer in cache.layers:
        for t in layer.values():
            t.normal_()
    before = [{k: t.clone() for k, t in layer.items()} for layer in cache.layers]
    valid = torch.tensor([True, False, True, False])
    m.decode_step(torch.tensor([[1], [2], [3], [4]]), cache, torch.tensor([2, 5, 0, 9]), valid)
    for old, new in zip(before, cache.layers):
        for k in old:
            assert torch.equal(old[k][[1, 3]], new[k][[1, 3]])
            assert not torch.equal(old[k][0, 2], new[k][0, 2])     # a live row did write


def test_batch_buckets():
    assert [batch_bucket(n, 16, "compiled", "cpu") for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert batch_bucket(3, 6, "compiled", "cpu") == 4 and batch_bucket(5, 6, "compiled", "cpu") == 6
    assert batch_bucket(3, 16, "compiled", "cuda") == 16        # one CUDA graph
    assert batch_bucket(3, 16, "static", "cpu") == 3


@pytest.mark.parametrize("bad", ["fast", "", "Compiled", 1])
def test_bad_decode_values_are_refused(bad):
    m = build(attn="gqa")
    with pytest.raises(ValueError, match="decode must be one of eager, static, compiled"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 2, decode=bad)
    with pytest.raises(ValueError, match="decode must be one of"):
        Engine(m, max_batch=2, decode=bad)
    assert check_decode(None, "cpu") in DECODE_MODES and check_decode(None, "cuda") == "compiled"


COMPILED = {"gqa_rope": lambda: build(attn="gqa", n_layer=2),
            "mla_rope": lambda: build(attn="mla", n_layer=2),
            "local_global_alibi": lambda: local_global("alibi")}


@pytest.mark.slow
@pytest.mark.timeout(1800)      # 4 graphs per model: 40-100 s of inductor compile each on a loaded 2-core box
@pytest.mark.parametrize("case", COMPILED)
def test_compiled_step_gives_the_same_tokens(case):
    """torch.compile of the static step (inductor on CPU): generate and the engine, batch 1
    and rows of different lengths with padding rows (buckets 1, 2, 4)."""
    m = COMPILED[case]()
    assert_same_tokens(m, modes=("compiled",), batch=1)
    reqs = dict(list(requests(n_tok=(6, 2 * BLOCK + 3, 4, 9, 5)).items())[:3])
    got = run_staggered(Engine(m, max_batch=4, decode="compiled"), reqs)
    for rid, (ids, p) in reqs.items():
        window = ids[-BLOCK:]
        ref = m.generate(torch.tensor([window]), p.max_new_tokens, temperature=0.0,
                         use_cache=False)[0, len(window):].tolist()
        assert got[rid] == ref, rid
    assert decode_step(m, "compiled") is decode_step(m, "compiled")    # compiled once per model
