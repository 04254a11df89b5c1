"""The entry points: `train_fn_per_worker(config)` (one per Ray Train worker) and `fit(plan)`.

    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    plan = plan_run(load_train_config({"max_iters": 50, "n_embd": 64, "data_dir": "..."}))
    summary = train_fn_per_worker(plan.worker_config)     # in-process, world size 1, no Ray
    summary = fit(plan)                                  # TorchTrainer on plan.train.num_workers

Each worker runs a chimera.train.trainer.Trainer in a chimera.train.context (under Ray Train
or in-process, decided once here), with the hooks it is given (chimera.train.hooks) plus the
tests' fault injection when `crash_at_step` is set (chimera.train.faults).
TorchTrainer pickles train_fn_per_worker by name: workers import it from this module.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from chimera.train.config import TrainConfig
from chimera.train.plan import RunPlan
from chimera.train.context import RESULT, read_run_file, worker_context
from chimera.train.faults import CrashAtStep
from chimera.train.hooks import Hook
from chimera.train.trainer import Trainer


def train_fn_per_worker(config: dict[str, Any], report: Callable[[dict], None] | None = None,
                        hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """One worker's training run; a summary dict (step, metrics, history, checkpoints).
    `report(metrics)` (in-process runs only, e.g. a Tune trial) is called at every eval with
    the cumulative metrics: the latest value of every key. `hooks`: see chimera.train.hooks."""
    tc = TrainConfig.from_dict(config["train"])
    if tc.crash_at_step:                  # the tests' fault injection, outside the Trainer
        hooks = [*hooks, CrashAtStep(tc.crash_at_step)]
    ctx = worker_context(config["run_dir"], tc.keep_checkpoints)
    return Trainer(config, ctx, hooks=hooks, report=report).run()


def runs_in_process(plan: RunPlan) -> bool:
    """Where jobs/train.py trains: in its own process (no Ray started) when asked, or by default
    when nothing needs Ray Train: one worker, no restarts (--max_failures 0), local storage, no
    cluster to join (RAY_ADDRESS unset or "local"), not elastic. A re-run resumes from the run's own latest
    checkpoint either way; on a cluster (`ray job submit`) it is always Ray Train."""
    tc = plan.train
    if tc.in_process is not None:
        return tc.in_process
    return (tc.num_workers == 1 and tc.max_failures == 0 and tc.min_workers is None
            and "://" not in plan.run_dir
            and os.environ.get("RAY_ADDRESS", "local") == "local")


def train(plan: RunPlan) -> dict[str, Any]:
    """jobs/train.py's run: in this process (runs_in_process), or on Ray Train workers."""
    if runs_in_process(plan):
        s = train_fn_per_worker(plan.worker_config)
        s.pop("history", None)
        return s
    from chimera.runtime import init_ray
    init_ray()
    return fit(plan)


def fit(plan: RunPlan, callbacks: list | None = None,
        train_fn: Callable[[dict], dict] = train_fn_per_worker,
        report_evals: bool = False) -> dict[str, Any]:
    """Run `train_fn` (train_fn_per_worker; the train benchmark passes a timed one) on
    plan.train.num_workers Ray Train workers; a summary dict.
    `callbacks`: Ray Train user callbacks (a sweep trial passes Tune's TuneReportCallback).
    `report_evals`: report every eval row to Ray (that callback needs them), not only
    checkpoints and the last row."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from chimera.runtime import started_local
    tc = plan.train
    # W&B settings of the driver (WANDB_MODE, WANDB_DIR, ...) reach rank 0. Only when there is
    # something to pass: workers with a runtime env cannot use Ray's idle worker processes.
    env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")} if tc.wandb_log else {}
    if not started_local():          # a local instance's workers inherit init_ray's settings
        from chimera.runtime import TRAIN_ENV
        env.update(TRAIN_ENV)
    trainer = (_local_trainer_class() if started_local() else TorchTrainer)(
        train_fn, train_loop_config={**plan.worker_config, "report_evals": report_evals},
        scaling_config=scaling_config(tc),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             callbacks=callbacks,
                             worker_runtime_env={"env_vars": env} if env else None))
    result = trainer.fit()
    text = read_run_file(plan.run_dir, RESULT)           # rank 0 wrote it at the last step
    if text is not None:
        s = json.loads(text)
        if result.checkpoint is not None:
            s["last_checkpoint"] = result.checkpoint.path
        return s
    m = dict(result.metrics or {})                       # the latest checkpoint's metrics
    best = f"{plan.run_dir}/{tc.file_name}_best" if tc.save_model and m.get("best_val_loss") else None
    return {"step": m.get("step"), "metrics": m, "last_checkpoint":
            result.checkpoint.path if result.checkpoint else None, "best_checkpoint": best,
            "resumed_from_step": m.get("resumed_from_step")}


def scaling_config(tc: TrainConfig):
    """Ray Train's ScalingConfig of a run: num_workers (min_workers..num_workers when elastic),
    CPUs (num_threads), one GPU with use_gpu, plus worker_resources."""
    from ray.train import ScalingConfig
    per_worker = {"CPU": max(1, tc.num_threads), **({"GPU": 1} if tc.use_gpu else {}),
                  **tc.extra_resources()}
    # Ray refuses GPU in resources_per_worker without use_gpu; a worker computes on CUDA only
    # with tc.use_gpu all the same (UnderRayTrain.device): worker_resources only places it
    workers = tc.num_workers if tc.min_workers is None else (tc.min_workers, tc.num_workers)
    elastic = {} if tc.min_workers is None else {
        "elastic_resize_monitor_interval_s": tc.resize_interval_s}
    return ScalingConfig(num_workers=workers, use_gpu=tc.use_gpu or per_worker.get("GPU", 0) > 0,
                         resources_per_worker=per_worker, **elastic)


def _local_trainer_class():
    """TorchTrainer without Ray Train's PlacementGroupCleaner, for a private local instance.
    The cleaner is a detached actor that removes the run's placement group should the
    controller die; it asks the state API (served by the dashboard) every second whether the
    controller lives. A private instance has no dashboard and ends with this process, so the
    cleaner can never work there: it only costs a process and logs "Failed to query Ray Train
    Controller actor state" once a second into the job's output."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):               # Ray 2.60's hook (private API)
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]
    return LocalTorchTrainer
