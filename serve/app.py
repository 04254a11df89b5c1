"""The Serve application: a FastAPI ingress in front of one LLMServer deployment per model.

    serve run serve.app:build_app checkpoint=runs/my_run          # typed builder (AppArgs)
    python jobs/serve.py --checkpoint runs/my_run --port 8000     # the same, plus a URL

Routes: POST /generate, POST /v1/completions (OpenAI), GET /v1/models, GET /health.
The request's `model` field picks the model (default: the first one). One deployment per
model, not multiplexing: every model keeps its own KV cache and running batch resident (a
multiplexed replica would evict and reload weights on the request path), gets its own replica
count and health check, and its metrics carry its name. Serving the K best trials of a sweep
means a handful of models, each worth its own replicas.

Overload: each model deployment takes `max_ongoing_requests` (default 2 x max_batch: a full
batch plus as many waiting in the engine) and queues `max_queued_requests` more; past that
the handle raises BackPressureError and the client gets 503 at once. Request bodies over
`max_body_bytes` get 413; max tokens over `max_new_tokens_cap` get 400.
"""

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve.messages import Delta, Done, Error, Generation
from serve.schemas import CompletionRequest, GenerateRequest, error_body, validation_error_body
from serve.server import LLMServer

api = FastAPI(title="Chimera", description="KV-cached generation with continuous batching")
OVERLOADED = Error(503, "the server is overloaded; retry later", "overloaded_error", None, "overloaded")


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

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _split(cls, v):
        return [s for s in v.split(",") if s] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self):
        if not self.checkpoint and not self.from_sweep:
            raise ValueError("give --checkpoint PATH (repeatable) or --from_sweep DIR")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


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
        else:
            a = p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS,
                               metavar=extra.get("metavar"), help=f.description)
        if f.default is not None:
            a.doc_default = f.default
    return list(AppArgs.model_fields)


def resolve_models(args: AppArgs) -> list[tuple[str, Any]]:
    from serve.loading import parse_models, sweep_models
    models = parse_models(args.checkpoint)
    if args.from_sweep:
        models += sweep_models(args.from_sweep, args.top_k)
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return models


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


def build_app(args: AppArgs | dict) -> serve.Application:
    """Typed application builder: one LLMServer per model + the ingress."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    servers = {name: LLMServer.options(**deployment_options(args, name)).bind(
                   name, str(path), args.max_batch, max(1, int(args.num_cpus)),
                   args.health_check_timeout_s * 0.8)
               for name, path in resolve_models(args)}
    per_model = (args.max_ongoing_requests or 2 * args.max_batch) + args.max_queued_requests
    replicas = args.max_replicas or args.num_replicas
    return Ingress.options(max_ongoing_requests=max(100, 2 * per_model * replicas * len(servers)),
                           ray_actor_options={"num_cpus": 0}).bind(
        servers, args.max_new_tokens_cap, args.max_body_bytes)


def _err(status: int, message: str, param: str | None = None, code: str | None = None,
         type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _cancel(gen) -> None:
    """Best-effort cancel of a handle call (DeploymentResponseGenerator.cancel re-raises the
    call's own error, e.g. BackPressureError; the call is over then anyway)."""
    try:
        gen.cancel()
    except Exception:                                           # noqa: BLE001
        pass


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict, max_new_tokens_cap: int, max_body_bytes: int):
        self.models, self.default = models, next(iter(models))
        self.cap, self.max_body = max_new_tokens_cap, max_body_bytes
        self.created = int(time.time())

    # --- input ----------------------------------------------------------------------------------
    async def _parse(self, request: Request, schema: type[BaseModel]) -> BaseModel | JSONResponse:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return _err(413, f"request body over {self.max_body} bytes", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return _err(413, f"request body over {self.max_body} bytes", code="body_too_large")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return _err(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                        code="invalid_encoding")
        try:
            return schema.model_validate_json(text)
        except ValidationError as e:
            return JSONResponse(validation_error_body(e), status_code=400)

    def _route(self, req) -> tuple[str, Any] | JSONResponse:
        name = req.model or self.default
        if name not in self.models:
            return _err(404, f"model {name!r} does not exist; available: {', '.join(self.models)}",
                        "model", "model_not_found")
        limit = getattr(req, "max_tokens", None) or getattr(req, "max_new_tokens", None)
        if limit > self.cap:
            param = "max_tokens" if hasattr(req, "max_tokens") else "max_new_tokens"
            return _err(400, f"{param}: {limit} is over this server's cap of {self.cap}",
                        param, "max_tokens_exceeded")
        return name, self.models[name]

    # --- calls into the model deployments -------------------------------------------------------
    async def _complete(self, handle, call: Generation) -> Done | Error:
        try:
            return await handle.complete.remote(call)
        except BackPressureError:
            return OVERLOADED
        except Exception as e:                                  # noqa: BLE001 - replica died
            return Error(503, f"the model is unavailable ({type(e).__name__}); retry later",
                         "server_error", None, "unavailable")

    async def _open_stream(self, handle, call: Generation):
        """(first message, generator) — the first message is awaited so that errors and
        overload become a proper status code before any byte of the stream is sent."""
        gen = handle.options(stream=True).generate.remote(call)
        try:
            first = await gen.__anext__()
        except BackPressureError:           # never assigned: nothing to cancel
            first = OVERLOADED
        return first, gen

    @staticmethod
    def _as_response(msg: Error) -> JSONResponse:
        return JSONResponse(msg.body(), status_code=msg.status)

    # --- routes ---------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self):
        try:
            info = await asyncio.wait_for(asyncio.gather(
                *(h.describe.remote() for h in self.models.values())), 10)
        except Exception as e:                                  # noqa: BLE001 - report, not crash
            return _err(503, f"a model is unavailable: {type(e).__name__}", code="unavailable",
                        type_="server_error")
        return {"status": "ok", "models": {i["id"]: {k: i[k] for k in ("running", "queued", "device")}
                                           for i in info}}

    @api.get("/v1/models")
    async def list_models(self):
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created,
                                            "owned_by": "chimera"} for n in self.models]}

    @api.post("/generate")
    async def generate(self, request: Request):
        t0 = time.perf_counter()
        req = await self._parse(request, GenerateRequest)
        if isinstance(req, JSONResponse):
            return req
        routed = self._route(req)
        if isinstance(routed, JSONResponse):
            return routed
        name, handle = routed
        call = Generation(req.prompt, req.sampling())

        def summary(m: Done, text: str) -> dict:
            return {"model": name, "text": text, "prompt_tokens": m.prompt_tokens,
                    "completion_tokens": m.completion_tokens, "finish_reason": m.finish_reason,
                    "timings": {"ttft_s": m.ttft_s, "tokens_per_s": m.tokens_per_s,
                                "total_s": time.perf_counter() - t0}}
        if not req.stream:
            out = await self._complete(handle, call)
            return self._as_response(out) if isinstance(out, Error) else summary(out, out.text)
        first, gen = await self._open_stream(handle, call)
        if isinstance(first, Error):
            return self._as_response(first)

        async def events():
            try:
                async for m in gen:
                    if isinstance(m, Error):
                        yield _sse(m.body())
                        break
                    # every event: the new text; the last one also the summary (text = delta)
                    yield _sse({"text": m.text, "tokens": m.tokens} if isinstance(m, Delta)
                               else {**summary(m, ""), "text": m.text, "tokens": m.tokens})
                yield _sse("[DONE]")
            finally:
                _cancel(gen)
        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        routed = self._route(req)
        if isinstance(routed, JSONResponse):
            return routed
        name, handle = routed
        params = [req.sampling(j) for j in range(req.n)]
        calls = [Generation(p, params[j]) for p in req.prompts() for j in range(req.n)]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": name}

        def usage(finals: list[Done]) -> dict:
            p = sum(f.prompt_tokens for f in finals[::req.n])      # each prompt counted once
            c = sum(f.completion_tokens for f in finals)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if not req.stream:
            outs = await asyncio.gather(*(self._complete(handle, c) for c in calls))
            bad = next((o for o in outs if isinstance(o, Error)), None)
            if bad:
                return self._as_response(bad)
            return {**head, "choices": [{"index": i, "text": o.text, "logprobs": None,
                                         "finish_reason": o.finish_reason}
                                        for i, o in enumerate(outs)], "usage": usage(outs)}
        opened = await asyncio.gather(*(self._open_stream(handle, c) for c in calls))
        bad = next((f for f, _ in opened if isinstance(f, Error)), None)
        if bad:
            for _, g in opened:
                _cancel(g)
            return self._as_response(bad)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._merged(opened, head, usage, include_usage),
                                 media_type="text/event-stream")

    async def _merged(self, opened, head, usage, include_usage: bool):
        """Interleave the choices' streams into OpenAI SSE chunks, then `data: [DONE]`."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for m in gen:
                    await q.put((i, m))
            except Exception as e:                              # noqa: BLE001 - ends the stream
                await q.put((i, Error(500, f"generation failed: {type(e).__name__}", "server_error")))
        tasks = [asyncio.create_task(pump(i, g)) for i, (_, g) in enumerate(opened)]
        finals: list[Done | None] = [None] * len(opened)
        try:
            while any(f is None for f in finals):
                i, m = await q.get()
                if isinstance(m, Error):
                    yield _sse(m.body())
                    break
                done = isinstance(m, Done)
                if m.text or done:
                    yield _sse({**head, "choices": [{"index": i, "text": m.text, "logprobs": None,
                                                     "finish_reason": m.finish_reason if done else None}]})
                if done:
                    finals[i] = m
            else:
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(finals)})
                yield _sse("[DONE]")
        finally:
            for t in tasks:
                t.cancel()
            for _, g in opened:
                _cancel(g)
