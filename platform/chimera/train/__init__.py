"""Training: config (TrainConfig, flags, the run plan), loop (what every Ray Train worker runs,
and `fit`), trainer (the Trainer: build, restore, step, evaluate, record, checkpoint), context
(under Ray Train or in-process), hooks and faults (watching a run; the tests' crash), measure
(MFU, eval losses, parameter hash), schedule (learning rate), batchexpr (tokens-per-step
expressions). See docs/training.md."""
