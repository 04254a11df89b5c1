"""Admission and KV-cache rows of the continuous-batching engine: plain Python, no model.

    sched = Scheduler(max_batch=16, max_prefill_tokens=2048, block_size=1024)
    sched.add(seq)                        # thread-safe (the driver's event loop adds, the
    sched.cancel("id")                    #   engine thread steps)
    plan = sched.schedule()               # Plan(aborted, moves, decode, prefill)
    ...                                   # apply plan.moves, run plan.decode then plan.prefill
    moves = sched.free_finished()         # rows the finished requests leave, refilled

Rows. The KV cache has max_batch rows and running[i] holds row i, so the running requests are
always rows 0..n-1 and every forward pass reads one cache view (cache.rows(0, n)). A request
that finishes or is cancelled frees its row at once: the last running request moves into the
gap, and the model runner copies its cached positions along (a RowMove). The next newcomer
takes row n; a row's stale entries are never read (models/attention/cache.py masks them).

Admission, each schedule(): cancelled requests leave first; then waiting requests (health
checks first, then arrival order) take free rows while their prompts fit in
max_prefill_tokens (the first always does; with a prefix cache, the tokens it will not serve
count: those neither cached nor in an earlier newcomer's full blocks); newcomers that share a first prompt block with
an earlier newcomer take the rows after the others (the prefix cache's second wave,
serve/prefix_cache.py `waves`). Running requests are never preempted: a request
joins between two decode steps and leaves as soon as it is done, so short requests never
wait for long ones.
"""
from __future__ import annotations

import threading
import time
from typing import NamedTuple

from serve.prefix_cache import PrefixCache, waves
from serve.sequence import Sequence


class RowMove(NamedTuple):
    src: int                            # the row the request held
    dst: int                            # the freed row it moves into
    length: int                         # cached positions to copy


class Plan(NamedTuple):
    aborted: list[Sequence]             # cancelled: left the batch and the queue this step
    moves: list[RowMove]                # apply first: the rows the cancelled ones freed
    decode: list[Sequence]              # rows 0..d-1, running: one new token each
    prefill: list[Sequence]             # rows d..: admitted now, their prompt is prefilled

    @property
    def rows(self) -> list[Sequence]:
        """Every running request, in row order (the order of the run's logits)."""
        return self.decode + self.prefill


class Scheduler:
    def __init__(self, max_batch: int, max_prefill_tokens: int, block_size: int,
                 prefix: PrefixCache | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch, self.max_prefill_tokens, self.block = max_batch, max_prefill_tokens, block_size
        self.prefix = prefix                # its hits are not prefilled: not in the budget
        self.running: list[Sequence] = []   # running[i] holds cache row i
        self.waiting: list[Sequence] = []
        self._lock = threading.Lock()       # add()/cancel() may come from another thread
        self._new: list[Sequence] = []
        self._cancel: set[str] = set()

    # --- from any thread ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._new.append(seq)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._new or self._cancel)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._new)

    # --- from the engine's thread ---------------------------------------------------------------
    def schedule(self) -> Plan:
        with self._lock:
            self.waiting = ([s for s in self._new if s.first] + self.waiting
                            + [s for s in self._new if not s.first])
            self._new, cancel, self._cancel = [], self._cancel, set()
        aborted, moves = [], []
        if cancel:
            for s in self.running + self.waiting:
                if s.rid in cancel:
                    s.done = "abort"
                    aborted.append(s)
            self.waiting = [s for s in self.waiting if not s.done]
            moves = self.free_finished()
        old = len(self.running)
        return Plan(aborted, moves, self.running[:old], self._admit())

    def _admit(self) -> list[Sequence]:
        new, budget, step_keys = [], self.max_prefill_tokens, set()
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            n = len(s.tokens) - s.feed(self.block).lo           # the prompt's window
            if self.prefix is not None:                         # what it will prefill
                n -= self.prefix.expected_hit(s.prefix_keys, n, step_keys)
                step_keys.update(s.prefix_keys)
            if new and n > budget:
                break
            budget -= n
            s.admitted = time.perf_counter()
            self.running.append(self.waiting.pop(0))
            new.append(s)
        if new:                             # shared prefixes: one wave after the other
            order = waves([s.prefix_keys for s in new])
            new = [s for _, s in sorted(zip(order, new), key=lambda x: x[0])]
            self.running[len(self.running) - len(new):] = new
        return new

    def free_finished(self) -> list[RowMove]:
        """Drop finished requests from the batch; the last running one moves into each gap.
        Returns the row copies that keeps the cache in step (in order)."""
        moves, i = [], 0
        while i < len(self.running):
            if not self.running[i].done:
                i += 1
                continue
            last = self.running.pop()
            if i < len(self.running):
                if not last.done and last.feed(self.block).start:    # its cache is read again
                    moves.append(RowMove(len(self.running), i, last.cached))
                self.running[i] = last
        return moves

    def fail_all(self, reason: str) -> list[Sequence]:
        """Finish every request, running or queued, with `reason`; the batch is empty after."""
        with self._lock:
            self.waiting += self._new
            self._new, self._cancel = [], set()
        failed = self.running + self.waiting
        for s in failed:
            s.done = reason
        self.running, self.waiting = [], []
        return failed
