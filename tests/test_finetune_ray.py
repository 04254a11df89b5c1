"""Fine-tuning on Ray Train (the session's cluster, tests/conftest.py): a LoRA run from a
Chimera checkpoint on two DDP workers, killed once and restarted by Ray, continues from its own
latest checkpoint (not from --init_from again) and leaves the base untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chimera import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture
def train_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import train
    return train.main


def test_lora_run_restarted_by_ray_resumes_its_own_checkpoint(ray_cluster, tiny_checkpoint,
                                                              train_char_data, tmp_path, train_main):
    base, _, _ = ckpt.load_model(tiny_checkpoint)
    rc = train_main(["--data_dir", str(train_char_data), "--storage_path", str(tmp_path),
                     "--run_name", "lora", "--init_from", str(tiny_checkpoint), "--lora_rank", "4",
                     "--lora_targets", "W_uk,W_uv,c_proj", "--dropout", "0.0",
                     "--num_workers", "2", "--batch_size", "4", "--total_batch_size_str", "2*4*64",
                     "--max_iters", "8", "--learning_rate", "1e-2", "--warmup_steps", "2",
                     "--eval", "--eval_interval", "8", "--eval_iters", "2", "--log_interval", "2",
                     "--save_model", "--ckpt_interval", "4", "--crash_at_step", "6",
                     "--max_failures", "1"])
    assert rc == 0
    run = tmp_path / "lora"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8]             # step 0 once: no second start
    assert rows[-1]["resumed_from_step"] == 4 and rows[-1]["step"] == 8
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    h = rows[-1]["param_hashes"]
    assert len(h) == 2 and h[0] == h[1]                     # DDP kept the adapters in sync
    result = json.loads((run / "result.json").read_text())
    assert result["init_from"] == str(tiny_checkpoint)
    last = run / "checkpoint_000008"
    info = json.loads((last / ckpt.ADAPTER).read_text())
    assert info["base_sha256"] == ckpt.weights_sha256(base) and info["base"] == str(tiny_checkpoint)
    from safetensors.torch import load_file
    sd = base.state_dict()
    for k, v in load_file(str(last / ckpt.WEIGHTS)).items():
        assert torch.equal(v, sd[k]), k
    merged, _, _ = ckpt.load_model(last)
    x = torch.randint(0, 65, (2, 16))
    assert (merged(x)[0] - base(x)[0]).abs().max() > 1e-4
