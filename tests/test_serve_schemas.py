"""Sampling arguments are checked once: the HTTP schemas take their bounds from
models/sampling.py (RULES), every body they accept becomes a SamplingParams without error, and
a value outside a bound is refused by both, each with its own message (a pydantic 400 naming
the field; the core's message for model.generate, the engine and jobs/sample.py). Plus the
typed messages between the ingress and the model deployment. No Ray, no model."""
from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from models.sampling import RULES, SamplingParams
from serve.messages import Done, Error, Generation, Piece, Prompt
from serve.schemas import (ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                           TokenizeRequest, validation_error_body)

EDGES = [  # bodies at the edges of every bound the schemas accept
    {"prompt": "a", "max_new_tokens": 1, "temperature": 0.0, "top_k": 1, "top_p": 1e-9, "seed": 0},
    {"prompt": "a", "max_new_tokens": 5000, "temperature": 100, "top_p": 1.0, "seed": 2 ** 63 - 1,
     "stop": ["x" * 64] * 16},
    {"prompt": "a", "temperature": 0, "stop": "\n"},
    {"prompt": "a"},
]


@pytest.mark.parametrize("body", EDGES)
def test_every_accepted_body_is_a_valid_sampling_params(body):
    g = GenerateRequest.model_validate(body)
    p = g.sampling()
    assert isinstance(p, SamplingParams) and p.max_new_tokens == g.max_new_tokens
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.stop) == (g.temperature, g.top_k, g.top_p,
                                                                 g.seed, g.stops())
    c = CompletionRequest.model_validate({**{k: v for k, v in body.items() if k != "max_new_tokens"},
                                          "max_tokens": body.get("max_new_tokens", 16), "n": 8})
    choices = [c.sampling(j) for j in range(c.n)]
    assert [q.seed for q in choices] == [None if c.seed is None else c.seed + j for j in range(8)]
    assert all(q.max_new_tokens == c.max_tokens and q.stop == c.stops() for q in choices)


@pytest.mark.parametrize("field,bad", [("max_new_tokens", 0), ("temperature", -0.5), ("top_k", 0),
                                       ("top_p", 0.0), ("top_p", 1.01)])
def test_a_bound_is_declared_once_and_refused_by_both(field, bad):
    with pytest.raises(ValidationError) as e:
        GenerateRequest.model_validate({"prompt": "a", field: bad})
    err = validation_error_body(e.value)["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}: Input should be")
    with pytest.raises(ValueError, match=RULES[field].message.replace("(", r"\(").replace(")", r"\)")
                       .replace("]", r"\]")):
        SamplingParams(**{field: bad})


def test_schema_bounds_are_the_rules_bounds():
    """Around every bound, the HTTP schema accepts exactly what RULES accepts (besides the
    HTTP-only cap temperature <= 100): the bounds are declared once, nothing restates them."""
    probes = [-1, -1e-9, 0, 1e-9, 0.5, 1, 1 + 1e-9, 1.01, 2, 100]
    for field, rule in RULES.items():
        for v in probes:
            if rule.integer:
                if v != int(v):
                    continue
                v = int(v)
            try:
                GenerateRequest.model_validate({"prompt": "a", field: v})
                http = True
            except ValidationError:
                http = False
            assert http == rule.accepts(v), (field, v)


def test_messages_pickle_and_error_bodies():
    call = Generation("hi", SamplingParams(3, 0.0, stop=("x",)))
    assert pickle.loads(pickle.dumps(call)) == call                 # through a Serve handle
    ids = Generation((1, 2), SamplingParams(1, 0.0), logprobs=2, echo=True, generate=False)
    assert pickle.loads(pickle.dumps(ids)) == ids
    p = Piece("t", 7, "t", b"t", -0.5, (("t", -0.5, b"t"),))
    done = Done((p,), "length", 2, 3, 0.1, 0.2, 15.0, Prompt("hi", (Piece("hi", 3, "hi", b"hi"),)))
    assert pickle.loads(pickle.dumps(done)) == done and done.text == "t" and done.tokens == 1
    e = Error(400, "prompt: encodes to no tokens", param="prompt", code="invalid_prompt")
    assert e.body() == {"error": {"message": "prompt: encodes to no tokens",
                                  "type": "invalid_request_error", "param": "prompt",
                                  "code": "invalid_prompt"}}


BAD_FIELDS = [  # (schema, body, the param the 400 names)
    (CompletionRequest, {"prompt": "a", "logprobs": 6}, "logprobs"),
    (CompletionRequest, {"prompt": "a", "logprobs": -1}, "logprobs"),
    (CompletionRequest, {"prompt": "a", "logprobs": True}, "logprobs"),
    (CompletionRequest, {"prompt": "a", "echo": 1}, "echo"),
    (CompletionRequest, {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    (CompletionRequest, {"prompt": [1, "a"]}, "prompt"),
    (CompletionRequest, {"prompt": [-1]}, "prompt"),
    (CompletionRequest, {"prompt": [[]]}, "prompt"),
    (CompletionRequest, {"prompt": [True]}, "prompt"),
    (CompletionRequest, {"prompt": [[1]] * 17}, "prompt"),
    (CompletionRequest, {"prompt": "a", "best_of": 2}, "best_of"),
    (CompletionRequest, {"prompt": "a", "user": "me"}, "user"),
    (CompletionRequest, {"prompt": "a", "stream_options": {"continuous_usage_stats": True}},
     "stream_options"),
    (CompletionRequest, {"prompt": "a", "stop": ["x"] * 17}, "stop"),
    (CompletionRequest, {"prompt": None}, "prompt"),                      # null: the default, none
    (ChatRequest, {"messages": []}, "messages"),
    (ChatRequest, {"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 9}, "top_logprobs"),
    (ChatRequest, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    (TokenizeRequest, {"prompt": 3}, "prompt"),
    (TokenizeRequest, {"prompt": "a", "messages": []}, "messages"),
    (DetokenizeRequest, {"tokens": [1, -2]}, "tokens"),
    (DetokenizeRequest, {"tokens": "ab"}, "tokens"),
]


@pytest.mark.parametrize("schema,body,param", BAD_FIELDS)
def test_new_fields_refuse_bad_values_naming_the_field(schema, body, param):
    with pytest.raises(ValidationError) as e:
        schema.model_validate(body)
    err = validation_error_body(e.value)["error"]
    assert err["param"].split(".")[0] == param, err
    assert err["message"].startswith(param)


def test_prompt_shapes_and_chat_limits():
    assert CompletionRequest.model_validate({"prompt": "a"}).prompts() == ["a"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts() == [(1, 2)]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts() == [(1,), (2, 3)]
    c = CompletionRequest.model_validate({"prompt": "a", "max_tokens": 0, "echo": True})
    assert c.sampling(0).max_new_tokens == 1                # scored only; the params stay valid
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    r = ChatRequest.model_validate(chat)
    assert r.limit is None and r.k is None and r.messages[0].text() == "x"     # no limit given
    r = ChatRequest.model_validate({**chat, "max_tokens": 5, "max_completion_tokens": 7,
                                    "logprobs": True})
    assert r.limit == 7 and r.k == 0


def test_explicit_null_means_the_default():
    """OpenAI clients send `"n": null` for n=None: the server uses its default, as OpenAI does."""
    c = CompletionRequest.model_validate({"prompt": "a", "n": None, "temperature": None,
                                          "top_p": None, "echo": None, "stream": None,
                                          "logprobs": None, "stop": None})
    assert (c.n, c.temperature, c.top_p, c.echo, c.stream, c.logprobs) == (1, 1.0, 1.0, False, False, None)
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                       "logprobs": None, "max_tokens": None})
    assert chat.logprobs is False and chat.limit is None
