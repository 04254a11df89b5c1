"""`jobs/train.py --data_dir s3://...` on Ray Train (the session's Ray cluster and object store):
every worker reads the shards from the store itself, nothing is copied to the nodes, and the
run is the run of the same command on the local folder (same batches, so the same losses)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chimera import storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
        "--up_dim", "64", "--block_size", "32", "--batch_size", "8", "--total_batch_size_str",
        "2*8*32", "--num_workers", "2", "--max_iters", "6", "--log_interval", "1",
        "--learning_rate", "3e-3", "--warmup_steps", "2", "--seed", "5", "--eval",
        "--eval_interval", "3", "--eval_iters", "2"]


@pytest.fixture
def train_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import train
    return train.main


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_from_s3_data_equals_training_from_the_local_folder(
        ray_cluster, train_char_data, s3_prefix, tmp_path, train_main, capsys):
    data = s3_prefix + "/shakespeare_char"
    storage.upload_dir(train_char_data, data)
    local_files = storage.walk_files(train_char_data)
    assert storage.walk_files(data) == local_files
    for name in local_files:
        assert storage.sha256(storage.join(data, name)) == storage.sha256(train_char_data / name)

    want = local_files["train_000000.bin"]

    def shard_sized() -> set[Path]:           # files of the train shard's size on this "node"
        return {p for root in (os.environ["HOME"], os.environ["TMPDIR"])
                for p in Path(root).rglob("*.bin") if p.is_file() and p.stat().st_size == want}
    before = shard_sized()                    # (other tests of the session prepared data too)
    runs = {}
    for name, d in (("s3", data), ("local", str(train_char_data))):
        rc = train_main(["--data_dir", d, "--storage_path", str(tmp_path), "--run_name", name,
                         *TINY])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "2 Ray Train worker(s)" in out           # not in-process: workers read the data
        runs[name] = _rows(tmp_path / name)
    s3, local = runs["s3"], runs["local"]
    assert [r["step"] for r in s3 if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "val_loss", "train_loss"):
        a = [(r["step"], r[key]) for r in s3 if key in r]
        b = [(r["step"], r[key]) for r in local if key in r]
        assert a and a == b, key                       # the same batches: the same numbers
    assert s3[-1]["param_hashes"] == local[-1]["param_hashes"]
    # nothing was copied to the "nodes": no new file of the train shard's size appeared
    copies = sorted(shard_sized() - before)
    assert not copies, copies
