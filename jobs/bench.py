"""Benchmark programs: each prints a table of ratios measured side by side in one run.

    python jobs/bench.py models [--device cuda --dtype bf16 --compile]
    python jobs/bench.py data
    python jobs/bench.py train [--quick]
    python jobs/bench.py serve [--quick] [--checkpoint PATH]
    python jobs/bench.py sweep [--quick]

Numbers go to docs/benchmarks.md together with the command that made them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "models": ("chimera.benchmarks.models", "model MFU, MoE vs dense, MTP step cost, KV-cached decoding, KV bytes"),
    "data": ("chimera.benchmarks.data", "preparation and loader throughput"),
    "train": ("chimera.benchmarks.train", "Ray Train overhead, data-parallel efficiency, time to quality"),
    "serve": ("chimera.benchmarks.serve", "Serve overhead, continuous batching, short-behind-long, load, soak with replica kills"),
    "sweep": ("chimera.benchmarks.sweep",
              "Ray Tune overhead, ASHA vs FIFO training steps, evolution vs random search"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full CLI (every suite's flags); imports each suite's module, not its heavy work."""
    from _paths import setup
    setup()
    p = argparse.ArgumentParser(prog="jobs/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="suite", required=True)
    for name, (module, help_) in SUITES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_args(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUITES:                  # import only the suite that runs
        module = importlib.import_module(SUITES[argv[0]][0])
        p = argparse.ArgumentParser(prog=f"jobs/bench.py {argv[0]}", description=SUITES[argv[0]][1])
        module.add_args(p)
        return module.run(p.parse_args(argv[1:]))
    build_parser().parse_args(argv)                 # prints usage / the error for a bad suite
    return 2


if __name__ == "__main__":
    sys.exit(main())
