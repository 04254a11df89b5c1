"""Dataset registry and text sources: where each dataset's text comes from, read as a stream.

    spec = get_dataset("tinystories")                      # unknown names list the choices
    src = resolve_source(spec, sources=["a.jsonl", "dir/"], text_column="text")
    src = resolve_source(spec, sources=None, download_dir=out)   # the default (network) source
    for split, fragments in src.streams(): ...                  # see `Source.streams`

Default sources (need network; tests replace the network calls):
  shakespeare   the Tiny Shakespeare text file from karpathy/char-rnn (downloaded once)
  wikitext      Salesforce/wikitext, wikitext-103-raw-v1, hub splits train / validation
  tinystories   roneneldan/TinyStories, hub splits train / validation
  fineweb-edu   HuggingFaceFW/fineweb-edu, sample-10BT, train only (streamed)
Local sources (`--source`, any dataset, files or folders of them): `.jsonl`/`.json` (JSON
lines, text in `text_column`), `.parquet` (column `text_column`), anything else is UTF-8 text.

Documents. A jsonl/parquet/hub row is one document. A text file is one document, except that
a literal `<|endoftext|>` separates documents (TinyStories' upstream .txt format; the marker
and the rest of its line are dropped) and, for wikitext, every top-level heading line
(` = Title = `) starts a new article. Text files are read with universal newlines (CRLF -> LF).
For wikitext, rows (hub, jsonl or parquet) are lines of running text and are joined the same
way. Every reader yields *fragments* `(text, ends_document)`: whole documents for rows, lines
for text files, so a multi-gigabyte text file is never held in memory; `pieces()` then cuts
long documents into tokenization work units.
"""
from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

EOT_MARKER = "<|endoftext|>"
PIECE_CHARS = 1 << 16        # target piece size (part of a preparation's settings)
HARD_PIECE_CHARS = 1 << 22   # no tokenization-neutral break this far: cut at a line break
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

Fragments = Iterator[tuple[str, bool]]


class DataError(ValueError):
    """Bad dataset name, source, column or data; the message says what to change."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    url: str | None = None              # default source: one text file to download
    hub_path: str | None = None         # default source: the Hugging Face hub via `datasets`
    hub_name: str | None = None
    hub_val_split: str | None = None    # the hub's own validation split (else val_fraction)
    rows_are_lines: bool = False        # hub rows are lines of running text (wikitext)
    doc_start: str | None = None        # regex: a text line that starts a new document
    val_fraction: float = 0.1           # default for local sources / hub sets without val
    approx_gpt2_tokens: int | None = None   # progress-bar estimate for hub sources


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("shakespeare", "Tiny Shakespeare (1.1 MB)",
                url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                    "tinyshakespeare/input.txt"),
    DatasetSpec("wikitext", "WikiText-103 raw (~118M gpt2 tokens)",
                hub_path="Salesforce/wikitext", hub_name="wikitext-103-raw-v1",
                hub_val_split="validation", rows_are_lines=True, doc_start=r" = [^=].* = \s*$",
                approx_gpt2_tokens=118_000_000),
    DatasetSpec("tinystories", "TinyStories (~470M gpt2 tokens)",
                hub_path="roneneldan/TinyStories", hub_val_split="validation",
                approx_gpt2_tokens=470_000_000),
    DatasetSpec("fineweb-edu", "FineWeb-Edu sample-10BT (~10B gpt2 tokens, streamed)",
                hub_path="HuggingFaceFW/fineweb-edu", hub_name="sample-10BT",
                val_fraction=0.005, approx_gpt2_tokens=10_000_000_000),
)}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


# --- sources ---------------------------------------------------------------------------------
@dataclass
class Source:
    """A resolved source. `streams()` yields `(split, fragments)`: split "train"/"val" when the
    source defines the split itself (hub sets with a validation split), None when prepare must
    split (local files: the tail; hub sets without validation: interleaved documents)."""

    kind: str                                   # "files" | "hub"
    info: dict[str, Any]                        # for the manifest
    fingerprint: dict[str, Any]                 # changes when the input changes
    _streams: Callable[[], list[tuple[str | None, Fragments]]] = field(repr=False)
    split_method: str = "tail"                  # "tail" | "hub" | "interleave"

    def streams(self) -> list[tuple[str | None, Fragments]]:
        return self._streams()


def resolve_source(spec: DatasetSpec, sources: Sequence[str | Path] | None = None,
                   text_column: str = "text", download_dir: Path | None = None) -> Source:
    """Local files when `sources` is given, else the dataset's default (network) source."""
    doc_start = re.compile(spec.doc_start) if spec.doc_start else None
    if sources:
        return _file_source(spec, expand_paths(sources), text_column, doc_start)
    if spec.url:
        if download_dir is None:
            raise DataError(f"{spec.name}: no download folder for {spec.url}")
        return _file_source(spec, [download(spec.url, Path(download_dir) / "source" /
                                            spec.url.rsplit("/", 1)[-1])],
                            text_column, doc_start, url=spec.url)
    return _hub_source(spec, text_column, doc_start)


def expand_paths(sources: Sequence[str | Path]) -> list[Path]:
    """Files named by `sources` (folders: their txt/jsonl/parquet files, sorted), checked."""
    out: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower()
                           in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not files:
                raise DataError(f"source folder {p} has no .txt/.jsonl/.parquet files")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"source {p} does not exist")
    for p in out:
        if p.stat().st_size == 0:
            raise DataError(f"source {p} is empty")
    return [p.resolve() for p in out]


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return ("jsonl" if suffix in JSONL_SUFFIXES else
            "parquet" if suffix in PARQUET_SUFFIXES else "txt")


def _file_source(spec: DatasetSpec, paths: list[Path], text_column: str,
                 doc_start: re.Pattern | None, url: str | None = None) -> Source:
    def fragments() -> Fragments:
        for p in paths:
            fmt = file_format(p)
            if fmt == "txt":
                yield from txt_fragments(p, doc_start)
                continue
            rows = (jsonl_rows if fmt == "jsonl" else parquet_rows)(p, text_column)
            if spec.rows_are_lines:
                yield from line_fragments(_checked(rows, f"{p}"), doc_start)
            else:
                yield from _row_fragments(rows, f"{p}")

    files = [{"path": str(p), "format": file_format(p), "bytes": p.stat().st_size} for p in paths]
    info: dict[str, Any] = {"kind": "files", "files": files}
    if any(f["format"] != "txt" for f in files):
        info["text_column"] = text_column
    if url:
        info["url"] = url
    fingerprint = {**info, "mtime_ns": [p.stat().st_mtime_ns for p in paths]}
    return Source("files", info, fingerprint, lambda: [(None, fragments())], "tail")


def _hub_source(spec: DatasetSpec, text_column: str, doc_start: re.Pattern | None) -> Source:
    def stream(split: str) -> Fragments:
        rows = hub_rows(spec, split, text_column)
        if spec.rows_are_lines:
            return line_fragments(_checked(rows, f"{spec.hub_path} ({split})"), doc_start)
        return _row_fragments(rows, f"{spec.hub_path} ({split})")

    info = {"kind": "hub", "path": spec.hub_path, "name": spec.hub_name,
            "text_column": text_column, "val_split": spec.hub_val_split}
    if spec.hub_val_split:
        return Source("hub", info, dict(info),
                      lambda: [("train", stream("train")), ("val", stream(spec.hub_val_split))],
                      "hub")
    return Source("hub", info, dict(info), lambda: [(None, stream("train"))], "interleave")


# --- pieces: the unit of tokenization work ----------------------------------------------------
def pieces(fragments: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Fragments -> (text, ends_document) pieces of about PIECE_CHARS; empty documents dropped.

    Long documents are cut only after a '\\n' that sits between two non-space characters:
    GPT-2's pre-tokenizer never joins text across such a point, so the pieces of a document
    encode to exactly its tokens (char and byte are position-independent anyway)."""
    buf: list[str] = []
    n = 0
    last = ""
    for text, ends in fragments:
        if text:
            if not buf and ends and len(text) <= PIECE_CHARS:   # a small whole document
                yield text, True
                continue
            for line in (_lines(text) if len(text) > PIECE_CHARS else (text,)):
                if n >= PIECE_CHARS and (n >= HARD_PIECE_CHARS or _neutral(last, line)):
                    yield "".join(buf), False
                    buf, n = [], 0
                buf.append(line)
                n += len(line)
                last = line
        if ends and buf:
            yield "".join(buf), True
            buf, n = [], 0
    if buf:
        yield "".join(buf), True


def _lines(text: str) -> Iterator[str]:
    start = 0
    while (i := text.find("\n", start)) >= 0:
        yield text[start:i + 1]
        start = i + 1
    if start < len(text):
        yield text[start:]


def _neutral(prev: str, nxt: str) -> bool:
    """Cutting between prev and nxt cannot change GPT-2 tokens: prev ends in non-space + '\\n'
    and nxt starts with a non-space (no pre-tokenizer pattern spans '\\n' followed by \\S)."""
    return (len(prev) >= 2 and prev[-1] == "\n" and not prev[-2].isspace()
            and not nxt[:1].isspace() and nxt != "")


# --- readers ---------------------------------------------------------------------------------
def line_fragments(lines: Iterable[str], doc_start: re.Pattern | None = None) -> Fragments:
    """Lines of running text -> fragments; `<|endoftext|>` and `doc_start` lines end documents."""
    for line in lines:
        if EOT_MARKER in line:
            for i, part in enumerate(line.split(EOT_MARKER)):
                if i > 0:
                    yield "", True
                    if part.strip(" \t\r\n") == "":   # the rest of the marker's line
                        continue
                if part:
                    yield part, False
            continue
        if doc_start is not None and doc_start.match(line):
            yield "", True
        yield line, False
    yield "", True


def txt_fragments(path: Path, doc_start: re.Pattern | None = None) -> Fragments:
    try:
        with open(path, encoding="utf-8") as f:
            yield from line_fragments(f, doc_start)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); compressed or binary files "
                        f"are not supported, give .txt, .jsonl or .parquet") from None


def _checked(rows: Iterable[str | None], where: str) -> Iterator[str]:
    for text in rows:
        if text is None:        # null cells: nothing to tokenize
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: the text column holds {type(text).__name__}, not text")
        yield text


def _row_fragments(rows: Iterable[str | None], where: str) -> Fragments:
    for text in _checked(rows, where):
        yield text, True


def jsonl_rows(path: Path, column: str) -> Iterator[str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line, "
                                    f"got {type(row).__name__}")
                if column not in row:
                    raise DataError(f"{path}:{lineno}: no text column {column!r} (fields: "
                                    f"{', '.join(map(str, row)) or 'none'}); set --text_column")
                yield row[column]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 JSON lines ({e.reason})") from None


def parquet_rows(path: Path, column: str, batch_rows: int = 1024) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    if column not in names:
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(names)}); "
                        f"set --text_column")
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from None


def hub_rows(spec: DatasetSpec, split: str, column: str) -> Iterator[str | None]:
    hint = ("offline? download the data elsewhere and pass --source FILES "
            "(txt, jsonl or parquet; see docs/data.md)")
    try:
        import datasets  # Hugging Face `datasets`, imported only for hub sources (slow import)

        ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:
        raise DataError(f"cannot load {spec.hub_path} ({split}) from the Hugging Face hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                        f"{hint}") from None
    if first is None:
        return
    if column not in first:
        raise DataError(f"{spec.hub_path} ({split}) has no column {column!r} (columns: "
                        f"{', '.join(first)}); set --text_column")
    yield first[column]
    try:
        for row in it:
            yield row[column]
    except Exception as e:
        raise DataError(f"reading {spec.hub_path} ({split}) failed: {type(e).__name__}: {e}; "
                        f"{hint}") from None


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` once (temporary name, then rename)."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({type(e).__name__}: {e}); pass --source with a "
                        f"local copy (e.g. ../shared/data/tinyshakespeare/input.txt)") from None
    tmp.replace(dest)
    return dest
