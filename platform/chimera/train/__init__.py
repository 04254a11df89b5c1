"""Training: config (TrainConfig, flags, the run plan), loop (what every Ray Train worker runs,
and `fit`), schedule (learning rate), batchexpr (tokens-per-step expressions). See docs/training.md."""
