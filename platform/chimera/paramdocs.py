"""docs/parameters.md, generated from the jobs' own argument parsers.

    python jobs/docs.py --write      # regenerate docs/parameters.md
    python jobs/docs.py --check      # exit 1 (and say so) when it is out of date

Every `jobs/*.py` that defines `build_parser() -> argparse.ArgumentParser` is documented, so a
new job appears once it has one; then the keys of a sweep spec, from SweepSpec's fields. Each job gets one table per argument group (and per
subcommand for jobs with subparsers): flag | type | default | meaning. The meaning is the
flag's help string. A flag whose argparse default is SUPPRESS (train.py's: only flags actually
given reach the config) may carry its real default as the attribute `doc_default` on its
argparse action; `DocDefaultsFormatter` shows the same value in `--help`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from chimera.paths import REPO
JOBS_DIR = REPO / "jobs"
DOC_PATH = REPO / "docs" / "parameters.md"
# the order; jobs not listed follow alphabetically
ORDER = ("prepare", "train", "sweep", "serve", "eval", "sample", "bench")
REGENERATE = "python jobs/docs.py --write"


class DocDefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows `(default: X)` for actions that carry `doc_default`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if hasattr(action, "doc_default") and "(default" not in h:
            h = f"{h} (default: {_fmt_default(action.doc_default)})".strip()
        return h.replace("%", "%%")


def job_modules(jobs_dir: Path = JOBS_DIR) -> list[tuple[str, Any]]:
    """(name, module) for every jobs/*.py (not _*.py) that defines build_parser, in doc order."""
    # jobs import their sibling `_paths`; appended, never prepended: jobs/serve.py must not
    # shadow the `serve` package (nor jobs/X.py any other top-level name) for later imports
    if str(jobs_dir) not in sys.path:
        sys.path.append(str(jobs_dir))
    found = []
    for path in sorted(jobs_dir.glob("*.py")):
        if path.name.startswith("_") or "def build_parser" not in path.read_text():
            continue
        spec = importlib.util.spec_from_file_location(f"_chimera_job_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if callable(getattr(mod, "build_parser", None)):
            found.append((path.stem, mod))
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(found, key=lambda nm: (rank.get(nm[0], len(ORDER)), nm[0]))


# --- rendering ----------------------------------------------------------------------------------
class _CPUs(int):
    """What os.cpu_count() returns while the doc is generated: defaults computed from it are
    the same on every machine, and one that is the count itself reads as words."""

    def __str__(self) -> str:
        return "number of CPUs"

    __repr__ = __str__


@contextlib.contextmanager
def _machine_independent():
    real = os.cpu_count
    os.cpu_count = lambda: _CPUs(8)
    try:
        yield
    finally:
        os.cpu_count = real


def _normalise(text: str) -> str:
    """Machine-independent paths: the shared folder as ../shared, the checkout as <repo>."""
    return text.replace(str(REPO.parent / "shared"), "../shared").replace(str(REPO), "<repo>")


def _fmt_default(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return "[]" if not v else " ".join(str(x) for x in v)
    if isinstance(v, float):
        return repr(v)
    return _normalise(str(v))


def _cell(s: str) -> str:
    return " ".join(s.split()).replace("|", "\\|")


def _type_of(a: argparse.Action) -> str:
    if isinstance(a, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "switch"
    if isinstance(a, argparse._StoreConstAction):
        return "switch"
    if isinstance(a, argparse._CountAction):
        return "count"
    if a.choices is not None and not isinstance(a, argparse._SubParsersAction):
        base = f"one of {', '.join(map(str, a.choices))}"
    else:
        t = a.type
        base = {None: "str", str: "str", int: "int", float: "float"}.get(t)
        if base is None:
            base = getattr(t, "__name__", type(t).__name__).removeprefix("parse_")
    if isinstance(a, argparse._AppendAction):
        base = f"{base} (repeatable)"
    if a.nargs in ("+", "*"):
        base = f"{base} ... ({'one or more' if a.nargs == '+' else 'zero or more'})"
    elif isinstance(a.nargs, int) and a.nargs > 1:
        base = f"{base} × {a.nargs}"
    return base


def _default_of(a: argparse.Action) -> str:
    if a.required:
        return "required"
    if hasattr(a, "doc_default"):
        return _fmt_default(a.doc_default)
    if a.default is argparse.SUPPRESS or a.default is None:
        return "—"
    return _fmt_default(a.default)


def _flag(a: argparse.Action) -> str:
    if isinstance(a, argparse.BooleanOptionalAction):
        longs = [s for s in a.option_strings if not s.startswith("--no-")]
        return " / ".join(f"`{s}`" for s in longs) + f" / `--no-{longs[0][2:]}`"
    return " / ".join(f"`{s}`" for s in a.option_strings) if a.option_strings else f"`{a.dest}`"


def _documented(actions: Iterable[argparse.Action]) -> list[argparse.Action]:
    return [a for a in actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                     argparse._SubParsersAction))]


def _tables(p: argparse.ArgumentParser, lines: list[str], level: str) -> None:
    for g in p._action_groups:
        acts = _documented(g._group_actions)
        if not acts:
            continue
        title = g.title or "arguments"
        if title in ("options", "optional arguments"):
            title = "options"
        lines += [f"{level} {title}", ""]
        if g.description:
            lines += [_cell(g.description), ""]
        lines += ["| flag | type | default | meaning |", "| --- | --- | --- | --- |"]
        for a in acts:
            lines.append(f"| {_flag(a)} | {_cell(_type_of(a))} | {_cell(_default_of(a))} | "
                         f"{_cell(_normalise(a.help or ''))} |")
        lines.append("")
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sp in a.choices.items():
                lines += [f"{level} subcommand `{name}`", ""]
                if helps.get(name):
                    lines += [_cell(helps[name]), ""]
                _tables(sp, lines, level + "#")


def _summary(mod: Any) -> str:
    doc = (mod.__doc__ or "").strip()
    return _cell(doc.split("\n\n")[0]) if doc else ""


def render(jobs: list[tuple[str, Any]]) -> str:
    lines = ["# Parameters of every job", "",
             "<!-- generated by `python jobs/docs.py --write` from the jobs' argument parsers; "
             "do not edit by hand -->", "",
             f"Generated from each job's `build_parser()`: regenerate with `{REGENERATE}` after "
             "changing a flag (tests/test_parameters_doc.py fails while this file and the flags "
             "disagree). `—` means no default: the flag is absent unless given. Flags of type "
             "bool take `--x` / `--no-x`; switches take no value.", ""]
    lines += [f"- [`{n}`](#jobs{n}py)" for n, _ in jobs] + ["- [sweep spec keys](#sweep-spec-keys)", ""]
    for name, mod in jobs:
        with _machine_independent():
            p = mod.build_parser()
        lines += [f"## jobs/{name}.py", ""]
        if _summary(mod):
            lines += [_summary(mod), ""]
        lines += [f"Usage: `{_cell(_usage(p, name))}`", ""]
        _tables(p, lines, "###")
    lines += _spec_table()
    return "\n".join(lines).rstrip() + "\n"


def _spec_table() -> list[str]:
    """The keys of a sweep spec file (`jobs/sweep.py --spec FILE`), from SweepSpec's fields."""
    import dataclasses
    from chimera.sweep.spec import SweepSpec
    lines = ["## sweep spec keys", "",
             "The YAML file of `jobs/sweep.py --spec` (see [sweeps.md](sweeps.md)); `base` and "
             "`space` take the keys of `jobs/train.py` above.", "",
             "| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(SweepSpec):
        if "doc_default" in f.metadata:
            d = f.metadata["doc_default"]
        elif f.default is not dataclasses.MISSING:
            d = "—" if f.default is None else _fmt_default(f.default) if f.default != "" else '""'
        else:
            d = _flow(f.default_factory())
        lines.append(f"| `{f.name}` | {_cell(d)} | {_cell(f.metadata['help'])} |")
    return lines + [""]


def _flow(v: Any) -> str:
    """A YAML flow-style rendering of a small default ({type: fifo}, {})."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    return str(v)


def _usage(p: argparse.ArgumentParser, name: str) -> str:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        return f"python jobs/{name}.py {{{','.join(subs[0].choices)}}} [flags]"
    req = " ".join(f"{a.option_strings[0]} {a.dest.upper()}" for a in p._actions
                   if a.required and a.option_strings)
    return f"python jobs/{name}.py {req + ' ' if req else ''}[flags]"


def all_flags(p: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """(subcommand or '', action) for every documented action, subcommands included."""
    out = [("", a) for a in _documented(p._actions)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += [(name, b) for b in _documented(sp._actions)]
    return out


def check(path: Path = DOC_PATH, jobs: list[tuple[str, Any]] | None = None) -> str | None:
    """None when `path` is up to date, else a message saying how to fix it."""
    want = render(job_modules() if jobs is None else jobs)
    have = path.read_text() if path.exists() else ""
    if have == want:
        return None
    import difflib
    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                             str(path), "generated", n=1))[:40])
    return f"{path} is out of date with the jobs' flags: run `{REGENERATE}`\n{diff}"


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="jobs/docs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help=f"write {DOC_PATH.relative_to(REPO)}")
    g.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    args = p.parse_args(argv)
    jobs = job_modules()
    if args.check:
        msg = check(DOC_PATH, jobs)
        log(msg or f"{DOC_PATH.relative_to(REPO)} is up to date ({len(jobs)} jobs)")
        return 1 if msg else 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(render(jobs))
    log(f"wrote {DOC_PATH.relative_to(REPO)}: {', '.join(n for n, _ in jobs)}")
    return 0
