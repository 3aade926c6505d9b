"""Persistent memory (paper Section 3.3, Eq. 19): N_p learnable, input-independent tokens.

They are prepended to what attention sees (MAC, MAG) or to the memory's input (MAG, MAL):
``x_new = [p_1 .. p_Np] || x``.  ``num_tokens = 0`` turns them off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PersistentMemory(nn.Module):
    """N_p learnable tokens of width ``dim``; ``forward(batch_size)`` -> (B, N_p, dim)."""

    def __init__(self, num_tokens: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens}: expected >= 0")
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * init_std) if num_tokens else None

    def forward(self, batch_size: int | None = None) -> Tensor | None:
        if self.tokens is None:
            return None
        if batch_size is None:
            return self.tokens
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def prepend(self, x: Tensor) -> Tensor:
        """``[p] || x`` along the sequence axis; x: (B, T, dim) -> (B, N_p + T, dim)."""
        if self.tokens is None:
            return x
        return torch.cat([self.forward(x.shape[0]).to(x.dtype), x], dim=1)
