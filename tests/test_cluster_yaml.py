"""cluster.yaml passes Ray's own cluster-config validation (no cloud call) and keeps the
invariants: nothing but SSH opened (the Serve port only through the commented-out rule, and
never to the world), dashboard on localhost, token auth on every node, shared s3:// storage
as the jobs' default, S3 access for the workers, a CUDA-12-capable AMI, the pinned Ray image
and pinned install, repository synced; the bucket named once, data prepared once by a job into
the bucket (no node prepares anything), worker resources as the instances have them, and GPU
requests placed on on-demand nodes unless they ask for spot (Ray's own placement, offline)."""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster.yaml").read_text()


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(TEXT)


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config
    full = prepare_config(copy.deepcopy(cfg))       # fills provider defaults, offline
    validate_config(full)
    return full


def _world_open(rule: dict) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or \
        any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))


def _ports(rule: dict) -> range:
    return range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)


def test_ray_schema_accepts_cluster_yaml(cluster):
    full = _validate(cluster)
    assert full["provider"]["type"] == "aws" and full["provider"]["region"]
    types = full["available_node_types"]
    assert full["head_node_type"] in types
    assert types[full["head_node_type"]]["resources"].get("CPU") == 0   # head trains nothing
    gpu = {n: t for n, t in types.items() if n != full["head_node_type"]}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g5.xlarge", "p4d.24xlarge"}
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in gpu.values()), "no spot worker type"
    for name, t in gpu.items():
        assert t["min_workers"] <= t["max_workers"] <= full["max_workers"], name


def test_rejects_a_broken_config(cluster):
    """The validator used above does fail on a bad config (the test above can fail)."""
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_1x"]["max_workers"] = "eight"
    with pytest.raises(Exception):
        _validate(bad)


def test_nothing_but_ssh_open_and_dashboard_local(cluster):
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        if _world_open(rule):
            assert list(_ports(rule)) == [22], f"world-open rule: {rule}"
    assert "0.0.0.0/0" not in TEXT and "::/0" not in TEXT
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--ray-client-server-port" not in head and "--dashboard-port" not in head


def _commented_security_group() -> dict:
    lines = TEXT.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "# security_group:")
    block = []
    for l in lines[start:]:
        if not l.strip().startswith("#"):
            break
        block.append(l.replace("# ", "", 1))
    return yaml.safe_load("\n".join(block))["security_group"]


def test_serve_port_opens_only_on_request_and_never_to_the_world(cluster):
    assert "security_group" not in cluster["provider"]            # closed by default
    sg = _commented_security_group()                               # what the user uncomments
    rules = sg["IpPermissions"]
    assert [list(_ports(r)) for r in rules] == [[8000]]            # Serve's port, nothing else
    assert not any(_world_open(r) for r in rules)
    opened = copy.deepcopy(cluster)
    opened["provider"]["security_group"] = sg
    _validate(opened)                                              # and Ray accepts it


def test_token_auth_on_every_node(cluster):
    setup = cluster["setup_commands"]
    assert any("RAY_AUTH_MODE=token" in c and "chimera.env" in c for c in setup)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cluster[key]:                  # every ray start/stop sees RAY_AUTH_MODE=token
            assert cmd.startswith(". ~/chimera.env && "), f"{key}: {cmd}"
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one shared token
    assert "RAY_AUTH_MODE=disabled" not in TEXT


def test_shared_storage_is_s3_and_the_jobs_default(cluster, monkeypatch):
    from chimera.paths import STORAGE_ENV, resolve_storage_path

    exports = [m for c in cluster["setup_commands"]
               for m in re.findall(r"export (\w+)=(s3://\S+?)'", c)]
    assert exports == [(STORAGE_ENV, "s3://YOUR-BUCKET/chimera")]
    assert any("chimera.env" in c and ".bashrc" in c for c in cluster["setup_commands"])
    # the exported variable is what train and sweep jobs use when --storage_path is not given
    monkeypatch.setenv(STORAGE_ENV, "s3://my-bucket/chimera")
    assert resolve_storage_path(None) == "s3://my-bucket/chimera"
    assert resolve_storage_path("s3://other/x") == "s3://other/x"      # a flag still wins
    monkeypatch.delenv(STORAGE_ENV)
    assert resolve_storage_path(None).endswith("runs")


def test_workers_can_write_to_s3(cluster):
    head = cluster["head_node_type"]
    for name, t in cluster["available_node_types"].items():
        if name != head:                          # Ray gives the head its default profile
            assert t["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile"


def test_pinned_install_on_the_pinned_ray_image_and_repo_sync(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert 'pip install --quiet -c ~/chimera/constraints.txt -e "$HOME/chimera[eval]"' in setup
    pins = dict(l.split("==", 1) for l in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in l and not l.startswith("#"))
    assert pins["torch"] == "2.13.0"
    # Ray's image of exactly the pinned Ray, with the Python the pins were frozen with
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    d = cluster["docker"]
    assert d["image"] == f"rayproject/ray:{pins['ray']}-{py}-gpu"
    assert d["head_image"] == f"rayproject/ray:{pins['ray']}-{py}"
    assert cluster["file_mounts"]["~/chimera"] == "."
    assert ".gitignore" in cluster.get("rsync_filter", [])
    assert "**/.venv" in cluster["rsync_exclude"]


def test_every_node_gets_a_modern_gpu_ami(cluster):
    """Ray's default AWS AMI is an Ubuntu 18.04 / CUDA 11 image: every type names its own."""
    import ray
    aws_config = Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "config.py"
    ray_defaults = set(re.findall(r'"(ami-[0-9a-f]+)"', aws_config.read_text()))  # needs no boto3
    assert ray_defaults
    amis = {n: t["node_config"].get("ImageId") for n, t in cluster["available_node_types"].items()}
    assert len(set(amis.values())) == 1, amis
    ami = next(iter(amis.values()))
    assert ami and ami not in ray_defaults and ami.lower() != "latest_dlami"
    assert ami.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/") and "ubuntu-22.04" in ami


def _strings(x):
    """Every string value of a parsed YAML document."""
    if isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


def test_the_bucket_is_named_once(cluster):
    uses = [s for s in _strings(cluster) if "YOUR-BUCKET" in s]
    assert uses == ["echo 'export CHIMERA_STORAGE=s3://YOUR-BUCKET/chimera' > ~/chimera.env"]
    assert cluster["setup_commands"][0] == uses[0]              # "the first line of setup_commands"


def _header_commands() -> list[str]:
    """The commands of the file's opening comment, continuation lines joined."""
    out, cur = [], ""
    for line in TEXT.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            text = line[4:].split("  #")[0].rstrip()
            cur = f"{cur} {text.strip()}" if cur else text
            if not cur.endswith("\\"):
                out.append(cur)
                cur = ""
            else:
                cur = cur[:-1].rstrip()
    return out


def test_data_is_prepared_once_by_a_job_into_the_bucket_and_read_from_there(cluster):
    active = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                          "head_start_ray_commands", "worker_start_ray_commands")
              for c in cluster.get(k, [])]
    assert not any("prepare.py" in c for c in active), "a node prepares data at start-up"
    cmds = _header_commands()
    order = [next(i for i, c in enumerate(cmds) if c.startswith(p)) for p in (
        "aws s3 mb s3://YOUR-BUCKET", "ray get-auth-token --generate", "ray up cluster.yaml",
        "ray dashboard cluster.yaml", "export RAY_AUTH_MODE=token",
        "ray job submit --working-dir . -- python jobs/prepare.py",
        "ray job submit --working-dir . -- python jobs/train.py", "ray down cluster.yaml")]
    assert order == sorted(order), cmds
    prep = next(c for c in cmds if "jobs/prepare.py" in c).split()
    train = next(c for c in cmds if "jobs/train.py" in c).split()
    out, data = prep[prep.index("--out") + 1], train[train.index("--data_dir") + 1]
    assert out == data == "'$CHIMERA_STORAGE/data/shakespeare_char'"   # expanded on the head
    # the jobs' flags exist (an unknown flag would fail on the cluster, after minutes of ray up)
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import train as train_job
        known = {o for a in train_job.build_parser()._actions for o in a.option_strings}
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    assert {"--num_workers", "--use_gpu", "--data_dir"} <= known
    job_args = train[train.index("jobs/train.py") + 1:]
    assert {a for a in job_args if a.startswith("--")} <= known


# what the instances have: the autoscaler plans with the declared resources
INSTANCES = {"g5.xlarge": {"CPU": 4, "GPU": 1}, "p4d.24xlarge": {"CPU": 96, "GPU": 8}}


def test_worker_resources_are_the_instances(cluster):
    for name, t in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        r = {k: v for k, v in t["resources"].items() if k != "spot"}
        assert r == INSTANCES[t["node_config"]["InstanceType"]], name
        spot = t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        assert ("spot" in t["resources"]) == spot, f"{name}: the spot marker must mark spot types"


def _autoscaler_picks(cluster: dict, bundles: list[dict]) -> dict:
    """Ray's own (autoscaler v1) choice of node types to add for these bundles, offline."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (_default_utilization_scorer,
                                                                   get_nodes_for)
    full = _validate(cluster)
    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    add, rest = get_nodes_for(full["available_node_types"], {}, full["head_node_type"],
                              full["max_workers"], bundles, scorer)
    assert not rest, rest
    return dict(add)


def test_gpu_requests_get_on_demand_nodes_and_spot_only_on_request(cluster):
    gpu1 = {"CPU": 1, "GPU": 1}
    assert _autoscaler_picks(cluster, [gpu1, gpu1]) == {"gpu_1x": 2}      # a 2-worker training
    assert _autoscaler_picks(cluster, [{**gpu1, "spot": 1}] * 2) == {"gpu_1x_spot": 2}
    assert _autoscaler_picks(cluster, [{"CPU": 1, "GPU": 8}]) == {"gpu_8x": 1}
    # without the marker the two g5 types tie, and Ray's tie-break (names, descending) is spot
    tied = copy.deepcopy(cluster)
    tied["available_node_types"]["gpu_1x_spot"]["resources"].pop("spot")
    assert _autoscaler_picks(tied, [gpu1, gpu1]) == {"gpu_1x_spot": 2}
