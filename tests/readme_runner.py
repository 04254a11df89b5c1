"""Run the README's command blocks as a new user would type them, in order, in one shell.

    blocks = readme_blocks(README.read_text())        # every fenced block, with its skip reason
    with Sandbox(copy_of_the_repo, home=..., tmp=...) as sh:
        step = sh.run("make demo SOURCE=...", timeout=600)   # Step(rc, output, failed)

Conventions the README follows (tests/test_readme.py checks them):
- Fenced ```bash and ```python blocks are run, top to bottom; other fences (output, YAML) are
  not. A block right after `<!-- not run by tests: REASON -->` is not run, and says why.
- A ```bash block whose lines start with `$ ` is a transcript: each `$ command` runs on its
  own and its output must match the lines shown under it (`match_output`).
- All blocks share one bash process, as one terminal does: `source .venv/bin/activate`,
  `export` and background jobs (`cmd &` ... `kill %1`) carry over to the blocks after it.
  Python blocks run as `python - < block.py` in that shell (its python, its current dir).

The shell runs in fresh PID, network and mount namespaces (`unshare`): Ray's default ports
(6379, 8265, 8000) are free there whatever else runs on the machine, and the README's `ray
stop`, which kills every Ray process it can see, sees only the sandbox's. HOME and TMPDIR are
new empty folders and PATH is the system's without any virtualenv: a new user's machine.
"""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SKIP = re.compile(r"<!--\s*not run by tests:\s*(.*?)\s*-->", re.S)
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    line: int             # 1-based line of the opening fence
    lang: str             # "bash", "python", "yaml", "" (output)
    code: str
    heading: str          # the section it is in
    skip: str | None      # the reason it is not run, or None

    @property
    def runnable(self) -> bool:
        return self.lang in ("bash", "python") and self.skip is None

    def where(self) -> str:
        return f"README.md:{self.line} ({self.heading})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the skip reason of a preceding marker."""
    lines = text.splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            heading = ln.lstrip("# ").strip()
        m = FENCE.match(ln)
        if not m:
            i += 1
            continue
        start, j = i, i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed code fence")
        k = start - 1                                   # the marker: the line right before
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip = None
        if k >= 0 and lines[k].strip().endswith("-->"):
            t = k
            while t > 0 and "<!--" not in lines[t]:
                t -= 1
            mm = SKIP.search("\n".join(lines[t:k + 1]))
            if mm:
                skip = " ".join(mm.group(1).split())
        blocks.append(Block(start + 1, m.group(1), "\n".join(lines[start + 1:j]), heading, skip))
        i = j + 1
    return blocks


def transcript(code: str) -> list[tuple[str, list[str]]] | None:
    """`$ cmd` lines with the output lines shown under each; None when the block has none."""
    if not any(ln.startswith("$ ") for ln in code.splitlines()):
        return None
    out: list[tuple[str, list[str]]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.startswith("$ "):
            if not out:
                raise ValueError(f"transcript text before its first `$ ` command: {ln!r}")
            out[-1][1].append(ln)
            i += 1
            continue
        cmd = ln[2:]
        while cmd.endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd + "\n" + lines[i]
        out.append((cmd, []))
        i += 1
    return out


def _json(line: str):
    s = line[len("data: "):] if line.startswith("data: ") else line
    if not s.startswith(("{", "[")):
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return None


def _shape(v):
    """JSON structure without values: dict keys, list lengths, leaves as their JSON type."""
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [_shape(x) for x in v]
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def match_output(shown: list[str], actual: str) -> str | None:
    """None when `actual` matches the output a README transcript shows, else what differs.

    Blank lines are ignored. A shown JSON line (or SSE `data: {...}` line) matches an actual
    one of the same structure (keys, list lengths, value types; values may differ: ids, times,
    sampled text); `null` matches anything. Any other shown line must equal the actual line,
    where `...` stands for any text.
    """
    want = [ln for ln in shown if ln.strip()]
    got = [ln for ln in actual.splitlines() if ln.strip()]
    if len(want) != len(got):
        return f"{len(got)} output lines, the README shows {len(want)}:\n" + "\n".join(got[-20:])
    for w, g in zip(want, got):
        wj, gj = _json(w), _json(g)
        if wj is not None:
            if gj is None:
                return f"expected JSON like {w!r}, got {g!r}"
            ws, gs = _shape(wj), _shape(gj)
            if not _same_shape(ws, gs):
                return f"JSON of another shape:\n  README {json.dumps(ws)}\n  actual {json.dumps(gs)}"
            continue
        pat = "^" + ".*".join(re.escape(p) for p in w.split("...")) + "$"
        if not re.match(pat, g):
            return f"expected {w!r}, got {g!r}"
    return None


def _same_shape(w, g) -> bool:
    if w == "NoneType":
        return True
    if isinstance(w, dict):
        return isinstance(g, dict) and w.keys() == g.keys() and all(_same_shape(w[k], g[k]) for k in w)
    if isinstance(w, list):
        return isinstance(g, list) and len(w) == len(g) and all(map(_same_shape, w, g))
    return w == g


# --- the sandbox: one bash in its own namespaces ------------------------------------------------
def user_path() -> str:
    """PATH without virtualenvs: a new user's shell before `source .venv/bin/activate`."""
    keep = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if p and not (Path(p) / "activate").is_file() and ".venv" not in Path(p).parts]
    for p in ("/usr/sbin", "/sbin"):                       # `ip`, to bring up loopback
        if p not in keep:
            keep.append(p)
    return os.pathsep.join(keep)


@dataclass
class Step:
    rc: int
    output: str
    failed: list[str] = field(default_factory=list)     # "line: command" of each failed command


class Sandbox:
    """One bash in new PID/network/mount namespaces, cwd `root`, HOME `home`, TMPDIR `tmp`."""

    def __init__(self, root: Path, home: Path, tmp: Path, scratch: Path):
        self.root, self.home, self.tmp, self.scratch = root, home, tmp, scratch
        self.nonce = "@@readme-" + secrets.token_hex(4)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.n = 0
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unshare() -> list[str]:
        """The namespaces: as root directly, else inside a user namespace mapping us to root."""
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        return ["unshare", *user, "--pid", "--net", "--mount", "--fork", "--mount-proc"]

    @classmethod
    def available(cls) -> str | None:
        """None when namespaces can be made here, else why not."""
        if not shutil.which("unshare"):
            return "unshare (util-linux) is not installed"
        r = subprocess.run([*cls.unshare(), "true"], capture_output=True, text=True)
        return None if r.returncode == 0 else f"unshare failed: {r.stderr.strip()}"

    def __enter__(self) -> "Sandbox":
        env = {"HOME": str(self.home), "TMPDIR": str(self.tmp), "PATH": user_path(),
               "LANG": "C.UTF-8", "TERM": "dumb", "USER": os.environ.get("USER", "user"),
               "SHELL": "/bin/bash"}
        self.proc = subprocess.Popen(
            [*self.unshare(), "--kill-child", "bash", "--noprofile", "--norc"],
            cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        self._send(f"trap 'echo \"{self.nonce}FAILED $LINENO: $BASH_COMMAND\"' ERR\n")
        step = self.run("ip link set lo up", timeout=30)
        if step.rc != 0:
            raise RuntimeError(f"cannot bring up loopback in the sandbox: {step.output}")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def run(self, script: str, timeout: float, capture_to_file: bool = False) -> Step:
        """Source `script` in the shell (stdin /dev/null); wait for it. With capture_to_file
        its output goes to a file (not interleaved with background jobs' output)."""
        self.n += 1
        f = self.scratch / f"step{self.n:03d}.sh"
        f.write_text(script + "\n")
        out_file = self.scratch / f"step{self.n:03d}.out"
        redirect = f" > {out_file} 2>&1" if capture_to_file else ""
        self._send(f"source {f} < /dev/null{redirect}; echo \"{self.nonce}DONE {self.n} $?\"\n")
        buf, failed = [], []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                raise RuntimeError("the sandbox shell exited:\n" + "".join(buf[-50:]))
            if not line and time.monotonic() >= deadline:
                raise TimeoutError(f"no end after {timeout:.0f} s:\n" + "".join(buf[-50:]))
            # a marker may follow output that did not end its line (print(..., end=""))
            head, mark, tail = line.partition(self.nonce)
            if head and mark:
                buf.append(head + "\n")
            if mark and tail.startswith("DONE "):
                rc = int(tail.split()[-1])
                break
            if mark and tail.startswith("FAILED "):
                failed.append(tail[len("FAILED "):].strip())
            elif line and not mark:
                buf.append(line)
        self.log.extend(buf)
        output = out_file.read_text() if capture_to_file else "".join(buf)
        if capture_to_file and self.nonce in output:           # the ERR trap wrote into the file
            failed += [ln.split("FAILED ", 1)[1] for ln in output.splitlines() if self.nonce in ln]
            output = "\n".join(ln for ln in output.splitlines() if self.nonce not in ln)
        failed = [c for c in failed if not c.split(": ", 1)[-1].startswith(f"source {f}")]  # the wrapper
        return Step(rc, output, failed)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self._send("exit\n")
                self.proc.wait(timeout=10)
            except Exception:
                pass
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)             # unshare's child is the namespace's init:
            self.proc.wait(timeout=30)              # its death ends every process inside


def copy_tree(src: Path, dst: Path) -> None:
    """What a fresh clone of `src` holds: tracked and untracked-but-not-ignored files, their
    modification times kept (make must see the shared .venv as up to date)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        s = src / rel
        if not s.is_file():
            continue                                 # deleted in the work tree
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
