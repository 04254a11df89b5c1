"""cluster.yaml's node types on one host: Ray's fake multi-node autoscaler, started with
`ray start --head`, token authentication on, stopped without touching any other Ray process.

    with FakeAutoscalingCluster("cluster.yaml", env={...AWS_*...}) as c:   # ray start --head
        c.dashboard_url, c.env            # `ray job submit --address`, RAY_AUTH_MODE=token ...
        c.nodes()                         # alive nodes: id, node type (by its resources)
        c.job_status(id), c.autoscaler_log()
    # left: every process of this cluster killed (its temp dir and ports name them)
    fake_autoscaling_config(cluster, gcs_address, idle_timeout_s)   # the config it runs

Test infrastructure, so it lives beside the tests (not in chimera/): the fake multi-node
provider is what Ray's own autoscaler tests use, never a user's cluster. What it takes from
cluster.yaml is what the autoscaler decides with: the worker node types, their resources,
min_workers / max_workers, the cluster's max_workers and upscaling_speed. What it changes:
  * CPUs: one per GPU (at least one) instead of the instance's vCPUs, so that two "g5.xlarge"
    nodes fit a 2-core host; GPU counts and other resources stay (a fake node has a GPU id
    but no CUDA: jobs request the GPU resource and compute on CPU).
  * object_store_memory: 100 MB per node (each fake node is a raylet with its own store).
  * the head is `ray.head.default` (the name the provider gives the head it does not start),
    with the head type's resources (CPU 0: it runs drivers and Ray Train's controller only).
  * idle_timeout: seconds instead of minutes, so removal of idle nodes is seen in a test.
Probed with Ray 2.60.0: `ray up` cannot start a fake multi-node cluster (the wheel lacks the
provider's example.yaml; relaunching the fake head fails with KeyError 'node'), but
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE` can, with the provider's
`gcs_address` set (else it assumes port 6379) and `launch_multiple: true`.

Autoscaler v2 (RAY_enable_autoscaler_v2=1), not v1: with v1 the fake cluster launched a third,
idle node in 2 of 3 runs for a placement group of two {CPU: 1, GPU: 1} bundles. Its update
after the first two nodes had joined still listed the placement group as pending (the demand
report lags the reservation by one update) and queued two more nodes; before that, the
provider's one-by-one launch let an update see one node of two with no launch pending. v2's
instance manager tracks every requested instance until it runs Ray: exactly two nodes in
every run. Under v2 the provider is given as `type: external` with Ray's own class
(FakeMultiNodeProvider): for the type `fake_multinode` v2 reads defaults from the missing
example.yaml and its monitor dies (FileNotFoundError in monitor.err).
Ports: everything on free ports, the head's worker processes included (`--worker-port-list`;
Ray's default range 10002-19999 may be another cluster's). Fake worker nodes pick their own
free ports (the provider starts them with port 0). Every fake node shares the head's temp dir,
so LocalCluster's process search (command lines naming the temp dir or the GCS port) finds
them too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from chimera.localcluster import LocalCluster, free_port

HEAD_TYPE = "ray.head.default"       # the provider's own name for the head
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"   # and its node id
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def fake_node_resources(resources: dict) -> dict:
    """A node type's resources on this host: CPU one per GPU (at least one), the rest kept."""
    out = dict(resources)
    out["CPU"] = max(1, int(resources.get("GPU", 0)))
    out["object_store_memory"] = OBJECT_STORE_BYTES
    return out


def fake_autoscaling_config(cluster: dict, gcs_address: str, idle_timeout_s: float = 5.0) -> dict:
    """The autoscaling config of a fake_multinode cluster with `cluster`'s node types."""
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    nodes = {HEAD_TYPE: {"resources": dict(types[head].get("resources") or {}),
                         "node_config": {}, "max_workers": 0}}
    for name, t in types.items():
        if name == head:
            continue
        if "GPU" not in (t.get("resources") or {}):
            raise ValueError(f"cluster.yaml: node type {name} declares no GPU resource "
                             f"(resources: {t.get('resources')})")
        nodes[name] = {"resources": fake_node_resources(t["resources"]), "node_config": {},
                       "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
    return {
        "cluster_name": f"fake-{cluster['cluster_name']}",
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        # Ray's fake provider as an "external" one: under its own type name the autoscaler
        # v2 reads defaults from the provider's example.yaml, which the 2.60 wheel lacks
        "provider": {"type": "external", "module": PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True, "gcs_address": gcs_address,
                     "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": nodes,
        "head_node_type": HEAD_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster(LocalCluster):
    """LocalCluster (own temp dir, free ports, own token, stops only its own processes) whose
    head runs the autoscaler with cluster.yaml's node types on the fake provider.
    `env`: extra variables of every process of the cluster (the object store's AWS_*: the
    fake nodes' raylets inherit the head's environment)."""

    def __init__(self, cluster_yaml: str | Path, env: dict | None = None,
                 idle_timeout_s: float = 5.0, head_worker_ports: int = 24, log=print):
        self.cluster = yaml.safe_load(Path(cluster_yaml).read_text())
        head = self.cluster["available_node_types"][self.cluster["head_node_type"]]
        super().__init__(num_cpus=int(head.get("resources", {}).get("CPU", 0)), log=log)
        self.extra_env = dict(env or {})
        self.worker_ports = sorted({free_port() for _ in range(head_worker_ports)})
        self.config = fake_autoscaling_config(self.cluster, self.address, idle_timeout_s)
        self.config_path = Path(self.temp_dir) / "fake_autoscaling.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start_command(self) -> list[str]:
        return [*super().start_command(), f"--autoscaling-config={self.config_path}",
                f"--worker-port-list={','.join(map(str, self.worker_ports))}"]

    def start_env(self) -> dict[str, str]:
        # RAY_ADDRESS: Ray's helpers that look "the" cluster up (Train's PlacementGroupCleaner)
        # find this one, not another Ray instance of the host
        # PYTHONPATH: every worker imports this checkout's packages (one host, one checkout)
        root = Path(__file__).resolve().parents[1]
        path = [str(root / "platform"), str(root)]
        return {**super().start_env(), **self.extra_env, "RAY_FAKE_CLUSTER": "1",
                "RAY_ADDRESS": self.address, "PYTHONPATH": os.pathsep.join(path),
                # autoscaler v2 (its head is the provider's fake head node id)
                "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                "AUTOSCALER_UPDATE_INTERVAL_S": "1"}     # a scaling decision every second

    def api(self, path: str):
        """GET a dashboard API path (token authentication on) -> its JSON."""
        import urllib.request
        token = Path(self.token_path).read_text().strip()
        req = urllib.request.Request(f"{self.dashboard_url}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """Alive nodes (the state API): node_id, is_head, resources_total, and node_type: the
        fake config's type whose resources the node has (fake_node_type)."""
        data = self.api("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        return [{"node_id": n["node_id"], "is_head": n["is_head_node"],
                 "resources": n.get("resources_total", {}),
                 "node_type": HEAD_TYPE if n["is_head_node"] else
                 fake_node_type(self.config, n.get("resources_total", {}))}
                for n in data if n.get("state") == "ALIVE"]

    def autoscaler_log(self) -> str:
        """The autoscaler's log and errors (monitor.log, monitor.err of this cluster)."""
        logs = {p.resolve() for p in Path(self.temp_dir).glob("session_*/logs/monitor.[le]*")}
        return "".join(p.read_text(errors="replace") for p in sorted(logs))   # not session_latest

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]


def fake_node_type(config: dict, resources: dict) -> str | None:
    """The worker node type of `config` with exactly these CPU/GPU/custom resources (Ray adds
    memory, object store and node:<ip> entries of its own), or None."""
    def core(r: dict) -> dict:
        return {k: float(v) for k, v in r.items() if k not in ("memory", "object_store_memory")
                and not k.startswith("node:") and not k.startswith("accelerator_type")}
    have = core(resources)
    found = [name for name, t in config["available_node_types"].items()
             if name != HEAD_TYPE and core(t["resources"]) == have]
    return found[0] if len(found) == 1 else None
