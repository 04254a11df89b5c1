"""Where things live, each decided once: the repository root, the default data folder of a
prepared dataset, and the storage path of runs.

    from chimera.paths import REPO, default_data_dir, resolve_data_dir, resolve_storage_path
    default_data_dir("shakespeare", "char")       # <repo>/data/shakespeare_char
    resolve_data_dir(None, "tinystories", None)   # <repo>/data/tinystories_gpt2
    resolve_storage_path(None)                    # $CHIMERA_STORAGE, else <repo>/runs

The data folder rule is `<repo>/data/<dataset>_<tokenizer>` for every tokenizer (gpt2 too),
so char, byte and gpt2 shards of one dataset never share a folder, and `jobs/train.py
--dataset X --tokenizer T` finds what `jobs/prepare.py --dataset X --tokenizer T` wrote (both
default to gpt2). Paths never depend on the current directory: Ray changes it.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"   # local copies of the datasets (../shared/data), if any
DEFAULT_TOKENIZER = "gpt2"
STORAGE_ENV = "CHIMERA_STORAGE"     # cluster.yaml exports it on every node: s3://BUCKET/chimera


def default_data_dir(dataset: str, tokenizer: str | None = None) -> Path:
    """<repo>/data/<dataset>_<tokenizer>: where prepare writes and train reads by default."""
    return REPO / "data" / f"{dataset}_{tokenizer or DEFAULT_TOKENIZER}"


def resolve_data_dir(data_dir: str | Path | None, dataset: str,
                     tokenizer: str | None) -> str | Path:
    """A URI (s3://bucket/data/x, its scheme checked) as the string it is; else an absolute
    local folder: `data_dir` (relative to the current directory) when given, else the default
    folder of (dataset, tokenizer). "s3:/x" is a StorageError, never a folder "s3:"."""
    from chimera import storage
    if data_dir and storage.is_uri(data_dir):
        return storage.resolve(str(data_dir))
    if data_dir:
        return Path(storage.resolve(data_dir))
    return default_data_dir(dataset, tokenizer)


def older_default_data_dir(dataset: str) -> Path | None:
    """<repo>/data/<dataset>, where versions before the rule above put gpt2 data, if it holds
    a prepared dataset (errors point at it; nothing reads it silently)."""
    old = REPO / "data" / dataset
    return old if (old / "manifest.json").is_file() else None


def in_job_copy() -> bool:
    """True inside the copy of the working dir that `ray job submit --working-dir` unpacks
    (deleted with the job, and without the git-ignored data/ and runs/)."""
    return "runtime_resources" in str(REPO)


def job_copy_hint(what: str = "--data_dir") -> str:
    """The advice an error about a missing default folder adds inside such a copy."""
    return (f"; this job runs in Ray's copy of the working dir, which has no data/ (it is "
            f"git-ignored): give an absolute {what}") if in_job_copy() else ""


def resolve_storage_path(path: str | None) -> str:
    """Absolute local path or URI (s3://, gs://, ...). Default $CHIMERA_STORAGE when set, else
    <repo>/runs; inside a Ray job's unpacked working dir (deleted with the job) ~/chimera_runs.
    StorageError for a scheme pyarrow cannot open or a mistyped URI ("s3:/bucket")."""
    if path is None:
        path = os.environ.get(STORAGE_ENV) or None
    if path is None:
        if in_job_copy():
            return str(Path.home() / "chimera_runs")
        return str(REPO / "runs")
    from chimera.storage import resolve
    return resolve(path)              # a URI as it is (scheme checked); "s3:/x" is refused
