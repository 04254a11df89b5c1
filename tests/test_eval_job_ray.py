"""jobs/eval.py end to end on a real local Ray cluster: bits per byte on one prepared dataset
and the local multiple-choice task against the server the job starts (and stops) itself;
eval.json, the printed table, and a second run merging into the same file."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_eval_job_serves_evaluates_and_writes_json(ray_cluster, tiny_checkpoint, train_char_data,
                                                   tmp_path, capsys):
    if str(ROOT / "jobs") not in sys.path:
        sys.path.append(str(ROOT / "jobs"))           # for its _paths; never in front of serve/
    spec = importlib.util.spec_from_file_location("chimera_eval_job", ROOT / "jobs" / "eval.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "eval.json"
    rc = job.main(["--checkpoint", f"tiny={tiny_checkpoint.parent}", "--data_dir", str(train_char_data),
                   "--tasks", "shakespeare_nextline", "--limit", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    m = doc["models"]["tiny"]
    name = train_char_data.name
    assert m["block_size"] == 64 and m["tokenizer"] == "char" and m["checkpoint"] == str(tiny_checkpoint)
    assert 1.0 < m["bpb"][name]["bpb"] < 8.0 and m["bpb"][name]["tokens"] > 100_000
    t = m["tasks"]["shakespeare_nextline"]
    assert t["metric"] == "acc" and t["n"] == 8 and 0 <= t["value"] <= 1 and t["stderr"] > 0
    assert f"| model | bpb:{name} | shakespeare_nextline:acc |" in printed
    assert f"| tiny | {m['bpb'][name]['bpb']:.4f} | {t['value']:.4f} ± {t['stderr']:.4f} (n=8) |" in printed
    # a second evaluation (bits per byte only) keeps the task result of the first
    assert job.main(["--checkpoint", f"tiny={tiny_checkpoint.parent}", "--data_dir",
                     str(train_char_data), "--out", str(out)]) == 0
    again = json.loads(out.read_text())["models"]["tiny"]
    assert again["tasks"] == m["tasks"] and again["bpb"] == m["bpb"]
