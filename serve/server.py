"""The model deployment: one checkpoint, loaded inside the replica, behind a continuous-batching
engine. The HTTP ingress (serve/app.py) calls it through a DeploymentHandle:

    handle.complete.remote(req)                      -> one dict (the whole completion)
    handle.options(stream=True).generate.remote(req) -> dicts: start, delta..., done

`req` = {"prompt": str, "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"}.
Bad input comes back as {"type": "error", "status": 4xx, "error": {...}} (never an exception).
Deltas carry the text produced since the previous one: under load several tokens per message.

Prompt policy: a prompt longer than the model's block_size tokens is refused (400,
code context_length_exceeded); generation itself may run past block_size (sliding window,
as models/generation.py). The model runs on the GPU when the replica has one.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from ray import serve

from serve.engine import Engine, SamplingParams
from serve.metrics import ServeMetrics
from serve.runner import AsyncRunner
from serve.schemas import error_body


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
        self.runner = AsyncRunner(self.engine, on_step=self.metrics.on_step)
        self.health_timeout_s = health_timeout_s
        self.about = {"id": name, "checkpoint": checkpoint, "architecture": model.cfg.summary(),
                      "block_size": self.block, "vocab_size": model.cfg.vocab_size,
                      "tokenizer": tok.name, "device": device, "max_batch": max_batch}

    def describe(self) -> dict:
        running, queued = self.runner.load()
        return {**self.about, "running": running, "queued": queued}

    def _prepare(self, req: dict) -> tuple[list[int], SamplingParams] | dict:
        try:
            ids = self.tok.encode(req["prompt"])
        except Exception as e:                                  # e.g. a char outside the vocab
            return _error(400, f"prompt: cannot be tokenized ({e})", "prompt", "invalid_prompt")
        if not ids:
            return _error(400, "prompt: encodes to no tokens", "prompt", "invalid_prompt")
        if len(ids) > self.block:
            return _error(400, f"prompt: {len(ids)} tokens, more than this model's context of "
                               f"{self.block} tokens", "prompt", "context_length_exceeded")
        try:
            params = SamplingParams(req["max_new_tokens"], req.get("temperature", 1.0),
                                    req.get("top_k"), req.get("top_p"), req.get("seed"),
                                    tuple(req.get("stop") or ()))
        except ValueError as e:
            return _error(400, str(e), None, "invalid_value")
        return ids, params

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        t0 = time.perf_counter()
        prep = self._prepare(req)
        if isinstance(prep, dict):
            yield prep
            return
        ids, params = prep
        yield {"type": "start", "prompt_tokens": len(ids)}
        first = last = None
        async for t, outs in self.runner.stream(uuid.uuid4().hex, ids, params):
            n = sum(len(o.token_ids) for o in outs)
            msg = {"type": "delta", "text": "".join(o.text for o in outs), "tokens": n}
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
            if o.finish_reason:
                total = (last or t) - t0
                tps = o.completion_tokens / total if total > 0 else 0.0
                if o.completion_tokens:
                    self.metrics.tps.observe(tps)
                msg.update(type="done", finish_reason=o.finish_reason, prompt_tokens=len(ids),
                           completion_tokens=o.completion_tokens,
                           ttft_s=None if first is None else first - t0, total_s=total,
                           tokens_per_s=tps)
                if o.finish_reason == "error":
                    msg.update(_error(500, "generation failed", None, "engine_error"))
            yield msg

    async def complete(self, req: dict) -> dict:
        text, final = [], None
        async for msg in self.generate(req):
            if msg["type"] == "error":
                return msg
            if msg["type"] in ("delta", "done"):
                text.append(msg["text"])
            if msg["type"] == "done":
                final = msg
        return {**final, "text": "".join(text)}

    async def check_health(self) -> None:
        """Serve's health check: a one-token greedy generation (it jumps the engine's queue)."""
        async def one_token():
            async for _, outs in self.runner.stream(f"health-{uuid.uuid4().hex}",
                                                    [0], SamplingParams(1, 0.0), first=True):
                if outs[-1].finish_reason not in (None, "length"):
                    raise RuntimeError(f"health generation ended with {outs[-1].finish_reason}")
        await asyncio.wait_for(one_token(), self.health_timeout_s)


def _error(status: int, message: str, param: str | None, code: str) -> dict:
    return {"type": "error", "status": status, **error_body(message, param=param, code=code)}
