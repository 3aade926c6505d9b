"""The memory gate of MAC / MAG, ``o = norm_y(y) * sigmoid(norm_m(m))`` (Eq. 25, 28), as one Triton kernel.

:func:`gate_reference` is the definition in PyTorch (two RMS norms with learnable weights, a sigmoid, a product);
:func:`fused_gate` computes the same in one forward and one backward launch.  Why: MAC calls the gate once per
segment and memory layer, and in PyTorch it is four kernels forward (two norms, sigmoid, product; two more casts where
autocast widens the norms' inputs) and about nine backward, each reading or writing a (B, T, dim) tensor, and where
autocast runs the norms in float32 they save float32 copies of y and m.  The kernel computes in float32, saves y and
m as they came (bf16 under autocast; widening is exact) and the two per-row inverse RMS values, and returns the
dtype the PyTorch gate returns.

Used by :class:`~titans.core.models.model_utils.MemoryGate` on CUDA (and under ``TRITON_INTERPRET=1`` for the tests),
outside ``torch.compile`` (inductor fuses the PyTorch definition itself); ``TITANS_FUSED_GATE=0`` turns it off.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.core.memory.triton_kernels import interpreting
from titans.utils.switches import switch_on

try:  # optional, as for the memory kernels
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None


def gate_reference(y: Tensor, m: Tensor, wy: Tensor, wm: Tensor, eps: float) -> Tensor:
    """``rms_norm(y) * wy * sigmoid(rms_norm(m) * wm)`` over the last dim; y, m: (..., D); wy, wm: (D,)."""
    D = y.shape[-1]
    return F.rms_norm(y, (D,), wy.to(y.dtype), eps) * torch.sigmoid(F.rms_norm(m, (D,), wm.to(m.dtype), eps))


# the first failure of a launch (a Triton that cannot build the kernel here, say), kept for the process: from then
# on the gate runs in PyTorch
GATE_FAILED: list[str] = []


class GateKernelError(RuntimeError):
    """A launch of the gate's kernels failed (building or running them); the message names the cause."""


def _launch(kernel, grid, *args, **meta) -> None:
    # only the launch's own errors become GateKernelError: whatever autograd raises around it (the stop signal of a
    # checkpointed region's recomputation comes from save_for_backward) must pass through untouched
    try:
        kernel[grid](*args, **meta)
    except Exception as e:  # noqa: BLE001
        raise GateKernelError(f"{type(e).__name__}: {str(e)[:300]}") from e


def fused_gate_applies(y: Tensor, m: Tensor) -> bool:
    """Whether :func:`fused_gate` takes these inputs: Triton present, CUDA (or the interpreter), not compiling,
    float32 / bf16 / fp16 inputs of one shape, a last dim of at most 8192, and no earlier launch failed."""
    if torch.compiler.is_compiling() or triton is None or not switch_on("TITANS_FUSED_GATE"):
        return False
    if GATE_FAILED:
        return False
    if not (y.is_cuda or interpreting()) or y.shape != m.shape or y.shape[-1] > 8192:
        return False
    return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (y, m))


if triton is not None:

    @triton.jit
    def _gate_fwd_kernel(Y, M, WY, WM, O, RY, RM, R, eps, D: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows[:, None] < R) & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=ok, other=0.0).to(tl.float32)
        wy = tl.load(WY + cols, mask=cols < D, other=0.0).to(tl.float32)
        wm = tl.load(WM + cols, mask=cols < D, other=0.0).to(tl.float32)
        ry = 1.0 / tl.sqrt(tl.sum(y * y, 1) / D + eps)
        rm = 1.0 / tl.sqrt(tl.sum(m * m, 1) / D + eps)
        a = y * ry[:, None] * wy[None, :]
        s = tl.sigmoid(m * rm[:, None] * wm[None, :])
        tl.store(O + offs, (a * s).to(O.dtype.element_ty), mask=ok)
        tl.store(RY + rows, ry, mask=rows < R)
        tl.store(RM + rows, rm, mask=rows < R)

    @triton.jit
    def _gate_bwd_kernel(DO, Y, M, WY, WM, RY, RM, DY, DM, DWY, DWM, R, D: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        # o = a s, a = y_hat wy, s = sigmoid(m_hat wm), x_hat = x r; for n = x_hat w:
        # dx = r (dn w - x_hat mean(dn w x_hat)), dw = sum over rows of dn x_hat (partial sums per program)
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        ok = (rows[:, None] < R) & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        do = tl.load(DO + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=ok, other=0.0).to(tl.float32)
        wy = tl.load(WY + cols, mask=cols < D, other=0.0).to(tl.float32)
        wm = tl.load(WM + cols, mask=cols < D, other=0.0).to(tl.float32)
        ry = tl.load(RY + rows, mask=rows < R, other=0.0)
        rm = tl.load(RM + rows, mask=rows < R, other=0.0)
        y_hat = y * ry[:, None]
        m_hat = m * rm[:, None]
        a = y_hat * wy[None, :]
        s = tl.sigmoid(m_hat * wm[None, :])
        da = do * s
        dz = do * a * s * (1.0 - s)
        gy = da * wy[None, :]
        gm = dz * wm[None, :]
        dy = ry[:, None] * (gy - y_hat * (tl.sum(gy * y_hat, 1) / D)[:, None])
        dm = rm[:, None] * (gm - m_hat * (tl.sum(gm * m_hat, 1) / D)[:, None])
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=ok)
        tl.store(DM + offs, dm.to(DM.dtype.element_ty), mask=ok)
        tl.store(DWY + pid * D + cols, tl.sum(da * y_hat, 0), mask=cols < D)
        tl.store(DWM + pid * D + cols, tl.sum(dz * m_hat, 0), mask=cols < D)


def _grid_and_meta(R: int, D: int) -> tuple[tuple[int], dict]:
    """The launch of either kernel over R rows of D: about 4K elements of a tensor per program (32 a thread at 4
    warps; the backward holds ~8 such tiles in float32, more would spill)."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(16, 4096 // block_d))
    return (triton.cdiv(R, block_r),), dict(D=D, BLOCK_R=block_r, BLOCK_D=block_d,
                                            num_warps=4 if block_d <= 1024 else 8)


class _FusedGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, m: Tensor, wy: Tensor, wm: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        shape, D = y.shape, y.shape[-1]
        y2, m2 = y.reshape(-1, D).contiguous(), m.reshape(-1, D).contiguous()
        R = y2.shape[0]
        o = torch.empty(R, D, device=y.device, dtype=out_dtype)
        ry = torch.empty(R, device=y.device, dtype=torch.float32)
        rm = torch.empty_like(ry)
        wy, wm = wy.contiguous(), wm.contiguous()
        grid, meta = _grid_and_meta(R, D)
        _launch(_gate_fwd_kernel, grid, y2, m2, wy, wm, o, ry, rm, R, eps, **meta)
        ctx.save_for_backward(y2, m2, wy, wm, ry, rm)
        ctx.shape = shape
        return o.view(shape)

    @staticmethod
    def backward(ctx, do: Tensor):
        y2, m2, wy, wm, ry, rm = ctx.saved_tensors
        R, D = y2.shape
        grid, meta = _grid_and_meta(R, D)
        dy, dm = torch.empty_like(y2), torch.empty_like(m2)
        dwy = torch.empty(grid[0], D, device=y2.device, dtype=torch.float32)
        dwm = torch.empty_like(dwy)
        _launch(_gate_bwd_kernel, grid, do.reshape(R, D).contiguous(), y2, m2, wy, wm, ry, rm, dy, dm, dwy, dwm, R,
                **meta)
        return (dy.view(ctx.shape), dm.view(ctx.shape), dwy.sum(0).to(wy.dtype), dwm.sum(0).to(wm.dtype), None,
                None)


# (device type, input dtype, autocast dtype) -> the dtype F.rms_norm returns there under autocast
_NORM_DTYPES: dict[tuple, torch.dtype] = {}


def _norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.rms_norm`` gives ``x`` here: its own, or under autocast what autocast makes of the norm on this
    device (the CPU keeps bf16; a device that lists the norm among its float32 operations widens it).  Asked of
    PyTorch once per device type, input dtype and autocast dtype, with a 1 x 2 tensor."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x.dtype
    key = (dev, x.dtype, torch.get_autocast_dtype(dev))
    if key not in _NORM_DTYPES:
        probe = torch.ones(1, 2, device=x.device, dtype=x.dtype)
        _NORM_DTYPES[key] = F.rms_norm(probe, (2,), probe[0], 1e-6).dtype
    return _NORM_DTYPES[key]


def fused_gate(y: Tensor, m: Tensor, wy: Tensor, wm: Tensor, eps: float) -> Tensor:
    """:func:`gate_reference` in one launch each way (see :func:`fused_gate_applies`).  The output dtype is the
    reference's: the two norms' dtypes (autocast may widen them) promoted by the product."""
    out_dtype = torch.promote_types(_norm_dtype(y), _norm_dtype(m))
    try:
        return _FusedGate.apply(y, m, wy, wm, eps, out_dtype)
    except GateKernelError as e:  # a kernel that cannot be built here must not stop training
        GATE_FAILED.append(str(e))
        warnings.warn(f"fused memory gate failed ({GATE_FAILED[0]}); using the PyTorch gate from now on",
                      RuntimeWarning, stacklevel=2)
        return gate_reference(y, m, wy, wm, eps)


__all__ = ["fused_gate", "fused_gate_applies", "gate_reference"]
