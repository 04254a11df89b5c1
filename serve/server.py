"""The model deployment: one checkpoint, loaded inside the replica, behind a continuous-batching
engine. The HTTP ingress (serve/app.py) calls it through a DeploymentHandle, with the typed
messages of serve/messages.py:

    handle.complete.remote(Generation(prompt, params))                      -> Done | Error
    handle.options(stream=True).generate.remote(Generation(prompt, params)) -> Start, Delta..., Done
                                                                               (or an Error)

Bad input comes back as an Error with a 4xx status (never an exception). Deltas carry the text
produced since the previous one: under load several tokens per message.

Prompt policy: a prompt longer than the model's block_size tokens is refused (400,
code context_length_exceeded); generation itself may run past block_size (sliding window,
models/context.py). The model runs on the GPU when the replica has one.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

from ray import serve

from models.sampling import SamplingParams
from serve.driver import EngineDriver
from serve.engine import Engine
from serve.messages import Delta, Done, Error, Generation, Start
from serve.metrics import ServeMetrics


@serve.deployment
class LLMServer:
    def __init__(self, name: str, checkpoint: str, max_batch: int = 16, threads: int = 1,
                 health_timeout_s: float = 20.0):
        import torch

        from chimera.checkpoint import load_model
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok, _ = load_model(checkpoint, device)
        self.name, self.tok, self.block = name, tok, model.cfg.block_size
        self.engine = Engine(model, tok, max_batch=max_batch)
        self.metrics = ServeMetrics(name)
        self.driver = EngineDriver(self.engine, on_step=self.metrics.on_step)
        self.health_timeout_s = health_timeout_s
        self.about = {"id": name, "checkpoint": checkpoint, "architecture": model.cfg.summary(),
                      "block_size": self.block, "vocab_size": model.cfg.vocab_size,
                      "tokenizer": tok.name, "device": device, "max_batch": max_batch}

    def describe(self) -> dict:
        running, queued = self.driver.load()
        return {**self.about, "running": running, "queued": queued}

    def _tokenize(self, prompt: str) -> list[int] | Error:
        try:
            ids = self.tok.encode(prompt)
        except Exception as e:                                  # e.g. a char outside the vocab
            return Error(400, f"prompt: cannot be tokenized ({e})", param="prompt",
                         code="invalid_prompt")
        if not ids:
            return Error(400, "prompt: encodes to no tokens", param="prompt", code="invalid_prompt")
        if len(ids) > self.block:
            return Error(400, f"prompt: {len(ids)} tokens, more than this model's context of "
                              f"{self.block} tokens", param="prompt", code="context_length_exceeded")
        return ids

    async def generate(self, req: Generation) -> AsyncIterator[Start | Delta | Done | Error]:
        t0 = time.perf_counter()
        ids = self._tokenize(req.prompt)
        if isinstance(ids, Error):
            yield ids
            return
        yield Start(len(ids))
        first = last = None
        async for t, outs in self.driver.stream(uuid.uuid4().hex, ids, req.params):
            n = sum(len(o.token_ids) for o in outs)
            text = "".join(o.text for o in outs)
            if n:
                self.metrics.tokens.inc(n)
                later = n
                if first is None:
                    first, later = t, n - 1
                    self.metrics.ttft.observe(t - t0)
                for _ in range(later if last is not None else 0):   # n tokens since `last`
                    self.metrics.itl.observe((t - last) / later)
                last = t
            o = outs[-1]
            if not o.finish_reason:
                yield Delta(text, n)
                continue
            total = (last or t) - t0
            tps = o.completion_tokens / total if total > 0 else 0.0
            if o.completion_tokens:
                self.metrics.tps.observe(tps)
            if o.finish_reason == "error":
                yield Error(500, "generation failed", code="engine_error")
            else:
                yield Done(text, n, o.finish_reason, len(ids), o.completion_tokens,
                           None if first is None else first - t0, total, tps)

    async def complete(self, req: Generation) -> Done | Error:
        """The whole completion: the Done message, its text all of the text."""
        text, final = [], None
        async for msg in self.generate(req):
            if isinstance(msg, Error):
                return msg
            if isinstance(msg, (Delta, Done)):
                text.append(msg.text)
            if isinstance(msg, Done):
                final = msg
        return replace(final, text="".join(text))

    async def check_health(self) -> None:
        """Serve's health check: a one-token greedy generation (it jumps the engine's queue)."""
        async def one_token():
            async for _, outs in self.driver.stream(f"health-{uuid.uuid4().hex}",
                                                    [0], SamplingParams(1, 0.0), first=True):
                if outs[-1].finish_reason not in (None, "length"):
                    raise RuntimeError(f"health generation ended with {outs[-1].finish_reason}")
        await asyncio.wait_for(one_token(), self.health_timeout_s)
