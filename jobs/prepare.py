"""Prepare a dataset: text -> tokenizer -> uint16 token shards + manifest.json.

    python jobs/prepare.py --dataset shakespeare --source ../shared/data/tinyshakespeare/input.txt
    python jobs/prepare.py --dataset shakespeare --tokenizer char      # downloads the text
    python jobs/prepare.py --dataset fineweb-edu --source my_parquet_dir/ --shard_size 100M
    python jobs/prepare.py --dataset shakespeare --tokenizer bpe --vocab_size 8192   # trained

Datasets: shakespeare, wikitext, tinystories, fineweb-edu. Without --source the default source
is downloaded (needs network); --source takes .txt/.jsonl/.parquet files or folders. The gpt2
tokenizer reads its BPE files from $TIKTOKEN_CACHE_DIR when offline (see docs/data.md); the bpe
tokenizer is trained on the train split (--vocab_size) and saved in manifest.json.
Output: data/<dataset>_<tokenizer> under the repository (what jobs/train.py --dataset
--tokenizer reads by default), or --out.
--out s3://BUCKET/data/NAME (gs://, ... : any store pyarrow opens) prepares in a local staging
folder and uploads; the manifest goes last, so a half-written dataset is never taken for a
finished one. --num_workers N tokenizes in N Ray workers (the cluster of `ray job submit`, or a
local instance); the shards are byte-identical to a 1-thread run.
Interrupted? Re-run the same command: finished shards are kept.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from _paths import setup
    setup()
    from chimera.data.sources import DATASETS
    from chimera.paths import DEFAULT_TOKENIZER
    from chimera.data.prepare import DEFAULT_SHARD_SIZE, parse_count
    from chimera.data.tokenizers import TOKENIZERS

    p = argparse.ArgumentParser(prog="jobs/prepare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--source", nargs="+", help="local .txt/.jsonl/.parquet files or folders (default: download)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"one of: {', '.join(TOKENIZERS)}")
    p.add_argument("--vocab_size", type=int, help="vocabulary of --tokenizer bpe, trained on the train split (258..65535, <|endoftext|> included)")
    p.add_argument("--out", help="output folder or object-store URI, e.g. s3://BUCKET/data/x (default: <repo>/data/<dataset>_<tokenizer>)")
    p.add_argument("--text_column", default="text", help="text column of jsonl/parquet sources")
    p.add_argument("--shard_size", type=parse_count, default=DEFAULT_SHARD_SIZE, help="tokens per shard (e.g. 100M)")
    p.add_argument("--val_fraction", type=float, help="fraction of the text for validation (default per dataset)")
    p.add_argument("--num_proc", type=int, help="tokenizer threads in this process (default: all CPUs)")
    p.add_argument("--num_workers", type=int, help="tokenize in this many Ray workers (one CPU each) instead of threads")
    p.add_argument("--stage_dir", help="local staging folder of an object-store --out (default: <cache>/stage/<hash of the URI>)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset prepared with other settings")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    from chimera.data.sources import DataError
    from chimera.paths import resolve_data_dir
    from chimera.storage import StorageError
    from chimera.data.prepare import prepare
    from chimera.data.tokenizers import TokenizerError

    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "jobs/prepare.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        out = resolve_data_dir(args.out, args.dataset, args.tokenizer)
        r = prepare(args.dataset, out=out, sources=args.source, tokenizer=args.tokenizer,
                    text_column=args.text_column, shard_size=args.shard_size,
                    val_fraction=args.val_fraction, num_proc=args.num_proc,
                    num_workers=args.num_workers, stage_dir=args.stage_dir,
                    overwrite=args.overwrite, command=command, progress=not args.no_progress,
                    vocab_size=args.vocab_size)
    except (DataError, TokenizerError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130

    m = r.manifest
    tok = m["tokenizer"]
    print(f"{'already prepared' if r.skipped else 'prepared'}: {m['dataset']} with {tok['name']} "
          f"(vocab {tok['vocab_size']}, eot {tok['eot_id']})")
    for split, info in m["splits"].items():
        n = len(info["shards"])
        print(f"  {split:5s} {info['tokens']:>15,} tokens  {n} shard{'s' if n != 1 else ''}  "
              f"{m['documents'][split]:,} document ends")
    print(f"  manifest {r.manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
