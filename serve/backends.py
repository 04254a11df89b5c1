"""How the HTTP front end (serve/frontend.py) reaches a model server, and what a failed call
becomes for the client.

    Remote(handle, retry=True)   a model deployment behind a DeploymentHandle (one hop more)
    Local(server)                the ModelServer inside this very replica (no hop)

Both have one interface: call(method, *args), complete(Generation) -> Done | Error,
open(Generation) -> (first message, stream), close(stream or call).

Faults, as the client sees them: a replica that died (RayActorError, ReplicaUnavailableError)
is a 503 `unavailable` with Retry-After — after one retry on another replica when the
deployment has several (Remote's docstring) —; the model server raising is a 500
`internal_error`; a full deployment is a 503 `overloaded` (Serve's BackPressureError); a
request past its deadline a 504 `timeout`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from serve.messages import Done, Error, Generation

log = logging.getLogger("ray.serve")

OVERLOADED = Error(503, "the server is overloaded; retry later", "overloaded_error", None, "overloaded")
RETRY_AFTER_S = {"overloaded": 1, "unavailable": 5}      # a replacement replica takes seconds


def replica_died(e: BaseException) -> bool:
    """The call's replica died or became unreachable (not: the model code raised)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import ReplicaUnavailableError
    if isinstance(e, RayTaskError):
        e = getattr(e, "cause", None) or e
    return isinstance(e, (RayActorError, ReplicaUnavailableError))


def unavailable(e: BaseException) -> Error:
    """A failed model call as the client sees it: 503 when the replica died (retry later),
    500 when the model server itself raised."""
    if not replica_died(e):
        from ray.serve.exceptions import DeploymentUnavailableError
        if not isinstance(e, DeploymentUnavailableError):
            return Error(500, f"the model server failed ({type(e).__name__})", "server_error",
                         None, "internal_error")
    return Error(503, f"the model is unavailable ({type(e).__name__}); retry later",
                 "server_error", None, "unavailable")


def timed_out(deadline_s: float) -> Error:
    return Error(504, f"the request did not finish within its deadline of {deadline_s:g} s "
                      "(--request_timeout_s)", "server_error", None, "timeout")


class Remote:
    """A model deployment behind a DeploymentHandle. With `retry` (the deployment has more
    than one replica), a call whose replica died before answering is sent once more — Serve's
    router has dropped the dead replica by then, so it lands on another one — with the seed
    fixed first, so that the retry draws the same tokens. A stream is retried only before its
    first message: once tokens went out, a replica's death ends it with an error event."""
    def __init__(self, handle, retry: bool = False):
        self.h, self.retry = handle, retry

    async def call(self, method: str, *args):
        return await getattr(self.h, method).remote(*args)

    def _seeded(self, call: Generation) -> Generation:
        if not self.retry or call.params.seed is not None:
            return call
        seed = int.from_bytes(os.urandom(7), "little")       # what the engine would draw
        return dataclasses.replace(call, params=dataclasses.replace(call.params, seed=seed))

    async def complete(self, call: Generation) -> Done | Error:
        from ray.serve.exceptions import BackPressureError
        call = self._seeded(call)
        for attempt in range(2 if self.retry else 1):
            resp = self.h.complete.remote(call)
            try:
                return await resp
            except BackPressureError:
                return OVERLOADED
            except asyncio.CancelledError:                      # our caller left
                await self.close(resp)
                raise
            except Exception as e:                              # noqa: BLE001 - replica died
                if attempt or not self.retry or not replica_died(e):
                    return unavailable(e)
                log.warning("a model replica died during a request (%s); retrying it once",
                            type(e).__name__)

    async def open(self, call: Generation):
        """(first message, stream): the first message is awaited so that errors and overload
        become a proper status code before any byte of the stream is sent."""
        from ray.serve.exceptions import BackPressureError
        call = self._seeded(call)
        for attempt in range(2 if self.retry else 1):
            gen = self.h.options(stream=True).generate.remote(call)
            try:
                return await gen.__anext__(), gen
            except BackPressureError:       # never assigned: nothing to cancel
                return OVERLOADED, gen
            except asyncio.CancelledError:  # our caller left, perhaps once the call was assigned
                await self.close(gen)
                raise
            except Exception as e:                              # noqa: BLE001 - replica died
                if attempt or not self.retry or not replica_died(e):
                    return unavailable(e), gen
                log.warning("a model replica died before a stream began (%s); retrying it once",
                            type(e).__name__)

    @staticmethod
    async def close(call) -> None:
        """Best-effort cancel of a handle call, streamed or not (idempotent;
        DeploymentResponse(Generator).cancel re-raises the call's own error, e.g.
        BackPressureError; the call is over then anyway)."""
        try:
            call.cancel()
        except Exception:                                       # noqa: BLE001
            pass


class Local:
    """The ModelServer inside this replica: plain calls, no hop."""
    def __init__(self, server):
        self.s = server

    async def call(self, method: str, *args):
        return getattr(self.s, method)(*args)

    async def complete(self, call: Generation) -> Done | Error:
        return await self.s.complete(call)

    async def open(self, call: Generation):
        gen = self.s.generate(call)
        return await gen.__anext__(), gen

    @staticmethod
    async def close(gen) -> None:
        """Idempotent; an unfinished generate() runs its finally: the engine frees the row."""
        try:
            await gen.aclose()
        except RuntimeError:                # still running in a task being cancelled
            pass
