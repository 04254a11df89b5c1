"""One rule for the default data folder (chimera.paths): jobs/prepare.py writes where
jobs/train.py and sweep specs read, char/byte/gpt2 data never collide, and a missing or
mismatched folder is a clear error."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from chimera import paths
from chimera.sweep.spec import SweepSpec, SweepSpecError
from chimera.sweep.trials import expand
from chimera.train.config import TrainConfig, TrainConfigError, load_train_config
from chimera.train.plan import plan_run

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=32,
            batch_size=8, total_batch_size_str="8*32", max_iters=2)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """chimera.paths.REPO -> an empty folder: the default data/ lives there for this test."""
    monkeypatch.setattr(paths, "REPO", tmp_path)
    return tmp_path


@pytest.fixture
def prepare_job(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    job = importlib.import_module("prepare")
    return lambda argv: (job.main(argv), capsys.readouterr())


def test_the_rule():
    assert paths.default_data_dir("shakespeare", "char") == paths.REPO / "data" / "shakespeare_char"
    assert paths.default_data_dir("tinystories") == paths.REPO / "data" / "tinystories_gpt2"
    names = {paths.default_data_dir("wikitext", t).name for t in ("gpt2", "char", "byte")}
    assert len(names) == 3                                     # no two tokenizers share a folder
    assert paths.resolve_data_dir("rel/x", "shakespeare", "char") == Path("rel/x").resolve()


def test_train_and_sweeps_find_what_prepare_wrote(repo, prepare_job, shakespeare_path, tmp_path):
    rc, out = prepare_job(["--dataset", "shakespeare", "--source", str(shakespeare_path),
                           "--tokenizer", "char", "--no_progress"])
    char_dir = repo / "data" / "shakespeare_char"
    assert rc == 0 and str(char_dir / "manifest.json") in out.out, out
    storage = str(tmp_path / "runs")
    plan = plan_run(load_train_config({**TINY, "tokenizer": "char", "storage_path": storage}))
    assert plan.data_dir == str(char_dir) and plan.tokenizer["name"] == "char"
    # the default tokenizer is gpt2, as prepare's: that folder was not made, and the error says how
    with pytest.raises(TrainConfigError, match=r"shakespeare_gpt2 does not exist: prepare it with "
                                               r"`python jobs/prepare.py --dataset shakespeare`$"):
        plan_run(load_train_config({**TINY, "storage_path": storage}))
    with pytest.raises(TrainConfigError, match=r"tokenizer='byte' but data_dir .*shakespeare_char "
                                               r"was prepared with 'char'"):
        plan_run(load_train_config({**TINY, "tokenizer": "byte", "data_dir": str(char_dir),
                                    "storage_path": storage}))
    # a sweep spec names the data the same way; its trials carry the absolute folder
    base = {**TINY, "dataset": "shakespeare", "tokenizer": "char"}
    plan = expand(SweepSpec(name="s", base=base))
    assert {t.train["data_dir"] for t in plan.trials} == {str(char_dir)}
    with pytest.raises(SweepSpecError, match=r"shakespeare_byte: .*prepare it with jobs/prepare.py"):
        expand(SweepSpec(name="s", base={**base, "tokenizer": "byte"}))
    with pytest.raises(SweepSpecError, match="base.tokenizer='gpt2' but .* was prepared with 'char'"):
        expand(SweepSpec(name="s", base={**base, "tokenizer": "gpt2", "data_dir": str(char_dir)}))


def test_gpt2_data_of_an_older_version_is_pointed_at(repo, tmp_path):
    old = repo / "data" / "shakespeare"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"tokenizer": {"name": "gpt2"}}))
    with pytest.raises(TrainConfigError, match=r"holds data prepared by an older version: pass "
                                               r"--data_dir .*/data/shakespeare or rename it to shakespeare_gpt2"):
        plan_run(load_train_config({**TINY, "storage_path": str(tmp_path)}))


def test_unknown_tokenizer_is_refused():
    with pytest.raises(TrainConfigError, match="tokenizer='wordpiece': choose one of gpt2, char, "
                                               "byte, bpe"):
        TrainConfig(tokenizer="wordpiece")


def test_storage_path_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.STORAGE_ENV, raising=False)
    assert paths.resolve_storage_path(None) == str(paths.REPO / "runs")
    assert paths.resolve_storage_path(str(tmp_path / "x")) == str(tmp_path / "x")
    assert paths.resolve_storage_path("s3://b/p") == "s3://b/p"
    monkeypatch.setenv(paths.STORAGE_ENV, "s3://b/env")
    assert paths.resolve_storage_path(None) == "s3://b/env"
    assert paths.job_copy_hint() == ""                    # this checkout is no Ray job copy
