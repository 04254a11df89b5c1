"""Sample from a trained checkpoint, locally (no Ray, no server) — the seed's sampling CLI.

    python jobs/sample.py --model_path runs/my_run --prompt "ROMEO:" --max_new_tokens 200 \
        --temperature 0.8 --top_k 100 [--top_p 0.95] [--seed 1] [--no_kv_cache] [--decode compiled]

--model_path is a checkpoint dir or a run dir (its best checkpoint). Prints the prompt and its
continuation on stdout, tokens/s on stderr. The KV-cached path runs serve/engine.py (the
server's engine, batch of one); --no_kv_cache runs the full-window model every step. With the
same seed both give the same tokens. --decode picks the engine's decode step (models/decode.py):
by default compiled on CUDA and eager on CPU, where torch.compile's seconds of compile time cost
more than a sample's few hundred tokens save (docs/benchmarks.md). A prompt longer than block_size keeps its last
block_size tokens; generation stops at max_new_tokens or the tokenizer's end-of-text token.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace


def build_parser() -> argparse.ArgumentParser:
    from _paths import setup
    setup()
    from models.decode import DECODE_MODES
    p = argparse.ArgumentParser(prog="jobs/sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint dir or run dir")
    p.add_argument("--prompt", default="\n", help="text to continue (its last block_size tokens are used)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=float, help="nucleus sampling: smallest set with probability >= p, in (0, 1]")
    p.add_argument("--seed", type=int, help="default: a random seed")
    p.add_argument("--no_kv_cache", action="store_true", help="recompute the window every step")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--decode", choices=DECODE_MODES,
                   help="decode step: eager, static (static shapes) or compiled (torch.compile of "
                        "the static step); default: compiled on CUDA, eager on CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    args = build_parser().parse_args(argv)
    import torch

    from models.sampling import SamplingParams
    from serve.engine import Engine
    from chimera.checkpoint import load_model
    try:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        if not args.prompt:
            raise ValueError("--prompt is empty")
        if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"--device {args.device}: use auto, cpu or cuda (with a visible GPU)")
        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if args.device == "auto" else args.device)
        model, tok, _ = load_model(args.model_path, device)
        ids = tok.encode(args.prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
    except ValueError as e:                           # TokenizerError and ConfigError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(ids) > model.cfg.block_size:
        print(f"note: prompt of {len(ids)} tokens keeps its last {model.cfg.block_size}", file=sys.stderr)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
    params = replace(params, seed=seed)
    t0 = time.perf_counter()
    if args.no_kv_cache:
        g = torch.Generator(device=device).manual_seed(seed)
        out = model.generate(torch.tensor([ids], device=device), params.max_new_tokens,
                             temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             eos_id=tok.eot_id, use_cache=False, generator=g,
                             vocab_limit=tok.vocab_size)
        new = out[0, len(ids):].tolist()                    # out = all of ids + the new ones
        if tok.eot_id in new:
            new = new[:new.index(tok.eot_id) + 1]
        text = tok.decode([t for t in new if t != tok.eot_id])
    else:
        engine = Engine(model, tok, max_batch=1, decode=args.decode)
        done = engine.run({"s": (ids, params)})["s"]
        new, text = done.token_ids, done.text
    dt = time.perf_counter() - t0
    print(args.prompt + text)
    print(f"{len(new)} tokens in {dt:.2f} s: {len(new) / dt:.1f} tokens/s "
          f"(KV cache {'off' if args.no_kv_cache else f'on, decode {engine.runner.decode}'}, "
          f"{device}, seed {seed})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
