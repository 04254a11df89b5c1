"""Training configuration: the frozen `TrainConfig`, the CLI/file loader and the run plan.

    tc = load_train_config(cli={"max_iters": 100, "n_embd": 64}, config_file="my.yaml")
    plan = plan_run(tc)          # every check that can fail, done before any worker starts
    plan.worker_config           # the picklable dict train_fn_per_worker(config) takes

Keys are the same in a YAML/JSON `--config` file and on the command line (CLI wins). Model
keys (`n_embd`, `attn`, ... see models.config) are collected into `TrainConfig.model` and only
the keys actually given reach the model config loader, so a layer file is never overridden by
defaults. Unknown keys are errors with a "did you mean" hint.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chimera.train.batchexpr import BatchExprError, parse_batch_expr
from chimera.paths import (job_copy_hint, older_default_data_dir, resolve_data_dir,
                           resolve_storage_path)
MODEL_KEYS = ("n_layer", "n_embd", "vocab_size", "block_size", "dropout", "pos_emb", "norm",
              "up_dim", "non_linearity", "attn", "n_head", "n_kv_heads", "q_latent_dim",
              "kv_latent_dim", "rope_head_dim", "moe", "n_exp", "n_shared", "n_act", "coeff",
              "aux_free", "alpha", "gamma", "act_recomp")
_BOOL_MODEL_KEYS = ("moe", "aux_free", "act_recomp")


class TrainConfigError(ValueError):
    """A training option is unknown, of the wrong type, or inconsistent with the others."""


@dataclass(frozen=True)
class TrainConfig:
    model: Mapping[str, Any] = field(default_factory=dict)   # explicitly given model flags
    layer_configs: str | None = None          # JSON list of layer dicts
    layer_configs_jsonl: str | None = None    # JSONL file, one layer dict per line
    dataset: str = "shakespeare"
    tokenizer: str | None = None              # default folder's tokenizer (gpt2); checked
    data_dir: str | None = None               # default <repo>/data/<dataset>_<tokenizer>
    total_batch_size_str: str = "2**13"       # tokens per optimizer step, all workers together
    batch_size: int = 4                       # sequences per micro-step per worker
    max_iters: int = 500
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                    # 0 disables clipping
    eval: bool = False
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    save_model: bool = False
    ckpt_interval: int = 500
    keep_checkpoints: int = 3
    file_name: str = "llm_model"              # prefix of the exported best/last weights
    wandb_log: bool = False
    wandb_project: str = "chimera"
    wandb_run_name: str | None = None         # default: the run name
    compile: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    num_threads: int = 0                      # torch threads per worker (0: leave as is)
    peak_flops: float | None = None           # per worker, for MFU (default per device)
    storage_path: str | None = None           # default <repo>/runs
    run_name: str | None = None               # default derived from the config (deterministic)
    max_failures: int = 0                     # worker-group restarts (-1: unlimited)
    seed: int = 1337
    resume_from: str | None = None            # a checkpoint directory to start from
    crash_at_step: int = 0                    # test hook: worker rank 0 os._exit()s once there

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = {"int": int, "float": float, "bool": bool, "str": str}.get(
                f.type.split(" |")[0] if isinstance(f.type, str) else "", None)
            if v is None and "None" in str(f.type):
                continue
            if kind is float and isinstance(v, str):      # PyYAML reads 1e-3 as a string
                try:
                    v = float(v)
                    object.__setattr__(self, f.name, v)
                except ValueError:
                    pass
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                v = float(v)
            if kind is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
                raise TrainConfigError(f"{f.name}={v!r} must be of type {kind.__name__}")
        if not isinstance(self.model, Mapping):
            raise TrainConfigError("model must be a mapping of model flags")
        object.__setattr__(self, "model", dict(self.model))
        for k in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval",
                  "ckpt_interval", "keep_checkpoints", "num_workers"):
            if getattr(self, k) < 1:
                raise TrainConfigError(f"{k}={getattr(self, k)} must be >= 1")
        for k in ("warmup_steps", "num_threads", "crash_at_step", "weight_decay", "grad_clip"):
            if getattr(self, k) < 0:
                raise TrainConfigError(f"{k}={getattr(self, k)} must be >= 0")
        if not self.learning_rate > 0:
            raise TrainConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if self.max_failures < -1:
            raise TrainConfigError(f"max_failures={self.max_failures} must be >= -1 (-1: unlimited)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise TrainConfigError(f"peak_flops={self.peak_flops} must be > 0")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise TrainConfigError(f"{k}={getattr(self, k)} must be in [0, 1)")
        if self.tokenizer is not None:
            from chimera.data.tokenizers import TOKENIZERS
            if self.tokenizer not in TOKENIZERS:
                raise TrainConfigError(f"tokenizer={self.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        if self.layer_configs is not None and self.layer_configs_jsonl is not None:
            raise TrainConfigError("give at most one of layer_configs and layer_configs_jsonl")
        try:
            parse_batch_expr(self.total_batch_size_str)
        except BatchExprError as e:
            raise TrainConfigError(str(e)) from None
        for k in self.model:
            if k not in MODEL_KEYS:
                raise _unknown(k, MODEL_KEYS)

    @property
    def total_batch_size(self) -> int:
        return parse_batch_expr(self.total_batch_size_str)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Flat keys (model and training mixed, as in a --config file) or to_dict() output."""
        d = dict(d)
        model = dict(d.pop("model", None) or {})
        train: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        for k, v in d.items():
            if k in MODEL_KEYS:
                model[k] = v
            elif k in names:
                train[k] = v
            else:
                raise _unknown(k, names | set(MODEL_KEYS))
        if isinstance(train.get("total_batch_size_str"), int):
            train["total_batch_size_str"] = str(train["total_batch_size_str"])
        return cls(model=model, **train)


def _unknown(key: str, valid) -> TrainConfigError:
    hint = difflib.get_close_matches(key, sorted(valid), n=1)
    return TrainConfigError(f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def read_config_file(path: str | Path, flag: str = "--config", error=TrainConfigError) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping; `error(message)` naming `flag` if not."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise error(f"{flag} {p}: {e.strerror or e}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # yaml.YAMLError / JSONDecodeError: one line is enough
        raise error(f"{flag} {p}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise error(f"{flag} {p}: expected a mapping of keys, got {type(d).__name__}")
    return d


def load_train_config(cli: Mapping[str, Any] | None = None,
                      config_file: str | Path | None = None) -> TrainConfig:
    """File keys, then CLI keys on top; both flat (model and training keys mixed)."""
    merged = read_config_file(config_file) if config_file else {}
    merged.update(cli or {})
    return TrainConfig.from_dict(merged)


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
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


def default_run_name(tc: TrainConfig, model_config: dict) -> str:
    """Same settings -> same name, so re-running a command resumes its run."""
    keep = {k: v for k, v in tc.to_dict().items()
            if k not in ("model", "layer_configs", "layer_configs_jsonl", "storage_path",
                         "run_name", "resume_from", "wandb_log", "wandb_project",
                         "wandb_run_name", "max_failures", "crash_at_step", "num_threads")}
    if keep.get("tokenizer") is None:          # names from before the key existed stay valid
        keep.pop("tokenizer", None)
    blob = json.dumps({"model": model_config, "train": keep}, sort_keys=True, default=str)
    return f"{tc.dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def plan_run(tc: TrainConfig, world_size: int | None = None) -> RunPlan:
    """Validate everything that depends on files and the model; raise TrainConfigError."""
    from models.config import ConfigError, ModelConfig
    from chimera.data.shards import read_manifest

    data_dir = resolve_data_dir(tc.data_dir, tc.dataset, tc.tokenizer)
    if not data_dir.is_dir():
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
    flags = dict(tc.model)
    if "vocab_size" not in flags:
        flags["vocab_size"] = -(-tokenizer["vocab_size"] // 64) * 64     # padded up to 64
    elif flags["vocab_size"] < tokenizer["vocab_size"]:
        raise TrainConfigError(f"vocab_size={flags['vocab_size']} is smaller than the dataset's "
                               f"tokenizer vocabulary ({tokenizer['vocab_size']})")
    try:
        if tc.layer_configs is not None:
            mc = ModelConfig.from_layer_list(tc.layer_configs, **flags)
        elif tc.layer_configs_jsonl is not None:
            mc = ModelConfig.from_layer_file(Path(tc.layer_configs_jsonl).expanduser().resolve(), **flags)
        else:
            mc = ModelConfig.from_dict(flags)
    except ConfigError as e:
        raise TrainConfigError(f"model config: {e}") from None
    world = world_size or tc.num_workers
    per_step = tc.batch_size * mc.block_size * world
    total = tc.total_batch_size
    if total % per_step:
        raise TrainConfigError(
            f"total_batch_size_str={tc.total_batch_size_str!r} = {total} tokens is not divisible "
            f"by batch_size*block_size*num_workers = {tc.batch_size}*{mc.block_size}*{world} = {per_step}")
    for split in ("train", "val"):
        tokens = manifest["splits"].get(split, {}).get("tokens", 0)
        if (tokens - 1) // mc.block_size < world:
            raise TrainConfigError(f"data_dir {data_dir}: the {split} split ({tokens} tokens) has "
                                   f"fewer than num_workers={world} windows of block_size+1")
    if tc.resume_from is not None and "://" not in tc.resume_from:
        rp = Path(tc.resume_from).expanduser().resolve()
        if not (rp / "config.json").is_file():
            raise TrainConfigError(f"resume_from {rp} is not a checkpoint directory (no config.json)")
        tc = dataclasses.replace(tc, resume_from=str(rp))
    if tc.resume_from is not None:
        from chimera.checkpoint import read_config
        old = read_config(tc.resume_from)
        if old != mc.to_dict():
            raise TrainConfigError(f"resume_from {tc.resume_from}: its model config differs from "
                                   f"this run's model config")
    storage = resolve_storage_path(tc.storage_path)
    name = tc.run_name or default_run_name(tc, mc.to_dict())
    if "/" in name or name in (".", ".."):
        raise TrainConfigError(f"run_name={name!r} must be a plain name (no '/')")
    tc = dataclasses.replace(tc, data_dir=str(data_dir), storage_path=storage, run_name=name)
    return RunPlan(train=tc, model_config=mc.to_dict(), tokenizer=tokenizer, data_dir=str(data_dir),
                   storage_path=storage, run_name=name, grad_accum=total // per_step)


# Meaning of every flag: the `--help` text and the "meaning" column of docs/parameters.md.
MODEL_HELP = {
    "n_layer": "number of transformer layers (must equal the number of layer dicts when given)",
    "n_embd": "model width (embedding size)",
    "vocab_size": "vocabulary size (default: the dataset's tokenizer vocabulary rounded up to 64)",
    "block_size": "context length in tokens",
    "dropout": "dropout probability",
    "pos_emb": "positions: learn, sin or rope",
    "norm": "layernorm or rmsnorm",
    "up_dim": "hidden width of the MLP / of each expert",
    "non_linearity": "MLP activation (relu gelu silu swish mish selu celu elu lrelu tanh sigmoid glu swiglu)",
    "attn": "attention: mha, mqa, gqa or mla (DeepSeek multi-head latent attention)",
    "n_head": "attention heads",
    "n_kv_heads": "key/value heads (gqa; mha uses n_head, mqa 1)",
    "q_latent_dim": "mla: query latent width",
    "kv_latent_dim": "mla: key/value latent width (what the KV cache stores)",
    "rope_head_dim": "mla: decoupled RoPE width per head (0 without rope)",
    "moe": "mixture of experts instead of the dense MLP",
    "n_exp": "moe: experts per layer",
    "n_shared": "moe: always-active shared experts",
    "n_act": "moe: active experts per token, shared ones included",
    "coeff": "moe: auxiliary load-balancing loss weight (without --aux_free)",
    "aux_free": "moe: auxiliary-loss-free balancing (per-expert router bias)",
    "alpha": "moe --aux_free: weight of the small sequence-wise balance loss",
    "gamma": "moe --aux_free: bias update step per optimizer step",
    "act_recomp": "recompute activations in the backward pass (less memory, more compute)",
}
FIELD_HELP = {
    "dataset": "dataset name (data_dir defaults to <repo>/data/<dataset>_<tokenizer>)",
    "tokenizer": "tokenizer of the prepared data, as given to jobs/prepare.py: picks the default data_dir and must match its manifest",
    "data_dir": "folder of prepared shards and manifest.json (jobs/prepare.py output; default <repo>/data/<dataset>_<tokenizer>)",
    "total_batch_size_str": "tokens per optimizer step over all workers, an integer expression (2**13, 8*1024); grad_accum = total / (batch_size*block_size*num_workers)",
    "batch_size": "sequences per micro-step per worker",
    "max_iters": "optimizer steps",
    "learning_rate": "peak learning rate (linear warmup, then cosine decay to 10%)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "gradient-norm clipping (0 disables it)",
    "eval": "evaluate train/val loss at step 0, every eval_interval and at the end",
    "eval_interval": "steps between evaluations",
    "eval_iters": "batches per evaluation",
    "log_interval": "steps between metric rows (loss, lr, tokens/s, MFU)",
    "save_model": "write checkpoints (every ckpt_interval, at the end, and the best-val copy)",
    "ckpt_interval": "steps between checkpoints",
    "keep_checkpoints": "newest checkpoints kept in the run folder",
    "file_name": "prefix of the best-checkpoint copy (<run>/<file_name>_best)",
    "wandb_log": "log metrics to Weights & Biases (WANDB_MODE=offline works)",
    "wandb_project": "W&B project",
    "wandb_run_name": "W&B run name (default: the run name)",
    "compile": "torch.compile the model",
    "num_workers": "Ray Train workers (data-parallel ranks)",
    "use_gpu": "one GPU per worker (NCCL); CPU and gloo otherwise",
    "num_threads": "torch threads and Ray CPUs per worker (0: torch's default, 1 CPU)",
    "peak_flops": "peak FLOP/s per worker for MFU (default: by GPU model, or 1e11 per CPU thread)",
    "storage_path": "where runs live: a local folder or s3://... (multi-node runs need shared storage); default $CHIMERA_STORAGE, else <repo>/runs",
    "run_name": "run folder under storage_path; the same name resumes (default: a hash of the settings)",
    "max_failures": "worker-group restarts from the last checkpoint after a failure (-1: unlimited)",
    "seed": "random seed (init, data order)",
    "resume_from": "checkpoint folder to start a new run from (same model config)",
    "crash_at_step": "test hook: the last rank exits once at this step (0: never)",
}


def add_arguments(p) -> None:
    """Every TrainConfig key and model flag as `--key`; unspecified flags stay absent. Each
    action carries `doc_default` (its effective default) for --help and docs/parameters.md."""
    import argparse
    from models.config import ATTN_DEFAULTS, FFN_DEFAULTS, GLOBAL_DEFAULTS
    S = argparse.SUPPRESS
    model_defaults = {**GLOBAL_DEFAULTS, **ATTN_DEFAULTS, **FFN_DEFAULTS}
    m = p.add_argument_group("model (only the flags given reach the model config)")
    types = {"dropout": float, "coeff": float, "alpha": float, "gamma": float,
             "pos_emb": str, "norm": str, "non_linearity": str, "attn": str}
    for k in MODEL_KEYS:
        if k in _BOOL_MODEL_KEYS:
            a = m.add_argument(f"--{k}", action=argparse.BooleanOptionalAction, default=S,
                               help=MODEL_HELP[k])
        else:
            a = m.add_argument(f"--{k}", type=types.get(k, int), default=S, help=MODEL_HELP[k])
        if k != "vocab_size":
            a.doc_default = model_defaults[k]
    m.add_argument("--layer_configs", default=S, help="JSON list of per-layer dicts")
    m.add_argument("--layer_configs_jsonl", default=S, help="JSONL file, one layer dict per line")
    t = p.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "layer_configs", "layer_configs_jsonl"):
            continue
        base = str(f.type).split(" |")[0]
        if base == "bool":
            a = t.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=S,
                               help=FIELD_HELP[f.name])
        else:
            a = t.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(base, str),
                               default=S, help=FIELD_HELP[f.name])
        if f.default is not None:
            a.doc_default = f.default
        elif f.name == "tokenizer":                  # None: "not given", the folder rule's gpt2
            from chimera.paths import DEFAULT_TOKENIZER
            a.doc_default = DEFAULT_TOKENIZER
    p.add_argument("--config", default=S, help="YAML/JSON file with the same keys (CLI overrides it)")
