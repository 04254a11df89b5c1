"""Where a Trainer runs: under Ray Train (a TorchTrainer worker) or in-process (a direct call:
unit tests, single-worker sweep trials, benchmarks). One class each, the same methods, chosen
once by `worker_context()`, so the Trainer never asks which one it has.

    ctx = worker_context(run_dir, keep_checkpoints)    # UnderRayTrain or InProcess
    ctx.rank, ctx.world                                 # this worker, all workers
    ctx.device(use_gpu)                                 # torch.device of this worker
    model = ctx.prepare_model(raw)                      # DDP under Ray (when world > 1)
    source = ctx.latest_checkpoint()                    # ray.train.Checkpoint of this run, or None
    ctx.report(metrics)                                 # a metrics row
    ctx.report(metrics, checkpoint=tmp_dir, name="checkpoint_000100")    # ... with a checkpoint
    ctx.node_id()                                       # Ray node id, or None

Under Ray Train a checkpoint goes through `ray.train.report` into <run_dir>/<name> (Ray keeps
the newest `keep_checkpoints`); in-process it is copied there and older ones are pruned here.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from typing import Any

import torch

from chimera import checkpoint as ckpt, storage


def worker_context(run_dir: str, keep_checkpoints: int) -> UnderRayTrain | InProcess:
    """UnderRayTrain inside a TorchTrainer worker, else InProcess."""
    import sys
    if "ray" not in sys.modules:              # no Ray in this process: not a Ray worker
        return InProcess(run_dir, keep_checkpoints)
    try:
        import ray.train
        ctx = ray.train.get_context()
        ctx.get_world_size()
    except Exception:
        return InProcess(run_dir, keep_checkpoints)
    return UnderRayTrain(ctx)


class UnderRayTrain:
    """A TorchTrainer worker: rank, world size, device and process group are Ray Train's."""

    def __init__(self, ctx):
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        quiet_report_log()

    def device(self, use_gpu: bool) -> torch.device:
        """Ray's device for this worker with use_gpu; the CPU otherwise, even on a node with
        a GPU (a worker that only requests one through worker_resources computes on CPU)."""
        import ray.train.torch
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP (gloo on CPU, NCCL on GPU) on the device the model is on (device() above)."""
        import ray.train.torch
        return ray.train.torch.prepare_model(model, move_to_device=next(model.parameters()).device)

    def latest_checkpoint(self):
        import ray.train
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint: str | None = None,
               name: str | None = None) -> None:
        """Every rank calls it with the same metrics; `checkpoint` (a local dir, rank 0 only)
        and `name` (every rank) when a checkpoint is due."""
        import ray.train
        if name is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint)
                         if checkpoint is not None else None, checkpoint_dir_name=name)
        if self.rank == 0:
            # Ray registers a report when its controller next reads the workers' queues; with
            # few reports that can be after a worker dies (its checkpoint would then be lost
            # to a restart). Wait until this one is committed: once per checkpoint.
            from ray.train import CheckpointConsistencyMode
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def node_id(self) -> str | None:
        try:
            import ray
            return ray.get_runtime_context().get_node_id()
        except Exception:
            return None


class LocalCheckpoint:
    """A checkpoint directory on this machine, used like a ray.train.Checkpoint (the Trainer
    calls `as_directory()` and reads `path`) without importing Ray."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class RemoteCheckpoint:
    """A checkpoint in object storage, used like a ray.train.Checkpoint: as_directory()
    downloads it into a temporary local folder (removed afterwards)."""

    def __init__(self, uri: str):
        self.path = uri

    @contextlib.contextmanager
    def as_directory(self):
        import tempfile
        tmp = tempfile.mkdtemp(prefix="chimera_restore_")
        try:
            yield str(storage.download_dir(self.path, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_at(path: str):
    """A checkpoint to restore from, local or a URI, without Ray."""
    return RemoteCheckpoint(path) if storage.is_uri(path) else LocalCheckpoint(path)


class InProcess:
    """A direct call: world size 1, no process group, nobody to report metrics to. The run's
    own latest complete checkpoint (local storage) is where a re-run resumes, as Ray Train
    resumes a run by its name."""
    rank, world = 0, 1

    def __init__(self, run_dir: str, keep_checkpoints: int):
        self.run_dir, self.keep = run_dir, keep_checkpoints

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def latest_checkpoint(self) -> LocalCheckpoint | None:
        """The newest checkpoint_NNNNNN/ of the run dir (local or a URI) holding weights and a
        train state."""
        done = [p for p in ckpt.list_checkpoints(self.run_dir)
                if storage.is_file(storage.join(p, ckpt.WEIGHTS))
                and storage.is_file(storage.join(p, ckpt.STATE))]
        return checkpoint_at(str(done[-1])) if done else None

    def report(self, metrics: dict[str, Any], checkpoint: str | None = None,
               name: str | None = None) -> None:
        """Metrics go nowhere (the run's metrics.jsonl and summary have them); a checkpoint is
        copied to <run_dir>/<name>, then the run keeps its newest `keep_checkpoints`."""
        if name is not None:
            if storage.is_uri(self.run_dir):
                copy_dir(checkpoint, storage.join(self.run_dir, name))
            else:                             # whole or not at all: a kill cannot leave half
                import os
                tmp = f"{self.run_dir}/.{name}.tmp"
                copy_dir(checkpoint, tmp)
                shutil.rmtree(f"{self.run_dir}/{name}", ignore_errors=True)
                os.replace(tmp, f"{self.run_dir}/{name}")
            ckpt.prune(self.run_dir, self.keep)

    def node_id(self) -> str | None:
        return None


def quiet_report_log() -> None:
    """Ray Train logs every `ray.train.report` at INFO with the whole metrics dict ("Reporting
    training result N: TrainingReport(...)"), from every rank, into the driver's output. The
    rows are in metrics.jsonl and the rank-0 line already: keep that logger to warnings.
    (Its name is the module's file path; tests/test_train_ray.py checks the lines are gone.)"""
    import logging
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:                                  # another Ray layout: lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


RESULT = "result.json"            # <run>/result.json: the run's summary, written at its end
METRICS = "metrics.jsonl"         # <run>/metrics.jsonl: one row per logged step (rank 0)


def write_run_file(run_dir: str, name: str, text: str) -> None:
    """Write <run_dir>/<name> (local path or URI), replacing it whole."""
    storage.write_text(storage.join(run_dir, name), text)


def read_run_file(run_dir: str, name: str) -> str | None:
    """<run_dir>/<name>'s text, or None when it is not there."""
    try:
        return storage.read_text(storage.join(run_dir, name))
    except (FileNotFoundError, OSError, storage.StorageError):
        return None


def copy_dir(src: str, dst: str) -> None:
    """Replace dst (local path or URI) by a copy of local dir src."""
    if storage.is_uri(dst):
        storage.upload_dir(src, dst, replace=True)
    else:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


class MetricsLog:
    """<run>/metrics.jsonl, written by rank 0. Local: appended line by line. On object storage
    (no appends) the rows since the run began (including a resumed run's earlier ones, read
    once) are kept and the object is rewritten whole by flush(): the Trainer flushes at evals,
    checkpoints and the end, and append() flushes when FLUSH_S has passed, so a long run costs
    one PUT per eval, not per step."""
    FLUSH_S = 10.0

    def __init__(self, run_dir: str):
        self.path = storage.join(run_dir, METRICS)
        self.remote = storage.is_uri(run_dir)
        self.lines: list[str] = []
        self.dirty, self.flushed_at = False, time.monotonic()
        if self.remote:
            old = read_run_file(run_dir, METRICS)
            self.lines = old.splitlines(keepends=True) if old else []

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(line)
            return
        self.lines.append(line)
        self.dirty = True
        if time.monotonic() - self.flushed_at >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            storage.write_text(self.path, "".join(self.lines))
            self.dirty, self.flushed_at = False, time.monotonic()
