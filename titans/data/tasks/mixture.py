"""Training batches that mix language modelling with long-context tasks (issue 6's training recipe).

A row is, with probability ``task_fraction``, a task example (context, question, answer) placed at a random
position inside language-modelling text, labelled -100 everywhere except the answer, so the whole row's
gradient teaches retrieval; otherwise a language-modelling window with every token labelled.  Like
:class:`titans.data.dataloader.TokenBatcher`, a batch is a pure function of (seed, step, rank, world).
"""

from __future__ import annotations

import numpy as np
import torch

from titans.data.dataloader import TokenBatcher
from titans.data.dataset import ShardDataset
from titans.data.preprocessing import Tokenizer
from titans.data.tasks import Haystack, expand_tasks, make_example

PLACEMENTS = ("random", "end", "segments")


class TaskMixtureBatcher:
    """``batch(step) -> (ids, labels)``, both LongTensor (batch_size, seq_len + 1).

    ``placement`` of a task example in its row: "random" (anywhere inside LM text), "end" (closing the row),
    or "segments": half the examples close the row, the other half end their question on a multiple of
    ``segment`` tokens, so the answer opens a fresh attention segment (MAC's hardest phase: there only the
    memory still holds the question; random positions put it there in ~answer_len / segment of the rows).
    """

    def __init__(self, dataset: ShardDataset, tokenizer: Tokenizer, haystack: Haystack, tasks: list[str],
                 seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 task_fraction: float = 0.5, min_length: int | None = None, placement: str = "random",
                 segment: int | None = None) -> None:
        if not 0.0 <= task_fraction <= 1.0:
            raise ValueError(f"task_fraction={task_fraction}: expected a value in [0, 1]")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: expected one of {PLACEMENTS}")
        if placement == "segments" and not (segment and 0 < segment <= seq_len):
            raise ValueError(f"placement='segments' needs a segment length in 1..seq_len={seq_len}, got {segment}")
        self.placement, self.segment = placement, segment
        self.lm = TokenBatcher(dataset, seq_len, batch_size, seed, rank, world_size)
        self.tokenizer, self.haystack, self.tasks = tokenizer, haystack, expand_tasks(tasks)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.task_fraction = rank, task_fraction
        # shorter task rows (left-padded with haystack-free LM text) teach the model that the needle may
        # sit anywhere, also close to the question
        self.min_length = min_length or max(seq_len // 4, 260)
        if seq_len + 1 - 40 < self.min_length:
            raise ValueError(f"data.seq_len={seq_len}: task examples need sequences of at least "
                             f"{self.min_length + 40} tokens")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.lm.batch(step)
        labels = ids.clone()
        rng = np.random.default_rng([self.seed, step, self.rank, 7])
        for r in range(ids.shape[0]):
            if rng.random() >= self.task_fraction:
                continue
            task = self.tasks[int(rng.integers(len(self.tasks)))]
            total = self.seq_len + 1
            length = int(rng.integers(self.min_length, total - 40 + 1))
            ex_seed = int(rng.integers(2**31))
            ex = make_example(task, length, ex_seed, self.tokenizer, self.haystack, depth=float(rng.random()))
            row = ex.input_ids + ex.answer_ids
            row = row[:total]
            # the example ends at a random position (LM text before and after it): MAC attends within fixed
            # segments, and an answer that always closed the row would always sit at the same segment phase,
            # with the question in its own segment; at test time the answer may begin a new segment, where
            # only the memory still holds the question (benchmarks/RESULTS.md section 4d)
            if self.placement == "random":
                end = int(rng.integers(len(row), total + 1))
            elif self.placement == "segments" and rng.random() < 0.5:
                # the question ends on a boundary b: the last question token (input position b - 1) closes a
                # segment and predicts the first answer token, the rest are predicted in the next segment
                n_in, n_ans = len(ex.input_ids), len(ex.answer_ids)
                lo, hi = -(-n_in // self.segment), (total - n_ans) // self.segment
                end = int(rng.integers(lo, hi + 1)) * self.segment + n_ans if lo <= hi else total
            else:
                end = total
            start = end - len(row)
            ids[r, start:end] = torch.tensor(row)
            labels[r] = -100
            a0 = start + len(ex.input_ids)
            labels[r, a0:a0 + len(ex.answer_ids)] = ids[r, a0:a0 + len(ex.answer_ids)]
        return ids, labels
