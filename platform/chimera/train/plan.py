"""The run plan: a TrainConfig checked against its data and resolved into everything a
worker needs, before any worker starts.

    plan = plan_run(load_train_config({...}))    # TrainConfigError on anything that can fail
    plan.model_config, plan.run_dir, plan.grad_accum
    plan.worker_config           # the picklable dict train_fn_per_worker(config) takes
    resolve_model(flags, layers, data_vocab)      # the one place a run's ModelConfig is made
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from chimera import storage
from chimera.paths import job_copy_hint, older_default_data_dir, resolve_data_dir, resolve_storage_path
from chimera.train.config import TrainConfig, TrainConfigError


@dataclass(frozen=True)
class RunPlan:
    """A checked run: resolved paths, model config, grad accumulation, the worker's config."""
    train: TrainConfig
    model_config: dict
    tokenizer: dict
    data_dir: str
    storage_path: str
    run_name: str
    grad_accum: int

    @property
    def run_dir(self) -> str:
        return _join(self.storage_path, self.run_name)

    @property
    def worker_config(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "model_config": self.model_config,
                "tokenizer": self.tokenizer, "run_dir": self.run_dir, "grad_accum": self.grad_accum}


def _join(base: str, name: str) -> str:
    return storage.join(base, name)


# model keys added after runs were first named (chimera.hf's knobs): hashed only when not at
# their default, so a run named before they existed keeps its name (and resumes)
_LATER_GLOBAL = ("bias", "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling", "mtp_depth", "mtp_lambda")
_LATER_LAYER = ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group")


def _named_model(model_config: dict) -> dict:
    from models.config import FFN_DEFAULTS, GLOBAL_DEFAULTS
    d = {k: v for k, v in model_config.items()
         if not (k in _LATER_GLOBAL and v == GLOBAL_DEFAULTS[k])}
    layers = []
    for layer in d.get("layers", []):
        layer = {k: v for k, v in layer.items() if not (k in _LATER_LAYER and v == FFN_DEFAULTS[k])}
        if layer.get("attn") == "mla":
            for k in ("qk_nope_head_dim", "v_head_dim"):
                if layer.get(k) == d["n_embd"] // layer["n_head"]:
                    layer.pop(k)
        layers.append(layer)
    return {**d, "layers": layers}


def default_run_name(tc: TrainConfig, model_config: dict) -> str:
    """Same settings -> same name, so re-running a command resumes its run."""
    keep = {k: v for k, v in tc.to_dict().items()
            if k not in ("model", "layer_configs", "layer_configs_jsonl", "storage_path",
                         "run_name", "resume_from", "wandb_log", "wandb_project",
                         "wandb_run_name", "max_failures", "crash_at_step", "num_threads",
                         "in_process", "worker_resources", "resize_interval_s")}
    for k in ("tokenizer", "min_workers", "init_from", "lora_targets"):
        if keep.get(k) is None:                # names from before the key existed stay valid
            keep.pop(k, None)
    if not keep.get("lora_rank"):
        keep.pop("lora_rank", None)
        keep.pop("lora_alpha", None)
    blob = json.dumps({"model": _named_model(model_config), "train": keep}, sort_keys=True, default=str)
    return f"{tc.dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def resolve_model(flags: Mapping[str, Any], layers: list | None, data_vocab: int):
    """The one place a run's ModelConfig is resolved (plan_run, and a sweep's trial expansion):
    the model flags given, over the layer stack when there is one. vocab_size defaults to the
    data's tokenizer vocabulary padded to 64, and must hold it. TrainConfigError otherwise."""
    from models.config import ConfigError, ModelConfig, pad_vocab
    flags = dict(flags)
    if "vocab_size" not in flags:
        flags["vocab_size"] = pad_vocab(data_vocab)
    elif flags["vocab_size"] < data_vocab:
        raise TrainConfigError(f"vocab_size={flags['vocab_size']} is smaller than the dataset's "
                               f"tokenizer vocabulary ({data_vocab})")
    try:
        return ModelConfig.from_dict(flags if layers is None else {**flags, "layers": layers})
    except ConfigError as e:
        raise TrainConfigError(f"model config: {e}") from None


def plan_run(tc: TrainConfig, world_size: int | None = None,
             model_config: Mapping[str, Any] | None = None) -> RunPlan:
    """Validate everything that depends on files and the model; raise TrainConfigError.
    `model_config`: an already resolved model (a sweep trial's) instead of tc's model flags."""
    from models.config import ConfigError, ModelConfig
    from chimera.data.shards import read_manifest

    try:
        data_dir = resolve_data_dir(tc.data_dir, tc.dataset, tc.tokenizer)   # a URI stays one
    except storage.StorageError as e:
        raise TrainConfigError(f"data_dir: {e}") from None
    if not storage.is_uri(data_dir) and not data_dir.is_dir():      # a URI: read_manifest says
        cmd = (f"python jobs/prepare.py --dataset {tc.dataset}"
               + (f" --tokenizer {tc.tokenizer}" if tc.tokenizer else "")
               + (f" --out {data_dir}" if tc.data_dir else ""))
        old = None if tc.data_dir else older_default_data_dir(tc.dataset)
        hint = (f"; {old} holds data prepared by an older version: pass --data_dir {old} or "
                f"rename it to {data_dir.name}" if old else "")
        if not tc.data_dir and job_copy_hint():
            hint = job_copy_hint()
        raise TrainConfigError(f"data_dir {data_dir} does not exist: prepare it with `{cmd}`{hint}")
    try:
        manifest = read_manifest(data_dir)
    except Exception as e:
        raise TrainConfigError(f"data_dir {data_dir}: {e}") from None
    tokenizer = manifest["tokenizer"]
    if tc.tokenizer is not None and tokenizer.get("name") != tc.tokenizer:
        raise TrainConfigError(f"tokenizer={tc.tokenizer!r} but data_dir {data_dir} was prepared "
                               f"with {tokenizer.get('name')!r}")
    if tc.init_from is not None:                      # fine-tuning: the source's model
        if model_config is not None:
            raise TrainConfigError("init_from: a fine-tuning run's model is its source's; it "
                                   "takes no separate model config (a sweep trial's)")
        from chimera.train.finetune import finetune_model, init_source
        src = init_source(tc)
        tc = dataclasses.replace(tc, init_from=src.init_from)
        mc = finetune_model(tc, src, tokenizer)
    elif model_config is not None:
        try:
            mc = ModelConfig.from_dict(model_config)
        except ConfigError as e:
            raise TrainConfigError(f"model config: {e}") from None
        resolve_model({"vocab_size": mc.vocab_size}, None, tokenizer["vocab_size"])   # holds it
    else:
        try:
            layers = tc.layer_list()
        except ConfigError as e:
            raise TrainConfigError(f"model config: {e}") from None
        mc = resolve_model(tc.model, layers, tokenizer["vocab_size"])
    world = world_size or tc.num_workers
    accum = grad_accum(tc, mc.block_size, world)
    for w in range(tc.min_workers or world, world):      # an elastic run's smaller worlds
        grad_accum(tc, mc.block_size, w, elastic=True)
    for split in ("train", "val"):
        tokens = manifest["splits"].get(split, {}).get("tokens", 0)
        if (tokens - 1) // mc.block_size < world:
            raise TrainConfigError(f"data_dir {data_dir}: the {split} split ({tokens} tokens) has "
                                   f"fewer than num_workers={world} windows of block_size+1")
    if tc.resume_from is not None:
        from chimera.checkpoint import CONFIG, STATE, WEIGHTS, read_config
        try:
            rp = storage.resolve(tc.resume_from)
            missing = [f for f in (CONFIG, WEIGHTS, STATE) if not storage.is_file(storage.join(rp, f))]
        except storage.StorageError as e:
            raise TrainConfigError(f"resume_from: {e}") from None
        if missing:
            raise TrainConfigError(f"resume_from {rp} is not a checkpoint directory (no "
                                   f"{' or '.join(missing)})")
        tc = dataclasses.replace(tc, resume_from=rp)
        try:      # resolved again: a checkpoint written before a key existed holds its default
            old = ModelConfig.from_dict(read_config(tc.resume_from)).to_dict()
        except ConfigError as e:
            raise TrainConfigError(f"resume_from {tc.resume_from}: config.json: {e}") from None
        if old != mc.to_dict():
            raise TrainConfigError(f"resume_from {tc.resume_from}: its model config differs from "
                                   f"this run's model config")
    try:
        storage_path = resolve_storage_path(tc.storage_path)
        storage.check_writable(storage_path)         # a bucket that refuses writes: now
    except storage.StorageError as e:
        raise TrainConfigError(f"storage_path: {e}") from None
    name = tc.run_name or default_run_name(tc, mc.to_dict())
    if "/" in name or name in (".", ".."):
        raise TrainConfigError(f"run_name={name!r} must be a plain name (no '/')")
    tc = dataclasses.replace(tc, data_dir=str(data_dir), storage_path=storage_path, run_name=name)
    return RunPlan(train=tc, model_config=mc.to_dict(), tokenizer=tokenizer, data_dir=str(data_dir),
                   storage_path=storage_path, run_name=name, grad_accum=accum)


def grad_accum(tc: TrainConfig, block_size: int, world: int, elastic: bool = False) -> int:
    """Micro-steps per optimizer step on `world` workers: total_batch_size / (batch_size *
    block_size * world). TrainConfigError when it does not divide (`elastic`: the world size is
    one an elastic run may shrink to, named as such)."""
    per_step = tc.batch_size * block_size * world
    total = tc.total_batch_size
    if total % per_step:
        what = (f"elastic min_workers={tc.min_workers}..num_workers={tc.num_workers}: at {world} "
                f"worker(s), " if elastic else "")
        raise TrainConfigError(
            f"{what}total_batch_size_str={tc.total_batch_size_str!r} = {total} tokens is not "
            f"divisible by batch_size*block_size*num_workers = {tc.batch_size}*{block_size}*"
            f"{world} = {per_step}")
    return total // per_step
