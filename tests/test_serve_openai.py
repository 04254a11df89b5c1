"""The OpenAI protocol of the front end over real HTTP, without Ray: serve/frontend.py's app
with in-process model servers (the `Local` backend that a one-model Serve replica uses) behind
uvicorn on 127.0.0.1. Scoring (echo + logprobs, string and token-id prompts, max_tokens 0)
equals the model's own log-softmax in-process for every attention type, a heterogeneous stack
and a gpt2-tokenized model; generated tokens' logprobs; streams send one event per token; chat
completions with the official openai client; tokenizer routes; every new field's bad input
gets a 4xx naming it. tests/test_serve_onehop.py runs the same app on Ray Serve."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from chimera.checkpoint import load_model, read_config, save_checkpoint
from chimera.localcluster import free_port
from models import LLM, ModelConfig

pytestmark = pytest.mark.slow
PROMPT = "ROMEO:\nWhat say"
ATTN = ["mha", "mqa", "gqa", "mla", "hetero"]


def _random_checkpoint(out: Path, cfg: dict, tokenizer: dict, seed: int) -> Path:
    torch.manual_seed(seed)
    m = LLM(ModelConfig.from_dict(cfg))
    with torch.no_grad():                       # varied logits, not a near-uniform distribution
        for name, p in m.named_parameters():
            if p.dim() >= 2 and not name.startswith("wte"):
                p.mul_(4)
    save_checkpoint(out, m, model_config=m.cfg.to_dict(), tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory, _tiktoken_cache_copy) -> dict[str, Path]:
    """tiny (trained, char) + one random char model per attention type + a gpt2 model."""
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_tiktoken_cache_copy)
    tmp = tmp_path_factory.mktemp("attn")
    tok = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    base = {k: v for k, v in read_config(tiny_checkpoint).items() if k != "layers"}
    base.update(n_layer=2, n_embd=32, n_head=4, block_size=64)
    out = {"tiny": tiny_checkpoint}
    layer = {"mha": {"attn": "mha"}, "mqa": {"attn": "mqa"}, "gqa": {"attn": "gqa", "n_kv_heads": 2},
             "mla": {"attn": "mla", "q_latent_dim": 16, "kv_latent_dim": 12, "rope_head_dim": 4}}
    for i, a in enumerate(ATTN):
        layers = ([dict(layer["mla"], moe=True, n_exp=4, n_shared=1, n_act=2), layer["gqa"]]
                  if a == "hetero" else [layer[a]] * 2)
        out[a] = _random_checkpoint(tmp / a, {**base, "layers": [{"n_head": 4, **x} for x in layers]},
                                    tok, i)
    out["gpt2"] = _random_checkpoint(
        tmp / "gpt2", {**base, "vocab_size": 50304, "n_layer": 1, "n_embd": 16, "n_head": 2,
                       "layers": [{"attn": "gqa", "n_head": 2, "n_kv_heads": 1}]},
        {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}, 9)
    return out


@pytest.fixture(scope="module")
def url(checkpoints, tmp_path_factory):
    import uvicorn

    from serve.backends import Local
    from serve.frontend import Frontend, make_api
    from serve.server import ModelServer
    template = tmp_path_factory.mktemp("tpl") / "t.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}"
                        "{% endif %}{{ m.role | upper }}; {{ m.content }}\n{% endfor %}")
    from serve.chat import ChatTemplate
    front = Frontend({n: Local(ModelServer(n, str(p), max_batch=4, metrics=False))
                      for n, p in checkpoints.items()}, 5000, 1 << 16,
                     {"mha": ChatTemplate.from_file(template).source})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_api(lambda: front), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def models(checkpoints):
    return {n: load_model(p) for n, p in checkpoints.items()}


def post(url, path, body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def reference(model, ids: list[int]) -> torch.Tensor:
    """The model's own log-softmax over every position, uncached, fp32: (T, V)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), -1)


@pytest.mark.parametrize("name", ["tiny", *ATTN, "gpt2"])
def test_echo_scoring_equals_the_models_log_softmax(url, models, name):
    model, tok, _ = models[name]
    ids = tok.encode(PROMPT)
    ref = reference(model, ids)
    as_text = post(url, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 0,
                                            "echo": True, "logprobs": 2}).json()
    as_ids = post(url, "/v1/completions", {"model": name, "prompt": [ids, ids[:3]], "max_tokens": 0,
                                           "echo": True, "logprobs": 2}).json()
    for c in (as_text["choices"][0], as_ids["choices"][0]):
        lp = c["logprobs"]
        assert c["text"] == PROMPT and c["finish_reason"] == "length"
        assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None
        got = torch.tensor(lp["token_logprobs"][1:])
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert (got - want).abs().max().item() <= 1e-4
        assert lp["tokens"] == [tok.decode([i]) for i in ids]
        assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
        for t, top in enumerate(lp["top_logprobs"][1:]):      # the 2 most likely (+ the chosen)
            best = ref[t].topk(2).indices.tolist()
            assert [k for k in top][:2] == [tok.decode([i]) if i < tok.vocab_size else f"<|id_{i}|>"
                                            for i in best]
    assert as_ids["choices"][1]["logprobs"]["tokens"] == [tok.decode([i]) for i in ids[:3]]
    assert as_text["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                "total_tokens": len(ids)}


@pytest.mark.parametrize("name", ["tiny", "mla", "gpt2"])
def test_generated_logprobs_are_the_models_and_lm_eval_can_read_them(url, models, name):
    """lm-eval's request (max_tokens 1, echo, logprobs 1, temperature 0) plus a longer greedy
    generation: every entry is the model's log-softmax at that position; greedy tokens are the
    largest value of their top_logprobs (lm-eval's is_greedy)."""
    model, tok, _ = models[name]
    ids = tok.encode(PROMPT)
    r = post(url, "/v1/completions", {"model": name, "prompt": ids, "max_tokens": 5, "echo": True,
                                      "logprobs": 1, "temperature": 0, "seed": 1234}).json()
    lp = r["choices"][0]["logprobs"]
    gen = model.generate(torch.tensor([ids]), 5, temperature=0.0,
                         vocab_limit=tok.vocab_size)[0].tolist()
    assert len(lp["tokens"]) == len(gen) and r["choices"][0]["text"] == tok.decode(gen)
    ref = reference(model, gen)
    got = torch.tensor(lp["token_logprobs"][1:])
    assert (got - ref[torch.arange(len(gen) - 1), torch.tensor(gen[1:])]).abs().max() <= 1e-4
    for t, top in zip(lp["token_logprobs"][len(ids):], lp["top_logprobs"][len(ids):]):
        assert t == max(top.values()) or max(top.values()) > t     # greedy over the tokenizer's ids
    assert r["usage"]["completion_tokens"] == 5


def test_streams_send_one_event_per_token_with_its_logprobs(url):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "echo": True}
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    r = httpx.post(url + "/v1/completions", json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}},
                   timeout=120)
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    prompt, tokens, usage = events[0], events[1:-1], events[-1]
    assert len(tokens) == 12 and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(len(e["choices"][0]["logprobs"]["tokens"]) == 1 for e in tokens)
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == whole["text"]
    lps = [v for e in events[:-1] for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    offs = [v for e in events[:-1] for v in e["choices"][0]["logprobs"]["text_offset"]]
    assert lps == whole["logprobs"]["token_logprobs"] and offs == whole["logprobs"]["text_offset"]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length" and prompt["choices"][0]["text"] == PROMPT


def test_chat_with_the_openai_client_one_token_per_chunk(url, models):
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none")
    msgs = [{"role": "system", "content": "Plays."}, {"role": "user", "content": "Who art thou?"}]
    prompt = "Plays.\n\nUser: Who art thou?\nAssistant:"          # the default template
    want = post(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                         "temperature": 0}).json()["choices"][0]["text"]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    assert len(whole.choices[0].logprobs.content) == 10
    assert all(len(e.top_logprobs) == 2 for e in whole.choices[0].logprobs.content)
    assert whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert len(content) == 10                                         # one token per chunk
    assert "".join(c.choices[0].delta.content for c in content) == want
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    custom = client.chat.completions.create(model="mha", messages=msgs[1:], max_tokens=3, temperature=0)
    want = post(url, "/v1/completions", {"model": "mha", "prompt": "USER; Who art thou?\n",
                                         "max_tokens": 3, "temperature": 0}).json()["choices"][0]["text"]
    assert custom.choices[0].message.content == want                  # its --chat_template


def test_tokenizer_routes(url, models):
    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] is None and "eos_token" in info and info["tokenizer"] == "char"
    assert info["max_model_len"] == 64 and info["vocab_size"] == models["tiny"][1].vocab_size
    assert "Assistant:" in info["chat_template"]
    g = httpx.get(url + "/tokenizer_info?model=gpt2", timeout=30).json()
    assert (g["eos_token"], g["vocab_size"], g["model_vocab_size"]) == ("<|endoftext|>", 50257, 50304)
    eot = post(url, "/tokenize", {"model": "gpt2", "prompt": "<|endoftext|>", "add_special_tokens": False})
    assert eot.json()["tokens"] == [50256]                            # lm-eval finds the eos id so
    t = post(url, "/tokenize", {"prompt": PROMPT}).json()
    assert t["tokens"] == models["tiny"][1].encode(PROMPT) and t["count"] == len(PROMPT)
    assert post(url, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": PROMPT}
    assert post(url, "/tokenize", {"prompt": ""}).json()["tokens"] == []


BAD = [  # (method, path, body or query, status, the param the error names)
    ("post", "/v1/completions", {"prompt": [1, 999]}, 400, "prompt"),            # id past the vocab
    ("post", "/v1/completions", {"prompt": "a" * 65, "echo": True, "logprobs": 1, "max_tokens": 0},
     400, "prompt"),                                                              # > block_size
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("post", "/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("post", "/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("post", "/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "top_logprobs": 2}, 400, "top_logprobs"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "€"}]}, 400, "prompt"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_completion_tokens": 6000}, 400, "max_completion_tokens"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("post", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
     404, "model"),
    ("post", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options"),                                                      # without stream
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 3, "max_completion_tokens": 4}, 400,
     "max_completion_tokens"),
    ("post", "/v1/chat/completions", {"model": "mha", "messages": [{"role": "system", "content": "x"}]},
     400, "messages"),                                       # its template refuses (raise_exception)
    ("post", "/tokenize", {"prompt": "€"}, 400, "prompt"),
    ("post", "/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("post", "/tokenize", {"text": "hi"}, 400, "prompt"),                        # missing
    ("post", "/detokenize", {"tokens": [0, 65]}, 400, "tokens"),
    ("post", "/detokenize", {"tokens": [0.5]}, 400, "tokens"),
    ("get", "/tokenizer_info?model=nope", None, 404, "model"),
    ("get", "/tokenizer_info?mode=tiny", None, 400, "mode"),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD)
def test_bad_input_gets_4xx_naming_the_field(url, method, path, body, status, param):
    r = (httpx.get(url + path, timeout=30) if method == "get" else post(url, path, body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].split(".")[0] == param, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def _running(url, name="tiny") -> int:
    return httpx.get(url + "/health", timeout=30).json()["models"][name]["running"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on."}]}),
    ("/v1/completions", {"prompt": "ROMEO:", "n": 2}),
    ("/generate", {"prompt": "ROMEO:"})])
def test_a_client_that_leaves_a_stream_frees_its_rows(url, path, body):
    key = "max_new_tokens" if path == "/generate" else "max_tokens"
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + path, json={**body, key: 4000, "stream": True}) as r:
            lines = r.iter_lines()              # (leaving a loop over it closes the response)
            while not next(lines).startswith("data: {"):
                pass
            assert _running(url) >= 1
    deadline = time.time() + 20
    while _running(url) and time.time() < deadline:
        time.sleep(0.1)
    assert _running(url) == 0


def test_text_offsets_do_not_depend_on_held_back_text(url):
    """A stop string that starts to match holds a token's text back (released with the next
    token); each token's text_offset is still where its own text starts."""
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    plain = post(url, "/v1/completions", body).json()["choices"][0]
    text = plain["text"]
    held = post(url, "/v1/completions", {**body, "stop": [text[1:3] + "#"]}).json()["choices"][0]
    assert held["text"] == text and held["logprobs"] == plain["logprobs"]
    assert plain["logprobs"]["text_offset"] == list(range(6))          # char: one char per token
    echo = post(url, "/v1/completions", {**body, "echo": True, "stop": [text[1:3] + "#"]}).json()
    assert echo["choices"][0]["logprobs"]["text_offset"] == list(range(len(PROMPT) + 6))


def test_chat_without_max_tokens_may_use_the_whole_context(url):
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Go."}],
                                           "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] == 64 and r["choices"][0]["finish_reason"] == "length"
