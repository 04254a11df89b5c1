"""`python jobs/bench.py data`: the data pipeline's benchmark table.

The ratios are measured side by side in one run:
  * preparation throughput ÷ tiktoken's own throughput: `prepare()` (read jsonl, tokenize,
    write shards with sha256, manifest) on a corpus of real documents vs
    `encode_ordinary_batch` on the same documents with the same thread count (gpt2 tokens/s,
    best of --repeats). Target >= 0.8: the tokenizer is the limit, the rest must not cost.
  * bpe (the trained tokenizer, --bpe_vocab): training throughput (the corpus's bpe tokens per
    second of `BPETokenizer.train` on its documents), shown beside tiktoken's encode throughput
    (information, no target: training runs once per dataset), and bpe encode ÷ tiktoken gpt2
    encode: `encode_batch` of both on the same documents with all threads (tokens/s, each its
    own tokens; best of --repeats, alternated). Target >= 0.5: preparing with bpe then takes at
    most twice as long as with gpt2.
  * N Ray workers ÷ 1 Ray worker (`prepare(num_workers=...)`, gpt2 tokens/s, best of --repeats,
    alternated) on a corpus of --workers_mb megabytes. Ray is started (or joined: RAY_ADDRESS)
    once before both, as on a running cluster; each preparation's own worker start-up is
    included. Target >= 1.6 for N=2. Printed with it, the profile of a miss: the workers'
    start-up, the CPUs they kept busy, the load average, and a control measured alongside
    (the thread pool, N threads ÷ 1): when that cannot scale either, the machine's cores are
    taken (this machine is shared), not the workers' design.
  * loader fetch ÷ train step: ShardLoader.next_batch() at B=8, T=1024 (mean over --fetches,
    moved to --device) vs one fp32 train step (forward, backward, AdamW) of the foundation
    benchmark model (6 layers, n_embd 384, 6 heads, block 256, batch 8, vocab 50304; median of
    --steps). Target <= 0.02.
  * the same ÷ train step for ShardLoader reading s3:// from a SeaweedFS started by the
    benchmark (chimera.benchmarks.loader_store): first pass, warm cache, and cold (cache 0 MiB:
    every window a miss). Target <= 0.02.
The header gives the machine's load average (other jobs sharing the cores move the ratios).
The corpus defaults to the samples in ../shared/data (TinyStories, WikiText-2, Tiny
Shakespeare), repeated up to --mb megabytes. gpt2 needs its BPE files: set TIKTOKEN_CACHE_DIR
(see docs/data.md) when offline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from chimera.paths import SHARED_DATA

SHARED = SHARED_DATA
DEFAULT_TEXTS = ("tinystories/tinystories_val.txt", "wikitext/wikitext-2-raw/wiki.test.raw",
                 "tinyshakespeare/input.txt")
MODEL = {"n_layer": 6, "n_embd": 384, "n_head": 6, "attn": "mha", "block_size": 256,
         "vocab_size": 50304, "pos_emb": "learn", "non_linearity": "gelu", "up_dim": 1536}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", nargs="+", help="text files for the corpus (default: the shared "
                                             "TinyStories, WikiText-2 and Shakespeare samples)")
    p.add_argument("--mb", type=float, default=16.0, help="corpus size in MB (text repeated)")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer threads (default: all CPUs)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each preparation measurement")
    p.add_argument("--device", default="cpu", help="device of the loader batches and the train step")
    p.add_argument("--fetches", type=int, default=200, help="loader batches timed")
    p.add_argument("--steps", type=int, default=5, help="train steps timed (median)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers of the parallel-preparation row")
    p.add_argument("--workers_mb", type=float, default=64.0, help="corpus size in MB of the parallel-preparation row")
    p.add_argument("--bpe_vocab", type=int, default=8192, help="vocabulary of the bpe rows' trained tokenizer")
    p.add_argument("--skip", nargs="*", default=[], choices=["prepare", "bpe", "workers", "loader", "store"],
                   help="sections to leave out")


def _documents(paths: list[Path], mb: float) -> list[str]:
    """Paragraph-sized documents (split at blank lines; at lines where a paragraph is longer
    than 20k characters, e.g. WikiText without blank lines), repeated up to `mb` megabytes.
    Small documents keep tiktoken's batch encoder on all threads: the comparison is fair."""
    base: list[str] = []
    for p in paths:
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n")
        for para in text.split("\n\n"):
            parts = para.split("\n") if len(para) > 20_000 else [para]
            base += [d.strip("\n") + "\n" for d in parts if d.strip()]
    if not base:
        raise ValueError("the benchmark texts are empty")
    docs, size, want = [], 0, int(mb * 1e6)
    while size < want:
        for d in base:
            docs.append(d)
            size += len(d)
            if size >= want:
                break
    return docs


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from chimera.data.prepare import prepare
    from chimera.data.tokenizers import TokenizerError, get_tokenizer

    paths = [Path(t) for t in args.text] if args.text else [SHARED / t for t in DEFAULT_TEXTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: benchmark text not found: {', '.join(missing)} (pass --text FILES)")
        return 2
    try:
        tok = get_tokenizer("gpt2")
    except TokenizerError as e:
        print(f"error: {e}")
        return 2
    threads = args.num_proc or os.cpu_count() or 1
    docs = _documents(paths, args.mb)
    chars = sum(map(len, docs))
    rows: list[tuple[str, str, str, float, str]] = []

    with tempfile.TemporaryDirectory(prefix="chimera_bench_data_") as tmp:
        src = Path(tmp) / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        enc = tok._enc
        enc.encode_ordinary_batch(docs[:2000], num_threads=threads)          # warm-up
        n_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=threads)))
        out = Path(tmp) / "prepared"

        def prep():   # overwrite=True: every repeat prepares from scratch
            prepare("tinystories", sources=[src], out=out, tokenizer="gpt2", val_fraction=0.01,
                    num_proc=threads, overwrite=True, progress=False, log=lambda *_: None)

        def tiktoken_batch():
            enc.encode_ordinary_batch(docs, num_threads=threads)

        if "prepare" not in args.skip:   # alternate the two so load changes hit both alike
            t_tik = t_prep = float("inf")
            for _ in range(args.repeats):
                t_tik = min(t_tik, _seconds(tiktoken_batch))
                t_prep = min(t_prep, _seconds(prep))
            rows.append((f"prepare ÷ tiktoken encode_ordinary_batch ({chars / 1e6:.0f} MB, "
                         f"{len(docs):,} docs, {threads} threads)",
                         f"{n_tokens / t_prep / 1e6:.2f} Mtok/s",
                         f"{n_tokens / t_tik / 1e6:.2f} Mtok/s", t_tik / t_prep, ">= 0.8"))

        if "bpe" not in args.skip:
            rows += _bpe_rows(docs, tok, args.bpe_vocab, args.repeats, threads)

        if "workers" not in args.skip:
            rows.append(_workers_row(paths, Path(tmp), args))

        if "loader" not in args.skip or "store" not in args.skip:
            rows += _loader_rows(out, src, args, threads)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"data benchmark: device {args.device}, {threads} tokenizer threads, "
          f"{len(docs):,} documents, {n_tokens:,} gpt2 tokens, load average {load}")
    w = max(len(r[0]) for r in rows) if rows else 40
    print(f"{'measurement':<{w}}  {'measured':>14}  {'reference':>14}  {'ratio':>8}  target")
    for name, a, b, ratio, target in rows:
        if target == "-":                          # information: no target
            print(f"{name:<{w}}  {a:>14}  {b:>14}  {ratio:>8.3g}  -")
            continue
        bound = float(target.split()[1])
        ok = ratio >= bound if target.startswith(">=") else ratio <= bound
        print(f"{name:<{w}}  {a:>14}  {b:>14}  {ratio:>8.3g}  {target} {'ok' if ok else 'MISSED'}")
    return 0


def _bpe_rows(docs: list[str], gpt2, vocab: int, repeats: int, threads: int) -> list:
    """bpe training tokens/s (beside tiktoken's encode), bpe encode ÷ tiktoken encode."""
    from chimera.data.tokenizers import BPETokenizer

    t_train = t_bpe = t_tik = float("inf")
    bpe = None
    for _ in range(repeats):                 # alternated: load changes hit all three alike
        t0 = time.perf_counter()
        bpe = BPETokenizer.train(docs, vocab)
        t_train = min(t_train, time.perf_counter() - t0)
        t_bpe = min(t_bpe, _seconds(lambda: bpe.encode_batch(docs)))
        t_tik = min(t_tik, _seconds(lambda: gpt2.encode_batch(docs, num_threads=threads)))
    n_bpe = sum(map(len, bpe.encode_batch(docs)))
    n_tik = sum(map(len, gpt2.encode_batch(docs, num_threads=threads)))
    mb = sum(map(len, docs)) / 1e6
    tik = f"{n_tik / t_tik / 1e6:.2f} Mtok/s"
    return [(f"bpe training, vocab {bpe.vocab_size} ({mb:.0f} MB; ratio ÷ tiktoken encode)",
             f"{n_bpe / t_train / 1e6:.2f} Mtok/s", tik, (n_bpe / t_train) / (n_tik / t_tik), "-"),
            (f"bpe encode_batch ÷ tiktoken gpt2 encode_ordinary_batch ({mb:.0f} MB, "
             f"{n_bpe / n_tik:.2f}× gpt2's tokens)", f"{n_bpe / t_bpe / 1e6:.2f} Mtok/s", tik,
             (n_bpe / t_bpe) / (n_tik / t_tik), ">= 0.5")]


_BUSY = re.compile(r"in [0-9.]+ s: ([0-9.]+) of [0-9]+ CPUs busy")   # RayEncoder.stats()


def _workers_row(paths: list[Path], tmp: Path, args):
    """N Ray workers ÷ 1 Ray worker, whole preparations (see the module docstring)."""
    import ray

    from chimera.data.parallel import RayEncoder
    from chimera.data.prepare import prepare
    from chimera.data.tokenizers import get_tokenizer
    from chimera.runtime import init_ray

    docs = _documents(paths, args.workers_mb)
    src = tmp / "corpus_workers.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    own = not ray.is_initialized()
    init_ray()
    try:
        load0 = os.getloadavg()
        starts = {}
        for n in (1, args.workers):                      # worker start-up alone, for the profile
            t0 = time.perf_counter()
            with RayEncoder(get_tokenizer("gpt2"), n):
                starts[n] = time.perf_counter() - t0
        # (executor, n): Ray workers, and the thread pool as the control: how far this
        # machine lets n of anything run in parallel right now
        runs = [("num_workers", 1), ("num_workers", args.workers), ("num_proc", 1),
                ("num_proc", args.workers)]
        best, tokens = {k: float("inf") for k in runs}, 0
        busy: dict[int, list[str]] = {1: [], args.workers: []}
        for _ in range(args.repeats):
            for kind, n in runs:
                out, logs = tmp / f"{kind}_{n}", []
                t0 = time.perf_counter()
                r = prepare("tinystories", sources=[src], out=out, tokenizer="gpt2",
                            val_fraction=0.01, overwrite=True, progress=False,
                            log=logs.append, **{kind: n})
                best[kind, n] = min(best[kind, n], time.perf_counter() - t0)
                tokens = sum(sp["tokens"] for sp in r.manifest["splits"].values())
                if kind == "num_workers":
                    busy[n] += [m.group(1) for x in logs if (m := _BUSY.search(x))]
        load1 = os.getloadavg()
        cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        if own:
            ray.shutdown()
    print(f"parallel preparation: {len(docs):,} documents, {tokens:,} gpt2 tokens; worker "
          f"start-up (included) {starts[1]:.2f} s for 1, {starts[args.workers]:.2f} s for "
          f"{args.workers}; load average {load0[0]:.2f} before, {load1[0]:.2f} after, "
          f"{cpus} CPUs")
    for n, b in busy.items():      # < n busy CPUs: the workers did not get their cores
        print(f"  {n} worker(s): CPUs busy tokenizing per repeat: {', '.join(b)} of {n}")
    n = args.workers
    t1, tn = best["num_proc", 1], best["num_proc", n]
    print(f"  control, the thread pool on the same corpus: {n} threads ÷ 1 thread "
          f"{t1 / tn:.2f} ({tokens / tn / 1e6:.2f} vs {tokens / t1 / 1e6:.2f} Mtok/s)")
    w1, wn = best["num_workers", 1], best["num_workers", n]
    return (f"prepare, {n} Ray workers ÷ 1 Ray worker ({sum(map(len, docs)) / 1e6:.0f} MB, "
            f"gpt2)", f"{tokens / wn / 1e6:.2f} Mtok/s", f"{tokens / w1 / 1e6:.2f} Mtok/s",
            w1 / wn, ">= 1.6")


def _loader_rows(out: Path, src: Path, args, threads: int) -> list:
    import torch

    from chimera.data.loader import ShardLoader
    from chimera.data.prepare import prepare

    if not (out / "manifest.json").is_file():
        prepare("tinystories", sources=[src], out=out, tokenizer="gpt2", val_fraction=0.01,
                num_proc=threads, overwrite=True, progress=False, log=lambda *_: None)
    try:
        from models import LLM, ModelConfig
    except ImportError as e:
        print(f"loader rows skipped: the models package is not importable ({e})")
        return []
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    loader = ShardLoader(out, split="train", batch_size=8, block_size=1024, seed=0, device=dev)
    for _ in range(10):
        loader.next_batch()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.fetches):
        x, y = loader.next_batch()
    sync()
    t_fetch = (time.perf_counter() - t0) / args.fetches

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_dict(MODEL)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    xb = torch.randint(0, MODEL["vocab_size"], (8, MODEL["block_size"]), device=dev)
    yb = torch.randint(0, MODEL["vocab_size"], (8, MODEL["block_size"]), device=dev)

    def step():
        _, loss = model(xb, yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t_step = statistics.median(times)
    step_name = "6L, 384d, 8x256, vocab 50304, fp32"
    rows = []
    if "loader" not in args.skip:
        rows.append((f"loader batch 8x1024 ÷ train step ({step_name})",
                     f"{t_fetch * 1e3:.3f} ms", f"{t_step * 1e3:.1f} ms", t_fetch / t_step,
                     "<= 0.02"))
    if "store" not in args.skip:
        from chimera.benchmarks.loader_store import store_rows
        rows += store_rows(out, args.fetches, dev, sync, t_step, step_name)
    return rows
