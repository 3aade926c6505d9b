"""Small tensor helpers shared by the streaming states."""

from __future__ import annotations

from torch import Tensor


def keep_last(t: Tensor, n: int, dim: int) -> Tensor:
    """The last ``n`` entries of ``t`` along ``dim``, for a state that outlives ``t``.

    A slice is a view and keeps all of ``t``'s storage alive: a KV or convolution cache cut from a long piece's
    projections would hold the whole piece in memory (with a 16K-token prefill piece, ~0.2 GB per model of
    the decode harness).  So the entries are copied out when they are less than half of ``t``; a decode step's
    cache (its input was the previous cache plus one token) stays a cheap view.
    """
    size = t.shape[dim]
    out = t.narrow(dim, size - n, n)
    return out.clone() if 2 * n < size else out
