"""The engine's asyncio driver: runs an Engine from the Serve replica's event loop (no Ray).

    driver = EngineDriver(engine, on_step=metrics.on_step)
    async for t, outs in driver.stream("id", prompt_ids, params):   # lists of engine Outputs
        ...

One background task runs `engine.step()` in a single worker thread while there is work
(PyTorch releases the GIL, so the event loop keeps accepting requests meanwhile), and hands
each step's outputs to the per-request queues. A consumer that stops early (client gone,
cancelled) cancels its request: the engine frees the row at its next step. An exception in a
step fails the requests in flight (finish_reason 'error') and the driver carries on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from models.sampling import SamplingParams
from serve.engine import Engine, Output

log = logging.getLogger(__name__)


class EngineDriver:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, float], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._queues: dict[str, asyncio.Queue] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                if not self.engine.has_work():
                    await self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                outs = await loop.run_in_executor(self._pool, self.engine.step)
            except Exception:                                   # never a dead replica
                log.exception("engine step failed; failing the requests in flight")
                outs = self.engine.fail_all("error")
            now = time.perf_counter()
            for o in outs:
                q = self._queues.get(o.request_id)
                if q is not None:
                    q.put_nowait((now, o))
            if self.on_step is not None:
                self.on_step(self.engine, now - t0)

    async def stream(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                     first: bool = False, **scoring) -> AsyncIterator[tuple[float, list[Output]]]:
        """submit() then results(): the request's outputs until its final one."""
        self.submit(rid, prompt_ids, params, first, **scoring)
        async for item in self.results(rid):
            yield item

    def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams,
               first: bool = False, **scoring) -> None:
        """Hand a request to the engine now (ValueError for bad prompts); read its outputs with
        results(rid), or give it up with cancel(rid). `scoring`: Engine.add's logprobs /
        prompt_logprobs / generate. (The server submits before it answers the HTTP headers, so
        the prefill runs while they travel.)"""
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already running")
        self.engine.add(rid, prompt_ids, params, first, **scoring)
        self._queues[rid] = asyncio.Queue()
        self._ensure_loop()

    def cancel(self, rid: str) -> None:
        """Give up a submitted request that is still running (its row is freed next step)."""
        if self._queues.pop(rid, None) is not None:
            self.engine.cancel(rid)
            try:
                self._ensure_loop()
            except RuntimeError:                                # closed outside a loop
                pass

    async def results(self, rid: str) -> AsyncIterator[tuple[float, list[Output]]]:
        """Yield (time, outputs) with every output available for this request so far
        (several per item when the consumer falls behind); ends after the final output."""
        q = self._queues[rid]
        finished = False
        try:
            while not finished:
                t, o = await q.get()
                items = [o]
                while not q.empty():
                    t, o = q.get_nowait()
                    items.append(o)
                finished = items[-1].finish_reason is not None
                yield t, items
        finally:
            if finished:
                self._queues.pop(rid, None)
            else:                                               # consumer left: free the row
                self.cancel(rid)

    def load(self) -> tuple[int, int]:
        """(running, queued) requests."""
        return self.engine.num_running, self.engine.num_waiting
