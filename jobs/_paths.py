"""Make the repository importable from an entry point, installed or not.

`ray job submit --working-dir . -- python jobs/X.py` runs the submitted tree on a cluster
where the project may not be installed; `platform/` is a source root (not a package), so
`chimera` is found only with `<repo>/platform` on sys.path. Entry points call `setup()` first
thing in main(), never at import time. (The repository root is chimera.paths.REPO; this file
finds it from its own place only to put it on sys.path before chimera can be imported.)
"""
from __future__ import annotations

import sys
from pathlib import Path


def setup() -> Path:
    """Put <repo> and <repo>/platform at the front of sys.path; return the repo root."""
    here = Path(__file__).resolve().parents[1]
    for p in (str(here / "platform"), str(here)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    from chimera.paths import REPO
    return REPO
