"""Typed messages between the HTTP front end (serve/frontend.py) and a model server
(serve/server.py), sent through Ray Serve handles (pickled both ways) or, with one model
served, as plain calls inside one replica:

    front -> model   Generation(prompt, params, logprobs, echo, generate)   complete / generate
    model -> front   Start, [Prompt], Delta..., Done                        generate (a stream)
                     Done, its pieces all of the completion                 complete
                     Error                                                  instead of any of them

An Error is bad input (4xx: the prompt cannot be tokenized, is empty, holds ids outside the
vocabulary or is longer than the model's context), an overloaded or unavailable model (503) or
a failed generation (500); the front end answers it with its status and its OpenAI error body.
Every generated token is one Piece: its text (what is safe to show — held back while it may
still become a stop string or an incomplete character, so possibly ""), its id, and its
log-probabilities when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.sampling import SamplingParams
from serve.schemas import error_body


@dataclass(frozen=True)
class Generation:
    """One completion to run, already checked: the prompt as text or token ids."""
    prompt: str | tuple[int, ...]
    params: SamplingParams
    logprobs: int | None = None     # score each generated token, with the k most likely
    echo: bool = False              # send the prompt back first (scored when logprobs is set)
    generate: bool = True           # False (max_tokens 0 with echo): score the prompt only


@dataclass(frozen=True)
class Piece:
    """One token: its text, id, shown string (serve/logprobs.py token_string), raw bytes and
    offset (where its own text starts in the generated text — or, echoed, in the prompt —
    decoded token by token, whatever is held back for stop strings); with logprobs, its
    log-probability and the top (string, logprob, bytes) entries."""
    text: str
    token: int
    string: str
    raw: bytes
    offset: int = 0
    logprob: float | None = None
    top: tuple[tuple[str, float, bytes], ...] | None = None


@dataclass(frozen=True)
class Start:
    """The prompt was accepted: it is `prompt_tokens` tokens long."""
    prompt_tokens: int


@dataclass(frozen=True)
class Prompt:
    """The echoed prompt (echo=True): its text and one piece per token (the first one's
    logprob None), sent before the first generated token."""
    text: str
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Delta:
    """Tokens produced since the previous message (several under load)."""
    pieces: tuple[Piece, ...]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def tokens(self) -> int:
        return len(self.pieces)


@dataclass(frozen=True)
class Done(Delta):
    """The last tokens and the request's summary."""
    finish_reason: str = "length"   # 'stop', 'length' or 'abort'
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None     # arrival at the model server -> first token; None: no token
    total_s: float = 0.0
    tokens_per_s: float = 0.0
    prompt: Prompt | None = None    # complete() only: the echoed prompt


@dataclass(frozen=True)
class Error:
    status: int                     # the HTTP status the front end answers with
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        """The OpenAI error body {"error": {message, type, param, code}}."""
        return error_body(self.message, self.type, self.param, self.code)
