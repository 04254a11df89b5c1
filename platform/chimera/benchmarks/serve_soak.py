"""The serving soak (`python jobs/bench.py serve`, last rows) and the replica handling that it and
tests/test_serve_faults_ray.py share: find a deployment's replicas, their PIDs and load, kill
one with SIGKILL (a crash, not a graceful stop), wait for Serve to replace it, read a
process's resident memory.

The soak sends a bounded mixed load — `n` requests at concurrency `conc`, /generate and
/v1/completions alternately, every other one streamed, 16–256 new tokens, sampled with and
without a seed — to an app with two replicas of one model behind its front end, and kills a
replica (never the same survivor) `kills` times while the load runs. Each response is
classified: a complete 200, a 503 with an error body, a stream that ended with an error event
— or a failure (anything else: a 5xx without our body, a cut connection, a stream with neither
[DONE] nor an error event, a request that outlived its deadline). Rows: requests and their
outcome by kind (non-streamed requests must all succeed: a dead replica's are retried), p50 /
p99 latency, seconds from each kill until the deployment has all its replicas again, and the
surviving replica's RSS before and after (within 10%).
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


@dataclass(frozen=True)
class Replica:
    name: str           # Serve's actor name: SERVE_REPLICA::<app>#<deployment>#<id>
    actor: object
    pid: int


def replicas(app: str, deployment: str) -> list[Replica]:
    """The live replicas of `deployment` in `app` (needs ray initialised in this process)."""
    import ray
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            try:
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                pid = ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
            except Exception:                                   # noqa: BLE001 - dying now
                continue
            out.append(Replica(a["name"], h, pid))
    return sorted(out, key=lambda r: r.name)


def ongoing(r: Replica) -> int:
    """Requests the replica holds now (Serve's own count; it answers off the user's thread)."""
    import ray
    return ray.get(r.actor.get_num_ongoing_requests.remote(), timeout=30)


def kill(r: Replica) -> float:
    """SIGKILL the replica's process; returns when (time.monotonic())."""
    os.kill(r.pid, signal.SIGKILL)
    return time.monotonic()


def wait_running(app: str, deployment: str, n: int, gone: set[str] = frozenset(),
                 timeout_s: float = 120.0) -> float:
    """Until `n` replicas are RUNNING and answer, none of them in `gone`; returns the time."""
    from ray import serve
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        d = serve.status().applications[app].deployments[deployment]
        if d.replica_states.get("RUNNING", 0) >= n:
            live = [r for r in replicas(app, deployment) if r.name not in gone]
            if len(live) >= n:
                return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"{deployment}: fewer than {n} replicas running after {timeout_s:.0f} s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def outcome(client, url: str, body: dict, path: str, headers: dict) -> str:
    """One request's outcome: 'ok', 'ok_stream', '503', 'stream_error_event' or 'failed: ...'."""
    try:
        if not body.get("stream"):
            r = client.post(url + path, json=body, headers=headers)
            if r.status_code == 200:
                j = r.json()
                return "ok" if ("text" in j or "choices" in j) else f"failed: 200 {r.text[:80]}"
            if r.status_code == 503 and "error" in r.json():
                return "503"
            return f"failed: {r.status_code} {r.text[:80]}"
        last = None
        with client.stream("POST", url + path, json=body, headers=headers) as r:
            if r.status_code == 503:
                r.read()
                return "503" if "error" in r.json() else f"failed: 503 {r.text[:80]}"
            if r.status_code != 200:
                r.read()
                return f"failed: {r.status_code} {r.text[:80]}"
            for line in r.iter_lines():
                if line.startswith("data: "):
                    last = line[6:]
        if last == "[DONE]":
            return "ok_stream"
        if last and "error" in json.loads(last):
            return "stream_error_event"
        return f"failed: stream ended silently after {last!r:.60}"
    except Exception as e:                                      # noqa: BLE001 - counted
        return f"failed: {type(e).__name__}: {str(e)[:80]}"


def soak(url: str, app: str, deployment: str, key: str | None, n: int = 1000, conc: int = 32,
         kills: int = 2, deadline_s: float = 120.0) -> list[tuple]:
    import httpx
    rng = random.Random(0)
    bodies = []
    for i in range(n):
        path = "/generate" if i % 4 < 2 else "/v1/completions"
        limit = "max_new_tokens" if path == "/generate" else "max_tokens"
        b = {"prompt": PROMPT[:rng.randint(5, len(PROMPT))], "temperature": 0.8,
             limit: rng.choice([16, 32, 64, 128, 256]), "stream": i % 2 == 1}
        if i % 3:
            b["seed"] = i
        bodies.append((path, b))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    two = replicas(app, deployment)
    survivor = two[0]
    rss0 = rss_bytes(survivor.pid)
    done = Counter()
    results: list[tuple[bool, str, float]] = []
    local = threading.local()

    def one(pb):
        path, b = pb
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=deadline_s + 30)      # past it: a hung request
        t0 = time.perf_counter()
        o = outcome(local.c, url, b, path, headers)
        results.append((b["stream"], o, time.perf_counter() - t0))
        done["n"] += 1

    recoveries, killed = [], set()

    def killer():
        for k in range(kills):
            while done["n"] < n * (k + 1) / (kills + 1):
                time.sleep(0.05)
            victim = next(r for r in replicas(app, deployment)
                          if r.name != survivor.name and r.name not in killed)
            t = kill(victim)
            killed.add(victim.name)
            recoveries.append(wait_running(app, deployment, 2, killed) - t)
    t0 = time.perf_counter()
    k = threading.Thread(target=killer, daemon=True)
    k.start()
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(one, bodies))
    wall = time.perf_counter() - t0
    k.join(150)
    rss1 = rss_bytes(survivor.pid)
    kinds = Counter(o if not o.startswith("failed") else "failed" for _, o, _ in results)
    plain_bad = [o for s, o, _ in results if not s and o != "ok"]
    failed = [o for _, o, _ in results if o.startswith("failed")]
    hung = [t for _, _, t in results if t > deadline_s]
    lat = sorted(t for _, _, t in results)
    p = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))] * 1e3  # noqa: E731
    by_kind = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
    rows = [
        (f"soak: {n} requests, conc {conc}, 2 replicas, {len(recoveries)} killed (SIGKILL): outcomes",
         by_kind + (f"  (first failure: {failed[0]})" if failed else ""),
         "every one complete, a 503 with a body, or a stream ending in an error event",
         not failed),
        ("soak: non-streamed requests not answered 200", f"{len(plain_bad)}", "0", not plain_bad),
        ("soak: requests past their deadline (hung)", f"{len(hung)}", "0", not hung),
        ("soak: latency p50 / p99", f"{p(0.5):.0f} / {p(0.99):.0f} ms  ({n / wall:.1f} req/s, "
         f"{wall:.0f} s)", "reported", None),
        ("soak: seconds from a kill until 2 replicas run again",
         " / ".join(f"{r:.1f}" for r in recoveries) or "no kill", "reported", None),
        ("soak: surviving replica RSS after ÷ before",
         f"{rss1 / rss0:.3f}  ({rss1 / 2**20:.0f} vs {rss0 / 2**20:.0f} MiB)", "within 10%",
         abs(rss1 / rss0 - 1) <= 0.10),
    ]
    if len(recoveries) < kills:
        rows.append(("soak: kills done", f"{len(recoveries)} of {kills}", f"{kills}", False))
    return rows

