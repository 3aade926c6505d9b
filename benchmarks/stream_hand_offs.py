"""Which gradients the wavefront's backward hands from one CUDA stream to another, read from the autograd graph on
the CPU (no GPU needed).

In :func:`titans.training.wavefront.wavefront_logits` each block runs on a stream of its own (``S<layer>``), a
memory block's feed-forward on another (``F<layer>``), with ``readout_streams`` MAC's segment read-outs and the
residual sum on a third (``R<layer>``), the deferred weight-gradient sums on a fourth (``W``); the embedding, the
initial state on the caller's (``main``); the final norm and head on the stream that made the last block's output.
Autograd runs each backward node on its forward op's stream and makes a consumer's stream wait for the producer's
whenever a gradient crosses streams, so every edge listed here is a wait in the captured step.  This script builds
a small MAC model, runs the wavefront forward with each call site labelled (by the autograd sequence numbers its
ops take), walks the graph from the loss and counts the backward edges (producer -> consumer) whose two ends carry
different labels.

    python benchmarks/stream_hand_offs.py [--readout-streams] [--out hand_offs.json]

Session 33 asked it whether a segment's read-out stream waits on its own chain (MAC 65536 x 1 was 18% slower with the
read-outs apart, each read-out stream mostly idle): it does not - nothing flows from ``S<l>`` to ``R<l>``; the
read-out hands 18 gradients a segment to its chain (``R<l> -> S<l>``) and gets the block's output gradient from the
feed-forward's stream (``F<l> -> R<l>``).  ``--emulate`` schedules the backward by that structure alone (see
:func:`emulate`): the read-outs apart come out 17% shorter, so the GPU's loss lies outside the graph's structure.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager

import torch

import titans.core.models.model as model_module
from titans.core.models import build_model
from titans.training.wavefront import wavefront_logits
from titans.utils.io import atomic_write_text
from titans.utils.switches import switch_on
from titans.utils.tensors import autograd_nodes

# a small MAC: memory blocks between attention-only ones, memory depth 2, whole chunks
SMALL = dict(variant="mac", vocab_size=64, dim=32, depth=4, heads=2, window=16, persistent_tokens=2, memory_depth=2,
             memory_chunk_size=16, memory_layers=[1, 3], memory_backend="fused")
# the issue's layout at the same small width: memory in blocks 2 / 4 / 6 of 8
ISSUE_LIKE = dict(SMALL, depth=8, memory_layers=[2, 4, 6])


class CallSites:
    """Labels autograd nodes by the call site that made them: ``run(label, fn, ...)`` records the range of sequence
    numbers its ops took (nested calls win over the ones around them)."""

    def __init__(self) -> None:
        self._probe = torch.zeros(1, requires_grad=True)
        self._ranges: list[tuple[int, int, str, int]] = []  # (after, last, label, nesting depth)
        self._open: list[tuple[int, str]] = []  # the ranges open now, innermost last

    def _next(self) -> int:
        return (self._probe * 1).grad_fn._sequence_nr()  # an op of its own: takes the next number

    def start(self, label: str) -> None:
        """Open a labelled range (:meth:`stop` closes the innermost), by hand for module hooks."""
        self._open.append((self._next(), label))

    def stop(self) -> None:
        start, label = self._open.pop()
        self._ranges.append((start, self._next(), label, len(self._open)))

    def run(self, label: str, fn, *args, **kwargs):
        with self.span(label):
            return fn(*args, **kwargs)

    @contextmanager
    def span(self, label: str):
        self.start(label)
        try:
            yield
        finally:
            self.stop()

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
def labelled_blocks(sites: CallSites, model=None):
    """TitansBlock's wavefront entry points, each call labelled with the stream it runs on under CUDA; with
    ``model``, also its final norm and head, which run on the stream that made the last block's output (its
    feed-forward's for a memory block, else its own)."""
    hooks = []
    if model is not None:
        last = model.blocks[-1]
        head = f"{'F' if last.memory is not None else 'S'}{last.layer}"
        for module in (model.norm, model.lm_head):
            hooks.append(module.register_forward_pre_hook(lambda mod, args: sites.start(head)))
            hooks.append(module.register_forward_hook(lambda mod, args, out: sites.stop()))
    block = model_module.TitansBlock
    saved = {name: getattr(block, name) for name in ("forward", "forward_mixer", "forward_mixer_split",
                                                      "feed_forward")}
    taps = model_module.segment_taps

    def inputs_on(self, queries):  # the batched segment inputs: on a stream of their own under CUDA (by default)
        if not (queries and switch_on("TITANS_WAVEFRONT_INPUTS_STREAM")):
            return None
        return lambda fn, *args: sites.run(f"I{self.layer}", fn, *args)

    def split(self, x, st, pos, persistent, want_cache, run_readout=None, batched=False, queries=False,
              run_inputs=None):
        def readout(fn, *args):
            return sites.run(f"R{self.layer}", fn, *args)

        return sites.run(f"S{self.layer}", saved["forward_mixer_split"], self, x, st, pos, persistent, want_cache,
                         readout, batched, queries, inputs_on(self, queries))

    def mixer(self, x, st, pos, persistent, want_cache, queries=False, run_inputs=None):
        return sites.run(f"S{self.layer}", saved["forward_mixer"], self, x, st, pos, persistent, want_cache, queries,
                         inputs_on(self, queries))

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
    block.forward_mixer = mixer
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
        for hook in hooks:
            hook.remove()


def traced_step(readout_streams: bool, config: dict, tokens: int, seed: int = 0, batched: bool = False):
    """One wavefront forward of ``config`` (a small MAC) over ``tokens`` tokens, its call sites labelled:
    ``(loss, nodes, label)``, every node of the backward graph and its stream label.  ``batched``: the batched
    segment inputs (the wavefront's default since session 37) and read-outs (opt-in); without, each segment's own
    (the layout sessions 33-36 analysed)."""
    torch.manual_seed(seed)
    model = build_model(config)
    sites = CallSites()
    ids = torch.randint(0, config["vocab_size"], (1, tokens))
    with labelled_blocks(sites, model):
        logits = wavefront_logits(model, ids, segment=4 * config["window"], readout_streams=readout_streams,
                                  batched_readouts=batched, batched_queries=batched)
    loss = logits.float().logsumexp(-1).mean()
    nodes = autograd_nodes(loss)
    return loss, nodes, {node: sites.label(node) for node in nodes}


def hand_offs(readout_streams: bool, tokens: int = 96, seed: int = 0, batched: bool = False) -> dict[str, dict]:
    """``{"producer -> consumer": {"edges": n, "example": [producer node, consumer node]}}`` for the backward edges
    of one wavefront step of :data:`SMALL` whose ends run on different streams (``batched`` as in
    :func:`traced_step`)."""
    _, nodes, label = traced_step(readout_streams, SMALL, tokens, seed, batched)
    counts: Counter = Counter()
    example: dict[str, list[str]] = {}
    for node in nodes:
        for nxt, _ in node.next_functions:
            if nxt is not None and label[node] != label[nxt]:
                key = f"{label[node]} -> {label[nxt]}"
                counts[key] += 1
                example.setdefault(key, [type(node).__name__, type(nxt).__name__])
    return {key: {"edges": counts[key], "example": example[key]} for key in sorted(counts)}


def schedule(order: Sequence, stream: dict, inputs: dict, duration: dict, hand_off_waits: bool = False) -> dict:
    """When each node of a backward ends if every stream runs its nodes in ``order`` (the engine's issue order) one
    at a time, each node starting once its stream is free and every producer of its inputs (``inputs[node]``, on any
    stream) has ended; ``duration[node]`` in us.  ``hand_off_waits``: a producer's hand-off also holds everything
    its consumers' streams are given after it in the issue order (the consumer's stream waits on the producer from
    the moment of the hand-off, not only the consumer node).  The kernels of different streams overlap freely (no
    contention for the GPU's SMs) and waits cost nothing: the dependency structure alone.  Returns {node: end}."""
    consumers: dict = {}
    if hand_off_waits:
        for node, producers in inputs.items():
            for p in producers:
                consumers.setdefault(p, set()).add(stream[node])
    end: dict = {}
    free: dict = {}
    for node in order:  # producers come first in the issue order, so one pass settles every node
        start = max([free.get(stream[node], 0.0)] + [end[p] for p in inputs.get(node, ())])
        end[node] = free[stream[node]] = start + duration[node]
        for other in consumers.get(node, ()):
            free[other] = max(free.get(other, 0.0), end[node])
    return end


# a segment's backward on an H200 at the issue's shape (session 33's chain anatomy, MAC 65536 x 1, us): the memory
# ops, the rest of a memory block's chain, the read-out's output path, an attention-only block's or feed-forward's
# backward per wavefront step of 4 segments
MEMORY_OPS_US = {"MemoryCoreFunctionBackward": 622.0, "MemoryWalkFunctionBackward": 469.0,
                 "MemoryReadoutFunctionBackward": 153.0}
CHAIN_US, READOUT_PATH_US, STEP_US = 1217.0, 90.0, 700.0


def emulate(readout_streams: bool, steps: int = 8, seed: int = 0, hand_off_waits: bool = False) -> dict:
    """The backward of :data:`ISSUE_LIKE` over ``steps`` wavefront steps of 4 segments, scheduled by
    :func:`schedule` in the order the autograd engine runs it here, with each node's duration from the H200 chain
    anatomy (:data:`MEMORY_OPS_US`; the rest of a block's per-segment or per-step time spread evenly over its nodes;
    the weight-gradient sums, the leaves and the caller's stream free); ``hand_off_waits`` as for :func:`schedule`.
    Returns the makespan and each stream's first start, last end and busy time, us."""
    config = ISSUE_LIKE
    segments = 4 * steps
    loss, nodes, label = traced_step(readout_streams, config, segments * config["window"], seed)
    order: list = []
    handles = [node.register_prehook(lambda grads, node=node: order.append(node)) for node in nodes]
    loss.backward()
    for handle in handles:
        handle.remove()
    inputs: dict = {}
    for node in nodes:  # node hands gradients to its next functions: they are its consumers in the backward
        for nxt, _ in node.next_functions:
            if nxt is not None:
                inputs.setdefault(nxt, []).append(node)
    memory = {f"S{layer}" for layer in config["memory_layers"]}
    fixed = {n: MEMORY_OPS_US[type(n).__name__] for n in order if type(n).__name__ in MEMORY_OPS_US}
    free = {n: 0.0 for n in order if label[n] in ("leaf", "main", "W")}
    spread = Counter(label[n] for n in order if n not in fixed and n not in free)
    memory_op = MEMORY_OPS_US["MemoryCoreFunctionBackward"]
    total = {}
    for lab in spread:
        if lab in memory:  # the chain without its memory op (and without the read-out path when that is apart)
            total[lab] = (CHAIN_US - memory_op - (READOUT_PATH_US if readout_streams else 0.0)) * segments
        elif lab.startswith("R"):
            total[lab] = READOUT_PATH_US * segments
        else:
            total[lab] = STEP_US * steps
    duration = {n: fixed.get(n, free.get(n, total.get(label[n], 0.0) / max(spread[label[n]], 1))) for n in order}
    end = schedule(order, label, inputs, duration, hand_off_waits)
    streams = {}
    for n in order:
        row = streams.setdefault(label[n], {"start": float("inf"), "end": 0.0, "busy": 0.0})
        row["start"] = min(row["start"], end[n] - duration[n])
        row["end"] = max(row["end"], end[n])
        row["busy"] += duration[n]
    return {"makespan_us": max(end.values()), "segments": segments, "streams": dict(sorted(streams.items()))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readout-streams", action="store_true", help="MAC's read-outs on streams of their own")
    ap.add_argument("--batched", action="store_true",
                    help="the batched segment inputs (on a stream of their own, I) and read-outs (not --emulate's)")
    ap.add_argument("--emulate", action="store_true",
                    help="also schedule the backward of an issue-like MAC (memory in blocks 2 / 4 / 6 of 8) with and "
                         "without the read-outs apart, from the H200 chain anatomy's kernel times")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    found = hand_offs(args.readout_streams, batched=args.batched)
    print("| producer -> consumer | edges | e.g. |\n| --- | --- | --- |")
    for key, row in found.items():
        print(f"| {key} | {row['edges']} | {' -> '.join(row['example'])} |")
    result = {"readout_streams": args.readout_streams, "batched": args.batched, "model": SMALL, "hand_offs": found}
    if args.emulate:
        result["emulated"] = {f"{name}{', hand-off waits' if waits else ''}": emulate(apart, hand_off_waits=waits)
                              for waits in (False, True)
                              for name, apart in (("default", False), ("readouts_apart", True))}
        print("\n| emulated backward | makespan, ms | memory block 6's chain: busy / span, ms | its read-out stream: "
              "span, ms |\n| --- | --- | --- | --- |")
        for name, em in result["emulated"].items():
            chain, ro = em["streams"]["S6"], em["streams"].get("R6")
            span = f"{ro['start'] / 1e3:.1f} -> {ro['end'] / 1e3:.1f}" if ro else "-"
            print(f"| {name} ({em['segments']} segments) | {em['makespan_us'] / 1e3:.1f} | {chain['busy'] / 1e3:.1f}"
                  f" / {(chain['end'] - chain['start']) / 1e3:.1f} | {span} |")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
