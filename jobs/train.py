r"""Train a model on Ray Train (locally, or on the cluster `ray job submit` points at).

    python jobs/train.py --tokenizer char --n_layer 4 --n_head 4 --n_embd 128 \
        --block_size 64 --batch_size 12 --total_batch_size_str 12*64 --max_iters 2000 --eval
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --config my.yaml

Flags: every model flag (only those given reach the model config), --layer_configs /
--layer_configs_jsonl, the training flags (see --help) and --config FILE (YAML/JSON, same keys;
flags override it). Everything is checked before any worker starts (exit code 2).
Re-running with the same --run_name (or the same settings) resumes from the latest checkpoint.
One worker without --max_failures trains in this process (no Ray to start: seconds, not tens
of seconds); more workers, restarts, object storage or a cluster (RAY_ADDRESS, as `ray job
submit` sets it) train on Ray Train's TorchTrainer. --in_process / --no-in_process decide.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from _paths import setup
    setup()
    from chimera.paramdocs import DocDefaultsFormatter
    from chimera.train.flags import add_arguments

    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                formatter_class=DocDefaultsFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    from chimera.train.config import TrainConfigError, load_train_config
    from chimera.train.plan import plan_run

    p = build_parser()
    args = vars(p.parse_args(argv))
    config_file = args.pop("config", None)
    try:
        plan = plan_run(load_train_config(args, config_file))
    except (TrainConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from chimera.train.loop import runs_in_process, train
    tc = plan.train
    where = "in this process" if runs_in_process(plan) else f"{tc.num_workers} Ray Train worker(s)"
    print(f"run {plan.run_name} -> {plan.run_dir}  ({where}, grad_accum {plan.grad_accum})", flush=True)
    try:
        s = train(plan)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:           # ray.train.TrainingFailedError and friends
        print(f"error: training failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    m = s["metrics"]
    losses = "  ".join(f"{k} {m[k]:.4f}" for k in ("loss", "train_loss", "val_loss", "best_val_loss")
                       if isinstance(m.get(k), float))
    print(f"finished at step {s['step']}: {losses}")
    print(f"last checkpoint: {s['last_checkpoint'] or '(none: pass --save_model)'}")
    print(f"best checkpoint: {s['best_checkpoint'] or '(none: needs --save_model and --eval)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
