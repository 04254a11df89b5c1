"""Sweeps: spec (the YAML spec and its trials), run (the Ray Tune run), report (tables and
plots from a sweep directory). See docs/sweeps.md."""
