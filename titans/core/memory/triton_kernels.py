"""Fused Triton kernels for the memory core of :mod:`titans.core.memory.fused_update`.

The chunks of a sequence are walked inside the kernel, so a layer's memory update is two launches
forward and two backward instead of ~60 small kernels per chunk.  Each direction runs in two passes
(``MODE`` 1 and 2; ``TITANS_TRITON_SPLIT=0`` selects the single-pass ``MODE`` 0 kernels):

1. one program per (batch, head) walks the chunks in order (backward: in reverse) and computes only
   what the recurrence needs (the weights and momentum, or their gradients); the per-token outputs are
   dead code there and removed by the compiler.  It stores each chunk's starting state (backward: the
   gradient of each chunk's end state).
2. one program per (batch, head, chunk) reads those and writes the chunk's outputs (y, or the gradients
   of q, k, v and of the gate coefficients), with N times the parallelism.

The equations are exactly those of :func:`~titans.core.memory.fused_update.chunk_forward` and
:func:`~titans.core.memory.fused_update.chunk_backward` (the readable reference they are tested against).

Precision: state and accumulation are float32; q / k / v may come in bf16 (autocast): the kernels load them as they
are and widen them in registers, they are saved for the backward as they came, their gradients returned in their
dtype, and y and the state come out in the state's dtype.  The operands of the matmuls are rounded to bf16 on the
GPU (tensor cores, and half the shared memory of TF32 operands: the depth-2 kernels do not fit in an H100's shared
memory otherwise).  Under ``TRITON_INTERPRET=1`` they stay float32 unless
``DOT_BF16`` says otherwise.

State: the forward's walking pass carries the fast weights and momentum in registers from chunk to chunk
(one load and one store per sequence; faster than a round trip through memory with barriers per chunk,
measured on an H100).  The backward's walking pass keeps the state gradient in its output buffers (hot in
L2) instead: carried in registers next to its activations it needed more than an H100's shared memory.
The forward stores each chunk's starting state for the backward, which recomputes the chunk's inner forward.  With
``TITANS_TRITON_SAVE_INNER=1`` (depth 2, the three-stage backward) the forward's walk also stores that inner forward
(z, u, dl, err at the start weights: what the update computes anyway, 1.75 KB a token and head in float32) and no
backward stage recomputes it (by default only the walk alone, whose read-out runs apart; see ``_save_inner``).
Read-only state tiles are held as bf16 operands (fewer register spills).

Walks over parts (depth 2): at batch 1 a walk has one program per head, 8 at MAC's shape on a GPU of 132 SMs.  By
default (``TITANS_TRITON_WALK_PARTS``, :func:`_walk_parts`) the forward's walk and the three-stage backward's (three
launches) run over 2 programs a head where that keeps a walk within 32 programs, each holding a block of the hidden
units and all-reducing one (C, D) tile a chunk with its partner through global memory
(``_memory_walk_parts_kernel`` / ``_memory_walk_bwd_parts_kernel``): on an H200 the two walks of a MAC segment took
0.436 instead of 0.616 ms and MAC 65536 x 1 trained at 253K instead of 231K tokens/s (benchmarks/RESULTS.md section
6, session 24).  A program waits for its partners' flags spinning on plain loads, each flag on a line of its own
(:func:`walk_sync_mode`: the backward walk 6-9% shorter than with acquire reads through shared memory, session 29).

Depth 2 (more than one chunk) takes a three-stage backward (``_memory_bwd3_kernel``: the dy share in
parallel, the state-gradient recurrence over the dWn share alone, the dWn share in parallel): on an H100
23.3 vs 23.6 ms forward + backward at 8x8x4096 and 169.7K vs 165.3K MAC training tokens/s against the
two-pass backward (benchmarks/RESULTS.md section 6), which depth 1 and single-chunk inputs use and
``TITANS_TRITON_BWD=fused`` selects for depth 2 too (A/B comparisons).  Where the walk keeps one program a head
(batch >= 3 at MAC's 8 heads) the three stages run by default in one launch (``_memory_bwd3_overlap_kernel``) whose
programs hand each chunk on to the next stage through flags, so the parallel stages fill the SMs the sequential walk
leaves idle (MAC 328.6K vs 321.4K training tokens/s on an H200 against three launches, benchmarks/RESULTS.md
section 6, session 17); where it runs over parts (small batches) they run as three launches, the walk's over its
parts (``TITANS_TRITON_BWD=auto``, :func:`_overlapped`; ``overlap`` or ``split`` force either).  The stages are
written for few live tiles (a chunk's activations and state tiles exceed the register file, and what does not fit
spills to local memory): results are stored as soon as they are known, stage 0 keeps five activation tiles in a global
scratch instead of registers, and stage 1's state gradient moves from slot to slot of the end-state buffers
instead of being overwritten in place (``benchmarks/kernel_resources.py`` reports each launch's spills).

With ``TITANS_TRITON_AUTOTUNE=1`` launches go through ``triton.autotune`` on the GPU (warps and pipeline stages per
shape and pass, in-place arguments restored between trials); by default they take the fixed warps of ``_num_warps``:
the tuner compiles every configuration of every kernel per shape, which on a fresh H200 took over a minute of the
first training step (one MAC 4096 x 8 harness row did not finish in 110 s, against 47 s with fixed warps), and
its gain is not measured yet (benchmarks/RESULTS.md section 6, session 14).

Both directions reach autograd and ``torch.compile`` as the custom ops ``titans::memory_core_forward`` /
``titans::memory_core_backward``, and the core split in a walk and a read-out as four more
(``titans::memory_walk_*`` / ``titans::memory_readout_*``; end of this module).

Supported (checked on an H100, see ``supports``): memory depth 1 (head dim 32-128) and depth 2 with SiLU
(head dim 64, hidden 64 or 128), chunk sizes 16-64, sequence length a multiple of the chunk size.
Other inputs go to the PyTorch paths (``fused``, then ``chunked``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from titans.core.memory.fused_update import (
    CORE_INPUTS,
    core_backward_torch,
    core_forward_torch,
    core_readout_backward_torch,
    core_readout_torch,
    stack_inner,
    stack_starts,
    unstack_starts,
)
from titans.utils.switches import SWITCHES, switch_on, switch_value

try:  # Triton is optional: CPU-only installs import this module and report it unavailable
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
    try:  # what Triton raises for a kernel it cannot compile or fit on this GPU (before running it)
        from triton.errors import TritonError as _CompileError
    except ImportError:  # older Triton
        from triton.compiler.errors import CompilationError as _CompileError
except Exception as e:  # noqa: BLE001
    triton = None
    tl = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``, used by the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def supports(q: Tensor, k: Tensor, v: Tensor, weights: Sequence[Tensor], chunk_size: int, activation: str,
             residual: bool) -> bool:
    """Whether the fused kernels handle these inputs (else the caller uses the PyTorch paths)."""
    if triton is None or not (q.is_cuda or interpreting()):
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    L = len(weights)
    if L not in (1, 2) or (L == 2 and activation != "silu"):
        return False
    T, D = q.shape[2], q.shape[3]
    if v.shape[3] != D or T % chunk_size or not (_pow2(chunk_size) and 16 <= chunk_size <= 64):
        return False
    E = weights[0].shape[3]
    if (D, E, L, chunk_size) in FAILED_SHAPES:
        return False
    # Shapes checked on an H100 (benchmarks/triton_shapes.py): depth 1 with head dim 32-128, depth 2 with
    # head dim 64 and hidden 64 or 128, chunks 16-64.  Larger ones exceed the 228 KB of shared memory per
    # block; depth 2 with head dim 32 faults (illegal address, not yet diagnosed), so it is excluded.
    if interpreting():  # the CPU interpreter has no shared-memory limit: any power-of-two size (tests)
        return _pow2(D) and _pow2(E) and D >= 16 and E >= 16 and (L == 1 and E == D or
                                                                  tuple(weights[-1].shape[2:]) == (E, D))
    if L == 1:
        return E == D and D in (32, 64, 128)
    return D == 64 and E in (64, 128) and tuple(weights[1].shape[2:]) == (E, D)


# (D, E, L, chunk) combinations whose kernels failed to compile on this machine (out of shared memory
# on a smaller GPU, say): later calls go to the PyTorch path directly
FAILED_SHAPES: set[tuple[int, int, int, int]] = set()

# tensor-core operand precision: None = bf16 operands on CUDA (float32 accumulation), exact float32 in
# the interpreter; tests set it to exercise the bf16 path on the CPU too
DOT_BF16: bool | None = None


def _dot_bf16(x: Tensor) -> int:
    """The kernels' ``DOT_BF16`` mode: 0 float32 operands, 1 bf16 operands, 2 bf16-rounded (interpreter)."""
    bf16 = x.is_cuda if DOT_BF16 is None else DOT_BF16
    return (2 if interpreting() else 1) if bf16 else 0


# Keep the chunk-start states in bf16 when the matmul operands are bf16 (False: always float32, for comparisons)
STARTS_BF16 = True


def _starts_dtype(dot_bf16: int) -> torch.dtype:
    """dtype of the saved chunk-start states.  Every kernel reads them through ``_operand``, which rounds them to
    bf16 when the operands are bf16, so storing them rounded changes no result and halves the largest tensors the
    memory keeps for its backward (the weights and momentum of every chunk start)."""
    return torch.bfloat16 if STARTS_BF16 and dot_bf16 else torch.float32


if triton is not None:

    @triton.jit
    def _silu(z):
        return z * tl.sigmoid(z)

    @triton.jit
    def _silu_grad(z):
        s = tl.sigmoid(z)
        return s * (1 + z * (1 - s))

    @triton.jit
    def _silu_grad2(z):
        s = tl.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))

    @triton.jit
    def _dot(a, b, BF16: tl.constexpr):
        # BF16 = 1: bf16 operands (half the shared memory and twice the tensor-core rate of TF32), float32
        # accumulation.  BF16 = 2: the same rounding of the operands with a float32 dot, for the
        # interpreter, whose bf16 dot is wrong (it multiplies the raw bits).  BF16 = 0: float32 operands.
        if BF16 == 1:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        elif BF16 == 2:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
        else:
            return tl.dot(a, b)

    @triton.jit
    def _operand(x, BF16: tl.constexpr):
        # A read-only state tile (weights or momentum at a chunk start): with bf16 matmul operands it is held
        # in bf16, half the registers (the backward holds eight state tiles next to the chunk's activations
        # and spilled them to local memory as float32).  Its elementwise uses (the gate gradients' sums)
        # then see the same bf16 rounding as the matmuls.
        if BF16 == 1:
            return x.to(tl.bfloat16)
        elif BF16 == 2:
            return x.to(tl.bfloat16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _load_operand(ptrs, BF16: tl.constexpr):
        # a read-only state tile loaded again where it is used (held from an earlier load, it spilled)
        return _operand(tl.load(ptrs), BF16)

    @triton.jit
    def _blk(ptr, R: tl.constexpr, Cn: tl.constexpr, stride: tl.constexpr):
        """Pointers to an (R, Cn) block of a row-major matrix with rows ``stride`` long, starting at ``ptr``."""
        r = tl.arange(0, R)
        c = tl.arange(0, Cn)
        return ptr + r[:, None] * stride + c[None, :]

    @triton.jit
    def _mat(ptr, R: tl.constexpr, Cn: tl.constexpr):
        """Pointers to a contiguous (R, Cn) matrix at ``ptr``."""
        return _blk(ptr, R, Cn, Cn)

    @triton.jit
    def _dy_chunk(DY, bh, c, DY_H, DY_SB, DY_SH, DY_ST, C: tl.constexpr, D: tl.constexpr):
        """Pointers to chunk c's (C, D) rows of program bh in dy (B, H, T, D), read through its strides (batch,
        head, token; the last is 1): the compiled backward hands dy over as a (B, T, H, D) view, whose copy to a
        dense buffer was one more kernel on the segment chain (benchmarks/RESULTS.md, session 34)."""
        b = bh // DY_H
        r = tl.arange(0, C)
        d = tl.arange(0, D)
        return DY + b * DY_SB + (bh - b * DY_H) * DY_SH + (c * C + r[:, None]) * DY_ST + d[None, :]

    @triton.jit
    def _load_chunk(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N: tl.constexpr, C: tl.constexpr,
                    D: tl.constexpr):
        """Chunk c of program bh: token offset, chunk index, q, k, v (C, D), the per-token coefficients
        G, B (C, 1), the chunk's M (C, C), last-row / momentum weights (C, 1) and G_C, B_C, P_C."""
        rc = tl.arange(0, C)
        T = N * C
        tok = bh * T * D + c * C * D
        cc = bh * N + c
        k, v, ml, mm, gl, bl, pl = _walk_chunk(K, V, ML, MM, GL, BL, PL, bh, c, N, C, D)
        return (tok, cc, tl.load(_mat(Q + tok, C, D)).to(tl.float32), k, v,
                tl.load(G + bh * T + c * C + rc)[:, None], tl.load(BC + bh * T + c * C + rc)[:, None],
                tl.load(_mat(M + cc * C * C, C, C)), ml, mm, gl, bl, pl)

    @triton.jit
    def _inner(a, b):
        """sum_ij a_ij b_ij in float32."""
        return tl.sum(tl.sum(a.to(tl.float32) * b.to(tl.float32), 1), 0)

    @triton.jit
    def _mlp_at_start(k, v, w1, w2, RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, zp, up, lp, ep,
                      STORE: tl.constexpr):
        """The chunk's inner forward at its start weights: z = k W1, h = silu(z), err = 2 (h W2 [+ k] - v),
        u = err W2^T, dl = u * silu'(z); with ``STORE`` each also stored (to zp, up, lp, ep) as soon as it exists,
        so a caller that does not use it again holds it no longer (fewer spills than storing after the return)."""
        z = _dot(k, w1, DOT_BF16)
        if STORE:
            tl.store(zp, z)
        h = _silu(z)
        ag = _silu_grad(z)
        p = _dot(h, w2, DOT_BF16)
        if RESIDUAL:
            p += k
        err = 2 * (p - v)
        if STORE:
            tl.store(ep, err)
        u = _dot(err, tl.trans(w2), DOT_BF16)
        if STORE:
            tl.store(up, u)
        dl = u * ag
        if STORE:
            tl.store(lp, dl)
        return z, h, ag, err, u, dl

    @triton.jit
    def _through_inner(ddl, derr, dh, z, ag, u, w2, DOT_BF16: tl.constexpr):
        """Back through dl = (err W2^T) * silu'(z) and err = 2 (h W2 [+ k] - v), h = silu(z), given the
        gradients reaching dl, err and h: returns du (of u = err W2^T), dp (of p = h W2 [+ k]) and dz."""
        du = ddl * ag
        derr += _dot(du, w2, DOT_BF16)
        dp = 2 * derr
        dh += _dot(dp, tl.trans(w2), DOT_BF16)
        dz = ddl * u * _silu_grad2(z) + dh * ag
        return du, dp, dz

    @triton.jit
    def _readout_bwd(dout, x, keys, xw, xs, w, s, g, b, xk, mmat, a, delta, DOT_BF16: tl.constexpr):
        """Backward of one layer's per-token read out = G (x W) + B (x S) + A delta, A = (x keys^T) * M, given
        xw = x W, xs = x S, xk = x keys^T (the Triton twin of ``fused_update._readout_backward``).  Returns the
        gradients of G, B, x, keys and delta, the shares of W's and S's gradients, and that of M."""
        dx = _dot(g * dout, tl.trans(w), DOT_BF16) + _dot(b * dout, tl.trans(s), DOT_BF16)
        xt = tl.trans(x)
        da = _dot(dout, tl.trans(delta), DOT_BF16)
        dxk = da * mmat
        return (tl.sum(dout * xw, 1), tl.sum(dout * xs, 1), dx + _dot(dxk, keys, DOT_BF16),
                _dot(tl.trans(dxk), x, DOT_BF16), _dot(tl.trans(a), dout, DOT_BF16), _dot(xt, g * dout, DOT_BF16),
                _dot(xt, b * dout, DOT_BF16), da * xk)

    @triton.jit
    def _layer_tiles(SW, SS, NW, NS, dwp, dsp, cc, R: tl.constexpr, Cn: tl.constexpr, MODE: tl.constexpr,
                     DOT_BF16: tl.constexpr):
        """One layer's tiles for chunk cc of the two-pass backward: its start weights and momentum (R, Cn) and
        the gradients of its end state (stored by MODE 1, read by MODE 2; the walk reads the running ones)."""
        w = _operand(tl.load(_mat(SW + cc * R * Cn, R, Cn)), DOT_BF16)
        s = _operand(tl.load(_mat(SS + cc * R * Cn, R, Cn)), DOT_BF16)
        if MODE == 2:
            dwn = tl.load(_mat(NW + cc * R * Cn, R, Cn))
            dsn = tl.load(_mat(NS + cc * R * Cn, R, Cn))
        else:
            dwn = tl.load(dwp)
            dsn = tl.load(dsp)
            if MODE == 1:
                tl.store(_mat(NW + cc * R * Cn, R, Cn), dwn)
                tl.store(_mat(NS + cc * R * Cn, R, Cn), dsn)
        return w, s, dwn, dsn

    @triton.jit
    def _state_ptrs(A1, B1, A2, B2, bh, D: tl.constexpr, E: tl.constexpr):
        """Program bh's slices of the four state (or state-gradient) buffers: layer 1 (D, E), layer 2 (E, D)."""
        return (_mat(A1 + bh * D * E, D, E), _mat(B1 + bh * D * E, D, E), _mat(A2 + bh * E * D, E, D),
                _mat(B2 + bh * E * D, E, D))

    @triton.jit
    def _memory_fwd_kernel(
        Q, K, V, G, BC, M, ML, MM, GL, BL, PL,
        IW1, IW2, IS1, IS2,  # the initial state (BH, ...), read
        W1, W2, S1, S2,  # the final state (BH, ...), written (not the initial state's buffers: no copy of them first)
        Y, SW1, SW2, SS1, SS2,  # output and the saved chunk-start states (BH, N, ...)
        ZS, US, LS, ES,  # with INNER (depth 2, walking modes; TITANS_TRITON_SAVE_INNER=1): each chunk's inner forward
        # z, u, dl (BH, N, C, E), err (BH, N, C, D), computed for the update anyway, stored for the backward
        # N (chunks) is a compile-time constant: one specialisation per sequence length, and the
        # interpreter (CPU tests) needs a Python int for the loop bound
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, L: tl.constexpr,
        RESIDUAL: tl.constexpr, SAVE: tl.constexpr, DOT_BF16: tl.constexpr, MODE: tl.constexpr,
        INNER: tl.constexpr = False,
    ):
        # MODE 0: one program per (b, h) walks all chunks and writes y and the state.
        # MODE 1: the same walk, state only (y's matmuls are dead code and removed), saving chunk starts.
        # MODE 2: one program per (b, h, chunk) reads its chunk's saved start state and writes y: the half
        #         of the work that does not feed the recurrence runs with N times the parallelism.
        bh = tl.program_id(0).to(tl.int64)
        w1p, s1p, w2p, s2p = _state_ptrs(W1, S1, W2, S2, bh, D, E)
        iw1p, is1p, iw2p, is2p = _state_ptrs(IW1, IS1, IW2, IS2, bh, D, E)
        # the walking modes carry the state in registers from chunk to chunk (one load before the walk, one
        # store after it): no round trip through memory and no block-wide barrier in the sequential chain
        # (MODE 2 leaves these loads unused and the compiler drops them; so does depth 1 for layer 2)
        cw1 = tl.load(iw1p)
        cs1 = tl.load(is1p)
        cw2 = tl.load(iw2p)
        cs2 = tl.load(is2p)
        for i in range(1 if MODE == 2 else N):
            if MODE == 2:
                c = tl.program_id(1).to(tl.int64)
            else:
                c = i
            tok, cc, q, k, v, g, b, mmat, ml, mm, gl, bl, pl = _load_chunk(
                Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N, C, D)
            if MODE == 2:
                w1 = _operand(tl.load(_mat(SW1 + cc * D * E, D, E)), DOT_BF16)
                s1 = _operand(tl.load(_mat(SS1 + cc * D * E, D, E)), DOT_BF16)
            else:
                w1 = cw1
                s1 = cs1
                if SAVE:  # in the buffers' dtype (bf16 with bf16 operands: what _operand makes of them)
                    tl.store(_mat(SW1 + cc * D * E, D, E), w1.to(SW1.dtype.element_ty))
                    tl.store(_mat(SS1 + cc * D * E, D, E), s1.to(SS1.dtype.element_ty))
            kt = tl.trans(k)
            a1 = _dot(q, kt, DOT_BF16) * mmat
            if L == 1:
                p = _dot(k, w1, DOT_BF16)
                if RESIDUAL:
                    p += k
                err = 2 * (p - v)
                y = g * _dot(q, w1, DOT_BF16) + b * _dot(q, s1, DOT_BF16) + _dot(a1, err, DOT_BF16)
                new_w1 = gl * w1 + bl * s1 + _dot(kt, ml * err, DOT_BF16)
                new_s1 = pl * s1 + _dot(kt, mm * err, DOT_BF16)
            else:
                if MODE == 2:
                    w2 = _operand(tl.load(_mat(SW2 + cc * E * D, E, D)), DOT_BF16)
                    s2 = _operand(tl.load(_mat(SS2 + cc * E * D, E, D)), DOT_BF16)
                else:
                    w2 = cw2
                    s2 = cs2
                    if SAVE:
                        tl.store(_mat(SW2 + cc * E * D, E, D), w2.to(SW2.dtype.element_ty))
                        tl.store(_mat(SS2 + cc * E * D, E, D), s2.to(SS2.dtype.element_ty))
                z, h, ag, err, u, dl = _mlp_at_start(k, v, w1, w2, RESIDUAL, DOT_BF16, _mat(ZS + cc * C * E, C, E),
                                                     _mat(US + cc * C * E, C, E), _mat(LS + cc * C * E, C, E),
                                                     _mat(ES + cc * C * D, C, D), INNER and MODE != 2)
                zq = g * _dot(q, w1, DOT_BF16) + b * _dot(q, s1, DOT_BF16) + _dot(a1, dl, DOT_BF16)
                hq = _silu(zq)
                ht = tl.trans(h)
                a2 = _dot(hq, ht, DOT_BF16) * mmat
                y = g * _dot(hq, w2, DOT_BF16) + b * _dot(hq, s2, DOT_BF16) + _dot(a2, err, DOT_BF16)
                new_w1 = gl * w1 + bl * s1 + _dot(kt, ml * dl, DOT_BF16)
                new_s1 = pl * s1 + _dot(kt, mm * dl, DOT_BF16)
                if MODE != 2:
                    cw2 = gl * w2 + bl * s2 + _dot(ht, ml * err, DOT_BF16)
                    cs2 = pl * s2 + _dot(ht, mm * err, DOT_BF16)
            if MODE != 1:
                if RESIDUAL:
                    y += q
                tl.store(_mat(Y + tok, C, D), y)
            if MODE != 2:
                cw1 = new_w1
                cs1 = new_s1
        if MODE != 2:
            tl.store(w1p, cw1)
            tl.store(s1p, cs1)
            if L == 2:
                tl.store(w2p, cw2)
                tl.store(s2p, cs2)

    @triton.jit
    def _memory_bwd_kernel(
        Q, K, V, G, BC, M, ML, MM, GL, BL, PL,
        SW1, SW2, SS1, SS2,  # chunk-start states from the forward (BH, N, ...)
        DY,
        IDW1, IDW2, IDS1, IDS2,  # the final state's gradient (BH, ...), read
        DW1, DW2, DS1, DS2,  # running state gradients (BH, ...): the final state's copied in, the initial one's out
        NW1, NW2, NS1, NS2,  # MODE 1 writes, MODE 2 reads: the gradient of each chunk's end state (BH, N, ...)
        DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL,
        DY_H, DY_SB, DY_SH, DY_ST,  # dy's heads and strides (batch, head, token): see _dy_chunk
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, L: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, MODE: tl.constexpr,
    ):
        # MODE 0: one program per (b, h) walks the chunks backwards, writing every gradient.
        # MODE 1: the same walk for the state-gradient recurrence only (the per-token outputs are dead code
        #         and removed), storing each chunk's incoming state gradient.
        # MODE 2: one program per (b, h, chunk) writes that chunk's input gradients from the stored ones.
        bh = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, C)
        T = N * C
        dw1p, ds1p, dw2p, ds2p = _state_ptrs(DW1, DS1, DW2, DS2, bh, D, E)
        if MODE != 2:  # the walk runs in place on DW / DS: the incoming gradient copied in first (in-kernel)
            idw1p, ids1p, idw2p, ids2p = _state_ptrs(IDW1, IDS1, IDW2, IDS2, bh, D, E)
            tl.store(dw1p, tl.load(idw1p))
            tl.store(ds1p, tl.load(ids1p))
            if L == 2:
                tl.store(dw2p, tl.load(idw2p))
                tl.store(ds2p, tl.load(ids2p))
            tl.debug_barrier()  # the first chunk's loads read what other threads stored
        for i in range(1 if MODE == 2 else N):
            if MODE == 2:
                c = tl.program_id(1).to(tl.int64)
            else:
                c = N - 1 - i
            tok, cc, q, k, v, g, b, mmat, ml, mm, gl, bl, pl = _load_chunk(
                Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N, C, D)
            dy = tl.load(_dy_chunk(DY, bh, c, DY_H, DY_SB, DY_SH, DY_ST, C, D)).to(tl.float32)
            w1, s1, dw1n, ds1n = _layer_tiles(SW1, SS1, NW1, NS1, dw1p, ds1p, cc, D, E, MODE, DOT_BF16)
            kt = tl.trans(k)
            qk = _dot(q, kt, DOT_BF16)
            a1 = qk * mmat
            qw1 = _dot(q, w1, DOT_BF16)
            qs1 = _dot(q, s1, DOT_BF16)
            dgl = _inner(w1, dw1n)
            dbl = _inner(s1, dw1n)
            dpl = _inner(s1, ds1n)
            kdw = _dot(k, dw1n, DOT_BF16)
            kds = _dot(k, ds1n, DOT_BF16)
            if L == 1:
                p = _dot(k, w1, DOT_BF16)
                if RESIDUAL:
                    p += k
                err = 2 * (p - v)
                derr = ml * kdw + mm * kds
                dml = tl.sum(err * kdw, 1)
                dmm = tl.sum(err * kds, 1)
                dk = _dot(ml * err, tl.trans(dw1n), DOT_BF16) + _dot(mm * err, tl.trans(ds1n), DOT_BF16)
                # y = G (q W1) + B (q S1) + A1 err
                dg, dbc, dq, dkr, derr_y, dw1r, ds1r, dmat = _readout_bwd(
                    dy, q, k, qw1, qs1, w1, s1, g, b, qk, mmat, a1, err, DOT_BF16)
                new_dw1 = gl * dw1n + dw1r
                new_ds1 = bl * dw1n + pl * ds1n + ds1r
                derr += derr_y
                dk += dkr
                dp = 2 * derr
                dk += _dot(dp, tl.trans(w1), DOT_BF16)
                if RESIDUAL:
                    dk += dp
                new_dw1 += _dot(kt, dp, DOT_BF16)
            else:
                w2, s2, dw2n, ds2n = _layer_tiles(SW2, SS2, NW2, NS2, dw2p, ds2p, cc, E, D, MODE, DOT_BF16)
                dgl += _inner(w2, dw2n)
                dbl += _inner(s2, dw2n)
                dpl += _inner(s2, ds2n)
                # recompute the chunk's forward
                z, h, ag, err, u, dl = _mlp_at_start(k, v, w1, w2, RESIDUAL, DOT_BF16, Q, Q, Q, Q, False)
                zq = g * qw1 + b * qs1 + _dot(a1, dl, DOT_BF16)
                hq = _silu(zq)
                ht = tl.trans(h)
                hh = _dot(hq, ht, DOT_BF16)
                # the state after the chunk
                hdw = _dot(h, dw2n, DOT_BF16)
                hds = _dot(h, ds2n, DOT_BF16)
                ddl = ml * kdw + mm * kds
                derr = ml * hdw + mm * hds
                dml = tl.sum(dl * kdw, 1) + tl.sum(err * hdw, 1)
                dmm = tl.sum(dl * kds, 1) + tl.sum(err * hds, 1)
                dk = _dot(ml * dl, tl.trans(dw1n), DOT_BF16) + _dot(mm * dl, tl.trans(ds1n), DOT_BF16)
                dh = _dot(ml * err, tl.trans(dw2n), DOT_BF16) + _dot(mm * err, tl.trans(ds2n), DOT_BF16)
                # y = G (hq W2) + B (hq S2) + A2 err
                dg, dbc, dhq, dhr, derr_y, dw2r, ds2r, dmat = _readout_bwd(
                    dy, hq, h, _dot(hq, w2, DOT_BF16), _dot(hq, s2, DOT_BF16), w2, s2, g, b, hh, mmat, hh * mmat,
                    err, DOT_BF16)
                new_dw2 = gl * dw2n + dw2r
                new_ds2 = bl * dw2n + pl * ds2n + ds2r
                derr += derr_y
                dh += dhr
                # zq = G (q W1) + B (q S1) + A1 dl
                dzq = dhq * _silu_grad(zq)
                dg1, dbc1, dq, dkr, ddl_y, dw1r, ds1r, dmat1 = _readout_bwd(
                    dzq, q, k, qw1, qs1, w1, s1, g, b, qk, mmat, a1, dl, DOT_BF16)
                dg += dg1
                dbc += dbc1
                dmat += dmat1
                new_dw1 = gl * dw1n + dw1r
                new_ds1 = bl * dw1n + pl * ds1n + ds1r
                ddl += ddl_y
                dk += dkr
                # dl = (err W2^T) * silu'(z), err = 2 (h W2 [+ k] - v), h = silu(z), z = k W1
                du, dp, dz = _through_inner(ddl, derr, dh, z, ag, u, w2, DOT_BF16)
                new_dw2 += _dot(tl.trans(du), err, DOT_BF16)
                new_dw2 += _dot(ht, dp, DOT_BF16)
                if RESIDUAL:
                    dk += dp
                dk += _dot(dz, tl.trans(w1), DOT_BF16)
                new_dw1 += _dot(kt, dz, DOT_BF16)
                if MODE != 2:
                    tl.debug_barrier()
                    tl.store(dw2p, new_dw2)
                    tl.store(ds2p, new_ds2)
            if MODE != 1:
                if RESIDUAL:
                    dq += dy
                tl.store(_mat(DQ + tok, C, D), dq)
                tl.store(_mat(DK + tok, C, D), dk)
                tl.store(_mat(DV + tok, C, D), -dp)
                tl.store(DG + bh * T + c * C + rc, dg)
                tl.store(DBC + bh * T + c * C + rc, dbc)
                tl.store(_mat(DM + cc * C * C, C, C), dmat)
                tl.store(DML + cc * C + rc, dml)
                tl.store(DMM + cc * C + rc, dmm)
                tl.store(DGL + cc, dgl)
                tl.store(DBL + cc, dbl)
                tl.store(DPL + cc, dpl)
            if MODE != 2:
                tl.debug_barrier()
                tl.store(dw1p, new_dw1)
                tl.store(ds1p, new_ds1)
                tl.debug_barrier()

    # ------------------------------------------------------------------ three-stage backward (depth 2)
    # Every gradient of a chunk is linear in (dy, dWn), the output gradient and the gradient of the chunk's
    # end state.  So the backward splits into a part driven by dy alone (stage 0, parallel over chunks: all
    # of dq, dg, dB, dM, the dy share of dk and dv, and X_c, the dy share of the chunk's state-gradient
    # update), a sequential recurrence over the dWn share only (stage 1: dW_c = A_c(dW_{c+1}) + X_c, about a
    # third of the matmuls of the fused walk and no dy-side activations held) and the dWn share of the
    # per-token gradients (stage 2, parallel).  Depth 2's backward by default (TITANS_TRITON_BWD=fused: the two-pass
    # backward instead).

    @triton.jit
    def _wait(flag):
        """Spin until another program has released ``flag`` (:func:`_await` of 1: one thread polls with acquire
        semantics; the block barrier after it orders every thread's later loads behind what the releasing program
        stored)."""
        _await(flag, 1)

    @triton.jit
    def _release(flag):
        """Publish everything this program stored so far to programs that :func:`_wait` on ``flag``."""
        _publish(flag, 1)

    @triton.jit
    def _store_dk_dv(DK, DV, tok, dk, dp, C: tl.constexpr, D: tl.constexpr, ACCUMULATE: tl.constexpr):
        """A stage's dk / dv share (dv = -dp): added to what is there (``ACCUMULATE``: stage 2 after stage 0) or
        stored."""
        dkp = _mat(DK + tok, C, D)
        dvp = _mat(DV + tok, C, D)
        if ACCUMULATE:
            tl.store(dkp, tl.load(dkp) + dk)
            tl.store(dvp, tl.load(dvp) - dp)
        else:
            tl.store(dkp, dk)
            tl.store(dvp, -dp)

    @triton.jit
    def _bwd3_stage(
        Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2, DW1, DW2, DS1, DS2,
        NW1, NW2, NS1, NS2,
        X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES, DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL,
        DY_H, DY_SB, DY_SH, DY_ST, bh, c0, F0, F1,
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, STAGE: tl.constexpr, SYNC: tl.constexpr,
        RECOMPUTE: tl.constexpr, ACCUMULATE: tl.constexpr, INNER: tl.constexpr,
    ):
        """One stage's work for program ``bh``: chunk ``c0`` (stages 0 and 2) or the walk over all chunks
        (stage 1).  With ``SYNC`` (one launch for all three stages, ``_memory_bwd3_overlap_kernel``) the stages
        hand each chunk on through flags (BH, N): stage 0 releases ``F0[bh, c]`` when chunk c's dy share is
        stored; the walk waits on it before chunk c and releases ``F1[bh, c]`` once the gradient of chunk c's end
        state is complete; stage 2's chunk c waits on both.  ``RECOMPUTE`` (the core split in two, stage 0 run by
        another op): stages 1 and 2 compute the chunk's inner forward and store it to the scratch themselves;
        ``ACCUMULATE``: stage 2 adds its dk / dv share to stage 0's (else it stores its own alone).  ``INNER``: the
        forward's walk stored each chunk's inner forward (z, u, dl, err) in the scratch: no stage computes it."""
        rc = tl.arange(0, C)
        T = N * C
        if STAGE == 1:  # the final state's gradient is the last chunk's end-state gradient (see the walk below)
            last = bh * N + N - 1
            _walk_bwd_seed(IDW1, IDW2, IDS1, IDS2, NW1, NW2, NS1, NS2, bh, 0, 0, N, D, E, E)
            if SYNC:
                _release(F1 + last)
            else:
                tl.debug_barrier()
        for i in range(N if STAGE == 1 else 1):
            if STAGE == 1:
                c = N - 1 - i
                if SYNC:
                    _wait(F0 + bh * N + c)
            else:
                c = c0
                if SYNC and STAGE == 2:
                    # the walk releases chunk c's end-state gradient before it needs (and waits on) chunk c's stage 0
                    # (right at its start for the last chunk), and this stage reads stage 0's scratch and adds to its
                    # dk / dv: both flags, not the walk's alone
                    _wait(F0 + bh * N + c)
                    _wait(F1 + bh * N + c)
            tok, cc, q, k, v, g, b, mmat, ml, mm, gl, bl, pl = _load_chunk(
                Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N, C, D)
            w1 = _operand(tl.load(_mat(SW1 + cc * D * E, D, E)), DOT_BF16)
            w2 = _operand(tl.load(_mat(SW2 + cc * E * D, E, D)), DOT_BF16)
            kt = tl.trans(k)
            zsp = _mat(ZS + cc * C * E, C, E)
            usp = _mat(US + cc * C * E, C, E)
            lsp = _mat(LS + cc * C * E, C, E)
            esp = _mat(ES + cc * C * D, C, D)
            if not INNER and (STAGE == 0 or RECOMPUTE):
                z, h, ag, err, u, dl = _mlp_at_start(k, v, w1, w2, RESIDUAL, DOT_BF16, zsp, usp, lsp, esp, True)
                if STAGE != 0:
                    tl.debug_barrier()  # read back below, also by other threads
            else:  # the chunk's inner forward as stage 0 or the forward stored it (the values recomputing gives)
                z = tl.load(zsp)
                err = tl.load(esp)
                h = _silu(z)
                if STAGE == 0:
                    dl = tl.load(lsp)
            ht = tl.trans(h)
            if STAGE == 0:
                # Ordered so that few tiles are live at once (held across both read-outs they spilled to local
                # memory, ~5 KB a thread): each state share is stored as soon as it exists (x1 / x2 completed by
                # a load-add), z, u, dl, err, dh and silu'(zq) go to a scratch and are read back where needed, and
                # q W1 / q S1 / S1 / S2 are computed or loaded again instead of held.  Everything read back was
                # stored by other threads too: each read follows a block barrier.
                s1p = _mat(SS1 + cc * D * E, D, E)
                s2p = _mat(SS2 + cc * E * D, E, D)
                # the query side of the chunk: zq = G (q W1) + B (q S1) + A1 dl, y = G (hq W2) + B (hq S2) + A2 err
                qk = _dot(q, kt, DOT_BF16)
                a1 = qk * mmat
                zq = g * _dot(q, w1, DOT_BF16) + b * _dot(q, _load_operand(s1p, DOT_BF16), DOT_BF16)
                zq += _dot(a1, dl, DOT_BF16)
                hq = _silu(zq)
                sqp = _mat(QS + cc * C * E, C, E)
                tl.store(sqp, _silu_grad(zq))
                hh = _dot(hq, ht, DOT_BF16)
                dy = tl.load(_dy_chunk(DY, bh, c, DY_H, DY_SB, DY_SH, DY_ST, C, D)).to(tl.float32)
                # back through y (the steps of _readout_bwd, each share stored when done)
                x2p = _mat(X2 + cc * E * D, E, D)
                hqt = tl.trans(hq)
                tl.store(_mat(XS2 + cc * E * D, E, D), _dot(hqt, b * dy, DOT_BF16))
                tl.store(x2p, _dot(hqt, g * dy, DOT_BF16))
                dg = tl.sum(dy * _dot(hq, w2, DOT_BF16), 1)
                dbc = tl.sum(dy * _dot(hq, _load_operand(s2p, DOT_BF16), DOT_BF16), 1)
                da2 = _dot(dy, tl.trans(err), DOT_BF16)
                dxk2 = da2 * mmat
                dmp = _mat(DM + cc * C * C, C, C)
                tl.store(dmp, da2 * hh)
                derr = _dot(tl.trans(hh * mmat), dy, DOT_BF16)
                dhsp = _mat(HS + cc * C * E, C, E)
                tl.store(dhsp, _dot(tl.trans(dxk2), hq, DOT_BF16))
                tl.debug_barrier()  # silu'(zq), dh, dM and x2's share, stored above, from every thread
                dhq = _dot(g * dy, tl.trans(w2), DOT_BF16) + _dot(dxk2, h, DOT_BF16)
                dzq = (dhq + _dot(b * dy, tl.trans(_load_operand(s2p, DOT_BF16)), DOT_BF16)) * tl.load(sqp)
                # back through zq
                x1p = _mat(X1 + cc * D * E, D, E)
                qt = tl.trans(q)
                tl.store(_mat(XS1 + cc * D * E, D, E), _dot(qt, b * dzq, DOT_BF16))
                tl.store(x1p, _dot(qt, g * dzq, DOT_BF16))
                dg += tl.sum(dzq * _dot(q, w1, DOT_BF16), 1)
                dbc += tl.sum(dzq * _dot(q, _load_operand(s1p, DOT_BF16), DOT_BF16), 1)
                tl.store(DG + bh * T + c * C + rc, dg)
                tl.store(DBC + bh * T + c * C + rc, dbc)
                # the rest reads back from the scratch what the read-outs would have spilled
                tl.debug_barrier()  # x1's share, stored above, from every thread (the load-add below)
                dl = tl.load(lsp)
                da1 = _dot(dzq, tl.trans(dl), DOT_BF16)
                tl.store(dmp, tl.load(dmp) + da1 * qk)
                dxk1 = da1 * mmat
                dq = _dot(g * dzq, tl.trans(w1), DOT_BF16) + _dot(b * dzq, tl.trans(_load_operand(s1p, DOT_BF16)),
                                                                 DOT_BF16)
                dq += _dot(dxk1, k, DOT_BF16)
                if RESIDUAL:
                    dq += dy
                tl.store(_mat(DQ + tok, C, D), dq)
                dk = _dot(tl.trans(dxk1), q, DOT_BF16)
                ddl = _dot(tl.trans(a1), dzq, DOT_BF16)
                z = tl.load(zsp)
                ag = _silu_grad(z)
                du, dp, dz = _through_inner(ddl, derr, tl.load(dhsp), z, ag, tl.load(usp), w2, DOT_BF16)
                tl.store(x2p, tl.load(x2p) + _dot(tl.trans(du), tl.load(esp), DOT_BF16)
                         + _dot(tl.trans(_silu(z)), dp, DOT_BF16))
                tl.store(x1p, tl.load(x1p) + _dot(kt, dz, DOT_BF16))
                dk += _dot(dz, tl.trans(w1), DOT_BF16)
                if RESIDUAL:
                    dk += dp
                _store_dk_dv(DK, DV, tok, dk, dp, C, D, False)  # the dy share; stage 2 adds the dWn share
                if SYNC:
                    _release(F0 + cc)
            else:
                if STAGE == 1:
                    # The state gradient walks through NW / NS: chunk c reads its end-state gradient from slot c
                    # and writes its start-state gradient (chunk c - 1's end) to slot c - 1 (chunk 0: to DW / DS,
                    # the op's output), so each part of the update is stored as soon as it is known, with no
                    # overwrite in place: the float32 tiles die at once, the walk holds bf16 operand copies.
                    tw1, tw2, dw1n, ds1n, dw2n, ds2n = _walk_bwd_open(NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, DW1, DW2,
                                                                      DS1, DS2, bh, cc, c, 0, 0, gl, bl, pl, D, E, E,
                                                                      DOT_BF16)
                else:
                    dw1n = _operand(tl.load(_mat(NW1 + cc * D * E, D, E)), DOT_BF16)
                    ds1n = _operand(tl.load(_mat(NS1 + cc * D * E, D, E)), DOT_BF16)
                    dw2n = _operand(tl.load(_mat(NW2 + cc * E * D, E, D)), DOT_BF16)
                    ds2n = _operand(tl.load(_mat(NS2 + cc * E * D, E, D)), DOT_BF16)
                    # the per-chunk sums first (each product's tiles die early; products and sums in float32)
                    s1 = _operand(tl.load(_mat(SS1 + cc * D * E, D, E)), DOT_BF16)
                    s2 = _operand(tl.load(_mat(SS2 + cc * E * D, E, D)), DOT_BF16)
                    tl.store(DGL + cc, _inner(w1, dw1n) + _inner(w2, dw2n))
                    tl.store(DBL + cc, _inner(s1, dw1n) + _inner(s2, dw2n))
                    tl.store(DPL + cc, _inner(s1, ds1n) + _inner(s2, ds2n))
                # the dWn share: W1' = ... + k^T (Ml dl), S1' = ... + k^T (m dl), W2' = ... + h^T (Ml err), ...
                kdw = _dot(k, dw1n, DOT_BF16)
                kds = _dot(k, ds1n, DOT_BF16)
                hdw = _dot(h, dw2n, DOT_BF16)
                hds = _dot(h, ds2n, DOT_BF16)
                ddl = ml * kdw + mm * kds
                if STAGE == 2:  # dl read at each use: loaded once and held to dk below, stage 2 spilled 10% more
                    tl.store(DML + cc * C + rc, tl.sum(tl.load(lsp) * kdw, 1) + tl.sum(err * hdw, 1))
                    tl.store(DMM + cc * C + rc, tl.sum(tl.load(lsp) * kds, 1) + tl.sum(err * hds, 1))
                dh = _dot(ml * err, tl.trans(dw2n), DOT_BF16) + _dot(mm * err, tl.trans(ds2n), DOT_BF16)
                du, dp, dz = _through_inner(ddl, ml * hdw + mm * hds, dh, z, _silu_grad(z), tl.load(usp), w2, DOT_BF16)
                if STAGE == 1:
                    tl.debug_barrier()  # the parts stored above by other threads are complete
                    tl.store(tw1, tl.load(tw1) + _dot(kt, dz, DOT_BF16))
                    tl.store(tw2, tl.load(tw2) + _dot(tl.trans(du), err, DOT_BF16) + _dot(ht, dp, DOT_BF16))
                    if SYNC:  # slot c - 1 is complete: chunk c - 1's stage 2 may start (and the walk reads it)
                        if c > 0:
                            _release(F1 + cc - 1)
                        else:
                            tl.debug_barrier()
                    else:
                        tl.debug_barrier()  # the next chunk reads what other threads wrote
                else:
                    dl = tl.load(lsp)
                    dk = _dot(ml * dl, tl.trans(dw1n), DOT_BF16) + _dot(mm * dl, tl.trans(ds1n), DOT_BF16)
                    dk += _dot(dz, tl.trans(w1), DOT_BF16)
                    if RESIDUAL:
                        dk += dp
                    _store_dk_dv(DK, DV, tok, dk, dp, C, D, ACCUMULATE)

    @triton.jit
    def _stage2_block_tiles(ZS, SW1, SW2, NW1, NW2, NS1, NS2, cc, e, C: tl.constexpr, D: tl.constexpr,
                            E: tl.constexpr, EB: tl.constexpr, DOT_BF16: tl.constexpr):
        """Hidden units e to e + EB of chunk cc: z (C, EB) from the scratch, and the W1 / dW1n / dS1n columns (D, EB)
        and W2 / dW2n / dS2n rows (EB, D) of its start weights and end-state gradient as matmul operands."""
        c0 = cc * D * E + e  # the columns' first offset in a (D, E) matrix
        r0 = cc * E * D + e * D  # the rows' in an (E, D) one
        return (tl.load(_blk(ZS + cc * C * E + e, C, EB, E)), _load_operand(_blk(SW1 + c0, D, EB, E), DOT_BF16),
                _load_operand(_mat(SW2 + r0, EB, D), DOT_BF16), _load_operand(_blk(NW1 + c0, D, EB, E), DOT_BF16),
                _load_operand(_blk(NS1 + c0, D, EB, E), DOT_BF16), _load_operand(_mat(NW2 + r0, EB, D), DOT_BF16),
                _load_operand(_mat(NS2 + r0, EB, D), DOT_BF16))

    @triton.jit
    def _bwd3_stage2_blocked(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, NW1, NW2, NS1, NS2,
                             ZS, US, LS, ES, DK, DV, DML, DMM, DGL, DBL, DPL, bh, c,
                             N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
                             RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, ACCUMULATE: tl.constexpr):
        """Stage 2 (the dWn share of chunk ``c``) over the hidden units ``EB`` at a time, reading the chunk's inner
        forward from the scratch: the same sums as :func:`_bwd3_stage`'s stage 2, with (C, EB) tiles live instead
        of (C, E) ones.  Why: a stage-2 program holds a whole SM (8 warps at 255 registers) and spills ~2 KB a
        thread of its (C, E) tiles to local memory (benchmarks/kernel_resources.py), while the 65536 x 1 step is
        bound by the SM time its kernels hold (benchmarks/RESULTS.md section 6, session 43).  Two passes over the
        blocks, because the err gradient (C, D) sums over every hidden unit before dh and dz can be formed:
        1. the blocks' shares of h dWn, h dSn, (dl Ml-weighted) W2 and the dMl / dm / gate sums;
        2. dh, dz and their share of dk, with k dW1n / k dS1n computed again (cheaper than keeping them)."""
        rc = tl.arange(0, C)
        tok, cc, q, k, v, g, b, mmat, ml, mm, gl, bl, pl = _load_chunk(
            Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N, C, D)
        err = tl.load(_mat(ES + cc * C * D, C, D))
        hdw = tl.zeros((C, D), tl.float32)
        hds = tl.zeros((C, D), tl.float32)
        derr = tl.zeros((C, D), tl.float32)
        dml = tl.zeros((C,), tl.float32)
        dmm = tl.zeros((C,), tl.float32)
        dgl = tl.sum(tl.zeros((C,), tl.float32), 0)
        dbl = dgl
        dpl = dgl
        for e in range(0, E, EB):  # a loop, not unrolled: one block's code
            z, w1, w2, dw1n, ds1n, dw2n, ds2n = _stage2_block_tiles(ZS, SW1, SW2, NW1, NW2, NS1, NS2, cc, e,
                                                                     C, D, E, EB, DOT_BF16)
            s1 = _load_operand(_blk(SS1 + cc * D * E + e, D, EB, E), DOT_BF16)
            s2 = _load_operand(_mat(SS2 + cc * E * D + e * D, EB, D), DOT_BF16)
            dgl += _inner(w1, dw1n) + _inner(w2, dw2n)
            dbl += _inner(s1, dw1n) + _inner(s2, dw2n)
            dpl += _inner(s1, ds1n) + _inner(s2, ds2n)
            h = _silu(z)
            hdw += _dot(h, dw2n, DOT_BF16)
            hds += _dot(h, ds2n, DOT_BF16)
            kdw = _dot(k, dw1n, DOT_BF16)
            kds = _dot(k, ds1n, DOT_BF16)
            dl = tl.load(_blk(LS + cc * C * E + e, C, EB, E))
            dml += tl.sum(dl * kdw, 1)
            dmm += tl.sum(dl * kds, 1)
            derr += _dot((ml * kdw + mm * kds) * _silu_grad(z), w2, DOT_BF16)  # du's share of err's gradient
        tl.store(DGL + cc, dgl)
        tl.store(DBL + cc, dbl)
        tl.store(DPL + cc, dpl)
        tl.store(DML + cc * C + rc, dml + tl.sum(err * hdw, 1))
        tl.store(DMM + cc * C + rc, dmm + tl.sum(err * hds, 1))
        dp = 2 * (derr + ml * hdw + mm * hds)
        dk = tl.zeros((C, D), tl.float32)
        for e in range(0, E, EB):
            z, w1, w2, dw1n, ds1n, dw2n, ds2n = _stage2_block_tiles(ZS, SW1, SW2, NW1, NW2, NS1, NS2, cc, e,
                                                                     C, D, E, EB, DOT_BF16)
            ddl = ml * _dot(k, dw1n, DOT_BF16) + mm * _dot(k, ds1n, DOT_BF16)
            dh = (_dot(ml * err, tl.trans(dw2n), DOT_BF16) + _dot(mm * err, tl.trans(ds2n), DOT_BF16)
                  + _dot(dp, tl.trans(w2), DOT_BF16))
            dz = ddl * tl.load(_blk(US + cc * C * E + e, C, EB, E)) * _silu_grad2(z) + dh * _silu_grad(z)
            dl = tl.load(_blk(LS + cc * C * E + e, C, EB, E))
            dk += (_dot(ml * dl, tl.trans(dw1n), DOT_BF16) + _dot(mm * dl, tl.trans(ds1n), DOT_BF16)
                   + _dot(dz, tl.trans(w1), DOT_BF16))
        if RESIDUAL:
            dk += dp
        _store_dk_dv(DK, DV, tok, dk, dp, C, D, ACCUMULATE)

    @triton.jit
    def _bwd3_stage0_blocked(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY,
                             X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES, DQ, DK, DV, DG, DBC, DM,
                             DY_H, DY_SB, DY_SH, DY_ST, bh, c,
                             N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
                             RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, INNER: tl.constexpr):
        """Stage 0 (the dy share of chunk ``c``) over the hidden units ``EB`` at a time: the same sums as
        :func:`_bwd3_stage`'s stage 0 with (C, EB) tiles live instead of (C, E) ones (why: see
        :func:`_bwd3_stage2_blocked`; stage 0 spilled ~3 KB a thread).  Passes over the blocks:
        0. (unless ``INNER``: the forward stored it) the chunk's inner forward: z and h W2, then err, then u and dl;
        1. the query side (zq, hq), y's gradient back through it (dzq), their shares of the state gradient (x1,
           x2), of dq, dM, dG, dBc, and the sums over hidden units (hh = hq h^T, da1, du's share of err's gradient),
           each block's dl gradient kept in the scratch that holds silu'(zq) in the unblocked stage;
        2. with err's gradient complete: dh, dz and their shares of x1, x2 and dk."""
        rc = tl.arange(0, C)
        T = N * C
        tok, cc, q, k, v, g, b, mmat, ml, mm, gl, bl, pl = _load_chunk(
            Q, K, V, G, BC, M, ML, MM, GL, BL, PL, bh, c, N, C, D)
        zb = ZS + cc * C * E
        ub = US + cc * C * E
        lb = LS + cc * C * E
        hb = HS + cc * C * E
        qb = QS + cc * C * E
        w1b = SW1 + cc * D * E
        s1b = SS1 + cc * D * E
        w2b = SW2 + cc * E * D
        s2b = SS2 + cc * E * D
        x1b = X1 + cc * D * E
        x2b = X2 + cc * E * D
        esp = _mat(ES + cc * C * D, C, D)
        if INNER:
            err = tl.load(esp)
        else:
            p = tl.zeros((C, D), tl.float32)
            for e in range(0, E, EB):
                z = _dot(k, _load_operand(_blk(w1b + e, D, EB, E), DOT_BF16), DOT_BF16)
                tl.store(_blk(zb + e, C, EB, E), z)
                p += _dot(_silu(z), _load_operand(_mat(w2b + e * D, EB, D), DOT_BF16), DOT_BF16)
            if RESIDUAL:
                p += k
            err = 2 * (p - v)
            tl.store(esp, err)
            tl.debug_barrier()  # z, stored above by other threads, read back below
            for e in range(0, E, EB):
                u = _dot(err, tl.trans(_load_operand(_mat(w2b + e * D, EB, D), DOT_BF16)), DOT_BF16)
                tl.store(_blk(ub + e, C, EB, E), u)
                tl.store(_blk(lb + e, C, EB, E), u * _silu_grad(tl.load(_blk(zb + e, C, EB, E))))
            tl.debug_barrier()  # u and dl, stored above by other threads, read back below
        dy = tl.load(_dy_chunk(DY, bh, c, DY_H, DY_SB, DY_SH, DY_ST, C, D)).to(tl.float32)
        a1 = _dot(q, tl.trans(k), DOT_BF16) * mmat
        da2 = _dot(dy, tl.trans(err), DOT_BF16)
        dxk2 = da2 * mmat
        hh = tl.zeros((C, C), tl.float32)
        da1 = tl.zeros((C, C), tl.float32)
        dq = tl.zeros((C, D), tl.float32)
        derr = tl.zeros((C, D), tl.float32)
        dg = tl.zeros((C,), tl.float32)
        dbc = tl.zeros((C,), tl.float32)
        qt = tl.trans(q)
        for e in range(0, E, EB):
            w1 = _load_operand(_blk(w1b + e, D, EB, E), DOT_BF16)
            s1 = _load_operand(_blk(s1b + e, D, EB, E), DOT_BF16)
            w2 = _load_operand(_mat(w2b + e * D, EB, D), DOT_BF16)
            s2 = _load_operand(_mat(s2b + e * D, EB, D), DOT_BF16)
            z = tl.load(_blk(zb + e, C, EB, E))
            h = _silu(z)
            dl = tl.load(_blk(lb + e, C, EB, E))
            qw1 = _dot(q, w1, DOT_BF16)
            qs1 = _dot(q, s1, DOT_BF16)
            zq = g * qw1 + b * qs1 + _dot(a1, dl, DOT_BF16)
            hq = _silu(zq)
            hh += _dot(hq, tl.trans(h), DOT_BF16)
            hqt = tl.trans(hq)
            tl.store(_mat(XS2 + cc * E * D + e * D, EB, D), _dot(hqt, b * dy, DOT_BF16))
            tl.store(_mat(x2b + e * D, EB, D), _dot(hqt, g * dy, DOT_BF16))
            dg += tl.sum(dy * _dot(hq, w2, DOT_BF16), 1)
            dbc += tl.sum(dy * _dot(hq, s2, DOT_BF16), 1)
            tl.store(_blk(hb + e, C, EB, E), _dot(tl.trans(dxk2), hq, DOT_BF16))
            dzq = (_dot(g * dy, tl.trans(w2), DOT_BF16) + _dot(dxk2, h, DOT_BF16)
                   + _dot(b * dy, tl.trans(s2), DOT_BF16)) * _silu_grad(zq)
            tl.store(_blk(XS1 + cc * D * E + e, D, EB, E), _dot(qt, b * dzq, DOT_BF16))
            tl.store(_blk(x1b + e, D, EB, E), _dot(qt, g * dzq, DOT_BF16))
            dg += tl.sum(dzq * qw1, 1)
            dbc += tl.sum(dzq * qs1, 1)
            da1 += _dot(dzq, tl.trans(dl), DOT_BF16)
            dq += _dot(g * dzq, tl.trans(w1), DOT_BF16) + _dot(b * dzq, tl.trans(s1), DOT_BF16)
            ddl = _dot(tl.trans(a1), dzq, DOT_BF16)
            tl.store(_blk(qb + e, C, EB, E), ddl)
            derr += _dot(ddl * _silu_grad(z), w2, DOT_BF16)  # du's share of err's gradient
        tl.store(DG + bh * T + c * C + rc, dg)
        tl.store(DBC + bh * T + c * C + rc, dbc)
        qk = _dot(q, tl.trans(k), DOT_BF16)
        tl.store(_mat(DM + cc * C * C, C, C), da2 * hh + da1 * qk)
        dxk1 = da1 * mmat
        dq += _dot(dxk1, k, DOT_BF16)
        if RESIDUAL:
            dq += dy
        tl.store(_mat(DQ + tok, C, D), dq)
        dk = _dot(tl.trans(dxk1), q, DOT_BF16)
        dp = 2 * (derr + _dot(tl.trans(hh * mmat), dy, DOT_BF16))
        tl.debug_barrier()  # the blocks' x1 / x2 shares, dh and dl gradients, stored above by other threads
        kt = tl.trans(k)
        for e in range(0, E, EB):
            w1 = _load_operand(_blk(w1b + e, D, EB, E), DOT_BF16)
            w2 = _load_operand(_mat(w2b + e * D, EB, D), DOT_BF16)
            z = tl.load(_blk(zb + e, C, EB, E))
            ag = _silu_grad(z)
            ddl = tl.load(_blk(qb + e, C, EB, E))
            dh = tl.load(_blk(hb + e, C, EB, E)) + _dot(dp, tl.trans(w2), DOT_BF16)
            dz = ddl * tl.load(_blk(ub + e, C, EB, E)) * _silu_grad2(z) + dh * ag
            x2p = _mat(x2b + e * D, EB, D)
            tl.store(x2p, tl.load(x2p) + _dot(tl.trans(ddl * ag), err, DOT_BF16)
                     + _dot(tl.trans(_silu(z)), dp, DOT_BF16))
            x1p = _blk(x1b + e, D, EB, E)
            tl.store(x1p, tl.load(x1p) + _dot(kt, dz, DOT_BF16))
            dk += _dot(dz, tl.trans(w1), DOT_BF16)
        if RESIDUAL:
            dk += dp
        _store_dk_dv(DK, DV, tok, dk, dp, C, D, False)  # the dy share; stage 2 adds the dWn share

    @triton.jit
    def _memory_bwd3_kernel(
        Q, K, V, G, BC, M, ML, MM, GL, BL, PL,
        SW1, SW2, SS1, SS2,  # chunk-start states from the forward (BH, N, ...)
        DY,
        IDW1, IDW2, IDS1, IDS2,  # the final state's gradient (BH, ...), read by stage 1
        DW1, DW2, DS1, DS2,  # the initial state's gradient (BH, ...), written by stage 1
        NW1, NW2, NS1, NS2,  # stage 1 writes, stage 2 reads: the gradient of each chunk's end state (BH, N, ...)
        X1, X2, XS1, XS2,  # stage 0 writes, stage 1 reads: the dy share of each chunk's state-gradient update
        ZS, US, LS, HS, QS, ES,  # scratch (BH, N, C, E) written by stage 0: z, u, dl, dh, silu'(zq), and err
        # (BH, N, C, D); read back there instead of held in registers, and by stages 1 and 2 instead of recomputed
        DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL,
        DY_H, DY_SB, DY_SH, DY_ST,  # dy's heads and strides (batch, head, token): see _dy_chunk
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, STAGE: tl.constexpr,
        RECOMPUTE: tl.constexpr = False, ACCUMULATE: tl.constexpr = True, INNER: tl.constexpr = False,
        EB: tl.constexpr = 0,
    ):
        """One stage per launch, grid (BH, N) for stages 0 and 2 and (BH,) for stage 1.  ``EB`` > 0: stage 0 or 2
        over the hidden units that many at a time (:func:`_bwd3_stage0_blocked`, :func:`_bwd3_stage2_blocked`)."""
        if STAGE == 0 and EB > 0:
            _bwd3_stage0_blocked(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY,
                                 X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES, DQ, DK, DV, DG, DBC, DM,
                                 DY_H, DY_SB, DY_SH, DY_ST, tl.program_id(0).to(tl.int64),
                                 tl.program_id(1).to(tl.int64), N, C, D, E, EB, RESIDUAL, DOT_BF16, INNER)
        elif STAGE == 2 and EB > 0:
            _bwd3_stage2_blocked(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, NW1, NW2, NS1, NS2,
                                 ZS, US, LS, ES, DK, DV, DML, DMM, DGL, DBL, DPL,
                                 tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
                                 N, C, D, E, EB, RESIDUAL, DOT_BF16, ACCUMULATE)
        else:
            _bwd3_stage(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2,
                        DW1, DW2, DS1, DS2, NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES,
                        DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL, DY_H, DY_SB, DY_SH, DY_ST,
                        tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), DW1, DW1,  # (no flags)
                        N, C, D, E, RESIDUAL, DOT_BF16, STAGE, False, RECOMPUTE, ACCUMULATE, INNER)

    # The three stages in one launch.  Stage 1 walks the chunks with one program per (batch, head), a few dozen
    # programs on a GPU of ~130 SMs; launched one after another, stage 2 starts only when the slowest walk ends.
    # Here the grid holds all three stages' programs (BH x N of stage 0, BH walks, BH x N of stage 2, each
    # stage's chunks latest first, the order the walk needs them), and chunk c of a stage starts as soon as its
    # input exists, so stage 2 fills the SMs the walks leave idle.  A program's role is its ticket, the order in
    # which programs took one from an atomic counter, not its program id: a program only waits on programs with
    # earlier tickets, which are running or done, so the waits cannot deadlock whatever order the GPU schedules
    # programs in.  (The interpreter runs the programs one after another in ticket order: no wait spins there.)
    @triton.jit
    def _memory_bwd3_overlap_kernel(
        Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2, DW1, DW2, DS1, DS2,
        NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES, DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL,
        DY_H, DY_SB, DY_SH, DY_ST,  # dy's heads and strides (batch, head, token): see _dy_chunk
        TICKET, FLAGS,  # int32, zero at launch: the ticket counter (1,) and the hand-on flags (2, BH, N)
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, INNER: tl.constexpr = False, EB: tl.constexpr = 0,
    ):
        """``EB`` > 0: stage 2's programs take the hidden units that many at a time (:func:`_bwd3_stage2_blocked`,
        reading the inner forward stage 0 stored or the forward's), once both flags of their chunk are up."""
        BH = tl.num_programs(0) // (2 * N + 1)
        t = tl.atomic_add(TICKET, 1).to(tl.int64)
        F1 = FLAGS + BH * N
        if t < BH * N:
            _bwd3_stage(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2,
                        DW1, DW2, DS1, DS2,
                        NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES,
                        DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL, DY_H, DY_SB, DY_SH, DY_ST,
                        t % BH, N - 1 - t // BH, FLAGS, F1, N, C, D, E, RESIDUAL, DOT_BF16, 0, True, False, True, INNER)
        elif t < BH * N + BH:
            _bwd3_stage(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2,
                        DW1, DW2, DS1, DS2,
                        NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES,
                        DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL, DY_H, DY_SB, DY_SH, DY_ST,
                        t - BH * N, 0, FLAGS, F1, N, C, D, E, RESIDUAL, DOT_BF16, 1, True, False, True, INNER)
        else:
            j = t - BH * N - BH
            bh = j % BH
            c = N - 1 - j // BH
            if EB > 0:
                _wait(FLAGS + bh * N + c)  # as _bwd3_stage's stage 2 waits: stage 0's scratch and dk / dv, the
                _wait(F1 + bh * N + c)  # walk's end-state gradient of the chunk
                _bwd3_stage2_blocked(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, NW1, NW2, NS1, NS2,
                                     ZS, US, LS, ES, DK, DV, DML, DMM, DGL, DBL, DPL, bh, c,
                                     N, C, D, E, EB, RESIDUAL, DOT_BF16, True)
            else:
                _bwd3_stage(Q, K, V, G, BC, M, ML, MM, GL, BL, PL, SW1, SW2, SS1, SS2, DY, IDW1, IDW2, IDS1, IDS2,
                            DW1, DW2, DS1, DS2,
                            NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, ZS, US, LS, HS, QS, ES,
                            DQ, DK, DV, DG, DBC, DM, DML, DMM, DGL, DBL, DPL, DY_H, DY_SB, DY_SH, DY_ST,
                            bh, c, FLAGS, F1, N, C, D, E, RESIDUAL, DOT_BF16, 2, True, False, True, INNER)

    # ------------------------------------------------------------------ the walks spread over P programs a head
    # At batch 1 the sequential walks run one program per head (8 at MAC's shape, on a GPU of 132 SMs), each holding
    # a head's whole state (or state gradient) and spilling part of it.  Here P programs share a head: program
    # ``part`` holds the columns part * E / P ... of W1 / S1 (D, E) and the same rows of W2 / S2 (E, D), i.e. a block
    # of the hidden units.  Everything a chunk step computes is then local to the block except one (C, D) sum over
    # the hidden units a step (h W2 forward; the gradient reaching err backward), which the P programs all-reduce
    # through global memory (:func:`_all_reduce`).  The arithmetic is that of ``_memory_fwd_kernel`` MODE 1 and
    # ``_bwd3_stage`` STAGE 1, regrouped by block; the ``*_lockstep`` kernels run the same helpers with the P parts in
    # one program, one after another (the interpreter runs programs one at a time, so its parts could never meet).

    @triton.jit
    def _publish(flag, value):
        """Set ``flag`` to ``value`` once everything this program stored so far is visible to other programs."""
        tl.debug_barrier()
        tl.atomic_xchg(flag, value, sem="release")

    @triton.jit
    def _await(flag, value):
        """Spin until ``flag`` >= ``value`` (acquire), then order every thread's later loads behind it."""
        seen = tl.atomic_add(flag, 0, sem="acquire")
        while seen < value:
            seen = tl.atomic_add(flag, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _await_loads(flag, value):
        """:func:`_await` polling with plain loads (``ld.volatile`` by every thread, each warp leaving the spin on
        its own), then one acquire read of the flag (Triton makes ``atomic_add(flag, 0, "acquire")`` one thread's
        ``ld.acquire``), which synchronises with the partner's release, and the barrier that orders every thread's
        later loads behind it.  :func:`_await` instead makes that acquire read on every turn of the spin and hands
        it to the other threads through shared memory and a barrier."""
        seen = tl.load(flag, volatile=True)
        while seen < value:
            seen = tl.load(flag, volatile=True)
        tl.atomic_add(flag, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _all_reduce(X, F, bh, part, i, tile, P: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                    FS: tl.constexpr = 1, POLL_LOADS: tl.constexpr = False):
        """The sum of ``tile`` (C, D) over the P programs of head ``bh`` at step ``i``: each stores its own in slot
        X[bh, i % 2, part] (X: (BH, 2, P, C, D)), publishes its flag F[(bh * P + part) * FS] = i + 1 and waits for
        every partner's; all then add the P slots in part order, the same float32 sum in each.  Two generations of
        slots: a program overwrites a slot two steps later, after every partner published the step after the one
        that read it.  Loads bypass L1 (``.cg``): the slot's previous generation may still sit there.  ``FS``: int32
        elements from one flag to the next (32: a 128-byte line each); ``POLL_LOADS``: wait with
        :func:`_await_loads` (see :func:`walk_sync_mode`)."""
        base = X + (bh * 2 + i % 2) * P * C * D
        tl.store(_mat(base + part * C * D, C, D), tile)
        _publish(F + (bh * P + part) * FS, i + 1)
        for f in tl.static_range(P):
            if POLL_LOADS:
                _await_loads(F + (bh * P + f) * FS, i + 1)
            else:
                _await(F + (bh * P + f) * FS, i + 1)
        return _slots_sum(base, P, C, D)

    @triton.jit
    def _slots_sum(base, P: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
        """The P (C, D) tiles stored from ``base`` on, added in part order (loads past L1: see :func:`_all_reduce`)."""
        total = tl.load(_mat(base, C, D), cache_modifier=".cg")
        for f in tl.static_range(1, P):
            total += tl.load(_mat(base + f * C * D, C, D), cache_modifier=".cg")
        return total

    @triton.jit
    def _walk_chunk(K, V, ML, MM, GL, BL, PL, bh, c, N: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
        """What a walk reads of chunk c: k, v (C, D) widened, the momentum weights Ml, m (C, 1), G_C, B_C, P_C.
        k and v come in the dtype they have (bf16 under autocast) and are widened here: a host-side float32 copy of
        each was more launches per call, on the chain a long MAC row waits on."""
        rc = tl.arange(0, C)
        tok = bh * N * C * D + c * C * D
        cc = bh * N + c
        return (tl.load(_mat(K + tok, C, D)).to(tl.float32), tl.load(_mat(V + tok, C, D)).to(tl.float32),
                tl.load(ML + cc * C + rc)[:, None], tl.load(MM + cc * C + rc)[:, None], tl.load(GL + cc),
                tl.load(BL + cc), tl.load(PL + cc))

    @triton.jit
    def _walk_fwd_share(k, w1, w2, DOT_BF16: tl.constexpr):
        """A block's part of the chunk's inner forward: z = k W1[:, blk], h = silu(z), and its share h W2[blk] of
        h W2 (C, D)."""
        z = _dot(k, w1, DOT_BF16)
        h = _silu(z)
        return z, h, _dot(h, w2, DOT_BF16)

    @triton.jit
    def _walk_fwd_step(k, v, p, z, h, w1, s1, w2, s2, ml, mm, gl, bl, pl, RESIDUAL: tl.constexpr,
                       DOT_BF16: tl.constexpr):
        """The rest of a chunk step for a block, given the all-reduced p = h W2: err = 2 (p [+ k] - v), u = err
        W2[blk]^T, dl = u * silu'(z) and the block's next start state (Eq. 13-14 with the chunk's decay and momentum
        weights): W1' = G_C W1 + B_C S1 + k^T (Ml dl), S1' = P_C S1 + k^T (m dl), the same for layer 2 with h, err."""
        if RESIDUAL:
            p += k
        err = 2 * (p - v)
        u = _dot(err, tl.trans(w2), DOT_BF16)
        dl = u * _silu_grad(z)
        kt = tl.trans(k)
        ht = tl.trans(h)
        return (err, u, dl, gl * w1 + bl * s1 + _dot(kt, ml * dl, DOT_BF16), pl * s1 + _dot(kt, mm * dl, DOT_BF16),
                gl * w2 + bl * s2 + _dot(ht, ml * err, DOT_BF16), pl * s2 + _dot(ht, mm * err, DOT_BF16))

    @triton.jit
    def _walk_fwd_save(SW1, SW2, SS1, SS2, cc, o1, o2, w1, s1, w2, s2, D: tl.constexpr, E: tl.constexpr,
                       EP: tl.constexpr):
        """A block of chunk cc's start state into the starts buffers (in their dtype)."""
        tl.store(_blk(SW1 + cc * D * E + o1, D, EP, E), w1.to(SW1.dtype.element_ty))
        tl.store(_blk(SS1 + cc * D * E + o1, D, EP, E), s1.to(SS1.dtype.element_ty))
        tl.store(_mat(SW2 + cc * E * D + o2, EP, D), w2.to(SW2.dtype.element_ty))
        tl.store(_mat(SS2 + cc * E * D + o2, EP, D), s2.to(SS2.dtype.element_ty))

    @triton.jit
    def _walk_fwd_inner(ZS, US, LS, ES, cc, o1, part, z, u, dl, err, C: tl.constexpr, D: tl.constexpr,
                        E: tl.constexpr, EP: tl.constexpr):
        """INNER: a block of chunk cc's inner forward (z, u, dl) and, from part 0, err."""
        tl.store(_blk(ZS + cc * C * E + o1, C, EP, E), z)
        tl.store(_blk(US + cc * C * E + o1, C, EP, E), u)
        tl.store(_blk(LS + cc * C * E + o1, C, EP, E), dl)
        if part == 0:
            tl.store(_mat(ES + cc * C * D, C, D), err)

    @triton.jit
    def _now():
        """The GPU's nanosecond clock (``%globaltimer``, one clock for every SM): the walk clock's stamps."""
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def _clock_synced(CLK, bh, part, P: tl.constexpr, i, before, reducing):
        """With the walk clock on, after step ``i``'s all-reduce, which began at ``before``: ``reducing`` (the ns
        spent in this program's all-reduces so far) with this one added; at step 0 also program (part, bh)'s second
        stamp (every partner has started and shared its first tile).  Stamps: (BH * P, 5) int64 rows of start,
        first all-reduce done, end, SM, ns in all-reduces."""
        now = _now()
        if i == 0:
            tl.store(CLK + (bh * P + part) * 5 + 1, now)
        return reducing + (now - before)

    @triton.jit
    def _clock_close(CLK, bh, part, P: tl.constexpr, t0, reducing):
        """With the walk clock on: program (part, bh)'s start ``t0``, end (now), SM and ns in all-reduces."""
        base = CLK + (bh * P + part) * 5
        tl.store(base, t0)
        tl.store(base + 2, _now())
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(base + 3, sm.to(tl.int64))
        tl.store(base + 4, reducing)

    @triton.jit
    def _memory_walk_parts_kernel(
        K, V, ML, MM, GL, BL, PL,
        IW1, IW2, IS1, IS2,  # the initial state (BH, ...), read
        W1, W2, S1, S2,  # the final state (BH, ...), written
        SW1, SW2, SS1, SS2,  # each chunk's start state (BH, N, ...), written
        ZS, US, LS, ES,  # with INNER, each chunk's inner forward (as _memory_fwd_kernel stores it)
        X, F,  # the all-reduce's slots (BH, 2, P, C, D) float32 and flags (BH * P, FS apart) int32, zero at launch
        CLK,  # with CLOCK, the walk clock's stamps (BH * P, 5) int64 (see _clock_synced, WALK_CLOCKS), else unused
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, P: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, INNER: tl.constexpr, CLOCK: tl.constexpr = False,
        FS: tl.constexpr = 1, POLL_LOADS: tl.constexpr = False,  # walk_sync_mode
    ):
        """The forward's walk (``_memory_fwd_kernel`` MODE 1, depth 2) with grid (P, BH): program (part, bh) carries
        its block of the state in registers from chunk to chunk."""
        if CLOCK:
            t0 = _now()
            reducing = t0 - t0
        EP: tl.constexpr = E // P
        part = tl.program_id(0).to(tl.int64)  # a head's parts are neighbours in launch order (see _run_walk)
        bh = tl.program_id(1).to(tl.int64)
        o1 = part * EP
        o2 = part * EP * D
        w1 = tl.load(_blk(IW1 + bh * D * E + o1, D, EP, E))
        s1 = tl.load(_blk(IS1 + bh * D * E + o1, D, EP, E))
        w2 = tl.load(_mat(IW2 + bh * E * D + o2, EP, D))
        s2 = tl.load(_mat(IS2 + bh * E * D + o2, EP, D))
        for c in range(N):
            k, v, ml, mm, gl, bl, pl = _walk_chunk(K, V, ML, MM, GL, BL, PL, bh, c, N, C, D)
            cc = bh * N + c
            _walk_fwd_save(SW1, SW2, SS1, SS2, cc, o1, o2, w1, s1, w2, s2, D, E, EP)
            z, h, share = _walk_fwd_share(k, w1, w2, DOT_BF16)
            if CLOCK:
                before = _now()
            p = _all_reduce(X, F, bh, part, c, share, P, C, D, FS, POLL_LOADS)
            if CLOCK:
                reducing = _clock_synced(CLK, bh, part, P, c, before, reducing)
            err, u, dl, w1, s1, w2, s2 = _walk_fwd_step(k, v, p, z, h, w1, s1, w2, s2, ml, mm, gl, bl, pl,
                                                        RESIDUAL, DOT_BF16)
            if INNER:
                _walk_fwd_inner(ZS, US, LS, ES, cc, o1, part, z, u, dl, err, C, D, E, EP)
        tl.store(_blk(W1 + bh * D * E + o1, D, EP, E), w1)
        tl.store(_blk(S1 + bh * D * E + o1, D, EP, E), s1)
        tl.store(_mat(W2 + bh * E * D + o2, EP, D), w2)
        tl.store(_mat(S2 + bh * E * D + o2, EP, D), s2)
        if CLOCK:
            _clock_close(CLK, bh, part, P, t0, reducing)

    @triton.jit
    def _memory_walk_parts_lockstep_kernel(
        K, V, ML, MM, GL, BL, PL, IW1, IW2, IS1, IS2, W1, W2, S1, S2, SW1, SW2, SS1, SS2, ZS, US, LS, ES, X, F,
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, P: tl.constexpr,
        RESIDUAL: tl.constexpr, DOT_BF16: tl.constexpr, INNER: tl.constexpr,
    ):
        """:func:`_memory_walk_parts_kernel` with grid (BH,): the P parts one after another in one program, the
        running state in the final-state buffers, the all-reduce a sum of the slots in the same order (for the
        interpreter)."""
        EP: tl.constexpr = E // P
        bh = tl.program_id(0).to(tl.int64)
        for part in range(P):
            o1 = part * EP
            o2 = part * EP * D
            tl.store(_blk(W1 + bh * D * E + o1, D, EP, E), tl.load(_blk(IW1 + bh * D * E + o1, D, EP, E)))
            tl.store(_blk(S1 + bh * D * E + o1, D, EP, E), tl.load(_blk(IS1 + bh * D * E + o1, D, EP, E)))
            tl.store(_mat(W2 + bh * E * D + o2, EP, D), tl.load(_mat(IW2 + bh * E * D + o2, EP, D)))
            tl.store(_mat(S2 + bh * E * D + o2, EP, D), tl.load(_mat(IS2 + bh * E * D + o2, EP, D)))
        for c in range(N):
            k, v, ml, mm, gl, bl, pl = _walk_chunk(K, V, ML, MM, GL, BL, PL, bh, c, N, C, D)
            cc = bh * N + c
            base = X + bh * 2 * P * C * D
            for part in range(P):
                w1 = tl.load(_blk(W1 + bh * D * E + part * EP, D, EP, E))
                w2 = tl.load(_mat(W2 + bh * E * D + part * EP * D, EP, D))
                z, h, share = _walk_fwd_share(k, w1, w2, DOT_BF16)
                tl.store(_mat(base + part * C * D, C, D), share)
            p = _slots_sum(base, P, C, D)
            for part in range(P):
                o1 = part * EP
                o2 = part * EP * D
                w1p = _blk(W1 + bh * D * E + o1, D, EP, E)
                s1p = _blk(S1 + bh * D * E + o1, D, EP, E)
                w2p = _mat(W2 + bh * E * D + o2, EP, D)
                s2p = _mat(S2 + bh * E * D + o2, EP, D)
                w1 = tl.load(w1p)
                s1 = tl.load(s1p)
                w2 = tl.load(w2p)
                s2 = tl.load(s2p)
                _walk_fwd_save(SW1, SW2, SS1, SS2, cc, o1, o2, w1, s1, w2, s2, D, E, EP)
                z, h, share = _walk_fwd_share(k, w1, w2, DOT_BF16)
                err, u, dl, w1, s1, w2, s2 = _walk_fwd_step(k, v, p, z, h, w1, s1, w2, s2, ml, mm, gl, bl, pl,
                                                            RESIDUAL, DOT_BF16)
                if INNER:
                    _walk_fwd_inner(ZS, US, LS, ES, cc, o1, part, z, u, dl, err, C, D, E, EP)
                tl.store(w1p, w1)
                tl.store(s1p, s1)
                tl.store(w2p, w2)
                tl.store(s2p, s2)

    @triton.jit
    def _walk_bwd_open(NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, DW1, DW2, DS1, DS2, bh, cc, c, o1, o2, gl, bl, pl,
                       D: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, DOT_BF16: tl.constexpr):
        """A block's start of the backward walk's chunk step (``_bwd3_stage`` STAGE 1): reads the block of chunk c's
        end-state gradient (slot cc), stores the parts of its start-state gradient known at once - to slot cc - 1,
        or for chunk 0 to the initial state's gradient - and returns those targets and the read block as operands."""
        first = c == 0
        dw1n = tl.load(_blk(NW1 + cc * D * E + o1, D, EP, E))
        ds1n = tl.load(_blk(NS1 + cc * D * E + o1, D, EP, E))
        dw2n = tl.load(_mat(NW2 + cc * E * D + o2, EP, D))
        ds2n = tl.load(_mat(NS2 + cc * E * D + o2, EP, D))
        tw1 = _blk(tl.where(first, DW1 + bh * D * E, NW1 + (cc - 1) * D * E) + o1, D, EP, E)
        ts1 = _blk(tl.where(first, DS1 + bh * D * E, NS1 + (cc - 1) * D * E) + o1, D, EP, E)
        tw2 = _mat(tl.where(first, DW2 + bh * E * D, NW2 + (cc - 1) * E * D) + o2, EP, D)
        ts2 = _mat(tl.where(first, DS2 + bh * E * D, NS2 + (cc - 1) * E * D) + o2, EP, D)
        tl.store(ts1, bl * dw1n + pl * ds1n + tl.load(_blk(XS1 + cc * D * E + o1, D, EP, E)))
        tl.store(ts2, bl * dw2n + pl * ds2n + tl.load(_mat(XS2 + cc * E * D + o2, EP, D)))
        tl.store(tw1, gl * dw1n + tl.load(_blk(X1 + cc * D * E + o1, D, EP, E)))
        tl.store(tw2, gl * dw2n + tl.load(_mat(X2 + cc * E * D + o2, EP, D)))
        return (tw1, tw2, _operand(dw1n, DOT_BF16), _operand(ds1n, DOT_BF16), _operand(dw2n, DOT_BF16),
                _operand(ds2n, DOT_BF16))

    @triton.jit
    def _walk_bwd_share(k, z, err, w2, dw1n, ds1n, dw2n, ds2n, ml, mm, DOT_BF16: tl.constexpr):
        """A block's part of the chunk's state-gradient step up to the all-reduce: ddl and dh (C, EP) through the
        dWn share, du = ddl * silu'(z), and the block's share of the gradient reaching err (C, D):
        Ml (h dW2n[blk]) + m (h dS2n[blk]) + du W2[blk]."""
        h = _silu(z)
        ddl = ml * _dot(k, dw1n, DOT_BF16) + mm * _dot(k, ds1n, DOT_BF16)
        dh = _dot(ml * err, tl.trans(dw2n), DOT_BF16) + _dot(mm * err, tl.trans(ds2n), DOT_BF16)
        du = ddl * _silu_grad(z)
        share = ml * _dot(h, dw2n, DOT_BF16) + mm * _dot(h, ds2n, DOT_BF16) + _dot(du, w2, DOT_BF16)
        return h, ddl, dh, du, share

    @triton.jit
    def _walk_bwd_close(tw1, tw2, k, z, u, err, h, w2, ddl, dh, du, derr, DOT_BF16: tl.constexpr):
        """The rest of the step, given the all-reduced gradient reaching err: dp = 2 derr, dz, and the block's
        remaining parts of the start-state gradient, added to what :func:`_walk_bwd_open` stored."""
        dp = 2 * derr
        dh += _dot(dp, tl.trans(w2), DOT_BF16)
        dz = ddl * u * _silu_grad2(z) + dh * _silu_grad(z)
        tl.debug_barrier()  # what _walk_bwd_open stored, from every thread
        tl.store(tw1, tl.load(tw1) + _dot(tl.trans(k), dz, DOT_BF16))
        tl.store(tw2, tl.load(tw2) + _dot(tl.trans(du), err, DOT_BF16) + _dot(tl.trans(h), dp, DOT_BF16))
        tl.debug_barrier()  # the next step reads this slot

    @triton.jit
    def _walk_bwd_seed(IDW1, IDW2, IDS1, IDS2, NW1, NW2, NS1, NS2, bh, o1, o2, N: tl.constexpr, D: tl.constexpr,
                       E: tl.constexpr, EP: tl.constexpr):
        """The final state's gradient (a block of it) is the last chunk's end-state gradient: into slot N - 1."""
        last = bh * N + N - 1
        tl.store(_blk(NW1 + last * D * E + o1, D, EP, E), tl.load(_blk(IDW1 + bh * D * E + o1, D, EP, E)))
        tl.store(_blk(NS1 + last * D * E + o1, D, EP, E), tl.load(_blk(IDS1 + bh * D * E + o1, D, EP, E)))
        tl.store(_mat(NW2 + last * E * D + o2, EP, D), tl.load(_mat(IDW2 + bh * E * D + o2, EP, D)))
        tl.store(_mat(NS2 + last * E * D + o2, EP, D), tl.load(_mat(IDS2 + bh * E * D + o2, EP, D)))

    @triton.jit
    def _memory_walk_bwd_parts_kernel(
        K, ML, MM, GL, BL, PL, SW2,
        IDW1, IDW2, IDS1, IDS2,  # the final state's gradient (BH, ...), read
        DW1, DW2, DS1, DS2,  # the initial state's gradient (BH, ...), written
        NW1, NW2, NS1, NS2,  # each chunk's end-state gradient (BH, N, ...), written (stage 2 reads them)
        X1, X2, XS1, XS2,  # stage 0's dy share of each chunk's start-state gradient, read
        ZS, US, ES,  # each chunk's inner forward z, u (BH, N, C, E) and err (BH, N, C, D), read
        X, F,  # the all-reduce's slots and flags, as in _memory_walk_parts_kernel
        CLK,  # the walk clock's stamps, as in _memory_walk_parts_kernel
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, P: tl.constexpr,
        DOT_BF16: tl.constexpr, CLOCK: tl.constexpr = False,
        FS: tl.constexpr = 1, POLL_LOADS: tl.constexpr = False,  # walk_sync_mode
    ):
        """The three-stage backward's walk (stage 1, reading the inner forward from the scratch) with grid (P, BH):
        program (part, bh) walks its block of the state gradient back through the chunks."""
        if CLOCK:
            t0 = _now()
            reducing = t0 - t0
        EP: tl.constexpr = E // P
        part = tl.program_id(0).to(tl.int64)  # a head's parts are neighbours in launch order (see _run_walk)
        bh = tl.program_id(1).to(tl.int64)
        o1 = part * EP
        o2 = part * EP * D
        _walk_bwd_seed(IDW1, IDW2, IDS1, IDS2, NW1, NW2, NS1, NS2, bh, o1, o2, N, D, E, EP)
        tl.debug_barrier()
        for i in range(N):
            c = N - 1 - i
            cc = bh * N + c
            k, v, ml, mm, gl, bl, pl = _walk_chunk(K, K, ML, MM, GL, BL, PL, bh, c, N, C, D)
            tw1, tw2, dw1n, ds1n, dw2n, ds2n = _walk_bwd_open(NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, DW1, DW2, DS1,
                                                              DS2, bh, cc, c, o1, o2, gl, bl, pl, D, E, EP, DOT_BF16)
            z = tl.load(_blk(ZS + cc * C * E + o1, C, EP, E))
            err = tl.load(_mat(ES + cc * C * D, C, D))
            w2 = _operand(tl.load(_mat(SW2 + cc * E * D + o2, EP, D)), DOT_BF16)
            h, ddl, dh, du, share = _walk_bwd_share(k, z, err, w2, dw1n, ds1n, dw2n, ds2n, ml, mm, DOT_BF16)
            if CLOCK:
                before = _now()
            derr = _all_reduce(X, F, bh, part, i, share, P, C, D, FS, POLL_LOADS)
            if CLOCK:
                reducing = _clock_synced(CLK, bh, part, P, i, before, reducing)
            _walk_bwd_close(tw1, tw2, k, z, tl.load(_blk(US + cc * C * E + o1, C, EP, E)), err, h, w2, ddl, dh, du,
                            derr, DOT_BF16)
        if CLOCK:
            _clock_close(CLK, bh, part, P, t0, reducing)

    @triton.jit
    def _memory_walk_bwd_parts_lockstep_kernel(
        K, ML, MM, GL, BL, PL, SW2, IDW1, IDW2, IDS1, IDS2, DW1, DW2, DS1, DS2, NW1, NW2, NS1, NS2,
        X1, X2, XS1, XS2, ZS, US, ES, X, F,
        N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, P: tl.constexpr,
        DOT_BF16: tl.constexpr,
    ):
        """:func:`_memory_walk_bwd_parts_kernel` with grid (BH,): the P parts one after another in one program (for
        the interpreter; see :func:`_memory_walk_parts_lockstep_kernel`)."""
        EP: tl.constexpr = E // P
        bh = tl.program_id(0).to(tl.int64)
        for part in range(P):
            _walk_bwd_seed(IDW1, IDW2, IDS1, IDS2, NW1, NW2, NS1, NS2, bh, part * EP, part * EP * D, N, D, E, EP)
        for i in range(N):
            c = N - 1 - i
            cc = bh * N + c
            k, v, ml, mm, gl, bl, pl = _walk_chunk(K, K, ML, MM, GL, BL, PL, bh, c, N, C, D)
            err = tl.load(_mat(ES + cc * C * D, C, D))
            base = X + bh * 2 * P * C * D
            for part in range(P):  # every part's share first (the slots they read stay unchanged until the close)
                o1 = part * EP
                o2 = part * EP * D
                dw1n = _operand(tl.load(_blk(NW1 + cc * D * E + o1, D, EP, E)), DOT_BF16)
                ds1n = _operand(tl.load(_blk(NS1 + cc * D * E + o1, D, EP, E)), DOT_BF16)
                dw2n = _operand(tl.load(_mat(NW2 + cc * E * D + o2, EP, D)), DOT_BF16)
                ds2n = _operand(tl.load(_mat(NS2 + cc * E * D + o2, EP, D)), DOT_BF16)
                z = tl.load(_blk(ZS + cc * C * E + o1, C, EP, E))
                w2 = _operand(tl.load(_mat(SW2 + cc * E * D + o2, EP, D)), DOT_BF16)
                h, ddl, dh, du, share = _walk_bwd_share(k, z, err, w2, dw1n, ds1n, dw2n, ds2n, ml, mm, DOT_BF16)
                tl.store(_mat(base + part * C * D, C, D), share)
            derr = _slots_sum(base, P, C, D)
            for part in range(P):
                o1 = part * EP
                o2 = part * EP * D
                tw1, tw2, dw1n, ds1n, dw2n, ds2n = _walk_bwd_open(NW1, NW2, NS1, NS2, X1, X2, XS1, XS2, DW1, DW2,
                                                                  DS1, DS2, bh, cc, c, o1, o2, gl, bl, pl, D, E, EP,
                                                                  DOT_BF16)
                z = tl.load(_blk(ZS + cc * C * E + o1, C, EP, E))
                w2 = _operand(tl.load(_mat(SW2 + cc * E * D + o2, EP, D)), DOT_BF16)
                h, ddl, dh, du, share = _walk_bwd_share(k, z, err, w2, dw1n, ds1n, dw2n, ds2n, ml, mm, DOT_BF16)
                _walk_bwd_close(tw1, tw2, k, z, tl.load(_blk(US + cc * C * E + o1, C, EP, E)), err, h, w2, ddl, dh,
                                du, derr, DOT_BF16)



def kernel_failed(q: Tensor, W: Sequence[Tensor], chunk_size: int, error: Exception) -> None:
    """Record a compile failure (say, out of shared memory on a smaller GPU) so ``supports`` says no."""
    import warnings

    FAILED_SHAPES.add((q.shape[-1], W[0].shape[-1], len(W), chunk_size))
    warnings.warn(f"Triton memory kernel failed for head dim {q.shape[-1]}, hidden {W[0].shape[-1]}, depth "
                  f"{len(W)}, chunk {chunk_size} ({type(error).__name__}: {str(error)[:200]}); using the PyTorch "
                  "path for these shapes", RuntimeWarning, stacklevel=3)


def _num_warps(D: int, E: int) -> int:
    override = switch_value("TITANS_TRITON_WARPS")
    if override:
        return int(override)
    return 4 if D * E <= 64 * 64 else 8


PASSES = ("fwd0", "fwd1", "fwd2", "bwd0", "bwd1", "bwd2", "stage0", "stage1", "stage2", "overlap")


def kernel_name(kernel) -> str:
    """A kernel's function name (a ``triton.jit`` kernel, or its autotuned wrapper, keeps it on ``fn``)."""
    return kernel.fn.__name__ if hasattr(kernel, "fn") else getattr(kernel, "__name__", str(kernel))


def pass_name(kernel, meta: dict) -> str:
    """The launch's pass, as ``TITANS_TRITON_PASS_WARPS`` names it: ``fwd<MODE>`` / ``bwd<MODE>`` (the forward and the
    two-pass backward), ``stage<STAGE>`` (the three-stage backward's launches), ``overlap`` (its one launch)."""
    name = kernel_name(kernel)
    if name.endswith("_memory_fwd_kernel"):
        return f"fwd{meta.get('MODE', 0)}"
    if name.endswith("_memory_bwd_kernel"):
        return f"bwd{meta.get('MODE', 0)}"
    if name.endswith("_memory_bwd3_kernel"):
        return f"stage{meta.get('STAGE', 0)}"
    if "_memory_walk_bwd_parts" in name:  # the walks spread over P programs a head: the passes they stand in for
        return "stage1"
    if "_memory_walk_parts" in name:
        return "fwd1"
    return "overlap"


# passes launched at fewer warps than :func:`_num_warps` gives the others, by default: at most these
NARROW_WARPS = {"stage0": 4, "fwd2": 4}


def narrow_warps(kernel, meta: dict) -> int:
    """A fixed-warps launch's warps by default: ``meta["num_warps"]`` (:func:`_num_warps`, 8 at hidden 128), at most
    ``NARROW_WARPS`` for the passes named there, unless ``TITANS_TRITON_WARPS`` sets every pass's.

    Why 4: a stage-0 or read-out (``fwd2``) program is latency-bound on its spills (stage 0: 2.4 KB a thread at 8
    warps, 3.4 KB at 4, cross-compiled with Triton 3.6) and at 8 warps takes a whole SM (255 registers x 256
    threads); at 4 warps two programs share one.  MAC 65536 x 1 through the wavefront (benchmarks/RESULTS.md section
    6): stage 0 at 4 warps 347,566 / 347,691 against 340,282 / 340,283 tokens/s on one H200 (session 45); the
    read-out forward at 4 warps 304,129 / 303,985 / 304,523 against 303,144 / 303,405 / 302,901 on one H100, and
    MAC 4096 x 8 341,933 against 339,833 (session 46).

    Stage 0 by blocks of hidden units (``meta["EB"]``, ``TITANS_TRITON_STAGE0_BLOCK``, off by default) keeps the
    full count: at 4 warps it gave NaN gradients on an H100 (its GPU test and a training row, session 46), at 8 it
    trained as the whole-tile stage does."""
    full = meta["num_warps"]
    name = pass_name(kernel, meta)
    if switch_value("TITANS_TRITON_WARPS") or (name == "stage0" and meta.get("EB")):
        return full
    return min(full, NARROW_WARPS.get(name, full))


def pass_warps(kernel, meta: dict) -> int:
    """Warps for this launch: ``TITANS_TRITON_PASS_WARPS`` ("stage0=16,fwd1=4": per pass, see :func:`pass_name`;
    for A/B timing of the passes, which differ in work per program and parallelism) over :func:`narrow_warps`."""
    spec = switch_value("TITANS_TRITON_PASS_WARPS") or ""
    if not spec:
        return narrow_warps(kernel, meta)
    chosen = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in PASSES or not value.strip().isdigit() or not _pow2(int(value)):
            raise ValueError(f"TITANS_TRITON_PASS_WARPS={spec!r}: expected pass=warps items, passes from "
                             f"{', '.join(PASSES)}, warps a power of two (got {item!r})")
        chosen[key] = int(value)
    return chosen.get(pass_name(kernel, meta), narrow_warps(kernel, meta))


BACKWARDS = SWITCHES["TITANS_TRITON_BWD"].values


def backward_mode() -> str:
    """The depth-2 backward, set by ``TITANS_TRITON_BWD``: ``overlap``, the three stages of ``_memory_bwd3_kernel``
    in one launch that hands chunks on as they are done (``_memory_bwd3_overlap_kernel``; on an H200 1.43 vs 1.60 ms
    at MAC's segment shape, 10.25 vs 11.26 ms at 8x8x4096); ``split``, the three stages launched one after another;
    ``fused``, the two-pass backward; ``auto`` (default): :func:`_overlapped` picks ``overlap`` or ``split``."""
    return switch_value("TITANS_TRITON_BWD")


def _overlapped(mode: str, parts: int) -> bool:
    """Whether the three-stage backward runs in one launch: ``overlap``, or ``auto`` where its walk keeps one program
    a head (``parts``, :func:`_walk_parts`).  The walks over parts exist only as a launch of their own, and where
    they run (small batches) the three launches were the faster backward even before them: MAC 65536 x 1 through the
    wavefront on an H200 209.0K vs 192.6K tokens/s with one program a head (session 20), then 254.5K with two
    (session 24); at batch 8 (one program a head) one launch was faster, 328.6K vs 321.4K at 4096 x 8 (session 17;
    benchmarks/RESULTS.md section 6).  Not timed: a one-pass batch-1 step with each."""
    return mode == "overlap" or (mode == "auto" and parts < PARTS_KERNELS_FROM)


def _split() -> bool:
    """Two-pass kernels (a sequential pass for the recurrence, then a pass parallel over chunks for the
    per-token outputs) unless ``TITANS_TRITON_SPLIT=0`` asks for the single-pass ones."""
    return switch_on("TITANS_TRITON_SPLIT")


def _save_inner(L: int, N: int, walk_alone: bool = False) -> bool:
    """Whether the forward's walk stores each chunk's inner forward for the backward (depth 2 with the three-stage
    backward, the only one that reads it), by ``TITANS_TRITON_SAVE_INNER``: ``1`` always, ``0`` never, ``auto``
    (the default) for the walk alone (:func:`memory_walk_forward`: the split core, whose read-out runs apart - MAC's
    batched read-outs in the wavefront): its backward walk then runs over parts instead of recomputing the inner
    forward in one program a head.  For the whole core it is no faster and costs 1.75 KB a token and head (MAC
    65536 x 1 on an H200: 226.3K tokens/s with it, 227.5K without, 23.5 vs 20.7 GB; benchmarks/RESULTS.md section 6,
    session 23); the batched read-outs ran with it at 305.3K tokens/s (session 37)."""
    mode = switch_value("TITANS_TRITON_SAVE_INNER")
    return L == 2 and N > 1 and backward_mode() != "fused" and (mode == "1" or (mode == "auto" and walk_alone))


MAX_WALK_PROGRAMS = 32
# hidden units a program of a walk holds at least: 64 on the GPU, 16 (the smallest matmul tile) under the interpreter.
# 4 parts of hidden 128 (32 units a program) on an H200 with Triton 3.6: with float32 q / k / v an out-of-bounds
# shared-memory read inside a tl.dot of the forward walk (compute-sanitizer, session 30: Triton's generated code);
# with bf16 q / k / v correct, but MAC 65536 x 1 trained no faster than with 2 parts (279.3K vs 282.6K tokens/s;
# benchmarks/RESULTS.md section 6, sessions 24 and 30)
MIN_WALK_UNITS = 64


_SMS: dict = {}


def _multiprocessors(device: torch.device | None) -> int | None:
    """SMs of a CUDA device (cached), None elsewhere."""
    if device is None or device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _walk_parts(BH: int, E: int, L: int, device: torch.device | None = None) -> int:
    """Programs per (batch, head) for the sequential walks (the forward's pass 1 and the three-stage backward's stage
    1): ``TITANS_TRITON_WALK_PARTS`` (1, 2, 4 or 8; default 2), lowered until each program holds at least
    :data:`MIN_WALK_UNITS` hidden units and the walk has at most :data:`MAX_WALK_PROGRAMS` programs.  Depth 2 only.
    On an H200 at MAC's segment at batch 1 (1 x 8 heads x 512 tokens, hidden 128) two parts took the forward's walk
    from 0.242 to 0.165 ms and the backward's from 0.374 to 0.271 ms (benchmarks/RESULTS.md section 6, session 24).

    The P programs of a head wait for each other once per chunk, so they must all be resident at once: with at most
    32 programs a walk, the three memory layers' walks that the wavefront runs side by side hold at most 96 SMs
    waiting, and a partner not yet resident always finds an SM (any other kernel's programs finish without waiting);
    on a GPU with fewer SMs the bound is a quarter of its SMs (``device``).  At batch >= 4 (8 heads) a walk has >= 32
    heads and keeps one program each."""
    parts = int(switch_value("TITANS_TRITON_WALK_PARTS")) if L == 2 and not PARTS_FAILED else 1
    units = 16 if interpreting() else MIN_WALK_UNITS
    sms = _multiprocessors(device)
    most = MAX_WALK_PROGRAMS if sms is None else min(MAX_WALK_PROGRAMS, sms // 4)
    while parts > 1 and (E // parts < units or BH * parts > most):
        parts //= 2
    return parts


def walk_sync_mode() -> dict[str, int | bool]:
    """How the walks' parts meet at their all-reduce: the parts kernels' compile-time arguments FS (int32 elements
    from one flag to the next) and POLL_LOADS (spin on plain loads).

    ``TITANS_TRITON_WALK_POLL``: "loads" (default: every thread spins on ``ld.volatile`` of each flag, its own
    included, then one acquire load orders what follows) or "atomic" (Triton's acquire read of the flag, which one
    thread makes and hands to the others through shared memory and a barrier on every turn of the spin).
    ``TITANS_TRITON_WALK_FLAGS``: "lines" (default: each flag on a 128-byte line of its own) or "packed" (a
    walk's BH * P flags side by side, all 16 on one line at MAC's shape).  Measured on an H200 (benchmarks/RESULTS.md
    section 6, session 29): the backward walk's programs 193.6 / 262.8 us alone / three side by side with loads
    against 206.6 / 289.8 with the atomic polling (``memory_contention.py``); lines alone changed nothing there; MAC
    65536 x 1 279.3K tokens/s with lines + loads against 273.2K with packed + atomic (one machine).  Session 30: the
    programs spend 26 / 35 us of 179 / 246 in their all-reduces (alone / three side by side), and waiting on the
    partners' flags only (not also on its own) trained at 280.7K against 280.3K: not kept."""
    flags, poll = switch_value("TITANS_TRITON_WALK_FLAGS"), switch_value("TITANS_TRITON_WALK_POLL")
    return {"FS": 32 if flags == "lines" else 1, "POLL_LOADS": poll == "loads"}


def _walk_sync(like: Tensor, BH: int, P: int, C: int, D: int, stride: int) -> tuple[Tensor, Tensor]:
    """The all-reduce's slots (BH, 2, P, C, D) float32 and its flags (BH * P flags, ``stride`` int32 elements apart)
    int32, zero, for one parts launch."""
    return (like.new_empty(BH, 2, P, C, D, dtype=torch.float32),
            torch.zeros(BH * P * stride, dtype=torch.int32, device=like.device))


# the smallest part count that takes the walks over parts (tests set 1: the GPU kernels, all-reduce and flags
# included, then run under the interpreter with one program a head, where no partner has to be waited for)
PARTS_KERNELS_FROM = 2


# With TITANS_TRITON_WALK_CLOCK=1 (a diagnostic, GPU only) every walk over parts stamps, per program, the GPU clock
# at its start, after its first all-reduce (when every partner has started) and at its end, its SM and the ns it
# spent in all-reduces (its tile stored, its flag published, the partners' awaited, the slots read): one
# (kind, P, stamps (BH * P, 5) int64 at row bh * P + part) entry a launch, kind "forward" or "backward".  Under a
# CUDA graph the entry made at capture is rewritten by every replay; benchmarks/harness.py's walk_clock_stats reads
# them.  Entries accumulate for the life of the process (640 bytes of GPU memory a launch at MAC's shape): a switch
# for benchmark runs, not for training.
WALK_CLOCKS: list[tuple[str, int, Tensor]] = []


def walk_clock_on() -> bool:
    """Whether ``TITANS_TRITON_WALK_CLOCK`` ("0" or "1", "0" when unset) asks the walks to stamp their programs."""
    return switch_on("TITANS_TRITON_WALK_CLOCK")


def walk_clocks_reset() -> None:
    """Zero every stamp taken so far (kept, not dropped: a CUDA graph's replays write into the entries of its
    capture), so that the stamps a later replay or call writes are the only ones left."""
    for _, _, stamps in WALK_CLOCKS:
        stamps.zero_()


def _run_walk(kernel, lockstep, BH: int, P: int, args, meta: dict, like: Tensor) -> None:
    """A walk spread over P programs a head: grid (P, BH), or under the interpreter (P > 1) the lockstep twin, grid
    (BH,).  ``args``: the kernel's arguments up to its all-reduce's slots and flags, which are made here (on
    ``like``'s device, laid out as :func:`walk_sync_mode` says, read once for both); the GPU kernel also takes the
    walk clock's stamps (or the flags again, unused, with the clock off).

    The part is the grid's first axis so that a head's P programs are neighbours in launch order (the GPU hands out
    a grid's programs in linear order): a program waits only for partners launched right after it, and at most one
    head per walk can be cut at the edge of what is resident, whatever else runs beside it."""
    sync = walk_sync_mode()
    slots, flags = _walk_sync(like, BH, P, meta["C"], meta["D"], sync["FS"])
    if interpreting() and P > 1:
        _run(lockstep, (BH,), (*args, slots, flags), meta)
        return
    stamps = None
    if walk_clock_on() and not interpreting():  # the clock is PTX: the interpreter has none
        stamps = torch.zeros(BH * P, 5, dtype=torch.int64, device=like.device)
        WALK_CLOCKS.append(("forward" if kernel is _memory_walk_parts_kernel else "backward", P, stamps))
    _run(kernel, (P, BH), (*args, slots, flags, flags if stamps is None else stamps),
         dict(meta, CLOCK=stamps is not None, **sync))


PARTS_FAILED: list[str] = []  # why the walks over parts were given up in this process (then one program a head)


def _parts_or(launch, fallback) -> None:
    """``launch()`` (a walk over parts), or - if Triton cannot compile or fit it here (``TritonError``: say, shared
    memory or registers on another GPU) - the one-program walk ``fallback()`` for this and every later call, with a
    warning.  Such errors come before the kernel runs, so nothing was written."""
    if not PARTS_FAILED:
        try:
            launch()
            return
        except _CompileError as e:
            import warnings

            PARTS_FAILED.append(f"{type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"Triton memory walks over parts failed ({PARTS_FAILED[-1]}); one program a head from now on",
                          RuntimeWarning, stacklevel=3)
    fallback()


def _walk_forward_parts(BH: int, N: int, P: int, fwd_args: tuple, kw: dict, inner: bool) -> None:
    """The forward's walk (pass 1) over P programs a head, from ``_memory_fwd_kernel``'s arguments (``fwd_args``:
    q, k, v, 8 coefficients, initial state, final state, y, starts, inner scratch)."""
    a = fwd_args
    meta = dict({key: val for key, val in kw.items() if key != "L"}, P=P, INNER=inner)
    args = (a[1], a[2], *a[6:11], *a[11:19], *a[20:28])
    _parts_or(lambda: _run_walk(_memory_walk_parts_kernel, _memory_walk_parts_lockstep_kernel, BH, P, args, meta,
                                a[0]),
              lambda: _run(_memory_fwd_kernel, (BH,), fwd_args, dict(kw, MODE=1, SAVE=True, INNER=inner)))


def _walk_backward_parts(BH: int, N: int, P: int, stage_args: tuple, kw: dict) -> None:
    """The three-stage backward's walk (stage 1, reading the scratch) over P programs a head, from
    ``_memory_bwd3_kernel``'s arguments."""
    a = stage_args
    meta = {key: val for key, val in kw.items() if key not in ("RESIDUAL", "INNER", "RECOMPUTE", "ACCUMULATE")}
    args = (a[1], *a[6:11], a[12], *a[16:32], a[32], a[33], a[37])
    _parts_or(lambda: _run_walk(_memory_walk_bwd_parts_kernel, _memory_walk_bwd_parts_lockstep_kernel, BH, P, args,
                                dict(meta, P=P), a[0]),
              lambda: _run(_memory_bwd3_kernel, (BH,), stage_args, dict(kw, STAGE=1)))


def _inner_buffers(like: Tensor, BH: int, N: int, C: int, D: int, E: int) -> list[Tensor]:
    """Fresh float32 buffers for :func:`~titans.core.memory.fused_update.stack_inner`'s z, u, dl (BH, N, C, E) and
    err (BH, N, C, D)."""
    return [like.new_empty(BH, N, C, E, dtype=torch.float32) for _ in range(3)] + [
        like.new_empty(BH, N, C, D, dtype=torch.float32)]


def _state_buffers(like: Tensor, BH: int, N: int, state: list[Tensor], L: int,
                   dtype: torch.dtype | None = None) -> list[Tensor]:
    """Per-chunk buffers shaped like ``state`` (W1, W2, S1, S2) for N chunks (layer 2: placeholders if L == 1),
    in ``like``'s dtype unless ``dtype`` is given."""
    dtype = dtype or like.dtype
    return [like.new_empty(BH, N, *w.shape[1:], dtype=dtype) if (L == 2 or i in (0, 2)) else
            like.new_empty(1, dtype=dtype) for i, w in enumerate(state)]


def _flat(t: Tensor) -> Tensor:
    """(B, H, ...) -> contiguous float32 (B*H, ...)."""
    return t.reshape(-1, *t.shape[2:]).float().contiguous()


def _rows(t: Tensor) -> Tensor:
    """(B, H, ...) -> contiguous (B*H, ...) in t's own dtype: q, k, v and dy, which the kernels widen as they load
    them (a host-side float32 copy was one more launch each)."""
    return t.reshape(-1, *t.shape[2:]).contiguous()


def _dy_layout(dy: Tensor) -> tuple[Tensor, int, int, int, int]:
    """dy (B, H, T, D) as the backward kernels read it (:func:`_dy_chunk`): the tensor itself, its heads and its
    batch, head and token strides; copied only when its rows are not dense (a last stride other than 1)."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return (dy, dy.shape[1], *dy.stride()[:3])


# the dy arguments of a backward launch that reads no dy (the walk's stages 1 and 2)
_NO_DY = (1, 0, 0, 0)


def _state4(W, S) -> list[Tensor]:
    """A state (or state gradient) as the kernels' four contiguous float32 buffers W1, W2, S1, S2 (B*H, ...),
    read-only to the kernels (views where the state already is float32 and contiguous, no copy); layer 2 repeats
    layer 1 as a placeholder when L == 1."""
    Ws = [_flat(w) for w in W]
    Ss = [_flat(x) for x in S]
    return [Ws[0], Ws[-1], Ss[0], Ss[-1]]


def _states_like(buffers: list[Tensor], like) -> tuple[Tensor, ...]:
    """Kernel state buffers (B*H, ...) back to the shapes and dtypes of ``like`` (the state / its gradient passed
    in), one per tensor of ``like``."""
    return tuple(w.reshape(t.shape).to(t.dtype) for w, t in zip(buffers, like))


def _outputs4(state: list[Tensor], L: int) -> list[Tensor]:
    """Fresh buffers for the four the kernels write (the final state, or the initial state's gradient), shaped like
    ``state``'s (:func:`_state4`); with L == 1 the layer-2 placeholders alias layer 1's (never written)."""
    w1, s1 = torch.empty_like(state[0]), torch.empty_like(state[2])
    return [w1, torch.empty_like(state[1]) if L == 2 else w1, s1, torch.empty_like(state[3]) if L == 2 else s1]


# ----------------------------------------------------------------------------- launching (autotuned on request)
# Every tile spans a whole head dim / hidden / chunk, so what is left to tune per shape and pass is the number of
# warps (registers per thread: the backward's tiles spill at 8) and of pipeline stages.  The arguments a kernel
# updates in place are restored between trials.
TUNE_CONFIGS = [(4, 1), (8, 1), (16, 1), (8, 2)]  # (num_warps, num_stages); each one compiles once per shape
# (the state and its gradient come in and go out in separate buffers: a trial rerun reads the same inputs; the
# three-stage backward's stage 2 adds to stage 0's dk / dv, and the one-launch version counts tickets and flags)
_IN_PLACE = {"_memory_fwd_kernel": [], "_memory_bwd_kernel": [], "_memory_bwd3_kernel": ["DK", "DV"],
             "_memory_bwd3_overlap_kernel": ["DK", "DV", "TICKET", "FLAGS"], "_memory_walk_parts_kernel": ["F"],
             "_memory_walk_bwd_parts_kernel": ["F"], "_memory_walk_parts_lockstep_kernel": [],
             "_memory_walk_bwd_parts_lockstep_kernel": []}
_TUNED: dict = {}
AUTOTUNE_FAILED: list[str] = []  # why the tuned launch was given up (then every launch takes the fixed warps)


def _autotune() -> bool:
    """Launch through Triton's autotuner when ``TITANS_TRITON_AUTOTUNE=1`` (opt-in: see the module docstring),
    except under the interpreter (no device timer: one fixed configuration) or after a tuned launch failed in this
    process."""
    return switch_on("TITANS_TRITON_AUTOTUNE") and not interpreting() and not AUTOTUNE_FAILED


def _tuned(kernel, key: list[str]):
    """``kernel`` wrapped in ``triton.autotune`` over :data:`TUNE_CONFIGS`, tuned per value of ``key`` (the
    launch's compile-time arguments: shape, depth, pass), built once per kernel."""
    name = kernel_name(kernel)
    if name not in _TUNED:
        configs = [triton.Config({}, num_warps=w, num_stages=st) for w, st in TUNE_CONFIGS]
        _TUNED[name] = triton.autotune(configs=configs, key=key, restore_value=_IN_PLACE[name])(kernel)
    return _TUNED[name]


def tuning_report() -> dict:
    """What the autotuner chose so far: ``{"failed": [...], kernel: {tuning key: "num_warps=.. num_stages=.."}}``
    (the harness writes it into its JSON)."""
    report: dict = {"failed": list(AUTOTUNE_FAILED)}
    for name, tuner in _TUNED.items():
        cache = getattr(tuner, "cache", {}) or {}
        report[name] = {str(key): f"num_warps={cfg.num_warps} num_stages={cfg.num_stages}"
                        for key, cfg in cache.items()}
    return report


def _run(kernel, grid: tuple[int, ...], args, meta: dict) -> None:
    """One launch: tuned when :func:`_autotune` allows (its first call for a key benchmarks every configuration;
    the training step's warm-up does that before any CUDA-graph capture), else with ``meta["num_warps"]``.  A tuned
    launch that raises (say, an autotuner API this Triton lacks) is given up for the process, with a warning, and
    the launch repeated with the fixed configuration: the tuner fails before the kernel runs, so in-place
    arguments are untouched."""
    if _autotune():
        consts = {k: v for k, v in meta.items() if k != "num_warps"}
        try:
            _tuned(kernel, sorted(consts))[grid](*args, **consts)
            return
        except Exception as e:  # noqa: BLE001
            import warnings

            AUTOTUNE_FAILED.append(f"{type(e).__name__}: {str(e)[:200]}")
            warnings.warn(f"Triton autotuning of the memory kernels failed ({AUTOTUNE_FAILED[-1]}); launching with "
                          "fixed warps from now on", RuntimeWarning, stacklevel=3)
    kernel[grid](*args, **dict(meta, num_warps=pass_warps(kernel, meta)))


def _launch(kernel, BH: int, N: int, args, kw, **fixed) -> None:
    """The two-pass kernels (MODE 1 sequential per (b, h), then MODE 2 per (b, h, chunk)) or the single pass."""
    if _split() and N > 1:
        _run(kernel, (BH,), args, dict(kw, MODE=1, **fixed))
        _run(kernel, (BH, N), args, dict(kw, MODE=2, **fixed))
    else:
        _run(kernel, (BH,), args, dict(kw, MODE=0, **fixed))


def overlap_launch(BH: int, N: int, args) -> tuple[tuple[int], tuple]:
    """Grid and arguments of ``_memory_bwd3_overlap_kernel`` for the three-stage backward's ``args``: one program
    per stage-0 chunk, walk and stage-2 chunk, and the zeroed ticket counter and hand-on flags it needs."""
    device = args[0].device
    sync = (torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(2 * BH * N, dtype=torch.int32, device=device))
    return (BH * (2 * N + 1),), (*args, *sync)


def _launch_stages(BH: int, N: int, E: int, args, kw, overlap: bool, parts: int = 1) -> None:
    """The three-stage backward: dy share (parallel), state-gradient recurrence (sequential; over ``parts``
    programs a head, :func:`_walk_parts`), dWn share; three launches, or one (``overlap``) whose programs hand
    chunks on through flags.  ``E``: the memory's hidden size (stages 0 and 2 may take it a block at a time,
    :func:`stage_block`)."""
    if overlap:
        _run(_memory_bwd3_overlap_kernel, *overlap_launch(BH, N, args),
             dict(kw, EB=stage_block(2, E, one_launch=True)))
        return
    _run(_memory_bwd3_kernel, (BH, N), args, _stage0_kw(kw, E))
    if parts >= PARTS_KERNELS_FROM:
        _walk_backward_parts(BH, N, parts, args, kw)
    else:
        _run(_memory_bwd3_kernel, (BH,), args, dict(kw, STAGE=1))
    _run(_memory_bwd3_kernel, (BH, N), args, dict(kw, STAGE=2, EB=stage_block(2, E)))


STAGE2_AUTO_BLOCK = 32


def _stage0_kw(kw: dict, E: int) -> dict:
    """Stage 0's launch keywords wherever it runs as a launch of its own (the one-node core's three launches, the
    split core's read-out backward): its hidden-unit block (:func:`stage_block`; its warps: :func:`narrow_warps`)."""
    return dict(kw, STAGE=0, EB=stage_block(0, E))


def stage_block(stage: int, E: int, reads_inner: bool = True, one_launch: bool = False) -> int:
    """Hidden units stage 0 or 2 of the three-stage backward takes at a time (``TITANS_TRITON_STAGE0_BLOCK`` /
    ``TITANS_TRITON_STAGE2_BLOCK``; 0: all of them at once, :func:`_bwd3_stage`) where the block divides the hidden
    size into at least two, and for stage 2 where it reads the chunk's inner forward from the scratch (stage 0 or
    the forward's walk stored it; ``reads_inner``); 0 elsewhere.  A block is at least 16 (the smallest matmul tile).

    Stage 2 takes ``STAGE2_AUTO_BLOCK`` units by default (``auto``): cross-compiled for sm_90a its spills fall from
    2,000 bytes a thread to none, and MAC 65536 x 1 through the wavefront (the walk op's stage 2) trained 296.5K vs
    283.3K tokens/s on one H100 and 299.4K / 299.0K vs 285.5K / 285.2K on another (+4.8%; benchmarks/RESULTS.md
    section 6, session 44).  Stage 0 stays whole by default: by blocks of 32 it still spills (1.3 KB a thread) and
    was slower (290.3K with both stages blocked).  By 64 units either stage needs more shared memory than an H100
    has at hidden 128 (the launch fails and the shape falls back to PyTorch, with a warning).

    ``one_launch``: stage 2 inside the one-launch backward (``_memory_bwd3_overlap_kernel``, batch >= 3, so MAC 4096
    x 8), which takes a block only when the switch names one (``auto`` keeps whole tiles there: not timed yet)."""
    name = {0: "TITANS_TRITON_STAGE0_BLOCK", 2: "TITANS_TRITON_STAGE2_BLOCK"}[stage]
    value = switch_value(name) or "0"
    if value == "auto" and one_launch:
        return 0
    block = STAGE2_AUTO_BLOCK if value == "auto" else int(value)
    return block if (reads_inner or stage == 0) and 16 <= block < E and E % block == 0 else 0


def _common(q, W, chunk_size, residual, coefs):
    """Shapes, flattened coefficients and the kernels' compile-time keywords shared by both directions."""
    B, H, T, D = q.shape
    E = W[0].shape[-1]
    N = T // chunk_size
    kw = dict(N=N, C=chunk_size, D=D, E=E, L=len(W), RESIDUAL=residual, DOT_BF16=_dot_bf16(q),
              num_warps=_num_warps(D, E))
    return B, H, T, D, N, [_flat(t) for t in coefs], kw


def core_forward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, *, chunk_size, activation, residual,
                 save_states: bool):
    """Fused forward of the memory core (two launches, or one with ``TITANS_TRITON_SPLIT=0``, for the whole
    sequence).

    Arguments as :func:`titans.core.memory.fused_update.core_forward_torch`.  Returns ``(y, W, S, starts)``
    with ``starts`` a tuple of the chunk-start state tensors (B*H, N, ...), followed by the chunks' inner forward
    (:func:`_save_inner`), or None.
    """
    if triton is None:
        raise RuntimeError(f"Triton is not available: {_TRITON_ERROR}")
    L = len(W)
    B, H, T, D, N, coef, kw = _common(q, W, chunk_size, residual, (G, Bc, M, Ml, m, Gl, Bl, Pl))
    qf = _rows(q)
    initial = _state4(W, S)
    state = _outputs4(initial, L)
    y = torch.empty(qf.shape, dtype=initial[0].dtype, device=qf.device)
    # the two-pass forward always keeps the chunk starts: its second pass reads them
    keep = save_states or (_split() and N > 1)
    starts = (_state_buffers(y, B * H, N, state, L, _starts_dtype(kw["DOT_BF16"])) if keep else
              [y.new_empty(1)] * 4)
    inner = save_states and _save_inner(L, N)
    scratch = _inner_buffers(y, B * H, N, chunk_size, D, W[0].shape[-1]) if inner else [y.new_empty(1)] * 4
    args = (qf, _rows(k), _rows(v), *coef, *initial, *state, y, *starts, *scratch)
    parts = _walk_parts(B * H, W[0].shape[-1], L, q.device) if _split() and N > 1 else 1
    if parts >= PARTS_KERNELS_FROM:  # pass 1 over P programs a head, then pass 2 as usual
        _walk_forward_parts(B * H, N, parts, args, kw, inner)
        _run(_memory_fwd_kernel, (B * H, N), args, dict(kw, MODE=2, SAVE=keep, INNER=inner))
    else:
        _launch(_memory_fwd_kernel, B * H, N, args, kw, SAVE=keep, INNER=inner)
    # outputs in the state's dtype: q / k / v may be narrower (bf16 under autocast; widened on load)
    Wout, Sout = _states_like(state[:2], W), _states_like(state[2:], S)
    return (y.reshape(B, H, T, D).to(W[0].dtype), Wout, Sout,
            (tuple(starts) + (tuple(scratch) if inner else ()) if save_states else None))


def core_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, dW, dS, *, chunk_size, activation, residual):
    """Fused backward of the memory core; returns ``(grads, dW, dS)`` like
    :func:`titans.core.memory.fused_update.core_backward_torch`, with q, k and v's gradients in float32.
    ``starts``: the forward's (four buffers, then the chunks' inner forward if it saved it)."""
    L = len(dW)
    like = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    B, H, T, D, N, coef, kw = _common(q, dW, chunk_size, residual, like[3:])
    qf = _rows(q)
    dfinal = _state4(dW, dS)
    dstate = _outputs4(dfinal, L)
    outs = [torch.empty(qf.shape, dtype=dfinal[0].dtype, device=qf.device) for _ in range(3)]
    outs += [torch.empty_like(t) for t in coef]
    # the saved starts come back from autograd (or a compiled graph) as they were stored; the kernel indexes
    # them as dense buffers, so make sure they are
    starts, inner = [t.contiguous() for t in starts[:4]], starts[4:]
    dy, *dy_args = _dy_layout(dy)
    mode = backward_mode()
    three_stage = L == 2 and N > 1 and mode != "fused"
    # the gradient of each chunk's end state, written by the walking pass for the parallel one
    wide = outs[0]  # a float32 tensor on the device: the buffers below are float32 like it
    ends = (_state_buffers(wide, B * H, N, dstate, L) if (three_stage or _split() and N > 1) else
            [wide.new_empty(1)] * 4)
    if three_stage:
        shares = _state_buffers(wide, B * H, N, dstate, L)  # X1, X2, XS1, XS2: the dy share per chunk
        # ZS, US, LS, HS, QS (B*H, N, C, E) and ES (B*H, N, C, D); with the forward's inner forward, its z, u, dl and
        # err stand in for the first three and the last (read only)
        fresh = [wide.new_empty(B * H, N, chunk_size, dW[0].shape[-1]) for _ in range(2 if inner else 5)]
        scratch = ([*inner[:3], *fresh, inner[3]] if inner else
                   [*fresh, wide.new_empty(B * H, N, chunk_size, D)])
        args = (qf, _rows(k), _rows(v), *coef, *starts, dy, *dfinal, *dstate, *ends, *shares, *scratch, *outs,
                *dy_args)
        parts = _walk_parts(B * H, dW[0].shape[-1], L, q.device)
        _launch_stages(B * H, N, starts[0].shape[-1], args, _stage_kw(kw, INNER=bool(inner)), _overlapped(mode, parts),
                       parts)
    else:
        _launch(_memory_bwd_kernel, B * H, N,
                (qf, _rows(k), _rows(v), *coef, *starts, dy, *dfinal, *dstate, *ends, *outs, *dy_args), kw)
    # q, k and v's gradients stay float32: the caller casts them in its (compiled) graph, where the cast joins the
    # next kernel instead of being three eager launches here
    res = {n: o.reshape(t.shape) if n in ("q", "k", "v") else o.reshape(t.shape).to(t.dtype)
           for n, o, t in zip(CORE_INPUTS, outs, like)}
    dWo, dSo = _states_like(dstate[:2], dW), _states_like(dstate[2:], dS)
    return res, dWo, dSo


# ----------------------------------------------------------------------------- the core split in two
# (``fused_update.MemoryWalkFunction`` / ``MemoryReadoutFunction``, depth 2): the forward's two passes as two ops,
# and the three-stage backward's stage 0 (the read-out's share) apart from stages 1 and 2 (the walk's), which then
# compute the chunk's inner forward themselves (RECOMPUTE) and store their dk / dv share alone (ACCUMULATE off).
# The chunk starts stay float32 here: their gradient is the read-out's share, carried in their dtype.


def _stage_kw(kw: dict, **extra) -> dict:
    """The three-stage backward's compile-time keywords: :func:`_common`'s without the depth (always 2 there)."""
    return dict({key: val for key, val in kw.items() if key != "L"}, **extra)


def _split_args(q, starts, chunk_size, residual, coefs):
    """:func:`_common` for the split ops (the hidden size and depth read from the starts) and a placeholder for
    the pointers a launch does not touch."""
    B, H, T, D, N, coef, kw = _common(q, starts[:2], chunk_size, residual, coefs)
    return B, H, T, D, N, coef, kw, coef[0].new_empty(1)


def core_walk(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, *, chunk_size, activation, residual):
    """The forward's walking pass alone: ``(W, S, starts, inner)``, the final state, each chunk's start state (four
    float32 (B*H, N, ...) buffers) and, if :func:`_save_inner`, each chunk's inner forward (else empty)."""
    L = len(W)
    B, H, T, D, N, coef, kw = _common(q, W, chunk_size, residual, (G, Bc, M, Ml, m, Gl, Bl, Pl))
    initial = _state4(W, S)
    state = _outputs4(initial, L)
    starts = _state_buffers(state[0], B * H, N, state, L, torch.float32)
    save = _save_inner(L, N, walk_alone=True)
    scratch = _inner_buffers(state[0], B * H, N, chunk_size, D, W[0].shape[-1]) if save else [state[0].new_empty(1)] * 4
    args = (_rows(q), _rows(k), _rows(v), *coef, *initial, *state, state[0].new_empty(1), *starts, *scratch)
    parts = _walk_parts(B * H, W[0].shape[-1], L, q.device)
    if parts >= PARTS_KERNELS_FROM:
        _walk_forward_parts(B * H, N, parts, args, kw, save)
    else:
        _run(_memory_fwd_kernel, (B * H,), args, dict(kw, MODE=1, SAVE=True, INNER=save))
    Wout, Sout = _states_like(state[:2], W), _states_like(state[2:], S)
    return Wout, Sout, starts, (scratch if save else [])


def core_readout(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, *, chunk_size, activation, residual):
    """The forward's per-chunk pass alone: y (B, H, T, d) float32 from the chunk starts of :func:`core_walk`."""
    B, H, T, D, N, coef, kw, _ = _split_args(q, starts, chunk_size, residual, (G, Bc, M, Ml, m, Gl, Bl, Pl))
    y = torch.empty(B * H, T, D, dtype=torch.float32, device=q.device)
    starts = starts[:4]  # (the walk's inner forward, if handed on, is for the backward)
    # the state pointers of pass 2 are never read or written there (the starts stand in for them)
    _run(_memory_fwd_kernel, (B * H, N), (_rows(q), _rows(k), _rows(v), *coef, *starts, *starts, y, *starts,
                                          *starts), dict(kw, MODE=2, SAVE=True))
    return y.reshape(B, H, T, D)


def core_readout_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, *, chunk_size, activation, residual):
    """Stage 0 alone: ``(grads of q, k, v, G, Bc, M, shares)`` with ``shares`` the gradient of each chunk's start
    state through y (four buffers shaped like ``starts``).  ``starts``: :func:`core_walk`'s four, then, if it
    saved it and hands it on (``TITANS_TRITON_READOUT_INNER``), its inner forward ``(z, u, dl, err)``, which stage 0
    then reads instead of computing it (the same values: the walk computed them from the same keys, values and
    start states)."""
    like = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    starts, inner = starts[:4], starts[4:]
    B, H, T, D, N, coef, kw, none = _split_args(q, starts, chunk_size, residual, like[3:])
    E = starts[0].shape[-1]
    wide = [torch.empty(B * H, T, D, dtype=torch.float32, device=q.device) for _ in range(3)]  # dq, dk, dv
    dcoef = [torch.empty_like(t) for t in coef[:3]]  # dG, dBc, dM
    shares = [torch.empty_like(t) for t in starts]
    # a chunk's scratch: dh and silu'(zq) (C, E); z, u, dl (C, E) and err (C, d) the walk's if handed on (read
    # only), else fresh (stage 0 computes them there)
    hs, qs = (wide[0].new_empty(B * H, N, chunk_size, E) for _ in range(2))
    zs, us, ls, es = inner or _inner_buffers(wide[0], B * H, N, chunk_size, D, E)
    dy, *dy_args = _dy_layout(dy)
    args = (_rows(q), _rows(k), _rows(v), *coef, *starts, dy, *[none] * 12, *shares, zs, us, ls, hs, qs, es, *wide,
            *dcoef, *[none] * 5, *dy_args)
    _run(_memory_bwd3_kernel, (B * H, N), args, _stage0_kw(_stage_kw(kw, INNER=bool(inner)), E))
    grads = [g.reshape(t.shape).to(t.dtype) for g, t in zip(wide, like[:3])] + [g.reshape(t.shape) for g, t in
                                                                                  zip(dcoef, like[3:6])]
    return grads, shares


def core_walk_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, shares, dW, dS, *, chunk_size, activation,
                       residual):
    """Stages 1 and 2 alone, the read-out's ``shares`` added to each chunk's start-state gradient: ``(grads of k,
    v, Ml, m, Gl, Bl, Pl, dW, dS)`` with dW / dS those of the initial state.  ``starts``: :func:`core_walk`'s four,
    then its inner forward if it saved it (else the stages recompute it)."""
    like = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    starts, inner = starts[:4], starts[4:]
    B, H, T, D, N, coef, kw, none = _split_args(q, starts, chunk_size, residual, like[3:])
    E = starts[0].shape[-1]
    dfinal = _state4(dW, dS)
    dstate = _outputs4(dfinal, 2)
    ends = _state_buffers(dstate[0], B * H, N, dstate, 2)
    wide = [torch.empty(B * H, T, D, dtype=torch.float32, device=q.device) for _ in range(2)]  # dk, dv
    dcoef = [torch.empty_like(t) for t in coef[3:]]  # dMl, dm, dGl, dBl, dPl
    zs, us, ls, es = inner or _inner_buffers(wide[0], B * H, N, chunk_size, D, E)
    args = (_rows(q), _rows(k), _rows(v), *coef, *starts, none, *dfinal, *dstate, *ends,
            *[t.contiguous() for t in shares], zs, us, ls, none, none, es, none, *wide, none, none, none, *dcoef,
            *_NO_DY)
    kw = _stage_kw(kw, RECOMPUTE=not inner, ACCUMULATE=False, INNER=bool(inner))
    # the walks over parts read the inner forward (never recompute it)
    parts = _walk_parts(B * H, E, 2, q.device) if inner else 1
    if parts >= PARTS_KERNELS_FROM:
        _walk_backward_parts(B * H, N, parts, args, kw)
    else:
        _run(_memory_bwd3_kernel, (B * H,), args, dict(kw, STAGE=1))
    _run(_memory_bwd3_kernel, (B * H, N), args, dict(kw, STAGE=2, EB=stage_block(2, E, reads_inner=bool(inner))))
    grads = [g.reshape(t.shape).to(t.dtype) for g, t in zip(wide, like[1:3])] + [g.reshape(t.shape) for g, t in
                                                                                   zip(dcoef, like[6:])]
    dWo, dSo = _states_like(dstate[:2], dW), _states_like(dstate[2:], dS)
    return grads, dWo, dSo


# ----------------------------------------------------------------------------- custom ops
# The kernels enter autograd (and torch.compile, which sees each direction as one opaque op with a shape
# function instead of tracing into the launch code) as torch.library custom ops.  A kernel that does not
# compile on this machine (shared memory, say) falls back inside the op to the PyTorch loop of the same
# equations, converting the saved chunk-start states between the two layouts.


def _forward_fallback(error: Exception, core, W, S, chunk_size: int, activation: str, residual: bool, save: bool):
    """A forward kernel that cannot compile here (recorded, see :func:`kernel_failed`): the same math by the torch
    loop, ``(y, W, S, per-chunk starts)``."""
    kernel_failed(core[0], W, chunk_size, error)
    wide = tuple(t.to(W[0].dtype) for t in core[:3]) + tuple(core[3:])
    with torch.no_grad():
        return core_forward_torch(*wide, W, S, chunk_size=chunk_size, activation=activation, residual=residual,
                                  save_states=save)


def _fresh(t: Tensor) -> Tensor:
    """A contiguous tensor shaped like ``t`` (the ops' outputs are contiguous whatever the inputs' strides)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("titans::memory_core_forward", mutates_args=())
def memory_core_forward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor, m: Tensor,
                        Gl: Tensor, Bl: Tensor, Pl: Tensor, W: list[Tensor], S: list[Tensor], chunk_size: int,
                        activation: str, residual: bool, save_states: bool) -> list[Tensor]:
    """``[y, *W, *S, *starts]`` (starts: four buffers and the inner forward of :func:`_save_inner`, only with
    ``save_states``) of :func:`core_forward`."""
    W, S = tuple(W), tuple(S)
    try:
        y, Wn, Sn, starts = core_forward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, chunk_size=chunk_size,
                                         activation=activation, residual=residual, save_states=save_states)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile here: the same math in torch
        y, Wn, Sn, st = _forward_fallback(e, (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl), W, S, chunk_size, activation,
                                          residual, save_states)
        starts = stack_starts(st, len(W), _starts_dtype(_dot_bf16(q))) if save_states else None
        if save_states and _save_inner(len(W), q.shape[2] // chunk_size):  # what the fake promised
            starts += stack_inner(k, v, starts, chunk_size, activation, residual)
    return [t.contiguous() for t in (y, *Wn, *Sn, *(starts or ()))]


@memory_core_forward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, chunk_size, activation, residual, save_states):
    outs = [q.new_empty(q.shape, dtype=W[0].dtype)] + [_fresh(t) for t in (*W, *S)]
    if save_states:
        BH, N = q.shape[0] * q.shape[1], q.shape[2] // chunk_size
        sdt = _starts_dtype(_dot_bf16(q))
        first = q.new_empty(BH, N, *W[0].shape[2:], dtype=sdt)
        second = q.new_empty(BH, N, *W[-1].shape[2:], dtype=sdt) if len(W) == 2 else q.new_empty(1, dtype=sdt)
        outs += [first, second, _fresh(first), _fresh(second)]
        if _save_inner(len(W), N):
            outs += _inner_buffers(q, BH, N, chunk_size, q.shape[-1], W[0].shape[-1])
    return outs


@torch.library.custom_op("titans::memory_core_backward", mutates_args=())
def memory_core_backward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor,
                         m: Tensor, Gl: Tensor, Bl: Tensor, Pl: Tensor, starts: list[Tensor], dy: Tensor,
                         dW: list[Tensor], dS: list[Tensor], chunk_size: int, activation: str,
                         residual: bool) -> list[Tensor]:
    """Gradients ``[dq, dk, dv, dG, dBc, dM, dMl, dm, dGl, dBl, dPl, *dW, *dS]`` of :func:`core_backward` (dq, dk,
    dv in float32 whatever q, k and v's dtype: the caller casts them)."""
    core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    dW, dS = tuple(dW), tuple(dS)
    try:
        res, dWo, dSo = core_backward(*core, starts, dy, dW, dS, chunk_size=chunk_size,
                                      activation=activation, residual=residual)
    except Exception as e:  # noqa: BLE001 - the backward kernel cannot compile here: torch loop
        kernel_failed(q, dW, chunk_size, e)
        B, H = q.shape[:2]
        wide = tuple(t.to(dW[0].dtype) for t in core[:3]) + core[3:]
        with torch.no_grad():
            res, dWo, dSo = core_backward_torch(*wide, unstack_starts(starts[:4], B, H, len(dW), torch.float32), dy, dW,
                                                dS,
                                                chunk_size=chunk_size, activation=activation, residual=residual)
        for name in ("q", "k", "v"):
            res[name] = res[name].float()
    return [res[n].contiguous() for n in CORE_INPUTS] + [t.contiguous() for t in (*dWo, *dSo)]


@memory_core_backward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, dW, dS, chunk_size, activation, residual):
    return ([q.new_empty(t.shape, dtype=torch.float32) for t in (q, k, v)] +
            [_fresh(t) for t in (G, Bc, M, Ml, m, Gl, Bl, Pl, *dW, *dS)])


@torch.library.custom_op("titans::memory_walk_forward", mutates_args=())
def memory_walk_forward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor, m: Tensor,
                        Gl: Tensor, Bl: Tensor, Pl: Tensor, W: list[Tensor], S: list[Tensor], chunk_size: int,
                        activation: str, residual: bool) -> list[Tensor]:
    """``[*W, *S, *starts, *inner]`` of :func:`core_walk` (the starts: four float32 buffers; the inner forward: four
    more if :func:`_save_inner`, else none)."""
    W, S = tuple(W), tuple(S)
    try:
        Wn, Sn, starts, inner = core_walk(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, chunk_size=chunk_size,
                                          activation=activation, residual=residual)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile here: the same math in torch
        _, Wn, Sn, st = _forward_fallback(e, (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl), W, S, chunk_size, activation,
                                          residual, True)
        starts = stack_starts(st, len(W), torch.float32)
        inner = (stack_inner(k, v, starts, chunk_size, activation, residual)
                 if _save_inner(len(W), q.shape[2] // chunk_size, walk_alone=True) else [])
    return [t.contiguous() for t in (*Wn, *Sn, *starts, *inner)]


@memory_walk_forward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, chunk_size, activation, residual):
    BH, N = q.shape[0] * q.shape[1], q.shape[2] // chunk_size
    starts = [q.new_empty(BH, N, *t.shape[2:], dtype=torch.float32) for t in (W[0], W[-1], S[0], S[-1])]
    save = _save_inner(len(W), N, walk_alone=True)
    inner = _inner_buffers(q, BH, N, chunk_size, q.shape[-1], W[0].shape[-1]) if save else []
    return [_fresh(t) for t in (*W, *S)] + starts + inner


@torch.library.custom_op("titans::memory_readout_forward", mutates_args=())
def memory_readout_forward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor, m: Tensor,
                           Gl: Tensor, Bl: Tensor, Pl: Tensor, starts: list[Tensor], chunk_size: int, activation: str,
                           residual: bool) -> Tensor:
    """y (B, H, T, d) float32 of :func:`core_readout`."""
    core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    try:
        y = core_readout(*core, starts, chunk_size=chunk_size, activation=activation, residual=residual)
    except Exception as e:  # noqa: BLE001
        kernel_failed(q, starts[:2], chunk_size, e)
        with torch.no_grad():
            y = core_readout_torch(*(t.float() for t in core[:3]), *core[3:],
                                   unstack_starts(starts[:4], q.shape[0], q.shape[1], 2), chunk_size=chunk_size,
                                   activation=activation, residual=residual)
    return y.contiguous()


@memory_readout_forward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, chunk_size, activation, residual):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("titans::memory_readout_backward", mutates_args=())
def memory_readout_backward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor,
                            m: Tensor, Gl: Tensor, Bl: Tensor, Pl: Tensor, starts: list[Tensor], dy: Tensor,
                            chunk_size: int, activation: str, residual: bool) -> list[Tensor]:
    """``[dq, dk, dv, dG, dBc, dM, *shares]`` of :func:`core_readout_backward`."""
    core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    try:
        grads, shares = core_readout_backward(*core, starts, dy, chunk_size=chunk_size,
                                              activation=activation, residual=residual)
    except Exception as e:  # noqa: BLE001
        kernel_failed(q, starts[:2], chunk_size, e)
        with torch.no_grad():
            res, sh = core_readout_backward_torch(*(t.float() for t in core[:3]), *core[3:],
                                                  unstack_starts(starts[:4], q.shape[0], q.shape[1], 2), dy.float(),
                                                  chunk_size=chunk_size, activation=activation, residual=residual)
        grads = [res[n].to(t.dtype) for n, t in zip(CORE_INPUTS[:6], core)]
        shares = stack_starts(sh, 2, torch.float32)
    return [t.contiguous() for t in (*grads, *shares)]


@memory_readout_backward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, chunk_size, activation, residual):
    return [_fresh(t) for t in (q, k, v, G, Bc, M, *starts[:4])]


@torch.library.custom_op("titans::memory_walk_backward", mutates_args=())
def memory_walk_backward(q: Tensor, k: Tensor, v: Tensor, G: Tensor, Bc: Tensor, M: Tensor, Ml: Tensor, m: Tensor,
                         Gl: Tensor, Bl: Tensor, Pl: Tensor, starts: list[Tensor], shares: list[Tensor],
                         dW: list[Tensor], dS: list[Tensor], chunk_size: int, activation: str,
                         residual: bool) -> list[Tensor]:
    """``[dk, dv, dMl, dm, dGl, dBl, dPl, *dW, *dS]`` of :func:`core_walk_backward`."""
    core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
    dW, dS = tuple(dW), tuple(dS)
    try:
        grads, dWo, dSo = core_walk_backward(*core, starts, shares, dW, dS, chunk_size=chunk_size,
                                             activation=activation, residual=residual)
    except Exception as e:  # noqa: BLE001
        kernel_failed(q, dW, chunk_size, e)
        B, H = q.shape[:2]
        wide = tuple(t.to(dW[0].dtype) for t in core[:3]) + core[3:]
        with torch.no_grad():
            res, dWo, dSo = core_backward_torch(*wide, unstack_starts(starts[:4], B, H, 2, dW[0].dtype),
                                                torch.zeros_like(wide[0]), dW, dS, chunk_size=chunk_size,
                                                activation=activation, residual=residual,
                                                shares=unstack_starts(shares, B, H, 2, dW[0].dtype))
        grads = [res["k"].to(k.dtype), res["v"].to(v.dtype)] + [res[n] for n in CORE_INPUTS[6:]]
    return [t.contiguous() for t in (*grads, *dWo, *dSo)]


@memory_walk_backward.register_fake
def _(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, shares, dW, dS, chunk_size, activation, residual):
    return [_fresh(t) for t in (k, v, Ml, m, Gl, Bl, Pl, *dW, *dS)]
