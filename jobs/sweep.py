"""Search attention/FFN mixes and hyperparameters with Ray Tune; report which one wins.

    python jobs/sweep.py --spec configs/sweeps/exp1-tiny.yaml
    python jobs/sweep.py --spec configs/sweeps/exp1-tiny.yaml --resume     # after an interruption
    python jobs/sweep.py --report runs/exp1-tiny                           # table + plots again
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/sweep.py --spec ... \
        --storage_path /shared/chimera

The spec format is described in platform/chimera/sweep/spec.py and the README. Every trial is
checked before anything launches (invalid combinations are listed, not run; exit code 2 when
the spec itself is wrong). The sweep directory is <storage_path>/<name>.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--spec", help="sweep spec (YAML): base flags, search space, scheduler, budget")
    what.add_argument("--report", metavar="DIR", help="write the report of a sweep directory and print it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of this spec; finished trials are not rerun")
    p.add_argument("--storage_path", help="overrides the spec's storage_path (default <repo>/runs)")
    p.add_argument("--name", help="overrides the spec's name (the sweep directory's name)")
    p.add_argument("--data_dir", help="every trial's prepared data (overrides base.data_dir): a "
                   "folder or s3://...")
    p.add_argument("--dry_run", action="store_true", help="check and list the trials, launch nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    args = build_parser().parse_args(argv)
    from chimera import storage
    from chimera.storage import StorageError
    from chimera.sweep.spec import SweepSpecError, load_spec
    from chimera.sweep.trials import expand

    if args.report:
        from chimera.sweep.report import write_report
        try:
            rep = write_report(args.report)
        except (SweepSpecError, OSError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _print_report(rep)
        return 0
    try:
        plan = expand(load_spec(args.spec, storage_path=args.storage_path, name=args.name,
                                data_dir=args.data_dir))
        from chimera.sweep.store import sweep_dir
        root = sweep_dir(plan.spec)
        storage.check_writable(root)                  # the storage takes writes, before Ray
    except (SweepSpecError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not plan.trials:                  # a searcher picks the trials as the sweep runs
        print(f"sweep {plan.spec.name} -> {root}: search {plan.spec.search}, {plan.spec.num_samples} "
              f"trial(s) chosen while it runs, objectives {plan.spec.objective_modes}")
    else:
        reps = (f" ({len(plan.trials) // plan.spec.seeds} configuration(s) × {plan.spec.seeds} seeds)"
                if plan.spec.seeds > 1 else "")
        print(f"sweep {plan.spec.name} -> {root}: {len(plan.trials)} trial(s){reps}, "
              f"{len(plan.rejected)} rejected")
    for choices, msg in plan.rejected:
        print(f"  rejected {choices}: {msg}")
    for t in plan.trials:
        extra = f"  budget {t.budget_value:,}" if t.budget_value is not None else ""
        extra += f"  seed {t.seed}" if t.seed is not None else ""
        if t.ladder:
            extra += (f"  {t.ladder['steps']:,} steps, {t.ladder['tokens']:,} tokens, "
                      f"C {t.ladder['flops']:.3g} FLOPs" + ("  (held out)" if t.ladder["held_out"] else ""))
        print(f"  {t.name}  {t.arch}  {t.choices}{extra}")
    if args.dry_run:
        return 0
    from chimera.runtime import init_ray
    from chimera.sweep.run import run_sweep
    init_ray()
    try:
        rep = run_sweep(plan, resume=args.resume)
    except SweepSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_report(rep)
    return 0


def _print_report(rep: dict) -> None:
    print(rep["table"])
    if rep.get("pareto"):
        print(rep["pareto"])
    print("trials: " + ", ".join(f"{n} {s}" for s, n in rep["counts"].items()))
    print(rep["config_table"])
    b = rep.get("best")
    if b:
        of = f" (best run of configuration {b['config']})" if b["config"] != b["trial"] else ""
        bpb = f"  ({b['best_val_bpb']:.4f} bits/byte)" if b.get("best_val_bpb") is not None else ""
        print(f"best: {b['trial']}{of}  {b['arch']}  best val loss {b['best_val_loss']:.4f}{bpb}")
        print(f"  checkpoint   {b['checkpoint']}")
        print(f"  layers       {b['layers_jsonl']}")
        print(f"  retrain with python jobs/train.py --config {b['train_config']}")
    if rep.get("ladder"):
        print("scaling ladder:\n" + "\n".join(rep["ladder"]["summary"]))
    print("files: " + "  ".join(rep["files"]))


if __name__ == "__main__":
    sys.exit(main())
