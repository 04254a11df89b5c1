"""OpenAI response shapes: completions (legacy, with vLLM's logprobs/echo semantics) and chat
completions, whole or as stream chunks (one chunk per token).

    shape = Completions(model_name, request)        # or Chat(model_name, request)
    shape.response(dones, usage(dones, n))          # the JSON body of a non-streamed answer
    shape.prompt_chunk(i, prompt)                   # streams: the echoed prompt (completions)
    shape.chunks(i, delta_or_done)                  # streams: one chunk per token
    shape.usage_chunk(usage(dones, n))              # streams: stream_options.include_usage

Completions' `logprobs` = {tokens, token_logprobs, top_logprobs (dicts string -> logprob),
text_offset (each token's offset in the choice's text)}; with echo the prompt's tokens come
first (the first one's logprob and top entries null). Chat's `logprobs.content` = one
{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}] (the k most likely)} per token.
"""
from __future__ import annotations

import time
import uuid

from serve.messages import Delta, Done, Piece, Prompt


def usage(finals: list[Done], n: int) -> dict:
    p = sum(f.prompt_tokens for f in finals[::n])              # each prompt counted once
    c = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text(pieces) -> str:
    return "".join(p.text for p in pieces)


class _Shape:
    object_ = chunk_object = ""
    prefix = ""

    def __init__(self, model: str):
        self.head = {"id": f"{self.prefix}-{uuid.uuid4().hex}", "object": self.object_,
                     "created": int(time.time()), "model": model}
        self.chunk_head = {**self.head, "object": self.chunk_object}

    def usage_chunk(self, u: dict) -> dict:
        return {**self.chunk_head, "choices": [], "usage": u}

    def chunks(self, i: int, m: Delta) -> list[dict]:
        done = isinstance(m, Done)
        out = [self._chunk(i, p, m.finish_reason if done and j == len(m.pieces) - 1 else None)
               for j, p in enumerate(m.pieces)]
        if done and not m.pieces:                               # finished without a new token
            out.append(self._chunk(i, None, m.finish_reason))
        return out


class Completions(_Shape):
    object_ = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, req):
        super().__init__(model)
        self.k, self.echo = req.logprobs, req.echo
        self.base: dict[int, int] = {}                          # streams: echoed prompt's length

    def _logprobs(self, pieces, base: int) -> dict | None:
        """text_offset: each token's offset in the choice's text (`base`: the echoed prompt's
        length before generated tokens)."""
        if self.k is None:
            return None
        return {"tokens": [p.string for p in pieces],
                "token_logprobs": [p.logprob for p in pieces],
                "top_logprobs": [None if p.top is None else {s: v for s, v, _ in p.top} for p in pieces],
                "text_offset": [base + p.offset for p in pieces]}

    def response(self, outs: list[Done], u: dict) -> dict:
        choices = []
        for i, o in enumerate(outs):
            prompt = o.prompt if self.echo and o.prompt else None
            lp = None
            if self.k is not None:
                lp = self._logprobs(o.pieces, len(prompt.text) if prompt else 0)
                if prompt:
                    lp = {k: v + lp[k] for k, v in self._logprobs(prompt.pieces, 0).items()}
            choices.append({"index": i, "text": (prompt.text if prompt else "") + _text(o.pieces),
                            "logprobs": lp, "finish_reason": o.finish_reason})
        return {**self.head, "choices": choices, "usage": u}

    def prompt_chunk(self, i: int, m: Prompt) -> dict:
        self.base[i] = len(m.text)
        return {**self.chunk_head, "choices": [{"index": i, "text": m.text, "finish_reason": None,
                                                "logprobs": self._logprobs(m.pieces, 0)}]}

    def _chunk(self, i: int, p: Piece | None, finish: str | None) -> dict:
        pieces = (p,) if p is not None else ()
        return {**self.chunk_head, "choices": [{"index": i, "text": _text(pieces), "finish_reason": finish,
                                                "logprobs": self._logprobs(pieces, self.base.get(i, 0))}]}


class Chat(_Shape):
    object_, chunk_object = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, model: str, req):
        super().__init__(model)
        self.k = req.k
        self.started: set[int] = set()                          # streams: role sent

    def _entry(self, p: Piece) -> dict:
        return {"token": p.string, "logprob": p.logprob, "bytes": list(p.raw),
                "top_logprobs": [{"token": s, "logprob": v, "bytes": list(b)}
                                 for s, v, b in (p.top or ())[:self.k]]}

    def _logprobs(self, pieces) -> dict | None:
        return None if self.k is None else {"content": [self._entry(p) for p in pieces]}

    def response(self, outs: list[Done], u: dict) -> dict:
        return {**self.head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": _text(o.pieces)},
             "logprobs": self._logprobs(o.pieces), "finish_reason": o.finish_reason}
            for i, o in enumerate(outs)], "usage": u}

    def _chunk(self, i: int, p: Piece | None, finish: str | None) -> dict:
        delta = {} if p is None else {"content": p.text}
        if i not in self.started:
            self.started.add(i)
            delta = {"role": "assistant", **delta}
        return {**self.chunk_head, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                                "logprobs": self._logprobs((p,)) if p else None}]}
