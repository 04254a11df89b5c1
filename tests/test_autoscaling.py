"""Autoscaling from cluster.yaml's node types, exercised on this host: Ray's fake multi-node
provider (tests/fake_cluster.py) gets cluster.yaml's worker types, resources and limits; a
2-worker training job submitted with `ray job submit` (token authentication on) requests the
gpu_1x type's resources per worker; the autoscaler must start two gpu_1x nodes for it, the job
must succeed with its checkpoint in the object store, the idle nodes must go, and stopping the
cluster must leave none of its processes behind.

Its own cluster, started as subprocesses (not the session's `ray_cluster`): `ray start --head
--autoscaling-config`, in its own temp dir, on free ports, with its own token file. The fake
nodes have a GPU id but no CUDA: the job requests the GPU resource with --worker_resources and
computes on CPU. They all share this host's file system, so the job needs no upload: the
entry point is this checkout's jobs/train.py by absolute path (an uploaded --working-dir would
be unpacked into the one session directory every fake node shares, and deleted under the
running workers when one node's runtime-env agent cleans it up).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chimera import storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]
GPU_TYPE = "gpu_1x"
TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
        "--up_dim", "64", "--block_size", "32", "--batch_size", "8",
        "--total_batch_size_str", "2*8*32", "--learning_rate", "3e-3", "--warmup_steps", "2"]


def _watch_nodes(cluster, seen: dict, stop: threading.Event) -> None:
    """Every worker node that was ever alive: node id -> node type."""
    while not stop.is_set():
        try:
            for n in cluster.nodes():
                if not n["is_head"]:
                    seen[n["node_id"]] = n["node_type"]
        except Exception:              # the dashboard may be busy for a moment
            pass
        stop.wait(0.5)


def test_autoscaler_starts_gpu_nodes_for_a_submitted_training_and_removes_them(
        train_char_data, object_store, s3_prefix, tmp_path):
    import psutil

    from fake_cluster import FakeAutoscalingCluster

    # as cluster.yaml's ~/chimera.env: CHIMERA_STORAGE (the jobs' default storage) in every Ray
    # process of the cluster, and the object store's settings (an instance profile's part)
    cluster = FakeAutoscalingCluster(ROOT / "cluster.yaml", idle_timeout_s=4, log=lambda *_: None,
                                     env={**object_store.env, "CHIMERA_STORAGE": s3_prefix})
    gpu = cluster.cluster["available_node_types"][GPU_TYPE]["resources"]
    want = {k: v for k, v in gpu.items() if k != "CPU"}          # CPUs: one per worker (num_threads)
    assert cluster.config["available_node_types"][GPU_TYPE]["max_workers"] == \
        cluster.cluster["available_node_types"][GPU_TYPE]["max_workers"]
    run = "autoscale"
    seen: dict[str, str | None] = {}
    stop = threading.Event()
    pids: list[int] = []
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    try:
        cluster.start()
        watcher = threading.Thread(target=_watch_nodes, args=(cluster, seen, stop), daemon=True)
        watcher.start()
        job_id = f"autoscale-{time.time_ns()}"
        cmd = [cluster.ray_bin, "job", "submit", f"--address={cluster.dashboard_url}",
               f"--submission-id={job_id}", "--", sys.executable, str(ROOT / "jobs" / "train.py"),
               "--data_dir", str(train_char_data), "--run_name", run,      # storage: the default
               *TINY, "--num_workers", "2", "--worker_resources", json.dumps(want),
               "--max_iters", "10", "--log_interval", "5", "--save_model", "--ckpt_interval", "10"]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=cluster.env,
                                  timeout=300)
        job_s = time.monotonic() - t0
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        assert proc.returncode == 0, \
            f"ray job submit failed ({proc.returncode}):\n{tail}\n{cluster.autoscaler_log()[-3000:]}"
        assert cluster.job_status(job_id) == "SUCCEEDED", tail
        # the autoscaler started exactly two nodes, both of the GPU type asked for
        assert sorted(seen.values()) == [GPU_TYPE, GPU_TYPE], \
            (seen, tail, cluster.autoscaler_log()[-6000:])
        # the idle nodes are removed (idle_timeout 4 s)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            alive = [n for n in cluster.nodes() if not n["is_head"]]
            if not alive:
                break
            time.sleep(1)
        assert not alive, f"idle nodes not removed: {alive}"
        idle_s = time.monotonic() - t0 - job_s
        # ... by the autoscaler, for being idle (autoscaler v2's instance manager says so)
        removed = re.findall(r"cloud_instance_id=(\w+), ray_id=\w*\): draining ray: idle for",
                             cluster.autoscaler_log())
        assert sorted(removed) == sorted(seen), removed
        pids = [p.pid for p in cluster.processes()]
        assert pids, "no process of the cluster found: the search below would prove nothing"
    finally:
        stop.set()
        (tmp_path / "monitor.log").write_text(cluster.autoscaler_log())      # kept for a failure
        cluster.stop()
    # nothing of this cluster is left: neither the processes seen before the stop nor any other
    # process whose command line names its temp dir or ports
    still = [pid for pid in pids if psutil.pid_exists(pid) and
             psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not still and not cluster.processes(), still
    # the checkpoint is in the object store, whole: read back twice, and downloaded, the same
    ckpt = storage.join(s3_prefix, run, "checkpoint_000010")
    names = storage.listdir(ckpt)
    assert "config.json" in names, names
    from chimera.checkpoint import WEIGHTS
    weights = storage.join(ckpt, WEIGHTS)
    h1, h2 = storage.sha256(weights), storage.sha256(weights)
    local = storage.download_dir(ckpt, tmp_path / "ckpt")
    assert h1 == h2 == hashlib.sha256((local / WEIGHTS).read_bytes()).hexdigest()
    assert storage.read_json(storage.join(ckpt, "config.json"))["n_layer"] == 2
    print(f"\nautoscaling: cluster start + job {job_s:.1f} s, worker nodes gone {idle_s:.1f} s "
          f"after `ray job submit` returned, nodes {seen}")
