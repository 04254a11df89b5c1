"""Shared test fixtures. Unit tests run on CPU without Ray; integration tests carry markers.

Every test runs on a machine that looks new: before anything imports Ray, this file points
HOME and TMPDIR at fresh empty folders and drops the variables a developer's shell may carry
(RAY_*, W&B, tiktoken and Hugging Face caches, CHIMERA_STORAGE). So a Ray token in
~/.ray/auth_token, a W&B login, or a tiktoken cache in /tmp/data-gym-cache cannot make a test
pass that fails for a new user. Subprocesses inherit the same environment. The folders are
removed after a passing session and kept (their path printed) after a failing one.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# what a developer's environment may hold that a new user's does not
LEAKY_ENV_PREFIXES = ("RAY_", "WANDB_", "HF_", "CHIMERA_", "AWS_")
TEST_KNOBS = ("CHIMERA_README_TEST",)          # settings of the test run itself (.ci/run)
LEAKY_ENV = ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "TRANSFORMERS_CACHE", "TORCH_HOME",
             "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "PYTHONSTARTUP")


def _fresh_machine() -> Path:
    """HOME and TMPDIR -> new empty folders (short: Ray's socket paths must stay < 108 chars)."""
    base = Path(tempfile.mkdtemp(prefix="cht-", dir="/tmp"))
    (base / "home").mkdir()
    (base / "t").mkdir()
    for k in list(os.environ):
        if (k.startswith(LEAKY_ENV_PREFIXES) or k in LEAKY_ENV) and k not in TEST_KNOBS:
            del os.environ[k]
    os.environ["HOME"] = str(base / "home")
    os.environ["TMPDIR"] = str(base / "t")
    tempfile.tempdir = None                        # recomputed from TMPDIR (pytest's tmp_path too)
    return base


FRESH = _fresh_machine()


def pytest_sessionfinish(session, exitstatus):
    import shutil
    if exitstatus == 0:
        shutil.rmtree(FRESH, ignore_errors=True)
    else:
        print(f"\nthe tests' HOME and TMPDIR are kept in {FRESH}", file=sys.stderr)
# Import from this checkout even when the package is not installed (e.g. a bare clone).
for p in (ROOT, ROOT / "platform"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only in CI: copy what must be written to)."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.fail(f"{d} is missing: the tests need ../shared beside the repository")
    return d


# --- data (issue 3) ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _tiktoken_cache_copy(shared_data, tmp_path_factory) -> Path:
    """A writable copy of ../shared/data/tiktoken_cache (tiktoken may write into its cache)."""
    import shutil

    src = shared_data / "tiktoken_cache"
    dst = tmp_path_factory.mktemp("tiktoken_cache")
    for f in src.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture
def tiktoken_cache(_tiktoken_cache_copy, monkeypatch) -> Path:
    """TIKTOKEN_CACHE_DIR -> the writable copy, so `gpt2` loads offline; returns the folder."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(_tiktoken_cache_copy))
    return _tiktoken_cache_copy


@pytest.fixture(scope="session")
def shakespeare_path(shared_data) -> Path:
    """Tiny Shakespeare, 1115394 characters (read it, never write to it)."""
    return shared_data / "tinyshakespeare" / "input.txt"


# --- training (issue 4) -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def train_char_data(tmp_path_factory, shakespeare_path) -> Path:
    """Tiny Shakespeare prepared with the char tokenizer (vocab 65), one shard per split."""
    from chimera.data.prepare import prepare

    out = tmp_path_factory.mktemp("train_shakespeare_char")
    prepare("shakespeare", sources=[shakespeare_path], tokenizer="char", out=out,
            progress=False, log=lambda *_: None)
    return out


# --- object storage (issue 16) -----------------------------------------------------------------
TEST_BUCKET = "chimera-test"


@pytest.fixture(scope="session")
def object_store():
    """ONE SeaweedFS S3 server for the session (chimera.localstore), started on free loopback
    ports with signed requests, its AWS_* settings in os.environ for the whole session (so
    the Ray cluster's workers, started after it, inherit them) and bucket `chimera-test`."""
    from chimera.localstore import ObjectStore

    store = ObjectStore().start()
    store.make_bucket(TEST_BUCKET)
    os.environ.update(store.env)
    yield store
    for k in store.env:
        os.environ.pop(k, None)
    store.stop()


@pytest.fixture
def s3_prefix(object_store, request) -> str:
    """s3://chimera-test/<unique>: a fresh prefix for one test."""
    import uuid
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(object_store):
    """ONE local Ray cluster for every `ray` test of the session (start/stop costs seconds);
    after the object store, so that its workers reach s3:// with the store's settings."""
    import os

    import ray
    from chimera.runtime import init_ray

    # fewer helper actors/processes per run on 2 cores; one copy of each worker print
    for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_PRINT_PATCH",
              "RAY_TRAIN_METRICS_ENABLED", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION"):
        os.environ.setdefault(k, "0")
    # a private instance: never a cluster of `ray start` (RAY_ADDRESS, /tmp/ray/ray_current_cluster)
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4, address="local")
    yield
    ray.shutdown()


# --- serving (issue 6) ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, train_char_data) -> Path:
    """A tiny trained char-level checkpoint (2 layers, n_embd 64, block 64), trained in-process
    for 30 steps without Ray: the run dir's best checkpoint."""
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    from chimera.train.loop import train_fn_per_worker

    tmp = tmp_path_factory.mktemp("tiny_run")
    plan = plan_run(load_train_config({
        "data_dir": str(train_char_data), "n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64,
        "batch_size": 8, "total_batch_size_str": "8*64", "max_iters": 30, "eval": True,
        "eval_interval": 30, "eval_iters": 2, "save_model": True, "storage_path": str(tmp),
        "run_name": "tiny", "learning_rate": 1e-2, "warmup_steps": 3}))
    s = train_fn_per_worker(plan.worker_config)
    return Path(s["best_checkpoint"])
