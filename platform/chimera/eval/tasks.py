"""The shipped local lm-eval tasks (configs/eval/), built deterministically from Tiny
Shakespeare's validation split, so that `jobs/eval.py --tasks ...` works offline.

    files = build_task_files(text)        # {file name: content} from the text of input.txt
    write_task_files(source, TASK_DIR)    # python jobs/eval.py --build_tasks ../shared/data/tinyshakespeare/input.txt

The validation split is the one `jobs/prepare.py --dataset shakespeare` makes: the last
val_fraction (0.1) of the characters (chimera.data.prepare's tail split), so no item was seen
in training. Two tasks, each a jsonl file of items read by configs/eval/local_data.py:

  shakespeare_nextline  multiple_choice: a line of the play (its last words when long), then
                        which of 4 lines comes next (the true one and 3 other lines of the
                        split of about its length, shuffled); metrics acc, acc_norm
  shakespeare_complete  generate_until: the first words of a line; generate the rest of it
                        (until a newline); metric exact_match

Lines are short (context + continuation under 60 characters) so that a char model with
block_size 64 sees every item whole. The builder is pure: the same text gives the same bytes
(tests/test_eval_tasks.py rebuilds the shipped files and compares them).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from chimera.paths import REPO

TASK_DIR = REPO / "configs" / "eval"          # the shipped tasks (jobs/eval.py includes it)
SEED = 15
N_NEXTLINE, N_COMPLETE = 64, 32
MIN_LEN, MAX_LEN = 12, 30                     # characters of a nextline choice
MAX_CONTEXT = 26                              # characters of a nextline context (a line's tail)


def val_text(text: str) -> str:
    """The validation split of `prepare` on this text: its last val_fraction of characters."""
    from chimera.data.sources import get_dataset
    return text[int(len(text) * (1.0 - get_dataset("shakespeare").val_fraction)):]


def _verse(line: str, lo: int, hi: int) -> bool:
    """A line of speech (not a speaker's name, not a stage direction) of lo..hi characters."""
    return lo <= len(line) <= hi and not line.endswith(":") and line == line.strip() \
        and not line.isupper()


def _tail(line: str) -> str:
    """The line, or its last words when longer than MAX_CONTEXT characters."""
    if len(line) <= MAX_CONTEXT:
        return line
    cut = line.find(" ", len(line) - MAX_CONTEXT)
    return line[cut + 1:] if cut != -1 else line[-MAX_CONTEXT:]


def nextline_items(val: str) -> list[dict]:
    lines = val.split("\n")
    pairs = [(_tail(a), b) for a, b in zip(lines, lines[1:])
             if _verse(a, MIN_LEN, 10**6) and _verse(b, MIN_LEN, MAX_LEN)]
    pool = sorted({ln for ln in lines if _verse(ln, MIN_LEN, MAX_LEN)})
    rng = random.Random(SEED)
    out = []
    for a, b in rng.sample(pairs, N_NEXTLINE):
        near = [ln for ln in pool if ln != b and ln != a and abs(len(ln) - len(b)) <= 3]
        choices = rng.sample(near, 3)
        label = rng.randrange(4)
        choices.insert(label, b)
        out.append({"context": a, "choices": choices, "label": label})
    return out


def complete_items(val: str) -> list[dict]:
    cands = []
    for ln in sorted(set(val.split("\n"))):
        if not _verse(ln, 24, 40):
            continue
        cut = ln.rfind(" ", 0, len(ln) // 2 + 1)         # the last word break up to the middle
        if cut >= 8:
            cands.append({"context": ln[:cut], "target": ln[cut:]})
    return random.Random(SEED).sample(cands, N_COMPLETE)


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in items)


def build_task_files(text: str) -> dict[str, str]:
    """{jsonl file name: its content} of every shipped task, from the full text of input.txt."""
    val = val_text(text)
    return {"shakespeare_nextline.jsonl": _jsonl(nextline_items(val)),
            "shakespeare_complete.jsonl": _jsonl(complete_items(val))}


def write_task_files(source: str | Path, out: Path = TASK_DIR) -> list[Path]:
    text = Path(source).read_text(encoding="utf-8")
    written = []
    for name, content in build_task_files(text).items():
        (out / name).write_text(content, encoding="utf-8")
        written.append(out / name)
    return written
