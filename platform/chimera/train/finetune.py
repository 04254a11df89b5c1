"""Fine-tuning: a run that starts from existing weights (--init_from), fully or with LoRA.

    src = init_source(tc)                 # plan time: the source's config and tokenizer, checked
    mc = finetune_model(tc, src, data_tokenizer)     # the run's ModelConfig (TrainConfigError)
    info = load_init(raw, init_from)      # on each worker, before DDP: weights in, base sha256

A source is a Chimera checkpoint or run dir (chimera.checkpoint.resolve_checkpoint: local or
s3://; a LoRA checkpoint comes merged) or `hf:PATH` (chimera.hf.convert.import_hf). The run's
model is the source's config with at most block_size (<= the source's; learned position rows
sliced) and dropout changed; the data's tokenizer must fit the model and be the source's.
Only a fresh run loads the source: a run restarted by Ray (or re-run by name) continues from
its own latest checkpoint (chimera.train.trainer.Trainer.restore).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from chimera import storage
from chimera.train.config import TrainConfig, TrainConfigError

HF = "hf:"
FREE = ("block_size", "dropout")          # the model flags a fine-tuning run may change


@dataclass(frozen=True)
class InitSource:
    """A resolved init source: what workers load (`init_from`), its config and tokenizer."""
    init_from: str                 # "hf:<abs path or hub id>", a local checkpoint dir, or its URI
    model_config: dict
    tokenizer: dict | None


def init_source(tc: TrainConfig) -> InitSource:
    """Resolve tc.init_from and read its config and tokenizer (an hf: folder is imported
    whole: its config needs its weights). TrainConfigError naming init_from when unusable."""
    spec = tc.init_from
    if spec.startswith(HF):
        path = spec[len(HF):]
        from pathlib import Path
        local = Path(path).expanduser()
        if local.exists():
            path = str(local.resolve())
        try:
            cfg, _, tok = import_hf(path, tc.model.get("block_size"))
        except ImportError as e:
            raise TrainConfigError(f"init_from={spec!r}: {e}") from None
        except (ValueError, OSError) as e:
            raise TrainConfigError(f"init_from={spec!r}: {e}") from None
        return InitSource(HF + path, cfg, tok)
    from chimera.checkpoint import TOKENIZER, read_config, remote_checkpoint, resolve_checkpoint
    import json
    try:
        uri = remote_checkpoint(spec) if storage.is_uri(spec) else None
        local = resolve_checkpoint(uri or spec)
        cfg = read_config(local)
        tok = json.loads((local / TOKENIZER).read_text())
    except (ValueError, OSError) as e:              # StorageError is a ValueError
        raise TrainConfigError(f"init_from: {e}") from None
    return InitSource(uri or str(local), cfg, tok)


def import_hf(path: str, block_size: int | None):
    """chimera.hf.convert.import_hf (the Hugging Face interop package)."""
    try:
        from chimera.hf.convert import import_hf as imp
    except ImportError as e:
        raise ImportError(f"hf: sources need chimera.hf.convert ({e})") from None
    return imp(path, block_size=block_size)


def finetune_model(tc: TrainConfig, src: InitSource, data_tokenizer: Mapping[str, Any]):
    """The run's ModelConfig: the source's, with the model flags given among FREE; any other
    flag that changes it, a layer stack, a larger block_size, or a data tokenizer that is not
    the source's (or does not fit its vocabulary) is a TrainConfigError naming it. With LoRA
    the targets are checked against the model (on the meta device: no memory)."""
    from models import ConfigError, ModelConfig
    where = f"init_from {src.init_from}"
    if tc.layer_configs is not None or tc.layer_configs_jsonl is not None:
        raise TrainConfigError(f"{where}: the layer stack is the init checkpoint's; do not give "
                               f"layer_configs / layer_configs_jsonl")
    try:
        base = ModelConfig.from_dict(src.model_config)
    except ConfigError as e:
        raise TrainConfigError(f"{where}: its model config: {e}") from None
    flags = dict(tc.model)
    bad = []
    for k, v in flags.items():
        if k in FREE:
            continue
        try:
            same = _with_flags(base, {k: v}).to_dict() == base.to_dict()
        except ConfigError:
            same = False
        if not same:
            bad.append(f"{k}={v!r} (it has {_value(base, k)})")
    if bad:
        raise TrainConfigError(f"{where}: model flags differ from its config: {'; '.join(bad)}. "
                               f"A fine-tuning run keeps the checkpoint's model; only "
                               f"{' and '.join(FREE)} may be given")
    if flags.get("block_size", base.block_size) > base.block_size:
        raise TrainConfigError(f"{where}: block_size={flags['block_size']} is larger than the "
                               f"checkpoint's {base.block_size} (its positions end there)")
    try:
        mc = _with_flags(base, {k: flags[k] for k in FREE if k in flags})
    except ConfigError as e:
        raise TrainConfigError(f"model config: {e}") from None
    check_tokenizer(where, data_tokenizer, src.tokenizer, mc.vocab_size)
    if tc.lora_rank:
        import torch
        from models import LLM, lora
        with torch.device("meta"):
            try:
                lora.apply_lora(LLM(mc), tc.lora_rank, tc.lora_alpha, tc.lora_targets)
            except lora.LoRAError as e:
                raise TrainConfigError(f"{e} ({where})") from None
    return mc


def _with_flags(base, flags: Mapping[str, Any]):
    """`base` with model flags applied the way a flag applies: globals to the model, layer
    keys to every layer (then resolved: a key of another mechanism is dropped)."""
    from models import ModelConfig
    from models import config as mconfig
    d = base.to_dict()
    d.update({k: v for k, v in flags.items() if k in mconfig.GLOBAL_KEYS})
    layer = {k: v for k, v in flags.items() if k in mconfig.LAYER_KEYS}
    d["layers"] = [{**l, **layer} for l in d["layers"]]
    return ModelConfig.from_dict(d)


def _value(base, key: str) -> str:
    d = base.to_dict()
    if key in d and key != "layers":
        return repr(d[key])
    vals = sorted({repr(l.get(key)) for l in d["layers"]})
    return " / ".join(vals) if vals != ["None"] else "no such setting"


def check_tokenizer(where: str, data: Mapping[str, Any], source: Mapping[str, Any] | None,
                    vocab_size: int) -> None:
    """The data's tokenizer must fit the model's vocabulary and, when the source has one, be
    the source's (name, vocabulary size and, for char, the symbols)."""
    if data["vocab_size"] > vocab_size:
        raise TrainConfigError(f"{where}: the data's tokenizer ({data.get('name')}, vocab "
                               f"{data['vocab_size']}) does not fit the model's vocab_size={vocab_size}")
    if source is None:
        return
    for k in ("name", "vocab_size", "vocab"):
        if data.get(k) != source.get(k):
            what = {"vocab": "symbols"}.get(k, k)
            show = (lambda x: x) if k != "vocab" else (lambda x: f"{len(x or '')} symbols")
            raise TrainConfigError(
                f"{where}: the data was prepared with another tokenizer than the checkpoint's "
                f"({what}: data {show(data.get(k))!r}, checkpoint {show(source.get(k))!r}); "
                f"prepare the data with the checkpoint's tokenizer")


def load_init(model, init_from: str) -> dict[str, str]:
    """The init source's weights into `model` (on its device; LoRA adapters, if any, keep their
    initialisation) -> {"init_from", "base_sha256"}: the source and the sha256 of its weights
    as loaded (chimera.checkpoint.weights_sha256: what serving a LoRA adapter checks)."""
    from chimera import checkpoint as ckpt
    from models import LLM, ModelConfig
    if init_from.startswith(HF):
        cfg, state, _ = import_hf(init_from[len(HF):], model.cfg.block_size)
        src = LLM(ModelConfig.from_dict(cfg))
        src.load_state_dict(state, strict=True)
    else:
        src, _, _ = ckpt.load_model(init_from)
    sha = ckpt.weights_sha256(src)
    ckpt.load_init_state(model, src.state_dict(), init_from)
    return {"init_from": init_from, "base_sha256": sha}
