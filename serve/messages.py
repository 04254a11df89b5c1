"""Typed messages between the HTTP ingress (serve/app.py) and a model deployment
(serve/server.py), sent through Ray Serve handles (pickled both ways):

    ingress -> model   Generation(prompt, params)            handle.complete / handle.generate
    model -> ingress   Start, Delta..., Done                 generate (a stream)
                       Done, its text the whole completion   complete
                       Error                                 instead of any of them

An Error is bad input (4xx: the prompt cannot be tokenized, is empty or longer than the
model's context), an overloaded or unavailable model (503) or a failed generation (500); the
ingress answers it with its status and its OpenAI error body.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.sampling import SamplingParams
from serve.schemas import error_body


@dataclass(frozen=True)
class Generation:
    """One completion to run: the prompt text and how to sample it (already checked)."""
    prompt: str
    params: SamplingParams


@dataclass(frozen=True)
class Start:
    """The prompt was accepted: it is `prompt_tokens` tokens long."""
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous message (several tokens under load; text that may
    still become a stop string is held back)."""
    text: str
    tokens: int


@dataclass(frozen=True)
class Done:
    """The last delta (text, tokens) and the request's summary."""
    text: str
    tokens: int
    finish_reason: str              # 'stop', 'length' or 'abort'
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None            # arrival at the replica -> first token; None: no token
    total_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class Error:
    status: int                     # the HTTP status the ingress answers with
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        """The OpenAI error body {"error": {message, type, param, code}}."""
        return error_body(self.message, self.type, self.param, self.code)
