"""Where data preparation tokenizes: a thread pool in this process (`--num_proc N`, the
default) or N Ray workers on the cluster (`--num_workers N`). Both encode the same groups of
the same item stream and hand the results back in stream order, so the shards do not depend
on which one ran, nor on N (tests/test_prepare.py checks the bytes).

    from chimera.data.parallel import RayEncoder, ThreadEncoder, encode_in_order
    with RayEncoder(tok, num_workers=4) as ex:         # ray.init via chimera.runtime.init_ray
        for group, parts in encode_in_order(ex, items, plan): ...

Design (issue 16). The driver keeps what must be sequential: reading the sources, cutting
pieces, the train/val split, and the ShardWriter (shard boundaries, sha256, progress.json for
resume); only the tokenization, the costly step, moves to the workers. So the bytes are those
of a 1-thread run *by construction*, resume works unchanged, and single-stream sources (a
streamed hub set, one big text file) spread over workers as well as a folder of parquet files
does. The alternative, a task per source file writing its own shards, would parallelise the
reading too, but its shard boundaries and its tail split would depend on the file layout
(not byte-identical to a 1-worker run without re-cutting every shard), and it cannot split a
single stream.
Workers are Ray actors, one CPU each (`num_workers` of them, exactly: tasks would run on every
free CPU), each building the tokenizer once from `Tokenizer.to_dict()`; the driver keeps two
groups in flight per actor and collects them in submission order. What limits throughput:
the driver still reads and pieces the text (Python), pickles every group to the workers and
writes + hashes the tokens it gets back; on one machine it also shares the CPUs with the
workers. `python jobs/bench.py data` measures N=2 against N=1 (docs/benchmarks.md).
gpt2 workers load tiktoken's BPE files like the driver: the driver's TIKTOKEN_CACHE_DIR is
passed to workers that have none (on a cluster that path must exist on the nodes, or the nodes
need network access).
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from chimera.data.shards import DTYPE
from chimera.data.sources import DataError
from chimera.data.tokenizers import Tokenizer

TASK_CHARS = 1 << 18         # characters per group (one thread-pool task / actor call)
TASK_ITEMS = 512
WORKER_ENV = ("TIKTOKEN_CACHE_DIR",)   # passed to Ray workers that do not have it set

Item = tuple[int, str, str, bool]        # (index, split, text, ends_document)
Parts = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]


def check_workers(num_proc: Any, num_workers: Any) -> None:
    """--num_proc (threads here) and --num_workers (Ray workers) choose different executors."""
    for name, v in (("num_proc", num_proc), ("num_workers", num_workers)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DataError(f"{name} must be an integer >= 1, got {v!r}")
    if num_proc is not None and num_workers is not None:
        raise DataError(f"num_proc={num_proc} and num_workers={num_workers} both given: "
                        f"num_proc is the number of tokenizer threads in this process, "
                        f"num_workers the number of Ray workers (one CPU each) that tokenize "
                        f"instead; give one of them")


def encode_group(tok: Tokenizer, group: list[Item], offsets: list[int | None]) -> Parts:
    """parts[split] = (uint16 tokens of the group's items of that split, item ids, their start
    in the tokens, their first token number, characters encoded). offsets[j] is the first
    token of item j to keep (an item cut by a resume point), None to skip the item."""
    eot = None if tok.eot_id is None else np.array([tok.eot_id], dtype=np.uint32)
    acc: dict[str, tuple[list, list, list, list, list]] = {}
    for (idx, split, text, ends), off in zip(group, offsets):
        if off is None:
            continue
        arrs, ids, lens, offs, chars = acc.setdefault(split, ([], [], [], [], [0]))
        a = tok.encode_to_numpy(text)
        if ends and eot is not None:
            a = np.concatenate([a, eot])
        if off:
            a = a[off:]
        arrs.append(a)
        ids.append(idx)
        lens.append(len(a))
        offs.append(off)
        chars[0] += len(text)
    out = {}
    for split, (arrs, ids, lens, offs, chars) in acc.items():
        starts = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        out[split] = (np.concatenate(arrs).astype(DTYPE), np.array(ids, np.int64),
                      starts, np.array(offs, np.int64), chars[0])
    return out


def groups(items: Iterable[Item]) -> Iterator[list[Item]]:
    group, chars = [], 0
    for it in items:
        group.append(it)
        chars += len(it[2])
        if chars >= TASK_CHARS or len(group) >= TASK_ITEMS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def encode_in_order(ex, items: Iterable[Item], plan: Callable[[Item], int | None]
                    ) -> Iterator[tuple[list[Item], Parts]]:
    """Yield (group, parts) in item order, `ex.in_flight` groups submitted ahead."""
    pending: deque = deque()
    for g in groups(items):
        pending.append((g, ex.submit(g, [plan(it) for it in g])))
        if len(pending) > ex.in_flight:
            g0, result = pending.popleft()
            yield g0, result()
    while pending:
        g0, result = pending.popleft()
        yield g0, result()


class ThreadEncoder:
    """Threads of this process (tiktoken's core releases the GIL, so they scale)."""

    def __init__(self, tok: Tokenizer, threads: int):
        self.tok, self.workers, self.in_flight = tok, threads, 2 * threads
        self.where = f"{threads} thread(s)"
        self._ex = ThreadPoolExecutor(threads)

    def submit(self, group: list[Item], offsets: list) -> Callable[[], Parts]:
        return self._ex.submit(encode_group, self.tok, group, offsets).result

    def stats(self) -> str | None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


class _EncodeWorker:
    """A Ray actor: one tokenizer, built once (the class is made remote in RayEncoder)."""

    def __init__(self, tok_info: dict, env: dict[str, str]):
        for k, v in env.items():
            os.environ.setdefault(k, v)            # before tiktoken looks for its BPE files
        self.tok = Tokenizer.from_dict(tok_info)

    def ready(self) -> str:
        return f"{os.uname().nodename}:{os.getpid()}"

    def encode(self, group: list[Item], offsets: list) -> tuple[Parts, float]:
        """The parts and the CPU seconds this took (the driver's report of worker load)."""
        t0 = time.thread_time()
        parts = encode_group(self.tok, group, offsets)
        return parts, time.thread_time() - t0


class RayEncoder:
    """`num_workers` Ray actors (one CPU each) on the cluster init_ray connects to (RAY_ADDRESS,
    as `ray job submit` sets it) or on a private local instance, stopped again on exit."""

    def __init__(self, tok: Tokenizer, num_workers: int, log: Callable[[str], None] = print,
                 wait_log_s: float = 30.0):
        import ray

        from chimera.runtime import init_ray, started_local

        self.tok, self.workers, self.in_flight = tok, num_workers, 2 * num_workers
        self.cpu_s, self._t0, self._t1 = 0.0, None, None
        self._own_ray = not ray.is_initialized()
        self._actors: list = []
        init_ray()
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if started_local() and num_workers > cpus:       # a fixed local instance: would hang
            self.__exit__()
            raise DataError(f"num_workers={num_workers} needs {num_workers} CPUs but the local "
                            f"Ray instance has {cpus}: lower --num_workers, or run on a cluster "
                            f"(ray job submit sets RAY_ADDRESS)")
        env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
        cls = ray.remote(num_cpus=1)(_EncodeWorker)
        self._actors = [cls.options(scheduling_strategy="SPREAD").remote(tok.to_dict(), env)
                        for _ in range(num_workers)]
        self._next = 0
        try:
            refs = [a.ready.remote() for a in self._actors]
            pending = refs
            while pending:       # on a cluster an autoscaler may first have to add nodes
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=wait_log_s)
                if pending:
                    log(f"{num_workers - len(pending)} of {num_workers} Ray workers started; "
                        f"waiting for the rest (the cluster has {cpus} CPUs now)")
            hosts = ray.get(refs)
        except ray.exceptions.RayError as e:
            self.__exit__()
            raise DataError(f"the Ray workers cannot build the {tok.name} tokenizer: "
                            f"{_cause(e)}") from None
        nodes = len({h.split(':')[0] for h in hosts})
        self.where = f"{num_workers} Ray worker(s) on {nodes} node(s)"

    def submit(self, group: list[Item], offsets: list) -> Callable[[], Parts]:
        import ray

        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        if self._t0 is None:
            self._t0 = time.perf_counter()
        ref = actor.encode.remote(group, offsets)

        def result() -> Parts:
            parts, cpu = ray.get(ref)
            self.cpu_s += cpu
            self._t1 = time.perf_counter()
            return parts
        return result

    def stats(self) -> str | None:
        """How busy the workers were: tokenization CPU seconds over the wall time from the
        first group sent to the last result (N busy CPUs at best; fewer: a starved worker or
        a driver that cannot feed them)."""
        if self._t0 is None or self._t1 is None or self._t1 <= self._t0:
            return None
        wall = self._t1 - self._t0
        return (f"the {self.workers} Ray worker(s) tokenized for {self.cpu_s:.1f} CPU-s in "
                f"{wall:.1f} s: {self.cpu_s / wall:.2f} of {self.workers} CPUs busy")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._own_ray:
            ray.shutdown()


def _cause(e: Exception) -> str:
    """The last line of a Ray error's traceback text: the worker's own exception."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error:" in ln and not ln.startswith("ray.")]
    return (errs[-1] if errs else lines[-1] if lines else type(e).__name__)[:500]
