"""custom_dataset loader of the local lm-eval tasks in this folder: a jsonl file named by the
task's `dataset_kwargs.data_file`, relative to this file (so a task is found from any current
directory), as a `test` split. No download and no Hugging Face cache: datasets.Dataset from
the rows. Copy this file beside your own task YAMLs (--include_path) to do the same."""
import json
from pathlib import Path


def load(data_file: str, **_metadata):
    import datasets

    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}
