"""Which gradients the wavefront's backward hands from one CUDA stream to another, read from the autograd graph on
the CPU (no GPU needed).

In :func:`titans.training.wavefront.wavefront_logits` each block runs on a stream of its own (``S<layer>``), a
memory block's feed-forward on another (``F<layer>``), with ``readout_streams`` MAC's segment read-outs and the
residual sum on a third (``R<layer>``), the deferred weight-gradient sums on a fourth (``W``); the embedding, the
initial state and the head on the caller's (``main``; under CUDA the head runs on the last block's stream).
Autograd runs each backward node on its forward op's stream and makes a consumer's stream wait for the producer's
whenever a gradient crosses streams, so every edge listed here is a wait in the captured step.  This script builds
a small MAC model, runs the wavefront forward with each call site labelled (by the autograd sequence numbers its
ops take), walks the graph from the loss and counts the backward edges (producer -> consumer) whose two ends carry
different labels.

    python benchmarks/stream_hand_offs.py [--readout-streams] [--out hand_offs.json]

Session 33 asked it whether a segment's read-out stream waits on its own chain (MAC 65536 x 1 was 18% slower with the
read-outs apart, each read-out stream mostly idle): it does not - nothing flows from ``S<l>`` to ``R<l>``; the
read-out hands 18 gradients a segment to its chain (``R<l> -> S<l>``) and gets the block's output gradient from the
feed-forward's stream (``F<l> -> R<l>``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from contextlib import contextmanager

import torch

import titans.core.models.model as model_module
from titans.core.models import build_model
from titans.training.wavefront import wavefront_logits
from titans.utils.io import atomic_write_text

# a small MAC with the structure: memory blocks between attention-only ones, memory depth 2, whole chunks
SMALL = dict(variant="mac", vocab_size=64, dim=32, depth=4, heads=2, window=16, persistent_tokens=2, memory_depth=2,
             memory_chunk_size=16, memory_layers=[1, 3], memory_backend="fused")


class CallSites:
    """Labels autograd nodes by the call site that made them: ``run(label, fn, ...)`` records the range of sequence
    numbers its ops took (nested calls win over the ones around them)."""

    def __init__(self) -> None:
        self._probe = torch.zeros(1, requires_grad=True)
        self._ranges: list[tuple[int, int, str, int]] = []  # (after, last, label, nesting depth)
        self._depth = 0

    def _next(self) -> int:
        return (self._probe * 1).grad_fn._sequence_nr()  # an op of its own: takes the next number

    def run(self, label: str, fn, *args, **kwargs):
        with self.span(label):
            return fn(*args, **kwargs)

    @contextmanager
    def span(self, label: str):
        start = self._next()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._ranges.append((start, self._next(), label, self._depth))

    def label(self, node) -> str:
        if type(node).__name__ == "AccumulateGrad":
            return "leaf"
        seq = node._sequence_nr()
        best = None
        for after, last, label, depth in self._ranges:
            if after < seq < last and (best is None or depth > best[1]):
                best = (label, depth)
        return best[0] if best else "main"


@contextmanager
def labelled_blocks(sites: CallSites):
    """TitansBlock's wavefront entry points, each call labelled with the stream it runs on under CUDA."""
    block = model_module.TitansBlock
    saved = {name: getattr(block, name) for name in ("forward", "forward_mixer", "forward_mixer_split",
                                                      "feed_forward")}
    taps = model_module.segment_taps

    def split(self, x, st, pos, persistent, want_cache, run_readout=None):
        def readout(fn, *args):
            return sites.run(f"R{self.layer}", fn, *args)

        return sites.run(f"S{self.layer}", saved["forward_mixer_split"], self, x, st, pos, persistent, want_cache,
                         readout)

    @contextmanager
    def labelled_taps(*args, **kwargs):
        with sites.span("W"):  # the fanouts and stand-ins are made on the weight-gradient stream
            context = taps(*args, **kwargs)
            piece = context.__enter__()
        try:
            yield piece
        finally:
            context.__exit__(None, None, None)

    block.forward = lambda self, *a, **k: sites.run(f"S{self.layer}", saved["forward"], self, *a, **k)
    block.forward_mixer = lambda self, *a, **k: sites.run(f"S{self.layer}", saved["forward_mixer"], self, *a, **k)
    block.forward_mixer_split = split
    # a memory block's feed-forward has a stream of its own; the other blocks run theirs on the block's stream
    block.feed_forward = lambda self, x: sites.run(f"{'F' if self.memory is not None else 'S'}{self.layer}",
                                                   saved["feed_forward"], self, x)
    model_module.segment_taps = labelled_taps
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(block, name, fn)
        model_module.segment_taps = taps


def hand_offs(readout_streams: bool, tokens: int = 96, seed: int = 0) -> dict[str, dict]:
    """``{"producer -> consumer": {"edges": n, "example": [producer node, consumer node]}}`` for the backward edges
    of one wavefront step of :data:`SMALL` whose ends run on different streams."""
    torch.manual_seed(seed)
    model = build_model(SMALL)
    sites = CallSites()
    ids = torch.randint(0, SMALL["vocab_size"], (1, tokens))
    with labelled_blocks(sites):
        logits = wavefront_logits(model, ids, segment=2 * SMALL["window"], readout_streams=readout_streams)
    loss = logits.float().logsumexp(-1).mean()
    counts: Counter = Counter()
    example: dict[str, list[str]] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            a, b = sites.label(node), sites.label(nxt)
            if a != b:
                key = f"{a} -> {b}"
                counts[key] += 1
                example.setdefault(key, [type(node).__name__, type(nxt).__name__])
            stack.append(nxt)
    return {key: {"edges": counts[key], "example": example[key]} for key in sorted(counts)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readout-streams", action="store_true", help="MAC's read-outs on streams of their own")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    found = hand_offs(args.readout_streams)
    print("| producer -> consumer | edges | e.g. |\n| --- | --- | --- |")
    for key, row in found.items():
        print(f"| {key} | {row['edges']} | {' -> '.join(row['example'])} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"readout_streams": args.readout_streams, "model": SMALL,
                                                "hand_offs": found}, indent=1))


if __name__ == "__main__":
    main()
