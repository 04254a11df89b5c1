"""One default per model flag: the config dataclasses, the flat-flag loader, jobs/train.py's
--help and docs/parameters.md all show the value declared in models.config's flag tables."""
from __future__ import annotations

import dataclasses
import re

import pytest

from models import ModelConfig
from models.config import (ATTN_DEFAULTS, FFN_DEFAULTS, GLOBAL_DEFAULTS, AttnConfig, BlockConfig,
                           FFNConfig)

TABLE = {**GLOBAL_DEFAULTS, **ATTN_DEFAULTS, **FFN_DEFAULTS}


@pytest.mark.parametrize("cls", [AttnConfig, FFNConfig, BlockConfig, ModelConfig])
def test_dataclass_defaults_are_the_flag_defaults(cls):
    checked = 0
    for f in dataclasses.fields(cls):
        if f.name in TABLE and f.default is not dataclasses.MISSING and f.default is not None:
            assert f.default == TABLE[f.name], f"{cls.__name__}.{f.name}={f.default!r} but the flag default is {TABLE[f.name]!r}"
            checked += 1
    assert checked >= 1


def test_flat_flags_with_nothing_given_resolve_to_the_table():
    cfg = ModelConfig.from_dict({})
    for k in GLOBAL_DEFAULTS:
        assert getattr(cfg, k) == GLOBAL_DEFAULTS[k], k
    layer = cfg.layers[0].to_dict()
    assert layer["attn"] == ATTN_DEFAULTS["attn"]
    for k, v in layer.items():       # every key the layer's mechanism uses has the table value
        if k in ("rope_head_dim",) and cfg.pos_emb != "rope":
            continue
        if k in ("qk_nope_head_dim", "v_head_dim") and TABLE[k] is None:   # null: n_embd/n_head
            assert v == cfg.n_embd // cfg.layers[0].attn.n_head, k
            continue
        assert v == TABLE[k], k


def test_help_and_docs_show_the_table_defaults():
    from chimera import paramdocs
    from chimera.train.flags import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    shown = {a.dest: a.doc_default for a in p._actions if hasattr(a, "doc_default")}
    for k, v in TABLE.items():
        if k != "vocab_size":
            assert shown[k] == v, k
    doc = paramdocs.DOC_PATH.read_text()
    train = doc[doc.index("## jobs/train.py"):]
    train = train[:train.find("\n## jobs/", 1)]
    for k, v in TABLE.items():
        if k == "vocab_size":
            continue
        row = re.search(rf"^\| `--{k}`(?: / `--no-{k}`)? \| [^|]+ \| ([^|]+) \|", train, re.M)
        assert row, f"--{k} missing from docs/parameters.md"
        want = ("on" if v else "off") if isinstance(v, bool) else str(v)
        assert row.group(1).strip().strip("`") == want, (k, row.group(1))
