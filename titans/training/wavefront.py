"""Training forward one segment at a time through all blocks, each block on its own CUDA stream (a wavefront).

Why: at batch 1 a long MAC row is a chain of segment steps per memory layer (each segment's retrieval reads the
memory its predecessor wrote), and each step occupies a few SMs (the memory walk runs one program per head).  In the
usual layer-by-layer order the memory layers' chains run one after another: 3 x 128 segment steps at 65536 tokens
(benchmarks/RESULTS.md section 6, sessions 17-19).  Run segment-major instead - segment s through every block, then
segment s + 1 - and put block i on stream i: block i's segment s + 1 only waits on block i's segment s (its state)
and block i - 1's segment s + 1 (its input), so block i + 2 on segment s runs beside block i on segment s + 1 and
the chains overlap.  The arithmetic is the streaming path's (a block's state carries the memory, its KV cache and
convolution cache from one segment to the next), which equals the one-pass forward; the test compares loss and
every gradient with ``model(ids, labels=ids)`` in float64.

On the CPU (or with ``streams=False``) the same segment-major loop runs on the current stream: no overlap, the same
numbers.  Measured (benchmarks/RESULTS.md section 6, sessions 20-21; H200, compiled blocks, CUDA graphs,
``TITANS_TRITON_BWD=split``): MAC 65536 x 1 at 209.0K tokens/s against 130.5K one-pass with 512-token steps
(kernels ~3 deep on 20 streams), 230.3-230.7K with 2048-token steps, the memory blocks' streams at high priority and
their feed-forwards on streams of their own: 0.625-0.626x MAC's 4096 x 8 rate (368.3K; session 22: 0.624x); with the
memory walks over two programs a head (session 24) 251-255K, 0.686x.  What bounds it: each memory block's backward
chain (128 segments, ~146 kernels and ~1.45 ms a segment in session 21) runs back to back for most of the step,
about half of it in the memory kernels.  ``readout_streams`` takes the memory read-out's
share of that backward off the chain, and was 14.6% slower for it (193.0K vs 226.0K tokens/s, session 23).  Here a
memory block's projections sum their weight gradients over each step's segments on a stream of their own by default
(:mod:`titans.utils.weight_grads`; session 26: 261.3K vs 250.5K tokens/s, 270.4K with inductor's combo kernels).  The
trainer's ``training.wavefront`` / ``training.wavefront_step`` and ``benchmarks/harness.py --wavefront`` use it.

The streams need hardware queues of their own: CUDA multiplexes a process's streams onto
``CUDA_DEVICE_MAX_CONNECTIONS`` work queues (8 by default), and a stream that shares a queue waits behind the other
stream's work.  The trainer and the harness set 32 before CUDA starts
(:func:`~titans.utils.tensors.widen_hardware_queues`; before the process's first ``torch.cuda.is_available()``,
which starts the driver that reads the variable: session 41's harness asked after it and ran at the 8-queue rate),
and a wavefront with fewer warns once.  On an H100 (session
40, MAC 65536 x 1) the read-outs apart ran at 243.0K tokens/s with 8 queues and 285.3K with 32 - session 33's
18% loss of that layout on an H200 was the queues - and 4096-token steps at 260.5K and 284.5K.  Session 42 (an
H200): the harness's own request gave the 32-queue rate (314.7K, 237.7K with 8), and the read-outs apart 326.8-327.1K
against 313.4-314.7K, so with 32 queues they are the default (:func:`readouts_apart_by_default`).  The step's length
(session 48, an H100, today's defaults): 4608-6144 tokens ~315K, 4096 306K, 8192 298K; 6144-token steps give 0.921x
MAC's 4096 x 8 rate, issue 7's flat target.  The default stays one window: the finest overlap for any shape, since
the fastest step depends on the GPU and the model's width.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.func import functional_call

from titans.core.models.model import TitansLM, lm_loss
from titans.utils.switches import switch_on, switch_value
from titans.utils.tensors import (
    CUDA_DEFAULT_QUEUES,
    WAVEFRONT_QUEUES,
    note_hardware_queues,
    side_stream,
    widen_hardware_queues,
)


def wavefront_logits(model: TitansLM, input_ids: Tensor, segment: int | None = None,
                     streams: bool | None = None, priority: bool | None = None,
                     ffn_streams: bool | None = None, stream_views: bool | None = None,
                     readout_streams: bool | None = None, batched_readouts: bool | None = None,
                     batched_queries: bool | None = None, inputs_stream: bool | None = None) -> Tensor:
    """Logits (B, T, vocab) of ``input_ids`` (B, T) computed segment-major (see the module docstring).

    segment: tokens per step (default: the model's window, MAC's segment); streams: one CUDA stream per block
    (default: on CUDA).  With streams, ``priority``: the memory blocks' streams get the device's highest priority
    (their segment chains are the step's critical paths; the other blocks' kernels fill in around them);
    ``ffn_streams``: a memory block's feed-forward runs on a second stream of its own, off the chain (the next
    segment's mixer does not wait for it).  Both default to ``TITANS_WAVEFRONT_PRIORITY`` /
    ``TITANS_WAVEFRONT_FFN_STREAMS`` ("1" when unset).  ``stream_views`` (``TITANS_WAVEFRONT_STREAM_VIEWS``, "1" when
    unset: MAC 65536 x 1 on an H100 305.4K against 303.7K tokens/s, four rows against six on one machine, session 47;
    no measurable effect in session 22's layout on an H200): the parameters several streams read - the persistent
    tokens (every block, every segment) and the tied embedding / head weight (the caller's stream, the last block's)
    - are read through one view per stream, so autograd sums each stream's gradients on that stream and the
    parameter receives one sum a stream instead of one cross-stream accumulation per block and segment.
    ``readout_streams``
    (``TITANS_WAVEFRONT_READOUT_STREAMS``, "auto" when unset): in MAC's memory blocks each
    segment's memory read-out and gate run on the feed-forward's stream (:meth:`TitansBlock.forward_mixer_split`), so
    their backward (the memory backward's first stage among it, ~0.27 ms a segment on an H200) runs beside the
    segment chain instead of on it (``TITANS_WAVEFRONT_READOUT_URGENT=1``: on a stream of their own at the chains'
    priority instead); on the CPU the same split runs on one stream.  By default on where it was measured faster:
    on streams with 32 hardware queues (:func:`readouts_apart_by_default`).  ``batched_readouts``
    (``TITANS_WAVEFRONT_BATCHED_READOUTS``, "0" when unset): MAC's memory blocks run a call's segment chains first
    and then their read-outs at once (``forward_mixer_split(batched=True)``: one launch of each read-out kernel,
    forward and backward, for the call's segments instead of one a segment), on the block's stream, or with
    ``readout_streams`` on the read-out stream; on an H200 (session 37) captured in CUDA graphs they gave another
    loss than eagerly (eagerly they equal the one pass): the fresh state was freed mid-call without
    ``record_stream`` (fixed in session 40; session 41's H100 captured them with exactly the eager loss, at 263.8K
    against 261.0K tokens/s for the default layout, both with 8 queues), opt-in until timed with 32 queues.
    ``batched_queries`` (``TITANS_WAVEFRONT_BATCHED_QUERIES``, "1" when unset): MAC's memory blocks make what a
    call's segment steps compute from the block input alone (the retrieval's queries, with their convolution, and
    output gate's input; attention's queries, keys and values: :class:`~titans.core.models.model.SegmentInputs`)
    once for the call's segments, before their chains (``forward_mixer(queries=True)``), so that no segment's chain
    runs it, forward or backward (+4.2% at MAC 65536 x 1 on an H200, session 37); with streams and
    ``inputs_stream`` (``TITANS_WAVEFRONT_INPUTS_STREAM``, "1" when unset) the block's input norm and these run on a
    stream of their own, forward and backward: the chain's stream only waits for them before the call's first
    segment (in the forward they can run while the chain is still on the previous call's).  Gradients flow through
    the carried states, so ``lm_loss`` of the result trains the model exactly as
    ``model(input_ids, labels=input_ids)`` does."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
    seg = segment or model.config.window
    if seg < 1:
        raise ValueError(f"segment: expected >= 1, got {seg}")
    B, T = input_ids.shape
    dev = input_ids.device
    use_streams = _use_streams(streams, dev)
    if use_streams:
        note_hardware_queues()  # warns once if the streams share CUDA's default 8 hardware queues
    priority = switch_on("TITANS_WAVEFRONT_PRIORITY") if priority is None else priority
    ffn_streams = switch_on("TITANS_WAVEFRONT_FFN_STREAMS") if ffn_streams is None else ffn_streams
    readouts = readouts_apart_by_default(use_streams) if readout_streams is None else readout_streams
    batched = switch_on("TITANS_WAVEFRONT_BATCHED_READOUTS") if batched_readouts is None else batched_readouts
    queries = switch_on("TITANS_WAVEFRONT_BATCHED_QUERIES") if batched_queries is None else batched_queries
    inputs_apart = switch_on("TITANS_WAVEFRONT_INPUTS_STREAM") if inputs_stream is None else inputs_stream
    persistent = model.persistent()
    layers = model.init_state(B, dev).layers  # a fresh state: its layer states are updated in place below
    main = torch.cuda.current_stream(dev) if use_streams else None
    n = len(model.blocks)
    urgent = [use_streams and priority and b.memory is not None for b in model.blocks]
    side = [side_stream(dev, ("wavefront-block", i), urgent[i]) for i in range(n)] if use_streams else []
    # the feed-forward on a stream of its own: only where the block is not compiled whole (MAC's memory blocks
    # compile their regions; a whole-compiled block called in parts would run its parts uncompiled)
    whole = [getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks]
    # MAC's memory blocks with their segments' read-outs apart (forward_mixer_split), on the feed-forward's stream
    # MAC's memory blocks that can run their segments in parts (forward_mixer_split, or forward_mixer's queries)
    mac_parts = [b.variant == "mac" and b.memory is not None and b.checkpointing_now() == "none" and not whole[i]
                 for i, b in enumerate(model.blocks)]
    readout = [(readouts or batched) and mac_parts[i] for i in range(n)]
    apart = [readout[i] and readouts for i in range(n)]  # the read-outs on another stream
    split = [use_streams and (ffn_streams or readout[i]) and b.memory is not None and b.checkpointing_now() != "full"
             and not whole[i] for i, b in enumerate(model.blocks)]
    ffn = {i: side_stream(dev, ("wavefront-ffn", i)) for i in range(n) if split[i]}
    # MAC's memory blocks with their retrievals' inputs made once a call (forward_mixer / forward_mixer_split)
    queries_on = [queries and mac_parts[i] for i in range(n)]
    # where the read-outs run: the feed-forward's stream, or (TITANS_WAVEFRONT_READOUT_URGENT=1) a stream of their own
    # at the chains' priority, so that the chain's walk, which waits on its segment's read-out backward (the shares
    # of the chunk starts' gradient), does not wait behind feed-forward work of normal priority (session 33: no
    # faster, 242.1K vs 242.3K tokens/s at MAC 65536 x 1)
    urgent_readouts = use_streams and switch_on("TITANS_WAVEFRONT_READOUT_URGENT")
    ro = {i: side_stream(dev, ("wavefront-readout", i), True) if urgent_readouts else ffn[i]
          for i in range(n) if use_streams and apart[i]}
    # the batched segment inputs' stream (forward_mixer's run_inputs), at the chain's priority: the chain waits on it
    inp = {i: side_stream(dev, ("wavefront-inputs", i), urgent[i]) for i in range(n)
           if use_streams and inputs_apart and queries_on[i]}
    # deferred weight gradients (on by default here, TitansBlock.defers_weight_grads): a memory block's sums over its
    # segments run on a stream of their own, off the block's chain (titans.utils.weight_grads); without, no joins
    wgrad = {i: side_stream(dev, ("wavefront-weight-grads", i)) for i in range(n)
             if use_streams and model.blocks[i].defers_weight_grads(in_wavefront=True)}
    # each stream once (the read-outs' may be the feed-forward's)
    every = list(dict.fromkeys(side + list(ffn.values()) + list(ro.values()) + list(inp.values())
                               + list(wgrad.values())))
    for st in every:  # each starts after what the caller queued
        st.wait_stream(main)
    if use_streams:
        # the fresh state was made on the caller's stream and is read on block i's streams (the chain's, and the
        # batched inputs' for the read convolution's cache); a segment replacing it frees it mid-call, and the caller's
        # stream, which waits on no block until the end, would then hand its memory to its next allocation (the next
        # segment's embedding) while the block may not have read it yet - in a CUDA graph's replay it did not: every
        # layout whose first write let go of the initial momentum (the split core) computed another loss (session 40,
        # found on the CPU by benchmarks/stream_hazards.py)
        for i in range(n):
            for t in _tensors(layers[i]):
                for st in (side[i], inp.get(i)):
                    if st is not None:
                        t.record_stream(st)

    def on(i: int):  # block i's stream, or nothing to switch
        return torch.cuda.stream(side[i]) if use_streams else nullcontext()

    def readout_on(i: int):  # forward_mixer_split's callback: the read-out on block i's feed-forward stream
        if not (use_streams and apart[i]):
            return None

        def run(fn, *args):
            ro[i].wait_stream(side[i])
            for t in _tensors(args):  # made on block i's stream (or before): kept alive for the other one's use
                t.record_stream(ro[i])
            with torch.cuda.stream(ro[i]):
                return fn(*args)
        return run

    def inputs_on(i: int):  # forward_mixer(_split)'s callback: the call's segment inputs on block i's inputs stream
        if i not in inp:
            return None

        def run(fn, *args):  # x was handed to inp[i] in the loop below; the read convolution's cache was made there
            with torch.cuda.stream(inp[i]):
                out = fn(*args)
            side[i].wait_stream(inp[i])
            for t in _tensors(out):
                t.record_stream(side[i])
            return out
        return run

    views = switch_on("TITANS_WAVEFRONT_STREAM_VIEWS") if stream_views is None else stream_views
    persistent_on = [persistent] * n  # what block i reads as the persistent tokens
    embed = model.embed
    if views:
        if persistent is not None:
            for i in range(n):
                with on(i):  # made on block i's stream: its gradient is summed there
                    persistent_on[i] = persistent.view_as(persistent)
        emb_weight = model.embed.weight.view_as(model.embed.weight)  # on the caller's stream, where it embeds

        def embed(ids: Tensor) -> Tensor:
            return functional_call(model.embed, {"weight": emb_weight}, (ids,))
    head_weight = None  # the head's view, made on the head's stream at the first segment

    # not model.run_blocks: its head would run on the caller's stream, and the caller's stream waiting on a segment's
    # last block would hold the next segment's embedding (and so every block of it) until that segment is through,
    # the layer-by-layer order again.  The caller's stream only embeds; it joins the side streams once, at the end.
    def hand_to(x: Tensor, made_on, stream):  # stream reads x next: wait for its producer, keep its memory alive
        if use_streams and stream is not made_on:  # (the read-outs on the feed-forward's stream hand x to itself)
            stream.wait_stream(made_on)
            x.record_stream(stream)
        return stream

    for i, stream in wgrad.items():
        model.blocks[i].weight_grad_stream = stream
    for block in model.blocks:
        block.in_wavefront = True
        block.weight_casts = {}  # each weight cast once this step, not once a call (weight_grads.cast_weights)
    try:
        outs = []
        for start in range(0, T, seg):
            x = embed(input_ids[:, start:start + seg])  # on the caller's stream
            made_on = main
            for i, block in enumerate(model.blocks):
                if i in inp:  # straight from its producer: not behind the chain's previous call
                    hand_to(x, made_on, inp[i])
                made_on = hand_to(x, made_on, side[i] if use_streams else None)
                if not (split[i] or readout[i] or queries_on[i]):
                    with on(i):
                        x = block(x, layers[i], start, persistent_on[i], True)
                    continue
                with on(i):
                    if readout[i]:  # apart, its residual sum, the mixer's last step, ran on the read-out stream
                        x = block.forward_mixer_split(x, layers[i], start, persistent_on[i], True, readout_on(i),
                                                      batched, queries_on[i], inputs_on(i))
                    else:
                        x = block.forward_mixer(x, layers[i], start, persistent_on[i], True, queries_on[i],
                                                inputs_on(i))
                if use_streams and i in ffn:
                    made_on = hand_to(x, ro[i] if apart[i] else made_on, ffn[i])
                with torch.cuda.stream(ffn[i]) if use_streams and i in ffn else on(i):
                    x = block.feed_forward(x)
            with torch.cuda.stream(made_on) if use_streams else nullcontext():  # the head where x was made
                if views:
                    if head_weight is None:
                        head_weight = model.lm_head.weight.view_as(model.lm_head.weight)
                    logits = functional_call(model.lm_head, {"weight": head_weight}, (model.norm(x),))
                else:
                    logits = model.lm_head(model.norm(x))
            if use_streams:
                logits.record_stream(main)  # read by the caller's stream (the concatenation below) after the join
            outs.append(logits)
    finally:
        for i in wgrad:
            model.blocks[i].weight_grad_stream = None
        for block in model.blocks:
            block.in_wavefront = False
            block.weight_casts = None
    for st in every:  # the caller's stream goes on after everything
        main.wait_stream(st)  # (a capture joins here)
    return torch.cat(outs, dim=1)


def readouts_apart_by_default(use_streams: bool) -> bool:
    """Whether MAC's segment read-outs run apart from the segment chain when the caller does not say
    (``TITANS_WAVEFRONT_READOUT_STREAMS``: ``1`` / ``0``; ``auto``, the default: where the wavefront runs on CUDA
    streams and the process has at least 32 hardware queues, :func:`~titans.utils.tensors.widen_hardware_queues`).

    Why auto: apart, a segment's read-out backward (the memory backward's first stage among it) leaves the chain, the
    step's critical path, for a stream beside it - faster only where that stream has a hardware queue of its own.
    MAC 65536 x 1 in 4096-token steps (benchmarks/RESULTS.md section 6): with 8 queues 13-28% slower (sessions
    23-33); with 32 on an H200 326.8-327.1K tokens/s against 313.4-314.7K together (three same-machine pairs,
    session 42), on an H100 285.3K against 276.4K in 2048-token steps but 282.5K against 284.5K in 4096 (session
    40).  Its cost: 23.9 GB peak against 19.9 GB there (H200)."""
    value = switch_value("TITANS_WAVEFRONT_READOUT_STREAMS")
    if value != "auto":
        return value == "1"
    return use_streams and (widen_hardware_queues() or CUDA_DEFAULT_QUEUES) >= WAVEFRONT_QUEUES


def _use_streams(streams: bool | None, dev: torch.device) -> bool:
    """Whether the wavefront runs on CUDA streams: ``streams``, by default on CUDA; True elsewhere raises.
    ``benchmarks/stream_hazards.py`` replaces it to run the streams' layout on the CPU with stand-in streams."""
    use = dev.type == "cuda" if streams is None else streams
    if use and dev.type != "cuda":
        raise ValueError(f"streams=True needs a CUDA device, got {dev}")
    return use


def _tensors(obj):
    """The tensors in ``obj``: a tensor, a tuple / list, or a dataclass (a MemoryRead and what it holds)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def wavefront_loss(model: TitansLM, input_ids: Tensor, labels: Tensor | None = None, segment: int | None = None,
                   streams: bool | None = None, priority: bool | None = None, ffn_streams: bool | None = None,
                   stream_views: bool | None = None, readout_streams: bool | None = None,
                   batched_readouts: bool | None = None, batched_queries: bool | None = None,
                   inputs_stream: bool | None = None) -> Tensor:
    """The language-modelling loss of :func:`wavefront_logits` (labels default to the inputs, shifted inside)."""
    return lm_loss(wavefront_logits(model, input_ids, segment, streams, priority, ffn_streams, stream_views,
                                    readout_streams, batched_readouts, batched_queries, inputs_stream),
                   input_ids if labels is None else labels)
