"""The evaluation job (`python jobs/eval.py`): checkpoints -> bits per byte on prepared val
shards and lm-eval task scores -> eval.json (+ the sweep report's columns) and a table.

    job, tm = plan_eval(checkpoint=["runs/a"], data_dir=["data/shakespeare_char"],
                        tasks=["shakespeare_nextline"], limit=20)      # every check; ValueError
    doc = run_eval(job, tm)          # {"models": {name: {"bpb": .., "tasks": ..}}, ...}, written to job.out
    print(table(doc))

Every input is checked by plan_eval, before Ray starts: the checkpoints (serve.loading), each
data folder against each checkpoint's tokenizer (chimera.eval.bpb), the task names
(chimera.eval.harness) and, with base_url, that the server answers and serves every model.
Bits per byte run in this process. Tasks run against `base_url`, or against a Chimera server
this job starts (Ray Serve on 127.0.0.1 and a free port, in a private local Ray instance) and
shuts down at the end; the models of one tokenizer share one app (lm-eval's remote tokenizer
asks the app's default model), several tokenizers are served one after another.
With from_sweep the results go to <sweep>/eval.json (merged with what earlier evaluations
wrote there, per model) and the sweep report is re-rendered with their columns.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from chimera import storage

APP_NAME = "chimera-eval"


@dataclass(frozen=True)
class EvalJob:
    models: tuple[tuple[str, Path], ...]          # (name, checkpoint dir)
    trials: frozenset[str]                        # the names that are trials of `sweep`
    data_dirs: tuple[Path, ...]
    tasks: tuple[str, ...]
    out: str                                      # eval.json: a local path or a URI
    sweep: Path | str | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    num_concurrent: int = 1
    base_url: str | None = None
    bpb_batch_size: int = 32


def _tokenizer(ckpt: Path | str) -> dict:
    return json.loads(storage.read_text(storage.join(ckpt, "tokenizer.json")))


def _data_dir(d: str) -> Path | str:
    r = storage.resolve(d)
    return r if storage.is_uri(r) else Path(r)


def _name(d: Path | str) -> str:
    return storage.basename(str(d))


def _block_size(ckpt: Path) -> int:
    from chimera.checkpoint import read_config
    return int(read_config(ckpt)["block_size"])


def check_server(base_url: str, names: list[str], timeout: float = 10.0,
                 api_key: str | None = None) -> str:
    """`base_url` without a trailing slash when it is a server that lists every model of
    `names` at GET /v1/models (sent `api_key` when given); ValueError otherwise."""
    import httpx
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    u = urlparse(base_url)
    if u.scheme not in ("http", "https") or not u.netloc or u.path.rstrip("/") not in ("",):
        raise ValueError(f"--base_url {base_url!r}: give the server's root, e.g. http://127.0.0.1:8000")
    url = base_url.rstrip("/")
    try:
        r = httpx.get(f"{url}/v1/models", timeout=timeout, headers=auth)
        served = None if r.status_code == 401 else [m["id"] for m in r.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--base_url {url}: no Chimera server answers GET /v1/models "
                         f"({type(e).__name__}: {e})") from None
    if served is None:
        raise ValueError(f"--base_url {url}: the server needs an API key and "
                         f"{'refused the one in' if api_key else 'none is in'} CHIMERA_API_KEY "
                         "(set it to one of the server's keys)")
    missing = [n for n in names if n not in served]
    if missing:
        raise ValueError(f"--base_url {url} does not serve {', '.join(missing)} (it serves "
                         f"{', '.join(served)}): name the checkpoints as NAME=PATH")
    # lm-eval's remote tokenizer asks GET /tokenizer_info and POST /tokenize without a model:
    # the server's default model's tokenizer must be every evaluated model's
    infos = {}
    for q in [""] + [f"?model={n}" for n in names]:
        r = httpx.get(f"{url}/tokenizer_info{q}", timeout=timeout, headers=auth)
        if r.status_code != 200:
            raise ValueError(f"--base_url {url}: GET /tokenizer_info{q} answered {r.status_code} "
                             f"(lm-eval's remote tokenizer needs it: a newer Chimera server)")
        infos[q] = {k: r.json().get(k) for k in ("tokenizer", "vocab_size")}
    other = [n for n in names if infos[f"?model={n}"] != infos[""]]
    if other:
        raise ValueError(f"--base_url {url}: {', '.join(other)} use another tokenizer than the "
                         f"server's default model, which lm-eval's remote tokenizer uses: serve "
                         f"them separately, or let this job serve them (no --base_url)")
    return url


def plan_eval(*, checkpoint: list[str] = (), from_sweep: str | None = None, top_k: int = 1,
              data_dir: list[str] = (), tasks: list[str] = (), include_path: list[str] = (),
              out: str | None = None, **opts) -> tuple[EvalJob, Any]:
    """The checked job and the TaskManager (None without tasks); ValueError naming the flag."""
    from chimera.eval.bpb import check_data_dir
    from serve.schemas import MAX_PROMPTS
    from serve.loading import parse_models, sweep_models

    models = parse_models(list(checkpoint))
    trials: set[str] = set()
    sweep = None
    if from_sweep:
        sweep = storage.resolve(from_sweep)
        sweep = sweep if storage.is_uri(sweep) else Path(sweep)
        picked = sweep_models(sweep, top_k)
        trials = {n for n, _ in picked}
        models += picked
    if not models:
        raise ValueError("give --checkpoint PATH (repeatable) or --from_sweep DIR")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}: use --checkpoint NAME=PATH")
    if not data_dir and not tasks:
        raise ValueError("nothing to evaluate: give --data_dir DIR (bits per byte) and/or --tasks")
    dirs = tuple(_data_dir(d) for d in data_dir)            # local Paths or s3:// URIs
    if len({_name(d) for d in dirs}) != len(dirs):
        raise ValueError(f"--data_dir: two folders share a name ({', '.join(_name(d) for d in dirs)}); "
                         f"results are keyed by the folder's name")
    for d in dirs:
        for name, ckpt in models:
            check_data_dir(d, _tokenizer(ckpt), what=f"model {name} ({ckpt})")
    for key, lo in (("limit", 0), ("num_fewshot", 0), ("batch_size", 1), ("num_concurrent", 1),
                    ("bpb_batch_size", 1)):
        v = opts.get(key)
        if v is not None and (v < lo or (key == "limit" and v == 0)):
            raise ValueError(f"--{key} must be {'> 0' if key == 'limit' else f'>= {lo}'}, got {v}")
    if (opts.get("batch_size") or 1) > MAX_PROMPTS:
        raise ValueError(f"--batch_size must be <= {MAX_PROMPTS}: a Chimera server takes at most "
                         f"{MAX_PROMPTS} prompts per request, got {opts['batch_size']}")
    if opts.get("limit") is not None and opts["limit"] >= 1:
        opts["limit"] = int(opts["limit"])                   # lm-eval: < 1 is a fraction of the items
    tm = None
    if tasks:
        from chimera.eval.harness import check_tasks, task_manager
        tm = task_manager(list(include_path))
        check_tasks(tm, list(tasks))
        if opts.get("base_url"):
            from chimera.eval.harness import client_key
            opts["base_url"] = check_server(opts["base_url"], names, api_key=client_key())
    elif opts.get("base_url"):
        raise ValueError("--base_url is for --tasks; bits per byte run in this process")
    if out is None:
        if sweep is not None:
            from chimera.sweep.store import EVAL
            target = storage.join(sweep, EVAL)
        elif len(models) == 1:
            target = storage.join(storage.parent(str(models[0][1])), "eval.json")   # the run dir
        else:
            raise ValueError("several --checkpoint without --from_sweep: say where with --out FILE")
    else:
        target = storage.resolve(out)
    job = EvalJob(models=tuple(models), trials=frozenset(trials), data_dirs=dirs, tasks=tuple(tasks),
                  out=target, sweep=sweep, **{k: v for k, v in opts.items() if v is not None})
    return job, tm


@contextlib.contextmanager
def serving(num_cpus: float = 1.0):
    """A Chimera server on 127.0.0.1:<free port> (Ray Serve; a private local Ray instance unless
    Ray is already initialised): yields deploy([(name, ckpt), ...]) -> its URL, which (re)places
    the app with those models. Serve, and Ray if started here, are shut down on exit."""
    import ray
    from ray import serve

    from chimera.localcluster import free_port
    from chimera.runtime import init_ray
    from serve.app import AppArgs, build_app
    started = not ray.is_initialized()
    init_ray(address="local")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(models):
        args = AppArgs(checkpoint=[f"{n}={p}" for n, p in models], num_cpus=num_cpus)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        return f"http://127.0.0.1:{port}"
    try:
        yield deploy
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def run_eval(job: EvalJob, tm, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model of `job`, write job.out (and re-render the sweep report)."""
    import torch

    from chimera.checkpoint import load_model
    from chimera.eval.bpb import bits_per_byte

    results: dict[str, dict[str, Any]] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, ckpt in job.models:
        tok_info = _tokenizer(ckpt)
        results[name] = {"checkpoint": str(ckpt), "trial": name if name in job.trials else None,
                         "block_size": _block_size(ckpt), "tokenizer": tok_info["name"],
                         "bpb": {}, "tasks": {}}
        if job.data_dirs:
            model, tok, _ = load_model(ckpt, device=device)
            for d in job.data_dirs:
                t0 = time.perf_counter()
                results[name]["bpb"][_name(d)] = r = bits_per_byte(model, tok, d, job.bpb_batch_size)
                log(f"{name}: bpb {r['bpb']:.4f} on {_name(d)} val ({r['tokens']:,} tokens, "
                    f"{time.perf_counter() - t0:.1f} s)")
            del model
    if job.tasks:
        _run_tasks(job, tm, results, log)
    doc = {"version": 1, "tasks": list(job.tasks), "data_dirs": [str(d) for d in job.data_dirs],
           "limit": job.limit, "num_fewshot": job.num_fewshot, "models": results}
    doc = _merge(job.out, doc)
    storage.write_text(job.out, json.dumps(doc, indent=2) + "\n")     # whole or not at all
    if job.sweep is not None:
        from chimera.sweep.report import write_report
        write_report(job.sweep)
    return doc


def _run_tasks(job: EvalJob, tm, results: dict, log) -> None:
    from chimera.eval.harness import client_key, evaluate_tasks, summarize

    def one(url: str, name: str) -> None:
        t0 = time.perf_counter()
        res = evaluate_tasks(url, name, results[name]["block_size"], list(job.tasks), tm,
                             limit=job.limit, num_fewshot=job.num_fewshot,
                             batch_size=job.batch_size, num_concurrent=job.num_concurrent,
                             api_key=client_key())
        results[name]["tasks"] = summarize(res)
        log(f"{name}: {', '.join(job.tasks)} in {time.perf_counter() - t0:.1f} s")

    if job.base_url:
        for name, _ in job.models:
            one(job.base_url, name)
        return
    groups: dict[str, list] = {}                 # one app per tokenizer (see the module docstring)
    for name, ckpt in job.models:
        groups.setdefault(json.dumps(_tokenizer(ckpt), sort_keys=True), []).append((name, ckpt))
    with serving() as deploy:
        for models in groups.values():
            url = deploy(models)
            log(f"serving {', '.join(n for n, _ in models)} at {url}")
            for name, _ in models:
                one(url, name)


def _merge(path: str, doc: dict) -> dict:
    """`doc` over what `path` already holds: per model, new datasets and tasks replace old ones."""
    try:
        old = json.loads(storage.read_text(path))
        models = old["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return doc
    for name, new in doc["models"].items():
        prev = models.get(name) if isinstance(models.get(name), dict) else {}
        models[name] = {**prev, **new, "bpb": {**prev.get("bpb", {}), **new["bpb"]},
                        "tasks": {**prev.get("tasks", {}), **new["tasks"]}}
    return {**doc, "models": models}


def table(doc: dict) -> str:
    """One row per model: bits per byte per dataset, each task's main metric ± stderr."""
    models = doc["models"]
    dsets = sorted({d for m in models.values() for d in m.get("bpb", {})})
    tasks = sorted({(t, v["metric"]) for m in models.values() for t, v in m.get("tasks", {}).items()})
    head = ["model"] + [f"bpb:{d}" for d in dsets] + [f"{t}:{k}" for t, k in tasks]
    rows = []
    for name, m in models.items():
        row = [name] + [f"{m['bpb'][d]['bpb']:.4f}" if d in m.get("bpb", {}) else "" for d in dsets]
        for t, _ in tasks:
            v = m.get("tasks", {}).get(t)
            if v is None or v["value"] is None:
                row.append("")
            else:
                se = v.get("stderr")
                row.append(f"{v['value']:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")
                           + (f" (n={v['n']})" if v.get("n") else ""))
        rows.append(row)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])
