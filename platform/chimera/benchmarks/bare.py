"""The bare training loop the platform is measured against: the same model, data, optimizer,
schedule and evaluation as chimera.train.trainer, written out in one function, with no Ray, no
reporting, no metrics files, no checkpoints and no logging. `python jobs/bench.py train`
runs it in a subprocess beside `jobs/train.py`:

    python -m chimera.benchmarks.bare --data_dir D --max_iters 1000 --eval_interval 100 \
        --eval_iters 20 --threads 1 -- <jobs/train.py model flags>

It prints one JSON line: {"stamps": [[step, seconds since start], ...] at every 100th step
(taken where the platform prints its log line: after the step, before that step's eval),
"evals": [[step, val_loss, seconds since start when it was known], ...], "first_step_s":
seconds from the start of the process to the end of the first optimizer step}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

T_START = time.perf_counter()


def run(data_dir: str, model_flags: dict, batch_size: int, lr: float, warmup: int,
        max_iters: int, eval_interval: int, eval_iters: int, weight_decay: float, beta1: float,
        beta2: float, grad_clip: float, seed: int) -> dict:
    import torch

    from chimera.data.loader import ShardLoader
    from chimera.data.shards import read_manifest
    from chimera.train.plan import resolve_model
    from chimera.train.schedule import lr_at
    from models import LLM

    vocab = read_manifest(data_dir)["tokenizer"]["vocab_size"]
    cfg = resolve_model(model_flags, None, vocab)
    torch.manual_seed(seed)
    model = LLM(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(beta1, beta2))
    T = cfg.block_size
    train = ShardLoader(data_dir, "train", batch_size, T, seed=seed)
    evals = {"val": ShardLoader(data_dir, "val", batch_size, T),
             "train": ShardLoader(data_dir, "train", batch_size, T, seed=seed + 1, shuffle=True)}

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        out = {}
        for name, ld in evals.items():
            ld.reset()
            out[name] = sum(model.forward_with_aux(*ld.next_batch())[1].item()
                            for _ in range(eval_iters)) / eval_iters
        model.train()
        return out["val"]

    stamps, val, first = [], [[0, evaluate(), time.perf_counter() - T_START]], None
    for step in range(max_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, max_iters)
        x, y = train.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_biases()
        done = step + 1
        if first is None:
            first = time.perf_counter() - T_START
        if done % 100 == 0 or done == max_iters:
            stamps.append([done, time.perf_counter() - T_START])
        if done % eval_interval == 0 or done == max_iters:
            val.append([done, evaluate(), time.perf_counter() - T_START])
    return {"stamps": stamps, "evals": val, "first_step_s": first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chimera.benchmarks.bare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="prepared shards (manifest.json)")
    p.add_argument("--max_iters", type=int, required=True, help="optimizer steps")
    p.add_argument("--eval_interval", type=int, required=True, help="steps between evaluations")
    p.add_argument("--eval_iters", type=int, required=True, help="batches per evaluation")
    p.add_argument("--threads", type=int, required=True, help="torch threads")
    p.add_argument("model", nargs=argparse.REMAINDER, help="-- then jobs/train.py's flags of the recipe")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    flags = dict(zip(a.model[1::2], a.model[2::2])) if a.model[:1] == ["--"] else dict(zip(a.model[::2], a.model[1::2]))
    from chimera.train.config import load_train_config
    tc = load_train_config({k.lstrip("-"): _num(v) for k, v in flags.items()})
    if tc.total_batch_size != tc.batch_size * int(tc.model.get("block_size", 1024)):
        print("error: the bare loop runs one micro-batch per step", file=sys.stderr)
        return 2
    out = run(a.data_dir, dict(tc.model), tc.batch_size, tc.learning_rate, tc.warmup_steps,
              a.max_iters, a.eval_interval, a.eval_iters, tc.weight_decay, tc.beta1, tc.beta2,
              tc.grad_clip, tc.seed)
    print(json.dumps(out), flush=True)
    return 0


def _num(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


if __name__ == "__main__":
    sys.exit(main())
