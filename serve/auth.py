"""API keys: who may call the server.

    keys = load_keys(["k1"], "keys.txt", os.environ)   # -> ApiKeys (sha256 digests only)
    api.add_middleware(RequireKey, keys=lambda: keys)   # every route but /health: Bearer KEY

Keys come from `--api_key` (repeatable; visible in `ps`, so for tests and local use), from
`--api_key_file` (one key per line; blank lines and lines starting with `#` skipped) and from
the environment variable CHIMERA_API_KEY (several keys separated by commas; a key holds no comma). Every key found
is valid at once, which is how a key is rotated: add the new one, move the clients, drop the
old one. No key at all: the server is open (it binds 127.0.0.1 unless told otherwise).

Only SHA-256 digests of the keys travel to the replicas (Serve keeps deployment arguments in
its controller and shows them in its state API); a request's key is hashed and compared with
every digest in constant time (hmac.compare_digest, never short-circuited). No key, presented
or configured, is ever logged or put in an error message.

A pure ASGI middleware rather than FastAPI dependencies or Starlette's BaseHTTPMiddleware: it
covers every path, unknown ones and FastAPI's /docs included, and leaves streamed responses
and client disconnects exactly as they are.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from serve.schemas import error_body

ENV_VAR = "CHIMERA_API_KEY"
OPEN_PATHS = frozenset({"/health"})         # load balancers' health probes carry no key


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def accepts(self, key: str) -> bool:
        got = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        ok = False
        for d in self.digests:                  # every digest compared: no early exit
            ok |= hmac.compare_digest(got, d)
        return ok


def _check_key(key: str, where: str) -> str:
    if not key:
        raise ValueError(f"{where}: an API key must not be empty")
    if not all(0x21 <= ord(c) <= 0x7E and c != "," for c in key):
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces or "
                         "commas (it travels in an HTTP header; commas separate keys)")
    return key


def load_keys(keys: list[str] | tuple[str, ...] = (), key_file: str | None = None,
              environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Every key from the flag values, the file and the environment, checked (ValueError
    naming where a bad one came from, never the key itself)."""
    found = [_check_key(k, f"--api_key #{i + 1}") for i, k in enumerate(keys)]
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api_key_file {key_file}: cannot be read "
                             f"({type(e).__name__}: {getattr(e, 'strerror', None) or e})") from None
        from_file = [_check_key(line.strip(), f"--api_key_file {key_file} line {n}")
                     for n, line in enumerate(lines, 1)
                     if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise ValueError(f"--api_key_file {key_file}: holds no key (one per line)")
        found += from_file
    env = (environ or {}).get(ENV_VAR)
    if env is not None:
        from_env = [_check_key(k.strip(), f"{ENV_VAR} entry {i + 1}")
                    for i, k in enumerate(env.split(","))]
        found += from_env
    return ApiKeys(tuple(hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(found)))


def _unauthorized(message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(error_body(message, "invalid_request_error", None, "invalid_api_key")).encode()
    return body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                  (b"www-authenticate", b'Bearer realm="chimera"')]


class RequireKey:
    """ASGI middleware: 401 with an OpenAI error body unless the request carries
    `Authorization: Bearer <a configured key>`; /health is always open. `keys()` is asked per
    request (the replica's Frontend holds them)."""
    def __init__(self, app, keys: Callable[[], ApiKeys]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not self.keys().required:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if header is None:
            message = "missing API key: send the header 'Authorization: Bearer <key>'"
        else:
            scheme, _, key = header.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and self.keys().accepts(key.strip()):
                return await self.app(scope, receive, send)
            message = ("incorrect API key" if scheme.lower() == "bearer"
                       else "the Authorization header must be 'Bearer <key>'")
        body, headers = _unauthorized(message)
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
