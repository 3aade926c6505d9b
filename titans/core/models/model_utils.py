"""Small building blocks shared by every variant: RMSNorm, SwiGLU, the memory gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.core.models.fused_gate import fused_gate, fused_gate_applies
from titans.utils.weight_grads import segment_param


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learnable per-feature scale; x: (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """Feed-forward ``W_2 (SiLU(x W_1) * x W_3)``; (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class MemoryGate(nn.Module):
    """Combine a branch output y with the memory output m (MAC Eq. 25, MAG Eq. 28).

    ``o = norm_y(y) * sigmoid(norm_m(m))``: both normalised with learnable vector-valued weights,
    the memory side through a sigmoid non-linearity.  y, m: (B, T, dim) -> (B, T, dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_y = RMSNorm(dim, eps)
        self.norm_m = RMSNorm(dim, eps)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        # the weights through segment_param: a MAC segment's own stand-ins while weight gradients are deferred (with
        # TITANS_DEFER_PER_TOKEN=1 broadcast over its tokens (B, T, dim), so applied after the norms, not inside them)
        w_y, w_m = segment_param(self, "norm_y.weight"), segment_param(self, "norm_m.weight")
        # one Triton launch each way on CUDA (titans.core.models.fused_gate: fewer kernels per MAC segment, and
        # y / m kept as they came instead of the norms' float32 copies); the same equation in PyTorch elsewhere
        if w_y.ndim == 1 and fused_gate_applies(y, m):
            return fused_gate(y, m, w_y, w_m, self.norm_y.eps)
        d = y.shape[-1]
        # each weight multiplied as it is (float32 under autocast) and the product rounded back to its side's dtype:
        # a per-token stand-in cast to bf16 would be a per-token copy that the compiled backward keeps (the stand-in
        # itself costs nothing), and the sigmoid and the last product stay in y's / m's dtype, kept as such
        a = (F.rms_norm(y, (d,), None, self.norm_y.eps) * w_y).to(y.dtype)
        return a * torch.sigmoid((F.rms_norm(m, (d,), None, self.norm_m.eps) * w_m).to(m.dtype))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
