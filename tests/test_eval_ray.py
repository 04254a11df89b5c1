"""lm-eval against a served checkpoint, on a real local Ray cluster with real HTTP:
`local-completions` with `tokenizer_backend=remote` and max_length = block_size runs the local
multiple-choice task and the generate_until task, and what it gets back is the model's own:
each item's loglikelihood equals the in-process log-softmax sum over the continuation tokens
(after lm-eval's left truncation to max_length - 1 tokens; with few-shot examples, which
overflow the window), and each generation equals greedy `model.generate` on the prompt as
lm-eval truncates it, cut at the stop string."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_checkpoint):
    from chimera.eval.run import serving
    with serving(num_cpus=0.5) as deploy:
        yield deploy([("tiny", tiny_checkpoint)])


@pytest.fixture(scope="module")
def tm():
    from chimera.eval.harness import task_manager
    return task_manager()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from chimera.checkpoint import load_model
    m, tok, _ = load_model(tiny_checkpoint)
    return m.float(), tok


def _loglikelihood(model, tok, context: str, continuation: str, max_length: int) -> float:
    """lm-eval's TemplateAPI rule: the last max_length - 1 tokens of context + continuation,
    summed log-probabilities of the continuation's tokens (fp32, the raw model)."""
    ctx, cont = tok.encode(context), tok.encode(continuation)
    inp = (ctx + cont)[-(max_length - 1):]
    ctxlen = len(ctx) - max(0, len(ctx) + len(cont) - (max_length - 1))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp]))[0][0].float(), dim=-1)    # (T, V)
    return sum(logp[i - 1, inp[i]].item() for i in range(ctxlen, len(inp)))


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_multiple_choice_loglikelihoods_are_the_models_own(served, tm, model, num_fewshot):
    from chimera.eval.harness import evaluate_tasks, summarize
    m, tok = model
    T = m.cfg.block_size
    res = evaluate_tasks(served, "tiny", T, ["shakespeare_nextline"], tm, limit=6,
                         num_fewshot=num_fewshot, log_samples=True)
    samples = res["samples"]["shakespeare_nextline"]
    assert len(samples) == 6
    longest, correct = 0, 0
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]
        for (ctx, cont), ll in zip(s["arguments"], lls):
            longest = max(longest, len(tok.encode(ctx + cont)))
            assert ll == pytest.approx(_loglikelihood(m, tok, ctx, cont, T), abs=1e-4)
        correct += max(range(4), key=lls.__getitem__) == s["target"]
    assert summarize(res)["shakespeare_nextline"]["value"] == pytest.approx(correct / 6)
    assert (longest > T) == (num_fewshot > 0)           # few-shot prompts overflow: truncated


def test_generate_until_is_greedy_generate(served, tm, model):
    from chimera.eval.harness import evaluate_tasks, summarize
    m, tok = model
    T = m.cfg.block_size
    res = evaluate_tasks(served, "tiny", T, ["shakespeare_complete"], tm, limit=4, log_samples=True)
    hits = 0
    for s in res["samples"]["shakespeare_complete"]:
        ctx, kw = s["arguments"][0]
        ids = tok.encode(ctx)[-(T - 1 - kw["max_gen_toks"]):]      # lm-eval's prompt truncation
        out = m.generate(torch.tensor([ids]), max_new_tokens=kw["max_gen_toks"], temperature=0)
        want = tok.decode(out[0, len(ids):].tolist()).split("\n")[0]
        assert s["resps"][0][0] == want
        hits += want == s["target"]
    assert summarize(res)["shakespeare_complete"]["value"] == hits / 4


def test_lm_eval_cli_against_the_server(served, model, tmp_path):
    """lm-eval's own command line, as the README shows it for a server of jobs/serve.py: its
    logged loglikelihoods are the model's own."""
    import glob
    import json
    import subprocess
    import sys
    from pathlib import Path
    m, tok = model
    T = m.cfg.block_size
    root = Path(__file__).resolve().parents[1]
    args = (f"model=tiny,base_url={served}/v1/completions,tokenizer_backend=remote,"
            f"tokenized_requests=True,max_length={T}")
    out = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions",
                          "--tasks", "shakespeare_nextline", "--include_path", str(root / "configs/eval"),
                          "--model_args", args, "--limit", "3", "--log_samples",
                          "--output_path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shakespeare_nextline" in out.stdout and "acc" in out.stdout
    files = glob.glob(str(tmp_path / "**" / "samples_shakespeare_nextline_*.jsonl"), recursive=True)
    samples = [json.loads(line) for f in files for line in open(f)]
    assert len(samples) == 3
    for s in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] \
            if isinstance(s["arguments"], dict) else [tuple(a) for a in s["arguments"]]
        for (ctx, cont), r in zip(pairs, s["resps"]):
            assert float(r[0][0]) == pytest.approx(_loglikelihood(m, tok, ctx, cont, T), abs=1e-4)
