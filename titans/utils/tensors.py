"""Small tensor helpers shared by the streaming states."""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from titans.utils.switches import switch_on, switch_value


def keep_last(t: Tensor, n: int, dim: int) -> Tensor:
    """The last ``n`` entries of ``t`` along ``dim``, for a state that outlives ``t``.

    A slice is a view and keeps all of ``t``'s storage alive: a KV or convolution cache cut from a long piece's
    projections would hold the whole piece in memory (with a 16K-token prefill piece, ~0.2 GB per model of
    the decode harness).  So the entries are copied out when they are less than half of ``t``; a decode step's
    cache (its input was the previous cache plus one token) stays a cheap view.
    """
    size = t.shape[dim]
    out = t.narrow(dim, size - n, n)
    if torch.compiler.is_compiling():
        # a graph output that is a view of symbolic length (MAC's segment cache: the current segment's tokens) trips
        # inductor's output-stride check (AssertionError in require_strides, torch 2.13), and inductor drops a clone
        # as a no-op: a copy into a fresh dense tensor stays
        return torch.empty(out.shape, dtype=out.dtype, device=out.device).copy_(out)
    return out.clone() if 2 * n < size else out


def strides_like(g: Tensor, strides: tuple[int, ...]) -> Tensor:
    """``g`` itself, or, where its strides differ from ``strides`` only at dimensions of size 1 (whose stride
    addresses nothing), a view of the same memory with ``strides``.  No copy.  Why: AOTAutograd compares a compiled
    region's incoming gradient with the strides it traced for that output, exactly, size-1 dimensions included,
    and copies one that differs (a kernel): a slice along the sequence of a batch-1 gradient, (1, T, d) with strides
    (T_all d, d, 1), is handed on with the output's own.  While torch.compile traces, ``g`` itself (inside one graph
    no such copy arises; a stride test would break the graph)."""
    strides = tuple(strides)
    if torch.compiler.is_compiling() or g.stride() == strides or len(strides) != g.ndim:
        return g
    if any(n != 1 and a != b for n, a, b in zip(g.shape, g.stride(), strides)):
        return g
    return g.as_strided(g.shape, strides, g.storage_offset())


class GradientLike(torch.autograd.Function):
    """The identity, whose backward hands the gradient on through :func:`strides_like` with the strides of the
    tensor it is the gradient of (a view, no copy): put after a compiled region's output that another region or an
    eager operation reads (MAC's convolution caches, segment to segment; a block's stacked read-outs), so that the
    gradient reaches the first region's backward with the strides it traced and AOTAutograd does not copy it."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.strides = t.stride()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return strides_like(grad, ctx.strides)


def _records_eagerly(t: Tensor) -> bool:
    """Whether autograd records ``t`` outside a torch.compile trace: where the identity-like autograd functions here
    (:func:`gradient_like`, :func:`split_in_memory_order`) go between compiled regions.  (Compiling is asked first:
    inside one graph no stride copy arises, and nothing more is read while dynamo traces.)"""
    return not torch.compiler.is_compiling() and torch.is_grad_enabled() and t.requires_grad


def memory_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dimensions that lists them outermost first in memory (``t.permute(order)`` is
    contiguous), or None where no permutation is (gaps, overlaps)."""
    order = tuple(sorted(range(t.ndim), key=lambda i: (-t.stride(i), i)))
    return order if t.permute(order).is_contiguous() else None


class SplitInMemoryOrder(torch.autograd.Function):
    """``t.split(lengths, dim)``, whose backward concatenates the pieces' gradients in ``t``'s memory order (one
    concatenation, reading the pieces with their own strides) and hands the result on with ``t``'s strides.

    Why: a plain split's backward concatenates into a contiguous tensor.  When ``t`` is a compiled region's output
    stored in another order (MAC's batched segment inputs: attention's queries / keys / values are (B, H, T, d) views
    of (B, T, H, d) memory, the retrieval's queries come channel-major from the convolution), AOTAutograd, which
    traced that output's gradient with the output's strides, copies the contiguous gradient into them: a second
    full pass over it a tensor and wavefront call (benchmarks/RESULTS.md section 6, session 47).  Only where the
    region's shapes are static (every wavefront call the same length): for a region compiled with dynamic shapes
    AOTAutograd expects a contiguous gradient, which the plain split gives and this does not."""

    @staticmethod
    def forward(ctx, t: Tensor, lengths: tuple[int, ...], dim: int):
        pieces = t.split(list(lengths), dim)
        ctx.dim, ctx.strides, ctx.order = dim, t.stride(), memory_order(t)
        ctx.piece_shapes = [p.shape for p in pieces]
        ctx.set_materialize_grads(False)  # a piece without a gradient gets zeros here, at its own size
        return pieces

    @staticmethod
    def backward(ctx, *grads):
        ref = next(g for g in grads if g is not None)
        grads = [g if g is not None else ref.new_zeros(shape) for g, shape in zip(grads, ctx.piece_shapes)]
        order = ctx.order
        if order is None:
            return torch.cat(grads, ctx.dim), None, None
        inverse = tuple(order.index(i) for i in range(len(order)))
        g = torch.cat([x.permute(order) for x in grads], order.index(ctx.dim)).permute(inverse)
        return strides_like(g, ctx.strides), None, None


def split_in_memory_order(t: Tensor, lengths: list[int], dim: int) -> list[Tensor]:
    """``list(t.split(lengths, dim))``, through :class:`SplitInMemoryOrder` where autograd records ``t`` and
    ``TITANS_WAVEFRONT_INPUTS_LAYOUT=1`` (opt-in: no gain on an H100, session 48)."""
    if not (_records_eagerly(t) and switch_on("TITANS_WAVEFRONT_INPUTS_LAYOUT")):
        return list(t.split(lengths, dim))
    return list(SplitInMemoryOrder.apply(t, tuple(lengths), dim))


def gradient_like(t: Tensor | None) -> Tensor | None:
    """``t`` through :class:`GradientLike` when autograd records it, else ``t`` (None stays None)."""
    if t is None or not _records_eagerly(t):
        return t
    return GradientLike.apply(t)


def capturing_cuda_graph() -> bool:
    """True while a CUDA graph is being captured: no host syncs (id-range checks), nothing kept for later calls."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_SIDE_STREAMS: dict[tuple, torch.cuda.Stream] = {}


def side_stream(device: torch.device | str, role: tuple | str = "side", urgent: bool = False) -> torch.cuda.Stream:
    """The CUDA stream of ``role`` on ``device`` (the device's highest priority when ``urgent``): made once per
    process and handed out again on every call.

    Why not a fresh ``torch.cuda.Stream()`` per use: PyTorch keeps a cuBLAS workspace (32 MiB on Hopper) for every
    stream a matmul ever ran on, for the life of the process, so a stream made per call leaks one workspace per call.
    A decoder made per context (the harness's decode rows: a warm-up stream each) kept the previous one's workspace,
    which was all of decode's peak memory growth from 1K to 1M tokens of context (0.290 -> 0.323 GB;
    benchmarks/RESULTS.md section 6, session 22).  A step captured in a CUDA graph and its warm-up runs also need the
    same streams."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"side_stream: CUDA streams need a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), role, urgent)
    if key not in _SIDE_STREAMS:
        # priorities outside the device's range are clamped to it: -100 is the highest the device has
        _SIDE_STREAMS[key] = torch.cuda.Stream(device, priority=-100 if urgent else 0)
    return _SIDE_STREAMS[key]


QUEUES_ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
CUDA_DEFAULT_QUEUES = 8  # what CUDA gives a process with the variable unset
WAVEFRONT_QUEUES = 32  # CUDA's most
_queues_warned = False


def cuda_driver_started() -> bool | None:
    """Whether this process's CUDA driver has been initialised (``cuInit``), which ``torch.cuda.is_available()``
    alone does while ``torch.cuda.is_initialized()`` stays False.  Asked of the driver library itself: before
    ``cuInit`` its ``cuDeviceGetCount`` answers ``CUDA_ERROR_NOT_INITIALIZED`` (3), after it success (0) - the
    process's one loaded ``libcuda``, so torch's use of it counts.  None where there is no driver to ask (no CUDA
    on the machine) or it answers otherwise."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    except (OSError, AttributeError):
        return None
    return {0: True, 3: False}.get(status)


def widen_hardware_queues(queues: int = WAVEFRONT_QUEUES) -> int | None:
    """Ask CUDA for ``queues`` hardware work queues (``CUDA_DEVICE_MAX_CONNECTIONS``, 8 by default) for the streams
    of this process, where that still works: the variable unset and CUDA's driver not yet initialised in the process
    (:func:`cuda_driver_started`).  Setting it after ``torch.cuda.is_available()``, which initialises the driver
    (``cuInit``), is too late: session 41's harness did so, and its wavefront rows ran at the 8-queue rate, 260,960
    tokens/s against 284,300 with the variable set before the process (one H100); asked before it (session 42, one
    H200), 314,683 against 313,432 set before the process and 237,684 with 8.  Returns the queues the process
    has or will have (None: unknown, the variable unset and CUDA already started: CUDA's default).  A value the user
    set is left as it is.

    Why (issue 7): every stream a process uses (a captured CUDA graph's branches too) is multiplexed onto these
    queues, and work on one queue runs in order, so a stream whose kernels share a queue with another's waits behind
    them even where nothing orders the two.  The wavefront (:mod:`titans.training.wavefront`) puts each memory
    block's chain, feed-forward, batched inputs and weight-gradient sums on streams of their own (12 and more for
    MAC's three memory blocks).  On an H100 (benchmarks/RESULTS.md section 6, session 40), MAC 65536 x 1: the
    memory read-outs on streams of their own 243.0K tokens/s with 8 queues and 284.9-285.3K with 32; 4096-token
    steps 260.5K with 8 and 284.5K with 32; the default layout 277.7-278.4K with 8, 276.4K with 32; MAC 4096 x 8 in
    one pass 339.8-340.1K either way."""
    raw = os.environ.get(QUEUES_ENV)
    if raw is not None:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{QUEUES_ENV}={raw!r}: expected a whole number of hardware queues (1-32)") from None
    if torch.cuda.is_initialized() or cuda_driver_started():
        return None
    os.environ[QUEUES_ENV] = str(queues)
    return queues


def note_hardware_queues(queues: int = WAVEFRONT_QUEUES) -> None:
    """Warn once a process when CUDA runs with fewer than ``queues`` hardware work queues
    (:func:`widen_hardware_queues` came too late, or the user set fewer): the wavefront's streams then wait on one
    another's queues (a layout 15% slower on an H100, session 40)."""
    global _queues_warned
    if _queues_warned:  # (called by every wavefront call: nothing more to do once it has warned)
        return
    have = widen_hardware_queues(queues)
    if have is not None and have >= queues:
        return
    _queues_warned = True
    warnings.warn(f"the wavefront's CUDA streams share {have or CUDA_DEFAULT_QUEUES} hardware work queues ({QUEUES_ENV}"
                  f"{'=' + str(have) if have else ' unset, CUDA already started'}): set {QUEUES_ENV}={queues} before "
                  "CUDA starts (the trainer and benchmarks/harness.py do, for training.wavefront / --wavefront) - "
                  "streams that share a queue wait on each other's work", RuntimeWarning, stacklevel=3)


CARVEOUT_ENV = "TITANS_MATMUL_SM_CARVEOUT"


def matmul_sm_carveout() -> int | None:
    """``TITANS_MATMUL_SM_CARVEOUT=N`` (a timing switch, issue 7): cuBLAS matmuls are asked to leave N of the GPU's
    SMs to kernels on other streams (torch's experimental SM carveout), so that the latency-bound memory kernels of a
    wavefront step's chains find SMs beside the weight-gradient and feed-forward matmuls.  Applied here, for the
    whole process; returns N, or None when unset (nothing changed).  A value that is not a whole number >= 0
    raises ``ValueError`` naming the variable."""
    raw = switch_value(CARVEOUT_ENV)
    if raw is None:
        return None
    sms = int(raw)
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
        raise RuntimeError(f"{CARVEOUT_ENV}: this torch ({torch.__version__}) has no SM carveout for matmuls")
    torch._C._set_sm_carveout_experimental(sms)
    return sms


@contextmanager
def gc_paused() -> Iterator[None]:
    """A full collection, then Python's cyclic garbage collector off inside the block (and back to its state before,
    also on error).

    For CUDA-graph captures: graphs of an earlier capture in the process (a curriculum's previous stage) live in
    reference cycles until a collection (``torch.cuda.graph`` collects before a capture only with
    ``torch.compiler.config.force_cudagraph_gc``), and a collection that happens to run inside a capture destroys
    them there, a call CUDA does not permit while a stream captures; the capture is invalidated.  MAC's 2,048-token
    stage failed that way in both GPU calls of benchmarks/RESULTS.md 4u (two "operation not permitted when stream is
    capturing (function reset)" warnings, the forward and backward graph of a previous capture, then the failed
    capture); the fix is not yet verified on a GPU.  The collection on entry destroys what is already garbage before
    the capture begins.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def can_cache_tensors() -> bool:
    """Whether a tensor built now may be kept for later calls (rotary tables, masks, triangles).

    Not while torch.compile traces (the graph recomputes it, and the compiler fuses that arithmetic anyway), nor
    while a CUDA graph is captured: captured kernels run only at replay, so a tensor kept from the capture would
    hold garbage for an eager call before the first replay.  The trainer's warm-up before the capture fills the
    caches, so the captured step only reads them.
    """
    return not torch.compiler.is_compiling() and not capturing_cuda_graph()


class KeptTensors:
    """Tensors built once and kept for later calls, at most ``capacity`` of them, never evicted.

    Never evicted because a CUDA graph captured after a tensor was kept reads it by address: freeing it (an LRU
    dropping it) would let the allocator hand its memory to something else and the graph would silently read that.
    Past capacity (or while :func:`can_cache_tensors` says no) the tensor is built per call, as without a cache.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._kept: dict = {}

    def get(self, key, build):
        """The tensor kept under ``key`` (hashable), else ``build()``, kept if allowed and there is room."""
        hit = self._kept.get(key)
        if hit is not None:
            return hit
        out = build()
        if len(self._kept) < self.capacity and can_cache_tensors():
            self._kept[key] = out
        return out

    def __len__(self) -> int:
        return len(self._kept)


def recompute(fn, *args):
    """``fn(*args)`` without keeping the tensors it saves for backward: the backward runs ``fn`` on the same
    arguments again to get them (activation checkpointing, non-reentrant, so regions may nest).  ``fn`` must be a
    pure function of its arguments and of module parameters (no state read or written outside them); its outputs
    may hold dataclasses (a ``MemoryState``).  The RNG state is not saved and restored: no region draws random
    numbers, and reading the CUDA generator's state has no place in a captured CUDA graph."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


# Whether recompute_when_recorded recomputes (``TITANS_RECOMPUTE_CHEAP=1``; the results are the same either way).
# Off by default since session 33: on an H200, one machine, keeping the tensors was faster at both of issue 7's shapes
# (MAC 65536 x 1 298.4K vs 292.1K tokens/s, 4096 x 8 382.7K vs 377.5K) for 1.8 GB / 0.8 GB more peak memory (21.7 /
# 9.2 GB; benchmarks/RESULTS.md section 6, session 33).  Session 14 chose recomputing when memory was the constraint.
RECOMPUTE_CHEAP = switch_on("TITANS_RECOMPUTE_CHEAP")


def recompute_when_recorded(fn, *args):
    """:func:`recompute` while autograd records (a training step), a plain call otherwise (inference, decoding).

    For cheap regions whose saved tensors outweigh their arithmetic: elementwise chains in float32 over every token
    (norms, gates, the memory's decay coefficients), a few small matmuls.  The recomputation repeats the same
    operations on the same inputs, so values and gradients are bit-equal to keeping the tensors."""
    return recompute(fn, *args) if RECOMPUTE_CHEAP and torch.is_grad_enabled() else fn(*args)


def autograd_nodes(tensor: Tensor) -> list:
    """Every node of the autograd graph behind ``tensor`` (its ``grad_fn`` and all it reaches), each once, in
    depth-first order: how a computation is recorded (the tests' checks of which backward ops a loss has, the
    benchmarks' count of the gradients the wavefront hands between streams)."""
    seen, order, todo = set(), [], [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        order.append(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return order
