"""Each flag is declared once (issue 12): models.config.FLAGS for model flags, TrainConfig's
fields for training keys, SweepSpec's fields for sweep spec keys. jobs/train.py's parser and
--help, the config loader's types and defaults, a sweep spec's accepted keys and
docs/parameters.md are generated from them: a new entry appears in all, and no default can
differ between them."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from chimera import paramdocs
from chimera.sweep.spec import SweepSpec, SweepSpecError, spec_keys
from chimera.train.config import TrainConfig, TrainConfigError, config_keys
from chimera.train.flags import add_arguments
from models import config as mconfig
from models.config import ConfigError, Flag, ModelConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def _actions(p) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings}


@pytest.fixture
def extra_flag(monkeypatch):
    """models.config with one more flag in FLAGS (and its derived views), as an edit would."""
    f = Flag("n_probe", int, 7, "a flag added for this test", "ffn")
    for k, v in mconfig.derive(mconfig.FLAGS + (f,)).items():
        monkeypatch.setattr(mconfig, k, v)
    return f


def test_a_new_model_flag_reaches_parser_loader_sweeps_and_docs(extra_flag, train_char_data):
    a = _actions(_parser())["n_probe"]
    assert a.type is int and a.doc_default == 7 and a.help == extra_flag.help
    assert TrainConfig.from_dict({"n_probe": 3}).model == {"n_probe": 3}        # a --config key
    with pytest.raises(ConfigError, match=r"n_probe='x' must be of type int"):  # the loader's type
        ModelConfig.from_dict({"n_probe": "x"})
    assert "n_probe" in config_keys()
    SweepSpec(name="s", base={"data_dir": str(train_char_data), "n_probe": 3})  # a sweep base key
    row = [ln for ln in paramdocs.render([("train", _TrainJob)]).splitlines() if "`--n_probe`" in ln]
    assert row == ["| `--n_probe` | int | 7 | a flag added for this test |"]


class _TrainJob:
    """jobs/train.py's parser, as paramdocs renders a job."""
    __doc__ = "Train a model."

    @staticmethod
    def build_parser():
        return _parser()


def test_without_the_entry_it_is_unknown_everywhere(train_char_data):
    assert "n_probe" not in _actions(_parser())
    with pytest.raises(TrainConfigError, match="unknown key 'n_probe'"):
        TrainConfig.from_dict({"n_probe": 3})
    with pytest.raises(ConfigError, match="unknown key 'n_probe'"):
        ModelConfig.from_dict({"n_probe": 3})
    with pytest.raises(SweepSpecError, match="base: unknown key 'n_probe'"):
        SweepSpec(name="s", base={"data_dir": str(train_char_data), "n_probe": 3})


def test_every_declared_default_type_and_help_is_what_the_parser_and_docs_show():
    acts = _actions(_parser())
    doc = paramdocs.DOC_PATH.read_text()
    for f in mconfig.FLAGS:
        a = acts[f.name]
        assert a.help == f.help and (f.name == "vocab_size" or a.doc_default == f.default), f.name
        assert mconfig._TYPES[f.name] is f.type
        if f.type is bool:
            assert isinstance(a, argparse.BooleanOptionalAction), f.name
        elif f.type is dict:                         # JSON text on the command line
            assert a.type('{"type": "yarn"}') == {"type": "yarn"} and a.type("null") is None, f.name
        elif f.nullable:                             # `null` is None, anything else the type
            assert a.type("null") is None and a.type("3") == f.type("3"), f.name
        else:
            assert a.type is f.type, f.name
    for fld in dataclasses.fields(TrainConfig):
        if fld.name == "model":
            continue
        a = acts[fld.name]
        assert a.help == fld.metadata["help"], fld.name
        if fld.default is not None:
            assert a.doc_default == fld.default, fld.name
        assert f"`--{fld.name}`" in doc
    for k in spec_keys():
        fld = next(x for x in dataclasses.fields(SweepSpec) if x.name == k)
        assert f"| `{k}` |" in doc and fld.metadata["help"].split("`")[0][:20] in doc, k


def test_serve_flags_are_the_app_arguments(monkeypatch):
    """jobs/serve.py's application flags come from serve.app.AppArgs, with its defaults."""
    import importlib.util
    from pathlib import Path
    import sys                       # its _paths; appended: jobs/serve.py must not shadow `serve`
    monkeypatch.setattr(sys, "path", sys.path + [str(Path(__file__).resolve().parents[1] / "jobs")])

    from serve.app import AppArgs
    path = Path(__file__).resolve().parents[1] / "jobs" / "serve.py"
    spec = importlib.util.spec_from_file_location("_serve_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    acts = _actions(job.build_parser())
    for name, f in AppArgs.model_fields.items():
        assert acts[name].help == f.description, name
        assert getattr(acts[name], "doc_default", None) == (f.default if f.default is not None else None), name
    assert set(acts) - set(AppArgs.model_fields) == {"help", "host", "port", "app_name"}
    args = job.build_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b", "--max_batch", "4"])
    assert AppArgs(**{k: v for k, v in vars(args).items() if k in AppArgs.model_fields}) == \
        AppArgs(checkpoint=["a", "b"], max_batch=4)
