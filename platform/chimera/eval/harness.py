"""lm-evaluation-harness as a library, against a Chimera server's OpenAI-style completions.

    tm = task_manager(["my_tasks/"])          # lm-eval's tasks + configs/eval + yours
    check_tasks(tm, ["shakespeare_nextline", "hellaswag"])       # ValueError for unknown names
    res = evaluate_tasks("http://127.0.0.1:8000", "tiny", 64, ["shakespeare_nextline"], tm,
                         limit=20, log_samples=True)             # lm_eval.simple_evaluate's dict
    summarize(res)          # {task: {"metric", "value", "stderr", "n", "metrics"}}

lm-eval's `local-completions` model sends token ids (`tokenized_requests`) to POST
/v1/completions and tokenizes through the server's own tokenizer routes (`tokenizer_backend=
remote`: GET /tokenizer_info, POST /tokenize, /detokenize). Loglikelihoods come from `echo` +
`logprobs` (the prompt's token logprobs); generation is greedy with the task's stop strings.
`max_length` is the model's block_size: lm-eval's default (2048) would send prompts longer
than the model's window, which the server refuses (400 context_length_exceeded); with it,
lm-eval keeps the last max_length - 1 tokens of context + continuation (left truncation) and,
for generation, the last max_length - 1 - max_gen_toks tokens of the prompt.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from chimera.eval.tasks import TASK_DIR


def task_manager(include_path: list[str | Path] = ()):
    """lm-eval's TaskManager over its own tasks, the shipped local ones and `include_path`
    folders. Indexing every task YAML takes ~8 s, so one is built per process and set of
    folders (a job builds it once; the tests reuse it)."""
    for p in include_path:
        if not Path(p).exists():
            raise ValueError(f"--include_path {p}: no such file or folder")
    return _task_manager(tuple(str(Path(p).resolve()) for p in include_path))


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...]):
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        raise ValueError(f"--tasks needs lm-evaluation-harness ({e}): pip install -c constraints.txt "
                         f"-e '.[eval]' (make test / make demo install it)") from None
    return TaskManager(include_path=[str(TASK_DIR), *include_path])


def check_tasks(tm, names: list[str]) -> list[str]:
    """`names` when every one is a task or group the TaskManager knows; ValueError otherwise."""
    if not names:
        raise ValueError("--tasks: give at least one task name")
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        local = sorted(n for n in known if n.startswith("shakespeare_"))
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; local tasks: "
                         f"{', '.join(local)}; lm-eval's own (hellaswag, arc_easy, piqa, "
                         f"lambada_openai, ...) need their data (see the README); your own "
                         f"task YAMLs: --include_path DIR")
    return names


def model_args(base_url: str, model: str, block_size: int, num_concurrent: int = 1,
               api_key: str | None = None) -> dict[str, Any]:
    """local-completions' arguments for a Chimera server at `base_url` serving `model`; with
    `api_key`, both its requests (`header`) and its remote tokenizer's (`auth_token`) carry it."""
    args = {"base_url": f"{base_url.rstrip('/')}/v1/completions", "model": model,
            "tokenizer_backend": "remote", "tokenized_requests": True,
            "max_length": block_size, "num_concurrent": num_concurrent, "max_retries": 1}
    if api_key:
        args.update(auth_token=api_key, header={"Authorization": f"Bearer {api_key}"})
    return args


def client_key() -> str | None:
    """The API key this process sends to a Chimera server: the first of CHIMERA_API_KEY
    (the variable a server reads its keys from, serve/auth.py)."""
    import os

    from serve.auth import ENV_VAR
    keys = [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    return keys[0] if keys else None


def evaluate_tasks(base_url: str, model: str, block_size: int, tasks: list[str], tm, *,
                   limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 1, num_concurrent: int = 1,
                   log_samples: bool = False, api_key: str | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate of `tasks` on `model` served at `base_url`."""
    import lm_eval
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args(base_url, model, block_size, num_concurrent, api_key),
        tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
        batch_size=batch_size, log_samples=log_samples)


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each task's main metric (the first of its metric_list), its stderr, item count and all
    its metrics, from simple_evaluate's result."""
    out = {}
    for task, res in result["results"].items():
        metrics = {k.split(",")[0]: v for k, v in res.items()
                   if "," in k and isinstance(v, (int, float))}
        main = next((k for k in metrics if not k.endswith("_stderr")), None)
        stderr = metrics.get(f"{main}_stderr")
        out[task] = {"metric": main, "value": None if main is None else float(metrics[main]),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                     "n": res.get("sample_len"),
                     "metrics": {k: float(v) for k, v in metrics.items()}}
    return out
