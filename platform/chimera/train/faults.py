"""Fault injection for the tests: `--crash_at_step N` kills one worker process once per run.

    train_fn_per_worker(config)     # installs CrashAtStep(N) when config's crash_at_step is N > 0

The last rank calls os._exit(1) (no cleanup, like a lost process) when step N is about to run.
A marker file <run_dir>/.crashed_at_N remembers that it happened, so the run restarted by Ray
Train's FailureConfig (or by the same command again) passes step N. The marker lives in the run
dir, local or in object storage (chimera.storage). tests/test_train_ray.py,
tests/test_storage_ray.py and a sweep test use it.
"""
from __future__ import annotations

import os

from chimera import storage
from chimera.train.hooks import Hook


class CrashAtStep(Hook):
    def __init__(self, step: int):
        self.step = step

    def before_step(self, trainer, step: int) -> None:
        if step != self.step or trainer.rank != trainer.world - 1:
            return
        marker = storage.join(trainer.run_dir, f".crashed_at_{step}")
        if storage.exists(marker):                        # crashed here before: once per run
            return
        storage.write_text(marker, "")
        print(f"rank {trainer.rank}: injected crash at step {step}", flush=True)
        os._exit(1)
