"""chimera.checkpoint.load_model: the one door from a checkpoint (or run) directory to a model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from chimera.checkpoint import TOKENIZER, load_model, read_config


def test_load_model_rebuilds_the_trained_model_from_its_files(tiny_checkpoint):
    model, tok, meta = load_model(tiny_checkpoint.parent)            # the run dir: its best
    assert meta["path"] == str(tiny_checkpoint) and meta["step"] == 30
    assert not model.training and model.cfg.to_dict() == read_config(tiny_checkpoint)
    assert tok.name == "char" and tok.vocab_size == 65
    from safetensors.torch import load_file
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_load_model_refuses_a_tokenizer_larger_than_the_model(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    t = json.loads((bad / TOKENIZER).read_text())
    t["vocab"] = t["vocab"] + "".join(chr(0x4e00 + i) for i in range(200))
    t["vocab_size"] = len(t["vocab"])
    (bad / TOKENIZER).write_text(json.dumps(t))
    with pytest.raises(ValueError, match=r"tokenizer vocab 265 > model vocab 128"):
        load_model(bad)
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        load_model(tmp_path / "nothing")
