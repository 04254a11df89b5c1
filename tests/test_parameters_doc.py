"""docs/parameters.md is generated from the jobs' parsers (chimera.paramdocs) and must agree
with them: regenerate with `python jobs/docs.py --write`."""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest

from chimera import paramdocs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def jobs():
    return paramdocs.job_modules()


def test_committed_doc_matches_the_flags(jobs):
    msg = paramdocs.check(paramdocs.DOC_PATH, jobs)
    assert msg is None, msg


def test_every_job_with_a_parser_is_found(jobs):
    names = [n for n, _ in jobs]
    for required in ("prepare", "train", "bench"):
        assert required in names
    on_disk = sorted(p.stem for p in (ROOT / "jobs").glob("*.py")
                     if not p.stem.startswith("_") and "def build_parser" in p.read_text())
    assert sorted(names) == on_disk
    order = [n for n in paramdocs.ORDER if n in names]       # the order first
    assert names[:len(order)] == order


def _section(doc: str, job: str) -> str:
    start = doc.index(f"## jobs/{job}.py\n")
    end = doc.find("\n## jobs/", start + 1)
    return doc[start:end if end != -1 else None]


def test_every_flag_of_every_job_is_in_its_section(jobs):
    doc = paramdocs.render(jobs)
    for name, mod in jobs:
        sec = _section(doc, name)
        for sub, a in paramdocs.all_flags(mod.build_parser()):
            where = sec[sec.index(f"subcommand `{sub}`"):] if sub else sec
            for opt in a.option_strings:
                assert f"`{opt}`" in where, f"jobs/{name}.py {sub} {opt} is missing from the doc"


# Flags that had no help string when this test was written (other owners' jobs). New flags
# must have one; owners: add the help string, then drop the flag from this list.
KNOWN_WITHOUT_HELP: dict[str, set[str]] = {}       # none left: every flag says what it does


@pytest.mark.parametrize("job", list(paramdocs.ORDER))
def test_every_flag_has_a_meaning(jobs, job):
    mods = dict(jobs)
    if job not in mods:
        pytest.skip(f"jobs/{job}.py has no build_parser yet")
    missing = {f"{sub + ' ' if sub else ''}{a.option_strings[0] if a.option_strings else a.dest}"
               for sub, a in paramdocs.all_flags(mods[job].build_parser()) if not (a.help or "").strip()}
    new = sorted(missing - KNOWN_WITHOUT_HELP.get(job, set()))
    assert not new, f"jobs/{job}.py: flags without a help string (their meaning in " \
                    f"docs/parameters.md): {', '.join(new)}"


def test_train_rows_show_real_defaults_types_and_meanings(jobs):
    sec = _section(paramdocs.render(jobs), "train")
    assert "| `--max_iters` | int | 500 | optimizer steps |" in sec
    assert "| `--learning_rate` | float | 0.0003 |" in sec
    assert "| `--eval` / `--no-eval` | bool | off |" in sec
    assert "| `--attn` | str | mla |" in sec                       # models.config defaults
    assert "| `--storage_path` | str | — |" in sec
    assert "/work/" not in paramdocs.render(jobs)                  # no machine paths


def test_train_help_shows_the_same_defaults(jobs):
    text = dict(jobs)["train"].build_parser().format_help()
    assert "optimizer steps (default: 500)" in " ".join(text.split())


def _fake_job(build) -> types.ModuleType:
    m = types.ModuleType("fake")
    m.__doc__ = "A fake job.\n\nMore text."
    m.build_parser = build
    return m


def test_check_fails_when_a_flag_changes(tmp_path):
    def v1():
        p = argparse.ArgumentParser()
        p.add_argument("--steps", type=int, default=3, help="how many")
        g = p.add_argument_group("extra")
        g.add_argument("--fast", action="store_true", help="go fast")
        g.add_argument("--mode", choices=["a", "b"], default="a", help="which")
        return p

    def v2():
        p = v1()
        p.add_argument("--new_flag", type=float, help="added later")
        return p

    doc = tmp_path / "parameters.md"
    doc.write_text(paramdocs.render([("fake", _fake_job(v1))]))
    assert paramdocs.check(doc, [("fake", _fake_job(v1))]) is None
    text = doc.read_text()
    assert "| `--steps` | int | 3 | how many |" in text
    assert "### extra" in text and "| `--fast` | switch | off | go fast |" in text
    assert "| `--mode` | one of a, b | a | which |" in text
    msg = paramdocs.check(doc, [("fake", _fake_job(v2))])
    assert msg is not None and "python jobs/docs.py --write" in msg and "--new_flag" in msg
    doc.write_text(text.replace("how many", "how much"))         # a hand edit is caught too
    assert paramdocs.check(doc, [("fake", _fake_job(v1))]) is not None


def test_subcommands_get_their_own_tables():
    def build():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="suite", required=True)
        a = sub.add_parser("alpha", help="first suite")
        a.add_argument("--x", type=int, default=1, help="x value")
        b = sub.add_parser("beta", help="second suite")
        b.add_argument("--y", nargs="+", help="ys")
        return p

    text = paramdocs.render([("multi", _fake_job(build))])
    assert "Usage: `python jobs/multi.py {alpha,beta} [flags]`" in text
    alpha = text[text.index("subcommand `alpha`"):text.index("subcommand `beta`")]
    assert "first suite" in alpha and "| `--x` | int | 1 | x value |" in alpha
    assert "| `--y` | str ... (one or more) | — | ys |" in text[text.index("subcommand `beta`"):]


def test_docs_job_cli(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_docs_job", ROOT / "jobs" / "docs.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    assert docs.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_loading_the_jobs_shadows_no_package():
    """Collecting the jobs must not let jobs/serve.py hide the `serve` package from whatever
    is imported next (the rest of the test session): a fresh interpreter shows it."""
    import os
    import subprocess
    code = ("import sys; from chimera import paramdocs; paramdocs.job_modules(); "
            "import serve.engine; print(serve.engine.__file__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(os.path.join("serve", "engine.py"))


def test_cpu_count_defaults_do_not_depend_on_the_machine(monkeypatch):
    import os

    def build():
        p = argparse.ArgumentParser()
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads")
        p.add_argument("--half", type=int, default=max(1, os.cpu_count() // 2), help="half")
        return p

    docs = []
    for cpus in (2, 64):
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        docs.append(paramdocs.render([("fake", _fake_job(build))]))
    assert docs[0] == docs[1]
    assert "| `--threads` | int | number of CPUs | threads |" in docs[0]
    assert "| `--half` | int | 4 | half |" in docs[0]
    assert os.cpu_count() == 64                                    # put back afterwards
