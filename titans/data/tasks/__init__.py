"""Long-context tasks: RULER S-NIAH (passkey / number / uuid) and BABILong-style reasoning (qa1-qa7).

Every generator is a pure function of its seed, builds examples of an exact token length, and takes its
haystack from any corpus the data module reads.  ``make_example("niah_uuid", ...)`` dispatches by name.
"""

from __future__ import annotations

from titans.data.preprocessing import Tokenizer
from titans.data.tasks.babilong import BABILONG_TASKS, make_babilong_example, simulate
from titans.data.tasks.haystack import Haystack, TaskExample, insert_at
from titans.data.tasks.niah import NIAH_KINDS, make_niah_example

TASK_NAMES = tuple(f"niah_{k}" for k in NIAH_KINDS) + tuple(f"babilong_{t}" for t in BABILONG_TASKS)


def make_example(task: str, length: int, seed: int, tokenizer: Tokenizer, haystack: Haystack | None,
                 depth: float = 0.5) -> TaskExample:
    """One example of ``task`` (a name in :data:`TASK_NAMES`) with exactly ``length`` input tokens."""
    if task.startswith("niah_") and task[5:] in NIAH_KINDS:
        return make_niah_example(task[5:], length, depth, seed, tokenizer, haystack)
    if task.startswith("babilong_") and task[9:] in BABILONG_TASKS:
        if haystack is None:
            raise ValueError(f"task {task!r} needs a haystack")
        return make_babilong_example(task[9:], length, seed, tokenizer, haystack)
    raise ValueError(f"task {task!r}: expected one of {list(TASK_NAMES)}")


def expand_tasks(names: list[str] | tuple[str, ...]) -> list[str]:
    """Accept group names: "niah" -> all S-NIAH tasks, "babilong" -> all BABILong tasks."""
    out: list[str] = []
    for n in names:
        if n == "niah":
            out += [t for t in TASK_NAMES if t.startswith("niah_")]
        elif n == "babilong":
            out += [t for t in TASK_NAMES if t.startswith("babilong_")]
        elif n in TASK_NAMES:
            out.append(n)
        else:
            raise ValueError(f"task {n!r}: expected 'niah', 'babilong' or one of {list(TASK_NAMES)}")
    return out


__all__ = ["BABILONG_TASKS", "Haystack", "NIAH_KINDS", "TASK_NAMES", "TaskExample", "expand_tasks", "insert_at",
           "make_babilong_example", "make_example", "make_niah_example", "simulate"]
