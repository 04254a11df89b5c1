"""The HTTP front end: OpenAI-compatible routes over one or more model servers.

    api = make_api(get_front)       # FastAPI app; get_front() -> the replica's Frontend

Routes (README "Serving"): POST /generate, POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /tokenizer_info, POST /tokenize, POST /detokenize. With API
keys configured every route but /health needs `Authorization: Bearer <key>` (serve/auth.py;
401 otherwise). The request's `model` field (a query parameter for GET /tokenizer_info) picks
the model (default: the first one). A Frontend talks to each model through a backend of
serve/backends.py: Remote (a model deployment behind a DeploymentHandle, retried once on
another replica when its replica dies) or Local (the ModelServer inside this very replica).
Response shapes are serve/openai.py's; request bodies serve/schemas.py's.

Streams send one SSE event per generated token (`data: {...}`), then `data: [DONE]`; a token
whose text is held back (a possible stop string, an incomplete character) sends an event with
empty text, so events = tokens, the count chat benchmarks rely on. A stream that cannot finish
(its replica died, its deadline passed) ends with one error event `data: {"error": {...}}`,
the body a non-streamed request would get, and no [DONE]: a client can always tell a fault
from the end. Generation requests have a deadline from their arrival (`timeout_s`): past it
a 504, or that error event, and the request's calls are closed like a disconnect's.

A client that leaves (Serve cancels the request: asyncio.CancelledError) gives up its model
calls wherever it is: a backend call being awaited cancels the model server's call (Serve does
not: a handle call already on a replica runs on when its caller is cancelled), and an opened
stream belongs to its response (Stream), which closes it however the response ends — even
cancelled before its first byte, when the body's own code never ran. The model server then
frees the row at the engine's next step (serve/driver.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

import serve.openai as oai
from serve.auth import ApiKeys, RequireKey
from serve.backends import RETRY_AFTER_S, timed_out, unavailable
from serve.chat import ChatTemplate
from serve.messages import Delta, Done, Error, Generation, Prompt
from serve.schemas import (ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                           TokenizeRequest, error_body, validation_error_body)

log = logging.getLogger("ray.serve")

STALL_GRACE_S = 1.0     # past its deadline, a stream whose client stopped reading is cut


class Stream(StreamingResponse):
    """An SSE response that owns the backend streams it sends: it closes them however it ends
    — sent to the end, the client gone, cancelled before its body started (a body generator
    that never started never runs its own finally), or, `STALL_GRACE_S` past its deadline,
    stuck sending to a client that stopped reading (the body, which ends a stream at the
    deadline with an error event, is not even asked then). The body is closed first (its
    finally stops whatever reads the streams), then the streams."""
    def __init__(self, body, backend, gens: list, deadline: float | None = None):
        super().__init__(body, media_type="text/event-stream")
        self.backend, self.gens, self.deadline = backend, gens, deadline

    async def __call__(self, scope, receive, send) -> None:
        try:
            if self.deadline is None:
                await super().__call__(scope, receive, send)
            else:
                async with asyncio.timeout_at(self.deadline + STALL_GRACE_S):
                    await super().__call__(scope, receive, send)
        except TimeoutError:
            log.warning("a stream's client stopped reading; cut at its deadline")
        finally:
            await self.close()

    async def close(self) -> None:
        try:
            await self.body_iterator.aclose()
        finally:
            for g in self.gens:
                await self.backend.close(g)


def _err(status: int, message: str, param: str | None = None, code: str | None = None,
         type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _answer(msg: Error) -> JSONResponse:
    retry = RETRY_AFTER_S.get(msg.code) if msg.status == 503 else None
    return JSONResponse(msg.body(), status_code=msg.status,
                        headers={"Retry-After": str(retry)} if retry else None)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()


class Frontend:
    """`keys`: who may call (serve/auth.py; empty: anyone). `timeout_s`: every generation
    request's deadline, from its arrival (None: none) — past it the client gets 504, or a
    stream an error event, and the request's batch row is freed."""
    def __init__(self, backends: dict[str, Any], max_new_tokens_cap: int, max_body_bytes: int,
                 templates: dict[str, str] | None = None, keys: ApiKeys = ApiKeys(),
                 timeout_s: float | None = None):
        self.models, self.default = backends, next(iter(backends))
        self.keys, self.timeout_s = keys, timeout_s
        self.cap, self.max_body = max_new_tokens_cap, max_body_bytes
        self.templates = {n: ChatTemplate((templates or {}).get(n) or ChatTemplate.default().source,
                                          f"the chat template of {n}") for n in backends}
        self.created = int(time.time())
        self._limits: dict[str, int] = {}                       # model -> block_size

    # --- deadlines ------------------------------------------------------------------------------
    def _deadline(self) -> float | None:
        return None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s

    @staticmethod
    async def _within(aw, deadline: float | None):
        """`await aw`, or TimeoutError at the deadline (aw cancelled: its calls are closed)."""
        if deadline is None:
            return await aw
        return await asyncio.wait_for(aw, max(0.0, deadline - asyncio.get_running_loop().time()))

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

    def _model(self, name: str | None) -> tuple[str, Any] | JSONResponse:
        name = name or self.default
        if name not in self.models:
            return _err(404, f"model {name!r} does not exist; available: {', '.join(self.models)}",
                        "model", "model_not_found")
        return name, self.models[name]

    def _route(self, req, param: str, limit: int) -> tuple[str, Any] | JSONResponse:
        if limit > self.cap:
            return _err(400, f"{param}: {limit} is over this server's cap of {self.cap}",
                        param, "max_tokens_exceeded")
        return self._model(req.model)

    # --- routes ---------------------------------------------------------------------------------
    async def health(self):
        try:
            info = await asyncio.wait_for(asyncio.gather(
                *(b.call("describe") for b in self.models.values())), 10)
        except Exception as e:                                  # noqa: BLE001 - report, not crash
            return _err(503, f"a model is unavailable: {type(e).__name__}", code="unavailable",
                        type_="server_error")
        return {"status": "ok", "models": {i["id"]: {k: i[k] for k in ("running", "queued", "device")}
                                           for i in info}}

    async def list_models(self):
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created,
                                            "owned_by": "chimera"} for n in self.models]}

    async def _tokenizer_call(self, name, method: str, *args) -> tuple[str, Any] | JSONResponse:
        """(model name, what the model server's `method` returned), or the error response."""
        routed = self._model(name)
        if isinstance(routed, JSONResponse):
            return routed
        try:
            out = await routed[1].call(method, *args)
        except Exception as e:                                  # noqa: BLE001 - replica died
            return _answer(unavailable(e))
        return _answer(out) if isinstance(out, Error) else (routed[0], out)

    async def tokenizer_info(self, request: Request):
        extra = set(request.query_params) - {"model"}
        if extra:
            return _err(400, f"{sorted(extra)[0]}: unknown query parameter (only 'model')",
                        sorted(extra)[0], "unknown_parameter")
        got = await self._tokenizer_call(request.query_params.get("model"), "tokenizer_info")
        if isinstance(got, JSONResponse):
            return got
        return {**got[1], "chat_template": self.templates[got[0]].source}

    async def tokenize(self, request: Request):
        req = await self._parse(request, TokenizeRequest)
        if isinstance(req, JSONResponse):
            return req
        got = await self._tokenizer_call(req.model, "tokenize", req.prompt)
        if isinstance(got, JSONResponse):
            return got
        block = await self._block(got[0])
        if isinstance(block, JSONResponse):
            return block
        return {"tokens": got[1], "count": len(got[1]), "max_model_len": block}

    async def _block(self, name: str) -> int | JSONResponse:
        """The model's block_size (asked once)."""
        if name not in self._limits:
            info = await self._tokenizer_call(name, "tokenizer_info")
            if isinstance(info, JSONResponse):
                return info
            self._limits[name] = info[1]["max_model_len"]
        return self._limits[name]

    async def detokenize(self, request: Request):
        req = await self._parse(request, DetokenizeRequest)
        if isinstance(req, JSONResponse):
            return req
        got = await self._tokenizer_call(req.model, "detokenize", req.tokens)
        return got if isinstance(got, JSONResponse) else {"prompt": got[1]}

    async def generate(self, request: Request):
        t0 = time.perf_counter()
        req = await self._parse(request, GenerateRequest)
        if isinstance(req, JSONResponse):
            return req
        routed = self._route(req, "max_new_tokens", req.max_new_tokens)
        if isinstance(routed, JSONResponse):
            return routed
        name, backend = routed
        call = Generation(req.prompt, req.sampling())

        def summary(m: Done, text: str) -> dict:
            return {"model": name, "text": text, "prompt_tokens": m.prompt_tokens,
                    "completion_tokens": m.completion_tokens, "finish_reason": m.finish_reason,
                    "timings": {"ttft_s": m.ttft_s, "tokens_per_s": m.tokens_per_s,
                                "total_s": time.perf_counter() - t0}}
        deadline = self._deadline()
        try:
            if not req.stream:
                out = await self._within(backend.complete(call), deadline)
                return _answer(out) if isinstance(out, Error) else summary(out, out.text)
            first, gen = await self._within(backend.open(call), deadline)
        except TimeoutError:
            return _answer(timed_out(self.timeout_s))
        if isinstance(first, Error):
            await backend.close(gen)
            return _answer(first)

        async def events():
            while True:
                try:
                    m = await self._within(gen.__anext__(), deadline)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    m = timed_out(self.timeout_s)
                except Exception as e:                          # noqa: BLE001 - replica died
                    m = unavailable(e)
                if isinstance(m, Error):            # ends the stream: no [DONE]
                    yield _sse(m.body())
                    return
                # every event: the new text; the last one also the summary (text = delta)
                yield _sse({"text": m.text, "tokens": m.tokens} if not isinstance(m, Done)
                           else {**summary(m, ""), "text": m.text, "tokens": m.tokens})
            yield _sse("[DONE]")
        return Stream(events(), backend, [gen], deadline)

    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        if req.stream_options is not None and not req.stream:
            return _err(400, "stream_options: only with stream=true", "stream_options", "invalid_value")
        if req.max_tokens == 0 and not req.echo:
            return _err(400, "max_tokens: 0 needs echo=true (it scores the prompt only)",
                        "max_tokens", "invalid_value")
        routed = self._route(req, "max_tokens", req.max_tokens)
        if isinstance(routed, JSONResponse):
            return routed
        calls = [Generation(p, req.sampling(j), req.logprobs, req.echo, req.max_tokens > 0)
                 for p in req.prompts() for j in range(req.n)]
        shape = oai.Completions(routed[0], req)
        return await self._run(routed[1], calls, shape, req.stream, req.include_usage, req.n)

    async def chat_completions(self, request: Request):
        req = await self._parse(request, ChatRequest)
        if isinstance(req, JSONResponse):
            return req
        if req.stream_options is not None and not req.stream:
            return _err(400, "stream_options: only with stream=true", "stream_options", "invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            return _err(400, "top_logprobs: needs logprobs=true", "top_logprobs", "invalid_value")
        if None not in (req.max_tokens, req.max_completion_tokens) \
                and req.max_tokens != req.max_completion_tokens:
            return _err(400, "max_completion_tokens: differs from max_tokens (give one of them)",
                        "max_completion_tokens", "invalid_value")
        routed = self._route(req, "max_completion_tokens" if req.max_completion_tokens
                             else "max_tokens", req.limit or 0)
        if isinstance(routed, JSONResponse):
            return routed
        if req.limit is None:                   # OpenAI's default: no limit but the context
            block = await self._block(routed[0])
            if isinstance(block, JSONResponse):
                return block
            req = req.model_copy(update={"max_completion_tokens": min(self.cap, block)})
        try:
            prompt = self.templates[routed[0]].render(
                [{"role": m.role, "content": m.text(), "name": m.name} for m in req.messages])
        except ValueError as e:
            return _err(400, f"messages: {e}", "messages", "chat_template_error")
        calls = [Generation(prompt, req.sampling(j), req.k) for j in range(req.n)]
        shape = oai.Chat(routed[0], req)
        return await self._run(routed[1], calls, shape, req.stream, req.include_usage, req.n)

    # --- running OpenAI requests ----------------------------------------------------------------
    async def _run(self, backend, calls: list[Generation], shape, stream: bool,
                   include_usage: bool, n: int):
        deadline = self._deadline()
        try:
            if not stream:
                outs = await self._within(asyncio.gather(*(backend.complete(c) for c in calls)),
                                          deadline)
                bad = next((o for o in outs if isinstance(o, Error)), None)
                if bad:
                    return _answer(bad)
                # plain JSON types already: skip FastAPI's jsonable_encoder, which walks every
                # value (seconds for an echo body of a few thousand scored tokens on this CPU)
                return JSONResponse(shape.response(outs, oai.usage(outs, n)))
            opened = await self._within(self._open_all(backend, calls), deadline)
        except TimeoutError:
            return _answer(timed_out(self.timeout_s))
        bad = next((f for f, _ in opened if isinstance(f, Error)), None)
        if bad:
            for _, g in opened:
                await backend.close(g)
            return _answer(bad)
        return Stream(self._merged(opened, shape, include_usage, n, deadline), backend,
                      [g for _, g in opened], deadline)

    @staticmethod
    async def _open_all(backend, calls: list[Generation]) -> list[tuple[Any, Any]]:
        """backend.open() of every call at once; cancelled, it closes those already open (each
        open() still running closes its own)."""
        tasks = [asyncio.ensure_future(backend.open(c)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    await backend.close(t.result()[1])
            raise

    async def _merged(self, opened, shape, include_usage: bool, n: int,
                      deadline: float | None = None):
        """Interleave the choices' streams into SSE chunks (one per token), then [DONE]; a
        failure (a replica died, the deadline passed) ends it with an error event instead."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for m in gen:
                    await q.put((i, m))
            except Exception as e:                              # noqa: BLE001 - ends the stream
                await q.put((i, unavailable(e)))
        tasks = [asyncio.create_task(pump(i, g)) for i, (_, g) in enumerate(opened)]
        finals: list[Done | None] = [None] * len(opened)
        try:
            while any(f is None for f in finals):
                try:
                    i, m = await self._within(q.get(), deadline)
                except TimeoutError:
                    i, m = -1, timed_out(self.timeout_s)
                if isinstance(m, Error):
                    yield _sse(m.body())
                    break
                if isinstance(m, Prompt):
                    yield _sse(shape.prompt_chunk(i, m))
                    continue
                for chunk in shape.chunks(i, m):
                    yield _sse(chunk)
                if isinstance(m, Done):
                    finals[i] = m
            else:
                if include_usage:
                    yield _sse(shape.usage_chunk(oai.usage(finals, n)))
                yield _sse("[DONE]")
        finally:                            # the response (Stream) then closes the streams
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def make_api(get_front: Callable[[], Frontend]) -> FastAPI:
    """The FastAPI app; every route asks get_front() for this replica's Frontend."""
    api = FastAPI(title="Chimera", description="KV-cached generation with continuous batching")
    api.add_middleware(RequireKey, keys=lambda: get_front().keys)
    for method, path, name in (("get", "/health", "health"), ("get", "/v1/models", "list_models"),
                               ("get", "/tokenizer_info", "tokenizer_info"),
                               ("post", "/tokenize", "tokenize"), ("post", "/detokenize", "detokenize"),
                               ("post", "/generate", "generate"),
                               ("post", "/v1/completions", "completions"),
                               ("post", "/v1/chat/completions", "chat_completions")):
        takes_request = name not in ("health", "list_models")

        def route(name=name, takes_request=takes_request):
            if takes_request:
                async def endpoint(request: Request):
                    return await getattr(get_front(), name)(request)
            else:
                async def endpoint():
                    return await getattr(get_front(), name)()
            endpoint.__name__ = name
            return endpoint
        getattr(api, method)(path)(route())
    return api
