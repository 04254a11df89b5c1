"""Evaluate checkpoints: bits per byte on prepared val shards, and lm-eval tasks run against
a Chimera server (one this job starts and stops, or --base_url).

    python jobs/eval.py --checkpoint runs/demo --data_dir data/shakespeare_char --tasks shakespeare_nextline
    python jobs/eval.py --from_sweep runs/exp1-tiny --top_k 2 --data_dir data/shakespeare_char \
        --tasks shakespeare_nextline,shakespeare_complete          # + columns in the sweep report
    python jobs/eval.py --checkpoint tiny=runs/demo --tasks hellaswag --include_path my_tasks/ \
        --base_url http://127.0.0.1:8000                           # a server that is already up
    python jobs/eval.py --build_tasks ../shared/data/tinyshakespeare/input.txt   # the local tasks' data

Local tasks (configs/eval/) are found without --include_path. lm-eval's max_length is the
model's block_size (passed by this job). Results: --out, default <sweep>/eval.json with
--from_sweep, else <run dir>/eval.json. Every input is checked before Ray starts (exit code 2).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
      help="checkpoint dir or run dir (its best checkpoint); repeat for several models")
    a("--from_sweep", metavar="DIR", help="evaluate the --top_k best trials of this sweep dir")
    a("--top_k", type=int, default=1, help="with --from_sweep: how many trials")
    a("--data_dir", action="append", default=[], metavar="DIR",
      help="prepared data folder: bits per byte on its val split (repeatable)")
    a("--bpb_batch_size", type=int, default=32, help="windows per forward pass for bits per byte")
    a("--tasks", default="", help="lm-eval task names, comma-separated (local ones: "
      "shakespeare_nextline, shakespeare_complete)")
    a("--include_path", action="append", default=[], metavar="DIR",
      help="more lm-eval task YAMLs (repeatable; configs/eval is always included)")
    a("--limit", type=float, help="items per task (a number < 1: that fraction of them)")
    a("--num_fewshot", type=int, help="few-shot examples per item (default: the task's own)")
    a("--batch_size", type=int, default=1, help="lm-eval requests per HTTP call")
    a("--num_concurrent", type=int, default=1, help="HTTP calls lm-eval keeps in flight")
    a("--base_url", metavar="URL", help="a running Chimera server serving the models by name "
      "(default: this job serves them itself)")
    a("--out", metavar="FILE", help="results JSON (default <sweep>/eval.json or <run dir>/eval.json)")
    a("--build_tasks", metavar="INPUT_TXT", help="rebuild the local tasks' data (configs/eval/"
      "*.jsonl) from Tiny Shakespeare's input.txt, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    args = build_parser().parse_args(argv)
    if args.build_tasks:
        from chimera.eval.tasks import write_task_files
        for f in write_task_files(args.build_tasks):
            print(f"wrote {f}")
        return 0
    from chimera import storage
    from chimera.eval.run import plan_eval, run_eval, table
    try:
        job, tm = plan_eval(
            checkpoint=args.checkpoint, from_sweep=args.from_sweep, top_k=args.top_k,
            data_dir=args.data_dir, tasks=[t for t in args.tasks.split(",") if t.strip()],
            include_path=args.include_path, out=args.out, limit=args.limit,
            num_fewshot=args.num_fewshot, batch_size=args.batch_size,
            num_concurrent=args.num_concurrent, base_url=args.base_url,
            bpb_batch_size=args.bpb_batch_size)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"evaluating {', '.join(n for n, _ in job.models)}: "
          f"{len(job.data_dirs)} dataset(s), tasks {', '.join(job.tasks) or '-'}", flush=True)
    doc = run_eval(job, tm)
    print(table(doc))
    print(f"results: {job.out}" + (f"  (sweep report re-rendered: {storage.join(job.sweep, 'results.md')})"
                                   if job.sweep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
