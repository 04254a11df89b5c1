"""Make the repository importable from an entry point, installed or not.

`ray job submit --working-dir . -- python jobs/X.py` runs the submitted tree on a cluster
where the project may not be installed; `platform/` is a source root (not a package), so
`chimera` is found only with `<repo>/platform` on sys.path. Entry points call `setup()` first
thing in main(), never at import time.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup() -> Path:
    """Put <repo> and <repo>/platform at the front of sys.path; return the repo root."""
    for p in (str(REPO / "platform"), str(REPO)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    return REPO
