"""Masks as data, and rotary position embeddings.

A :class:`MaskSpec` describes who may attend to whom; every backend realises the same spec:
the reference builds a dense boolean mask, SDPA takes a small dense mask (or ``is_causal``), and
FlexAttention gets a ``mask_mod`` and a block mask, so sliding-window and segment masks never
materialise a T x T matrix on the GPU.

Key layout seen by a query: ``[prefix (persistent tokens) | memory tokens (MAC) | context tokens]``.
Context and memory tokens carry absolute positions; prefix tokens are visible to every query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from titans.utils.tensors import KeptTensors, can_cache_tensors, capturing_cuda_graph


@dataclass(frozen=True)
class MaskSpec:
    """Who may attend to whom.

    kind: ``"causal"`` (j <= i), ``"sliding"`` (i - window < j <= i), ``"segment"`` (j <= i and
    j // window == i // window: full causal inside segments of ``window`` tokens).
    prefix_len: leading prefix tokens every query sees (persistent memory, Eq. 19).
    memory_tokens: MAC's retrieved tokens, one per context position; query i sees memory token j under
    the same rule as context token j (so j <= i: never a later position's retrieval).
    """

    kind: Literal["causal", "sliding", "segment"] = "causal"
    window: int | None = None
    prefix_len: int = 0
    memory_tokens: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("causal", "sliding", "segment"):
            raise ValueError(f"MaskSpec.kind={self.kind!r}: expected 'causal', 'sliding' or 'segment'")
        if self.kind != "causal" and (self.window is None or self.window < 1):
            raise ValueError(f"MaskSpec.window={self.window!r}: kind {self.kind!r} needs an int window >= 1")
        if self.prefix_len < 0:
            raise ValueError(f"MaskSpec.prefix_len={self.prefix_len}: expected >= 0")

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Elementwise rule for context (and memory) tokens; broadcasts q_pos against k_pos."""
        ok = k_pos <= q_pos
        if self.kind == "sliding":
            ok = ok & (k_pos > q_pos - self.window)
        elif self.kind == "segment":
            ok = ok & (torch.div(k_pos, self.window, rounding_mode="floor")
                       == torch.div(q_pos, self.window, rounding_mode="floor"))
        return ok

    def keep_after(self, last_pos: int) -> int:
        """Smallest absolute position a query after ``last_pos`` can still see (for pruning caches)."""
        nxt = last_pos + 1
        if self.kind == "sliding":
            return nxt - self.window + 1
        if self.kind == "segment":
            return nxt // self.window * self.window
        return 0

    def kept_positions(self, last_pos: int) -> int:
        """How many positions a cache keeps after ``last_pos``: ``keep_after(last_pos) .. last_pos`` (at most all of
        them, ``last_pos + 1``, when the mask drops none)."""
        return max(0, last_pos - self.keep_after(last_pos) + 1)


def causal_mask(T: int, device=None) -> Tensor:
    """(T, T) bool, True = may attend: j <= i."""
    i = torch.arange(T, device=device)
    return i[None, :] <= i[:, None]


def sliding_window_mask(T: int, window: int, device=None) -> Tensor:
    """(T, T) bool: i - window < j <= i."""
    return MaskSpec("sliding", window).allowed(torch.arange(T, device=device)[:, None],
                                               torch.arange(T, device=device)[None, :])


def segment_mask(T: int, segment: int, device=None) -> Tensor:
    """(T, T) bool: j <= i inside the same segment of ``segment`` tokens."""
    return MaskSpec("segment", segment).allowed(torch.arange(T, device=device)[:, None],
                                                torch.arange(T, device=device)[None, :])


def build_dense_mask(spec: MaskSpec, q_pos: Tensor, k_pos: Tensor, mem_pos: Tensor | None = None) -> Tensor:
    """(Tq, prefix_len + [Tm] + Tk) bool in the layout [prefix | memory | context].

    q_pos (Tq,), k_pos (Tk,) absolute positions of queries and context keys; mem_pos (Tm,) those of
    memory tokens (defaults to k_pos when ``spec.memory_tokens``).  A negative key position marks an empty
    slot (the fixed-capacity ring buffers of static decoding, ``titans.inference.static_decode``): never seen.
    """
    def visible(keys: Tensor) -> Tensor:
        return spec.allowed(q_pos[:, None], keys[None, :]) & (keys >= 0)[None, :]

    parts = [torch.ones(q_pos.shape[0], spec.prefix_len, dtype=torch.bool, device=q_pos.device)]
    if spec.memory_tokens:
        parts.append(visible(k_pos if mem_pos is None else mem_pos))
    parts.append(visible(k_pos))
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class PositionRuns:
    """Positions of one attention call known on the host as contiguous runs, each ``(start, length)``: the
    queries, the context keys and the memory keys (None without memory tokens).  Training and streaming calls are
    such runs (the KV cache holds the positions just before the piece), so their dense mask is looked up in
    :func:`dense_mask` instead of built from position tensors on every call (MAC: every segment)."""

    q: tuple[int, int]
    k: tuple[int, int]
    mem: tuple[int, int] | None = None


# masks kept by dense_mask: at most this many, of at most this many entries each (a MAC segment of 512 tokens
# with 1024 keys is 2^19; longer whole-sequence masks are rare, large, and built per call as before), so the
# kept masks stay below 64 MB even as float32
_KEPT_MASK_ENTRIES = 1 << 20
_kept_masks = KeptTensors(16)


def dense_mask(spec: MaskSpec, runs: PositionRuns, device: torch.device, dtype: torch.dtype = torch.bool) -> Tensor:
    """:func:`build_dense_mask` of the runs: bool (True = may attend), or for a float ``dtype`` the additive mask
    SDPA makes of it (0 where allowed, -inf elsewhere; passing it saves SDPA that conversion per call).

    The rule is invariant under a common shift of all positions (for segment masks a shift by whole segments), so
    the runs are moved to a canonical origin (the first key, floored to its segment), where every training segment
    of MAC has the same key, and the mask is kept (unless :func:`can_cache_tensors` says not to)."""
    first = runs.k[0] if runs.mem is None else min(runs.k[0], runs.mem[0])
    shift = first // spec.window * spec.window if spec.kind == "segment" else first

    def moved(run):
        return None if run is None else (run[0] - shift, run[1])

    q, k, mem = moved(runs.q), moved(runs.k), moved(runs.mem)
    entries = q[1] * (spec.prefix_len + k[1] + (mem[1] if mem is not None else 0))
    if entries <= _KEPT_MASK_ENTRIES:
        device = torch.device(device)
        return _kept_masks.get((spec, q, k, mem, device, dtype), lambda: _mask_of_runs(spec, q, k, mem, device, dtype))
    return _mask_of_runs(spec, q, k, mem, device, dtype)


def _mask_of_runs(spec: MaskSpec, q, k, mem, device, dtype: torch.dtype) -> Tensor:
    def pos(run):
        return None if run is None else torch.arange(run[0], run[0] + run[1], device=device)

    ok = build_dense_mask(spec, pos(q), pos(k), pos(mem))
    if dtype == torch.bool:
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))


def flex_mask_mod(spec: MaskSpec):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for keys laid out as [prefix | context].

    Used for whole sequences without a cache or memory tokens (training, prefill), where query i and
    context key j sit at the same relative positions; causal and sliding masks are translation
    invariant, so one mask_mod (and one compiled kernel) serves every call.  Segment masks are not
    (their grid depends on the start position), and MAC calls attention one segment at a time anyway.
    """
    if spec.kind == "segment" or spec.memory_tokens:
        raise ValueError("flex_mask_mod: only causal / sliding masks without memory tokens")
    P = spec.prefix_len

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < P) | spec.allowed(q_idx, kv_idx - P)

    return mask_mod


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (rotate-half convention) at absolute positions.

    The cos / sin tables of a contiguous run of host positions (training, streaming) are slices of tables kept per
    (device, dtype) and grown on demand: no per-call arithmetic.  Only the first ``max_kept`` positions are kept:
    a run that reaches past them is computed per call and the kept table let go, so a stream of any length holds
    no memory that grows with it (a 1M-token prefill kept 4 GB of tables across 8 layers, benchmarks/RESULTS.md
    section 6, session 21).  Positions held on the device (static decoding) are computed by the same formula,
    :meth:`_tables_at`; a computed table equals the kept table's slice exactly (the same elementwise arithmetic).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_kept: int = 1 << 16) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: rotary embedding needs an even head dim")
        self.head_dim, self.max_kept = head_dim, max_kept
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        # (device, dtype) -> (cos, signed sin) for positions 0..n-1; not buffers: they follow inv_freq, not the
        # module's dtype casts, and stay out of the state dict
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self._captured: set[tuple[torch.device, torch.dtype]] = set()  # tables read by a CUDA-graph capture
        self._outgrown: list[tuple[Tensor, Tensor]] = []

    def _apply(self, fn, recurse: bool = True):
        # .to() / .double() may move or round inv_freq: the tables follow it
        self._tables, self._captured, self._outgrown = {}, set(), []
        return super()._apply(fn, recurse)

    def _let_go(self, key) -> None:
        """Drop the kept table of ``key``; one a captured CUDA graph read (by address) stays alive with the graph."""
        table = self._tables.pop(key, None)
        if table is not None and key in self._captured:
            self._outgrown.append(table)
        self._captured.discard(key)

    def _tables_at(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin (T, head_dim) of positions (T,): ``sin`` carries the rotate-half sign (its first half
        negated), so that :meth:`rotate` needs no negation."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(work)[:, None] * self.inv_freq.to(device=positions.device, dtype=work)[None, :]
        cos, sin = ang.cos(), ang.sin()
        return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)

    def cos_sin(self, positions: int | Tensor, length: int, dtype: torch.dtype,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Tables (length, head_dim) for :meth:`rotate`: ``positions`` is a host int, the first of ``length``
        consecutive positions (a slice of the kept table), or a (length,) tensor of positions (computed)."""
        if isinstance(positions, Tensor):
            return self._tables_at(positions, dtype)
        device = self.inv_freq.device if device is None else torch.device(device)
        end = positions + length
        if torch.compiler.is_compiling():
            # computed in the graph (fused by the compiler) for any position: sizing or reading the kept table
            # would make the graph depend on the position's value, one recompile per MAC segment
            return self._tables_at(torch.arange(positions, end, device=device), dtype)
        key = (device, dtype)
        table = self._tables.get(key)
        if end > self.max_kept:  # past the kept positions: computed, and the stream no longer needs the table
            if can_cache_tensors():
                self._let_go(key)
            return self._tables_at(torch.arange(positions, end, device=device), dtype)
        if table is None or table[0].shape[0] < end:
            n = min(self.max_kept, max(256, 1 << max(0, end - 1).bit_length()))  # doubling: few rebuilds
            if not can_cache_tensors():
                return self._tables_at(torch.arange(positions, end, device=device), dtype)
            self._let_go(key)
            table = self._tables[key] = self._tables_at(torch.arange(n, device=device), dtype)
        if capturing_cuda_graph():
            self._captured.add(key)  # the capture reads this table by address: keep it alive after it is replaced
        return table[0][positions:end], table[1][positions:end]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, H, T, hd) with tables from :meth:`cos_sin` (computed once for queries, keys and memory keys
        at the same positions) -> same shape.  ``x cos + rotate_half(x) sin`` with rotate_half(x) = [-x2, x1]:
        the sign sits in the table, so [x2, x1] is a roll, and the sum one addcmul (3 kernels instead of 5)."""
        return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, -1), sin.to(x.dtype))
