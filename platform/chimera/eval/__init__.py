"""Evaluation: bits per byte on prepared validation shards (bpb), lm-evaluation-harness tasks
against a Chimera server (harness), the shipped local tasks (tasks) and the job that runs both
(run: `python jobs/eval.py`). See the README's Evaluation section."""
