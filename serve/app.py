"""The Serve application: the HTTP front end (serve/frontend.py) and the model servers.

    serve run serve.app:build_app checkpoint=runs/my_run          # typed builder (AppArgs)
    python jobs/serve.py --checkpoint runs/my_run --port 8000     # the same, plus a URL

Routes: see serve/frontend.py (OpenAI completions and chat, tokenizer routes, /generate,
/v1/models, /health). The request's `model` field picks the model (default: the first one).

The HTTP app runs in an Ingress deployment in front of one LLMServer deployment per model, so
that it outlives any model replica: a replica's death is a retry on another replica (several
replicas), a 503 with Retry-After (one), or an error event ending a stream, never a cut
connection (serve/backends.py). Not multiplexing: every model keeps its own KV cache and
running batch resident (a multiplexed replica would evict and reload weights on the request
path), gets its own replica count and health check, and its metrics carry its name. Serving
the K best trials of a sweep means a handful of models, each worth its own replicas.
`colocate_ingress` (one model, one replica): the HTTP app runs inside the model's own
deployment instead (ModelIngress: Serve's proxy -> the replica, one Ray call less, ~10 ms less
time to first token on this machine), and a crash of that replica is Serve's plain 500 and
cut streams for the requests it held.

API keys (serve/auth.py): `api_key`, `api_key_file`, the CHIMERA_API_KEY environment variable
of the process that builds the app; only their SHA-256 digests reach the replicas.
Deadlines: `request_timeout_s` per generation request, from its arrival (504 past it).

Overload: each model deployment takes `max_ongoing_requests` (default 2 x max_batch: a full
batch plus as many waiting in the engine) and queues `max_queued_requests` more; past that
the client gets 503 at once (with several models, the Ingress's handle raises
BackPressureError; with one, Serve's proxy answers). Request bodies over `max_body_bytes` get
413; max tokens over `max_new_tokens_cap` get 400.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from models.decode import DECODE_MODES
from serve.auth import ApiKeys
from serve.backends import Local, Remote
from serve.frontend import Frontend, make_api
from serve.server import LLMServer, ModelServer


class AppArgs(BaseModel):
    """Arguments of build_app (`serve run serve.app:build_app key=value ...`), declared once:
    jobs/serve.py's flags (type, default, help) and docs/parameters.md are generated from
    these fields (`add_app_arguments`)."""
    model_config = ConfigDict(extra="forbid")
    checkpoint: list[str] = Field([], description="checkpoint dir or run dir (its best checkpoint); "
                                  "repeat for several models", json_schema_extra={"metavar": "[NAME=]PATH"})
    from_sweep: str | None = Field(None, description="serve the --top_k best trials of this sweep dir",
                                   json_schema_extra={"metavar": "DIR"})
    top_k: int = Field(1, ge=1, le=16, description="with --from_sweep: how many trials")
    adapter: str | None = Field(None, description=(
        "a LoRA checkpoint (or run dir) whose adapters are merged into the one --checkpoint at "
        "load; it must have been trained on exactly those base weights (sha256)"),
        json_schema_extra={"metavar": "PATH"})
    max_batch: int = Field(16, ge=1, le=512, description="rows of the running batch per replica")
    max_new_tokens_cap: int = Field(1024, ge=1, description="largest max_new_tokens/max_tokens accepted")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 above)")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per model replica (default 2 x --max_batch)")
    max_queued_requests: int = Field(64, ge=0, description="queued per model before 503")
    num_replicas: int = Field(1, ge=1, description="replicas per model (without autoscaling)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound (with --max_replicas)")
    max_replicas: int | None = Field(None, ge=1, description="turns autoscaling on")
    target_ongoing_requests: float | None = Field(None, gt=0, description="autoscaling target (default --max_batch)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica (= torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica")
    health_check_period_s: float = Field(10.0, gt=0, description=(
        "seconds between replica health checks (a one-token generation)"))
    health_check_timeout_s: float = Field(30.0, gt=0, description=(
        "seconds before a health check counts as failed (the replica is replaced)"))
    chat_template: list[str] = Field([], description=(
        "Jinja2 chat template for /v1/chat/completions (serve/chat.py has the default): FILE for "
        "every model, NAME=FILE for one"), json_schema_extra={"metavar": "[NAME=]FILE"})
    api_key: list[str] = Field([], description=(
        "an API key clients must send as 'Authorization: Bearer KEY' on every route but /health "
        "(repeatable; every key given is valid: rotation). Visible in `ps`: prefer "
        "--api_key_file or the CHIMERA_API_KEY environment variable (keys separated by commas)"),
        json_schema_extra={"metavar": "KEY"})
    api_key_file: str | None = Field(None, description=(
        "file of API keys, one per line (blank lines and # comments skipped); adds to "
        "--api_key and CHIMERA_API_KEY"), json_schema_extra={"metavar": "FILE"})
    request_timeout_s: float | None = Field(600.0, gt=0, description=(
        "deadline of every generation request from its arrival: past it the client gets 504 "
        "(a stream: an error event) and its batch row is freed"))
    colocate_ingress: bool = Field(False, description=(
        "one model, one replica: run the HTTP front end inside the model's replica (one Ray "
        "call less per request), but a crash of that replica then cuts its requests with "
        "Serve's plain 500 and truncated streams instead of a 503 / an error event"))
    prefix_cache_bytes: int = Field(0, ge=0, description=(
        "bytes per model replica for prompt blocks that later requests sharing the prefix "
        "reuse (serve/prefix_cache.py; 0: off; models with sliding-window layers never use it)"))
    decode: str | None = Field(None, json_schema_extra={"choices": DECODE_MODES}, description=(
        "the decode step (models/decode.py): eager, static (fixed shapes) or compiled "
        "(torch.compile of the static step); default: compiled on CUDA, eager on CPU, where "
        "compiling costs more than it saves for short generations (docs/benchmarks.md)"))

    @field_validator("checkpoint", "chat_template", "api_key", mode="before")
    @classmethod
    def _split(cls, v):
        return [s for s in v.split(",") if s] if isinstance(v, str) else v

    @field_validator("decode")
    @classmethod
    def _decode(cls, v):
        if v is not None and v not in DECODE_MODES:
            raise ValueError(f"must be one of {', '.join(DECODE_MODES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.checkpoint and not self.from_sweep:
            raise ValueError("give --checkpoint PATH (repeatable) or --from_sweep DIR")
        if self.adapter is not None and (len(self.checkpoint) != 1 or self.from_sweep):
            raise ValueError("--adapter needs exactly one --checkpoint (its base) and no --from_sweep")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.colocate_ingress and (self.num_replicas > 1 or self.max_replicas is not None):
            raise ValueError("colocate_ingress: only with one replica and no autoscaling (with "
                             "several, the front end must outlive a replica to retry elsewhere)")
        return self

    @property
    def replicas(self) -> int:
        """The most replicas a model deployment may have."""
        return self.max_replicas or self.num_replicas


def add_app_arguments(p) -> list[str]:
    """AppArgs' fields as `--field` flags of an argparse parser (unspecified flags stay absent,
    so AppArgs supplies the defaults); returns the field names."""
    import argparse
    import typing
    for name, f in AppArgs.model_fields.items():
        extra = f.json_schema_extra or {}
        kind = f.annotation
        if type(None) in typing.get_args(kind):                      # X | None -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is list:
            a = p.add_argument(f"--{name}", action="append", default=argparse.SUPPRESS,
                               metavar=extra.get("metavar"), help=f.description)
        elif kind is bool:
            a = p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f.description)
        else:
            a = p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS,
                               metavar=extra.get("metavar"), choices=extra.get("choices"),
                               help=f.description)
        if f.default is not None:
            a.doc_default = f.default
    return list(AppArgs.model_fields)


def resolve_models(args: AppArgs) -> list[tuple[str, Any]]:
    """[(name, checkpoint)]; with --adapter, the adapter is checked against the base here."""
    from serve.loading import check_adapter, parse_models, sweep_models
    models = parse_models(args.checkpoint)
    if args.adapter is not None:
        check_adapter(models[0][1], args.adapter)
    if args.from_sweep:
        models += sweep_models(args.from_sweep, args.top_k)
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if args.colocate_ingress and len(models) != 1:
        raise ValueError(f"colocate_ingress: only with one model, got {len(models)}")
    if args.prefix_cache_bytes:
        for name, path in models:
            _check_prefix_cache(name, path, args.prefix_cache_bytes)
    return models


def _check_prefix_cache(name: str, path, max_bytes: int) -> None:
    """The replica's own PrefixCache check, here before Serve starts (a budget that holds no
    block would fail every replica start): the model is built on the meta device, no weights."""
    import torch

    from chimera.checkpoint import read_config
    from models import LLM, ModelConfig
    from serve.prefix_cache import PrefixCache
    with torch.device("meta"):
        model = LLM(ModelConfig.from_dict(read_config(path)))
        cache = model.new_cache(1)
    try:
        PrefixCache(cache, max_bytes, hidden_dim=model.cfg.n_embd)
    except ValueError as e:
        raise ValueError(f"--prefix_cache_bytes for model {name}: {e}") from None


def resolve_keys(args: AppArgs):
    """The API keys of --api_key, --api_key_file and CHIMERA_API_KEY (serve/auth.py)."""
    import os

    from serve.auth import load_keys
    return load_keys(args.api_key, args.api_key_file, os.environ)


def deployment_options(args: AppArgs, name: str) -> dict:
    opts: dict[str, Any] = {
        "name": f"LLMServer-{name}",
        "max_ongoing_requests": args.max_ongoing_requests or 2 * args.max_batch,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "health_check_period_s": args.health_check_period_s,
        "health_check_timeout_s": args.health_check_timeout_s,
    }
    if args.max_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": args.min_replicas if args.min_replicas is not None else 1,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests or args.max_batch}
    else:
        opts["num_replicas"] = args.num_replicas
    return opts


def resolve_templates(args: AppArgs, names: list[str]) -> dict[str, str]:
    """--chat_template values -> {model name: template source} (checked: readable, renders)."""
    from serve.chat import ChatTemplate
    out: dict[str, str] = {}
    for spec in args.chat_template:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:                          # FILE (a path may hold '=')
            name, path = "", spec
        if name and name not in names:
            raise ValueError(f"--chat_template {spec}: no model named {name!r} "
                             f"(models: {', '.join(names)})")
        source = ChatTemplate.from_file(path).source
        for n in ([name] if name else names):
            out[n] = source
    return out


def build_app(args: AppArgs | dict) -> serve.Application:
    """Typed application builder: one model -> ModelIngress (front end and engine in one
    deployment); several -> one LLMServer per model + the Ingress."""
    from serve.loading import adapter_of
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    models = resolve_models(args)
    templates = resolve_templates(args, [n for n, _ in models])
    keys = resolve_keys(args)
    threads, health = max(1, int(args.num_cpus)), args.health_check_timeout_s * 0.8
    adapter = None if args.adapter is None else str(adapter_of(args.adapter))
    front = (args.max_new_tokens_cap, args.max_body_bytes)
    if args.colocate_ingress:
        name, path = models[0]
        return ModelIngress.options(**deployment_options(args, name)).bind(
            name, str(path), args.max_batch, threads, health, *front, templates.get(name),
            adapter, keys, args.request_timeout_s, args.prefix_cache_bytes, args.decode)
    servers = {name: LLMServer.options(**deployment_options(args, name)).bind(
                   name, str(path), args.max_batch, threads, health, adapter=adapter,
                   prefix_cache_bytes=args.prefix_cache_bytes, decode=args.decode)
               for name, path in models}
    per_model = (args.max_ongoing_requests or 2 * args.max_batch) + args.max_queued_requests
    return Ingress.options(
        max_ongoing_requests=max(100, 2 * per_model * args.replicas * len(servers)),
        ray_actor_options={"num_cpus": 0}).bind(
        servers, *front, templates, keys, args.request_timeout_s, args.replicas > 1)


def _api():
    """serve.ingress's app builder, run in each replica: routes ask the replica's Frontend."""
    return make_api(lambda: serve.get_replica_context().servable_object.front)


@serve.deployment
@serve.ingress(_api)
class Ingress:
    """The front end for several models, each an LLMServer deployment behind a handle."""
    def __init__(self, models: dict, max_new_tokens_cap: int, max_body_bytes: int,
                 templates: dict[str, str] | None = None, keys: ApiKeys = ApiKeys(),
                 timeout_s: float | None = None, retry: bool = False):
        self.front = Frontend({n: Remote(h, retry) for n, h in models.items()},
                              max_new_tokens_cap, max_body_bytes, templates, keys, timeout_s)


@serve.deployment
@serve.ingress(_api)
class ModelIngress:
    """One model: its front end and its engine in one replica (no hop between them)."""
    def __init__(self, name: str, checkpoint: str, max_batch: int, threads: int,
                 health_timeout_s: float, max_new_tokens_cap: int, max_body_bytes: int,
                 template: str | None = None, adapter: str | None = None,
                 keys: ApiKeys = ApiKeys(), timeout_s: float | None = None,
                 prefix_cache_bytes: int = 0, decode: str | None = None):
        self.server = ModelServer(name, checkpoint, max_batch, threads, health_timeout_s,
                                  adapter=adapter, prefix_cache_bytes=prefix_cache_bytes,
                                  decode=decode)
        self.front = Frontend({name: Local(self.server)}, max_new_tokens_cap, max_body_bytes,
                              {name: template} if template else None, keys, timeout_s)

    async def check_health(self) -> None:
        await self.server.check_health()
