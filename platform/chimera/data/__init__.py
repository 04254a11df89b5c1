"""Data: sources (datasets and their text), tokenizers, prepare (text -> shards), shards (the
on-disk format and manifest), loader (shards -> batches). See docs/data.md."""
