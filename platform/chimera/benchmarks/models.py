"""`python jobs/bench.py models`: the model package's benchmark table.

Every ratio is measured side by side in one run, on the same threads, fp32 on CPU (or the
`--device`/`--dtype` given), median of `--repeats` timings after warm-up:
  * MFU: train-step FLOP/s (model.flops_per_token() * tokens / step time) ÷ the measured
    matmul FLOP/s of this device (2048x2048, best of 10), at 6 layers, n_embd 384, 6 heads,
    block 256, batch 8, for vocab 65 and 50304.
  * MoE ÷ dense train-step time at equal active parameters.
  * mtp_depth 1 ÷ no MTP train-step time, the same model (vocab 65 and 50304): the cost of
    one multi-token-prediction module (one block of the last layer's kind + the shared head).
  * KV-cached ÷ uncached greedy decoding tokens/s (prompt 16, 256 new tokens, batch 1), with a
    check that both produce identical tokens.
  * Bandwidth fraction of batch-1 decoding (eager, static, compiled decode steps side by side)
    and Peer (tokens/s ÷ transformers generate, batch 1 and 8): chimera/benchmarks/decode.py.
    `--profile` prints torch.profiler's top ops of the eager and compiled GQA decode steps.
  * KV-cache bytes per token: measured allocation ÷ formula.
  * Sliding-window KV bytes: a local/global gqa stack (windowed layers and full ones, WINDOW_STACK)
    — its measured cache allocation ÷ the same stack's without windows, beside the formula's
    ratio (model.kv_cache_bytes) and the expected sum of min(window, block_size) / block_size.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch

from models import LLM, ModelConfig

BASE = dict(n_layer=6, n_embd=384, n_head=6, block_size=256, dropout=0.0, pos_emb="learn",
            norm="layernorm", attn="mha", moe=False, up_dim=1536, non_linearity="gelu")
MOE_CASES = {
    "moe 8e top-2, up 768": dict(moe=True, n_exp=8, n_shared=0, n_act=2, up_dim=768, aux_free=True),
    "moe 64e 1 shared 8 act, up 192": dict(moe=True, n_exp=64, n_shared=1, n_act=8, up_dim=192,
                                           aux_free=True),
}
# local/global: 5 gqa layers with a 64-token window, then one full layer (block 256)
WINDOW_STACK = [dict(attn="gqa", n_kv_heads=2, window=64)] * 5 + [dict(attn="gqa", n_kv_heads=2)]
DECODE_ATTN = {
    "mha": dict(attn="mha"),
    "gqa": dict(attn="gqa", n_kv_heads=2),
    "mla": dict(attn="mla", q_latent_dim=192, kv_latent_dim=128, rope_head_dim=32),
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast on CUDA (CPU bf16 matmuls are ~70x slower: use fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats before measuring")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per timed train step (MFU and MoE rows)")
    for k in ("n_layer", "n_embd", "n_head", "block_size"):
        p.add_argument(f"--{k}", type=int, default=BASE[k],
                       help=f"model size for the MFU rows (default {BASE[k]})")
    p.add_argument("--new_tokens", type=int, default=256, help="decode benchmark: tokens to generate")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["mfu", "moe", "mtp", "decode", "bandwidth", "peer", "kv"],
                   help="sections to leave out")
    p.add_argument("--profile", action="store_true",
                   help="also print the top ops of the eager and compiled batch-1 decode steps")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(device: str, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(12):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:                                                  # first two warm the kernels
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def build(device: str, compile_: bool, **kw) -> tuple[LLM, torch.nn.Module]:
    cfg = ModelConfig.from_dict({**BASE, **kw})
    torch.manual_seed(0)
    model = LLM(cfg).to(device)
    return model, (torch.compile(model) if compile_ else model)


def interleaved(fns: dict[str, Callable[[], None]], device: str, repeats: int, warmup: int
                ) -> dict[str, float]:
    """Median seconds per case, the cases timed in turn so that drift in machine speed hits
    all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        timed(f, device, 1, warmup)
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f, device, 1, 0))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(model: LLM, run: torch.nn.Module, batch: int, device: str, amp) -> Callable[[], None]:
    T, V = model.cfg.block_size, model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (batch, T), generator=g).to(device)
    y = torch.randint(0, V, (batch, T), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        with amp():
            _, loss = run(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_biases()
    return step


def run(args: argparse.Namespace) -> int:
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible")
        return 2
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.new_tokens < 1:
        print("error: --repeats, --batch_size and --new_tokens must be >= 1, --warmup >= 0")
        return 2
    bf16 = args.dtype == "bf16"
    if bf16 and not dev.startswith("cuda"):
        print("error: --dtype bf16 is for CUDA (autocast); CPU runs use fp32")
        return 2
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# models benchmark — torch {torch.__version__}, {name}, {args.dtype}"
          f"{', torch.compile' if args.compile else ''}, median of {args.repeats} after {args.warmup} warm-up")
    rows: list[tuple[str, str, str]] = []

    if "mfu" not in args.skip:
        peak = matmul_flops(dev, peak_dtype)
        rows.append(("matmul 2048² FLOP/s (reference)", f"{peak / 1e9:,.1f} GFLOP/s", ""))
        rows.append(("MFU model size", f"{args.n_layer} layers, n_embd {args.n_embd}, {args.n_head} heads, "
                     f"block {args.block_size}, batch {args.batch_size}", ""))
        for vocab, target in ((65, "≥ 0.85"), (50304, "≥ 0.70")):
            size = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "block_size")}
            size["up_dim"] = 4 * size["n_embd"]
            try:
                model, runner = build(dev, args.compile, vocab_size=vocab, **size)
            except ValueError as e:
                print(f"error: {e}")
                return 2
            t = timed(train_step_fn(model, runner, args.batch_size, dev, amp), dev, args.repeats, args.warmup)
            flops = model.flops_per_token() * args.batch_size * model.cfg.block_size
            rows.append((f"MFU train step, vocab {vocab}", f"{flops / t / peak:.3f}  ({flops / t / 1e9:,.1f} GFLOP/s, "
                         f"{t * 1e3:,.0f} ms/step)", target))

    if "moe" not in args.skip:
        dense, dense_run = build(dev, args.compile, vocab_size=65)
        fns = {"dense": train_step_fn(dense, dense_run, args.batch_size, dev, amp)}
        actives = {"dense": dense.num_params().active}
        for label, kw in MOE_CASES.items():
            m, r = build(dev, args.compile, vocab_size=65, **kw)
            fns[label] = train_step_fn(m, r, args.batch_size, dev, amp)
            actives[label] = m.num_params().active
        times = interleaved(fns, dev, args.repeats, args.warmup)
        td = times["dense"]
        for (label, target) in zip(MOE_CASES, ("≤ 1.15", "≤ 1.35")):
            tm = times[label]
            rows.append((f"{label} ÷ dense up 1536 step time", f"{tm / td:.3f}  ({tm * 1e3:,.0f} vs {td * 1e3:,.0f} ms; "
                         f"active {actives[label] / 1e6:.2f}M vs {actives['dense'] / 1e6:.2f}M)", target))

    if "mtp" not in args.skip:
        for vocab in (65, 50304):
            fns, params = {}, {}
            for depth in (0, 1):
                m, r = build(dev, args.compile, vocab_size=vocab, mtp_depth=depth)
                fns[depth] = train_step_fn(m, r, args.batch_size, dev, amp)
                params[depth] = m.num_params().total
            times = interleaved(fns, dev, args.repeats, args.warmup)
            rows.append((f"mtp_depth 1 ÷ no MTP train-step time, vocab {vocab}",
                         f"{times[1] / times[0]:.3f}  ({times[1] * 1e3:,.0f} vs {times[0] * 1e3:,.0f} ms; "
                         f"params {params[1] / 1e6:.2f}M vs {params[0] / 1e6:.2f}M)", ""))

    if "decode" not in args.skip:
        for label, kw in DECODE_ATTN.items():
            model, _ = build(dev, False, vocab_size=65, block_size=512, **kw)
            model.eval()
            prompt = torch.randint(0, 65, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
            out = {}

            def gen(cache: bool) -> None:
                with amp():
                    out[cache] = model.generate(prompt, args.new_tokens, temperature=0.0, use_cache=cache)
            tc = timed(lambda: gen(True), dev, max(1, args.repeats // 2), 1)
            tu = timed(lambda: gen(False), dev, max(1, args.repeats // 2), 1)
            same = torch.equal(out[True], out[False])
            rows.append((f"KV-cached ÷ uncached decode tok/s, {label}",
                         f"{tu / tc:.2f}  ({args.new_tokens / tc:,.0f} vs {args.new_tokens / tu:,.0f} tok/s; "
                         f"identical tokens: {'yes' if same else 'NO'})", "≥ 6"))

    if "bandwidth" not in args.skip or "peer" not in args.skip:
        from chimera.benchmarks import decode
        reps = max(1, args.repeats // 2)
        if "bandwidth" not in args.skip:
            rows += decode.bandwidth_rows(BASE, dev, args.new_tokens, reps)
        if "peer" not in args.skip:
            rows += decode.peer_rows(BASE, dev, args.new_tokens, reps, ("eager", "compiled"))

    if "kv" not in args.skip:
        for label, kw in DECODE_ATTN.items():
            model, _ = build(dev, False, vocab_size=65, **kw)
            for dt in (torch.float32, torch.bfloat16):
                cache = model.new_cache(2, dtype=dt)
                per_tok = cache.nbytes() / (2 * model.cfg.block_size)
                formula = model.kv_cache_bytes_per_token(dt)
                rows.append((f"KV bytes/token measured ÷ formula, {label} {str(dt)[6:]}",
                             f"{per_tok / formula:.3f}  ({formula:,} bytes/token)", "= 1"))

        win = ModelConfig.from_dict({**BASE, "vocab_size": 65, "layers": WINDOW_STACK})
        full = ModelConfig.from_dict({**BASE, "vocab_size": 65, "layers": [
            {k: v for k, v in layer.items() if k != "window"} for layer in WINDOW_STACK]})
        (mw, mf), B = (LLM(win).to(dev), LLM(full).to(dev)), 2
        measured = mw.new_cache(B).nbytes() / mf.new_cache(B).nbytes()
        formula = mw.kv_cache_bytes() / mf.kv_cache_bytes()
        blk = win.block_size
        expect = sum(min(b.attn.window or blk, blk) for b in win.layers) / (blk * win.n_layer)
        rows.append((f"sliding-window KV bytes measured ÷ no windows, {win.summary()}, block {blk}",
                     f"{measured:.4f}  (formula {formula:.4f}; {mw.kv_cache_bytes_per_token():,.1f} vs "
                     f"{mf.kv_cache_bytes_per_token():,} bytes/token fp32)", f"= {expect:.4f}"))

    if args.profile:
        from chimera.benchmarks import decode
        for mode in ("eager", "compiled"):
            print(f"## profile: 64 batch-1 decode steps, gqa, decode {mode}\n```\n"
                  f"{decode.profile_table(BASE, dev, mode)}```")
    w = max(len(r[0]) for r in rows)
    print(f"| {'measurement'.ljust(w)} | result | target |")
    print(f"|{'-' * (w + 2)}|---|---|")
    for a, b, c in rows:
        print(f"| {a.ljust(w)} | {b} | {c} |")
    return 0
