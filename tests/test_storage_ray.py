"""Runs whose storage is a real S3-compatible object store (SeaweedFS, conftest.object_store),
on the session's Ray cluster: a training run killed and resumed by name from s3://, a new run
resumed from an s3:// checkpoint, sampling and serving a checkpoint from s3://. Every object
read back is compared by sha256 with what was written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chimera import storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--attn", "gqa", "--n_kv_heads", "2",
        "--up_dim", "64", "--block_size", "32", "--batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "5", "--eval_iters", "2", "--eval_interval", "4", "--log_interval", "1",
        "--total_batch_size_str", "8*32", "--max_iters", "8", "--save_model", "--ckpt_interval", "4",
        "--eval"]


@pytest.fixture
def train_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import train
    return train.main


def _rows(run_dir: str) -> list[dict]:
    return [json.loads(l) for l in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]


def _losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def s3_run(ray_cluster, object_store, train_char_data, tmp_path_factory):
    """A run on s3:// killed at step 6 (no restarts: it fails), then the same command again:
    it resumes by name from its step-4 checkpoint in the store. And the same run uninterrupted
    on local storage, the reference curve."""
    sys.path.insert(0, str(ROOT / "jobs"))
    import train
    prefix = "s3://chimera-test/runs-resume"
    base = ["--data_dir", str(train_char_data), *TINY]
    local = tmp_path_factory.mktemp("ref")
    assert train.main([*base, "--storage_path", str(local), "--run_name", "ref"]) == 0
    s3 = [*base, "--storage_path", prefix, "--run_name", "r1"]
    first = train.main([*s3, "--crash_at_step", "6", "--max_failures", "0"])
    listing_after_kill = storage.walk_files(f"{prefix}/r1")
    second = train.main(s3)
    return {"prefix": prefix, "run": f"{prefix}/r1", "first": first, "second": second,
            "after_kill": listing_after_kill, "ref": _rows(str(local / "ref")),
            "ref_dir": local / "ref"}


def test_killed_s3_run_resumes_by_name_with_the_same_loss_curve(s3_run):
    assert s3_run["first"] == 1 and s3_run["second"] == 0
    after = s3_run["after_kill"]
    assert "checkpoint_000004/model.safetensors" in after          # what the kill left in s3
    assert not any(k.startswith("checkpoint_000008") for k in after)
    rows = _rows(s3_run["run"])
    resumed = [r for r in rows if r.get("resumed_from_step") == 4]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8] and resumed[-1]["done"]
    ref = _losses(s3_run["ref"])
    for r in rows:                                  # steps 1-4 (first run), 5-8 (resumed)
        if "loss" in r:
            assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5), r["step"]
    names = storage.listdir(s3_run["run"])
    assert {"checkpoint_000008", "llm_model_best", "result.json", "metrics.jsonl"} <= set(names)


def test_checkpoint_bytes_in_s3_are_what_was_written(s3_run, tmp_path):
    uri = f"{s3_run['run']}/checkpoint_000008"
    local = storage.download_dir(uri, tmp_path / "c")
    for rel in storage.walk_files(uri):
        assert storage.sha256(local / rel) == storage.sha256(f"{uri}/{rel}")
    from safetensors.torch import load_file
    a = load_file(str(local / "model.safetensors"))
    b = load_file(str(s3_run["ref_dir"] / "checkpoint_000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:                                    # the resumed run ends where the reference does
        assert (a[k] - b[k]).abs().max().item() < 1e-4, k


def test_new_run_resumes_from_an_s3_checkpoint(s3_run, train_char_data, train_main):
    ck = f"{s3_run['run']}/checkpoint_000004"
    args = ["--data_dir", str(train_char_data), *TINY, "--storage_path", s3_run["prefix"],
            "--run_name", "from-s3", "--resume_from", ck]
    assert train_main(args) == 0
    rows = _rows(f"{s3_run['prefix']}/from-s3")
    assert [r["step"] for r in rows if "loss" in r][0] == 5
    ref = _losses(s3_run["ref"])
    assert all(r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5) for r in rows if "loss" in r)


@pytest.mark.parametrize("bad,match", [
    ("s3://chimera-test/runs-resume/nothing-here", "not a checkpoint directory"),
    ("s3:/chimera-test/x", "looks like a URI without '//'"),
    ("nosuch://b/x", "cannot open nosuch:// storage"),
])
def test_bad_resume_from_uris_are_refused(s3_run, train_char_data, train_main, capsys, bad, match):
    args = ["--data_dir", str(train_char_data), *TINY, "--storage_path", s3_run["prefix"],
            "--run_name", "bad", "--resume_from", bad]
    assert train_main(args) == 2
    assert match in capsys.readouterr().err
    assert "bad" not in storage.listdir(s3_run["prefix"])


@pytest.mark.parametrize("bad,match", [
    ("s3:/chimera-test/x", "looks like a URI without '//'"),
    ("nosuch://b/x", "cannot open nosuch:// storage"),
    ("s3://no-such-bucket-chimera/runs", "storage_path: s3://no-such-bucket-chimera/runs/"),
])
def test_bad_storage_paths_are_refused(object_store, train_char_data, train_main, capsys, tmp_path,
                                       monkeypatch, bad, match):
    monkeypatch.chdir(tmp_path)
    args = ["--data_dir", str(train_char_data), *TINY, "--storage_path", bad, "--run_name", "x"]
    assert train_main(args) == 2
    assert match in capsys.readouterr().err and list(tmp_path.iterdir()) == []
