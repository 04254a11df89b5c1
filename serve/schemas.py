"""HTTP request bodies (pydantic, with bounds) and OpenAI-style error bodies.

Types are strict (a string is not a number, a bool is not an int) and unknown fields are
refused (400 naming the field: a field this server does not implement is never silently
ignored). The sampling bounds come from models/sampling.py (RULES, declared once), so a bad
value is a 400 that names its field; `sampling()` then turns a body into the SamplingParams
the engine runs (it cannot fail on a parsed body: tests/test_serve_schemas.py). Limits of this
HTTP server only (temperature <= 100, seeds in [0, 2^63), at most 16 stop strings of 64
characters, 16 prompts, 8 choices, logprobs <= 5) sit here; limits that depend on the
deployment (max new tokens cap, the model's block_size and vocabulary) are checked after
parsing.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal


from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.sampling import RULES, SamplingParams
from serve.logprobs import MAX_LOGPROBS

# 16 stop strings, not OpenAI's 4: lm-eval's generate_until sends a task's `until` list (up to
# 6 strings in its own tasks) plus the end-of-text token's text; vLLM has no limit
MAX_STOP, MAX_STOP_LEN, MAX_PROMPTS, MAX_N, MAX_MESSAGES = 16, 64, 16, 8, 256
STRICT = ConfigDict(strict=True, extra="forbid")
MaxTokens = Annotated[int, Field(**RULES["max_new_tokens"].bounds)]
Temperature = Annotated[float, Field(le=100.0, **RULES["temperature"].bounds)]
TopP = Annotated[float, Field(**RULES["top_p"].bounds)]
TopK = Annotated[int, Field(**RULES["top_k"].bounds)]
Seed = Annotated[int, Field(ge=0, lt=2 ** 63)]
Prompt = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


def _stop_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP \
            or any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LEN for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of "
                         f"them, each at most {MAX_STOP_LEN} characters")
    return tuple(stops)


class _Common(BaseModel):
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """An explicit null means the default (OpenAI clients send `"n": null` for n=None)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    temperature: Temperature = 1.0
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    model: str | None = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        _stop_list(v)
        return v

    def stops(self) -> tuple[str, ...]:
        return _stop_list(self.stop)

    def _sampling(self, max_new_tokens: int, seed_offset: int) -> SamplingParams:
        return SamplingParams(max_new_tokens, self.temperature, self.top_k, self.top_p,
                              None if self.seed is None else self.seed + seed_offset, self.stops())


class GenerateRequest(_Common):
    """POST /generate."""
    prompt: Prompt
    max_new_tokens: MaxTokens = 64

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_new_tokens, 0)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _OpenAI(_Common):
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    top_p: TopP = 1.0
    stream_options: StreamOptions | None = None

    def sampling(self, choice: int) -> SamplingParams:
        """Choice j of a prompt samples with seed + j (n choices differ, each reproducible)."""
        return self._sampling(self.limit, choice)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAI):
    """POST /v1/completions (OpenAI's legacy completions, as vLLM implements them): prompt is a
    string, a list of strings, a list of token ids or a list of such lists; n choices each."""
    prompt: (Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0)] = 16       # 0: with echo, score the prompt only
    logprobs: Logprobs | None = None
    echo: bool = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _shapes(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:             # a union's errors name its branches, not the fix
            raise ValueError(f"must be a non-empty string, a list of 1..{MAX_PROMPTS} of them, "
                             f"a non-empty list of token ids (integers >= 0) or a list of "
                             f"1..{MAX_PROMPTS} such lists") from None

    def prompts(self) -> list[str | tuple[int, ...]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [tuple(p)]
        return [x if isinstance(x, str) else tuple(x) for x in p]

    @property
    def limit(self) -> int:
        return max(1, self.max_tokens)      # 0 (echo only): nothing is generated, params stay valid


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_OpenAI):
    """POST /v1/chat/completions: messages rendered by the model's chat template
    (serve/chat.py) into one prompt for these base models."""
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None

    @property
    def limit(self) -> int | None:
        """max_completion_tokens (OpenAI's current name), else max_tokens; None: neither given
        (the front end then allows the model's block_size, within its cap)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def k(self) -> int | None:
        """The engine's logprobs k: None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize (lm-eval's remote tokenizer, vLLM's route)."""
    model_config = STRICT
    prompt: str
    add_special_tokens: bool = False        # no Chimera tokenizer adds BOS/EOS: no effect
    model: str | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""
    model_config = STRICT
    tokens: list[TokenId]
    model: str | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(e: ValidationError) -> dict:
    """The first pydantic error as an OpenAI error: param = the field path."""
    err = e.errors(include_url=False)[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (this server does not implement it)"
    return error_body(f"{param}: {msg}" if param else msg, param=param, code=err["type"])
