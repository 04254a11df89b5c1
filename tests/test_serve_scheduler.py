"""serve/scheduler.py on plain Sequences (no model): running requests are always the rows
0..n-1, a finished or cancelled request's row is reused at once (the last row moves into the
gap, its cached positions copied along), admission respects max_batch and the prefill token
budget, health checks jump the queue, and fail_all empties everything."""
from __future__ import annotations

import pytest
import torch

from models.sampling import SamplingParams
from serve.detokenizer import Detokenizer
from serve.scheduler import RowMove, Scheduler
from serve.sequence import Sequence

BLOCK = 16


def seq(rid: str, n: int = 3, first: bool = False) -> Sequence:
    return Sequence(rid, SamplingParams(4, 0.0), list(range(n)), n, torch.Generator(),
                    Detokenizer(None, ()), first=first)


def rids(seqs) -> list[str]:
    return [s.rid for s in seqs]


def test_finished_rows_are_refilled_by_the_last_row_and_reused():
    sch = Scheduler(max_batch=4, max_prefill_tokens=100, block_size=BLOCK)
    for r in "abcd":
        sch.add(seq(r))
    plan = sch.schedule()
    assert rids(plan.prefill) == list("abcd") and plan.decode == [] and plan.moves == []
    for s in plan.rows:
        s.cached = 3
    sch.running[0].done = "length"              # a and c finish
    sch.running[2].done = "stop"
    sch.running[3].cached = 7
    moves = sch.free_finished()
    assert rids(sch.running) == ["d", "b"]      # d (row 3) -> row 0; c's row 2 is simply free
    assert moves == [RowMove(3, 0, 7)]
    sch.add(seq("e"))
    plan = sch.schedule()
    assert rids(plan.decode) == ["d", "b"] and rids(plan.prefill) == ["e"]   # e takes row 2
    assert rids(plan.rows) == rids(sch.running) == ["d", "b", "e"]


def test_a_row_past_block_size_moves_without_a_copy():
    """Its cache is re-prefilled from its window every step (the context-window rule)."""
    sch = Scheduler(max_batch=2, max_prefill_tokens=100, block_size=BLOCK)
    sch.add(seq("a"))
    sch.add(seq("b", n=BLOCK + 1))
    sch.schedule()
    sch.running[0].done = "length"
    sch.running[1].cached = BLOCK
    assert sch.free_finished() == [] and rids(sch.running) == ["b"]


def test_admission_respects_max_batch_and_the_prefill_budget():
    sch = Scheduler(max_batch=3, max_prefill_tokens=10, block_size=BLOCK)
    for r, n in (("a", 6), ("b", 5), ("c", 4), ("d", 1)):
        sch.add(seq(r, n))
    assert rids(sch.schedule().prefill) == ["a"]          # 6 + 5 > 10
    assert rids(sch.schedule().prefill) == ["b", "c"]     # 5 + 4 <= 10; then no row left
    assert sch.num_running == 3 and sch.num_waiting == 1
    big = Scheduler(max_batch=2, max_prefill_tokens=4, block_size=BLOCK)
    big.add(seq("x", 12))
    assert rids(big.schedule().prefill) == ["x"]          # the first always goes in


def test_cancel_frees_the_row_before_admission_and_health_checks_go_first():
    sch = Scheduler(max_batch=2, max_prefill_tokens=100, block_size=BLOCK)
    sch.add(seq("a"))
    sch.add(seq("b"))
    sch.add(seq("w"))
    for s in sch.schedule().rows:
        s.cached = 3
    sch.add(seq("late"))
    sch.add(seq("health", first=True))
    sch.cancel("a")
    sch.cancel("w")                                       # cancelled while waiting
    plan = sch.schedule()
    assert rids(plan.aborted) == ["a", "w"] and all(s.done == "abort" for s in plan.aborted)
    assert plan.moves == [RowMove(1, 0, 3)]               # b moves into a's row first
    assert rids(plan.decode) == ["b"] and rids(plan.prefill) == ["health"]
    assert rids(sch.waiting) == ["late"]


def test_fail_all_empties_the_batch_and_the_queue():
    sch = Scheduler(max_batch=1, max_prefill_tokens=100, block_size=BLOCK)
    sch.add(seq("a"))
    sch.schedule()
    sch.add(seq("b"))
    failed = sch.fail_all("error")
    assert rids(failed) == ["a", "b"] and {s.done for s in failed} == {"error"}
    assert not sch.has_work() and sch.num_running == sch.num_waiting == 0
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Scheduler(max_batch=0, max_prefill_tokens=1, block_size=BLOCK)
