"""Chimera's platform layer, one folder per pipeline stage (data flows one way, top to bottom):

    data/        text -> tokenizer -> uint16 shards + manifest -> loader
    train/       config and flags, the run plan, the training loop that Ray Train runs
    sweep/       spec, trials, the Ray Tune run, the sweep directory, the report
    benchmarks/  the programs of `python jobs/bench.py SUITE`
and beside them: paths (repo root, data folder, storage), checkpoint (directory <-> model),
runtime (connecting to Ray), localcluster (a private `ray start` cluster), paramdocs.

`platform/` is a source root, not a package; this package installs and imports as `chimera`.
Nothing runs at import time: import the submodule you need (`chimera.data.prepare`,
`chimera.train.loop`, `chimera.sweep.run`, ...).
"""
