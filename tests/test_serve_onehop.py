"""One model on Ray Serve: the HTTP app runs inside the model's own deployment (ModelIngress,
no hop between the front end and the engine). Real HTTP through Serve's proxy: one deployment,
echo scoring equal to the model in-process, the openai client's chat stream, the vLLM-named
Prometheus metrics; and jobs/serve.py stops cleanly on SIGINT even when started the way a
shell starts a background job (SIGINT ignored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from chimera.localcluster import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nWhat say"


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_checkpoint):
    from ray import serve

    from serve.app import AppArgs, build_app
    port = free_port()
    args = AppArgs(checkpoint=[f"tiny={tiny_checkpoint.parent}"], max_batch=4, num_cpus=0.5,
                   colocate_ingress=True,
                   health_check_period_s=2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="chimera-one", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_one_model_is_one_deployment(url):
    from ray import serve
    deployments = serve.status().applications["chimera-one"].deployments
    assert set(deployments) == {"LLMServer-tiny"}                  # no separate ingress
    h = httpx.get(url + "/health", timeout=30).json()
    assert h["status"] == "ok" and set(h["models"]) == {"tiny"}


def test_echo_scoring_through_serve_equals_the_model(url, tiny_checkpoint):
    from chimera.checkpoint import load_model
    model, tok, _ = load_model(tiny_checkpoint)
    ids = tok.encode(PROMPT)
    r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True,
                                                  "logprobs": 1, "temperature": 0}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp[0] is None and len(lp) == len(ids) + 1
    assert (torch.tensor(lp[1:len(ids)]) - want).abs().max() <= 1e-4
    assert lp[-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)   # greedy: the argmax


def test_openai_chat_stream_through_serve(url):
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none")
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Speak."}], max_tokens=8, temperature=0,
        stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) == 8


def test_vllm_named_metrics_are_exported(url):
    import ray
    port = ray.nodes()[0]["MetricsExportPort"]
    httpx.post(url + "/v1/completions", json={"prompt": "To be", "max_tokens": 3}, timeout=60)
    want = ["ray_vllm_num_requests_running", "ray_vllm_prompt_tokens_total",
            "ray_vllm_generation_tokens_total", "ray_vllm_time_to_first_token_seconds_bucket",
            "ray_vllm_e2e_request_latency_seconds_bucket", "ray_vllm_request_queue_time_seconds_bucket",
            "ray_chimera_serve_ttft_seconds_bucket"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    line = next(ln for ln in text.splitlines() if ln.startswith("ray_vllm_generation_tokens_total{"))
    assert 'model_name="tiny"' in line and float(line.rsplit(" ", 1)[1]) >= 3


def test_serve_job_stops_cleanly_on_sigint_started_in_the_background(tiny_checkpoint):
    """Started as a shell starts `python jobs/serve.py ... &` (SIGINT ignored), it still stops
    on SIGINT: shuts Serve down, exits 0, and leaves no process of its own behind. (SIGTERM
    takes the same handler, jobs/serve.py `_interrupt`; one Ray start-up per test is enough.)"""
    sig = signal.SIGINT
    import psutil
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "jobs/serve.py", "--checkpoint", str(tiny_checkpoint), "--port", str(port),
         "--num_cpus", "0.5"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        env={**os.environ, "RAY_ADDRESS": ""})
    out = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            out.append(line)
            if line.startswith("serving ") or not line:
                break
        assert "".join(out).count("serving ") == 1, "".join(out)
        body = {"prompt": "To be", "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(out) + rest
    assert "shutting down" in rest
    time.sleep(2)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
