"""Bits per byte: the per-id byte tables, eval_losses' val_bpb on shards whose bytes are known
(against a closed form and a hand computation), val_bpb/train_bpb in a run's metrics.jsonl,
and sweeps across tokenizers (each trial its own data folder; ranked by bpb, or refused)."""
from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from chimera import paths
from chimera.data.prepare import prepare
from chimera.data.shards import read_manifest
from chimera.data.tokenizers import CharTokenizer, Tokenizer, TokenizerError, get_tokenizer, token_bytes
from chimera.sweep.spec import SweepSpec, SweepSpecError
from chimera.sweep.trials import expand
from chimera.train.measure import eval_losses
from models import LLM, ModelConfig
from models.config import pad_vocab

SAMPLE = "Hello world! Ünïcödé — 漢字 🙂\n\tend <|endoftext|> after"


# --- the tables ---------------------------------------------------------------------------------
def test_gpt2_bytes_per_id_add_up_to_the_text(tiktoken_cache):
    tok = get_tokenizer("gpt2")
    n = token_bytes(tok.to_dict())
    assert n.shape == (50257,) and not n.flags.writeable
    assert n[15496] == len(b"Hello") and n[995] == len(b" world")     # [15496, 995] = "Hello world"
    assert n[50256] == 0                                               # <|endoftext|>: no text
    assert n[:50256].min() >= 1
    ids = tok.encode(SAMPLE)                    # multi-byte characters split across BPE tokens
    assert n[ids].sum() == len(SAMPLE.encode("utf-8"))
    assert token_bytes(tok.to_dict()) is n                             # built once per process


def test_char_and_byte_bytes_per_id():
    tok = CharTokenizer("aé€🙂\n")
    assert token_bytes(tok.to_dict()).tolist() == [1, 2, 3, 4, 1]
    text = "a€\n🙂éa"
    assert token_bytes(tok.to_dict())[tok.encode(text)].sum() == len(text.encode("utf-8"))
    b = token_bytes({"name": "byte", "vocab_size": 256, "eot_id": None})
    assert b.tolist() == [1] * 256
    with pytest.raises(TokenizerError, match="must be a dict with a 'name'"):
        token_bytes({"vocab_size": 3})
    with pytest.raises(TokenizerError, match="says vocab_size=7 but the byte tokenizer has"):
        token_bytes({"name": "byte", "vocab_size": 7})


# --- eval_losses on known bytes -------------------------------------------------------------------
MIXED = "Ünïcödé — 漢字 🙂 naïve café, ½ × ∑ ≠ ∞. "      # 1- to 4-byte characters


def _source(tmp_path) -> tuple:
    """A text whose val split (the last half) starts and ends in ASCII, with multi-byte
    characters and two document ends (gpt2: end-of-text targets, 0 bytes) in between."""
    a, b, d = MIXED * 6, "plain ascii words " * 6, " and that is the end of it." * 8
    c = ("\n".join([MIXED * 3, "<|endoftext|>", "second doc " + MIXED * 2, "<|endoftext|>",
                    "third doc " + MIXED]) + "\n")
    path = tmp_path / "text.txt"
    path.write_text(a + b + c + d, encoding="utf-8")
    return path, len(a) + len(b) // 2, len(a + b + d) + len(c.replace("<|endoftext|>\n", ""))


def _val_bytes_known(tok: Tokenizer, ids: np.ndarray, covered: int) -> int:
    """UTF-8 bytes of the targets ids[1:covered], from the decoded text (not the byte table):
    all the val text's bytes minus those of the first token and of the uncovered tail (both
    plain ASCII, so that they decode alone)."""
    def text(part):
        return tok.decode([int(i) for i in part if i != tok.eot_id])
    assert text(ids[:1]).isascii() and text(ids[covered:]).isascii()
    return (len(text(ids).encode()) - len(text(ids[:1]).encode())
            - len(text(ids[covered:]).encode()))


@pytest.fixture(params=["char", "byte", "gpt2"])
def known_shard(request, tmp_path):
    """(data_dir, tokenizer, val ids) of the text above prepared with each tokenizer."""
    if request.param == "gpt2":
        request.getfixturevalue("tiktoken_cache")
    path, split_at, total = _source(tmp_path)
    out = tmp_path / request.param
    prepare("shakespeare", sources=[path], tokenizer=request.param, out=out,
            val_fraction=1 - (split_at + 0.5) / total, progress=False, log=lambda *_: None)
    m = read_manifest(out)
    assert len(m["splits"]["val"]["shards"]) == 1
    ids = np.fromfile(out / m["splits"]["val"]["shards"][0]["file"], dtype=np.uint16).astype(np.int64)
    return out, Tokenizer.from_dict(m["tokenizer"]), ids


def test_val_bpb_is_nats_over_ln2_over_the_targets_bytes(known_shard):
    from chimera.data.loader import ShardLoader
    data_dir, tok, ids = known_shard
    T = 16
    cfg = ModelConfig.from_dict({"n_layer": 1, "n_embd": 16, "n_head": 2, "attn": "gqa",
                                 "n_kv_heads": 2, "block_size": T,
                                 "up_dim": 32, "vocab_size": pad_vocab(tok.vocab_size)})
    torch.manual_seed(0)
    model = LLM(cfg)
    ld = ShardLoader(data_dir, "val", batch_size=1, block_size=T)    # in order, every window once
    W = ld.windows
    covered = 1 + W * T
    nbytes = _val_bytes_known(tok, ids, covered)
    eot = tok.eot_id if tok.eot_id is not None else -1
    targets = ids[1:covered]
    counted = int((targets != eot).sum())
    table = torch.tensor(token_bytes(tok.to_dict()))
    if tok.name == "gpt2":
        assert len(targets) - counted >= 2 and nbytes > counted       # end-of-text targets
    elif tok.name == "char":
        assert counted == len(targets) < nbytes                       # multi-byte characters
    else:
        assert counted == len(targets) == nbytes
    # hand computation: log-softmax at every target, summed over those with text
    nats = 0.0
    with torch.no_grad():
        for w in range(W):
            x = torch.tensor(ids[w * T:w * T + T])[None]
            y = torch.tensor(ids[w * T + 1:w * T + T + 1])
            logp = torch.log_softmax(model(x)[0][0].double(), -1)             # (T, V)
            nll = -logp[torch.arange(T), y]
            nats += float(nll[y != eot].sum())
    m = eval_losses(model, {"val": ld}, W, contextlib.nullcontext, 1, table)
    assert m["val_bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    # a model that knows nothing (all logits 0: ln V nats per target) gives the closed form
    with torch.no_grad():
        model.lm_head.weight.zero_()
    m = eval_losses(model, {"val": ld}, W, contextlib.nullcontext, 1, table)
    V = cfg.vocab_size
    assert m["val_loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert m["val_bpb"] == pytest.approx(counted * math.log2(V) / nbytes, rel=1e-6)
    assert set(eval_losses(model, {"val": ld}, 1, contextlib.nullcontext, 1)) == {"val_loss", "val_aux"}


# --- training ------------------------------------------------------------------------------------
def test_a_run_logs_bpb_beside_the_losses(train_char_data, tmp_path, capsys):
    from chimera.train.config import load_train_config
    from chimera.train.loop import train_fn_per_worker
    from chimera.train.plan import plan_run
    plan = plan_run(load_train_config({
        "data_dir": str(train_char_data), "n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32,
        "up_dim": 64, "batch_size": 4, "total_batch_size_str": "4*32", "max_iters": 4, "eval": True,
        "eval_interval": 2, "eval_iters": 2, "num_threads": 1, "storage_path": str(tmp_path),
        "run_name": "r"}))
    train_fn_per_worker(plan.worker_config)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:       # Tiny Shakespeare is ASCII: one byte per character, bpb = nats / ln 2
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9)
        assert r["train_bpb"] == pytest.approx(r["train_loss"] / math.log(2), rel=1e-9)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step 4: val ")]
    assert len(line) == 1 and f"val bpb {evals[-1]['val_bpb']:.4f}  " in line[0], line


def test_gpt2_evals_without_the_bpe_files_say_why_they_need_them(tmp_path, monkeypatch,
                                                                 shared_data, request):
    """Training needs no tokenizer; the evals' bits per byte read gpt2's token bytes."""
    import functools
    import requests
    import tiktoken.registry
    from chimera.data import tokenizers
    from chimera.train.config import load_train_config
    from chimera.train.loop import train_fn_per_worker
    from chimera.train.plan import plan_run
    request.getfixturevalue("tiktoken_cache")
    data = tmp_path / "gpt2"
    prepare("tinystories", sources=[shared_data / "tinystories" / "tinystories_sample.txt"],
            tokenizer="gpt2", out=data, val_fraction=0.2, progress=False, log=lambda *_: None)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))

    def no_network(url, *a, **k):
        raise requests.ConnectionError(f"network is unreachable (test): {url}")
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})       # forget encodings loaded earlier
    monkeypatch.setattr(tokenizers, "_token_bytes",                # and tables built earlier
                        functools.lru_cache(maxsize=8)(tokenizers._token_bytes.__wrapped__))
    flags = {"data_dir": str(data), "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16,
             "up_dim": 32, "batch_size": 2, "total_batch_size_str": "2*16", "max_iters": 2,
             "eval_iters": 1, "num_threads": 1, "storage_path": str(tmp_path / "runs")}
    s = train_fn_per_worker(plan_run(load_train_config({**flags, "run_name": "a"})).worker_config)
    assert s["step"] == 2 and "val_bpb" not in s["metrics"]
    with pytest.raises(TokenizerError, match="the evals' bits per byte need the bytes of every "
                                             "token: cannot load the gpt2 BPE files.*TIKTOKEN_CACHE_DIR"):
        train_fn_per_worker(plan_run(load_train_config({**flags, "run_name": "b", "eval": True})).worker_config)


# --- sweeps across tokenizers --------------------------------------------------------------------
BASE = {"dataset": "shakespeare", "n_embd": 32, "n_head": 4, "block_size": 32, "n_layer": 1,
        "batch_size": 4, "total_batch_size_str": "4*32", "max_iters": 4}


@pytest.fixture
def two_tokenizers(tmp_path, monkeypatch, shakespeare_path):
    """<repo>/data/shakespeare_char and _byte (REPO -> tmp_path) from the first 20k characters."""
    monkeypatch.setattr(paths, "REPO", tmp_path)
    src = tmp_path / "s.txt"
    src.write_text(shakespeare_path.read_text()[:20000] + "½ ∞\n")
    for t in ("char", "byte"):
        prepare("shakespeare", sources=[src], tokenizer=t, out=paths.default_data_dir("shakespeare", t),
                progress=False, log=lambda *_: None)
    return {t: paths.default_data_dir("shakespeare", t) for t in ("char", "byte")}


def test_a_sweep_over_tokenizers_gives_each_trial_its_data(two_tokenizers):
    plan = expand(SweepSpec(name="s", base=BASE, metric="val_bpb",
                            space={"tokenizer": {"grid": ["char", "byte"]}}))
    got = {t.train["tokenizer"]: (t.train["data_dir"], t.model_config["vocab_size"]) for t in plan.trials}
    char_vocab = read_manifest(two_tokenizers["char"])["tokenizer"]["vocab_size"]
    assert got == {"char": (str(two_tokenizers["char"]), pad_vocab(char_vocab)),
                   "byte": (str(two_tokenizers["byte"]), 256)}
    plan = expand(SweepSpec(name="s", base=BASE, metric="train_bpb",
                            space={"data_dir": {"grid": [str(d) for d in two_tokenizers.values()]}}))
    assert {t.train["tokenizer"] for t in plan.trials} == {"char", "byte"}


@pytest.mark.parametrize("metric", ["val_loss", "train_loss"])
def test_a_loss_per_token_across_tokenizers_is_refused(two_tokenizers, metric):
    for kw in ({"space": {"tokenizer": {"grid": ["char", "byte"]}}},
               {"space": {"data_dir": {"choice": [str(d) for d in two_tokenizers.values()]}},
                "search": "random", "num_samples": 6}):
        with pytest.raises(SweepSpecError, match=rf"metric='{metric}': the trials use different "
                                                 rf"tokenizers \(byte, char\).*use metric: val_bpb"):
            expand(SweepSpec(name="s", base=BASE, metric=metric, **kw))
    one = expand(SweepSpec(name="s", base=BASE, metric=metric, space={"tokenizer": "byte"}))
    assert {t.train["tokenizer"] for t in one.trials} == {"byte"}      # one tokenizer: per token is fine


@pytest.mark.parametrize("kw, match", [
    ({"space": {"tokenizer": {"grid": ["char", "wordpiece"]}}},
     r"space.tokenizer: 'wordpiece' is not a tokenizer"),
    ({"base": {**BASE, "data_dir": "x"}, "space": {"tokenizer": {"grid": ["char", "byte"]}}},
     "base.data_dir fixes one tokenizer"),
    ({"space": {"tokenizer": {"grid": ["char"]}, "data_dir": {"grid": ["x"]}}}, "at most one of tokenizer and data_dir"),
    ({"space": {"dataset": {"grid": ["a", "b"]}}}, "space.dataset: cannot be searched"),
])
def test_data_choices_are_checked(kw, match):
    with pytest.raises(SweepSpecError, match=match):
        SweepSpec(**{"name": "s", "base": BASE, **kw})


def test_a_missing_tokenizer_folder_names_the_space_key(two_tokenizers):
    with pytest.raises(SweepSpecError, match=r"space.tokenizer='gpt2': .*shakespeare_gpt2: .*prepare it"):
        expand(SweepSpec(name="s", base=BASE, metric="val_bpb",
                         space={"tokenizer": {"grid": ["char", "gpt2"]}}))


def test_the_report_ranks_a_sweep_over_tokenizers_by_bits_per_byte(two_tokenizers, tmp_path):
    """From files alone (no Ray): runs whose per-token order is the opposite of their bpb order."""
    from chimera.sweep.report import collect, write_report
    from chimera.sweep.store import write_plan
    plan = expand(SweepSpec(name="s", base=BASE, metric="val_bpb",
                            space={"tokenizer": {"grid": ["char", "byte"]}}))
    root = tmp_path / "sweep"
    write_plan(plan, root)
    # char: 1.5 nats/token, bpb 2.2 at best; byte: 1.2 nats/token (lower) but bpb 2.6 at best
    hist = {"char": [(0, 4.0, 5.0), (2, 1.6, 2.2), (4, 1.5, 2.3)],
            "byte": [(0, 5.0, 6.0), (2, 1.2, 2.6), (4, 1.3, 2.7)]}
    for t in plan.trials:
        (root / "runs" / t.name).mkdir(parents=True)
        (root / "runs" / t.name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "val_loss": v, "val_bpb": b, "train_loss": v, "train_bpb": b}) + "\n"
            for s, v, b in hist[t.train["tokenizer"]]))
    rep = write_report(root, decode_missing=False)
    doc = json.loads((root / "results.json").read_text())
    assert [(r["tokenizer"], r["val_bpb"], r["best_val_loss"]) for r in doc["trials"]] == \
        [("char", 2.2, 1.5), ("byte", 2.6, 1.2)]
    text = (root / "results.md").read_text()
    assert "metric val_bpb (min); tokenizers byte, char (compared in bits per byte)" in text
    assert "| best val | best val bpb |" in text and "| 1.5000 | 2.2000 |" in text
    png = root / "val_bpb_curves.png"
    assert str(png) in rep["files"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a plan edited to rank these trials per token is refused, as expand refuses the spec
    doc = json.loads((root / "sweep.json").read_text())
    doc["spec"]["metric"] = "val_loss"
    (root / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(SweepSpecError, match="the trials use different tokenizers"):
        collect(root)
