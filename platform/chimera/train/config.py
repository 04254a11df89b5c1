"""Training configuration: the frozen `TrainConfig` (every training key with its default and
meaning) and its loader from flags and --config files.

    tc = load_train_config(cli={"max_iters": 100, "n_embd": 64}, config_file="my.yaml")
    plan = plan_run(tc)          # chimera.train.plan: every check that can fail, before any worker
    add_arguments(parser)        # chimera.train.flags: the flags of jobs/train.py

Keys are the same in a YAML/JSON `--config` file and on the command line (CLI wins). Model
keys (`n_embd`, `attn`, ... see models.config) are collected into `TrainConfig.model` and only
the keys actually given reach the model config loader, so a layer file is never overridden by
defaults. Unknown keys are errors with a "did you mean" hint.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from chimera.train.batchexpr import BatchExprError, parse_batch_expr
from models import config as mconfig            # the model flag table, read at call time


def opt(default: Any, help: str, doc_default: str | None = None):
    """A config field with its help text beside it (litgpt's args.py style); a mutable
    default becomes a factory. `doc_default`: what the docs show when the value is computed."""
    meta = {"help": help, **({"doc_default": doc_default} if doc_default is not None else {})}
    if isinstance(default, (dict, list)):
        import copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def config_keys() -> set[str]:
    """Every key of a --config file or a sweep spec's base: the model flags and TrainConfig's
    fields (`model` among them: a mapping of model flags)."""
    return set(mconfig.MODEL_KEYS) | {f.name for f in dataclasses.fields(TrainConfig)}


class TrainConfigError(ValueError):
    """A training option is unknown, of the wrong type, or inconsistent with the others."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training key, declared once with its default and meaning: jobs/train.py's flags,
    --config files, sweep specs' base keys and docs/parameters.md are generated from these
    fields (model keys are in models.config.FLAGS)."""
    model: Mapping[str, Any] = field(default_factory=dict)   # the model flags given (FLAGS)
    layer_configs: str | None = opt(None, "JSON list of per-layer dicts")
    layer_configs_jsonl: str | None = opt(None, "JSONL file, one layer dict per line")
    dataset: str = opt("shakespeare",
        "dataset name (data_dir defaults to <repo>/data/<dataset>_<tokenizer>)")
    tokenizer: str | None = opt(None,
        "tokenizer of the prepared data, as given to jobs/prepare.py: picks the default data_dir and must match its manifest")
    data_dir: str | None = opt(None,
        "folder of prepared shards and manifest.json (jobs/prepare.py output; default <repo>/data/<dataset>_<tokenizer>)")
    total_batch_size_str: str = opt("2**13",
        "tokens per optimizer step over all workers, an integer expression (2**13, 8*1024); grad_accum = total / (batch_size*block_size*num_workers)")
    batch_size: int = opt(4,
        "sequences per micro-step per worker")
    max_iters: int = opt(500,
        "optimizer steps")
    learning_rate: float = opt(3e-4,
        "peak learning rate (linear warmup, then cosine decay to 10%)")
    warmup_steps: int = opt(100,
        "linear warmup steps")
    weight_decay: float = opt(0.1,
        "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9,
        "AdamW beta1")
    beta2: float = opt(0.95,
        "AdamW beta2")
    grad_clip: float = opt(1.0,
        "gradient-norm clipping (0 disables it)")
    eval: bool = opt(False,
        "evaluate train/val loss at step 0, every eval_interval and at the end")
    eval_interval: int = opt(100,
        "steps between evaluations")
    eval_iters: int = opt(20,
        "batches per evaluation")
    log_interval: int = opt(10,
        "steps between metric rows (loss, lr, tokens/s, MFU)")
    save_model: bool = opt(False,
        "write checkpoints (every ckpt_interval, at the end, and the best-val copy)")
    ckpt_interval: int = opt(500,
        "steps between checkpoints")
    keep_checkpoints: int = opt(3,
        "newest checkpoints kept in the run folder")
    file_name: str = opt("llm_model",
        "prefix of the best-checkpoint copy (<run>/<file_name>_best)")
    wandb_log: bool = opt(False,
        "log metrics to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = opt("chimera",
        "W&B project")
    wandb_run_name: str | None = opt(None,
        "W&B run name (default: the run name)")
    compile: bool = opt(False,
        "torch.compile the model")
    num_workers: int = opt(1,
        "Ray Train workers (data-parallel ranks); with min_workers: the most workers")
    min_workers: int | None = opt(None,
        "elastic data-parallel training: run on any number of workers from min_workers to "
        "num_workers that the cluster has room for; when a node is lost the run restarts from its "
        "last checkpoint on fewer workers, and it grows back (again from the last checkpoint) when "
        "room appears, checked every resize_interval_s. total_batch_size_str must divide for every "
        "world size in the range (grad_accum follows the world size: the tokens per step stay the "
        "same); the data stream restarts at the next epoch on a resize (chimera.data.loader). "
        "Default: exactly num_workers")
    resize_interval_s: float = opt(60.0,
        "elastic runs (min_workers): seconds between checks for room to grow the worker group")
    worker_resources: str | None = opt(None,
        "extra Ray resources every worker requests, a JSON object of name -> amount, e.g. "
        "'{\"GPU\": 1}' to be placed on a GPU node type while computing on CPU (only --use_gpu "
        "computes on CUDA), or a custom resource of a node type; CPUs come from num_threads")
    in_process: bool | None = opt(None,
        "train in this process, without starting Ray (one worker only); default: when a run can "
        "(1 worker, no --max_failures, local storage, no RAY_ADDRESS), else on Ray Train", "auto")
    use_gpu: bool = opt(False,
        "one GPU per worker (NCCL); CPU and gloo otherwise")
    num_threads: int = opt(0,
        "torch threads and Ray CPUs per worker (0: torch's default, 1 CPU)")
    peak_flops: float | None = opt(None,
        "peak FLOP/s per worker for MFU (default: by GPU model, or 1e11 per CPU thread)")
    storage_path: str | None = opt(None,
        "where runs live: a local folder or s3://... (multi-node runs need shared storage); default $CHIMERA_STORAGE, else <repo>/runs")
    run_name: str | None = opt(None,
        "run folder under storage_path; the same name resumes (default: a hash of the settings)")
    max_failures: int = opt(0,
        "worker-group restarts from the last checkpoint after a failure (-1: unlimited)")
    seed: int = opt(1337,
        "random seed (init, data order)")
    resume_from: str | None = opt(None,
        "checkpoint folder to start a new run from (same model config)")
    init_from: str | None = opt(None,
        "fine-tune: start from these weights with a fresh optimizer and schedule at step 0 (not "
        "--resume_from, which continues a run): a checkpoint or run dir (local or s3://, as "
        "jobs/serve.py takes) or hf:PATH (a Hugging Face model folder, chimera.hf). The model "
        "config is the checkpoint's: of the model flags only block_size (<= its own) and dropout "
        "may be given; the data's tokenizer must be the checkpoint's")
    lora_rank: int = opt(0,
        "LoRA adapters of this rank on the --lora_targets Linears, the only parameters that "
        "train (the base stays frozen; needs --init_from); 0: off, every parameter trains")
    lora_alpha: float = opt(16.0,
        "LoRA scale numerator: the adapter's update is (lora_alpha / lora_rank) B A")
    lora_targets: str | None = opt(None,
        "comma-separated Linear names inside the blocks that get adapters: c_attn, c_proj "
        "(attention output and MLP down), c_fc, and MLA's W_dq, W_uq, W_q, W_dkv, W_uk, W_uv "
        "(models/lora.py); default: every one of them the model has", "all the model has")
    crash_at_step: int = opt(0,
        "test hook: the last rank exits once at this step (0: never)")

    def __post_init__(self) -> None:
        if isinstance(self.worker_resources, Mapping):        # a mapping in a --config file
            object.__setattr__(self, "worker_resources",
                               json.dumps(dict(self.worker_resources), sort_keys=True))
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
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise TrainConfigError(f"min_workers={self.min_workers} must be in [1, num_workers="
                                   f"{self.num_workers}]")
        if not self.resize_interval_s > 0:
            raise TrainConfigError(f"resize_interval_s={self.resize_interval_s} must be > 0")
        self.extra_resources()                    # TrainConfigError when it is not valid
        if self.in_process and (self.num_workers != 1 or self.max_failures != 0
                                or self.min_workers is not None):
            raise TrainConfigError(f"in_process runs one worker without restarts: got num_workers="
                                   f"{self.num_workers}, max_failures={self.max_failures}, "
                                   f"min_workers={self.min_workers}")
        if self.tokenizer is not None:
            from chimera.data.tokenizers import TOKENIZERS
            if self.tokenizer not in TOKENIZERS:
                raise TrainConfigError(f"tokenizer={self.tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        self._check_finetune()
        if self.layer_configs is not None and self.layer_configs_jsonl is not None:
            raise TrainConfigError("give at most one of layer_configs and layer_configs_jsonl")
        try:
            parse_batch_expr(self.total_batch_size_str)
        except BatchExprError as e:
            raise TrainConfigError(str(e)) from None
        for k in self.model:
            if k not in mconfig.MODEL_KEYS:
                raise _unknown(k, mconfig.MODEL_KEYS)

    def _check_finetune(self) -> None:
        """init_from / resume_from / lora_* on their own (the checkpoint itself: plan_run)."""
        if self.init_from is not None and self.resume_from is not None:
            raise TrainConfigError("give init_from (fine-tune from weights: a new run at step 0) "
                                   "or resume_from (continue a run), not both")
        if self.init_from is not None and self.init_from.strip() in ("", "hf:"):
            raise TrainConfigError(f"init_from={self.init_from!r}: give a checkpoint, run dir or hf:PATH")
        if self.lora_rank < 0:
            raise TrainConfigError(f"lora_rank={self.lora_rank} must be >= 0 (0: no LoRA)")
        if not self.lora_alpha > 0:
            raise TrainConfigError(f"lora_alpha={self.lora_alpha} must be > 0")
        if self.lora_rank == 0:
            if self.lora_targets is not None:
                raise TrainConfigError("lora_targets needs lora_rank >= 1 (LoRA is off at 0)")
            return
        if self.init_from is None:
            raise TrainConfigError(f"lora_rank={self.lora_rank} needs init_from: LoRA adapts a "
                                   f"trained base (a checkpoint or hf:PATH), it has none to adapt")
        if self.lora_targets is not None:
            from models import lora
            try:
                lora.parse_targets(self.lora_targets)
            except lora.LoRAError as e:
                raise TrainConfigError(str(e)) from None

    def extra_resources(self) -> dict[str, float]:
        """worker_resources as a mapping (empty when not given); TrainConfigError naming the
        key when it is not a JSON object of resource names to non-negative amounts."""
        if self.worker_resources is None:
            return {}
        try:
            d = json.loads(self.worker_resources)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"worker_resources={self.worker_resources!r} is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise TrainConfigError(f"worker_resources={self.worker_resources!r} must be a JSON "
                                   f"object of resource name -> amount")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise TrainConfigError(f"worker_resources[{k!r}]={v!r} must be a number >= 0")
        if "CPU" in d:
            raise TrainConfigError("worker_resources: CPU is set by num_threads (CPUs per worker)")
        if "GPU" in d and self.use_gpu:
            raise TrainConfigError("worker_resources: GPU is already 1 per worker with use_gpu")
        return {k: float(v) for k, v in d.items()}

    @property
    def total_batch_size(self) -> int:
        return parse_batch_expr(self.total_batch_size_str)

    def layer_list(self) -> list | None:
        """The layer stack of layer_configs (JSON list) or layer_configs_jsonl (file), if any;
        ConfigError (naming the file and line) when it does not parse."""
        from models.config import ConfigError, parse_layer_list, read_layer_file
        if self.layer_configs_jsonl is not None:
            from chimera import storage
            f = self.layer_configs_jsonl
            if storage.is_uri(f):                    # s3://.../best_layers.jsonl: a local copy
                try:
                    local = storage.cached_dir(storage.parent(f), "configs", only=(storage.basename(f),))
                except storage.StorageError as e:
                    raise ConfigError(f"layer file not found: {f} ({e})") from None
                return read_layer_file(local / storage.basename(f))
            return read_layer_file(Path(f).expanduser().resolve())
        return None if self.layer_configs is None else parse_layer_list(self.layer_configs)

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
            if k in mconfig.MODEL_KEYS:
                model[k] = v
            elif k in names:
                train[k] = v
            else:
                raise _unknown(k, names | set(mconfig.MODEL_KEYS))
        if isinstance(train.get("total_batch_size_str"), int):
            train["total_batch_size_str"] = str(train["total_batch_size_str"])
        return cls(model=model, **train)


def _unknown(key: str, valid) -> TrainConfigError:
    hint = difflib.get_close_matches(key, sorted(valid), n=1)
    return TrainConfigError(f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def read_config_file(path: str | Path, flag: str = "--config", error=TrainConfigError) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping; `error(message)` naming `flag` if not."""
    from chimera import storage
    p = Path(path) if not storage.is_uri(path) else None
    try:
        text = storage.read_text(path) if p is None else p.read_text()
    except (OSError, storage.StorageError) as e:
        raise error(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if p is None:
        p = Path(storage.basename(str(path)))      # its suffix says how to parse it
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
