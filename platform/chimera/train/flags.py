"""The flags of jobs/train.py, generated from the declarations: every model flag
(models.config.FLAGS) and every TrainConfig field, each with its type, default and help.

    p = argparse.ArgumentParser(); add_arguments(p)
"""
from __future__ import annotations

import argparse
import dataclasses

from chimera.train.config import TrainConfig
from models import config as mconfig


def add_arguments(p) -> None:
    """Every model flag (models.config.FLAGS) and TrainConfig field as `--key`, generated from
    their declarations; unspecified flags stay absent. Each action carries `doc_default` (its
    effective default) for --help and docs/parameters.md."""
    from chimera.paths import DEFAULT_TOKENIZER
    S = argparse.SUPPRESS
    m = p.add_argument_group("model (only the flags given reach the model config)")
    for f in mconfig.FLAGS:
        if f.type is bool:
            a = m.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=S, help=f.help)
        else:
            a = m.add_argument(f"--{f.name}", type=f.type, default=S, help=f.help)
        if f.name != "vocab_size":                 # its default comes from the data
            a.doc_default = f.default
    model_group = ("layer_configs", "layer_configs_jsonl")
    t = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        g = m if f.name in model_group else t
        base = str(f.type).split(" |")[0]
        if base == "bool":
            a = g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=S,
                               help=f.metadata["help"])
        else:
            a = g.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(base, str),
                               default=S, help=f.metadata["help"])
        if "doc_default" in f.metadata:              # a default decided at run time
            a.doc_default = f.metadata["doc_default"]
        elif f.default is not None:
            a.doc_default = f.default
        elif f.name == "tokenizer":                  # None: "not given", the folder rule's gpt2
            a.doc_default = DEFAULT_TOKENIZER
    p.add_argument("--config", default=S, help="YAML/JSON file with the same keys (CLI overrides it)")
