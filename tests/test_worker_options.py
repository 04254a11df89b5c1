"""The training options that decide where workers run and how many: worker_resources (extra
Ray resources per worker, e.g. a GPU node type's GPU while computing on CPU) and min_workers
(elastic data-parallel training between min_workers and num_workers), each checked before any
worker starts. Their runs: tests/test_autoscaling.py, tests/test_multinode.py (elastic)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from chimera.train.config import TrainConfig, TrainConfigError, load_train_config
from chimera.train.plan import default_run_name, plan_run

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_embd=32, n_head=4, attn="gqa", n_kv_heads=2, up_dim=64, block_size=32,
            batch_size=8, total_batch_size_str="2*8*32", num_threads=1)


def _plan(data, tmp_path, **kw):
    return plan_run(load_train_config({**TINY, "data_dir": str(data),
                                       "storage_path": str(tmp_path), **kw}))


@pytest.mark.parametrize("kw,match", [
    ({"worker_resources": "{GPU: 1}"}, r"worker_resources='\{GPU: 1\}' is not JSON"),
    ({"worker_resources": "[1]"}, "must be a JSON object of resource name -> amount"),
    ({"worker_resources": '{"GPU": -1}'}, r"worker_resources\['GPU'\]=-1 must be a number >= 0"),
    ({"worker_resources": '{"GPU": "one"}'}, r"worker_resources\['GPU'\]='one' must be a number"),
    ({"worker_resources": '{"CPU": 2}'}, "CPU is set by num_threads"),
    ({"worker_resources": '{"GPU": 1}', "use_gpu": True}, "GPU is already 1 per worker"),
    ({"min_workers": 0, "num_workers": 2}, r"min_workers=0 must be in \[1, num_workers=2\]"),
    ({"min_workers": 3, "num_workers": 2}, r"min_workers=3 must be in \[1, num_workers=2\]"),
    ({"min_workers": 1, "num_workers": 2, "resize_interval_s": 0}, "resize_interval_s=0.0 must be > 0"),
    ({"min_workers": 1, "in_process": True}, "in_process runs one worker without restarts"),
])
def test_rejects(kw, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict(kw)


def test_worker_resources_from_a_config_file_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("worker_resources: {GPU: 1, spot: 0.5}\n")
    tc = load_train_config(config_file=f)
    assert tc.extra_resources() == {"GPU": 1.0, "spot": 0.5}
    assert TrainConfig.from_dict(tc.to_dict()) == tc           # survives the trip to workers


def test_scaling_config_requests_the_resources_and_elastic_range():
    from chimera.train.loop import scaling_config
    s = scaling_config(TrainConfig(num_workers=2, worker_resources='{"GPU": 1}'))
    assert s.num_workers == 2 and s.resources_per_worker == {"CPU": 1, "GPU": 1.0}
    assert s.use_gpu                                   # Ray's rule for a GPU request
    assert not TrainConfig(num_workers=2, worker_resources='{"GPU": 1}').use_gpu   # CPU compute
    s = scaling_config(TrainConfig(num_workers=4, min_workers=2, resize_interval_s=5, num_threads=2))
    assert s.num_workers == (2, 4) and s.elasticity_enabled and s.min_workers == 2
    assert s.elastic_resize_monitor_interval_s == 5.0 and s.resources_per_worker == {"CPU": 2}
    assert not s.use_gpu
    assert scaling_config(TrainConfig(use_gpu=True)).resources_per_worker == {"CPU": 1, "GPU": 1}


def test_elastic_batch_must_divide_at_every_world_size(train_char_data, tmp_path):
    plan = _plan(train_char_data, tmp_path, num_workers=2, min_workers=1)    # 512 = 2*256 = 1*...
    assert plan.grad_accum == 1
    with pytest.raises(TrainConfigError, match=r"elastic min_workers=2..num_workers=3: at 2 "
                                               r"worker\(s\), total_batch_size_str='3\*8\*32'"):
        _plan(train_char_data, tmp_path, num_workers=3, min_workers=2, total_batch_size_str="3*8*32")
    assert _plan(train_char_data, tmp_path, num_workers=3, total_batch_size_str="3*8*32").grad_accum == 1


def test_run_name_ignores_placement_but_not_elasticity(train_char_data, tmp_path):
    base = _plan(train_char_data, tmp_path, num_workers=2)
    name = lambda **kw: default_run_name(load_train_config({**TINY, "data_dir": base.train.data_dir,
                                                            "num_workers": 2, **kw}), base.model_config)
    assert name() == base.run_name
    assert name(worker_resources='{"GPU": 1}', resize_interval_s=5.0) == base.run_name
    assert name(min_workers=1) != base.run_name


def test_train_job_names_a_bad_worker_resources_flag(train_char_data, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import train as train_job
        rc = train_job.main(["--data_dir", str(train_char_data), "--storage_path", str(tmp_path),
                             "--worker_resources", "GPU=1"])
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    assert rc == 2 and "worker_resources='GPU=1' is not JSON" in capsys.readouterr().err
