"""`python jobs/bench.py serve`: the serving benchmark table, every row from one run.

A small checkpoint is trained first (char Tiny Shakespeare, 4 layers of GQA (4 heads, 2 KV
heads) + MLP, n_embd 128, block 1024, batch 2, `--train_iters` steps, in-process) unless
`--checkpoint` is given. Then:
  * Serve overhead: median time to first token over HTTP (streamed POST /generate, keep-alive
    client, concurrency 1) minus the median time to first token of the same engine called
    in-process (serve/engine.py, same torch threads), same prompt. Target <= 5 ms. One model
    is served, so the HTTP app runs in the model's replica (serve/app.py ModelIngress). Two
    more rows split it: outside the replica (the client's TTFT minus the TTFT the replica
    measured from the request's arrival) and inside it (that minus the in-process TTFT); two
    floors show what Serve's HTTP path costs without the engine (GET /v1/models, POST
    /tokenize: the proxy -> replica call, and for a POST fetching its body).
  * Continuous batching: aggregate generated tokens/s at concurrency 8 ÷ at concurrency 1
    (non-streamed /generate, `--tokens` new tokens each). Target >= 3.
  * Short-behind-long: a 16-token request sent while seven 512-token requests run ÷ the same
    request alone (median of 3 each). Target <= 1.5.
  * Load: `--requests` requests at concurrency 16, max_new_tokens drawn from 16..256, every
    other one streamed: errors (target 0), p50/p99 latency.
The rows above serve the model with `colocate_ingress` (the front end inside the model's one
replica, as measured before it became an option). Then the default deployment — the front end
in its own deployment before two model replicas, with an API key — gives:
  * Serve overhead of the default deployment: the same TTFT difference (one Ray call more).
  * Soak (platform/chimera/benchmarks/serve_soak.py): `--soak_requests` requests at
    concurrency `--soak_conc`, half streamed, 16-256 tokens, while `--kills` replicas are
    killed with SIGKILL: outcomes by kind, 0 failed non-streamed requests, none past its
    deadline, p50/p99, recovery seconds per kill, the surviving replica's RSS after ÷ before.
Last, the prefix cache (the colocated app again, deployed with and without it):
  * Prefix cache: multiple-choice scoring (200-token context, 4 endings of 10 tokens) through
    /v1/completions echo, items/s with ÷ without the prefix cache, over HTTP and in-process
    (chimera/benchmarks/serve_prefix.py). Target >= 2. `--prefix_only` runs only these rows.
Ray runs locally; the model replica gets `--threads` CPUs and torch threads (default: all
cores but one, left to the HTTP proxy and ingress), the in-process engine the same threads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from chimera.paths import SHARED_DATA

SHARED_TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint or run dir to serve (default: train a small one)")
    p.add_argument("--quick", action="store_true", help="fewer requests and steps (smoke run)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads and CPUs of the model replica (default: all cores but "
                        "one, left to the HTTP proxy and ingress)")
    p.add_argument("--train_iters", type=int, default=40, help="steps of the bench model's training")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per throughput request")
    p.add_argument("--requests", type=int, default=300, help="load test: number of requests")
    p.add_argument("--max_batch", type=int, default=16,
                   help="rows of the served replica's running batch")
    p.add_argument("--soak_requests", type=int, default=1000, help="soak: number of requests")
    p.add_argument("--soak_conc", type=int, default=32, help="soak: concurrent clients")
    p.add_argument("--kills", type=int, default=2, help="soak: replicas killed during it (>= 0)")
    p.add_argument("--prefix_only", action="store_true",
                   help="only the prefix-cache rows (multiple-choice echo scoring)")


def _check(args) -> str | None:
    for k in ("threads", "train_iters", "tokens", "requests", "max_batch", "soak_requests",
              "soak_conc"):
        if getattr(args, k) < 1:
            return f"--{k} must be >= 1"
    if args.kills < 0:
        return "--kills must be >= 0"
    return None


def _train(tmp: Path, iters: int) -> Path:
    from chimera.data.prepare import prepare
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    from chimera.train.loop import train_fn_per_worker
    data = tmp / "data"
    prepare("shakespeare", sources=[SHARED_TEXT], tokenizer="char", out=data, progress=False,
            log=lambda *_: None)
    plan = plan_run(load_train_config({
        "data_dir": str(data), "n_layer": 4, "n_embd": 128, "n_head": 4, "attn": "gqa",
        "n_kv_heads": 2, "block_size": 1024, "batch_size": 2, "total_batch_size_str": "2*1024",
        "max_iters": iters, "eval": True,
        "eval_interval": iters, "eval_iters": 2, "save_model": True, "learning_rate": 3e-3,
        "warmup_steps": 5, "storage_path": str(tmp / "runs"), "run_name": "bench_serve",
        "log_interval": max(1, iters // 4)}))
    return Path(train_fn_per_worker(plan.worker_config)["best_checkpoint"])


def _engine_ttft(ckpt: Path, threads: int, reps: int) -> float:
    import torch

    from models.sampling import SamplingParams
    from serve.engine import Engine
    from chimera.checkpoint import load_model
    torch.set_num_threads(threads)
    model, tok, _ = load_model(ckpt)
    engine, ids, times = Engine(model, tok, max_batch=16), tok.encode(PROMPT), []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        engine.add(str(i), ids, SamplingParams(4, 0.0))
        while not any(o.token_ids for o in engine.step()):
            pass
        times.append(time.perf_counter() - t0)
        while engine.has_work():
            engine.step()
    return statistics.median(times[2:])


def _post(client, url: str, body: dict, timings: list | None = None) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one request; a streamed one
    appends the server's own TTFT (arrival at the model server -> first token) to `timings`."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = client.post(url + "/generate", json=body)
        r.raise_for_status()
        j = r.json()
        t = time.perf_counter() - t0
        return j["timings"]["ttft_s"] or t, t, j["completion_tokens"]
    ttft, n = None, 0
    with client.stream("POST", url + "/generate", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise RuntimeError(ev["error"]["message"])
                n += ev.get("tokens", 0)
                if ttft is None and ev.get("tokens"):
                    ttft = time.perf_counter() - t0
                if timings is not None and "timings" in ev:
                    timings.append(ev["timings"]["ttft_s"])
    return ttft, time.perf_counter() - t0, n


def _roundtrip(call, reps: int) -> float:
    """Median milliseconds of `call()` (the first two calls warm up)."""
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        call().raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def _throughput(url: str, conc: int, n_req: int, tokens: int) -> float:
    import httpx
    local = threading.local()

    def one(i):
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=600)
        return _post(local.c, url, {"prompt": PROMPT, "max_new_tokens": tokens,
                                    "temperature": 1.0, "seed": i})[2]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        total = sum(ex.map(one, range(n_req)))
    return total / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    msg = _check(args)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    import httpx
    from ray import serve

    from chimera.localcluster import free_port
    from chimera.benchmarks.serve_prefix import rows as prefix_rows
    from chimera.runtime import init_ray
    from serve.app import AppArgs, build_app
    from chimera.checkpoint import resolve_checkpoint
    q = args.quick
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        try:
            ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else \
                _train(Path(tmp), 10 if q else args.train_iters)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"checkpoint {ckpt}", flush=True)
        reps = 5 if q else 20
        engine_ttft = _engine_ttft(ckpt, args.threads, reps)
        port = free_port()
        init_ray(num_cpus=args.threads + 1)
        rows = []
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"

            def deploy(prefix_cache_bytes: int = 0, checkpoint=ckpt) -> str:
                serve.run(build_app(AppArgs(checkpoint=[str(checkpoint)], max_batch=args.max_batch,
                                            num_cpus=args.threads, max_ongoing_requests=64,
                                            max_queued_requests=256, colocate_ingress=True,
                                            prefix_cache_bytes=prefix_cache_bytes)),
                          name="bench", route_prefix="/")
                return url
            if args.prefix_only:
                rows += prefix_rows(ckpt, Path(tmp), SHARED_TEXT.read_text(), args.threads, q,
                                    deploy)
                return _table(rows)
            deploy()
            replica: list[float] = []
            with httpx.Client(timeout=600) as c:
                body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0.0, "stream": True}
                http = sorted(_post(c, url, body, replica)[0] for _ in range(reps + 2))[1:-1]
            over = (statistics.median(http) - engine_ttft) * 1e3
            rows.append(("serve overhead: HTTP TTFT - in-process TTFT, median, conc 1",
                         f"{over:.1f} ms  ({statistics.median(http) * 1e3:.1f} vs "
                         f"{engine_ttft * 1e3:.1f} ms)", "<= 5 ms", over <= 5))
            print(rows[-1], flush=True)
            # where the milliseconds go: outside the replica (client, HTTP, Serve's proxy, the
            # proxy <-> replica calls) and inside it (FastAPI, the engine driver's thread hop)
            rep = statistics.median(replica[2:])
            rows.append(("  of which: HTTP + Serve proxy (client TTFT - TTFT the replica measured)",
                         f"{(statistics.median(http) - rep) * 1e3:.1f} ms", "", None))
            rows.append(("  of which: in the replica (its TTFT - in-process engine TTFT)",
                         f"{(rep - engine_ttft) * 1e3:.1f} ms", "", None))
            # the floor of Serve's HTTP path on this machine: routes that never touch the engine
            with httpx.Client(timeout=600) as c:
                models = _roundtrip(lambda: c.get(url + "/v1/models"), reps)
                tokenize = _roundtrip(lambda: c.post(url + "/tokenize", json={"prompt": PROMPT}), reps)
            rows.append(("  floor: GET /v1/models round trip (no engine, no body)",
                         f"{models:.1f} ms", "", None))
            rows.append(("  floor: POST /tokenize round trip (no engine, a small body)",
                         f"{tokenize:.1f} ms", "", None))
            print(rows[-4:], flush=True)
            tok = 32 if q else args.tokens
            t1 = _throughput(url, 1, 2 if q else 4, tok)
            t8 = _throughput(url, 8, 8 if q else 32, tok)
            rows.append(("continuous batching: tokens/s at conc 8 ÷ conc 1",
                         f"{t8 / t1:.2f}  ({t8:.0f} vs {t1:.0f} tok/s, {tok} tokens/request)",
                         ">= 3", t8 / t1 >= 3))
            print(rows[-1], flush=True)
            rows.append(_short_behind_long(url, 64 if q else 512))
            print(rows[-1], flush=True)
            rows += _load(url, 40 if q else args.requests, 16)
            serve.delete("bench")
            rows += _default_deployment(ckpt, args, url, engine_ttft, reps)
            serve.delete("soak")
            rows += prefix_rows(ckpt, Path(tmp), SHARED_TEXT.read_text(), args.threads, q, deploy)
        finally:
            serve.shutdown()
            import ray
            ray.shutdown()
    return _table(rows)


def _table(rows) -> int:
    print("\n| measurement | result | target |\n|---|---|---|")
    for name, res, target, ok in rows:
        verdict = "" if ok is None else (" — met" if ok else " — **missed**")
        print(f"| {name} | {res} | {target}{verdict} |")
    return 0


def _default_deployment(ckpt: Path, args, url: str, engine_ttft: float, reps: int) -> list[tuple]:
    """The default app (front end + two model replicas, an API key): its TTFT overhead, then
    the soak."""
    import secrets

    import httpx
    from ray import serve

    from chimera.benchmarks.serve_soak import soak, wait_running
    from serve.app import AppArgs, build_app
    key, deadline = secrets.token_urlsafe(24), 120.0
    serve.run(build_app(AppArgs(checkpoint=[f"soak={ckpt}"], max_batch=args.max_batch,
                                num_cpus=max(0.5, args.threads / 2), num_replicas=2,
                                api_key=[key], request_timeout_s=deadline,
                                max_ongoing_requests=2 * args.max_batch,
                                max_queued_requests=256)), name="soak", route_prefix="/")
    wait_running("soak", "LLMServer-soak", 2)
    with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"}) as c:
        body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0.0, "stream": True}
        http = sorted(_post(c, url, body)[0] for _ in range(reps + 2))[1:-1]
    over = (statistics.median(http) - engine_ttft) * 1e3
    rows = [("serve overhead, default deployment (front end + 2 replicas): HTTP TTFT - "
             "in-process TTFT", f"{over:.1f} ms  ({statistics.median(http) * 1e3:.1f} vs "
             f"{engine_ttft * 1e3:.1f} ms; replicas of {max(0.5, args.threads / 2):g} CPU)",
             "reported", None)]
    print(rows[-1], flush=True)
    q = args.quick
    rows += soak(url, "soak", "LLMServer-soak", key, n=100 if q else args.soak_requests,
                 conc=8 if q else args.soak_conc, kills=args.kills, deadline_s=deadline)
    for r in rows[1:]:
        print(r, flush=True)
    return rows


def _short_behind_long(url: str, long_tokens: int):
    import httpx
    short = {"prompt": PROMPT, "max_new_tokens": 16, "temperature": 0.0}
    with httpx.Client(timeout=600) as c:
        alone = statistics.median(_post(c, url, short)[1] for _ in range(3))
        busy = []
        for _ in range(3):
            started = threading.Barrier(8)

            def long_one(i):
                with httpx.Client(timeout=600) as lc:
                    with lc.stream("POST", url + "/generate", json={
                            "prompt": PROMPT, "max_new_tokens": long_tokens, "temperature": 1.0,
                            "seed": i, "stream": True}) as r:
                        lines = r.iter_lines()
                        next(line for line in lines if line.startswith("data: {"))
                        started.wait()
                        for _ in lines:
                            pass
            with ThreadPoolExecutor(7) as ex:
                futs = [ex.submit(long_one, i) for i in range(7)]
                started.wait()                                  # all seven are generating
                busy.append(_post(c, url, short)[1])
                for f in futs:
                    f.result()
    ratio = statistics.median(busy) / alone
    return ("short-behind-long: 16-token request during 7 x " f"{long_tokens}-token ÷ alone",
            f"{ratio:.2f}  ({statistics.median(busy) * 1e3:.0f} vs {alone * 1e3:.0f} ms)",
            "<= 1.5", ratio <= 1.5)


def _load(url: str, n: int, conc: int):
    import httpx
    rng = random.Random(0)
    bodies = [{"prompt": PROMPT[:rng.randint(5, len(PROMPT))], "temperature": 0.8, "seed": i,
               "max_new_tokens": rng.choice([16, 32, 64, 128, 256]), "stream": i % 2 == 1}
              for i in range(n)]
    local, errors, lat = threading.local(), [], []

    def one(b):
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=600)
        try:
            lat.append(_post(local.c, url, b)[1])
        except Exception as e:                                  # noqa: BLE001 - counted
            errors.append(repr(e))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, bodies))
    wall = time.perf_counter() - t0
    lat.sort()
    p = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
    return [(f"load: {n} requests, conc {conc}, 16-256 tokens, half streamed: errors",
             f"{len(errors)}" + (f" ({errors[0][:80]})" if errors else ""), "0", not errors),
            ("load: latency p50 / p99", f"{p(0.5):.0f} / {p(0.99):.0f} ms  ({n / wall:.1f} req/s)",
             "reported", None)]
