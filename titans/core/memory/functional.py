"""The neural long-term memory update (paper Eq. 12-18), as pure functions.

One contract, several implementations (flash-linear-attention style)::

    y, weights, momentum = neural_memory_update(
        q, k, v,                    # (B, H, T, d): queries, keys, values per head
        lr, momentum_decay, forget, # theta_t, eta_t, alpha_t: (B, H, T)
        weights,                    # tuple of L tensors, weights[i]: (B, H, d_i, d_{i+1})
        momentum=None,              # tuple shaped like weights, or None for zeros
        *, chunk_size, activation="silu", residual=False)

The memory is the MLP ``h = k; h = act(h @ W_i) for i < L-1; out = h @ W_{L-1}; out += k if residual``.
Inner loss (Eq. 12): ``l_t = ||M(k_t) - v_t||^2`` summed over features.  Chunk-wise training (Sec. 3.2):
inside a chunk of ``chunk_size`` tokens (chunks start at t = 0) every gradient ``u_t`` is taken at the
chunk's starting weights; then per token (Eq. 13-14)::

    S_t = eta_t S_{t-1} - theta_t u_t          (surprise with momentum)
    W_t = (1 - alpha_t) W_{t-1} + S_t          (forgetting / weight decay)
    y_t = M_{W_t}(q_t)                         (retrieval with the updated weights, Eq. 15)

Implementations:

* :func:`neural_memory_update_naive` — a per-token loop that follows the equations, the reference.
  Its gradients come from ``torch.func.grad`` of the inner loss, independent of the hand-derived
  backward used by the fast paths.
* :func:`neural_memory_update_chunked` — parallel inside each chunk.  Per-token gradients are
  rank-one products ``u_t = h_t^T delta_t`` (layer input, back-propagated error at the chunk's start
  weights); the momentum / decay recurrence is unrolled into lower-triangular decay matrices
  (Eq. 16-18), so the per-token weights never materialise: each layer's output is
  ``G_t (x_t W_0) + B_t (x_t S_0) + sum_j c_tj (x_t . h_j) delta_j``, a masked linear-attention product.
* ``titans.core.memory.fused_update`` — the same chunk math with a hand-written backward (gate
  coefficients for all chunks at once, then a loop over chunks that keeps only chunk-start states).
* ``titans.core.memory.triton_kernels`` — that backward and forward as fused GPU kernels (one launch
  per direction for the whole sequence), chosen automatically on CUDA.

Both PyTorch paths are differentiable with respect to every input (outer-loop training).

Streaming: the private keyword ``chunk_weights`` / ``offset`` let a caller continue in the middle of a
chunk (``offset`` tokens of the current chunk already consumed, gradients taken at ``chunk_weights``);
:class:`titans.core.memory.neural_memory.NeuralMemory` uses them for exact piecewise processing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from titans.utils.tensors import KeptTensors

Weights = tuple[Tensor, ...]
Backend = Literal["auto", "naive", "chunked", "compiled", "fused", "triton"]


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activation:
    """An elementwise activation and its derivative (needed for the hand-derived inner backward)."""

    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z: Tensor) -> Tensor:
    # exact (erf) GELU: Phi(z) + z * phi(z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(torch.nn.functional.silu, _silu_grad),
    "gelu": Activation(torch.nn.functional.gelu, _gelu_grad),
    "relu": Activation(torch.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": Activation(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
    "identity": Activation(lambda z: z, torch.ones_like),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation={name!r}: expected one of {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------- the memory MLP


def memory_mlp(x: Tensor, weights: Sequence[Tensor], activation: str = "silu", residual: bool = False) -> Tensor:
    """Apply the memory MLP ``M_W`` to rows of ``x``.

    x: (B, H, n, d_0); weights[i]: (B, H, d_i, d_{i+1}) (or broadcastable) -> (B, H, n, d_L).
    """
    act = get_activation(activation).fn
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = act(h)
    return h + x if residual else h


def retrieve(q: Tensor, weights: Sequence[Tensor], activation: str = "silu", residual: bool = False) -> Tensor:
    """Read the memory without updating it (Eq. 15): ``y = M*(q)``; q: (B, H, T, d_0)."""
    return memory_mlp(q, weights, activation, residual)


# ----------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_memory_inputs(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None, chunk_size: int, activation: str,
    residual: bool, check_finite: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument and the expected shape for any inconsistent input."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected an int >= 1")
    get_activation(activation)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a tensor of shape (B, H, T, d), got {got}")
    B, H, T, d0 = k.shape
    if q.shape != k.shape:
        raise ValueError(f"q: expected shape {_shape(k)} (same as k: (B, H, T, d_0)), got {_shape(q)}")
    if v.shape[:3] != (B, H, T):
        raise ValueError(f"v: expected shape ({B}, {H}, {T}, d_L), got {_shape(v)}")
    for name, t in (("lr", lr), ("momentum_decay", momentum_decay), ("forget", forget)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (B, H, T):
            got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({B}, {H}, {T}) = (B, H, T), got {got}")
    if not isinstance(weights, (tuple, list)) or len(weights) < 1:
        raise ValueError("weights: expected a non-empty tuple of tensors (B, H, d_i, d_{i+1})")
    d_in = d0
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.ndim != 4 or tuple(w.shape[:2]) != (B, H) or w.shape[2] != d_in:
            got = _shape(w) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}]: expected shape ({B}, {H}, {d_in}, d_{i + 1}), got {got}")
        d_in = w.shape[3]
    if d_in != v.shape[3]:
        raise ValueError(f"v: last dim {v.shape[3]} must equal the memory output dim d_L={d_in}")
    if residual and d_in != d0:
        raise ValueError(f"residual=True needs d_L == d_0, got d_0={d0}, d_L={d_in}")
    if momentum is not None:
        if len(momentum) != len(weights):
            raise ValueError(f"momentum: expected {len(weights)} tensors like weights, got {len(momentum)}")
        for i, (m, w) in enumerate(zip(momentum, weights)):
            if not isinstance(m, Tensor) or m.shape != w.shape:
                got = _shape(m) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"momentum[{i}]: expected shape {_shape(w)}, got {got}")
    tensors = {"q": q, "k": k, "v": v, "lr": lr, "momentum_decay": momentum_decay, "forget": forget}
    tensors.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    if momentum is not None:
        tensors.update({f"momentum[{i}]": m for i, m in enumerate(momentum)})
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's device {q.device}")
    if not q.is_floating_point():
        raise ValueError(f"q: expected a floating-point dtype, got {q.dtype}")
    # A finiteness check needs a device sync, so it is only "cheap" on the CPU.
    if check_finite and q.device.type == "cpu" and not torch.compiler.is_compiling():
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: contains NaN or inf")


def _zeros_like(weights: Sequence[Tensor]) -> Weights:
    return tuple(torch.zeros_like(w) for w in weights)


# ----------------------------------------------------------------------------- naive reference


def neural_memory_update_naive(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None = None, *, chunk_size: int,
    activation: str = "silu", residual: bool = False,
    chunk_weights: Sequence[Tensor] | None = None, offset: int = 0, return_chunk_state: bool = False,
    validate: bool = True,
):
    """Reference: a per-token loop over Eq. 13-15 with chunk-start gradients (Sec. 3.2).

    Shapes as in the module docstring.  Returns ``(y, weights, momentum)``; with
    ``return_chunk_state=True`` also ``(chunk_weights, offset)`` for continuing mid-chunk.
    """
    if validate:
        validate_memory_inputs(q, k, v, lr, momentum_decay, forget, weights, momentum, chunk_size,
                               activation, residual)
    W = tuple(weights)
    S = _zeros_like(W) if momentum is None else tuple(momentum)
    W0 = W if (chunk_weights is None or offset == 0) else tuple(chunk_weights)
    pos = offset % chunk_size

    def inner_loss(ws: Weights, k_t: Tensor, v_t: Tensor) -> Tensor:
        out = memory_mlp(k_t.unsqueeze(-2), ws, activation, residual).squeeze(-2)
        return ((out - v_t) ** 2).sum()  # Eq. 12; summing over (B, H) keeps per-head gradients separate

    inner_grad = torch.func.grad(inner_loss)
    ys = []
    for t in range(q.shape[2]):
        if pos == 0:
            W0 = W  # a new chunk starts: gradients of the whole chunk are taken here
        u = inner_grad(W0, k[:, :, t], v[:, :, t])
        eta = momentum_decay[:, :, t, None, None]
        theta = lr[:, :, t, None, None]
        keep = 1 - forget[:, :, t, None, None]
        S = tuple(eta * s - theta * g for s, g in zip(S, u))  # Eq. 13
        W = tuple(keep * w + s for w, s in zip(W, S))  # Eq. 14
        ys.append(memory_mlp(q[:, :, t].unsqueeze(-2), W, activation, residual).squeeze(-2))
        pos = (pos + 1) % chunk_size
    y = torch.stack(ys, dim=2) if ys else q.new_zeros(*q.shape[:3], v.shape[-1])
    if pos == 0:
        W0 = W
    if return_chunk_state:
        return y, W, S, W0, pos
    return y, W, S


# ----------------------------------------------------------------------------- chunked (parallel)


def _strict_upper(n: int, device: torch.device) -> Tensor:
    """(n, n) bool, True where j > s: the entries above the diagonal of a decay matrix."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


_kept_triangles = KeptTensors(8)


def _decay_matrix(a: Tensor) -> Tensor:
    """D[s, j] = prod_{m=j+1..s} a_m for j <= s, else 0.   a: (..., n) with entries in [0, 1] -> (..., n, n).

    The exponential of differences of one cumulative log-sum over (..., n): a scan over n entries, not a
    cumulative product over the (..., n, n) matrix (that scan was a fifth of the fused update's GPU time).
    Zeros of ``a`` (eta = 0, alpha = 1) are counted apart, so D is exactly 0 wherever a zero factor lies in
    (j, s] and exact otherwise; nothing divides by a small product.
    """
    n = a.shape[-1]
    zero = a == 0
    logs = torch.cumsum(torch.log(a.masked_fill(zero, 1.0)), dim=-1)
    zeros = torch.cumsum(zero, dim=-1)
    # the triangle is a constant: kept (built per call while compiling or capturing a CUDA graph)
    upper = _kept_triangles.get((n, a.device), lambda: _strict_upper(n, a.device))
    drop = (zeros.unsqueeze(-1) != zeros.unsqueeze(-2)) | upper  # [s, j]: a zero factor in (j, s], or j > s
    # masked to -inf before the exponential: exactly 0 there, no overflow above the diagonal, zero gradient
    return torch.exp((logs.unsqueeze(-1) - logs.unsqueeze(-2)).masked_fill(drop, float("-inf")))


def decay_coefficients(theta: Tensor, eta: Tensor, keep: Tensor):
    """The momentum / decay recurrence inside a chunk in closed form (Eq. 16-18).

    theta, eta, keep = 1 - alpha: (..., n).  Returns ``(G, P, Bc, M, m)``: G_t = prod_{s<=t} keep_s and
    P_t = prod_{s<=t} eta_s (..., n) (weights / momentum carried from the chunk start), B_t = sum_{s<=t}
    D_keep[t, s] P_s (..., n) (the momentum folded into the weights), M[t, j] = -theta_j sum_s D_keep[t, s]
    D_eta[s, j] (..., n, n) (the weight of token j's gradient in W_t) and m_j = -theta_j D_eta[n-1, j] (..., n)
    (its weight in the momentum at the chunk end).  eta and keep go through one stacked pass (half the kernels).
    """
    gates = torch.stack((eta, keep))
    D = _decay_matrix(gates)
    # the running products from the decay matrix's first column, prod_{s<=t} a_s = a_0 D[t, 0]: no cumprod, whose
    # backward checks the input for zeros on the host (a sync CUDA-graph capture forbids; a log-depth scan of
    # multiplies stood in for it there).  D first: the product takes D's contiguous layout, not the gates' (heads
    # fastest), so the matmul and the reshapes below copy nothing
    P, G = (D[..., 0] * gates[..., :1]).unbind(0)
    D_eta, D_keep = D.unbind(0)
    Bc = (D_keep @ P.unsqueeze(-1)).squeeze(-1)
    neg_theta = -theta  # negated once on (..., n), not on the (..., n, n) product (the same values)
    M = (D_keep @ D_eta) * neg_theta.unsqueeze(-2)
    m = neg_theta * D_eta[..., -1, :]
    return G, P, Bc, M, m


def _inner_backward(k: Tensor, v: Tensor, W0: Weights, act: Activation, residual: bool):
    """Per-token inner gradients at the chunk's start weights, in rank-one form.

    k: (B, H, n, d_0), v: (B, H, n, d_L).  Returns lists ``hs[i]`` (B, H, n, d_i) (layer inputs) and
    ``deltas[i]`` (B, H, n, d_{i+1}) (errors at layer outputs), with grad_t(W_i) = hs[i][t]^T deltas[i][t].
    """
    L = len(W0)
    hs, zs = [], []
    h = k
    for i, w in enumerate(W0):
        hs.append(h)
        z = h @ w
        zs.append(z)
        if i < L - 1:
            h = act.fn(z)
    out = zs[-1] + k if residual else zs[-1]
    delta = 2 * (out - v)  # d/d out of ||out - v||^2
    deltas = [delta]
    for i in range(L - 2, -1, -1):
        delta = (delta @ W0[i + 1].transpose(-1, -2)) * act.grad(zs[i])
        deltas.append(delta)
    deltas.reverse()
    return hs, deltas


def _chunk(
    q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
    W: Weights, S: Weights, W0: Weights, act: Activation, residual: bool,
) -> tuple[Tensor, Weights, Weights]:
    """One chunk (n tokens) in parallel.  Gradients at W0, current weights W, momentum S.

    Returns y (B, H, n, d_L) and the weights and momentum after the chunk's last token.
    """
    hs, deltas = _inner_backward(k, v, W0, act, residual)
    # G_t, P_t: weights / momentum carried from the chunk start; B_t the momentum folded into the weights;
    # C (= M) the weight of token j's gradient in W_t; m_last its weight in the momentum at the chunk end
    G, P, Bc, C, m_last = decay_coefficients(theta, eta, 1 - alpha)

    x = q
    for i in range(len(W)):
        # x_t W_t = G_t x_t W + B_t x_t S + sum_j c_tj (x_t . h_j) delta_j
        z = (G.unsqueeze(-1) * (x @ W[i]) + Bc.unsqueeze(-1) * (x @ S[i])
             + ((x @ hs[i].transpose(-1, -2)) * C) @ deltas[i])
        x = act.fn(z) if i < len(W) - 1 else z
    y = x + q if residual else x

    newS, newW = [], []
    for i in range(len(W)):
        h_t = hs[i].transpose(-1, -2)
        newS.append(P[..., -1, None, None] * S[i] + h_t @ (m_last.unsqueeze(-1) * deltas[i]))
        newW.append(G[..., -1, None, None] * W[i] + Bc[..., -1, None, None] * S[i]
                    + h_t @ (C[..., -1, :].unsqueeze(-1) * deltas[i]))
    return y, tuple(newW), tuple(newS)


def _chunk_named(q, k, v, theta, eta, alpha, W, S, W0, activation: str, residual: bool):
    return _chunk(q, k, v, theta, eta, alpha, W, S, W0, get_activation(activation), residual)


_COMPILE_FAILED: list[str] = []


@lru_cache(maxsize=1)
def _compiled_chunk():
    # one graph per (shape, dtype, activation): every full chunk of a run reuses it; a last partial
    # chunk compiles once more.  Fusing the ~60 small ops of a chunk is what makes the update fast on
    # GPUs, where the eager loop is bound by kernel launches.
    from titans.utils.compiling import compile_fn

    return compile_fn(_chunk_named, fullgraph=True, dynamic=False)


def _run_chunk(compiled: bool, q, k, v, theta, eta, alpha, W, S, W0, activation: str, residual: bool):
    if compiled and not _COMPILE_FAILED:
        try:
            return _compiled_chunk()(q, k, v, theta, eta, alpha, W, S, W0, activation, residual)
        except Exception as e:  # noqa: BLE001 - a broken compiler must not stop training: fall back
            import warnings

            _COMPILE_FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"memory backend 'compiled' failed ({_COMPILE_FAILED[0][:300]}); using eager "
                          "'chunked'", RuntimeWarning, stacklevel=3)
    return _chunk_named(q, k, v, theta, eta, alpha, W, S, W0, activation, residual)


def neural_memory_update_chunked(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None = None, *, chunk_size: int,
    activation: str = "silu", residual: bool = False,
    chunk_weights: Sequence[Tensor] | None = None, offset: int = 0, return_chunk_state: bool = False,
    validate: bool = True, compiled: bool = False,
):
    """Chunk-parallel update (Eq. 16-18): same contract and results as the naive loop.

    A Python loop runs over chunks only (T / chunk_size iterations); everything inside a chunk is
    batched matmuls and a cumulative-product scan.  ``compiled=True`` runs each chunk through one
    ``torch.compile`` graph (the ``"compiled"`` backend; same math, fused kernels).
    """
    if validate:
        validate_memory_inputs(q, k, v, lr, momentum_decay, forget, weights, momentum, chunk_size,
                               activation, residual)
    get_activation(activation)
    W = tuple(weights)
    S = _zeros_like(W) if momentum is None else tuple(momentum)
    pos = offset % chunk_size
    W0 = W if (chunk_weights is None or pos == 0) else tuple(chunk_weights)
    T = q.shape[2]
    ys = []
    start = 0
    while start < T:
        if pos == 0:
            W0 = W
        n = min(chunk_size - pos, T - start)
        sl = slice(start, start + n)
        y, W, S = _run_chunk(compiled, q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl],
                             momentum_decay[:, :, sl], forget[:, :, sl], W, S, W0, activation, residual)
        ys.append(y)
        start += n
        pos = (pos + n) % chunk_size
    y = torch.cat(ys, dim=2) if ys else q.new_zeros(*q.shape[:3], v.shape[-1])
    if pos == 0:
        W0 = W
    if return_chunk_state:
        return y, W, S, W0, pos
    return y, W, S


# ----------------------------------------------------------------------------- one token (decoding)


def neural_memory_step(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor], chunk_weights: Sequence[Tensor], *,
    activation: str = "silu", residual: bool = False,
) -> tuple[Tensor, Weights, Weights]:
    """One token of Eq. 13-15, written out for decoding (any depth).

    q, k, v: (B, H, 1, d); lr, momentum_decay, forget: (B, H, 1); ``chunk_weights`` are the weights the
    current chunk's gradients are taken at (Sec. 3.2).  The gradient is the rank-one ``h^T delta`` of each
    layer, so a step is ~6 small ops per layer instead of the chunked path's decay matrices and scans;
    nothing syncs with the host, so the step can be captured in a CUDA graph.  Returns ``(y, W, S)``.
    """
    hs, deltas = _inner_backward(k, v, tuple(chunk_weights), get_activation(activation), residual)
    eta = momentum_decay[..., None]
    theta = lr[..., None]
    keep = 1 - forget[..., None]
    S = tuple(eta * s - theta * (h.transpose(-1, -2) @ d) for s, h, d in zip(momentum, hs, deltas))  # Eq. 13
    W = tuple(keep * w + s for w, s in zip(weights, S))  # Eq. 14
    return memory_mlp(q, W, activation, residual), W, S  # Eq. 15


def select_weights(flag: bool | Tensor, if_true: Sequence[Tensor], if_false: Sequence[Tensor]) -> Weights:
    """``if_true`` where ``flag`` holds, else ``if_false`` (tuples of tensors of equal shapes).

    A host bool picks a tuple (streaming, where positions are Python ints); a 0-dim bool tensor selects
    elementwise with ``torch.where``, so a position held on the device decides without a host sync (static
    decoding: one CUDA graph for every position).
    """
    if isinstance(flag, Tensor):
        return tuple(torch.where(flag, a, b) for a, b in zip(if_true, if_false))
    return tuple(if_true if flag else if_false)


# ----------------------------------------------------------------------------- dispatch


def _triton_module():
    try:
        from titans.core.memory import triton_kernels
    except Exception:  # noqa: BLE001 - Triton missing or broken: fall back to PyTorch
        return None
    return triton_kernels


def resolve_backend(backend: Backend, q: Tensor, k: Tensor, v: Tensor, weights: Sequence[Tensor],
                    chunk_size: int, activation: str, residual: bool, offset: int = 0, strict: bool = True) -> str:
    """Pick the implementation: Triton on CUDA when it supports the inputs, else ``fused`` (depth 1-2, whole
    chunks from a chunk boundary), else ``chunked``.

    ``compiled`` (each chunk one ``torch.compile`` graph) and ``fused`` (hand-written backward in
    PyTorch; memory depth 1-2, whole chunks) are chosen explicitly; ``fused`` falls back to ``chunked``
    where it does not apply.  Explicit ``triton`` also runs on the CPU under ``TRITON_INTERPRET=1``; where
    the kernels do not take the inputs it is an error, or with ``strict=False`` (a model streaming pieces
    of every shape) the same fallback as ``auto``.
    """
    if backend not in ("auto", "naive", "chunked", "compiled", "fused", "triton"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'naive', 'chunked', 'compiled', 'fused' or "
                         "'triton'")
    if backend in ("naive", "chunked", "compiled"):
        return backend
    if backend != "fused":
        tk = _triton_module() if (q.is_cuda or backend == "triton") else None
        if (tk is not None and offset == 0 and tk.triton_available()
                and tk.supports(q, k, v, weights, chunk_size, activation, residual)):
            return "triton"
        if backend == "triton" and strict:
            raise ValueError("backend='triton': not available for these inputs (needs CUDA or TRITON_INTERPRET=1, "
                             "Triton, memory depth 1-2 (SiLU), power-of-two sizes and T a multiple of "
                             "chunk_size); use 'auto' to fall back")
    from titans.core.memory.fused_update import fused_supports

    # the hand-written backward: same results as chunked (tests: <= 1e-10 in float64), 1.0-1.9x faster on
    # the CPU and ~2x on the GPU, about half the activation memory
    return "fused" if offset == 0 and fused_supports(q, weights, chunk_size, activation) else "chunked"


def neural_memory_update(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum_decay: Tensor, forget: Tensor,
    weights: Sequence[Tensor], momentum: Sequence[Tensor] | None = None, *, chunk_size: int,
    activation: str = "silu", residual: bool = False, backend: Backend = "auto",
) -> tuple[Tensor, Weights, Weights]:
    """Run the memory over a sequence and return ``(y, final_weights, final_momentum)``.

    See the module docstring for the contract.  ``backend`` chooses the implementation
    (``"auto"``: fused Triton kernels on CUDA where supported, else the hand-written-backward PyTorch path
    where it applies, else the chunked path).
    """
    validate_memory_inputs(q, k, v, lr, momentum_decay, forget, weights, momentum, chunk_size,
                           activation, residual)
    which = resolve_backend(backend, q, k, v, weights, chunk_size, activation, residual)
    if which == "naive":
        return neural_memory_update_naive(q, k, v, lr, momentum_decay, forget, weights, momentum,
                                          chunk_size=chunk_size, activation=activation, residual=residual,
                                          validate=False)
    if which in ("fused", "triton"):
        from titans.core.memory.fused_update import neural_memory_update_fused

        return neural_memory_update_fused(q, k, v, lr, momentum_decay, forget, tuple(weights),
                                          None if momentum is None else tuple(momentum),
                                          chunk_size=chunk_size, activation=activation, residual=residual,
                                          impl="torch" if which == "fused" else "triton")
    return neural_memory_update_chunked(q, k, v, lr, momentum_decay, forget, weights, momentum,
                                        chunk_size=chunk_size, activation=activation, residual=residual,
                                        validate=False, compiled=which == "compiled")
