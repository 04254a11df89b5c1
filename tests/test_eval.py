"""jobs/eval.py without Ray: the local tasks' builder (deterministic, the shipped files equal a
rebuild, items from the validation split), bits per byte against a direct in-process
computation, a data folder of another tokenizer refused, bad flags -> exit code 2 before Ray
starts, and eval.json's columns in the sweep report."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chimera.eval.bpb import bits_per_byte, check_data_dir
from chimera.eval.tasks import TASK_DIR, build_task_files, val_text

ROOT = Path(__file__).resolve().parents[1]


# --- the local tasks --------------------------------------------------------------------------
def test_shipped_task_files_equal_a_rebuild_and_come_from_the_val_split(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    files = build_task_files(text)
    assert files == build_task_files(text)                            # pure
    for name, content in files.items():
        assert (TASK_DIR / name).read_bytes() == content.encode("utf-8"), \
            f"{name} differs from a rebuild: python jobs/eval.py --build_tasks {shakespeare_path}"
    val = val_text(text)
    assert len(val) == len(text) - int(len(text) * 0.9) and text.endswith(val)
    train = text[: len(text) - len(val)]
    mc = [json.loads(x) for x in files["shakespeare_nextline.jsonl"].splitlines()]
    assert len(mc) == 64 and len({json.dumps(x) for x in mc}) == 64
    for x in mc:
        right = x["choices"][x["label"]]
        assert len(x["choices"]) == 4 == len(set(x["choices"]))
        assert f"{x['context']}\n{right}\n" in val                    # the true next line
        assert len(x["context"]) + 1 + max(map(len, x["choices"])) < 60  # fits block_size 64
    assert sorted({x["label"] for x in mc}) == [0, 1, 2, 3]
    gen = [json.loads(x) for x in files["shakespeare_complete.jsonl"].splitlines()]
    assert len(gen) == 32
    for x in gen:
        assert f"\n{x['context']}{x['target']}\n" in val and x["target"].startswith(" ")
        assert len(x["context"]) + len(x["target"]) <= 40
    assert sum(f"\n{x['context']}{x['target']}\n" in train for x in gen) < len(gen)


def test_local_tasks_load_offline_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(TASK_DIR))
    try:
        import local_data
        ds = local_data.load(data_file="shakespeare_nextline.jsonl", version=1.0)["test"]
    finally:
        sys.path.remove(str(TASK_DIR))
    assert len(ds) == 64 and set(ds.column_names) == {"context", "choices", "label"}


# --- bits per byte ------------------------------------------------------------------------------
def test_bits_per_byte_equal_a_direct_computation(tiny_checkpoint, train_char_data):
    from chimera.checkpoint import load_model
    from chimera.data.shards import read_manifest

    model, tok, _ = load_model(tiny_checkpoint)
    got = bits_per_byte(model, tok, train_char_data, batch_size=256)
    T = model.cfg.block_size
    man = read_manifest(train_char_data)
    ids = torch.from_numpy(__import__("numpy").fromfile(
        train_char_data / man["splits"]["val"]["shards"][0]["file"], dtype="<u2").astype("int64"))
    n_win = (len(ids) - 1) // T
    used = n_win // 256 * 256                                 # whole batches only
    x = torch.stack([ids[k * T:k * T + T] for k in range(used)])
    y = torch.stack([ids[k * T + 1:k * T + T + 1] for k in range(used)])
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(x[i:i + 64])[0].float().flatten(0, 1), y[i:i + 64].flatten(),
                                   reduction="sum").item() for i in range(0, used, 64))
    text_bytes = len(tok.decode(y.flatten().tolist()).encode("utf-8"))
    assert got["windows"] == used and got["tokens"] == used * T
    assert got["bpb"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)
    assert got["loss"] == pytest.approx(nats / (used * T), rel=1e-5)
    assert not model.training


def test_eval_job_reads_bpb_data_and_checkpoint_from_s3_like_local(tiny_checkpoint, train_char_data,
                                                                  s3_prefix, tmp_path, eval_job):
    """jobs/eval.py --checkpoint s3://... --data_dir s3://... --out s3://...: the same bits
    per byte as the local folders (the loader reads the shards by ranged GETs)."""
    from chimera import storage
    storage.upload_dir(train_char_data, f"{s3_prefix}/shakespeare_char")
    storage.upload_dir(tiny_checkpoint.parent, f"{s3_prefix}/run")
    for rel in storage.walk_files(train_char_data):
        assert storage.sha256(train_char_data / rel) == storage.sha256(f"{s3_prefix}/shakespeare_char/{rel}")
    assert eval_job.main(["--checkpoint", str(tiny_checkpoint), "--data_dir", str(train_char_data),
                          "--out", str(tmp_path / "local.json")]) == 0
    assert eval_job.main(["--checkpoint", f"tiny={s3_prefix}/run", "--data_dir",
                          f"{s3_prefix}/shakespeare_char", "--out", f"{s3_prefix}/eval.json"]) == 0
    local = json.loads((tmp_path / "local.json").read_text())["models"]
    remote = storage.read_json(f"{s3_prefix}/eval.json")["models"]
    (a,), (b,) = local.values(), remote.values()
    got, want = b["bpb"]["shakespeare_char"], a["bpb"][train_char_data.name]
    assert (got["bpb"], got["tokens"]) == (want["bpb"], want["tokens"]) and got["tokens"] > 0


def test_data_of_another_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    from chimera.data.prepare import prepare
    src = tmp_path / "t.txt"
    src.write_text("some text to prepare with bytes\n" * 50)
    out = prepare("shakespeare", sources=[src], tokenizer="byte", out=tmp_path / "b",
                  progress=False, log=lambda *_: None)
    info = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"prepared with tokenizer byte, vocab 256, but the "
                                         r"checkpoint uses char, vocab 65"):
        check_data_dir(tmp_path / "b", info)
    with pytest.raises(ValueError, match="not a prepared data folder"):
        check_data_dir(tmp_path, info)
    assert out


# --- the job's flags ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_job():
    """jobs/eval.py, loaded from its file (jobs/ appended to sys.path, never prepended: its
    jobs/serve.py must not shadow the serve package)."""
    if str(ROOT / "jobs") not in sys.path:
        sys.path.append(str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location("chimera_eval_job", ROOT / "jobs" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def byte_data(tmp_path_factory):
    from chimera.data.prepare import prepare
    d = tmp_path_factory.mktemp("bytes")
    (d / "t.txt").write_text("bytes, not characters\n" * 60)
    return prepare("shakespeare", sources=[d / "t.txt"], tokenizer="byte", out=d / "byte_data",
                   progress=False, log=lambda *_: None) and d / "byte_data"


@pytest.mark.parametrize("case,msg", [
    (["--checkpoint", "/nonexistent/run"], "neither a checkpoint directory"),
    ([], "give --checkpoint PATH"),
    (["--checkpoint", "CKPT"], "nothing to evaluate"),
    (["--checkpoint", "CKPT", "--data_dir", "BYTES"], "prepared with tokenizer byte"),
    (["--checkpoint", "CKPT", "--data_dir", "/nonexistent/data"], "not a prepared data folder"),
    (["--checkpoint", "CKPT", "--data_dir", "CHARS", "--limit", "0"], "--limit must be > 0"),
    (["--checkpoint", "CKPT", "--data_dir", "CHARS", "--base_url", "http://127.0.0.1:1"],
     "--base_url is for --tasks"),
    (["--from_sweep", "/nonexistent/sweep"], "not a readable sweep result"),
    (["--checkpoint", "CKPT", "--checkpoint", "b=CKPT", "--data_dir", "CHARS"], "say where with --out"),
])
def test_bad_flags_exit_2_before_ray(eval_job, capsys, tiny_checkpoint, train_char_data, byte_data,
                                     case, msg, monkeypatch):
    import ray

    import chimera.runtime

    def no_ray(*a, **k):                        # (the suite's own cluster may be up already)
        raise AssertionError("the job started Ray before refusing its flags")
    monkeypatch.setattr(chimera.runtime, "init_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    subst = {"CKPT": str(tiny_checkpoint), "b=CKPT": f"b={tiny_checkpoint}", "BYTES": str(byte_data),
             "CHARS": str(train_char_data)}
    assert eval_job.main([subst.get(a, a) for a in case]) == 2
    assert msg in capsys.readouterr().err


def test_unknown_task_and_bad_server_exit_2(eval_job, capsys, tiny_checkpoint, tmp_path):
    from chimera.localcluster import free_port
    ck = ["--checkpoint", str(tiny_checkpoint)]
    assert eval_job.main([*ck, "--tasks", "shakespeare_nextline,no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) no_such_task" in err and "shakespeare_complete" in err
    assert eval_job.main([*ck, "--tasks", "shakespeare_nextline", "--include_path", str(tmp_path / "x")]) == 2
    assert "--include_path" in capsys.readouterr().err
    for url, msg in ((f"http://127.0.0.1:{free_port()}", "no Chimera server answers GET /v1/models"),
                     ("ftp://127.0.0.1:8000", "give the server's root"),
                     ("http://127.0.0.1:8000/v1/completions", "give the server's root")):
        assert eval_job.main([*ck, "--tasks", "shakespeare_nextline", "--base_url", url]) == 2
        assert msg in capsys.readouterr().err


# --- the sweep report's columns ------------------------------------------------------------------
def test_sweep_report_adds_the_eval_columns(train_char_data, tmp_path):
    from chimera.sweep.report import write_report
    from chimera.sweep.spec import SweepSpec
    from chimera.sweep.store import EVAL, write_plan
    from chimera.sweep.trials import expand

    plan = expand(SweepSpec(name="s", base={"n_embd": 32, "n_head": 4, "block_size": 32, "n_layer": 2,
                                            "batch_size": 4, "total_batch_size_str": "4*32",
                                            "max_iters": 10, "data_dir": str(train_char_data)},
                            layers={"groups": [2], "attn": {"a": {"attn": "gqa", "n_kv_heads": 2},
                                                            "b": {"attn": "gqa", "n_kv_heads": 1}}},
                            decode_tokens=0))
    write_plan(plan, tmp_path)
    for t, v in zip(plan.trials, (2.0, 2.5)):
        run = tmp_path / "runs" / t.name
        (run / "llm_model_best").mkdir(parents=True)
        (run / "llm_model_best" / "config.json").write_text(json.dumps(t.model_config))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": v}) + "\n")
        (run / "summary.json").write_text(json.dumps({"step": 10}))
    write_report(tmp_path, decode_missing=False)
    assert "bpb:" not in (tmp_path / "results.md").read_text()
    (tmp_path / EVAL).write_text(json.dumps({"models": {
        "t000": {"trial": "t000", "bpb": {"shakespeare_char": {"bpb": 2.91234}},
                 "tasks": {"shakespeare_nextline": {"metric": "acc", "value": 0.3125, "stderr": 0.06}}},
        "other": {"trial": None, "bpb": {"x": {"bpb": 9.0}}, "tasks": {}}}}))
    rep = write_report(tmp_path, decode_missing=False)
    lines = rep["table"].splitlines()
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    assert head[-2:] == ["bpb:shakespeare_char", "shakespeare_nextline:acc"]
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:]}
    assert rows["t000"][-2:] == ["2.9123", "0.3125"] and rows["t001"][-2:] == ["", ""]
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0].endswith("bpb:shakespeare_char,shakespeare_nextline:acc")
    res = json.loads((tmp_path / "results.json").read_text())
    t0 = next(t for t in res["trials"] if t["trial_id"] == "t000")
    assert t0["bpb:shakespeare_char"] == 2.91234
