"""The model server: one checkpoint, loaded inside the replica, behind a continuous-batching
engine. The HTTP front end (serve/frontend.py) calls it — through a DeploymentHandle when
several models are served (LLMServer, one deployment per model), or directly inside the same
replica when one model is (serve/app.py ModelIngress) — with the typed messages of
serve/messages.py:

    complete(Generation(prompt, params, logprobs, echo, generate))  -> Done | Error
    generate(Generation(...))            -> Start, [Prompt], Delta..., Done (or an Error)
    tokenizer_info() / tokenize(text) / detokenize(ids)             -> dict | list | str | Error

Bad input comes back as an Error with a 4xx status (never an exception). Deltas carry one
Piece per token produced since the previous one (several under load).

Prompt policy: a prompt longer than the model's block_size tokens is refused (400,
code context_length_exceeded); generation itself may run past block_size (sliding window,
models/context.py). A text prompt is tokenized with special-token text parsed (gpt2's
"<|endoftext|>" is id 50256), as /tokenize does; token-id prompts must be in the tokenizer's
vocabulary. The model runs on the GPU when the replica has one.
"""
from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from typing import AsyncIterator

from ray import serve

from models.sampling import SamplingParams
from serve.driver import EngineDriver
from serve.engine import Engine, Output
from serve.logprobs import pieces, token_raw, token_string
from serve.messages import Delta, Done, Error, Generation, Piece, Prompt, Start
from serve.metrics import ServeMetrics


class ModelServer:
    def __init__(self, name: str, checkpoint: str, max_batch: int = 16, threads: int = 1,
                 health_timeout_s: float = 20.0, metrics: bool = True, adapter: str | None = None,
                 prefix_cache_bytes: int = 0, decode: str | None = None):
        """`adapter`: a LoRA checkpoint merged into `checkpoint`'s weights at load
        (chimera.checkpoint.load_model); `prefix_cache_bytes`: the engine's prefix cache
        (serve/prefix_cache.py; 0: off); `decode`: the engine's decode step (models/decode.py;
        None: compiled on CUDA, eager on CPU)."""
        import torch

        from chimera.checkpoint import load_model
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok, _ = load_model(checkpoint, device, adapter=adapter)
        self.name, self.tok, self.block = name, tok, model.cfg.block_size
        self.engine = Engine(model, tok, max_batch=max_batch, prefix_cache_bytes=prefix_cache_bytes,
                             decode=decode)
        self.metrics = ServeMetrics(name, enabled=metrics)
        self.driver = EngineDriver(self.engine, on_step=self.metrics.on_step)
        self.health_timeout_s = health_timeout_s
        self.about = {"id": name, "checkpoint": checkpoint, **({"adapter": adapter} if adapter else {}),
                      "architecture": model.cfg.summary(),
                      "block_size": self.block, "vocab_size": model.cfg.vocab_size,
                      "tokenizer": tok.name, "device": device, "max_batch": max_batch,
                      "decode": self.engine.runner.decode}

    def describe(self) -> dict:
        running, queued = self.driver.load()
        return {**self.about, "running": running, "queued": queued}

    # --- the tokenizer ----------------------------------------------------------------------------
    def tokenizer_info(self) -> dict:
        """What lm-eval's remote tokenizer reads (the `eos_token` key is always present)."""
        eot = self.tok.eot_id
        return {"model": self.name, "tokenizer": self.tok.name,
                "eos_token": None if eot is None else self.tok.decode([eot]),
                "bos_token": None, "pad_token": None, "vocab_size": self.tok.vocab_size,
                "model_vocab_size": self.about["vocab_size"], "max_model_len": self.block}

    def tokenize(self, text: str) -> list[int] | Error:
        try:
            return self.tok.encode_with_special(text)
        except Exception as e:                                  # e.g. a char outside the vocab
            return Error(400, f"prompt: cannot be tokenized ({e})", param="prompt",
                         code="invalid_prompt")

    def detokenize(self, ids: list[int], param: str = "tokens") -> str | Error:
        bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            return Error(400, f"{param}: token ids must be in [0, {self.tok.vocab_size}) "
                              f"(the {self.tok.name} vocabulary), got {bad[:5]}",
                         param=param, code="invalid_token_id")
        return self.tok.decode(ids)

    def _prompt_ids(self, prompt: str | tuple[int, ...]) -> list[int] | Error:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = list(prompt)
            bad = self.detokenize(ids, "prompt")
            if isinstance(bad, Error):
                return bad
        if isinstance(ids, Error):
            return ids
        if not ids:
            return Error(400, "prompt: encodes to no tokens", param="prompt", code="invalid_prompt")
        if len(ids) > self.block:
            return Error(400, f"prompt: {len(ids)} tokens, more than this model's context of "
                              f"{self.block} tokens", param="prompt", code="context_length_exceeded")
        return ids

    def _piece(self, text: str, t: int, lp, offset: int) -> Piece:
        s, raw = token_string(self.tok, t), token_raw(self.tok, t)
        if lp is None:
            return Piece(text, t, s, raw, offset)
        return Piece(text, t, s, raw, offset, lp.logprob,
                     tuple((token_string(self.tok, j), v, token_raw(self.tok, j)) for j, v in lp.top))

    def _prompt(self, ids: list[int], scores: list | None) -> Prompt:
        texts = pieces(self.tok, ids)
        scores = scores or [None] * len(ids)
        offsets = [0]
        for x in texts[:-1]:
            offsets.append(offsets[-1] + len(x))
        return Prompt("".join(texts), tuple(self._piece(x, t, lp, o) for x, t, lp, o
                                            in zip(texts, ids, scores, offsets)))

    # --- generation -------------------------------------------------------------------------------
    async def generate(self, req: Generation) -> AsyncIterator[Start | Prompt | Delta | Done | Error]:
        t0 = time.perf_counter()
        ids = self._prompt_ids(req.prompt)
        if isinstance(ids, Error):
            yield ids
            return
        scored = req.echo and req.logprobs is not None
        if not req.generate and not scored:                     # echo of the text, nothing to run
            yield Start(len(ids))
            yield self._prompt(ids, None)
            yield Done((), "length", len(ids), 0, None, time.perf_counter() - t0, 0.0)
            return
        rid = uuid.uuid4().hex
        self.driver.submit(rid, ids, req.params, logprobs=req.logprobs,       # the engine starts now
                           prompt_logprobs=req.logprobs if scored else None, generate=req.generate)
        try:
            self.metrics.prompt_tokens.inc(len(ids))
            yield Start(len(ids))
            if req.echo and not scored:
                yield self._prompt(ids, None)
            async for msg in self._results(rid, ids, t0):
                yield msg
        finally:
            self.driver.cancel(rid)                             # a no-op once it finished

    async def _results(self, rid: str, ids: list[int], t0: float
                       ) -> AsyncIterator[Prompt | Delta | Done | Error]:
        first = last = None
        dec, pos = codecs.getincrementaldecoder("utf-8")("replace"), 0    # generated text offsets

        def piece(o: Output) -> Piece:
            nonlocal pos
            p = self._piece(o.text, o.token_ids[0], o.logprobs, pos)
            pos += len(dec.decode(p.raw))
            return p
        async for t, outs in self.driver.results(rid):
            if first is None and last is None and outs[0].queue_s is not None:
                self.metrics.queue.observe(outs[0].queue_s)
            for o in outs:
                if o.prompt_logprobs is not None:
                    yield self._prompt(ids, o.prompt_logprobs)
            new = tuple(piece(o) for o in outs if o.token_ids)
            n = len(new)
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
                yield Delta(new)
                continue
            total = (last or t) - t0
            tps = o.completion_tokens / total if total > 0 else 0.0
            self.metrics.e2e.observe(t - t0)
            self.metrics.finished(o.finish_reason)
            if o.completion_tokens:
                self.metrics.tps.observe(tps)
            if o.finish_reason == "error":
                yield Error(500, "generation failed", code="engine_error")
            else:
                yield Done(new, o.finish_reason, len(ids), o.completion_tokens,
                           None if first is None else first - t0, total, tps)

    async def complete(self, req: Generation) -> Done | Error:
        """The whole completion: the Done message with every piece and the echoed prompt."""
        got, prompt, final = [], None, None
        async for msg in self.generate(req):
            if isinstance(msg, Error):
                return msg
            if isinstance(msg, Prompt):
                prompt = msg
            elif isinstance(msg, Delta):
                got += msg.pieces
                final = msg if isinstance(msg, Done) else final
        return Done(tuple(got), final.finish_reason, final.prompt_tokens, final.completion_tokens,
                    final.ttft_s, final.total_s, final.tokens_per_s, prompt)

    async def check_health(self) -> None:
        """Serve's health check: a one-token greedy generation (it jumps the engine's queue)."""
        async def one_token():
            async for _, outs in self.driver.stream(f"health-{uuid.uuid4().hex}",
                                                    [0], SamplingParams(1, 0.0), first=True):
                if outs[-1].finish_reason not in (None, "length"):
                    raise RuntimeError(f"health generation ended with {outs[-1].finish_reason}")
        await asyncio.wait_for(one_token(), self.health_timeout_s)


# one deployment per model when several are served (serve/app.py)
LLMServer = serve.deployment(ModelServer, name="LLMServer")
