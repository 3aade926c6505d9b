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
    """Rotary position embedding (rotate-half convention) at absolute positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: rotary embedding needs an even head dim")
        self.head_dim = head_dim
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(work)[:, None] * self.inv_freq.to(device=positions.device, dtype=work)[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, H, T, hd) with tables from :meth:`cos_sin` (computed once for queries, keys and memory keys
        at the same positions) -> same shape."""
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
        return x * cos.to(x.dtype) + rot * sin.to(x.dtype)
