"""Hooks: code that watches (or disturbs) a training run from outside the production path.

    class Stamps(Hook):
        def on_step(self, trainer, step, metrics):
            if "loss" in metrics:                     # a log step
                print(step, time.perf_counter())
    train_fn_per_worker(plan.worker_config, hooks=[Stamps()])

A Trainer calls every hook of its list, in order, on every rank:
  * `before_step(trainer, step)` at the top of each loop iteration, before step `step + 1`
    is computed (`step` optimizer steps are done; after a restore, the first call has the
    restored step);
  * `on_step(trainer, step, metrics)` after optimizer step `step` and everything that followed
    it (eval, metrics row, checkpoint, reports); `metrics` is the row recorded at this step, or
    {} when none was. Read it, do not change it (it is the row in the run's history).
The trainer is passed in: `trainer.rank`, `trainer.world`, `trainer.run_dir`,
`trainer.local_run`, `trainer.iter_num`, `trainer.raw` (the unwrapped model) ...
This module imports nothing heavy, so a benchmark can define hooks at import time.
Fault injection for the tests lives in chimera.train.faults.
"""
from __future__ import annotations

from typing import Any


class Hook:
    """Does nothing; subclasses override what they need."""

    def before_step(self, trainer: Any, step: int) -> None:
        pass

    def on_step(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        pass
