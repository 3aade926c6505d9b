"""Haystack text for long-context tasks, and the common example type.

A :class:`Haystack` reads real text from any source the data module reads (the embedded stdlib corpus,
gcide, user files), tokenizes it once, and hands out token spans of any length deterministically from a
seed (wrapping around when a span is longer than the text read).  Task generators build examples as
token lists, so their lengths are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from titans.data.preprocessing import Tokenizer


@dataclass
class TaskExample:
    """One long-context example.

    input_ids: the context and the question (the model reads these); answer: the expected text, and
    answer_ids its tokens (the target that follows input_ids).  ``facts`` are (token position, text)
    of everything inserted into the haystack (needles, supporting facts).
    """

    task: str
    input_ids: list[int]
    answer: str
    answer_ids: list[int]
    facts: list[tuple[int, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)


class Haystack:
    """Token spans of real text from ``source`` (see :func:`titans.data.dataset.iter_documents`)."""

    def __init__(self, source: str, tokenizer: Tokenizer, max_bytes: int = 4_000_000, split: str | None = "val",
                 text_field: str = "text") -> None:
        from titans.data.dataset import iter_documents

        self.source, self.tokenizer = source, tokenizer
        parts, size = [], 0
        for doc in iter_documents(source, text_field=text_field, split=split, max_bytes=max_bytes):
            parts.append(doc)
            size += len(doc)
            if size >= max_bytes:
                break
        if not parts and split is not None:  # a tiny source may have no validation part
            for doc in iter_documents(source, text_field=text_field, max_bytes=max_bytes):
                parts.append(doc)
        text = "\n".join(parts)
        if len(text) < 100:
            raise ValueError(f"haystack source {source!r}: too little text ({len(text)} characters)")
        self.ids = np.asarray(tokenizer.encode(text), dtype=np.int64)

    def span(self, n: int, rng: np.random.Generator) -> list[int]:
        """``n`` consecutive tokens starting at a random offset (wrapping around the text)."""
        if n <= 0:
            return []
        start = int(rng.integers(0, len(self.ids)))
        reps = -(-(start + n) // len(self.ids))
        return np.tile(self.ids, reps)[start:start + n].tolist() if reps > 1 else self.ids[start:start + n].tolist()


def insert_at(hay: list[int], pieces: list[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Insert token pieces into ``hay`` at relative depths in [0, 1]; returns (ids, start of each piece).

    Pieces keep their order when depths tie, and never split one another.
    """
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i][0], i))
    out: list[int] = []
    starts = [0] * len(pieces)
    prev = 0
    for i in order:
        depth, piece = pieces[i]
        cut = min(max(int(round(depth * len(hay))), prev), len(hay))
        out.extend(hay[prev:cut])
        starts[i] = len(out)
        out.extend(piece)
        prev = cut
    out.extend(hay[prev:])
    return out, starts
