"""Dataset preparation: text -> tokenizer -> uint16 token shards + manifest (see shards.py).

    python jobs/prepare.py --dataset shakespeare --source ../shared/data/tinyshakespeare/input.txt
    from chimera.data.prepare import prepare
    result = prepare("tinystories", sources=["stories.jsonl"], tokenizer="gpt2", out="data/ts")
    prepare("fineweb-edu", sources=["pq/"], out="s3://bucket/data/fw", num_workers=8)

Pipeline (streaming; memory is bounded by a few task batches whatever the corpus size):
  1. sources -> fragments -> *pieces* of about PIECE_CHARS characters (sources.py: long
     documents are cut only where GPT-2's pre-tokenizer cannot join text across the cut, so
     pieces encode to exactly the tokens of the whole document).
  2. split: local sources -> the tail: train = the first int(C * (1 - val_fraction)) characters
     of the concatenated documents, val = the rest (nanoGPT's shakespeare split; a document
     straddling the point is cut there). Hub sets with a validation split use it; hub sets
     without one send document i to val when floor((i+1)*f) > floor(i*f).
  3. groups of pieces are tokenized in a thread pool (tiktoken's core releases the GIL) or by
     `num_workers` Ray workers (parallel.py), and come back in order; the end-of-text id
     follows every document when the tokenizer has one (gpt2; char/byte: none).
  4. each split streams into ShardWriter: `.tmp` files renamed when full, sha256 on the fly.
     After every finished shard progress.json records the shards and where the next one starts
     in the item stream; a re-run with the same settings resumes there (finished shards are
     kept, nothing is re-tokenized before them); other settings start clean.
  5. manifest.json is written last, then progress.json is removed. Re-running a finished
     preparation does nothing; other settings into a finished folder need overwrite=True.
Local sources and the char tokenizer first take a scan pass (character count for the split
and the progress bar's total; the char vocabulary). The bpe tokenizer is trained here, once,
on the driver, on the train split's pieces (a second pass over the sources; val text never
seen), before step 3: the workers get the trained tokenizer (Tokenizer.to_dict) and progress.json
keeps it, so a resumed run encodes with the same one.
An object-store `out` (s3://, gs://, ...: chimera.storage) runs the same pipeline in a local
staging folder and uploads shards as they finish, the manifest last (publish.py).

Testing hook: env CHIMERA_PREPARE_THROTTLE_S=<seconds> sleeps after each tokenized batch, so a
test can kill a preparation mid-run.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from chimera import storage
from chimera.paths import DEFAULT_TOKENIZER
from chimera.data.parallel import RayEncoder, ThreadEncoder, check_workers, encode_in_order
from chimera.data.sources import (HARD_PIECE_CHARS, PIECE_CHARS, DataError, Source, get_dataset,
                                  pieces, resolve_source)
from chimera.data.shards import (FORMAT, MANIFEST, MAX_VOCAB, PROGRESS, SPLITS, VERSION,
                                 ShardError, ShardWriter, is_shard_file, read_manifest,
                                 verify_shards, write_json_atomic)
from chimera.data.tokenizers import (TOKENIZERS, BPETokenizer, CharTokenizer, Tokenizer,
                                     TokenizerError, check_bpe_vocab_size, get_tokenizer)

DEFAULT_SHARD_SIZE = 100_000_000


@dataclass
class PrepareResult:
    out_dir: str | Path          # a local folder (Path) or an object-store URI (str)
    manifest_path: str | Path
    manifest: dict[str, Any]
    skipped: bool = False        # already prepared with the same settings: nothing done
    resumed_shards: int = 0      # finished shards kept from an interrupted run


def parse_count(text: str | int) -> int:
    """'100M' / '1e8' / '100_000_000' -> 100000000 (K, M, G suffixes are powers of 1000)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise ValueError(f"not a count: {text!r} (e.g. 100M, 1e8 or 100000000)") from None
    if value != int(value):
        raise ValueError(f"not a whole number: {text!r}")
    return int(value)


def prepare(dataset: str, *, out: str | Path, sources: Sequence[str | Path] | None = None,
            tokenizer: str = DEFAULT_TOKENIZER, text_column: str = "text",
            shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float | None = None,
            num_proc: int | None = None, num_workers: int | None = None,
            stage_dir: str | Path | None = None, overwrite: bool = False,
            command: str | None = None, progress: bool = True,
            log: Callable[[str], None] = print, vocab_size: int | None = None) -> PrepareResult:
    """Tokenize `dataset` into shards under `out` (a folder or an object-store URI); see the
    module docstring. `num_proc` tokenizer threads here, or `num_workers` Ray workers;
    `stage_dir`: the local staging folder of a URI `out`; `vocab_size`: the bpe tokenizer's
    (required with it, refused with the others). Raises DataError (bad name, source, column,
    setting), TokenizerError (gpt2 BPE files unavailable, bad vocab_size) or StorageError (a
    URI that cannot be opened or written)."""
    spec = get_dataset(dataset)
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size must be a positive number of tokens, got {shard_size!r}")
    if tokenizer == BPETokenizer.name:
        if vocab_size is None:
            raise TokenizerError("--tokenizer bpe needs --vocab_size N: the size of the "
                                 "vocabulary to train (e.g. 8192)")
        check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None:
        raise TokenizerError(f"--vocab_size={vocab_size} is for --tokenizer bpe (the trained "
                             f"tokenizer); the {tokenizer} tokenizer's vocabulary is not chosen")
    frac = spec.val_fraction if val_fraction is None else float(val_fraction)
    if not 0.0 <= frac < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    check_workers(num_proc, num_workers)
    if not text_column:
        raise DataError("text_column must be a column name")
    target = storage.resolve(out)                 # StorageError: "s3:/x", unknown scheme
    remote = storage.is_uri(target)
    if stage_dir is not None and not remote:
        raise DataError(f"stage_dir is for an object-store out (s3://...); out={out} is a "
                        f"local folder, prepared in place")
    if remote and storage.is_uri(stage_dir):
        raise DataError(f"stage_dir must be a local folder, got {stage_dir}")
    if remote:
        from chimera.data.publish import Publisher, check_remote, default_stage
        local = Path(stage_dir).expanduser().resolve() if stage_dir else default_stage(target)
    else:
        local = Path(target)
    local.mkdir(parents=True, exist_ok=True)

    source = resolve_source(spec, sources, text_column, download_dir=local)
    if source.split_method == "hub" and val_fraction is not None:
        log(f"note: {spec.name} uses the hub's own validation split; --val_fraction is ignored")
    settings = {"format": FORMAT, "version": VERSION, "dataset": spec.name,
                "tokenizer": tokenizer, "source": source.fingerprint, "shard_size": shard_size,
                "split_method": source.split_method,
                "val_fraction": None if source.split_method == "hub" else frac,
                "piece_chars": [PIECE_CHARS, HARD_PIECE_CHARS]}
    if vocab_size is not None:                    # bpe only (other settings keep their keys)
        settings["vocab_size"] = vocab_size
    run = dict(spec=spec, source=source, settings=settings, tokenizer=tokenizer, frac=frac,
               num_proc=num_proc, num_workers=num_workers, command=command,
               progress=progress, log=log)
    if not remote:
        return _prepare_dir(local, overwrite=overwrite, **run)

    m = check_remote(target, settings, overwrite, _refuse_other, log)
    if m is not None:
        return PrepareResult(target, storage.join(target, MANIFEST), m, skipped=True)
    pub = Publisher(target, local, log)
    try:
        r = _prepare_dir(local, overwrite=False, replace_other=True, on_shard=pub.submit, **run)
        if r.skipped:
            log(f"the staging folder {local} holds the finished shards: uploading them")
        log(f"uploading to {target}")
        pub.finish(r.manifest)
    finally:
        pub.close()
    _clean(local)                       # the shards are in the store now; source/ stays
    return PrepareResult(target, storage.join(target, MANIFEST), r.manifest,
                         resumed_shards=r.resumed_shards)


def _prepare_dir(out: Path, *, spec, source: Source, settings: dict, tokenizer: str,
                 frac: float, num_proc: int | None, num_workers: int | None,
                 command: str | None, progress: bool, log, overwrite: bool,
                 replace_other: bool = False,
                 on_shard: Callable[[Path], None] | None = None) -> PrepareResult:
    """The local pipeline into folder `out` (the module docstring's steps 1-5). on_shard(path)
    is called with every shard once it is final (the object-store upload)."""
    done = _check_existing(out, settings, overwrite, log, replace_other)
    if isinstance(done, PrepareResult):
        return done
    state = done  # progress.json of an interrupted run with these settings, or None

    trained = tokenizer in ("char", "bpe")      # built from the data below
    tok = None if trained else get_tokenizer(tokenizer)   # gpt2 fails early if offline
    # scan pass: character count (tail split, progress total) and the char vocabulary
    if state is not None:
        scan = state["scan"]
    elif tokenizer == "char" or source.kind == "files":
        scan = _scan(source, want_chars=tokenizer == "char", log=log)
    else:
        scan = {"chars": None, "vocab": None}
    split_at = None
    if source.split_method == "tail":
        split_at = int(scan["chars"] * (1.0 - frac))
    if state is not None and trained:
        tok = Tokenizer.from_dict(state["tokenizer"])       # the interrupted run's own
    elif tokenizer == "char":
        tok = CharTokenizer(scan["vocab"])
    elif tokenizer == "bpe":
        tok = _train_bpe(source, frac, split_at, settings["vocab_size"], log)
    if tok.vocab_size > MAX_VOCAB:
        raise DataError(f"the {tok.name} vocabulary has {tok.vocab_size} symbols: uint16 shards "
                        f"hold ids below 65536, so a vocabulary >= 65536 is refused")
    scan["split_at"] = split_at

    writers: dict[str, ShardWriter] = {}
    docs = {s: 0 for s in SPLITS}

    def save_progress(w: ShardWriter | None = None) -> None:
        write_json_atomic(out / PROGRESS, {
            "settings": settings, "tokenizer": tok.to_dict(), "scan": scan,
            "splits": {s: {"shards": w.shards, "next_item": w.next_item,
                           "next_offset": w.next_offset, "finished": w.finished}
                       for s, w in writers.items()}})
        if on_shard is not None and w is not None and w.shards:
            on_shard(out / w.shards[-1]["file"])      # recorded: final (repeats are ignored)

    for s in SPLITS:
        prev = state["splits"][s] if state else {}
        writers[s] = ShardWriter(out, s, settings["shard_size"], prev.get("shards"),
                                 prev.get("next_item", 0), prev.get("next_offset", 0),
                                 on_shard=save_progress)
        writers[s].finished = prev.get("finished", False)
    resumed = sum(len(w.shards) for w in writers.values())
    resume_at = {s: (w.next_item, w.next_offset) for s, w in writers.items()}
    if resumed:
        log(f"resuming: {resumed} finished shard(s) kept in {out}")
    save_progress()

    def plan(it) -> int | None:   # first token of the item to write, None = skip the item
        first_item, first_token = resume_at[it[1]]
        if writers[it[1]].finished or it[0] < first_item:
            return None
        return first_token if it[0] == first_item else 0

    ex = (RayEncoder(tok, num_workers, log) if num_workers is not None
          else ThreadEncoder(tok, num_proc or os.cpu_count() or 1))
    log(f"tokenizing {spec.name} with {tok.name} (vocab {tok.vocab_size}) on {ex.where} "
        f"into {out}")
    total_est = _estimate_tokens(tok, spec, scan)
    bar = _progress_bar(progress, total_est, sum(w.tokens for w in writers.values()),
                        f"{spec.name} {tok.name}")
    throttle = float(os.environ.get("CHIMERA_PREPARE_THROTTLE_S", "0") or 0)
    sequential = source.split_method in ("tail", "hub")   # all train items, then all val
    enc_chars = enc_tokens = 0
    try:
        prev_split = None
        with ex:
            for group, parts in encode_in_order(ex, _items(source, frac, split_at), plan):
                for _idx, split, text, ends in group:
                    docs[split] += ends
                for split, (toks, items, starts, offsets, chars) in parts.items():
                    if sequential and prev_split not in (None, split):
                        _finish_split(writers[prev_split])   # close train before val starts
                    prev_split = split
                    writers[split].write(toks, items, starts, offsets)
                    enc_chars += chars
                    enc_tokens += len(toks)
                    bar.update(len(toks))
                if total_est and scan.get("chars") and enc_chars and tok.name in ("gpt2", "bpe"):
                    bar.total = max(bar.n, int(scan["chars"] * enc_tokens / enc_chars))
                if throttle:
                    time.sleep(throttle)
        for w in writers.values():
            _finish_split(w)
        if ex.stats():
            log(ex.stats())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    if writers["train"].tokens == 0:
        _clean(out)
        raise DataError("the sources contain no text" if not sum(docs.values())
                        else "the train split is empty: lower val_fraction")
    split_info: dict[str, Any] = {"method": source.split_method}
    if source.split_method != "hub":
        split_info["val_fraction"] = frac
    if split_at is not None:
        split_info.update(total_chars=scan["chars"], split_at_char=split_at)
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": "uint16", "byte_order": "little",
        "dataset": spec.name, "tokenizer": tok.to_dict(), "source": source.info,
        "split": split_info, "shard_size": settings["shard_size"],
        "command": command or shlex.join(["python", *sys.argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "documents": docs, "settings": settings,
        "splits": {s: {"tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return PrepareResult(out, out / MANIFEST, manifest, skipped=False, resumed_shards=resumed)


# --- existing output --------------------------------------------------------------------------
def _refuse_other(where, m: dict, settings: dict) -> None:
    if m.get("settings") != settings:
        diff = _diff(m.get("settings") or {}, settings)
        raise DataError(f"{where} already holds a prepared dataset made with other settings "
                        f"({diff}); pass --overwrite to replace it or choose another --out")


def _check_existing(out: Path, settings: dict, overwrite: bool, log,
                    replace_other: bool = False) -> PrepareResult | dict | None:
    """A finished dataset with these settings -> PrepareResult (skip); an interrupted one ->
    its progress state (resume); anything else is removed (clean start) or refused (a finished
    dataset with other settings, unless overwrite or replace_other: a staging folder)."""
    if overwrite:
        _clean(out)
        return None
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
        except ShardError:
            m = None
        if m is not None and m.get("settings") != settings:
            if not replace_other:
                _refuse_other(out, m, settings)
            m = None
        if m is not None:
            try:
                verify_shards(out, m)
                (out / PROGRESS).unlink(missing_ok=True)
                log(f"{out} is already prepared with these settings"
                    + ("" if replace_other else "; nothing to do"))
                return PrepareResult(out, out / MANIFEST, m, skipped=True)
            except ShardError as e:
                log(f"{e}; preparing again")
    state = None
    if (out / PROGRESS).is_file() and not (out / MANIFEST).is_file():
        try:
            state = json.loads((out / PROGRESS).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if state is not None and state.get("settings") != settings:
            log(f"{out} holds an unfinished preparation with other settings; starting clean")
            state = None
        if state is not None and not _shards_intact(out, state):
            log(f"{out}: shards of the unfinished preparation do not match progress.json; "
                f"starting clean")
            state = None
    if state is None:
        _clean(out)
        return None
    keep = {s["file"] for sp in state["splits"].values() for s in sp["shards"]}
    for p in out.iterdir():   # half-written .tmp files, shards renamed but not yet recorded
        if is_shard_file(p.name) and p.name not in keep:
            p.unlink()
    return state


def _shards_intact(out: Path, state: dict) -> bool:
    try:
        return all((out / s["file"]).is_file()
                   and (out / s["file"]).stat().st_size == 2 * s["tokens"]
                   for sp in state["splits"].values() for s in sp["shards"])
    except (KeyError, TypeError):
        return False


def _clean(out: Path) -> None:
    """Remove what a preparation writes (manifest first: it must never describe missing files)."""
    for name in (MANIFEST, MANIFEST + ".tmp", PROGRESS, PROGRESS + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if is_shard_file(p.name):
            p.unlink()


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        parts.append(f"{k}: changed" if isinstance(a, dict) or isinstance(b, dict)
                     else f"{k}: {a!r} -> {b!r}")
    return "; ".join(parts) or "unknown"


def _finish_split(w: ShardWriter) -> None:
    if not w.finished:
        w.close()
        w.finished = True
        if w.on_shard is not None:
            w.on_shard(w)


# --- the item stream ----------------------------------------------------------------------------
def _items(source: Source, frac: float, split_at: int | None
           ) -> Iterator[tuple[int, str, str, bool]]:
    """(index, split, text, ends_document) in a deterministic order."""
    idx = 0
    for fixed, fragments in source.streams():
        pos = doc = 0
        for text, ends in pieces(fragments):
            if fixed is not None:                          # the hub's own split
                out = [(fixed, text, ends)]
            elif split_at is not None:                     # tail split at character split_at
                if pos >= split_at:
                    out = [("val", text, ends)]
                elif pos + len(text) <= split_at:
                    out = [("train", text, ends)]
                else:
                    k = split_at - pos
                    out = [("train", text[:k], False), ("val", text[k:], ends)]
                pos += len(text)
            else:                                          # interleaved documents
                out = [("val" if int((doc + 1) * frac) > int(doc * frac) else "train", text, ends)]
                doc += ends
            for split, t, e in out:
                yield idx, split, t, e
                idx += 1


def _train_bpe(source: Source, frac: float, split_at: int | None, vocab_size: int,
               log) -> BPETokenizer:
    """The bpe tokenizer trained on the train split's pieces (the item stream's order)."""
    log(f"training a bpe tokenizer (vocab {vocab_size}) on the train split")
    t0 = time.perf_counter()
    tok = BPETokenizer.train((text for _i, split, text, _e in _items(source, frac, split_at)
                              if split == "train"), vocab_size)
    short = (f"; the train split has pairs for {tok.vocab_size} tokens only"
             if tok.vocab_size < vocab_size else "")
    log(f"trained bpe (vocab {tok.vocab_size}) in {time.perf_counter() - t0:.1f} s{short}")
    return tok


def _scan(source: Source, want_chars: bool, log) -> dict[str, Any]:
    log("scanning the sources" + (" (characters and char vocabulary)" if want_chars else ""))
    total = 0
    chars: set[str] = set()
    for _split, fragments in source.streams():
        for text, _ends in fragments:
            total += len(text)
            if want_chars:
                chars.update(text)
    if total == 0:
        raise DataError("the sources contain no text")
    return {"chars": total, "vocab": "".join(sorted(chars)) if want_chars else None}


def _estimate_tokens(tok: Tokenizer, spec, scan: dict) -> int | None:
    if scan.get("chars"):
        return scan["chars"] if tok.name in ("char", "byte") else scan["chars"] // 4
    return spec.approx_gpt2_tokens if tok.name == "gpt2" else None


def _progress_bar(enabled: bool, total: int | None, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc,
                disable=not enabled, mininterval=0.5, smoothing=0.1, dynamic_ncols=True,
                file=sys.stderr)
