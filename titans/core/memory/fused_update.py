"""Memory update with a hand-written backward: the contract the fused GPU kernels implement.

``neural_memory_update_chunked`` differentiates through every chunk with autograd, which stores each
chunk's intermediates and runs ~60 small kernels per chunk.  Here the update is split in two:

1. **Gate coefficients** (parallel over all chunks, plain PyTorch with autograd).  Inside a chunk of
   ``C`` tokens the momentum / forgetting recurrence (Eq. 13-14) is linear, so with ``D_eta``,
   ``D_keep`` the lower-triangular decay matrices of eta and ``1 - alpha`` (Eq. 16-18)::

       G_t  = prod_{s<=t} (1 - alpha_s)                weight carried from the chunk start
       P_t  = prod_{s<=t} eta_s                        momentum carried from the chunk start
       B_t  = sum_s D_keep[t, s] P_s                   momentum folded into the weights
       M_tj = -theta_j sum_s D_keep[t, s] D_eta[s, j]  weight of token j's gradient in W_t
       m_j  = -theta_j D_eta[C-1, j]                   weight of token j's gradient in S_C

   These depend on the gates only, never on the memory, so they are computed for every chunk at
   once and autograd maps their gradients back to theta, eta and alpha.

2. **The memory core** (sequential over chunks), an ``autograd.Function`` with explicit forward and
   backward per chunk for memory depth L = 1 or 2 (``h = act(k W1)``, ``out = h W2 [+ k]``)::

       Z = K W1, H = act(Z), Err = 2 (H W2 [+ K] - V)        inner loss gradient at the chunk start
       Dl = (Err W2^T) * act'(Z)                             error at layer 1
       Zq = G * (Q W1) + B * (Q S1) + ((Q K^T) * M) Dl        layer 1 at the per-token weights W1_t
       Y  = G * (Hq W2) + B * (Hq S2) + ((Hq H^T) * M) Err   layer 2 at W2_t, Hq = act(Zq) [+ Q]
       W' = G_C W + B_C S + X^T (M_C * Delta),  S' = P_C S + X^T (m * Delta)

   The forward keeps only each chunk's starting weights and momentum; the backward recomputes the
   chunk and applies the chain rule by hand (including the second-order term through ``act'``).
   ``impl="torch"`` runs this as a Python loop over chunks (the readable reference of the kernels,
   any device); ``impl="triton"`` runs the same equations in one fused kernel launch per direction
   (``titans.core.memory.triton_kernels``).

Shapes follow :func:`titans.core.memory.functional.neural_memory_update`; the sequence length must
be a multiple of ``chunk_size`` (callers fall back to the chunked path otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from titans.core.memory import coefficient_kernels
from titans.core.memory.functional import decay_coefficients, get_activation
from titans.utils.switches import switch_on
from titans.utils.tensors import recompute_when_recorded

SUPPORTED_DEPTHS = (1, 2)
# the memory core's tensor inputs, in argument order: the names of the gradient dictionaries of both backwards
CORE_INPUTS = ("q", "k", "v", "G", "Bc", "M", "Ml", "m", "Gl", "Bl", "Pl")


def _silu_grad2(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _gelu_grad2(z: Tensor) -> Tensor:
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return pdf * (2 - z * z)


# second derivatives of the activations: the inner gradient depends on act'(Z), so the outer
# backward needs act''
ACTIVATION_GRAD2: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": _silu_grad2,
    "gelu": _gelu_grad2,
    "relu": torch.zeros_like,
    "tanh": lambda z: -2 * torch.tanh(z) * (1 - torch.tanh(z) ** 2),
    "identity": torch.zeros_like,
}


def fused_supports(q: Tensor, weights: Sequence[Tensor], chunk_size: int, activation: str) -> bool:
    """Whether :func:`neural_memory_update_fused` applies: depth 1-2, whole chunks, a known activation."""
    return len(weights) in SUPPORTED_DEPTHS and q.shape[2] % chunk_size == 0 and activation in ACTIVATION_GRAD2


# ----------------------------------------------------------------------------- coefficients


def chunk_coefficients(lr: Tensor, momentum_decay: Tensor, forget: Tensor, chunk_size: int):
    """Per-chunk coefficients of the momentum / decay recurrence (Eq. 16-18).

    lr, momentum_decay, forget: (B, H, T) with T a multiple of ``chunk_size`` = C, N = T / C chunks.
    Returns ``(G, Bc, M, Ml, m, Gl, Bl, Pl)``: G, Bc (B, H, T); M (B, H, N, C, C); Ml, m (B, H, N, C)
    (the last row of M and the momentum weights at the chunk end); Gl, Bl, Pl (B, H, N).
    """
    B, H, T = lr.shape
    C = chunk_size
    N = T // C
    G, P, Bc, M, m = decay_coefficients(lr.reshape(B, H, N, C), momentum_decay.reshape(B, H, N, C),
                                        1 - forget.reshape(B, H, N, C))
    # contiguous here, where the compiler writes them as it computes them: the kernels read dense buffers, and the
    # strided views (Ml, m, Gl, Bl, Pl) were five copies a call at the custom op's entry, forward and backward, each
    # an eager launch on a MAC segment's chain
    return tuple(t.contiguous() for t in (G.reshape(B, H, T), Bc.reshape(B, H, T), M, M[..., -1, :], m,
                                          G[..., -1], Bc[..., -1], P[..., -1]))


def coefficients(lr: Tensor, momentum_decay: Tensor, forget: Tensor, chunk_size: int):
    """:func:`chunk_coefficients` as the memory ops take them: where the Triton kernels run (CUDA, float32; the
    default there, ``TITANS_TRITON_COEFFICIENTS=0`` turns them off) :mod:`titans.core.memory.coefficient_kernels`,
    one kernel a direction with the gates saved (+2.4-2.6% at MAC 65536 x 1, RESULTS.md section 6, session 31;
    the memory op then keeps the kernel's M for its backward: +0.4 GB there, three layers);
    else the PyTorch code, a cheap region: with ``TITANS_RECOMPUTE_CHEAP=1`` recomputed in the backward while
    autograd records (the (B, H, N, C, C) decay matrices behind the coefficients are cheap to rebuild and were a
    third of what the Triton path kept for a MAC layer, RESULTS.md section 6, session 14), kept by default."""
    if coefficient_kernels.coefficients_on() and coefficient_kernels.supports(lr, chunk_size):
        return coefficient_kernels.fused_chunk_coefficients(lr, momentum_decay, forget, chunk_size)
    return recompute_when_recorded(chunk_coefficients, lr, momentum_decay, forget, chunk_size)


# ----------------------------------------------------------------------------- one chunk, by hand


def _broadcast(G, Bc, Ml, m, Gl, Bl, Pl):
    """Per-token coefficients (B, H, C) -> (B, H, C, 1); per-chunk scalars (B, H) -> (B, H, 1, 1)."""
    return (G.unsqueeze(-1), Bc.unsqueeze(-1), Ml.unsqueeze(-1), m.unsqueeze(-1),
            Gl[..., None, None], Bl[..., None, None], Pl[..., None, None])


def _rowsum(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _full(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-1, -2))


def _readout_backward(dout, x, keys, W, S, g, b, xk, M, A, delta):
    """Backward of one layer's per-token read ``out = G (x W) + B (x S) + A delta`` with A = (x keys^T) * M
    (Eq. 16-18 folded into the chunk-start weights W, momentum S and the chunk's gradients delta).

    dout, x: (..., C, d_out / d_in); xk = x keys^T and A (..., C, C).  Returns ``(dG, dBc, dx, dkeys, ddelta, dW, dS,
    dM)``: the gradients of G and B (..., C), of x and keys, of delta, the shares of W's and S's gradients,
    and that of M.
    """
    dx = (g * dout) @ W.transpose(-1, -2) + (b * dout) @ S.transpose(-1, -2)
    xt = x.transpose(-1, -2)
    dA = dout @ delta.transpose(-1, -2)
    dxk = dA * M
    return (_rowsum(dout, x @ W), _rowsum(dout, x @ S), dx + dxk @ keys, dxk.transpose(-1, -2) @ x,
            A.transpose(-1, -2) @ dout, xt @ (g * dout), xt @ (b * dout), dA * xk)


def _depth2_hidden(q, k, v, g, b, A1, W1, W2, S1, act, residual: bool):
    """The depth-2 chunk up to layer 2, shared by forward and backward (which recomputes it).

    Inner pass at the chunk's start weights: z = k W1, h = act(z), err = 2 (h W2 [+ k] - v),
    u = err W2^T, dl = u * act'(z); layer 1 read at the per-token weights: zq = G (q W1) + B (q S1) + A1 dl,
    hq = act(zq), with A1 = (q k^T) * M.  Returns (z, h, act'(z), err, u, dl, zq, hq).
    """
    z = k @ W1
    h = act.fn(z)
    a1 = act.grad(z)
    err = 2 * (h @ W2 + (k if residual else 0) - v)
    u = err @ W2.transpose(-1, -2)
    dl = u * a1
    zq = g * (q @ W1) + b * (q @ S1) + A1 @ dl
    return z, h, a1, err, u, dl, zq, act.fn(zq)


def chunk_forward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, activation: str, residual: bool):
    """One chunk of the memory core.  q, k, v: (B, H, C, d); G, Bc, Ml, m: (B, H, C); M: (B, H, C, C);
    Gl, Bl, Pl: (B, H); W, S: tuples of L in {1, 2} weights (B, H, d_i, d_{i+1}).
    Returns ``(y, W', S')``: y (B, H, C, d_L) read with the per-token weights, and the state after the chunk.
    """
    act = get_activation(activation)
    g, b, ml, mm, gl, bl, pl = _broadcast(G, Bc, Ml, m, Gl, Bl, Pl)
    if len(W) == 1:
        (W1,), (S1,) = W, S
        err = 2 * (k @ W1 + (k if residual else 0) - v)
        y = g * (q @ W1) + b * (q @ S1) + ((q @ k.transpose(-1, -2)) * M) @ err
        if residual:
            y = y + q
        kt = k.transpose(-1, -2)
        return y, (gl * W1 + bl * S1 + kt @ (ml * err),), (pl * S1 + kt @ (mm * err),)
    W1, W2 = W
    S1, S2 = S
    _, h, _, err, _, dl, _, hq = _depth2_hidden(q, k, v, g, b, (q @ k.transpose(-1, -2)) * M, W1, W2, S1, act,
                                                residual)
    y = g * (hq @ W2) + b * (hq @ S2) + ((hq @ h.transpose(-1, -2)) * M) @ err
    if residual:
        y = y + q
    kt, ht = k.transpose(-1, -2), h.transpose(-1, -2)
    newW = (gl * W1 + bl * S1 + kt @ (ml * dl), gl * W2 + bl * S2 + ht @ (ml * err))
    newS = (pl * S1 + kt @ (mm * dl), pl * S2 + ht @ (mm * err))
    return y, newW, newS


def chunk_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, dy, dW_next, dS_next,
                   activation: str, residual: bool):
    """Chain rule through :func:`chunk_forward` (recomputing its intermediates).

    ``dy`` is the gradient of y, ``dW_next`` / ``dS_next`` those of the state after the chunk.  Returns
    ``(dq, dk, dv, dG, dBc, dM, dMl, dm, dGl, dBl, dPl, dW, dS)`` with dW / dS the gradients of the state
    before the chunk.
    """
    act = get_activation(activation)
    grad2 = ACTIVATION_GRAD2[activation]
    g, b, ml, mm, gl, bl, pl = _broadcast(G, Bc, Ml, m, Gl, Bl, Pl)
    kt = k.transpose(-1, -2)
    qk = q @ kt
    A1 = qk * M
    L = len(W)
    if L == 1:
        (W1,), (S1,) = W, S
        (dW1n,), (dS1n,) = dW_next, dS_next
        err = 2 * (k @ W1 + (k if residual else 0) - v)
        # state after the chunk
        dW1 = gl * dW1n
        dS1 = bl * dW1n + pl * dS1n
        dGl, dBl, dPl = _full(W1, dW1n), _full(S1, dW1n), _full(S1, dS1n)
        kdw, kds = k @ dW1n, k @ dS1n
        derr = ml * kdw + mm * kds
        dMl, dm = _rowsum(err, kdw), _rowsum(err, kds)
        dk = (ml * err) @ dW1n.transpose(-1, -2) + (mm * err) @ dS1n.transpose(-1, -2)
        # y = G (q W1) + B (q S1) + A1 err
        dG, dBc, dq, dkr, derr_y, dW1r, dS1r, dM = _readout_backward(dy, q, k, W1, S1, g, b, qk, M, A1, err)
        dq = dq + (dy if residual else 0)
        dW1, dS1 = dW1 + dW1r, dS1 + dS1r
        derr = derr + derr_y
        dk = dk + dkr
        # err = 2 (k W1 [+ k] - v)
        dP = 2 * derr
        dv = -dP
        dk = dk + dP @ W1.transpose(-1, -2) + (dP if residual else 0)
        dW1 = dW1 + kt @ dP
        return dq, dk, dv, dG, dBc, dM, dMl, dm, dGl, dBl, dPl, (dW1,), (dS1,)

    W1, W2 = W
    S1, S2 = S
    dW1n, dW2n = dW_next
    dS1n, dS2n = dS_next
    z, h, a1, err, u, dl, zq, hq = _depth2_hidden(q, k, v, g, b, A1, W1, W2, S1, act, residual)
    hh = hq @ h.transpose(-1, -2)
    ht = h.transpose(-1, -2)

    # W' = G_C W + B_C S + X^T (Ml * Delta),  S' = P_C S + X^T (m * Delta)
    dW1, dW2 = gl * dW1n, gl * dW2n
    dS1, dS2 = bl * dW1n + pl * dS1n, bl * dW2n + pl * dS2n
    dGl = _full(W1, dW1n) + _full(W2, dW2n)
    dBl = _full(S1, dW1n) + _full(S2, dW2n)
    dPl = _full(S1, dS1n) + _full(S2, dS2n)
    kdw, kds = k @ dW1n, k @ dS1n  # (C, E)
    hdw, hds = h @ dW2n, h @ dS2n  # (C, d)
    ddl = ml * kdw + mm * kds
    derr = ml * hdw + mm * hds
    dMl = _rowsum(dl, kdw) + _rowsum(err, hdw)
    dm = _rowsum(dl, kds) + _rowsum(err, hds)
    dk = (ml * dl) @ dW1n.transpose(-1, -2) + (mm * dl) @ dS1n.transpose(-1, -2)
    dh = (ml * err) @ dW2n.transpose(-1, -2) + (mm * err) @ dS2n.transpose(-1, -2)

    # y = G (hq W2) + B (hq S2) + A2 err [+ q]
    dG, dBc, dhq, dhr, derr_y, dW2r, dS2r, dM = _readout_backward(dy, hq, h, W2, S2, g, b, hh, M, hh * M, err)
    dW2, dS2 = dW2 + dW2r, dS2 + dS2r
    derr = derr + derr_y
    dh = dh + dhr

    # zq = G (q W1) + B (q S1) + A1 dl
    dzq = dhq * act.grad(zq)
    dG1, dBc1, dq, dkr, ddl_y, dW1r, dS1r, dM1 = _readout_backward(dzq, q, k, W1, S1, g, b, qk, M, A1, dl)
    dG, dBc, dM = dG + dG1, dBc + dBc1, dM + dM1
    dq = dq + (dy if residual else 0)
    dW1, dS1 = dW1 + dW1r, dS1 + dS1r
    ddl = ddl + ddl_y
    dk = dk + dkr

    # dl = (err W2^T) * act'(z)
    du = ddl * a1
    derr = derr + du @ W2
    dW2 = dW2 + du.transpose(-1, -2) @ err
    dz = ddl * u * grad2(z)
    # err = 2 (h W2 [+ k] - v)
    dP = 2 * derr
    dv = -dP
    dh = dh + dP @ W2.transpose(-1, -2)
    dW2 = dW2 + ht @ dP
    if residual:
        dk = dk + dP
    dz = dz + dh * a1
    dk = dk + dz @ W1.transpose(-1, -2)
    dW1 = dW1 + kt @ dz
    return dq, dk, dv, dG, dBc, dM, dMl, dm, dGl, dBl, dPl, (dW1, dW2), (dS1, dS2)


# ----------------------------------------------------------------------------- sequence loops (torch)


def _split(t: Tensor, C: int):
    return t.split(C, dim=2)


def _gathered(per_chunk: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Per-chunk gradients of the core inputs -> whole-sequence ones: the token tensors concatenated along time, the
    per-chunk coefficient matrices and vectors stacked along the chunk axis."""
    cat = {"q": 2, "k": 2, "v": 2, "G": -1, "Bc": -1}
    res = {name: torch.cat(per_chunk[name], dim=cat[name]) for name in cat}
    for name in ("M", "Ml", "m", "Gl", "Bl", "Pl"):
        res[name] = torch.stack(per_chunk[name], dim=2)
    return res


def core_forward_torch(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S, *, chunk_size, activation, residual,
                       save_states: bool):
    """Loop :func:`chunk_forward` over chunks; returns y, final W, S and (optionally) each chunk's start state."""
    C = chunk_size
    ys, starts = [], []
    for c, (qc, kc, vc, gc, bc) in enumerate(zip(_split(q, C), _split(k, C), _split(v, C),
                                                  G.split(C, -1), Bc.split(C, -1))):
        if save_states:
            starts.append((W, S))
        y, W, S = chunk_forward(qc, kc, vc, gc, bc, M[:, :, c], Ml[:, :, c], m[:, :, c], Gl[:, :, c],
                                Bl[:, :, c], Pl[:, :, c], W, S, activation, residual)
        ys.append(y)
    return torch.cat(ys, dim=2), W, S, starts


def core_backward_torch(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, dW, dS, *, chunk_size, activation,
                        residual, shares=None):
    """Reverse loop of :func:`chunk_backward`; returns the gradients of every core input.

    ``shares``: per chunk, a ``(dW, dS)`` added to the gradient of that chunk's start state: the read-out's share
    (:func:`core_readout_backward_torch`) when the core runs split in two, the walk's backward then taking
    ``dy = 0``.  Every gradient is linear in (dy, the final state's gradient), so the two halves add up to the
    whole."""
    C = chunk_size
    N = q.shape[2] // C
    out = {name: [None] * N for name in CORE_INPUTS}
    for c in range(N - 1, -1, -1):
        sl = slice(c * C, (c + 1) * C)
        W, S = starts[c]
        grads = chunk_backward(q[:, :, sl], k[:, :, sl], v[:, :, sl], G[..., sl], Bc[..., sl], M[:, :, c],
                               Ml[:, :, c], m[:, :, c], Gl[:, :, c], Bl[:, :, c], Pl[:, :, c], W, S,
                               dy[:, :, sl], dW, dS, activation, residual)
        for name, gr in zip(out, grads[:11]):
            out[name][c] = gr
        dW, dS = grads[11], grads[12]
        if shares is not None:
            dW = tuple(a + b for a, b in zip(dW, shares[c][0]))
            dS = tuple(a + b for a, b in zip(dS, shares[c][1]))
    return _gathered(out), dW, dS


def core_readout_torch(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, *, chunk_size, activation, residual):
    """The read-out half of :func:`core_forward_torch`: y from each chunk's start state (``starts``, as the
    forward saved them), every chunk on its own."""
    C = chunk_size
    ys = [chunk_forward(qc, kc, vc, gc, bc, M[:, :, c], Ml[:, :, c], m[:, :, c], Gl[:, :, c], Bl[:, :, c],
                        Pl[:, :, c], W, S, activation, residual)[0]
          for c, ((W, S), qc, kc, vc, gc, bc) in enumerate(zip(starts, _split(q, C), _split(k, C), _split(v, C),
                                                                G.split(C, -1), Bc.split(C, -1)))]
    return torch.cat(ys, dim=2)


def core_readout_backward_torch(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, starts, dy, *, chunk_size, activation,
                                residual):
    """The read-out's share of :func:`core_backward_torch`: what dy alone gives, chunk by chunk (none of it waits
    on the state gradient).  Returns ``(grads, shares)``: the gradients of the core inputs (zero for Ml, m, Gl,
    Bl, Pl, which only the state reads) and, per chunk, ``(dW, dS)`` of its start state."""
    C = chunk_size
    out = {name: [] for name in CORE_INPUTS}
    shares = []
    for c, (W, S) in enumerate(starts):
        sl = slice(c * C, (c + 1) * C)
        grads = chunk_backward(q[:, :, sl], k[:, :, sl], v[:, :, sl], G[..., sl], Bc[..., sl], M[:, :, c],
                               Ml[:, :, c], m[:, :, c], Gl[:, :, c], Bl[:, :, c], Pl[:, :, c], W, S, dy[:, :, sl],
                               tuple(map(torch.zeros_like, W)), tuple(map(torch.zeros_like, S)), activation, residual)
        for name, gr in zip(out, grads[:11]):
            out[name].append(gr)
        shares.append((grads[11], grads[12]))
    return _gathered(out), shares


def stack_starts(starts, L: int, dtype: torch.dtype | None = None) -> list[Tensor]:
    """Per-chunk ``(W, S)`` tuples (each (B, H, ...)) -> the kernels' four (B*H, N, ...) buffers W1, W2, S1, S2
    (layer 2: a one-element placeholder when L == 1), in ``dtype`` if given."""
    def stack(i: int, j: int) -> Tensor:
        t = torch.stack([st[i][j].reshape(-1, *st[i][j].shape[2:]) for st in starts], dim=1)
        return t if dtype is None else t.to(dtype)
    out = [stack(0, 0), stack(0, L - 1), stack(1, 0), stack(1, L - 1)]
    return out if L == 2 else [out[0], out[0].new_empty(1), out[2], out[2].new_empty(1)]


def stack_inner(k: Tensor, v: Tensor, starts, chunk_size: int, activation: str, residual: bool) -> list[Tensor]:
    """Each chunk's inner forward at its start weights (depth 2), as the fused forward's walk stores it for the
    three-stage backward: ``[z, u, dl]`` (B*H, N, C, E) and ``err`` (B*H, N, C, d), float32, with z = k W1,
    err = 2 (silu(z) W2 [+ k] - v) (the inner loss gradient of Eq. 12), u = err W2^T, dl = u * act'(z).  k, v
    (B, H, T, d); ``starts`` the four (B*H, N, ...) buffers of :func:`stack_starts`."""
    BH, N = starts[0].shape[:2]
    act = get_activation(activation)
    kc, vc = (t.reshape(BH, N, chunk_size, t.shape[-1]).float() for t in (k, v))
    w1, w2 = starts[0].float(), starts[1].float()
    z = kc @ w1
    p = act.fn(z) @ w2
    err = 2 * ((p + kc if residual else p) - vc)
    u = err @ w2.transpose(-1, -2)
    return [z, u, u * act.grad(z), err]


def unstack_starts(starts, B: int, H: int, L: int, dtype: torch.dtype | None = None):
    """The inverse of :func:`stack_starts`: four (B*H, N, ...) buffers -> per-chunk ``(W, S)`` tuples (B, H, ...)."""
    sw1, sw2, ss1, ss2 = starts
    ws, ss = (sw1, sw2)[:L], (ss1, ss2)[:L]

    def one(x: Tensor, c: int) -> Tensor:
        t = x[:, c].reshape(B, H, *x.shape[2:])
        return t if dtype is None else t.to(dtype)
    return [(tuple(one(w, c) for w in ws), tuple(one(x, c) for x in ss)) for c in range(sw1.shape[1])]


# ----------------------------------------------------------------------------- autograd function


class MemoryCoreFunction(torch.autograd.Function):
    """The memory core with its hand-written backward; ``impl`` is ``"torch"`` or ``"triton"``."""

    @staticmethod
    def forward(ctx, impl, chunk_size, activation, residual, L, q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, *state):
        W, S = tuple(state[:L]), tuple(state[L:])
        needs = any(ctx.needs_input_grad[5:])
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_core_forward

            out = memory_core_forward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, list(W), list(S), chunk_size,
                                      activation, residual, needs)
            y, Wn, Sn, starts = out[0], tuple(out[1:1 + L]), tuple(out[1 + L:1 + 2 * L]), out[1 + 2 * L:]
            ctx.save_for_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, *starts)
        else:
            with torch.no_grad():
                y, Wn, Sn, starts = core_forward_torch(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, W, S,
                                                       chunk_size=chunk_size, activation=activation,
                                                       residual=residual, save_states=needs)
            flat = [t for Wc, Sc in starts for t in (*Wc, *Sc)]
            ctx.save_for_backward(q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, *flat)
        W, S = Wn, Sn
        ctx.cfg = (impl, chunk_size, activation, residual, L)
        return (y, *W, *S)

    @staticmethod
    def backward(ctx, dy, *dstate):
        impl, C, activation, residual, L = ctx.cfg
        saved = ctx.saved_tensors
        core, rest = saved[:11], saved[11:]
        # autograd materialises the gradients of unused outputs as zeros (set_materialize_grads default)
        dW, dS = tuple(dstate[:L]), tuple(dstate[L:])
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_core_backward

            out = memory_core_backward(*core, list(rest), dy, list(dW), list(dS), C, activation, residual)
            # q, k, v's gradients come back in float32: cast here, in the traced graph (fused into the next kernel)
            res = dict(zip(CORE_INPUTS, [g.to(t.dtype) for g, t in zip(out[:3], core)] + list(out[3:11])))
            dW, dS = tuple(out[11:11 + L]), tuple(out[11 + L:])
        else:
            starts = [(tuple(rest[i:i + L]), tuple(rest[i + L:i + 2 * L])) for i in range(0, len(rest), 2 * L)]
            with torch.no_grad():
                res, dW, dS = core_backward_torch(*core, starts, dy, dW, dS, chunk_size=C, activation=activation,
                                                  residual=residual)
        return (None, None, None, None, None, res["q"], res["k"], res["v"], res["G"], res["Bc"], res["M"],
                res["Ml"], res["m"], res["Gl"], res["Bl"], res["Pl"], *dW, *dS)


def neural_memory_update_fused(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None = None, *, chunk_size: int,
    activation: str = "silu", residual: bool = False, impl: str = "torch",
):
    """Same contract and results as :func:`~titans.core.memory.functional.neural_memory_update` for memory
    depth 1 or 2 and a sequence length that is a multiple of ``chunk_size``; backward by hand (see module
    docstring).  ``impl``: ``"torch"`` (loop over chunks) or ``"triton"`` (fused kernels, CUDA)."""
    L = len(weights)
    if L not in SUPPORTED_DEPTHS:
        raise ValueError(f"weights: the fused memory update supports depth {SUPPORTED_DEPTHS}, got {L} layers")
    T = q.shape[2]
    if T % chunk_size:
        raise ValueError(f"q: sequence length {T} must be a multiple of chunk_size={chunk_size} for the fused update")
    if activation not in ACTIVATION_GRAD2:
        raise ValueError(f"activation={activation!r}: expected one of {sorted(ACTIVATION_GRAD2)}")
    W = tuple(weights)
    S = tuple(torch.zeros_like(w) for w in W) if momentum is None else tuple(momentum)
    if T == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), W, S
    coef = coefficients(lr, momentum_decay, forget, chunk_size)
    out = MemoryCoreFunction.apply(impl, chunk_size, activation, residual, L, q.contiguous(), k.contiguous(),
                                   v.contiguous(), *coef, *W, *S)
    return out[0], tuple(out[1:1 + L]), tuple(out[1 + L:])


# ----------------------------------------------------------------------------- the core split in two
# MemoryCoreFunction is one autograd node: its backward waits for the final state's gradient (which, in MAC, comes
# down the chain of segments) before it can start on the read-out's gradient dy (which does not depend on it).  Split
# in a walk (the state and each chunk's start state) and a read-out (y from those starts), the read-out's backward
# (the three-stage backward's stage 0) runs as soon as dy exists, on whatever stream its forward ran: the wavefront
# puts it beside the chain instead of on it.  Every gradient is linear in (dy, the final state's gradient), so the
# read-out's share (the gradient of each chunk's start state, passed to the walk as the gradient of its starts) and
# the walk's share add up to MemoryCoreFunction's.  The starts travel in float32 (their gradient is the share).


def readout_reads_inner() -> bool:
    """Whether the walk hands its saved inner forward on to the read-out, whose backward (stage 0) then reads it
    instead of computing it again (``TITANS_TRITON_READOUT_INNER``; the Triton core with the inner forward saved)."""
    return switch_on("TITANS_TRITON_READOUT_INNER")


class MemoryWalkFunction(torch.autograd.Function):
    """The state half of the memory core: ``(*W, *S, *starts)`` with ``starts`` the four (B*H, N, ...) float32
    buffers of :func:`stack_starts`.  Backward: the gradient of the final state and, as that of the starts, the
    read-out's per-chunk shares; returns the gradients of k, v, Ml, m, Gl, Bl, Pl and of the initial state."""

    @staticmethod
    def forward(ctx, impl, chunk_size, activation, residual, L, q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, *state):
        W, S = tuple(state[:L]), tuple(state[L:])
        core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_walk_forward

            out = memory_walk_forward(*core, list(W), list(S), chunk_size, activation, residual)
            # the chunks' inner forward, if the walk saved it, goes to the backward (and with
            # TITANS_TRITON_READOUT_INNER to the read-out too, as outputs of no gradient)
            Wn, Sn, starts, inner = out[:L], out[L:2 * L], out[2 * L:2 * L + 4], out[2 * L + 4:]
        else:
            with torch.no_grad():
                _, Wn, Sn, st = core_forward_torch(*core, W, S, chunk_size=chunk_size, activation=activation,
                                                   residual=residual, save_states=True)
            starts = stack_starts(st, L)  # in the state's dtype (float64 in the exactness tests)
            inner = []
        ctx.save_for_backward(*core, *starts, *inner)
        ctx.cfg = (impl, chunk_size, activation, residual, L, q.shape[0], q.shape[1])
        if L == 1:  # the layer-2 placeholders
            ctx.mark_non_differentiable(starts[1], starts[3])
        handed = list(inner) if inner and readout_reads_inner() else []
        if handed:
            # no zero-filled gradients for the handed-on inner forward (four chunk-sized float32 buffers a call):
            # the backward makes the zeros the other outputs may still need itself
            ctx.mark_non_differentiable(*handed)
            ctx.set_materialize_grads(False)
            ctx.like = [(t.shape, t.dtype, t.device) for t in (*Wn, *Sn, *starts)]
        return (*Wn, *Sn, *starts, *handed)

    @staticmethod
    def backward(ctx, *grads):
        impl, C, activation, residual, L, B, H = ctx.cfg
        saved = ctx.saved_tensors
        core, starts = saved[:11], saved[11:]  # the four starts, then the inner forward if saved
        grads = grads[:2 * L + 4]  # (none flows to the inner forward handed on to the read-out)
        if any(g is None for g in grads):  # gradients not materialised (the inner forward handed on)
            grads = [torch.zeros(*like[0], dtype=like[1], device=like[2]) if g is None else g
                     for g, like in zip(grads, ctx.like)]
        dW, dS, shares = tuple(grads[:L]), tuple(grads[L:2 * L]), grads[2 * L:]
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_walk_backward

            out = memory_walk_backward(*core, list(starts), list(shares), list(dW), list(dS), C, activation,
                                       residual)
            res = dict(zip(("k", "v", "Ml", "m", "Gl", "Bl", "Pl"), out[:7]))
            dW, dS = tuple(out[7:7 + L]), tuple(out[7 + L:])
        else:
            st, sh = unstack_starts(starts[:4], B, H, L), unstack_starts(shares, B, H, L)
            with torch.no_grad():
                res, dW, dS = core_backward_torch(*core, st, torch.zeros_like(core[0]), dW, dS, chunk_size=C,
                                                  activation=activation, residual=residual, shares=sh)
        return (None,) * 6 + (res["k"], res["v"], None, None, None, res["Ml"], res["m"], res["Gl"], res["Bl"],
                              res["Pl"], *dW, *dS)


class MemoryReadoutFunction(torch.autograd.Function):
    """The read-out half of the memory core: y (B, H, T, d) from the walk's ``starts``.  Backward (dy alone): the
    gradients of q, k, v, G, Bc, M and, as that of the starts, each chunk's start-state share."""

    @staticmethod
    def forward(ctx, impl, chunk_size, activation, residual, L, q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl, *starts):
        core = (q, k, v, G, Bc, M, Ml, m, Gl, Bl, Pl)
        B, H = q.shape[:2]
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_readout_forward

            y = memory_readout_forward(*core, list(starts), chunk_size, activation, residual)
        else:
            with torch.no_grad():
                y = core_readout_torch(*core, unstack_starts(starts, B, H, L),
                                       chunk_size=chunk_size, activation=activation, residual=residual)
        ctx.save_for_backward(*core, *starts)
        ctx.cfg = (impl, chunk_size, activation, residual, L, B, H)
        return y

    @staticmethod
    def backward(ctx, dy):
        impl, C, activation, residual, L, B, H = ctx.cfg
        saved = ctx.saved_tensors
        core, starts = saved[:11], saved[11:]
        if impl == "triton":
            from titans.core.memory.triton_kernels import memory_readout_backward

            out = memory_readout_backward(*core, list(starts), dy, C, activation, residual)
            res = dict(zip(("q", "k", "v", "G", "Bc", "M"), out[:6]))
            shares = list(out[6:])
        else:
            with torch.no_grad():
                res, sh = core_readout_backward_torch(*core, unstack_starts(starts, B, H, L), dy,
                                                      chunk_size=C, activation=activation, residual=residual)
            shares = stack_starts(sh, L)
        if L == 1:
            shares = [shares[0], None, shares[2], None]
        # (and none for the walk's inner forward, if it came after the starts)
        return (None,) * 5 + (res["q"], res["k"], res["v"], res["G"], res["Bc"], res["M"]) + (None,) * 5 + tuple(
            shares) + (None,) * (len(starts) - 4)


@dataclass
class PendingReadout:
    """The read-out of a memory update whose state half already ran (:func:`neural_memory_update_split`): what
    :meth:`read` needs, kept until it is called (on another CUDA stream, say)."""

    impl: str
    chunk_size: int
    activation: str
    residual: bool
    core: tuple[Tensor, ...]
    starts: tuple[Tensor, ...]
    depth: int

    def read(self) -> Tensor:
        """y (B, H, T, d), equal to :func:`neural_memory_update_fused`'s."""
        return MemoryReadoutFunction.apply(self.impl, self.chunk_size, self.activation, self.residual, self.depth,
                                           *self.core, *self.starts)

    def _config(self) -> tuple:
        return self.impl, self.chunk_size, self.activation, self.residual, self.depth

    def mismatch(self, other: PendingReadout) -> str | None:
        """Why ``other`` cannot be read out stacked with this one (:func:`stack_readouts`), or None: the same
        configuration and equal shapes only."""
        if other._config() != self._config():
            return f" has (impl, chunk, activation, residual, depth) {other._config()}, the first {self._config()}"
        if [t.shape for t in other.core] != [t.shape for t in self.core]:
            return f"'s q {tuple(other.core[0].shape)}, the first's {tuple(self.core[0].shape)}: equal shapes only"
        return None


def stack_readouts(pending: Sequence[PendingReadout]) -> PendingReadout:
    """Pending read-outs of equal shapes as one over their batches stacked (q (n B, H, T, d), the first's batch
    first): a chunk's read-out reads only that chunk's inputs and start state, so ``stack_readouts(ps).read()``
    equals ``torch.cat([p.read() for p in ps])`` (values and gradients; tested in float64), each kernel launched once
    for the n instead of n times.  MAC's wavefront reads a call's segments so (``TITANS_WAVEFRONT_BATCHED_READOUTS``).
    The inputs are concatenated (copies); their gradients come back as slices along the batch, dense."""
    if not pending:
        raise ValueError("stack_readouts: no read-outs")
    first = pending[0]
    for i, p in enumerate(pending[1:], 1):
        why = first.mismatch(p)
        if why is not None:
            raise ValueError(f"stack_readouts: read-out {i}{why}")
    core = tuple(torch.cat(ts) for ts in zip(*(p.core for p in pending)))
    # (B*H, N, ...) blocks in the same order; at depth 1 layer 2's one-element placeholders stay the first's
    starts = tuple(ts[0] if first.depth == 1 and j in (1, 3) else torch.cat(ts)
                   for j, ts in enumerate(zip(*(p.starts for p in pending))))
    return PendingReadout(first.impl, first.chunk_size, first.activation, first.residual, core, starts, first.depth)


def neural_memory_update_split(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None = None, *, chunk_size: int,
    activation: str = "silu", residual: bool = False, impl: str = "torch",
):
    """:func:`neural_memory_update_fused` in two autograd nodes: returns ``(W, S, pending)``, the new state now
    and ``pending.read()`` -> y later.  Same values and gradients (tested in float64); the read-out's backward does
    not wait for the state's gradient.  ``impl="triton"`` takes memory depth 2 (the three-stage backward)."""
    L = len(weights)
    if L not in SUPPORTED_DEPTHS or (impl == "triton" and L != 2):
        raise ValueError(f"weights: the split memory update supports depth {SUPPORTED_DEPTHS} ('triton': 2), got {L}")
    T = q.shape[2]
    if T == 0 or T % chunk_size:
        raise ValueError(f"q: sequence length {T} must be a positive multiple of chunk_size={chunk_size}")
    W = tuple(weights)
    S = tuple(torch.zeros_like(w) for w in W) if momentum is None else tuple(momentum)
    coef = coefficients(lr, momentum_decay, forget, chunk_size)
    core = (q.contiguous(), k.contiguous(), v.contiguous(), *coef)
    out = MemoryWalkFunction.apply(impl, chunk_size, activation, residual, L, *core, *W, *S)
    # the read-out passes no gradient to the per-chunk coefficients (Ml, m, Gl, Bl, Pl): detached, a compiled region
    # that hands them over gets no zero gradients for them (a fill each on the segment chain)
    core = core[:6] + tuple(t.detach() for t in core[6:])
    pending = PendingReadout(impl, chunk_size, activation, residual, core, tuple(out[2 * L:]), L)
    return tuple(out[:L]), tuple(out[L:2 * L]), pending

