"""cluster.yaml passes Ray's own cluster-config validation (no cloud call) and keeps the
invariants: nothing but SSH opened (the Serve port only through the commented-out rule, and
never to the world), dashboard on localhost, token auth on every node, shared s3:// storage
as the jobs' default, S3 access for the workers, a CUDA-12-capable AMI, the pinned Ray image
and pinned install, repository synced."""
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
