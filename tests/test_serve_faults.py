"""Faults and strangers, on CPU without Ray: the HTTP front end (serve/frontend.py) driven as an
ASGI app over a real in-process model server, through a Serve-like handle whose "replicas" die
when the test says (before their first message, or after some messages):

- a call whose replica died is retried once, with its seed fixed first (so the retry draws the
  same tokens as an undisturbed run); twice dead, or one replica, is a 503 with Retry-After;
  the model server raising is a 500 and no retry;
- a stream is retried only before its first message; cut later, it ends with one error event
  (the OpenAI error body) and no [DONE], on /generate, /v1/completions (n=2) and chat;
- a deadline: 504 (non-streamed, or a stream that has not begun), an error event mid-stream,
  and a client that stopped reading is cut; each time the batch row is freed;
- API keys (serve/auth.py): 401 with an OpenAI error body on every route but /health without a
  key or with a wrong one, several keys valid at once, keys from flags, a file and the
  environment, bad keys refused without being echoed.
tests/test_serve_faults_ray.py does the same against real replicas killed with SIGKILL.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray.exceptions import ActorDiedError

from serve.auth import ENV_VAR, load_keys
from serve.backends import Local, Remote
from serve.frontend import Frontend, make_api
from test_serve_cancel import FOREVER, _idle, asgi_request, checkpoint, server  # noqa: F401

TOKENS = 12
LETTERS = {"m": "{% for m in messages %}{{ m.content }}{% endfor %}"}   # the vocab is letters only


def _front(backend, **kw) -> Frontend:
    return Frontend({"m": backend}, FOREVER, 1 << 16, LETTERS, **kw)


# --- a handle whose replicas die on cue -----------------------------------------------------------
class _Dies:
    """What one call's replica does: "before" dies before its first message, an int k dies
    after sending k messages; None serves the call through."""
    def __init__(self, run, fate, stream: bool):
        self.run, self.fate, self.stream = run, fate, stream

    def cancel(self):
        if hasattr(self.run, "aclose"):
            asyncio.ensure_future(self.run.aclose())
        elif hasattr(self.run, "close"):
            self.run.close()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.fate == "before" or (isinstance(self.fate, int) and self.fate <= 0):
            self.cancel()                           # the replica is gone: its call with it
            raise ActorDiedError()
        if isinstance(self.fate, int):
            self.fate -= 1
        return await self.run.__anext__()

    def __await__(self):
        async def whole():
            if self.fate is not None:
                self.run.close()
                raise ActorDiedError()
            return await self.run
        return whole().__await__()


class _Flaky:
    """DeploymentHandle-shaped; call i meets fates[i] (past the list: served). `calls` keeps
    every Generation sent."""
    def __init__(self, server, fates: list, stream: bool = False, calls: list | None = None):
        self.server, self.fates, self.stream = server, fates, stream
        self.calls = [] if calls is None else calls

    def options(self, stream: bool = False):
        return _Flaky(self.server, self.fates, stream, self.calls)

    def __getattr__(self, method):
        handle = self

        class _Method:
            @staticmethod
            def remote(*args):
                if method in ("complete", "generate"):
                    handle.calls.append(args[0])
                i = len(handle.calls) - 1
                fate = handle.fates[i] if method in ("complete", "generate") and \
                    i < len(handle.fates) else None
                if fate == "raise":
                    async def boom():
                        raise RuntimeError("a bug in the model server")
                    return boom()
                return _Dies(getattr(handle.server, method)(*args), fate, handle.stream)
        return _Method


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _events(text: str) -> list:
    return [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]"
            for x in text.split("\n\n") if x.startswith("data: ")]


BODIES = {"/generate": {"prompt": "abc", "max_new_tokens": TOKENS, "temperature": 0.9},
          "/v1/completions": {"model": "m", "prompt": "abc", "max_tokens": TOKENS,
                              "temperature": 0.9, "n": 2},
          "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "abc"}],
                                   "max_tokens": TOKENS, "temperature": 0.9}}


def _text(path: str, j: dict) -> list[str]:
    if path == "/generate":
        return [j["text"]]
    return [c.get("text", c.get("message", {}).get("content")) for c in j["choices"]]


# --- replica loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(BODIES))
def test_a_dead_replica_is_retried_once_with_the_seed_fixed_first(server, path):
    async def main():
        handle = _Flaky(server, ["before"])
        async with _client(make_api(lambda: _front(Remote(handle, retry=True)))) as c:
            r = await c.post(path, json=BODIES[path])
        assert r.status_code == 200, r.text
        first = handle.calls[0]
        assert handle.calls.count(first) == 2 and first.params.seed is not None  # resent, seeded
        # the retry's tokens are those an undisturbed run with that seed gives
        again = _Flaky(server, [])
        async with _client(make_api(lambda: _front(Remote(again)))) as c:
            ref = await c.post(path, json={**BODIES[path], "seed": first.params.seed})
        assert _text(path, r.json())[0] == _text(path, ref.json())[0]
        if path == "/v1/completions":               # n=2: two calls, choice 1 not retried
            assert len(handle.calls) == 3
        await _idle(server)
    asyncio.run(main())


@pytest.mark.parametrize("retry,fates,calls", [(True, ["before", "before"], 2),
                                               (False, ["before"], 1)])
def test_no_replica_left_is_a_503_with_retry_after(server, retry, fates, calls):
    async def main():
        handle = _Flaky(server, fates * 2)           # the plain request, then the stream
        async with _client(make_api(lambda: _front(Remote(handle, retry)))) as c:
            r = await c.post("/generate", json=BODIES["/generate"])
            s = await c.post("/generate", json={**BODIES["/generate"], "stream": True})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "unavailable"
        assert "ActorDiedError" in r.json()["error"]["message"]
        assert s.status_code == 503 and s.json()["error"]["code"] == "unavailable"
        assert len(handle.calls) == 2 * calls
        assert (handle.calls[0].params.seed is None) == (not retry)   # seeded only to retry
        await _idle(server)
    asyncio.run(main())


def test_the_model_server_raising_is_a_500_and_not_retried(server):
    async def main():
        handle = _Flaky(server, ["raise"])
        async with _client(make_api(lambda: _front(Remote(handle, True)))) as c:
            r = await c.post("/generate", json=BODIES["/generate"])
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "retry-after" not in r.headers and len(handle.calls) == 1
    asyncio.run(main())


@pytest.mark.parametrize("path", list(BODIES))
def test_a_stream_is_retried_before_its_first_message_only(server, path):
    async def main():
        handle = _Flaky(server, ["before"])
        async with _client(make_api(lambda: _front(Remote(handle, retry=True)))) as c:
            r = await c.post(path, json={**BODIES[path], "stream": True})
        ev = _events(r.text)
        assert r.status_code == 200 and ev[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in ev)
        await _idle(server)
    asyncio.run(main())


@pytest.mark.parametrize("path", list(BODIES))
def test_a_stream_cut_by_a_dead_replica_ends_with_an_error_event(server, path):
    async def main():
        handle = _Flaky(server, [4, 4])             # each choice: Start + 3 messages, then dies
        async with _client(make_api(lambda: _front(Remote(handle, retry=True)))) as c:
            limit = "max_new_tokens" if path == "/generate" else "max_tokens"
            r = await c.post(path, json={**BODIES[path], limit: 50, "stream": True})
        ev = _events(r.text)
        assert r.status_code == 200
        assert "[DONE]" not in ev
        assert ev[-1]["error"]["code"] == "unavailable" and ev[-1]["error"]["type"] == "server_error"
        assert "ActorDiedError" in ev[-1]["error"]["message"]
        assert len([e for e in ev if "error" in e]) == 1 and len(ev) > 1   # tokens went out first
        assert len(handle.calls) == len(BODIES[path].get("n", 1) * [0])    # never retried
        await _idle(server)
    asyncio.run(main())


# --- deadlines ------------------------------------------------------------------------------------
def _fronts(server, timeout_s: float) -> dict:
    return {"local": lambda: _front(Local(server), timeout_s=timeout_s),
            "remote": lambda: _front(Remote(_Flaky(server, [])),
                                       timeout_s=timeout_s)}


@pytest.mark.parametrize("backend", ["local", "remote"])
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_past_its_deadline_a_request_gets_504_and_its_row_is_freed(server, backend, path):
    async def main():
        front = _fronts(server, 0.3)[backend]()
        body = {**BODIES[path], "max_new_tokens": FOREVER} if path == "/generate" else \
            {**BODIES[path], "max_tokens": FOREVER}
        loop = asyncio.get_running_loop()
        async with _client(make_api(lambda: front)) as c:
            t0 = loop.time()
            r = await c.post(path, json=body)
            waited = loop.time() - t0
            assert r.status_code == 504, r.text
            err = r.json()["error"]
            assert err["code"] == "timeout" and "0.3 s" in err["message"]
            assert 0.3 <= waited < 10
            await _idle(server)
            s = await c.post(path, json={**body, "stream": True})     # cut mid-stream
        ev = _events(s.text)
        assert s.status_code == 200 and "[DONE]" not in ev and len(ev) > 1
        assert ev[-1]["error"]["code"] == "timeout"
        await _idle(server)
    asyncio.run(main())


@pytest.mark.parametrize("backend", ["local", "remote"])
def test_a_client_that_stops_reading_is_cut_at_its_deadline(server, backend):
    """The client never takes the second chunk (its send blocks, as a full TCP window does): the
    response ends STALL_GRACE_S past the deadline and the row is free."""
    async def main():
        app = make_api(_fronts(server, 0.3)[backend])
        raw = json.dumps({"prompt": "abc", "max_new_tokens": FOREVER, "stream": True}).encode()
        scope, receive = asgi_request("/generate", raw)
        got = {"body": 0}

        async def send(msg):
            if msg["type"] == "http.response.body":
                got["body"] += 1
                if got["body"] >= 2:
                    await asyncio.Event().wait()    # stops reading
        await asyncio.wait_for(app(scope, receive, send), 15)
        assert got["body"] == 2
        await _idle(server)
    asyncio.run(main())


# --- API keys -------------------------------------------------------------------------------------
ROUTES = [("get", "/v1/models", None), ("get", "/tokenizer_info", None),
          ("post", "/tokenize", {"prompt": "abc"}), ("post", "/detokenize", {"tokens": [1, 2]}),
          ("post", "/generate", {"prompt": "abc", "max_new_tokens": 2}),
          ("post", "/v1/completions", {"prompt": "abc", "max_tokens": 2}),
          ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                            "max_tokens": 2}),
          ("get", "/docs", None), ("get", "/no/such/route", None)]


def test_every_route_but_health_needs_a_key(server):
    keys = load_keys(["old-key-1"], None, {ENV_VAR: "new-key-2"})
    front = _front(Local(server), keys=keys)

    async def main():
        async with _client(make_api(lambda: front)) as c:
            h = await c.get("/health")
            assert h.status_code == 200 and h.json()["status"] == "ok"
            for method, path, body in ROUTES:
                kw = {"json": body} if body else {}
                for headers, why in (({}, "missing API key"),
                                     ({"Authorization": "Bearer wrong"}, "incorrect API key"),
                                     ({"Authorization": "Basic b2xkLWtleS0x"}, "must be 'Bearer"),
                                     ({"Authorization": "Bearer old-key-1x"}, "incorrect")):
                    r = await getattr(c, method)(path, headers=headers, **kw)
                    assert r.status_code == 401, (path, headers, r.text)
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    err = r.json()["error"]
                    assert err["code"] == "invalid_api_key" and why in err["message"]
                    assert "old-key" not in r.text and "new-key" not in r.text
                for key in ("old-key-1", "new-key-2"):              # rotation: both valid
                    for scheme in ("Bearer", "bearer"):
                        r = await getattr(c, method)(path, headers={
                            "Authorization": f"{scheme} {key}"}, **kw)
                        assert r.status_code == (404 if path == "/no/such/route" else 200), \
                            (path, r.text)
    asyncio.run(main())


def test_without_keys_the_server_is_open(server):
    async def main():
        async with _client(make_api(lambda: _front(Local(server)))) as c:
            assert (await c.get("/v1/models")).status_code == 200
    asyncio.run(main())


def test_keys_from_flags_a_file_and_the_environment(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# rotated monthly\n\n  file-key-a  \nfile-key-b\n")
    keys = load_keys(["flag-key"], str(f), {ENV_VAR: "env-1, env-2"})
    for k in ("flag-key", "file-key-a", "file-key-b", "env-1", "env-2"):
        assert keys.accepts(k), k
    for k in ("", "file-key-", "# rotated monthly", "env-1, env-2", "flag-key "):
        assert not keys.accepts(k), k
    assert len(keys.digests) == 5 and not load_keys().required
    assert len(load_keys(["same", "same"]).digests) == 1


@pytest.mark.parametrize("keys,text,env,match", [
    ([""], None, None, r"--api_key #1: an API key must not be empty"),
    (["has space"], None, None, r"--api_key #1: .*printable ASCII without spaces"),
    (["ok", "a,b"], None, None, r"--api_key #2: .*commas"),
    (["naïve"], None, None, r"--api_key #1: .*printable ASCII"),
    ([], "good\nbad key\n", None, r"--api_key_file .* line 2: .*without spaces"),
    ([], "# only a comment\n\n", None, r"--api_key_file .*: holds no key"),
    ([], None, "a,,b", rf"{ENV_VAR} entry 2: an API key must not be empty"),
])
def test_bad_keys_are_refused_without_being_echoed(tmp_path, keys, text, env, match):
    f = None
    if text is not None:
        f = tmp_path / "k.txt"
        f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_keys(keys, None if f is None else str(f), {} if env is None else {ENV_VAR: env})
    for k in keys + ([] if text is None else text.split("\n")) + ([] if env is None else [env]):
        if k.strip() and not k.startswith("#"):
            assert k not in str(e.value)


def test_an_unreadable_key_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--api_key_file .*missing.txt: cannot be read"):
        load_keys([], str(tmp_path / "missing.txt"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"cannot be read \(UnicodeDecodeError"):
        load_keys([], str(tmp_path / "bin"))
