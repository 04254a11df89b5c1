"""The flags of jobs/train.py, generated from the declarations: every model flag
(models.config.FLAGS) and every TrainConfig field, each with its type, default and help.

    p = argparse.ArgumentParser(); add_arguments(p)
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from chimera.train.config import TrainConfig
from models import config as mconfig


def cli_type(f: "mconfig.Flag"):
    """The argparse `type` of a model flag: its Python type; `null` for a nullable flag's None;
    JSON text for a mapping (rope_scaling)."""
    def parse_json(text: str):
        if text.strip().lower() in ("null", "none"):
            return None
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--{f.name}: invalid JSON ({e})") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"--{f.name}: expected a JSON object or null")
        return v

    if f.type is dict:
        return parse_json
    if not f.nullable:
        return f.type

    def parse(text: str):
        if text.strip().lower() in ("null", "none"):
            return None
        try:
            return f.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{f.name}: {text!r} is not {f.type.__name__} or null") from None
    parse.__name__ = f"parse_{f.type.__name__}_or_null"
    return parse


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
            a = m.add_argument(f"--{f.name}", type=cli_type(f), default=S, help=f.help)
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
