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
numbers.  Measured (benchmarks/RESULTS.md section 6, session 20; H200, compiled blocks, CUDA graphs,
``TITANS_TRITON_BWD=split``): MAC 65536 x 1 at 209.0K tokens/s against 130.5K one-pass (kernels ~3 deep on 20
streams), 0.565x MAC's 4096 x 8 rate.  The trainer's ``training.wavefront`` and ``benchmarks/harness.py --wavefront``
use it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from titans.core.models.model import TitansLM, lm_loss


def wavefront_logits(model: TitansLM, input_ids: Tensor, segment: int | None = None,
                     streams: bool | None = None) -> Tensor:
    """Logits (B, T, vocab) of ``input_ids`` (B, T) computed segment-major (see the module docstring).

    segment: tokens per step (default: the model's window, MAC's segment); streams: one CUDA stream per block
    (default: on CUDA).  Gradients flow through the carried states, so ``lm_loss`` of the result trains the model
    exactly as ``model(input_ids, labels=input_ids)`` does."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
    seg = segment or model.config.window
    if seg < 1:
        raise ValueError(f"segment: expected >= 1, got {seg}")
    B, T = input_ids.shape
    dev = input_ids.device
    use_streams = dev.type == "cuda" if streams is None else streams
    if use_streams and dev.type != "cuda":
        raise ValueError(f"streams=True needs a CUDA device, got {dev}")
    persistent = model.persistent()
    layers = model.init_state(B, dev).layers  # a fresh state: its layer states are updated in place below
    main = torch.cuda.current_stream(dev) if use_streams else None
    side = _streams(dev, len(model.blocks)) if use_streams else []
    for st in side:  # each side stream starts after what the caller queued (the initial state; a capture's start)
        st.wait_stream(main)

    def on(i: int):  # block i's stream, or nothing to switch
        return torch.cuda.stream(side[i]) if use_streams else nullcontext()

    # not model.run_blocks: its head would run on the caller's stream, and the caller's stream waiting on a segment's
    # last block would hold the next segment's embedding (and so every block of it) until that segment is through,
    # the layer-by-layer order again.  The caller's stream only embeds; it joins the side streams once, at the end.
    outs = []
    for start in range(0, T, seg):
        x = model.embed(input_ids[:, start:start + seg])  # on the caller's stream
        for i, block in enumerate(model.blocks):
            if use_streams:
                side[i].wait_stream(main if i == 0 else side[i - 1])  # this segment's input is ready
                x.record_stream(side[i])  # and its memory is not reused by its producer while block i reads it
            with on(i):
                x = block(x, layers[i], start, persistent, True)
        with on(len(side) - 1):  # the head on the last block's stream
            logits = model.lm_head(model.norm(x))
        if use_streams:
            logits.record_stream(main)  # read by the caller's stream (the concatenation below) after the join
        outs.append(logits)
    for st in side:  # the caller's stream goes on after every block's last segment (a capture joins here)
        main.wait_stream(st)
    return torch.cat(outs, dim=1)


_STREAMS: dict[tuple[str, int], list] = {}


def _streams(device: torch.device, n: int) -> list:
    """n side streams of ``device``, the same ones on every call (a step captured in a CUDA graph and its warm-up
    runs use the same streams; streams are not created per step)."""
    key = (str(device), n)
    if key not in _STREAMS:
        _STREAMS[key] = [torch.cuda.Stream(device) for _ in range(n)]
    return _STREAMS[key]


def wavefront_loss(model: TitansLM, input_ids: Tensor, labels: Tensor | None = None, segment: int | None = None,
                   streams: bool | None = None) -> Tensor:
    """The language-modelling loss of :func:`wavefront_logits` (labels default to the inputs, shifted inside)."""
    return lm_loss(wavefront_logits(model, input_ids, segment, streams), input_ids if labels is None else labels)
