"""`python jobs/bench.py sweep`: what Ray Tune costs a sweep, what ASHA saves, and what the
evolutionary search saves over random search.

The Tune rows come from one run on a private local Ray instance with `--threads` CPUs, over one
search space: `--trials` learning rates sampled log-uniformly in [1e-4, 3e-2] (seeded) for a
tiny dense model on Tiny Shakespeare char, one CPU per trial, `--threads` trials at a time.
  * Tune overhead: FIFO sweep wall time ÷ (sum of the trials' own times ÷ concurrency). A
    trial's own time is measured inside it, from its start to its end (planning, training,
    decode measurement); so the ratio prices trial start-up, scheduling, reporting and the
    report. Target <= 1.10. The start-up part (from `tuner.fit()` to the first trial's
    start: trial actors' processes and imports) is shown apart.
  * ASHA vs FIFO: the same space under ASHA (grace period = one eval interval, reduction
    factor `--reduction_factor`). Ratio = training steps ASHA's trials ran in total ÷ the
    steps of the FIFO sweep (trials x max_iters), counted only when ASHA's best val loss is
    within 0.02 of FIFO's best. Target <= 0.5.
  * Evolution vs random search (section `search`, no training, no Ray): a synthetic objective
    of the per-layer choices of a 4-group stack (3 attention x 3 FFN options per group, 6,561
    stacks; a fixed seeded cost per group and option plus an interaction: MoE after MLA is
    cheaper) whose best stack is known by enumeration. Trials until a search first suggests
    the best stack: chimera.sweep.search's EvolutionSearch (population 8, driven in-process
    through the Tune Searcher API) ÷ the random search of `search: random` (Tune's variant
    generator), median over `--search_seeds` seeds each. Target <= 0.5.
`--quick` shrinks everything for a smoke run (numbers not meaningful). `--skip` leaves sections
out (`overhead` and `asha` share the FIFO sweep; skipping both starts no Ray).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from chimera.benchmarks.train import SHARED_TEXT, char_data

SECTIONS = ("overhead", "asha", "search")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (numbers not meaningful)")
    p.add_argument("--data_dir", help="Tiny Shakespeare prepared with --tokenizer char "
                                      "(default: prepared from --source into a temp dir)")
    p.add_argument("--source", default=str(SHARED_TEXT), help="Tiny Shakespeare text to prepare")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPUs of the Ray instance = trials at a time (default: all)"
                   ).doc_default = "all CPUs"
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (>= 2)")
    p.add_argument("--max_iters", type=int, default=300, help="training steps of a full trial")
    p.add_argument("--eval_interval", type=int, default=50, help="steps between evals (ASHA rungs)")
    p.add_argument("--reduction_factor", type=float, default=2.0, help="ASHA reduction factor (> 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the learning-rate samples")
    p.add_argument("--search_seeds", type=int, default=9,
                   help="search section: seeds of each search (the median is reported)")
    p.add_argument("--search_cap", type=int, default=50_000,
                   help="search section: trials a search may take before it counts as not finding the best")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")


def _spec(name: str, data_dir: str, storage: str, args, scheduler: dict):
    from chimera.sweep.spec import SweepSpec
    base = {"data_dir": data_dir, "n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64,
            "attn": "gqa", "n_kv_heads": 2, "up_dim": 256, "batch_size": 8,
            "total_batch_size_str": "8*64", "max_iters": args.max_iters, "warmup_steps": 10,
            "eval_interval": args.eval_interval, "eval_iters": 5, "log_interval": args.eval_interval,
            "ckpt_interval": 10 ** 6}
    return SweepSpec(name=name, storage_path=storage, base=base, search="random",
                     num_samples=args.trials, seed=args.seed,
                     space={"learning_rate": {"loguniform": [1e-4, 3e-2]}}, scheduler=scheduler,
                     max_concurrent=args.threads, decode_tokens=8)


def run(args: argparse.Namespace) -> int:
    if set(args.skip) >= set(SECTIONS):
        print("error: every section is skipped: nothing to measure", file=sys.stderr)
        return 2
    if args.search_seeds < 1 or args.search_cap < 1:
        print("error: --search_seeds and --search_cap must be >= 1", file=sys.stderr)
        return 2
    table: list[tuple[str, str, str]] = []
    if {"overhead", "asha"} - set(args.skip):
        rc = _tune_rows(args, table)
        if rc:
            return rc
    if "search" not in args.skip:
        print(f"# search section — {args.search_seeds if not args.quick else min(3, args.search_seeds)} "
              f"seeds per search, at most {args.search_cap:,} trials each", flush=True)
        table.append(search_row(min(3, args.search_seeds) if args.quick else args.search_seeds,
                                args.search_cap))
    w = max(len(a) for a, _, _ in table)
    print(f"| {'measurement'.ljust(w)} | result | target |")
    print(f"|{'-' * (w + 2)}|---|---|")
    for a, b, c in table:
        print(f"| {a.ljust(w)} | {b} | {c} |")
    return 0


def _tune_rows(args: argparse.Namespace, table: list) -> int:
    """The overhead and ASHA rows (one FIFO sweep, one ASHA sweep unless `asha` is skipped)."""
    if args.quick:
        args.trials, args.max_iters, args.eval_interval = min(args.trials, 4), 40, 10
    for k, lo in (("threads", 1), ("trials", 2), ("max_iters", 2), ("eval_interval", 1)):
        if getattr(args, k) < lo:
            print(f"error: --{k}={getattr(args, k)} must be >= {lo}", file=sys.stderr)
            return 2
    if args.eval_interval > args.max_iters:
        print(f"error: --eval_interval={args.eval_interval} must be <= --max_iters={args.max_iters}",
              file=sys.stderr)
        return 2
    if not args.reduction_factor > 1:
        print(f"error: --reduction_factor={args.reduction_factor} must be > 1", file=sys.stderr)
        return 2
    if args.data_dir is None and not Path(args.source).is_file():
        print(f"error: --source {args.source} does not exist", file=sys.stderr)
        return 2
    import ray
    import torch
    from chimera.runtime import init_ray
    from chimera.sweep.run import run_sweep
    from chimera.sweep.spec import SweepSpecError
    from chimera.sweep.trials import expand

    with tempfile.TemporaryDirectory(prefix="chimera_bench_sweep_") as tmp:
        data_dir = char_data(args.data_dir, args.source, tmp)
        print(f"# sweep benchmark — torch {torch.__version__}, {args.threads} CPUs for trials, "
              f"{args.trials} trials x {args.max_iters} steps, eval every {args.eval_interval}"
              f"{', --quick' if args.quick else ''}", flush=True)
        try:
            fifo_plan = expand(_spec("fifo", data_dir, tmp, args, {"type": "fifo"}))
            asha_plan = expand(_spec("asha", data_dir, tmp, args, {
                "type": "asha", "time_attr": "step", "grace_period": args.eval_interval,
                "reduction_factor": args.reduction_factor}))
        except SweepSpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if ray.is_initialized():
            ray.shutdown()
        init_ray(num_cpus=args.threads, address="local")     # private, as jobs/sweep.py starts one
        try:
            fifo = run_sweep(fifo_plan, verbose=0)
            asha = run_sweep(asha_plan, verbose=0) if "asha" not in args.skip else fifo
        finally:
            ray.shutdown()

        def rows_of(rep):
            return json.loads((Path(rep["sweep_dir"]) / "results.json").read_text())["trials"]

        f_rows, a_rows = rows_of(fifo), rows_of(asha)
        if any(r["best_val_loss"] is None for r in f_rows + a_rows):
            print("error: a trial failed: " + "; ".join(str(r.get("error")) for r in f_rows + a_rows
                                                       if r["best_val_loss"] is None), file=sys.stderr)
            return 1
        own = sum(r["trial_time_s"] or 0.0 for r in f_rows)
        ideal = own / min(args.threads, len(f_rows))
        overhead = fifo["wall_time_s"] / ideal
        starts = [r["trial_started_at"] for r in f_rows if r.get("trial_started_at")]
        first = min(starts) - fifo["started_at"] if starts else None    # Tune's start-up
        f_steps = sum(r["step"] or 0 for r in f_rows)
        a_steps = sum(r["step"] or 0 for r in a_rows)
        f_best = min(r["best_val_loss"] for r in f_rows if r["best_val_loss"] is not None)
        a_best = min(r["best_val_loss"] for r in a_rows if r["best_val_loss"] is not None)
        stopped = sum(r["status"] == "stopped" for r in a_rows)
    if "overhead" not in args.skip:
        table.append(("Tune overhead: FIFO sweep wall time ÷ (sum of trial times ÷ concurrency)",
                      f"{overhead:.3f}  ({fifo['wall_time_s']:.1f} s vs {own:.1f} s / "
                      f"{min(args.threads, len(f_rows))})",
                      f"≤ 1.10 — {'met' if overhead <= 1.10 else '**missed**'}"))
        if first is not None:
            table.append(("Tune overhead after its start-up: (wall time − start-up) ÷ the same",
                          f"{(fifo['wall_time_s'] - first) / ideal:.3f}  (start-up {first:.1f} s: "
                          f"`tuner.fit()` → the first trial's start)", ""))
    if "asha" in args.skip:
        return 0
    label = "ASHA vs FIFO: training steps ÷ FIFO's, same space"
    if a_best <= f_best + 0.02:
        ratio = a_steps / f_steps
        table.append((label, f"{ratio:.3f}  ({a_steps:,} vs {f_steps:,} steps, {stopped} of {len(a_rows)} "
                      f"stopped early; best val {a_best:.4f} vs {f_best:.4f})",
                      f"≤ 0.5 — {'met' if ratio <= 0.5 else '**missed**'}"))
    else:
        table.append((label, f"not reached: ASHA best val {a_best:.4f} vs FIFO {f_best:.4f} (+0.02 "
                      f"allowed; {a_steps:,} vs {f_steps:,} steps)", "≤ 0.5 — **missed**"))
    return 0


# --- search: evolution vs random on a synthetic objective (no training) -------------------------
ATTN, FFN, GROUPS = ("gqa1", "gqa2", "mla"), ("mlp", "moe", "moe_wide"), 4


def _search_spec(search: str, seed: int):
    """The space both searches see: 4 groups x attention x FFN options (the layer dicts are
    never trained; a SweepSpec makes the searchers see what a real sweep gives them)."""
    from chimera.sweep.spec import SweepSpec
    opts = {"attn": {a: {"attn": "gqa", "n_kv_heads": 2} for a in ATTN},
            "ffn": {f: {"moe": False} for f in FFN}}
    return SweepSpec(name="synthetic", base={"n_layer": GROUPS, "n_embd": 32, "n_head": 4},
                     layers={"groups": [1] * GROUPS, **opts}, search=search, seed=seed)


def _synthetic():
    """loss(config) and the best configuration (by enumeration): a seeded cost per group and
    option, MoE after MLA in the previous group 0.15 cheaper."""
    import itertools
    import numpy as np
    rng = np.random.default_rng(1234)
    cost = {(g, part, o): float(rng.uniform(0, 1)) for g in range(GROUPS)
            for part, names in (("attn", ATTN), ("ffn", FFN)) for o in names}

    def loss(c: dict) -> float:
        v = sum(cost[(g, part, c[f"g{g}.{part}"])] for g in range(GROUPS) for part in ("attn", "ffn"))
        return v - 0.15 * sum(c[f"g{g - 1}.attn"] == "mla" and c[f"g{g}.ffn"] != "mlp" for g in range(1, GROUPS))

    keys = [f"g{g}.{p}" for g in range(GROUPS) for p in ("attn", "ffn")]
    allc = [dict(zip(keys, v)) for v in itertools.product(*[ATTN if k.endswith("attn") else FFN for k in keys])]
    return loss, min(allc, key=loss), len(allc)


def _arch(c: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in c.items() if k.startswith("g")))


def _evolution_trials(seed: int, cap: int, loss, best) -> int:
    from chimera.sweep.search import inner_searcher
    s = inner_searcher(_search_spec("evolution", seed))
    for i in range(1, cap + 1):
        c = s.suggest(str(i))
        if _arch(c) == _arch(best):
            return i
        s.on_trial_complete(str(i), {"best_val_loss": loss(c)})
    return cap


def _random_trials(seed: int, cap: int, best) -> int:
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants
    from chimera.sweep.trials import search_space
    space, _ = search_space(_search_spec("random", seed))
    rng = np.random.RandomState(seed)                 # as expand() samples `search: random`
    for i in range(1, cap + 1):
        _, c = next(generate_variants(space, random_state=rng))
        if _arch(c) == _arch(best):
            return i
    return cap


def search_row(seeds: int, cap: int) -> tuple[str, str, str]:
    """Trials to find the known best stack: evolution ÷ random, median over seeds."""
    import statistics
    loss, best, n = _synthetic()
    evo = [_evolution_trials(s, cap, loss, best) for s in range(seeds)]
    rnd = [_random_trials(s, cap, best) for s in range(seeds)]
    ratio = statistics.median(evo) / statistics.median(rnd)
    capped = sum(v >= cap for v in evo + rnd)
    return ("Evolution vs random search: trials to find the best of 6,561 stacks (synthetic objective)",
            f"{ratio:.3f}  (median {statistics.median(evo):,.0f} vs {statistics.median(rnd):,.0f} trials over "
            f"{seeds} seeds; evolution {min(evo)}–{max(evo)}, random {min(rnd):,}–{max(rnd):,}"
            + (f"; {capped} runs hit the cap of {cap:,}" if capped else "") + ")",
            f"≤ 0.5 — {'met' if ratio <= 0.5 else '**missed**'}")
