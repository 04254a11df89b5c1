"""Benchmarks run by `python jobs/bench.py NAME`: each module exposes `add_args(parser)` and
`run(args) -> int` and prints a table of ratios measured side by side in one run."""
