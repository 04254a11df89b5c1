"""A request given up at any point frees its KV-cache row by the engine's next step, on CPU
without Ray and without timing luck (requests ask for a million tokens, so a row that is not
freed is never freed by finishing):

- the engine: cancelled while queued, waiting for a row, just prefilled, decoding, or while a
  step runs (from the event loop's thread) -> its abort output and its free row come with the
  very next step;
- the asyncio driver: the consumer never reads, is cancelled while it waits, or leaves after
  the first output;
- the HTTP front end, driven as an ASGI app (serve/frontend.py), with the in-replica backend
  (Local) and a Serve-like remote one (a handle whose call runs on in its "replica" until it is
  cancelled, as Ray Serve's does): the client leaves while the first message travels, before
  the response's first byte (its body never started), or mid-stream, on /generate and on a
  two-choice /v1/completions.
"""
from __future__ import annotations

import asyncio
import json
import string

import pytest
import torch

from chimera.checkpoint import save_checkpoint
from chimera.data.tokenizers import get_tokenizer
from models.sampling import SamplingParams
from serve.driver import EngineDriver
from serve.engine import Engine
from serve.backends import Local, Remote
from serve.frontend import Frontend, make_api
from test_generation import build

FOREVER = 10 ** 6                                   # tokens: a leaked row never finishes


def params() -> SamplingParams:
    return SamplingParams(FOREVER, 0.0)


# --- the engine -----------------------------------------------------------------------------------
def _cancel_mid_step(e: Engine, rid: str) -> None:
    """Make the next step's forward pass cancel `rid` (the driver's thread does it while the
    engine thread runs the step)."""
    run = e.runner.run

    def run_and_cancel(*a, **kw):
        e.runner.run = run
        e.cancel(rid)
        return run(*a, **kw)
    e.runner.run = run_and_cancel


@pytest.mark.parametrize("when", ["queued", "waiting_for_a_row", "prefilled", "decoding",
                                  "during_a_step"])
def test_a_cancelled_request_leaves_at_the_next_step(when):
    e = Engine(build(attn="gqa", n_layer=1), max_batch=2)
    e.add("other", [5, 6], params())                # keeps running throughout
    if when == "waiting_for_a_row":
        e.add("full", [7], params())
        e.step()                                    # other + full hold both rows
    e.add("x", [1, 2, 3], params())
    e.add("next", [4], params())                    # takes the row x leaves
    if when == "waiting_for_a_row":
        e.step()
        assert e.num_waiting == 2
        e.cancel("full")                            # frees the row `next` takes, not x
    steps = {"queued": 0, "waiting_for_a_row": 0, "prefilled": 1, "decoding": 4, "during_a_step": 2}
    for _ in range(steps[when]):
        e.step()
    if when == "during_a_step":
        _cancel_mid_step(e, "x")
        assert "x" in {o.request_id for o in e.step() if not o.finish_reason}   # still ran
    else:
        e.cancel("x")
    outs = {o.request_id: o for o in e.step()}
    assert outs["x"].finish_reason == "abort" and outs["x"].token_ids == []
    rows = {s.rid for s in e.scheduler.running}
    assert "x" not in rows and "x" not in {s.rid for s in e.scheduler.waiting}
    if when != "waiting_for_a_row":
        assert rows == {"other", "next"}            # x's row is reused in the same step
    for rid in list(rows):
        e.cancel(rid)
    e.step()
    assert not e.has_work() and e.num_running == e.num_waiting == 0


# --- a model server on a tiny random checkpoint ----------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    m = build(attn="gqa", n_layer=1)
    tok = get_tokenizer("char", vocab=string.ascii_letters)      # 52 chars, model vocab 53
    return save_checkpoint(tmp_path_factory.mktemp("cancel") / "ckpt", m,
                           model_config=m.cfg.to_dict(), tokenizer=tok.to_dict())


@pytest.fixture
def server(checkpoint):
    from serve.server import ModelServer
    return ModelServer("m", str(checkpoint), max_batch=2, metrics=False)


async def _idle(server, within_s: float = 20.0) -> None:
    """Until the engine holds no request (a row that is never freed fails here)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while server.driver.engine.has_work() and loop.time() < end:
        await asyncio.sleep(0.01)
    assert server.describe()["running"] == server.describe()["queued"] == 0


async def _busy(server) -> None:
    while not server.driver.engine.num_running:
        await asyncio.sleep(0.001)


# --- the driver -----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["never_read", "cancelled_waiting", "left_after_one"])
def test_a_driver_consumer_that_leaves_frees_the_row(server, how):
    d = server.driver

    async def main():
        if how == "never_read":
            d.submit("x", [1, 2], params())
            await _busy(server)
            d.cancel("x")
        elif how == "cancelled_waiting":
            d.submit("x", [1, 2], params())
            gen = d.results("x")
            t = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        else:
            gen = d.stream("x", [1, 2], params())
            await gen.__anext__()
            await gen.aclose()
        await _idle(server)
    asyncio.run(main())


# --- the front end --------------------------------------------------------------------------------
class _Call:
    """A Serve-like handle call: it runs in its own task (the "replica") until it finishes or is
    cancelled — dropping or cancelling the caller does not stop it — and its messages cross a
    "network" that holds each one until `deliver` is set."""
    def __init__(self, run, deliver: asyncio.Event, stream: bool):
        self.q: asyncio.Queue = asyncio.Queue()
        self.deliver, self.stream = deliver, stream
        self.task = asyncio.ensure_future(self._replica(run))

    async def _replica(self, run):
        if self.stream:
            async for m in run:
                await self.q.put(m)
            await self.q.put(StopAsyncIteration)
        else:
            await self.q.put(await run)

    def cancel(self):
        self.task.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        await self.deliver.wait()
        m = await self.q.get()
        if m is StopAsyncIteration:
            raise StopAsyncIteration
        return m

    def __await__(self):
        return self.__anext__().__await__()


class _Handle:
    """DeploymentHandle-shaped: .complete.remote(x), .options(stream=True).generate.remote(x)."""
    def __init__(self, server, deliver: asyncio.Event, stream: bool = False):
        self.server, self.deliver, self.stream = server, deliver, stream

    def options(self, stream: bool = False):
        return _Handle(self.server, self.deliver, stream)

    def __getattr__(self, method):
        handle = self

        class _Method:
            @staticmethod
            def remote(*args):
                return _Call(getattr(handle.server, method)(*args), handle.deliver, handle.stream)
        return _Method


ROUTES = {"generate": ("/generate", {"prompt": "abc", "max_new_tokens": FOREVER, "stream": True}),
          "completions_n2": ("/v1/completions", {"model": "m", "prompt": "abc", "n": 2,
                                                 "max_tokens": FOREVER, "stream": True}),
          "generate_plain": ("/generate", {"prompt": "abc", "max_new_tokens": FOREVER})}


def asgi_request(path: str, raw: bytes):
    """(scope, receive) of a POST of `raw` to `path`: the body once, then a client that never
    says it left (it stays until the request is cancelled)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()                # the client never says it left: cancelled
    return scope, receive


async def _client_leaves(server, backend: str, route: str, when: str) -> None:
    """POST `route` to the front end's ASGI app and cancel the request (Serve's answer to a
    client that disconnects) at `when`; then the engine must drain."""
    deliver = asyncio.Event()
    if when != "first_message_in_flight":
        deliver.set()
    b = Local(server) if backend == "local" else Remote(_Handle(server, deliver))
    app = make_api(lambda: Frontend({"m": b}, FOREVER, 1 << 16))
    path, body = ROUTES[route]
    raw = json.dumps(body).encode()
    scope, receive = asgi_request(path, raw)
    sent: list[dict] = []
    stalled = asyncio.Event()                       # the send the test cancels the request in
    stall_at = {"first_message_in_flight": None, "before_the_first_byte": "http.response.start",
                "mid_stream": "http.response.body"}[when]
    async def send(msg):
        sent.append(msg)
        if msg["type"] == stall_at and (stall_at != "http.response.body"
                                        or sum(m["type"] == stall_at for m in sent) >= 3):
            stalled.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(app(scope, receive, send))
    if when == "first_message_in_flight":
        await _busy(server)                         # the call runs; its Start has not arrived
    else:
        await stalled.wait()
    assert server.describe()["running"] >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _idle(server)
    if when == "first_message_in_flight":
        assert sent == []
    elif when == "before_the_first_byte":
        assert [m["type"] for m in sent] == ["http.response.start"] and sent[0]["status"] == 200


CASES = [(b, r, w) for b in ("local", "remote") for r in ROUTES
         for w in ("first_message_in_flight", "before_the_first_byte", "mid_stream")
         if not (r == "generate_plain" and w != "first_message_in_flight")
         and not (b == "local" and w == "first_message_in_flight" and r != "generate_plain")]


@pytest.mark.parametrize("backend,route,when", CASES)
def test_a_client_that_leaves_at_any_point_frees_the_rows(server, backend, route, when):
    """(Local's first message comes from this very task, so it is never "in flight"; its
    non-streamed call is cancelled inside the model server.)"""
    asyncio.run(_client_leaves(server, backend, route, when))
