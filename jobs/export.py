"""Export a Chimera checkpoint as a Hugging Face `transformers` model folder.

    python jobs/export.py --checkpoint runs/my_run --format hf --out exports/my_run
    python jobs/export.py --checkpoint s3://bucket/runs/r1 --format hf --out s3://bucket/hf/r1 --overwrite

The family (GPT-2, Llama / Qwen2, DeepSeek-V3) follows from the stack's mechanisms; a stack no
single family expresses is refused with the layers that do not fit. The folder holds
config.json, model.safetensors, generation_config.json, tokenizer files and a README.md, and
loads with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained. --out may be
an object-store URI (written locally first, then uploaded). Errors exit with code 2.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (its best checkpoint); local or URI")
    p.add_argument("--format", default="hf", choices=("hf",), help="hf: a Hugging Face transformers folder")
    p.add_argument("--out", required=True, help="output folder (local or URI); must be empty or absent")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    args = build_parser().parse_args(argv)
    from chimera import storage
    from chimera.hf.convert import export_hf
    try:
        out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as e:               # ConfigError, StorageError, TokenizerError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    arch = storage.read_json(storage.join(out, "config.json"))["architectures"][0]
    print(f"exported {args.checkpoint} as {arch} to {out}: {', '.join(storage.listdir(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
