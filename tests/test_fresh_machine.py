"""The test run looks like a new user's machine (tests/conftest.py): HOME and TMPDIR are fresh
folders, and nothing of the developer's environment (Ray, W&B, caches) reaches the tests."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import conftest


def test_home_and_tmpdir_are_fresh_folders_for_this_run():
    real_home = pwd.getpwuid(os.getuid()).pw_dir
    assert Path.home() != Path(real_home)
    assert Path.home().is_relative_to(conftest.FRESH)
    assert Path(tempfile.gettempdir()).is_relative_to(conftest.FRESH)
    # a subprocess (a job, a CLI) sees the same
    out = subprocess.run([sys.executable, "-c", "import pathlib, tempfile; print(pathlib.Path.home()); "
                          "print(tempfile.gettempdir())"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(Path.home()), tempfile.gettempdir()]


def test_the_developers_environment_does_not_leak_in():
    """conftest, imported with a developer's variables set, drops them all (a subprocess: in
    this session Ray itself has set RAY_* variables by now)."""
    dev = {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled",
           "WANDB_API_KEY": "k", "TIKTOKEN_CACHE_DIR": "/x", "DATA_GYM_CACHE_DIR": "/x",
           "HF_HOME": "/y", "XDG_CACHE_HOME": "/z", "CHIMERA_STORAGE": "s3://b/p",
           "CHIMERA_README_TEST": "required"}
    code = ("import os, shutil, conftest; print(' '.join(sorted(k for k in os.environ if k in "
            f"{sorted(dev)!r}))); print(os.environ['HOME']); shutil.rmtree(conftest.FRESH)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, text=True,
                         env={**os.environ, **dev}, capture_output=True, check=True)
    kept, home = out.stdout.splitlines()
    assert kept == "CHIMERA_README_TEST"                 # the test run's own knob stays
    assert home != os.environ["HOME"] and "cht-" in home
