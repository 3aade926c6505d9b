"""The momentum / decay coefficients of a chunk (Eq. 16-18) as one Triton kernel a direction (issue 7).

:func:`titans.core.memory.fused_update.chunk_coefficients` computes them in PyTorch: cumulative log-sums, the
exponentials of their differences (the decay matrices), three small batched matmuls and masks, recomputed in the
backward.  In MAC's training step at batch 1 all of it sits on each memory layer's chain of segments, and it is a
quarter of a segment backward graph's ops (``benchmarks/segment_graph_ops.py --by-source``, RESULTS.md section 6,
session 30): a dozen or more small kernels a segment.  Here one program per (batch, head, chunk) holds the chunk's
two (C, C) decay matrices in registers and writes the eight coefficients; the backward rebuilds them from the gates
(nothing but the gates is saved) and writes the gates' gradients.  Same outputs and gradients as the PyTorch code,
its exact-zero handling included (a zero gate gives exact zeros behind it and no gradient through its log); the
tests compare both in float64 under ``TRITON_INTERPRET=1``, and on a GPU both float32 paths with float64.  On by
default on CUDA (``TITANS_TRITON_COEFFICIENTS=0``: the PyTorch code).

Per chunk, with a in {eta, keep} (C,), L = cumsum(log a) and D[s, j] = exp(L_s - L_j) for j <= s with no zero
gate in (j, s] (else 0):  P = eta_0 D_eta[:, 0], G = keep_0 D_keep[:, 0], Bc = D_keep P, K = D_keep D_eta,
M = K * (-theta)[None, :], Ml = M[C - 1], m = -theta * D_eta[C - 1], Gl, Bl, Pl the last entries of G, Bc, P.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans.utils.switches import switch_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the PyTorch path stands in
    triton = None


def coefficients_on() -> bool:
    """Whether the memory ops take the fused coefficients where :func:`supports` allows: ``TITANS_TRITON_COEFFICIENTS``
    "1" or "0"; unset, on except under the interpreter (whose CPU tests keep the PyTorch code unless they ask).

    On by default since session 31 (H200, MAC, RESULTS.md section 6; each pair on one machine): 290,117 and 292,963
    tokens/s at 65536 x 1 against 283,309 and 285,513 without (+2.4%, +2.6%); 373,122 against 372,273 at 4096 x 8;
    within 4x PyTorch's own float32 error of float64 on the GPU."""
    on = switch_on("TITANS_TRITON_COEFFICIENTS")
    if on is None:
        from titans.core.memory.triton_kernels import interpreting

        return not interpreting()
    return on


def supports(lr: Tensor, chunk_size: int) -> bool:
    """The fused coefficients can run here: Triton, float32 gates on a CUDA device (or float32 / float64 under the
    interpreter, for the tests; float64 matmuls on a GPU were never compiled), a power-of-two chunk of at least 16
    (the smallest matmul tile)."""
    # (imported here: triton_kernels imports fused_update, which imports this module)
    from titans.core.memory.triton_kernels import _pow2, interpreting

    if triton is None or chunk_size < 16 or not _pow2(chunk_size):
        return False
    if interpreting():
        return lr.dtype in (torch.float32, torch.float64)
    return lr.is_cuda and lr.dtype == torch.float32


if triton is not None:

    @triton.jit
    def _decay(a, C: tl.constexpr):
        """D (C, C): D[s, j] = prod_{m=j+1..s} a_m for j <= s and no zero a_m in (j, s], else exactly 0."""
        zero = a == 0
        logs = tl.cumsum(tl.log(tl.where(zero, 1.0, a)), 0)
        zeros = tl.cumsum(zero.to(tl.int32), 0)
        r = tl.arange(0, C)
        kept = (r[None, :] <= r[:, None]) & (zeros[:, None] == zeros[None, :])
        return tl.exp(tl.where(kept, logs[:, None] - logs[None, :], float("-inf")))

    @triton.jit
    def _column0(X, C: tl.constexpr):
        r = tl.arange(0, C)
        return tl.sum(tl.where(r[None, :] == 0, X, 0.0), 1)

    @triton.jit
    def _last_row(X, C: tl.constexpr):
        r = tl.arange(0, C)
        return tl.sum(tl.where(r[:, None] == C - 1, X, 0.0), 0)

    @triton.jit
    def _last(x, C: tl.constexpr):
        return tl.sum(tl.where(tl.arange(0, C) == C - 1, x, 0.0), 0)

    @triton.jit
    def _coefficients_fwd_kernel(TH, ETA, KEEP, G, BC, M, ML, MM, GL, BL, PL, C: tl.constexpr):
        """One chunk (program i of B * H * N): the gates (C,) at i * C -> the eight coefficients."""
        i = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, C)
        th = tl.load(TH + i * C + r)
        eta = tl.load(ETA + i * C + r)
        keep = tl.load(KEEP + i * C + r)
        de = _decay(eta, C)
        dk = _decay(keep, C)
        p = tl.load(ETA + i * C) * _column0(de, C)
        g = tl.load(KEEP + i * C) * _column0(dk, C)
        bc = tl.sum(dk * p[None, :], 1)
        # float32 products as the PyTorch code makes them (autocast is off there): no TF32
        mat = tl.dot(dk, de, input_precision="ieee") * (-th)[None, :]
        tl.store(G + i * C + r, g)
        tl.store(BC + i * C + r, bc)
        tl.store(M + i * C * C + r[:, None] * C + r[None, :], mat)
        tl.store(ML + i * C + r, _last_row(mat, C))
        tl.store(MM + i * C + r, -th * _last_row(de, C))
        tl.store(GL + i, _last(g, C))
        tl.store(BL + i, _last(bc, C))
        tl.store(PL + i, _last(p, C))

    @triton.jit
    def _decay_log_grad(dD, D, a, C: tl.constexpr):
        """The gradient reaching a (C,) through D = exp(L_s - L_j) (masked), L = cumsum(log a): dL_s = sum_j dE[s, j]
        - sum_j dE[j, s] with dE = dD * D, then a reverse cumulative sum and 1 / a (0 where a is 0: the log there
        took 1 in its place)."""
        dE = dD * D
        dlog = tl.cumsum(tl.sum(dE, 1) - tl.sum(dE, 0), 0, reverse=True)
        return tl.where(a == 0, 0.0, dlog / tl.where(a == 0, 1.0, a))

    @triton.jit
    def _coefficients_bwd_kernel(TH, ETA, KEEP, DG, DBC, DM, DML, DMM, DGL, DBL, DPL, DTH, DETA, DKEEP,
                                 C: tl.constexpr):
        """One chunk: the gates and the coefficients' gradients -> the gates' gradients (the forward rebuilt)."""
        i = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, C)
        last = r == C - 1
        th = tl.load(TH + i * C + r)
        eta = tl.load(ETA + i * C + r)
        keep = tl.load(KEEP + i * C + r)
        eta0 = tl.load(ETA + i * C)
        keep0 = tl.load(KEEP + i * C)
        de = _decay(eta, C)
        dk = _decay(keep, C)
        p = eta0 * _column0(de, C)
        nt = -th
        # the outputs' gradients, the last entries' (Gl, Bl, Pl, Ml) folded into the full ones
        dg = tl.load(DG + i * C + r) + tl.where(last, tl.load(DGL + i), 0.0)
        dbc = tl.load(DBC + i * C + r) + tl.where(last, tl.load(DBL + i), 0.0)
        dmat = tl.load(DM + i * C * C + r[:, None] * C + r[None, :])
        dmat += tl.where(last[:, None], tl.load(DML + i * C + r)[None, :], 0.0)
        dm = tl.load(DMM + i * C + r)
        dp = tl.where(last, tl.load(DPL + i), 0.0) + tl.sum(dk * dbc[:, None], 0)
        # M = K * nt[None, :], K = D_keep D_eta; m = nt * D_eta[C - 1]
        kmat = tl.dot(dk, de, input_precision="ieee")
        dkmat = dmat * nt[None, :]
        dth = -(tl.sum(dmat * kmat, 0) + dm * _last_row(de, C))
        dde = tl.dot(tl.trans(dk), dkmat, input_precision="ieee") + tl.where(last[:, None], (dm * nt)[None, :], 0.0)
        ddk = tl.dot(dkmat, tl.trans(de), input_precision="ieee") + dbc[:, None] * p[None, :]
        # P = eta_0 D_eta[:, 0], G = keep_0 D_keep[:, 0]
        first = r[None, :] == 0
        dde += tl.where(first, (dp * eta0)[:, None], 0.0)
        ddk += tl.where(first, (dg * keep0)[:, None], 0.0)
        deta = _decay_log_grad(dde, de, eta, C) + tl.where(r == 0, tl.sum(dp * _column0(de, C), 0), 0.0)
        dkeep = _decay_log_grad(ddk, dk, keep, C) + tl.where(r == 0, tl.sum(dg * _column0(dk, C), 0), 0.0)
        tl.store(DTH + i * C + r, dth)
        tl.store(DETA + i * C + r, deta)
        tl.store(DKEEP + i * C + r, dkeep)


def _flat_chunks(t: Tensor, C: int) -> Tensor:
    """(B, H, T) -> contiguous (B * H * N, C)."""
    return t.reshape(-1, C).contiguous()


@torch.library.custom_op("titans::chunk_coefficients_forward", mutates_args=())
def chunk_coefficients_forward(theta: Tensor, eta: Tensor, keep: Tensor, chunk_size: int) -> list[Tensor]:
    """``[G, Bc, M, Ml, m, Gl, Bl, Pl]`` shaped as :func:`~titans.core.memory.fused_update.chunk_coefficients`
    returns them, from the gates theta, eta, keep (B, H, T)."""
    B, H, T = theta.shape
    C, N = chunk_size, T // chunk_size
    outs = _empty_coefficients(theta, C)
    _coefficients_fwd_kernel[(B * H * N,)](_flat_chunks(theta, C), _flat_chunks(eta, C), _flat_chunks(keep, C),
                                           *outs, C=C, num_warps=8 if C >= 64 else 4)
    return outs


def _empty_coefficients(theta: Tensor, C: int) -> list[Tensor]:
    """G, Bc, M, Ml, m, Gl, Bl, Pl, uninitialised, for gates (B, H, T) and chunk C."""
    B, H, T = theta.shape
    N = T // C
    return [theta.new_empty(shape) for shape in
            [(B, H, T), (B, H, T), (B, H, N, C, C), (B, H, N, C), (B, H, N, C), (B, H, N), (B, H, N), (B, H, N)]]


@chunk_coefficients_forward.register_fake
def _(theta, eta, keep, chunk_size):
    return _empty_coefficients(theta, chunk_size)


@torch.library.custom_op("titans::chunk_coefficients_backward", mutates_args=())
def chunk_coefficients_backward(theta: Tensor, eta: Tensor, keep: Tensor, grads: list[Tensor],
                                chunk_size: int) -> list[Tensor]:
    """``[d theta, d eta, d keep]`` (B, H, T) from the gates and the eight coefficients' gradients."""
    B, H, T = theta.shape
    C, N = chunk_size, T // chunk_size
    outs = [torch.empty_like(theta) for _ in range(3)]
    # 16 warps at C = 64: 128 registers a thread and nothing spilled (sm_90 cross-compile, Triton 3.6); at 8 the
    # float32 ("ieee") matmuls left ptxas at 32 registers and 6 KB of local memory a thread
    _coefficients_bwd_kernel[(B * H * N,)](_flat_chunks(theta, C), _flat_chunks(eta, C), _flat_chunks(keep, C),
                                           *[g.contiguous() for g in grads], *outs, C=C,
                                           num_warps=16 if C >= 64 else 4)
    return outs


@chunk_coefficients_backward.register_fake
def _(theta, eta, keep, grads, chunk_size):
    return [torch.empty_like(theta) for _ in range(3)]


class ChunkCoefficientsFunction(torch.autograd.Function):
    """Autograd for the fused coefficients: saves the gates only (the backward rebuilds the decay matrices)."""

    @staticmethod
    def forward(ctx, theta: Tensor, eta: Tensor, keep: Tensor, chunk_size: int):
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(theta, eta, keep)
        return tuple(chunk_coefficients_forward(theta, eta, keep, chunk_size))

    @staticmethod
    def backward(ctx, *grads):
        # (autograd materialises an unused output's gradient as zeros: none is None, eager or compiled)
        theta, eta, keep = ctx.saved_tensors
        dth, deta, dkeep = chunk_coefficients_backward(theta, eta, keep, list(grads), ctx.chunk_size)
        return dth, deta, dkeep, None


def fused_chunk_coefficients(lr: Tensor, momentum_decay: Tensor, forget: Tensor, chunk_size: int):
    """:func:`~titans.core.memory.fused_update.chunk_coefficients` through the Triton kernels (same signature,
    outputs and gradients).  The gates must be (B, H, T) alike, T a multiple of ``chunk_size`` (the kernels take
    whole chunks: a remainder would be dropped silently, so it is refused)."""
    gates = {"lr": lr, "momentum_decay": momentum_decay, "forget": forget}
    if lr.ndim != 3 or any(t.shape != lr.shape or t.dtype != lr.dtype for t in gates.values()):
        raise ValueError("fused_chunk_coefficients: the gates must be (B, H, T) of one shape and dtype, got "
                         + ", ".join(f"{k} {tuple(t.shape)} {t.dtype}" for k, t in gates.items()))
    if lr.shape[-1] % chunk_size:
        raise ValueError(f"fused_chunk_coefficients: T={lr.shape[-1]} is not a multiple of chunk_size={chunk_size}")
    return ChunkCoefficientsFunction.apply(lr.contiguous(), momentum_decay.contiguous(), (1 - forget).contiguous(),
                                           chunk_size)
