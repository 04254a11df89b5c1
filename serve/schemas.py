"""HTTP request bodies (pydantic, with bounds) and OpenAI-style error bodies.

Types are strict (a string is not a number, a bool is not an int). The sampling bounds come
from models/sampling.py (RULES, declared once), so a bad value is a 400 that names its field;
`sampling()` then turns a body into the SamplingParams the engine runs (it cannot fail on a
parsed body: tests/test_serve_schemas.py). Limits of this HTTP server only (temperature <= 100,
seeds in [0, 2^63), at most 4 stop strings of 64 characters) sit here; limits that depend on
the deployment (max new tokens cap, the model's block_size) are checked by the app after
parsing. `/v1/completions` ignores OpenAI fields it does not implement (logprobs, echo, user,
...); `/generate` refuses unknown fields.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.sampling import RULES, SamplingParams

MAX_STOP, MAX_STOP_LEN, MAX_PROMPTS, MAX_N = 4, 64, 16, 8
MaxTokens = Annotated[int, Field(**RULES["max_new_tokens"].bounds)]
Temperature = Annotated[float, Field(le=100.0, **RULES["temperature"].bounds)]
TopP = Annotated[float, Field(**RULES["top_p"].bounds)]
TopK = Annotated[int, Field(**RULES["top_k"].bounds)]
Seed = Annotated[int, Field(ge=0, lt=2 ** 63)]
Prompt = Annotated[str, Field(min_length=1)]


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
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: Prompt
    max_new_tokens: MaxTokens = 64

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_new_tokens, 0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Common):
    """POST /v1/completions (OpenAI): prompt is a string or a list of strings; n choices each."""
    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: MaxTokens = 16
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    top_p: TopP = 1.0
    stream_options: StreamOptions | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling(self, choice: int) -> SamplingParams:
        """Choice j of a prompt samples with seed + j (n choices differ, each reproducible)."""
        return self._sampling(self.max_tokens, choice)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(e: ValidationError) -> dict:
    """The first pydantic error as an OpenAI error: param = the field path."""
    err = e.errors(include_url=False)[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return error_body(f"{param}: {msg}" if param else msg, param=param, code=err["type"])
