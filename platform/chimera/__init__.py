"""Chimera's platform layer: tokenizers, dataset preparation, memory-mapped token shards and
their loader, and (later) the Ray Train loop, sweeps, checkpoints and runtime helpers.

`platform/` is a source root, not a package; this package installs and imports as `chimera`.
Nothing runs at import time: import the submodule you need (`chimera.tokenizers`,
`chimera.prepare`, `chimera.loader`, ...).
"""
