"""Ray runtime helpers: connect to a cluster, or start a private local instance, with the code
(and the settings) every worker needs.

    from chimera.runtime import init_ray
    init_ray()            # RAY_ADDRESS (set by `ray job submit`, or "auto"): that cluster;
                          # unset or "local": a new private local instance. No-op when Ray is
                          # already initialised.

Workers unpickle `chimera.train.loop.train_fn_per_worker` (Serve replicas `serve.app` classes),
so `chimera`, `models` and `serve` must be importable in every worker process, where the
project may not be installed; `platform/` is a source root, not a package, so the working dir
alone is not enough.
  * On a cluster the packages travel as runtime_env `py_modules` (uploaded once,
    content-addressed; data, checkpoints and the venv are not part of them).
  * A local instance started here runs on this checkout: its processes inherit PYTHONPATH
    (the repo and platform/) and the RAY_TRAIN_* settings below from this process, so the job
    needs no runtime env at all. That matters for start-up: Ray keeps idle worker processes
    ready, but only for tasks and actors without a runtime env; with one, every actor (the
    Train controller, each training worker) first waits for a new process to start and
    import torch. On 2 CPUs that is most of a run's start-up (docs/benchmarks.md).
RAY_TRAIN_* settings (LOCAL_TRAIN_ENV, both paths): Ray Train's helper actors that a run on
one machine does not use stay off (the spot-preemption watcher, the dashboard's state
reconciliation, Prometheus metrics), workers print their own lines (no print patch), and the
controller checks its workers every 0.5 s instead of 2 s: it notices a started worker group,
a committed checkpoint and the end of the run that much sooner.
On a local instance chimera.train.loop.fit also leaves out Ray Train's PlacementGroupCleaner
(see its _local_trainer_class).
"""
from __future__ import annotations

import os
from typing import Any

from chimera.paths import REPO

# Ray Train settings for every run started through init_ray (values of the env variables)
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
LOCAL_TRAIN_ENV = {**TRAIN_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
                   "RAY_TRAIN_METRICS_ENABLED": "0"}
_started_local = False


def runtime_env() -> dict[str, Any]:
    """The job's runtime env on a cluster: the packages and the Ray Train settings."""
    return {"py_modules": [str(REPO / "platform" / "chimera"), str(REPO / "models"), str(REPO / "serve")],
            "excludes": ["__pycache__", "*.pyc"], "env_vars": dict(TRAIN_ENV)}


def started_local() -> bool:
    """True when init_ray started the Ray instance this process uses (no runtime env)."""
    return _started_local


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    global _started_local
    import ray
    if ray.is_initialized():
        return
    address = kwargs.pop("address", None) or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env(), **kwargs)
        return
    path = [str(REPO / "platform"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))     # the raylet passes it on
    for k, v in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=num_cpus, **kwargs)
    _started_local = True
