"""The main job, for now: build the heterogeneous model of configs/hetero.jsonl, print its
size and cost, and sample a few tokens from it (untrained, so the text is noise).

    python jobs/demo.py [--layers configs/hetero.jsonl] [--max_new_tokens 40]

The demo model reads bytes (vocab 256), so its output decodes without any tokenizer files.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    repo = setup()
    import torch
    from models import LLM, ModelConfig
    from models.generation import check_sampling_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=str(repo / "configs" / "hetero.jsonl"), help="seed-format JSONL layer file")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--prompt", default="To be, or not to be")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    try:
        check_sampling_args(args.max_new_tokens, 1.0, 50, None)   # flags first, before any work
        cfg = ModelConfig.from_layer_file(args.layers, n_embd=args.n_embd, block_size=args.block_size,
                                          vocab_size=256)
    except ValueError as e:                                    # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = LLM(cfg).eval()
    n = model.num_params()
    print(f"architecture        {cfg.summary()}")
    print(f"parameters          total {n.total:,}  active {n.active:,} ({n.active / n.total:.0%})")
    print(f"training FLOPs/tok  {model.flops_per_token():,}")
    print(f"KV cache bytes/tok  {model.kv_cache_bytes_per_token(torch.float32):,} (fp32), "
          f"{model.kv_cache_bytes_per_token(torch.bfloat16):,} (bf16)")
    for i, b in enumerate(cfg.layers):
        print(f"  layer {i}: {b.summary():14s} {model.blocks[i].attn.kv_values_per_token()} cached values/token")
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))[-args.block_size:] or [0]])
    t0 = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, temperature=1.0, top_k=50,
                         generator=torch.Generator().manual_seed(args.seed))
    dt = time.perf_counter() - t0
    text = bytes(out[0, prompt.size(1):].tolist()).decode("utf-8", errors="replace")
    print(f"generation (untrained, KV cache, {args.max_new_tokens / dt:.0f} tok/s):")
    print(f"  {args.prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
