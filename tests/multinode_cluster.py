"""Multi-node scenarios on one host: a `ray.cluster_utils.Cluster` of several raylets.

    python tests/multinode_cluster.py spread    --data DIR --storage DIR --out result.json
    python tests/multinode_cluster.py node_loss --data DIR --storage DIR --out result.json
    python tests/multinode_cluster.py sweep     --data DIR --storage DIR --out result.json

Run as its own process by tests/test_multinode.py: a driver can `ray.init` only once, and the
test session already holds its single local cluster (conftest.ray_cluster).

The cluster mirrors cluster.yaml: a head with no CPUs (it runs only the driver and Ray Train's
0-CPU controller) and worker nodes with 1 CPU each, so two 1-CPU training workers can only run
on two different nodes; the result maps the node names (a, b, c) to their Ray node ids, which
the run's final metrics row lists per worker rank (`node_ids`). One tmp folder, seen by every
"node" (it is one host), stands in for the s3:// storage_path a real cluster needs. The job
runs through jobs/train.py's main() with RAY_ADDRESS set, as `ray job submit` would run it.

Scenarios (the result JSON gives node ids by name, the return code, and what the scenario did):
  spread     a 2-worker run on nodes a and b completes.
  node_loss  a 2-worker run on a and b; once Ray Train has registered its first checkpoint, b is
             killed (as a reclaimed spot instance is) and node c joins (as the autoscaler's
             replacement would); the run resumes from its last checkpoint on a and c and finishes.
  sweep      jobs/sweep.py with two 1-CPU trials on nodes a and b; the result lists the node
             of every Tune trial actor (Ray's state API: the head runs the dashboard).
  elastic    a run on 1..2 workers (--min_workers 1) on a and b; once a checkpoint is registered
             b is killed and the run goes on with one worker; once it has, c joins and the run
             grows back to two workers (a and c) and finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS: list = []          # shut down in main(), whatever happens
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
        "--up_dim", "64", "--block_size", "32", "--batch_size", "8", "--total_batch_size_str",
        "2*8*32", "--learning_rate", "3e-3", "--warmup_steps", "5", "--num_workers", "2"]
T0 = time.monotonic()


def _log(msg: str) -> None:
    print(f"[multinode {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_cluster(names: list[str]):
    """Head (no CPUs) + one 1-CPU node per name; once more if Ray's fixed 30 s node start-up
    wait runs out (it does when the host is saturated by other work)."""
    for attempt in (1, 2):
        try:
            return _try_start_cluster(names)
        except Exception as e:                     # ray raises a bare Exception for it
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            _log(f"cluster start failed ({e}); retrying once")
            for c in CLUSTERS:
                c.shutdown()
            CLUSTERS.clear()
            _end_children()             # what the half-started node left (no Node to stop it)


def _end_children() -> None:
    """Stop the processes this script started (and only those), by pid."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        k.terminate()
    _, alive = psutil.wait_procs(kids, timeout=10)
    for k in alive:
        k.kill()


def _try_start_cluster(names: list[str]):
    from ray.cluster_utils import Cluster

    import ray._private.services as services
    import ray._private.utils

    gcs_port, dashboard_port = _free_ports(2)
    # RAY_ADDRESS before the head starts: every process of this cluster inherits it, so Ray's
    # own helpers that auto-detect "the" cluster (Train's PlacementGroupCleaner queries the
    # state API that way) find this one, not another Ray instance running on the same host.
    os.environ["RAY_ADDRESS"] = f"{services.get_node_ip_address()}:{gcs_port}"
    # Cluster() also records its address as the host's "current cluster" (/tmp/ray), where a
    # plain `ray.init()` in ANY other process would then connect (concurrent test sessions on
    # this host start their own local clusters that way): this one is reached by RAY_ADDRESS only.
    ray._private.utils.write_ray_address = lambda *a, **k: None
    # the head: no CPUs, as in cluster.yaml; its dashboard serves the state API (trial nodes)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": gcs_port, "dashboard_port": dashboard_port})
    CLUSTERS.append(cluster)
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    nodes = {n: cluster.add_node(num_cpus=1) for n in names}
    cluster.wait_for_nodes()
    _log(f"cluster up: head + {', '.join(names)}")
    return cluster, nodes


def _train(args, extra: list[str]) -> int:
    sys.path.append(str(ROOT / "jobs"))          # after the packages: jobs/serve.py is no `serve`
    import train
    _log("job starts")
    return train.main(["--data_dir", args.data, "--storage_path", args.storage, *TINY, *extra])


def spread(args) -> dict:
    cluster, nodes = _start_cluster(["a", "b"])
    rc = _train(args, ["--run_name", "spread", "--max_iters", "20", "--log_interval", "10",
                       "--save_model", "--ckpt_interval", "10"])
    return {"rc": rc, "nodes": {n: v.node_id for n, v in nodes.items()}, "run": "spread"}


def _committed_step(run_dir: Path) -> int | None:
    """Step of the run's latest checkpoint as Ray Train's controller has registered it (a
    checkpoint folder appears on storage before the controller registers it; a failure in
    between restarts from the previous one)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):     # not there yet, or mid-write
        return None


def node_loss(args) -> dict:
    cluster, nodes = _start_cluster(["a", "b"])
    run_dir = Path(args.storage) / "node_loss"
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(rc=_train(
        args, ["--run_name", "node_loss", "--max_iters", str(args.max_iters), "--log_interval", "10",
               "--save_model", "--ckpt_interval", "10", "--max_failures", "2"])), daemon=True)
    t.start()
    seen, deadline = None, time.monotonic() + 200     # generous: 2 shared cores can be saturated
    while seen is None and t.is_alive() and time.monotonic() < deadline:
        seen = _committed_step(run_dir)
        time.sleep(0.05)
    out = {"nodes": {n: v.node_id for n, v in nodes.items()}, "run": "node_loss",
           "checkpoint_seen": seen, "finished_before_removal": not t.is_alive()}
    if seen is not None and t.is_alive():
        _log(f"checkpoint of step {seen} registered: killing node b")
        cluster.remove_node(nodes["b"], allow_graceful=False)     # kill -9, like a lost instance
        out["removed"] = "b"
        nodes["c"] = cluster.add_node(num_cpus=1)
        out["nodes"]["c"] = nodes["c"].node_id
        _log("node c joined")
    t.join(timeout=300)
    out["rc"] = box.get("rc", "timeout" if t.is_alive() else "no return code")
    return out


def _rows(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    except (OSError, ValueError):       # not there yet, or a line mid-write
        return []


def _wait(what: str, cond, t, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        if cond():
            _log(what)
            return True
        time.sleep(0.1)
    return False


def elastic(args) -> dict:
    """An elastic run (1..2 workers): b is killed once a checkpoint is registered, the run goes
    on with one worker; once it has, c joins and the run grows back to two."""
    cluster, nodes = _start_cluster(["a", "b"])
    run_dir = Path(args.storage) / "elastic"
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(rc=_train(
        args, ["--run_name", "elastic", "--max_iters", str(args.max_iters), "--log_interval", "10",
               "--save_model", "--ckpt_interval", "20", "--max_failures", "3",
               "--min_workers", "1", "--resize_interval_s", "2"])), daemon=True)
    t.start()
    out = {"nodes": {n: v.node_id for n, v in nodes.items()}, "run": "elastic"}
    if _wait("a checkpoint of the 2-worker run is registered: killing node b",
             lambda: _committed_step(run_dir) is not None, t):
        out["checkpoint_seen"] = _committed_step(run_dir)
        cluster.remove_node(nodes["b"], allow_graceful=False)     # kill -9, like a lost instance
        out["removed"] = "b"
        if _wait("the run goes on with 1 worker: node c joins",
                 lambda: any(r.get("world_size") == 1 for r in _rows(run_dir)), t):
            nodes["c"] = cluster.add_node(num_cpus=1)
            out["nodes"]["c"] = nodes["c"].node_id
            out["added"] = "c"
    t.join(timeout=400)
    out["rc"] = box.get("rc", "timeout" if t.is_alive() else "no return code")
    return out


def _trial_nodes() -> list[dict]:
    """Node id and pid of every Tune function-trial actor that ran on the cluster."""
    from ray.util.state import list_actors
    return [{"node_id": a.node_id, "pid": a.pid, "state": a.state}
            for a in list_actors(filters=[("class_name", "=", "ImplicitFunc")], detail=True,
                                 limit=1000, raise_on_missing_output=False)]


def sweep(args) -> dict:
    import yaml

    cluster, nodes = _start_cluster(["a", "b"])
    spec = Path(args.storage).parent / "spread.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "spread", "description": "two 1-CPU trials, two 1-CPU nodes",
        "base": {"dataset": "shakespeare", "data_dir": args.data, "n_layer": 2, "n_embd": 32,
                 "n_head": 4, "attn": "gqa", "n_kv_heads": 2, "up_dim": 64, "block_size": 32,
                 "batch_size": 8, "total_batch_size_str": "8*32", "max_iters": 20,
                 "learning_rate": 3.0e-3, "warmup_steps": 5, "eval_interval": 10,
                 "eval_iters": 2, "log_interval": 10, "ckpt_interval": 20},
        "space": {"pos_emb": {"grid": ["rope", "sin"]}}, "search": "grid",
        "metric": "val_loss", "mode": "min", "scheduler": {"type": "fifo"},
        "max_concurrent": 2, "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "decode_tokens": 0}))
    sys.path.append(str(ROOT / "jobs"))          # after the packages: jobs/serve.py is no `serve`
    import sweep as sweep_job
    _log("sweep starts")
    rc = sweep_job.main(["--spec", str(spec), "--storage_path", args.storage])
    return {"rc": rc, "nodes": {n: v.node_id for n, v in nodes.items()}, "sweep": "spread",
            "trial_actors": _trial_nodes()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["spread", "node_loss", "sweep", "elastic"])
    p.add_argument("--data", required=True, help="prepared char shards (tests' train_char_data)")
    p.add_argument("--storage", required=True, help="the shared storage_path of every node")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--max_iters", type=int, default=120, help="node_loss, elastic: run length")
    args = p.parse_args(argv)
    # fewer helper actors/processes per run on small CI machines (as in tests/conftest.py)
    for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_PRINT_PATCH",
              "RAY_TRAIN_METRICS_ENABLED", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION"):
        os.environ.setdefault(k, "0")
    # the controller polls workers (reports, health) every 2 s by default: a lost node is
    # noticed, and reports are collected, sooner
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # elastic: a worker group that waits for a node that is gone gives up sooner (default 60 s)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    t0 = time.monotonic()
    try:
        result = {"spread": spread, "node_loss": node_loss, "sweep": sweep,
                  "elastic": elastic}[args.scenario](args)
    finally:
        import ray
        _log("scenario done")
        ray.shutdown()
        for c in CLUSTERS:
            c.shutdown()
        _log("cluster down")
    result["seconds"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
