"""Ray runtime helpers: connect (or start) Ray with the code travelling to every worker.

    from chimera.runtime import init_ray
    init_ray()            # RAY_ADDRESS (set by `ray job submit`) or a running local cluster,
                          # else a fresh local one; no-op when Ray is already initialised

Workers unpickle `chimera.train.loop.train_fn_per_worker` (Serve replicas `serve.app` classes),
so `chimera`, `models` and `serve` must be
importable on every node even where the project is not installed. `platform/` is a source
root, not a package, so the working dir alone is not enough: the packages travel as
runtime_env `py_modules` (uploaded once, content-addressed). Data, checkpoints and the venv are
not part of them; `ray job submit --working-dir .` skips them through .gitignore.
Storage paths and run names are resolved in chimera.train.config (absolute before workers start).
"""
from __future__ import annotations

import os
from typing import Any

from chimera.paths import REPO



def runtime_env() -> dict[str, Any]:
    return {"py_modules": [str(REPO / "platform" / "chimera"), str(REPO / "models"), str(REPO / "serve")],
            "excludes": ["__pycache__", "*.pyc"]}


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), **kwargs)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env(), include_dashboard=False, **kwargs)
