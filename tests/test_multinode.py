"""Multi-node behaviour, simulated on one host: several raylets (`ray.cluster_utils.Cluster`),
one shared storage folder standing in for S3. Each scenario runs in its own process
(tests/multinode_cluster.py): this session's driver is already attached to its one local
cluster (conftest.ray_cluster) and a process can join only one Ray cluster.

The head has no CPUs and every worker node one, as on cluster.yaml's GPU nodes (one GPU each):
two 1-CPU training workers cannot share a node. The final metrics row lists every rank's Ray
node id, which the tests compare with the ids of the nodes they started.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _scenario(name: str, data: Path, tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    storage, out, log = tmp_path / "storage", tmp_path / "result.json", tmp_path / "scenario.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_cluster.py"), name,
                               "--data", str(data), "--storage", str(storage), "--out", str(out),
                               *extra], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=560)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert proc.returncode == 0 and out.exists(), f"scenario {name} failed:\n{tail}"
    result = json.loads(out.read_text())
    assert result["rc"] == 0, f"the training job failed (rc {result['rc']}):\n{tail}"
    return result, storage


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_on_two_nodes_complete(train_char_data, tmp_path):
    r, storage = _scenario("spread", train_char_data, tmp_path)
    rows = _rows(storage / "spread")
    last = rows[-1]
    assert last["step"] == 20 and last["done"]
    nodes = r["nodes"]
    assert sorted(last["node_ids"]) == sorted([nodes["a"], nodes["b"]])   # one rank per node
    assert last["param_hashes"][0] == last["param_hashes"][1]              # DDP kept them equal
    assert (storage / "spread" / "checkpoint_000020" / "config.json").is_file()


def test_lost_node_run_resumes_from_checkpoint_on_replacement(train_char_data, tmp_path):
    max_iters = 120
    r, storage = _scenario("node_loss", train_char_data, tmp_path, "--max_iters", str(max_iters))
    assert r.get("removed") == "b", f"node b was not removed mid-run: {r}"
    rows = _rows(storage / "node_loss")
    first = [x for x in rows if "resumed_from_step" not in x]
    again = [x for x in rows if "resumed_from_step" in x]
    assert first and again, "the run did not restart from a checkpoint"
    resumed = again[0]["resumed_from_step"]
    # the latest checkpoint registered before the loss (or a later one), not step 0
    assert r["checkpoint_seen"] <= resumed < max_iters
    assert all(x["resumed_from_step"] == resumed for x in again)
    assert again[0]["step"] == resumed + 10                  # continues where the checkpoint was
    assert max(x["step"] for x in first) >= resumed          # which the first attempt had passed
    last = rows[-1]
    assert last["step"] == max_iters and last["done"]
    nodes = r["nodes"]
    assert sorted(last["node_ids"]) == sorted([nodes["a"], nodes["c"]])   # b is gone, c took over
    assert nodes["b"] not in last["node_ids"]
    assert last["param_hashes"][0] == last["param_hashes"][1]


def test_sweep_spreads_trials_across_nodes(train_char_data, tmp_path):
    r, storage = _scenario("sweep", train_char_data, tmp_path)
    root = storage / r["sweep"]
    results = json.loads((root / "results.json").read_text())
    trials = {t["trial_id"]: t for t in results["trials"]}
    assert sorted(trials) == ["t000", "t001"]
    for t in trials.values():
        assert t["status"] == "finished" and t["step"] == 20 and t["val_loss"] > 0, t
        assert Path(t["best_checkpoint"], "config.json").is_file()      # on the shared storage
    # trial -> the pid Tune recorded for it -> the node of that trial actor (Ray's state API)
    node_of_pid = {a["pid"]: a["node_id"] for a in r["trial_actors"]}
    placed = {}
    for name in trials:
        last = (root / name / "result.json").read_text().splitlines()[-1]
        placed[name] = node_of_pid[json.loads(last)["pid"]]
    assert sorted(placed.values()) == sorted([r["nodes"]["a"], r["nodes"]["b"]]), placed


def test_elastic_run_shrinks_on_node_loss_and_grows_back(train_char_data, tmp_path):
    """--min_workers 1 --num_workers 2: losing node b, the run goes on with one worker (from its
    last checkpoint, grad_accum doubled: the same tokens per step); when node c joins it grows
    back to two workers (again from the last checkpoint) and finishes on a and c."""
    max_iters = 2000
    r, storage = _scenario("elastic", train_char_data, tmp_path, "--max_iters", str(max_iters))
    assert r.get("removed") == "b" and r.get("added") == "c", f"the scenario did not run: {r}"
    rows = _rows(storage / "elastic")
    phases = []                                     # (world size, its rows), in order
    for x in rows:
        if not phases or phases[-1][0] != x["world_size"]:
            phases.append((x["world_size"], []))
        phases[-1][1].append(x)
    assert [w for w, _ in phases] == [2, 1, 2], [(w, len(p)) for w, p in phases]
    (_, first), (_, shrunk), (_, grown) = phases
    assert "resumed_from_step" not in first[0]
    for before, after in ((first, shrunk), (shrunk, grown)):
        resumed = after[0]["resumed_from_step"]
        assert resumed % 20 == 0 and resumed <= max(x["step"] for x in before)   # a checkpoint
        assert after[0]["step"] == resumed + 10                                   # the next row
        assert all(x["resumed_from_step"] == resumed for x in after)
        steps = [x["step"] for x in after]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)           # steps go on
    assert shrunk[0]["resumed_from_step"] >= r["checkpoint_seen"]
    assert all(x["tokens"] == x["step"] * 2 * 8 * 32 for x in rows)    # same tokens per step
    last = rows[-1]
    assert last["step"] == max_iters and last["done"] and last["world_size"] == 2
    nodes = r["nodes"]
    assert sorted(last["node_ids"]) == sorted([nodes["a"], nodes["c"]])
    assert last["param_hashes"][0] == last["param_hashes"][1]
    assert (storage / "elastic" / f"checkpoint_{max_iters:06d}" / "config.json").is_file()
