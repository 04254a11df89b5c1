"""`python jobs/bench.py train`: the training platform's benchmark table.

All rows come from one run, each `jobs/train.py` on a private local Ray instance:
  * Platform tax: `jobs/train.py` (the baby-GPT recipe below, 1 worker, 1 torch thread) and the
    bare loop of chimera.benchmarks.bare (same model, data, optimizer, schedule and eval; no
    Ray, no reporting, no files) run side by side at the same time, one thread each; steady
    state wall time per 100 steps, evaluations included (from step `--tax_from` to the end,
    each timed where its step-N log line appears), train.py ÷ bare. At log_interval 10 and
    at log_interval 1. Target <= 1.05.
  * Start-up: seconds from `python jobs/train.py` starting to the end of its first optimizer
    step (the arrival of its `step 1/1` line; no eval), 1 worker x `--threads` threads and
    2 workers x 1 thread. Target <= 10 s.
  * Ray Train overhead: steady-state step time of `fit(plan)` (TorchTrainer, 1 worker,
    `--threads` torch threads) ÷ the same loop, `train_fn_per_worker(plan.worker_config)`,
    called in-process on the same threads. The in-process run is done before and after the
    Ray runs (their times are pooled). Step time = wall time between the ends of two
    consecutive log steps (rank 0; a LogStamps hook) ÷ the steps between them (so it includes
    logging and `ray.train.report`), median over the intervals after `--warmup` steps;
    start-up is excluded. The loop's own `step_time_s` (compute only) ratio is shown
    alongside. Target <= 1.03.
  * Data-parallel efficiency: tokens/s of 2 workers x threads/2 threads ÷ 1 worker x threads
    threads, both under TorchTrainer, same global batch per optimizer step (2 micro-batches:
    one per worker, or two accumulated on the single worker). Target >= 0.85.
    Model for both rows: 4 layers, n_embd 256, 4 heads, block 128, micro-batch 8, vocab 65.
  * Time to quality: nanoGPT's CPU "baby GPT" recipe on Tiny Shakespeare char (4 layers, 4
    heads, n_embd 128, block 64, batch 12, lr 1e-3 -> 1e-4 cosine, warmup 100, beta2 0.99,
    2000 iters, dropout 0) run as `python jobs/train.py ...` in a subprocess; wall time from
    its start until the first eval (every `--eval_interval` steps, `--eval_iters` batches)
    with val loss <= `--target_loss` (1.88), and the bare loop's time to the same val loss on the
    same threads, run after it. Target <= 4 min on 2 cores, and <= bare x 1.05 + start-up.
The data is Tiny Shakespeare prepared with the char tokenizer into a temporary folder
(`--data_dir` to use a prepared one). `--quick` shrinks everything for a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chimera.paths import REPO, SHARED_DATA
from chimera.train.hooks import Hook

SHARED_TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
SECTIONS = ("tax", "startup", "overhead", "dp", "quality")

# overhead/dp model and timing; quality run. `--quick` uses the second value of each pair.
SIZES = {"n_layer": (4, 2), "n_embd": (256, 64), "n_head": (4, 4), "block_size": (128, 64),
         "batch_size": (8, 4), "steps": (40, 6), "warmup": (10, 2), "log_interval": (5, 2),
         "max_iters": (2000, 60), "eval_interval": (100, 30), "eval_iters": (20, 4),
         "tax_iters": (1000, 300), "tax_from": (200, 100)}
BABY_GPT = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64",
            "--batch_size", "12", "--total_batch_size_str", "12*64", "--vocab_size", "65",
            "--learning_rate", "1e-3", "--warmup_steps", "100", "--beta2", "0.99",
            "--weight_decay", "0.1", "--grad_clip", "1.0", "--dropout", "0.0", "--attn", "mha",
            "--pos_emb", "learn", "--non_linearity", "gelu", "--up_dim", "512",
            "--norm", "layernorm", "--seed", "1337"]
EVAL_LINE = re.compile(r"step (\d+): val (\d+(?:\.\d+)?)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke run (numbers not meaningful)")
    p.add_argument("--data_dir", help="Tiny Shakespeare prepared with --tokenizer char "
                                      "(default: prepared from --source into a temp dir)")
    p.add_argument("--source", default=str(SHARED_TEXT), help="Tiny Shakespeare text to prepare")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPUs of the Ray instance and torch threads per run (default: all)"
                   ).doc_default = "all CPUs"              # docs/parameters.md: not this machine's
    for k in ("n_layer", "n_embd", "n_head", "block_size", "batch_size"):
        p.add_argument(f"--{k}", type=int, help=f"overhead/dp model (default {SIZES[k][0]}, "
                                                 f"--quick {SIZES[k][1]})")
    p.add_argument("--steps", type=int, help="overhead/dp: timed steps per run after --warmup "
                                             f"(default {SIZES['steps'][0]})")
    p.add_argument("--warmup", type=int, help="overhead/dp: steps left out of the timing "
                                              f"(default {SIZES['warmup'][0]})")
    p.add_argument("--log_interval", type=int, help="overhead/dp: steps between log points "
                                                    f"(default {SIZES['log_interval'][0]})")
    p.add_argument("--max_iters", type=int, help="quality run: iterations "
                                                 f"(default {SIZES['max_iters'][0]})")
    p.add_argument("--eval_interval", type=int, help="quality run: steps between evals "
                                                     f"(default {SIZES['eval_interval'][0]})")
    p.add_argument("--eval_iters", type=int, help="quality run: batches per eval "
                                                  f"(default {SIZES['eval_iters'][0]})")
    p.add_argument("--tax_iters", type=int, help="tax runs: iterations "
                                                 f"(default {SIZES['tax_iters'][0]})")
    p.add_argument("--tax_from", type=int, help="tax runs: first step of the steady state "
                                                f"(default {SIZES['tax_from'][0]})")
    p.add_argument("--target_loss", type=float, default=1.88, help="quality run: val loss to reach")
    p.add_argument("--timeout", type=float, default=900.0, help="quality run: seconds before it is stopped")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) if getattr(args, k) is not None else v[1 if args.quick else 0]
            for k, v in SIZES.items()}


def _validate(args: argparse.Namespace, s: dict[str, Any]) -> str | None:
    """An error message, or None. Runs before any data preparation or Ray start."""
    if set(args.skip) >= set(SECTIONS):
        return "every section is skipped: nothing to measure"
    for k, v in s.items():
        if k == "warmup":
            if v < 0:
                return f"--warmup must be >= 0, got {v}"
        elif v < 1:
            return f"--{k} must be >= 1, got {v}"
    if args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if "dp" not in args.skip and args.threads < 2:
        return f"the dp section needs --threads >= 2 (two workers), got {args.threads}; or --skip dp"
    if "tax" not in args.skip and (s["tax_from"] % 100 or s["tax_iters"] < s["tax_from"] + 100):
        return (f"--tax_from ({s['tax_from']}) must be a multiple of 100 and --tax_iters "
                f"({s['tax_iters']}) at least 100 more")
    if s["steps"] < s["log_interval"]:
        return f"--steps ({s['steps']}) must be >= --log_interval ({s['log_interval']})"
    if not args.target_loss > 0:
        return f"--target_loss must be > 0, got {args.target_loss}"
    if not args.timeout > 0:
        return f"--timeout must be > 0, got {args.timeout}"
    if args.data_dir is not None:
        if not (Path(args.data_dir) / "manifest.json").is_file():
            return f"--data_dir {args.data_dir} has no manifest.json (prepare it with jobs/prepare.py)"
    elif not Path(args.source).is_file():
        return f"--source {args.source} not found (or pass --data_dir)"
    if {"overhead", "dp"} - set(args.skip):
        from models.config import ConfigError, ModelConfig
        try:
            ModelConfig.from_dict(_model(s))
        except (ConfigError, ValueError) as e:
            return f"overhead/dp model: {e}"
    return None


def _model(s: dict[str, Any]) -> dict[str, Any]:
    return {"n_layer": s["n_layer"], "n_embd": s["n_embd"], "n_head": s["n_head"], "attn": "mha",
            "block_size": s["block_size"], "up_dim": 4 * s["n_embd"], "vocab_size": 65,
            "dropout": 0.0, "pos_emb": "learn", "non_linearity": "gelu", "norm": "layernorm"}


# --- the timed loop ----------------------------------------------------------------------------
class LogStamps(Hook):
    """The wall-clock time at the end of every log step (a recorded row with a loss) on
    rank 0, as [(step, seconds), ...]."""

    def __init__(self):
        self.stamps: list[tuple[int, float]] = []

    def on_step(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if trainer.rank == 0 and "loss" in metrics:
            self.stamps.append((step, time.perf_counter()))


def timed_worker(config: dict[str, Any]) -> dict[str, Any]:
    """train_fn_per_worker(config) with a LogStamps hook; its stamps go to
    <run_dir>.stamps.json (local storage) as [[step, seconds], ...].
    Module-level so that Ray workers import it (chimera travels as a py_module)."""
    from chimera.train.loop import train_fn_per_worker
    timer = LogStamps()
    summary = train_fn_per_worker(config, hooks=[timer])
    if timer.stamps:
        _stamps_path(config).write_text(json.dumps(timer.stamps))
    return summary


def _plan(data_dir: str, storage: str, name: str, s: dict, workers: int, threads: int):
    from chimera.train.config import load_train_config
    from chimera.train.plan import plan_run
    iters = s["warmup"] + s["steps"]
    iters = -(-iters // s["log_interval"]) * s["log_interval"]
    cli = {**_model(s), "data_dir": data_dir, "storage_path": storage, "run_name": name,
           "batch_size": s["batch_size"],
           "total_batch_size_str": f"2*{s['batch_size']}*{s['block_size']}",
           "num_workers": workers, "num_threads": threads, "max_iters": iters,
           "log_interval": s["log_interval"], "warmup_steps": 5, "learning_rate": 3e-4}
    return plan_run(load_train_config(cli))


def _step_times(plan, stamps_path: Path, warmup: int) -> dict[str, float]:
    """Median wall seconds per step between log points after `warmup`, and the loop's own
    median step_time_s over the same intervals."""
    stamps = json.loads(stamps_path.read_text())
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(stamps, stamps[1:])
                if s0 >= warmup]
    rows = [json.loads(l) for l in (Path(plan.run_dir) / "metrics.jsonl").read_text().splitlines()]
    loop = [r["step_time_s"] for r in rows
            if "step_time_s" in r and r["step"] - plan.train.log_interval >= warmup]
    if not per_step or not loop:
        raise RuntimeError(f"{plan.run_name}: no log intervals after the warm-up ({stamps})")
    return {"wall": statistics.median(per_step), "loop": statistics.median(loop),
            "tokens": plan.train.total_batch_size}


def _measure(plan, in_process: bool, warmup: int) -> dict[str, float]:
    import torch
    if in_process:
        threads = torch.get_num_threads()
        try:
            timed_worker(plan.worker_config)
        finally:
            torch.set_num_threads(threads)
    else:
        from chimera.train.loop import fit
        fit(plan, train_fn=timed_worker)      # fit exactly as jobs/train.py calls it, timed
    return _step_times(plan, _stamps_path(plan.worker_config), warmup)


def _stamps_path(config: dict[str, Any]) -> Path:
    return Path(config["run_dir"] + ".stamps.json")      # local storage: beside the run dir


def _start_ray(threads: int) -> None:
    """A private local instance (never a cluster found through RAY_ADDRESS or `ray start`)."""
    import ray
    from chimera.runtime import init_ray
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=threads, address="local")       # as jobs/train.py starts one


# --- jobs/train.py beside the bare loop --------------------------------------------------------
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")


def _train_cmd(data_dir: str, storage: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train.py"), *BABY_GPT, "--data_dir", data_dir,
            "--storage_path", storage, "--run_name", name, *extra]


def _env() -> dict[str, str]:
    # a private local Ray instance for each job (init_ray honours RAY_ADDRESS; "local" = new)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local",
            "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}


def _lines(proc, log_path: Path, t0: float, on_line=None) -> list[tuple[str, float]]:
    """Every output line of `proc` with its arrival time (seconds since t0), also to log_path."""
    out = []
    with open(log_path, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            log.write(line)
            out.append((line, t))
            if on_line:
                on_line(line, t)
    return out


def _steps(lines: list[tuple[str, float]]) -> dict[int, float]:
    """{step: arrival time of its log line} (the first of repeated lines)."""
    got: dict[int, float] = {}
    for line, t in lines:
        m = STEP_LINE.search(line)
        if m:
            got.setdefault(int(m.group(1)), t)
    return got


def _per_100(stamps: dict[int, float], start: int, end: int) -> float:
    if start not in stamps or end not in stamps or end <= start:
        raise RuntimeError(f"steps {start} and {end} were not both timed: {sorted(stamps)[-5:]}")
    return (stamps[end] - stamps[start]) / ((end - start) / 100)


def _tax(data_dir: str, storage: str, s: dict, log_interval: int) -> dict[str, Any]:
    """jobs/train.py (1 worker, 1 thread) and the bare loop (1 thread) side by side: the bare
    loop starts when train.py's first step line arrives (after its start-up), so that their
    steady states run at the same time, one core each."""
    import threading
    it, frm = s["tax_iters"], s["tax_from"]
    name = f"tax-log{log_interval}"
    train_cmd = _train_cmd(data_dir, storage, name, "--max_iters", str(it), "--eval",
                           "--eval_interval", "100", "--eval_iters", "20", "--log_interval",
                           str(log_interval), "--num_threads", "1")
    bare_cmd = [sys.executable, "-m", "chimera.benchmarks.bare", "--data_dir", data_dir,
                "--max_iters", str(it), "--eval_interval", "100", "--eval_iters", "20",
                "--threads", "1", "--", *BABY_GPT]
    print(f"# tax run (log_interval {log_interval}): jobs/train.py and the bare loop, side by side",
          flush=True)
    t0 = time.perf_counter()
    tp = subprocess.Popen(train_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_env(), cwd=str(REPO), start_new_session=True)
    got: dict[str, Any] = {}

    def start_bare(line: str, t: float) -> None:
        if "bare" not in got and STEP_LINE.search(line):
            bp = subprocess.Popen(bare_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=_env(), cwd=str(REPO), start_new_session=True)
            got["bare"] = bp
            got["thread"] = threading.Thread(target=lambda: got.setdefault("out", bp.stdout.read()))
            got["thread"].start()
    lines = _lines(tp, Path(storage) / f"{name}.log", t0, on_line=start_bare)
    rc = tp.wait()
    if "bare" not in got:
        raise RuntimeError("tax run: jobs/train.py printed no step line:\n"
                           + "".join(l for l, _ in lines[-15:]))
    brc = got["bare"].wait()
    got["thread"].join()
    got["bare"] = got.pop("out", "")
    if rc or brc:
        raise RuntimeError(f"tax run: jobs/train.py exited {rc}, bare loop {brc}:\n"
                           + "".join(l for l, _ in lines[-10:]) + got.get("bare", "")[-2000:])
    bare = json.loads(got["bare"].strip().splitlines()[-1])
    b = {st: t for st, t in bare["stamps"]}
    end = max(st for st in b if st % 100 == 0)
    t_train, t_bare = _per_100(_steps(lines), frm, end), _per_100(b, frm, end)
    return {"ratio": t_train / t_bare, "train": t_train, "bare": t_bare, "from": frm, "end": end}


def _startup(data_dir: str, storage: str, workers: int, threads: int) -> float:
    """Seconds from starting `python jobs/train.py` to the arrival of its `step 1/1` line."""
    name = f"startup-{workers}w"
    cmd = _train_cmd(data_dir, storage, name, "--max_iters", "1", "--log_interval", "1",
                     "--num_workers", str(workers), "--num_threads", str(threads),
                     "--total_batch_size_str", f"{workers}*12*64")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(), cwd=str(REPO), start_new_session=True)
    lines = _lines(p, Path(storage) / f"{name}.log", t0)
    if p.wait() != 0 or 1 not in _steps(lines):
        raise RuntimeError(f"start-up run ({workers} workers) failed:\n" + "".join(l for l, _ in lines[-15:]))
    return _steps(lines)[1]


def _bare_quality(data_dir: str, s: dict, args) -> tuple[float | None, float]:
    """The bare loop on the baby-GPT recipe (same threads): seconds from its start to the end of
    the first eval with val <= target (None if never), and its whole run's seconds."""
    cmd = [sys.executable, "-m", "chimera.benchmarks.bare", "--data_dir", data_dir,
           "--max_iters", str(s["max_iters"]), "--eval_interval", str(s["eval_interval"]),
           "--eval_iters", str(s["eval_iters"]), "--threads", str(args.threads), "--", *BABY_GPT]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO),
                         timeout=args.timeout)
    total = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"bare quality run exited {out.returncode}: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    hit = next((t for _, v, t in r["evals"] if v <= args.target_loss), None)
    return hit, total


# --- time to quality ---------------------------------------------------------------------------
def _quality(data_dir: str, storage: str, s: dict, args) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), *BABY_GPT, "--data_dir", data_dir,
           "--storage_path", storage, "--run_name", "baby-gpt", "--max_iters", str(s["max_iters"]),
           "--eval", "--eval_interval", str(s["eval_interval"]), "--eval_iters", str(s["eval_iters"]),
           "--num_threads", str(args.threads)]
    # a private local Ray instance for the job (init_ray honours RAY_ADDRESS; "local" = new one)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}
    log_path = Path(storage) / "baby-gpt.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)   # also when the other sections are skipped
    print(f"# quality run: {' '.join(cmd[1:])}", flush=True)
    evals: list[tuple[int, float, float]] = []        # (step, val loss, seconds since start)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(REPO), start_new_session=True)
    timed_out = False
    with open(log_path, "w") as log:
        import threading

        def stop() -> None:
            nonlocal timed_out
            if proc.poll() is None:
                timed_out = True
                proc.send_signal(signal.SIGINT)
        timer = threading.Timer(args.timeout, stop)
        timer.start()
        try:
            for line in proc.stdout:
                t = time.perf_counter() - t0
                log.write(line)
                m = EVAL_LINE.search(line)
                if m and not any(e[0] == int(m.group(1)) for e in evals):
                    evals.append((int(m.group(1)), float(m.group(2)), t))
                    print(f"  [quality {t:6.1f} s] step {m.group(1)}: val {m.group(2)}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
    total = time.perf_counter() - t0
    # metrics.jsonl holds the exact values; the printed ones give the arrival times
    rows_path = Path(storage) / "baby-gpt" / "metrics.jsonl"
    exact = {}
    if rows_path.is_file():
        for l in rows_path.read_text().splitlines():
            r = json.loads(l)
            if "val_loss" in r:
                exact[r["step"]] = r["val_loss"]
    evals = [(st, exact.get(st, v), t) for st, v, t in evals]
    if rc != 0 or not evals:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"quality run {'timed out' if timed_out else f'exited {rc}'} "
                           f"after {total:.0f} s; log {log_path}:\n{tail}")
    return {"evals": evals, "total": total, "timed_out": timed_out}


def char_data(data_dir: str | None, source: str, tmp: str) -> str:
    """`data_dir` if given, else Tiny Shakespeare prepared from `source` (char) under tmp;
    an absolute path either way (the sweep benchmark uses it too)."""
    if data_dir is None:
        from chimera.data.prepare import prepare
        data_dir = str(Path(tmp) / "shakespeare_char")
        prepare("shakespeare", sources=[source], tokenizer="char", out=data_dir,
                progress=False, log=lambda *_: None)
    return str(Path(data_dir).resolve())


def _mmss(sec: float) -> str:
    return f"{int(sec // 60)}:{sec % 60:04.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def run(args: argparse.Namespace) -> int:
    s = _resolve(args)
    err = _validate(args, s)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="chimera_bench_train_") as tmp:
        data_dir = char_data(args.data_dir, args.source, tmp)
        tok = json.loads((Path(data_dir) / "manifest.json").read_text())["tokenizer"]
        print(f"# train benchmark — torch {torch.__version__}, {args.threads} threads, "
              f"{os.cpu_count()} CPUs, data {data_dir} ({tok.get('name', tok.get('kind', '?'))}, "
              f"vocab {tok.get('vocab_size')}){', --quick' if args.quick else ''}", flush=True)
        storage = str(Path(tmp) / "runs")
        Path(storage).mkdir(parents=True, exist_ok=True)
        from chimera.train.config import TrainConfigError

        try:
            if "tax" not in args.skip:
                for li in (10, 1):
                    t = _tax(data_dir, storage, s, li)
                    rows.append((f"Platform tax: `jobs/train.py` ÷ bare loop, wall time per 100 steps "
                                 f"(evals included, steps {t['from']}–{t['end']}), side by side, "
                                 f"1 thread each, log_interval {li}",
                                 f"{t['ratio']:.3f}  ({t['train']:.2f} vs {t['bare']:.2f} s per 100 steps)",
                                 f"≤ 1.05 — {_verdict(t['ratio'] <= 1.05)}"))
            startup = None
            if "startup" not in args.skip:
                startup = _startup(data_dir, storage, 1, args.threads)
                rows.append((f"Start-up: `jobs/train.py` start → end of its first optimizer step, "
                             f"1 worker × {args.threads} threads",
                             f"{startup:.1f} s", f"≤ 10 s — {_verdict(startup <= 10)}"))
                if args.threads >= 2:
                    s2 = _startup(data_dir, storage, 2, 1)
                    rows.append(("Start-up: the same, 2 workers × 1 thread", f"{s2:.1f} s",
                                 f"≤ 10 s — {_verdict(s2 <= 10)}"))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

        if {"overhead", "dp"} - set(args.skip):
            half = args.threads // 2
            try:
                p_in1 = _plan(data_dir, storage, "inproc-1", s, 1, args.threads)
                p_in2 = _plan(data_dir, storage, "inproc-2", s, 1, args.threads)
                p_ray1 = _plan(data_dir, storage, "ray-1w", s, 1, args.threads)
                p_ray2 = _plan(data_dir, storage, "ray-2w", s, 2, half) if "dp" not in args.skip else None
            except TrainConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            model = (f"{s['n_layer']} layers, n_embd {s['n_embd']}, {s['n_head']} heads, block "
                     f"{s['block_size']}, 2 micro-batches of {s['batch_size']} per step")
            r: dict[str, dict] = {}
            if "overhead" not in args.skip:
                r["in1"] = _measure(p_in1, True, s["warmup"])
            _start_ray(args.threads)
            r["ray1"] = _measure(p_ray1, False, s["warmup"])
            if p_ray2 is not None:
                r["ray2"] = _measure(p_ray2, False, s["warmup"])
            if "overhead" not in args.skip:
                r["in2"] = _measure(p_in2, True, s["warmup"])
                inp_wall = statistics.mean([r["in1"]["wall"], r["in2"]["wall"]])
                inp_loop = statistics.mean([r["in1"]["loop"], r["in2"]["loop"]])
                ratio = r["ray1"]["wall"] / inp_wall
                rows.append((f"Ray Train overhead: TorchTrainer 1 worker ÷ in-process step time "
                             f"({args.threads} threads; {model})",
                             f"{ratio:.3f}  ({r['ray1']['wall'] * 1e3:,.0f} vs {inp_wall * 1e3:,.0f} ms/step "
                             f"between log points, in-process runs {r['in1']['wall'] * 1e3:,.0f} and "
                             f"{r['in2']['wall'] * 1e3:,.0f}; loop's own step time "
                             f"{r['ray1']['loop'] / inp_loop:.3f})",
                             f"≤ 1.03 — {_verdict(ratio <= 1.03)}"))
            if p_ray2 is not None:
                t2 = r["ray2"]["tokens"] / r["ray2"]["wall"]
                t1 = r["ray1"]["tokens"] / r["ray1"]["wall"]
                eff = t2 / t1
                rows.append((f"Data-parallel efficiency: 2 workers × {half} thread ÷ 1 worker × "
                             f"{args.threads} threads tokens/s (same global batch)",
                             f"{eff:.3f}  ({t2:,.0f} vs {t1:,.0f} tok/s; loop's own step time "
                             f"{r['ray1']['loop'] / r['ray2']['loop']:.3f})",
                             f"≥ 0.85 — {_verdict(eff >= 0.85)}"))
            import ray
            ray.shutdown()

        if "quality" not in args.skip:
            try:
                q = _quality(data_dir, storage, s, args)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            evals = q["evals"]
            hit = next((e for e in evals if e[1] <= args.target_loss), None)
            best = min(evals, key=lambda e: e[1])
            label = (f"Time to val loss ≤ {args.target_loss} from `jobs/train.py` start (baby GPT, "
                     f"{args.threads} threads, eval every {s['eval_interval']} steps)")
            if hit:
                rows.append((label, f"{_mmss(hit[2])}  (step {hit[0]}, val {hit[1]:.4f})",
                             f"≤ 4 min — {_verdict(hit[2] <= 240)}"))
            else:
                rows.append((label, f"not reached: best val {best[1]:.4f} at step {best[0]}, "
                             f"{_mmss(best[2])}", "≤ 4 min — **missed**"))
            try:
                bare_hit, bare_total = _bare_quality(data_dir, s, args)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            if hit and bare_hit:
                allowed = bare_hit * 1.05 + (startup or 0.0)
                rows.append((f"Time to val loss ≤ {args.target_loss}: `jobs/train.py` ÷ (bare loop × 1.05 "
                             f"+ start-up), same threads",
                             f"{hit[2] / allowed:.3f}  ({_mmss(hit[2])} vs bare {_mmss(bare_hit)}"
                             f"{f' + start-up {startup:.1f} s' if startup else ''}; bare run "
                             f"{_mmss(bare_total)} in all)", f"≤ 1 — {_verdict(hit[2] <= allowed)}"))
            elif not bare_hit:
                rows.append((f"Bare loop: time to val loss ≤ {args.target_loss}", "not reached", ""))
            last = evals[-1]
            rows.append((f"Final val loss (step {last[0]} of {s['max_iters']})",
                         f"{last[1]:.4f}  (best {best[1]:.4f}; run wall time {_mmss(q['total'])}"
                         f"{', stopped by --timeout' if q['timed_out'] else ''})", ""))

    w = max(len(a) for a, _, _ in rows)
    print(f"| {'measurement'.ljust(w)} | result | target |")
    print(f"|{'-' * (w + 2)}|---|---|")
    for a, b, c in rows:
        print(f"| {a.ljust(w)} | {b} | {c} |")
    return 0
