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
from serve.messages import Done, Error, Generation
from serve.schemas import CompletionRequest, GenerateRequest, validation_error_body

EDGES = [  # bodies at the edges of every bound the schemas accept
    {"prompt": "a", "max_new_tokens": 1, "temperature": 0.0, "top_k": 1, "top_p": 1e-9, "seed": 0},
    {"prompt": "a", "max_new_tokens": 5000, "temperature": 100, "top_p": 1.0, "seed": 2 ** 63 - 1,
     "stop": ["x" * 64] * 4},
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
    done = Done("t", 1, "length", 2, 3, 0.1, 0.2, 15.0)
    assert pickle.loads(pickle.dumps(done)) == done
    e = Error(400, "prompt: encodes to no tokens", param="prompt", code="invalid_prompt")
    assert e.body() == {"error": {"message": "prompt: encodes to no tokens",
                                  "type": "invalid_request_error", "param": "prompt",
                                  "code": "invalid_prompt"}}
