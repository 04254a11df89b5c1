"""cluster.yaml passes Ray's own cluster-config validation (no cloud call) and keeps the
secure-by-default invariants: nothing but SSH opened, dashboard on localhost, auth on, pinned
install, repository synced."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_schema_accepts_cluster_yaml(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config
    full = prepare_config(copy.deepcopy(cluster))       # fills provider defaults, offline
    validate_config(full)
    assert full["provider"]["type"] == "aws"
    types = full["available_node_types"]
    assert full["head_node_type"] in types
    assert any("gpu" in n for n in types), "no GPU worker type"
    assert any(t.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in types.values()), "no spot worker type"


def test_no_port_but_ssh_is_opened_and_dashboard_stays_local(cluster):
    sg = cluster["provider"].get("security_group", {})
    for rule in sg.get("IpPermissions", []):
        opened = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        if "0.0.0.0/0" in opened:
            assert rule.get("FromPort") == rule.get("ToPort") == 22, f"world-open rule: {rule}"
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0/0" not in text
    assert "RAY_AUTH_MODE=disabled" not in text and "AUTH_MODE=token" in text


def test_pinned_install_and_repo_sync(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "-c ~/chimera/constraints.txt" in setup
    assert cluster["file_mounts"] == {"~/chimera": "."}
    assert ".gitignore" in cluster.get("rsync_filter", [])
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins and any(p.startswith("ray==") for p in pins)
