"""Single needle-in-a-haystack tasks as defined by RULER (S-NIAH-1/2/3), deterministic from a seed.

* ``passkey``: a 5-digit pass key hidden in repeated filler sentences;
* ``number``: a 7-digit "special magic number" for a key word, hidden in real-text haystack;
* ``uuid``: a UUID for a key word, hidden in real-text haystack.

The needle sits at a relative ``depth`` in [0, 1] of the haystack, the question comes last, and the
answer is the target that should follow.  Lengths are exact in tokens of the given tokenizer.
"""

from __future__ import annotations

import uuid as _uuid

import numpy as np

from titans.data.preprocessing import Tokenizer
from titans.data.tasks.haystack import Haystack, TaskExample, insert_at

NIAH_KINDS = ("passkey", "number", "uuid")

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

KEY_WORDS = ("apple", "river", "lantern", "falcon", "harbor", "violet", "meadow", "copper", "glacier", "saddle",
             "thimble", "orchard", "compass", "ember", "willow", "quartz", "beacon", "canyon", "marble", "tundra")


def _needle(kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(needle sentence, question, answer) for one example."""
    if kind == "passkey":
        value = str(int(rng.integers(10_000, 100_000)))
        return (f"The pass key is {value}. Remember it. {value} is the pass key. ",
                "\nWhat is the pass key? The pass key is ", value)
    key = KEY_WORDS[int(rng.integers(len(KEY_WORDS)))]
    if kind == "number":
        value = str(int(rng.integers(1_000_000, 10_000_000)))
    elif kind == "uuid":
        value = str(_uuid.UUID(bytes=rng.bytes(16), version=4))
    else:
        raise ValueError(f"niah kind {kind!r}: expected one of {NIAH_KINDS}")
    return (f"\nOne of the special magic {'numbers' if kind == 'number' else 'uuids'} for {key} is: {value}.\n",
            f"\nWhat is the special magic {'number' if kind == 'number' else 'uuid'} for {key} mentioned in the "
            f"provided text? The special magic {'number' if kind == 'number' else 'uuid'} for {key} mentioned in "
            "the provided text is ", value)


def make_niah_example(kind: str, length: int, depth: float, seed: int, tokenizer: Tokenizer,
                      haystack: Haystack | None = None) -> TaskExample:
    """One S-NIAH example of exactly ``length`` input tokens (context + question).

    kind: "passkey" | "number" | "uuid"; depth: needle position in [0, 1] of the haystack; ``haystack``
    is required for "number" and "uuid" (real text), unused for "passkey" (filler sentences).
    """
    if kind not in NIAH_KINDS:
        raise ValueError(f"niah kind {kind!r}: expected one of {NIAH_KINDS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: expected a value in [0, 1]")
    rng = np.random.default_rng([seed, NIAH_KINDS.index(kind), int(depth * 1e6), length])
    needle, question, answer = _needle(kind, rng)
    needle_ids, q_ids = tokenizer.encode(needle), tokenizer.encode(question)
    n_hay = length - len(needle_ids) - len(q_ids)
    if n_hay < 0:
        raise ValueError(f"length={length}: too short for the needle and question "
                         f"({len(needle_ids) + len(q_ids)} tokens)")
    if kind == "passkey":
        filler = tokenizer.encode(FILLER)
        hay = (filler * (n_hay // max(len(filler), 1) + 1))[:n_hay]
    else:
        if haystack is None:
            raise ValueError(f"niah kind {kind!r} needs a real-text haystack")
        hay = haystack.span(n_hay, rng)
    ids, starts = insert_at(hay, [(depth, needle_ids)])
    ids = ids + q_ids
    return TaskExample(f"niah_{kind}", ids, answer, tokenizer.encode(answer), [(starts[0], needle)],
                       {"depth": depth, "length": length, "seed": seed})
