"""Faults on a real Ray Serve app: one model with two replicas behind its front end (the default
deployment), API keys from a file, replicas killed with SIGKILL under load:

- the deployment is the Ingress plus the model's two replicas; 401 without a key or with a
  wrong one, over Serve's proxy; the official openai client with the key (completions,
  streaming) and without it (AuthenticationError);
- a replica killed while 8 clients send 40 non-streamed requests: all 40 are answered 200, and
  every seeded one with exactly the text an undisturbed run gives; Serve brings a new replica;
- a stream whose replica is killed mid-way ends with one error event and no [DONE], over a
  connection that closes properly (not a cut transfer).
tests/test_serve_faults.py proves the same logic in-process, deadlines and every route included.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from chimera.benchmarks.serve_soak import kill, ongoing, replicas, wait_running
from chimera.localcluster import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
APP, DEPLOYMENT, KEY = "chimera-faults", "LLMServer-tiny", "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_checkpoint, tmp_path_factory):
    from ray import serve

    from serve.app import AppArgs, build_app
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n")
    port = free_port()
    args = AppArgs(checkpoint=[f"tiny={tiny_checkpoint.parent}"], max_batch=8, num_cpus=0.5,
                   num_replicas=2, api_key_file=str(keys), health_check_period_s=2,
                   max_new_tokens_cap=4096)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/")
    wait_running(APP, DEPLOYMENT, 2)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()                 # the next module starts Serve on a port of its own


def test_two_replicas_behind_their_own_front_end(url):
    from ray import serve
    deps = serve.status().applications[APP].deployments
    assert set(deps) == {"Ingress", DEPLOYMENT}
    assert len(replicas(APP, DEPLOYMENT)) == 2


def test_a_key_is_needed_on_every_route_but_health(url):
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    for method, path, body in (("get", "/v1/models", None), ("post", "/tokenize", {"prompt": "a"}),
                               ("post", "/generate", {"prompt": "a", "max_new_tokens": 2})):
        kw = {"json": body} if body else {}
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            r = getattr(httpx, method)(url + path, headers=headers, timeout=30, **kw)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert getattr(httpx, method)(url + path, headers=AUTH, timeout=60, **kw).status_code == 200


def test_the_openai_client_with_the_key(url):
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    c = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0.0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8,
                                            temperature=0.0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).completions.create(
            model="tiny", prompt="ROMEO:", max_tokens=2)


def test_a_replica_killed_under_load_fails_no_request(url):
    bodies = [{"prompt": "ROMEO:", "max_new_tokens": 48 + (i % 4) * 16, "temperature": 0.8,
               **({"seed": i} if i % 2 else {})} for i in range(40)]
    got: dict[int, httpx.Response] = {}

    def client(k):
        with httpx.Client(timeout=120, headers=AUTH) as c:
            for i in range(k, 40, 8):
                got[i] = c.post(url + "/generate", json=bodies[i])
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    end = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < end:          # one holding requests now
        victim = next((r for r in replicas(APP, DEPLOYMENT) if ongoing(r) >= 2), None)
    assert victim is not None, "no replica ever held two requests"
    kill(victim)
    for t in threads:
        t.join(180)
    assert len(got) == 40
    bad = {i: (r.status_code, r.text[:120]) for i, r in got.items() if r.status_code != 200}
    assert not bad
    wait_running(APP, DEPLOYMENT, 2, {victim.name})            # Serve replaced it
    with httpx.Client(timeout=120, headers=AUTH) as c:         # the retried ones: same tokens
        for i in range(1, 40, 2):
            again = c.post(url + "/generate", json=bodies[i]).json()
            assert again["text"] == got[i].json()["text"], i


def test_a_stream_cut_by_a_replica_kill_ends_with_an_error_event(url):
    events, statuses = [], []
    with httpx.Client(timeout=120, headers=AUTH) as c:
        with c.stream("POST", url + "/v1/completions", json={
                "prompt": "ROMEO:", "max_tokens": 4000, "temperature": 0.8, "stream": True}) as r:
            statuses.append(r.status_code)
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        break
            holder = next(x for x in replicas(APP, DEPLOYMENT) if ongoing(x) == 1)
            kill(holder)
            for line in lines:                 # a cut transfer would raise here
                if line.startswith("data: "):
                    events.append(line[6:])
    assert statuses == [200] and "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "unavailable" and "retry later" in last["error"]["message"]
    assert all("error" not in json.loads(e) for e in events[:-1]) and len(events) >= 4
    wait_running(APP, DEPLOYMENT, 2, {holder.name})


def test_evaluation_against_a_server_with_keys(url, monkeypatch):
    """jobs/eval.py --base_url: the key comes from CHIMERA_API_KEY, for lm-eval's requests and
    its remote tokenizer alike; without it, or with a wrong one, the error says so."""
    from chimera.eval.harness import client_key, evaluate_tasks, summarize, task_manager
    from chimera.eval.run import check_server
    monkeypatch.delenv("CHIMERA_API_KEY", raising=False)
    with pytest.raises(ValueError, match="needs an API key and none is in CHIMERA_API_KEY"):
        check_server(url, ["tiny"], api_key=client_key())
    monkeypatch.setenv("CHIMERA_API_KEY", "sk-wrong")
    with pytest.raises(ValueError, match="refused the one in CHIMERA_API_KEY"):
        check_server(url, ["tiny"], api_key=client_key())
    monkeypatch.setenv("CHIMERA_API_KEY", f"{KEY},sk-other")
    assert check_server(url + "/", ["tiny"], api_key=client_key()) == url
    from pathlib import Path
    tm = task_manager([str(Path(__file__).resolve().parents[1] / "configs" / "eval")])
    res = summarize(evaluate_tasks(url, "tiny", 64, ["shakespeare_nextline"], tm, limit=2,
                                   api_key=client_key()))
    assert res["shakespeare_nextline"]["n"] == 2
