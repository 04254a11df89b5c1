"""Regenerate docs/parameters.md from every job's argument parser.

    python jobs/docs.py --write      # after adding or changing a flag of any job
    python jobs/docs.py --check      # exit 1 when the file is out of date (tests do this too)

Every jobs/*.py with a `build_parser()` is documented (see chimera.paramdocs).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    from chimera.paramdocs import main as docs_main
    return docs_main(argv)


if __name__ == "__main__":
    sys.exit(main())
