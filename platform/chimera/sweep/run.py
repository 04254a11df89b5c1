"""Sweeps on Ray Tune: every trial is a training run of chimera.train.loop.

    from chimera.sweep.spec import load_spec

    from chimera.sweep.trials import expand
    plan = expand(load_spec("configs/sweeps/exp1-tiny.yaml"))
    summary = run_sweep(plan)                 # Tuner.fit(); then the report (chimera.sweep.report)
    summary = run_sweep(plan, resume=True)    # Tuner.restore(): finished trials are not rerun

The sweep directory's layout and files: chimera.sweep.store.

Trials with one worker and no GPU run in-process inside the Tune trial (train_fn_per_worker
with a report hook); others launch a Ray Train TorchTrainer from the trial and forward its
reports to Tune (TuneReportCallback). Both report the same metrics: every eval interval the
latest value of every metric (val/train loss, tokens/s, MFU, params, KV bytes/token,
MoE MaxVio, step, tokens), and after training the measured decode speed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from chimera import storage
from chimera.sweep.measure import measure_decode
from chimera.sweep.spec import SEARCHERS, SweepSpec, SweepSpecError
from chimera.sweep.trials import SweepPlan, Trial
from chimera.sweep.store import SUMMARY, history, read_plan, sweep_dir, write_plan

def _trial_train_config(trial: dict, ctx: dict):
    """The trial's TrainConfig: base + choices, its own run dir, eval and checkpoints on."""
    from chimera import checkpoint as ckpt
    from chimera.train.config import TrainConfig

    run_dir = storage.join(ctx["runs"], trial["name"])
    d = {**trial["train"], "storage_path": ctx["runs"], "run_name": trial["name"], "eval": True,
         "save_model": True, "num_workers": ctx["num_workers"], "use_gpu": ctx["gpus"] > 0}
    d.setdefault("num_threads", max(1, int(ctx["cpus"])))
    if ctx["num_workers"] == 1 and ctx["gpus"] == 0:
        existing = ckpt.list_checkpoints(run_dir)        # an interrupted trial continues
        if existing:
            d["resume_from"] = str(existing[-1])
    return TrainConfig.from_dict(d), run_dir


FIRST = ("step", "val_loss", "best_val_loss", "tokens_per_s")   # Tune's table shows the first 4


def clean(m: dict, static: dict | None = None) -> dict:
    """A training report as Tune should see it: the headline metrics first, no reserved keys
    (`done` would end the trial before its decode measurement), no per-rank lists."""
    m = {**m, **(static or {})}
    if m.pop("done", False):
        m["training_done"] = True
    for k in ("param_hashes", "node_ids"):
        m.pop(k, None)
    return {**{k: m[k] for k in FIRST if k in m}, **m}


def _forwarder(static: dict):
    """TuneReportCallback for multi-worker trials: forwards the eval reports (those carry the
    metric; log-only reports after a restore may not), cleaned, with the trial's fields."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Forward(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "val_loss" in metrics[0]:
                super().after_report(run_context, [clean(x, static) for x in metrics], checkpoint)
    return Forward()


def _recorded_trial(ctx: dict, name: str) -> dict:
    """A trial a searcher chose after the sweep started: resolved and written into sweep.json
    by chimera.sweep.search before Tune launched it."""
    return next(t for t in read_plan(storage.parent(ctx["runs"]), log=lambda *_: None)["trials"]
                if t["name"] == name)


def run_trial(config: dict, trials: dict, ctx: dict) -> None:
    """The Tune trainable: train one trial, report as it goes, then measure decoding.
    `config["trial"]` is the trial's name; `trials` maps names to Trial dicts."""
    from ray import tune
    from chimera.train.plan import plan_run
    from chimera.train.loop import fit, train_fn_per_worker

    trial = trials.get(config["trial"]) or _recorded_trial(ctx, config["trial"])
    static = {"trial": trial["name"], "arch": trial["arch"]}
    if trial.get("budget_value") is not None:
        static["budget_value"] = trial["budget_value"]
    tc, run_dir = _trial_train_config(trial, ctx)
    done = storage.join(run_dir, SUMMARY)
    if storage.is_file(done):               # finished before an interruption: report, no rerun
        tune.report(json.loads(storage.read_text(done)))
        return
    t0 = time.time()
    plan = plan_run(tc, model_config=trial["model_config"])
    if ctx["num_workers"] == 1 and ctx["gpus"] == 0:
        s = train_fn_per_worker(plan.worker_config, report=lambda m: tune.report(clean(m, static)))
    else:
        s = fit(plan, callbacks=[_forwarder(static)], report_evals=True)
    latest: dict = {}
    for m in history(run_dir):          # a run resumed at its last step reports nothing new
        latest.update(m)
    final = {**clean({**latest, **s["metrics"]}, static), "train_time_s": time.time() - t0}
    if s.get("best_checkpoint"):
        final["best_checkpoint"] = s["best_checkpoint"]
        if ctx["decode_tokens"]:         # on this actor's CPU, as for trials stopped early
            final["decode_tokens_per_s"] = measure_decode(s["best_checkpoint"], ctx["decode_tokens"])
    final["trial_time_s"] = time.time() - t0
    final["trial_started_at"] = t0          # epoch seconds: when Tune's start-up ended for it
    storage.write_text(done, json.dumps(final, indent=2, default=str) + "\n")   # whole or absent
    tune.report(final)


def _scheduler(spec: SweepSpec, max_iters: int, tokens_per_step: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    sch = dict(spec.scheduler)
    if sch.get("type", "fifo") == "fifo":
        return FIFOScheduler()
    attr = sch.get("time_attr", "step")
    unit = 1 if attr == "step" else tokens_per_step
    eval_interval = int(spec.base.get("eval_interval", 100))
    grace = int(sch.get("grace_period", eval_interval * unit))
    return ASHAScheduler(time_attr=attr, max_t=max_iters * unit, grace_period=min(grace, max_iters * unit),
                         reduction_factor=float(sch.get("reduction_factor", 2)),
                         stop_last_trials=False)    # a trial at max_t still measures decoding


def _trial_source(plan: SweepPlan) -> dict[str, Any]:
    """Tuner's param_space: the fixed trial list as a grid, or nothing (a searcher suggests)."""
    from ray import tune
    if plan.spec.search in SEARCHERS:
        return {"param_space": {}}
    return {"param_space": {"trial": tune.grid_search([t.name for t in plan.trials])}}


def _search_args(plan: SweepPlan, root: Path | str) -> dict[str, Any]:
    """TuneConfig's search_alg and num_samples for a searcher sweep (chimera.sweep.search)."""
    if plan.spec.search not in SEARCHERS:
        return {}
    from chimera.sweep.search import make_searcher
    return {"search_alg": make_searcher(plan, root), "num_samples": plan.spec.num_samples}


def _can_restore(root) -> bool:
    """Tune's experiment state is at root (a local folder or a URI: Tune reads both)."""
    from ray import tune
    return tune.Tuner.can_restore(str(root))


def run_sweep(plan: SweepPlan, resume: bool = False, verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) the sweep on the connected Ray cluster, then write its report."""
    from ray import tune
    from chimera.sweep.report import write_report
    from chimera.train.batchexpr import parse_batch_expr
    from chimera.train.config import TrainConfig
    from models.config import MODEL_KEYS

    spec = plan.spec
    root = sweep_dir(spec)
    if resume and spec.search in SEARCHERS:
        raise SweepSpecError(f"--resume: a sweep with search: {spec.search} cannot be resumed (its "
                             f"searcher's state is not restored); its finished trials are in {root}: "
                             f"start a new sweep (another name) or `--report {root}`")
    if resume:
        if not _can_restore(root):
            raise SweepSpecError(f"--resume: nothing to resume in {root} (no Tune experiment state)")
        saved = read_plan(root)
        trials = [Trial(**t) for t in saved["trials"]]
    else:
        if storage.exists(storage.join(root, "sweep.json")) and _can_restore(root):
            again = "" if spec.search in SEARCHERS else "pass --resume to continue it, or "
            raise SweepSpecError(f"{root} already holds a sweep: {again}choose another name / storage_path")
        # (a sweep.json without Tune state: the driver died before any trial started; start over)
        write_plan(plan, root)
        trials = plan.trials
    ctx = {"runs": storage.join(root, "runs"), "num_workers": spec.num_workers, "cpus": spec.cpus_per_worker,
           "gpus": spec.gpus_per_worker, "decode_tokens": spec.decode_tokens}
    in_process = spec.num_workers == 1 and spec.gpus_per_worker == 0
    # in-process trials hold their worker's resources; Train trials only drive their workers
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials={t.name: t.__dict__ for t in trials}, ctx=ctx),
        {"cpu": spec.cpus_per_worker} if in_process else {"cpu": 0.01})
    base = TrainConfig.from_dict(dict(trials[0].train) if trials else
                                 {k: v for k, v in spec.base.items() if k not in MODEL_KEYS})
    t0 = time.time()
    if resume:
        tuner = tune.Tuner.restore(str(root), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        from ray.tune import CheckpointConfig, RunConfig
        tuner = tune.Tuner(
            trainable,
            **_trial_source(plan),
            tune_config=tune.TuneConfig(
                **_search_args(plan, root),
                metric=spec.metric, mode=spec.mode, max_concurrent_trials=spec.max_concurrent,
                reuse_actors=True,           # no process start and imports per trial
                scheduler=_scheduler(spec, base.max_iters, parse_batch_expr(base.total_batch_size_str)),
                trial_name_creator=lambda t: t.config["trial"],
                trial_dirname_creator=lambda t: t.config["trial"]),
            run_config=RunConfig(name=spec.name, storage_path=storage.parent(str(root)), verbose=verbose,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    wall = time.time() - t0
    report = write_report(root, wall_time_s=wall, decode_missing=True)
    return {"sweep_dir": str(root), "wall_time_s": wall, "started_at": t0, "errors": sum(r.error is not None for r in grid),
            **report}
