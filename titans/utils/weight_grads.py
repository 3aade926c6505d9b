"""Weight gradients of linear layers taken once over many segments instead of once per segment.

Why: at batch 1 a MAC memory block's training step is a chain of segment steps (each segment's retrieval reads the
memory its predecessor wrote), and each segment's backward also computes the weight gradient of every projection it
used - a small matmul, its cast to float32 and an add into ``.grad`` per projection, use and segment - though nothing
later in the chain needs them (MAC 65536 x 1 on an H200: ~140 kernels a segment on the chain, 11 of its 34 matmuls
weight gradients; benchmarks/RESULTS.md section 6, session 24).  Here the segments' backward passes hand on, per
projection use, the two factors of that gradient - the input x_s and the output gradient dy_s - and one node per
projection (and piece length) sums ``dW = sum_s dy_s^T x_s`` (and ``db = sum_s dy_s``) in one matmul per use and
``WGRAD_TOKENS`` tokens when the last of them has been through (optionally on another CUDA stream, off the chain).

How, inside autograd (so every caller - eager, ``torch.compile``, CUDA graphs, the wavefront - gets the same
gradients without a flush call): :class:`LinearGradFanout` takes the weight (and bias) and returns, for every
segment and use, two placeholder tensors ("taps": zero-stride, nothing allocated); the segments multiply with the
weight cast once to the compute dtype (:func:`cast_weights`; once a training step in the wavefront, whose calls
share the casts; without it each segment's graph would cast it again under autocast).  During a segment
:class:`TappedLinear` computes ``y = x W^T + b`` through :class:`_TappedLinearFn`, whose backward returns ``dy W`` for
x, nothing for W and b, and x and dy themselves as the taps' gradients.  The fanout's backward receives every tap's
gradient and returns the sums for W and b.  The arithmetic is the chain rule regrouped: tested equal to the per-
segment gradients in float64 (``tests/test_weight_grads.py``).

When: by default inside the wavefront (:mod:`titans.training.wavefront`: batch-1 rows, where the segment chain is
the step's critical path; MAC 65536 x 1 on an H200, 261.3K vs 250.5K tokens/s, session 26) and not in the one-pass
forward (MAC 4096 x 8: 365.7K vs 369.8K, the same machine: there the sums only cost memory);
``training.defer_weight_grads`` (:meth:`titans.core.models.model.TitansLM.set_weight_grad_deferral`) chooses
otherwise, and ``TITANS_DEFER_WEIGHT_GRADS=1`` / ``0`` overrides both.

The elementwise parameters a segment reads (norm weights, the memory's convolution: ``TitansBlock.segment_params``)
go the same way by plain autograd: :func:`segment_taps` hands each segment a stand-in of each, read through
:func:`segment_param`, a view of ``p.expand(pieces, ...).unbind(0)``, so their gradients are gathered by one node
and reach ``.grad`` once per block call instead of one add per segment on the chain.  ``TITANS_DEFER_PER_TOKEN=1``
broadcasts the stand-ins over the segment's tokens as well, ``(batch, tokens, *p.shape)``, so that a segment's
backward leaves their gradients per token and the sums over the tokens run once a call off the chain; on an H200 that
was 23% slower (MAC 65536 x 1: 224.8K vs 292.6K tokens/s, session 36), so it is off by default.

Which projections a segment uses, with which input shapes and in which order, is declared by the block
(:meth:`titans.core.models.model.TitansBlock.weight_grad_uses`); every use checks the declaration and the count is
checked after each segment, so a wiring change fails loudly instead of mixing up gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.utils.switches import switch_on


@dataclass(frozen=True)
class LinearUse:
    """One use of a :class:`TappedLinear` inside a segment: the input's shape and the rows of the weight it
    projects with (``None``: all of them; a slice: ``F.linear(x, W[rows])``, e.g. the memory's query-only
    projection)."""

    x_shape: tuple[int, ...]
    rows: slice | None = None


DEFER_ENV = "TITANS_DEFER_WEIGHT_GRADS"


def deferral_wanted(configured: bool) -> bool:
    """Whether to defer weight gradients: ``TITANS_DEFER_WEIGHT_GRADS`` (``1`` / ``0``, for timing experiments) wins
    over the ``configured`` choice; unset or empty, the configured choice stands.  Any other value raises
    ``ValueError`` naming the variable."""
    wanted = switch_on(DEFER_ENV)
    return configured if wanted is None else wanted


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a linear layer's matmul runs in here: autocast's on the weight's device when it is on, else the
    weight's (the taps carry x and dy in it, so autograd need not cast their gradients)."""
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _rows_of(weight: Tensor, rows: slice | None) -> Tensor:
    return weight if rows is None else weight[rows]


class _TappedLinearFn(torch.autograd.Function):
    """``F.linear(x, W[rows], b[rows])`` with W and b already in the compute dtype (cast once per call by the
    fanout), whose backward gives x its gradient and hands x and dy to the taps (their gradients) instead of
    computing W's and b's.  x is cast to the taps' dtype (autocast's: what ``F.linear`` would multiply in) and kept
    so, for the taps."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tap_x: Tensor, tap_dy: Tensor) -> Tensor:
        xc = x.to(tap_x.dtype)
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xc, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = (dy @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, x, dy


class TappedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) that can hand its weight gradient to a
    :class:`LinearGradFanout`: while :func:`segment_taps` has given it taps, its i-th call in a segment runs
    through :class:`_TappedLinearFn` with the i-th pair.  Without taps it is ``nn.Linear``.
    :meth:`project_rows` projects with a slice of the weight's rows (``F.linear(x, W[rows], b[rows])``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        # this segment's uses in call order: (use, weight and bias in the compute dtype, tap_x, tap_dy)
        self.taps: list[tuple[LinearUse, Tensor, Tensor | None, Tensor, Tensor]] | None = None
        self.uses = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.project_rows(x, None)

    def project_rows(self, x: Tensor, rows: slice | None) -> Tensor:
        if self.taps is None:
            return F.linear(x, _rows_of(self.weight, rows), None if self.bias is None else _rows_of(self.bias, rows))
        if self.uses >= len(self.taps):
            raise RuntimeError(f"weight-gradient taps: {self._label()} was called {self.uses + 1} times in a segment, "
                               f"{len(self.taps)} declared (TitansBlock.weight_grad_uses)")
        use, weight, bias, tap_x, tap_dy = self.taps[self.uses]
        if tuple(x.shape) != use.x_shape or rows != use.rows:
            raise RuntimeError(f"weight-gradient taps: {self._label()} use {self.uses} got x {tuple(x.shape)} with "
                               f"rows {rows}, declared x {use.x_shape} with rows {use.rows} "
                               "(TitansBlock.weight_grad_uses)")
        self.uses += 1
        return _TappedLinearFn.apply(x, _rows_of(weight, rows), None if bias is None else _rows_of(bias, rows),
                                     tap_x, tap_dy)

    def _label(self) -> str:
        return f"TappedLinear({self.in_features}, {self.out_features})"


class LinearGradFanout(torch.autograd.Function):
    """forward(weight, bias, uses, pieces, dtype) -> for each of ``pieces`` segments and each use the pair
    (tap_x, tap_dy) of zero-stride placeholders shaped like x and y, in ``dtype``; backward: the taps' gradients
    (x_s, dy_s) -> ``dW = sum_{s, use} dy^T x`` placed in the use's rows, ``db = sum dy`` (one matmul per use and
    ``WGRAD_TOKENS`` tokens of segments, in the taps' dtype, added in the weight's).  The segments multiply with the
    weight cast by :func:`cast_weights` (its gradient is the taps')."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, uses: Sequence[LinearUse], pieces: int,
                dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        ctx.uses, ctx.pieces, ctx.has_bias = tuple(uses), pieces, bias is not None
        out_rows = [weight.shape[0] if u.rows is None else len(range(*u.rows.indices(weight.shape[0])))
                    for u in uses]
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        taps = []
        for _ in range(pieces):
            for use, n_out in zip(uses, out_rows):
                y_shape = (*use.x_shape[:-1], n_out)
                taps.append(weight.new_empty_strided(use.x_shape, (0,) * len(use.x_shape), dtype=dtype))
                taps.append(weight.new_empty_strided(y_shape, (0,) * len(y_shape), dtype=dtype))
        return tuple(taps)

    @staticmethod
    def backward(ctx, *grads):
        uses, n = ctx.uses, len(ctx.uses)
        dw = db = None
        for i, use in enumerate(uses):
            pairs = [(grads[2 * (s * n + i)], grads[2 * (s * n + i) + 1]) for s in range(ctx.pieces)]
            pairs = [(x, dy) for x, dy in pairs if x is not None and dy is not None]
            if not pairs:  # a segment whose output did not reach the loss
                continue
            if pairs[0][0].is_cuda:  # made on the segments' stream, read on this one (the wavefront's own stream):
                here = torch.cuda.current_stream(pairs[0][0].device)  # not reused before these reads are done
                for t in (t for pair in pairs for t in pair):
                    t.record_stream(here)
            for group in _token_groups(pairs, WGRAD_TOKENS):
                x = torch.cat([p[0].reshape(-1, p[0].shape[-1]) for p in group])
                dy = torch.cat([p[1].reshape(-1, p[1].shape[-1]) for p in group])
                dw = _add_rows(dw, (dy.t() @ x).to(ctx.weight_dtype), use.rows, ctx.weight_shape)
                if ctx.has_bias:
                    db = _add_rows(db, dy.sum(0, dtype=ctx.weight_dtype), use.rows, ctx.weight_shape[:1])
        return dw, db, None, None, None


# tokens a weight-gradient matmul sums before its (compute-dtype) result is added in the weight's dtype: a bf16
# product rounds once per group, as the per-segment gradients rounded once per segment
WGRAD_TOKENS = 8192


def _token_groups(pairs: list[tuple[Tensor, Tensor]], tokens: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """``pairs`` (x, dy) in runs of about ``tokens`` rows each (at least one pair a run)."""
    group, n = [], 0
    for pair in pairs:
        group.append(pair)
        n += pair[0].numel() // pair[0].shape[-1]
        if n >= tokens:
            yield group
            group, n = [], 0
    if group:
        yield group


def _add_rows(total: Tensor | None, part: Tensor, rows: slice | None, shape) -> Tensor:
    """total (or zeros of ``shape``) with ``part`` added into ``rows`` (all rows: no zeros made)."""
    if rows is None:
        return part if total is None else total + part
    total = part.new_zeros(shape) if total is None else total
    total[rows] += part
    return total


def segment_param(module: nn.Module, name: str) -> Tensor:
    """``module``'s parameter ``name`` (dotted, e.g. ``"conv.weight"``), or the stand-in :func:`segment_taps` gave
    it for the segment running now: a view of the same values (with ``TITANS_DEFER_PER_TOKEN=1`` broadcast over the
    segment's tokens, ``(batch, tokens, *p.shape)``) whose gradient goes to one sum over the segments instead of an
    add into ``.grad`` per segment.  Modules read the elementwise parameters a MAC segment uses through this (norm
    weights, the memory's convolution) and apply them where either shape broadcasts."""
    stand_ins = module.__dict__.get("segment_params")
    return module.get_parameter(name) if stand_ins is None else stand_ins[name]


def segment_views(tensors: Sequence[Tensor], pieces: int) -> list[tuple[Tensor, ...]]:
    """For each of ``pieces`` segments, its own view of each of ``tensors`` (tensors every segment reads).  The views
    are ``t.expand(pieces, ...).unbind(0)``: nothing is allocated, and autograd gathers their gradients in one node
    (unbind's backward, a stack; expand's, a sum) once the last segment's gradient arrived, instead of adding each
    segment's into the tensor's gradient as it comes (an add a segment on the segments' chain).  Made on another CUDA
    stream, the stack and sum run there."""
    per_tensor = [t.expand(pieces, *t.shape).unbind(0) for t in tensors]
    return [tuple(views[s] for views in per_tensor) for s in range(pieces)]


def _param_stand_ins(params: Sequence[tuple[nn.Module, str]], batch: int,
                     lengths: Sequence[int]) -> list[dict[nn.Module, dict[str, Tensor]]]:
    """For each segment (``lengths[s]`` tokens), each module's stand-ins ``{name: view}`` of ``params`` ((module,
    dotted name) pairs): one view each of ``p.expand(len(lengths), ...).unbind(0)``, whose gradients reach ``.grad``
    once (:func:`segment_views`' way).  With ``TITANS_DEFER_PER_TOKEN=1`` the parameter broadcast over the segment's
    tokens, shape ``(batch, lengths[s], *p.shape)`` with zero strides (one expand per length): a segment's backward
    then hands on the gradient per token, and the sum over the segments' tokens runs once a length (expand's
    backward), where the stand-ins were made - 23% slower on an H200 at MAC 65536 x 1 (session 36), so not the
    default."""
    per_token = switch_on("TITANS_DEFER_PER_TOKEN")
    groups: dict[int, list[int]] = {}  # per token: a view shape per segment length; else one expand for them all
    for s, n in enumerate(lengths):
        groups.setdefault(n if per_token else 0, []).append(s)
    out: list[dict[nn.Module, dict[str, Tensor]]] = [{} for _ in lengths]
    for module, name in params:
        p = module.get_parameter(name)
        for n, pieces in groups.items():
            tokens = (batch, n) if per_token else ()
            for s, view in zip(pieces, p.expand(len(pieces), *tokens, *p.shape).unbind(0)):
                out[s].setdefault(module, {})[name] = view
    return out


def cast_weights(linear: nn.Linear, dtype: torch.dtype, casts: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """``linear``'s weight and bias in ``dtype``, detached: the segments' matmuls read them, and their gradients
    reach the parameters through the taps, not through these.  ``casts``: the ones already made, shared by the calls
    of one step (the wavefront's: a block called once per wavefront step would otherwise cast its weights anew each
    call, and keep each call's copies for the backward); keyed by the parameters and the dtype, so a dict made per
    step never hands out a cast of weights an optimizer has since changed."""
    key = (id(linear.weight), id(linear.bias), dtype)  # (the parameters outlive the step's dict)
    if casts is not None and key in casts:
        return casts[key]
    weight, bias = linear.weight.detach().to(dtype), None if linear.bias is None else linear.bias.detach().to(dtype)
    if casts is not None:
        casts[key] = (weight, bias)
    return weight, bias


@contextmanager
def segment_taps(plan_of: Callable[[int], Sequence[tuple[TappedLinear, Sequence[LinearUse]]]],
                 lengths: Sequence[int], stream: torch.cuda.Stream | None = None,
                 params: Sequence[tuple[nn.Module, str]] = (), casts: dict | None = None,
                 batch: int = 1) -> Iterator:
    """Deferred weight gradients over segment steps of ``lengths`` tokens each: yields ``piece(s)``, a context
    manager to run segment s in.  ``plan_of(length)``: each tapped projection with its declared uses in a segment
    of that length; one :class:`LinearGradFanout` per projection and distinct length.  ``params``: elementwise
    parameters ((module, dotted name) pairs) the segments read through :func:`segment_param`, each segment its own
    stand-in over its ``batch`` x length tokens (:func:`_param_stand_ins`).  ``stream``: where the fanouts and the
    stand-ins' gradient sums run (their backward runs there too; CUDA only).  ``casts``: see :func:`cast_weights`.
    Only while autograd records."""
    groups: dict[int, list[int]] = {}
    for s, n in enumerate(lengths):
        groups.setdefault(n, []).append(s)
    per_piece: list[list] = [[] for _ in lengths]  # piece s: (linear, its uses' entries in s)
    here = torch.cuda.current_stream() if stream is not None else None
    if stream is not None:
        stream.wait_stream(here)
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        stand_ins = _param_stand_ins(params, batch, lengths)
        for n, pieces in groups.items():
            for linear, uses in plan_of(n):
                dtype = compute_dtype(linear.weight)
                wc, bc = cast_weights(linear, dtype, casts)
                taps = LinearGradFanout.apply(linear.weight, linear.bias, tuple(uses), len(pieces), dtype)
                if stream is not None:  # cast on the fanout's stream, read on this one
                    for t in (wc, bc):
                        if t is not None:
                            t.record_stream(here)
                k = len(uses)
                for j, s in enumerate(pieces):
                    per_piece[s].append((linear, [(u, wc, bc, taps[2 * (j * k + i)], taps[2 * (j * k + i) + 1])
                                                  for i, u in enumerate(uses)]))
    if stream is not None:
        here.wait_stream(stream)
    linears = {id(lin): lin for entries in per_piece for lin, _ in entries}.values()
    modules = list(stand_ins[0]) if stand_ins else []

    def clear():
        for linear in linears:
            linear.taps, linear.uses = None, 0
        for module in modules:
            module.segment_params = None

    @contextmanager
    def piece(s: int):
        for linear, taps in per_piece[s]:
            linear.taps, linear.uses = taps, 0
        for module, views in stand_ins[s].items():
            module.segment_params = views
        try:
            yield
            for linear, taps in per_piece[s]:
                if linear.uses != len(taps):
                    raise RuntimeError(f"weight-gradient taps: {linear._label()} was called {linear.uses} times "
                                       f"in segment {s}, {len(taps)} declared (TitansBlock.weight_grad_uses)")
        finally:
            clear()

    try:
        yield piece
    finally:
        clear()


__all__ = ["LinearGradFanout", "LinearUse", "TappedLinear", "cast_weights", "compute_dtype", "deferral_wanted",
           "segment_param", "segment_taps", "segment_views"]
