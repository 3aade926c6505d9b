"""``NeuralMemory``: the multi-head neural long-term memory module (paper Sections 3.1-3.2, 4.4).

Per token x_t (B, T, dim):

* q, k, v = SiLU(causal depthwise conv1d(x W_{Q,K,V})), q and k l2-normalised per head (Sec. 4.4);
* eta_t = sigmoid(x_t w_eta), alpha_t = sigmoid(x_t w_alpha), theta_t = max_lr * (1 - eta_t) *
  sigmoid(x_t w_theta) per head (data-dependent surprise decay, forgetting and learning rate; Eq. 13-14),
  or one value per chunk (taken from the chunk's first token, which keeps them causal).  The factor
  (1 - eta_t) bounds the effective momentum step theta / (1 - eta) by ``max_lr``, and ``max_lr``
  defaults to 0.125 / chunk_size: inside a chunk all gradients are taken at the same weights and summed,
  so with l2-normalised keys (inner-loss curvature up to 2 per aligned token) a larger step lets the
  outer optimiser drive the inner loop unstable — observed as NaN after ~16 steps on the gcide corpus
  with an unbounded theta <= 0.1 and chunk 32, and as NaN gradients (finite loss) after ~300 steps of
  S-NIAH training with 0.5 / chunk_size, while 0.004 (~0.125 / 32) trained 1200 steps cleanly;
* the fast weights are updated by :func:`titans.core.memory.functional.neural_memory_update` and
  read with the updated weights (Eq. 15);
* output: per-head RMS normalisation, a sigmoid gate computed from x by a linear layer, then the output
  projection.

The recurrent state is a :class:`MemoryState`.  ``forward(x, state)`` continues exactly where ``state``
left off, so feeding a sequence in arbitrary pieces (token by token included) gives the same outputs and
final state as one call.  ``retrieve`` reads without writing.

Ablations of the paper's Table 5 are switches: ``depth=1`` (linear memory), ``conv_kernel=0`` (no
convolution), ``momentum=False`` (eta = 0), ``weight_decay=False`` (alpha = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from titans.core.memory.functional import (
    Weights,
    get_activation,
    memory_mlp,
    neural_memory_step,
    neural_memory_update_chunked,
    neural_memory_update_naive,
    resolve_backend,
    select_weights,
)
from titans.utils.tensors import keep_last, recompute_when_recorded
from titans.utils.weight_grads import TappedLinear, segment_param

# default bound on the inner step, times the chunk size (see the module docstring for the measurements)
DEFAULT_MAX_LR_TIMES_CHUNK = 0.125


@dataclass
class MemoryState:
    """Everything needed to continue the memory's stream.

    weights, momentum, chunk_weights: tuples of L tensors (B, H, d_i, d_{i+1}): fast weights W_t,
    surprise S_t, and the weights at the start of the current chunk (where the chunk's gradients are
    taken).  ``seen``: tokens consumed so far (the position inside the chunk is ``seen % chunk_size``).
    ``conv``: (B, 3 * H * d, K - 1) the last projected inputs of the causal convolution, or None.
    ``chunk_gates``: (B, H, 3) theta / eta / alpha of the current chunk (per-chunk gates only) or None.
    """

    weights: Weights
    momentum: Weights
    chunk_weights: Weights
    seen: int
    conv: Tensor | None = None
    chunk_gates: Tensor | None = None

    def _map(self, fn) -> MemoryState:
        def m(x):
            if x is None:
                return None
            if isinstance(x, tuple):
                return tuple(fn(t) for t in x)
            return fn(x)

        return MemoryState(m(self.weights), m(self.momentum), m(self.chunk_weights), self.seen,
                           m(self.conv), m(self.chunk_gates))

    def detach(self) -> MemoryState:
        """Cut the autograd history (truncated back-propagation through time)."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def clone(self) -> MemoryState:
        return self._map(lambda t: t.clone())

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor mapping (for saving); see :meth:`from_tensors`."""
        out: dict[str, Tensor] = {}
        for f in ("weights", "momentum", "chunk_weights"):
            for i, t in enumerate(getattr(self, f)):
                out[f"{f}.{i}"] = t
        if self.conv is not None:
            out["conv"] = self.conv
        if self.chunk_gates is not None:
            out["chunk_gates"] = self.chunk_gates
        out["seen"] = torch.tensor([self.seen], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> MemoryState:
        def tup(name: str) -> Weights:
            n = sum(1 for k in tensors if k.startswith(name + "."))
            if n == 0:
                raise ValueError(f"memory state: missing tensors {name}.0..")
            return tuple(tensors[f"{name}.{i}"] for i in range(n))

        if "seen" not in tensors:
            raise ValueError("memory state: missing 'seen'")
        return cls(tup("weights"), tup("momentum"), tup("chunk_weights"), int(tensors["seen"].item()),
                   tensors.get("conv"), tensors.get("chunk_gates"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def causal_depthwise_conv(x: Tensor, cache: Tensor | None, weight: Tensor, bias: Tensor | None,
                          shifted: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise convolution along time (the paper's conv after the q/k/v projections, Sec. 4.4).

    ``y[b, t, c] = bias[c] + sum_j weight[c, 0, j] * xp[b, t + j, c]`` with ``xp = cat(cache^T, x)`` along time.
    x (B, T, C); cache (B, C, K - 1), the last K - 1 inputs of the previous call (None: zeros); weight (C, 1, K);
    bias (C,) or None.  Or weight (B, T, C, 1, K) and bias (B, T, C): the same values broadcast over the tokens (a
    MAC segment's stand-ins with TITANS_DEFER_PER_TOKEN=1, :func:`~titans.utils.weight_grads.segment_param`:
    their gradient stays per token, summed off the segment chain; shifted form only).  Returns ``(y (B, T, C) in
    x's dtype, new cache (B, C, K - 1))`` (the cache is None when K = 1 and none was given; the shifted form's lies
    in memory time-major, as a transposed (B, K - 1, C)).

    Two computations of the same sum: ``F.conv1d`` over the (B, C, T) transpose (``shifted=False``, the eager
    default), and a sum of K shifted products in the (B, T, C) layout (``shifted=True``, the default while
    torch.compile traces), which inductor fuses into one pointwise kernel, backward included, with no transposes:
    on the GPU the conv1d path ran CUDA's generic depthwise kernels, 6% of a compiled MAC training step
    (benchmarks/RESULTS.md section 6, session 18).  The products are summed in float32 and rounded to x's dtype
    once (float64 stays float64); tests compare the two in float64.
    """
    per_token = weight.ndim == 5
    if (x.ndim != 3 or weight.ndim not in (3, 5) or weight.shape[-2] != 1 or weight.shape[-3] != x.shape[2]
            or (per_token and tuple(weight.shape[:2]) != tuple(x.shape[:2]))):
        raise ValueError(f"causal_depthwise_conv: x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected "
                         "(B, T, C) and (C, 1, K) or (B, T, C, 1, K)")
    K = weight.shape[-1]
    if shifted is None:
        shifted = torch.compiler.is_compiling() or per_token
    elif not shifted and per_token:
        raise ValueError("causal_depthwise_conv: per-token weights (B, T, C, 1, K) need the shifted form")
    new_cache = cache
    if not shifted:
        seq = x.transpose(1, 2)  # (B, C, T)
        if K > 1:
            if cache is None:
                cache = seq.new_zeros(seq.shape[0], seq.shape[1], K - 1)
            seq = torch.cat([cache.to(seq.dtype), seq], dim=2)
            new_cache = keep_last(seq, K - 1, 2)
        return F.conv1d(seq, weight, bias, groups=weight.shape[0]).transpose(1, 2), new_cache
    T = x.shape[1]
    xp = x
    if K > 1:
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[2], K - 1)
        xp = torch.cat([cache.to(x.dtype).transpose(1, 2), x], dim=1)  # (B, T + K - 1, C)
        # (B, C, K - 1) in time-major memory (as xp): the next segment's gradient of it is a slice of its xp's, and
        # AOTAutograd copies a compiled region's incoming gradient unless its strides are the traced ones
        # (:func:`~titans.utils.tensors.gradient_like` gives a batch-1 slice this tensor's strides); the strides are
        # given whole, the batch's included, so that the traced output's and the real one's agree
        B, C = x.shape[0], x.shape[2]
        new_cache = torch.empty_strided((B, C, K - 1), ((K - 1) * C, 1, C), dtype=x.dtype, device=x.device)
        new_cache.copy_(xp[:, T:].transpose(1, 2))
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 for bf16 / fp16 inputs, float64 stays float64
    w = weight[..., 0, :].to(acc)  # (C, K), or (B, T, C, K) per token
    y = xp[:, 0:T].to(acc) * w[..., 0]
    for j in range(1, K):
        y = y + xp[:, j:j + T].to(acc) * w[..., j]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), new_cache


class NeuralMemory(nn.Module):
    """Multi-head deep neural memory that learns at test time.

    Args:
        dim: model width (input and output of the module).
        heads: memory heads; each head has its own MLP memory of head dim ``dim // heads``.
        depth: L, layers of the memory MLP (1 = linear memory).
        expansion: hidden width of the MLP as a multiple of the head dim.
        activation: inner activation ("silu", "gelu" (exact), "relu", "tanh", "identity").
        residual: memory computes ``k + MLP(k)``.
        chunk_size: b, tokens per chunk of the chunk-wise parallel update (1 = exact online GD).
        conv_kernel: width of the causal depthwise convolution after the q/k/v projections (0 = off).
        momentum: learn eta (False: eta = 0, no past surprise).
        weight_decay: learn alpha (False: alpha = 0, no forgetting).
        max_lr: bound on the effective step: theta = max_lr * (1 - eta) * sigmoid(.); None: 0.125 / chunk_size.
        gates_per_chunk: one theta / eta / alpha per chunk (from its first token) instead of per token.
        output_gate: sigmoid gate from a linear map of x before the output projection.
        normalize_values: l2-normalise v per head like q and k (the output's RMS norm restores the scale).
        forget_init: alpha at initialisation (the bias of the forgetting gate): a stored association decays
            by (1 - alpha) per token, so 1e-3 halves it in ~700 tokens and 1e-5 in ~69,000. Recall far beyond
            the training length needs a small start, because short training rows never push alpha down.
        max_forget: bound on alpha (alpha = max_forget * sigmoid(.)): no head can forget faster than that,
            whatever training does to its gate (1.0 = no bound, the paper's alpha in [0, 1]).
        backend: "auto" | "naive" | "chunked" | "compiled" | "fused" | "triton" (see ``neural_memory_update``).
    """

    def __init__(
        self, dim: int, heads: int = 4, head_dim: int | None = None, depth: int = 2, expansion: float = 2.0,
        activation: str = "silu", residual: bool = True, chunk_size: int = 16, conv_kernel: int = 4,
        momentum: bool = True, weight_decay: bool = True, max_lr: float | None = None, gates_per_chunk: bool = False,
        output_gate: bool = True, backend: str = "auto", norm_eps: float = 1e-6, normalize_values: bool = False,
        forget_init: float = 1e-3, max_forget: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1 or heads < 1:
            raise ValueError(f"dim={dim}, heads={heads}: expected positive integers")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads={heads} must divide dim={dim} (or pass head_dim)")
            head_dim = dim // heads
        if depth < 1:
            raise ValueError(f"depth={depth}: expected >= 1")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel={conv_kernel}: expected >= 0")
        if not 0.0 < max_forget <= 1.0:
            raise ValueError(f"max_forget={max_forget}: expected a value in (0, 1]")
        if not 0.0 < forget_init < max_forget:
            raise ValueError(f"forget_init={forget_init}: expected a value in (0, max_forget={max_forget})")
        self.forget_init, self.max_forget = forget_init, max_forget
        get_activation(activation)
        self.dim, self.heads, self.head_dim, self.depth = dim, heads, head_dim, depth
        self.activation, self.residual, self.chunk_size = activation, residual, chunk_size
        self.use_momentum, self.use_weight_decay = momentum, weight_decay
        if max_lr is not None and max_lr <= 0:
            raise ValueError(f"max_lr={max_lr}: expected > 0 (or None for 0.125 / chunk_size)")
        self.max_lr = max_lr if max_lr is not None else DEFAULT_MAX_LR_TIMES_CHUNK / chunk_size
        self.normalize_values = normalize_values
        self.gates_per_chunk, self.backend = gates_per_chunk, backend
        self.conv_kernel = conv_kernel
        inner = heads * head_dim
        self.to_qkv = TappedLinear(dim, 3 * inner, bias=False)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_kernel, groups=3 * inner, bias=True) if conv_kernel else None
        self.to_gates = TappedLinear(dim, 3 * heads, bias=True)
        hidden = max(1, int(round(expansion * head_dim)))
        dims = [head_dim] + [hidden] * (depth - 1) + [head_dim]
        self.memory_dims = tuple(dims)
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(heads, dims[i], dims[i + 1]) / math.sqrt(dims[i])) for i in range(depth))
        self.out_norm_weight = nn.Parameter(torch.ones(heads, head_dim))
        self.norm_eps = norm_eps
        self.gate = TappedLinear(dim, inner, bias=False) if output_gate else None
        self.to_out = TappedLinear(inner, dim, bias=False)
        self.reset_gate_parameters()

    def reset_gate_parameters(self) -> None:
        """Start with a stable inner optimisation: strong-ish momentum, slow forgetting (alpha =
        ``forget_init``; the default 1e-3 is a half-life of ~700 tokens), and a
        learning rate small enough that a whole chunk's summed step stays stable.

        Inside a chunk all b gradients are taken at the same weights and summed, and momentum scales the
        step by about 1 / (1 - eta); with l2-normalised keys the inner loss has curvature ~2, so the
        initial theta is theta_0 = max_lr (1 - eta_0) / 2 (= 0.0625 (1 - eta_0) / b at the default max_lr).
        """
        eta0, alpha0 = 0.73, self.forget_init
        with torch.no_grad():
            nn.init.normal_(self.to_gates.weight, std=0.02)
            b = self.to_gates.bias.view(3, self.heads)
            b[0].zero_()  # sigmoid(0) = 1/2 of the bound
            b[1].fill_(math.log(eta0 / (1 - eta0)))
            a = alpha0 / self.max_forget  # sigmoid(b) = a gives alpha = max_forget * a = alpha0
            b[2].fill_(math.log(a / (1 - a)))
            if self.conv is not None:
                # near-identity start: the current token dominates, earlier taps small
                self.conv.weight.zero_()
                self.conv.weight[:, 0, -1] = 1.0
                self.conv.weight.add_(0.02 * torch.randn_like(self.conv.weight))
                self.conv.bias.zero_()

    # ------------------------------------------------------------------ state

    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> MemoryState:
        """A fresh state from the learned initial memory weights (differentiable w.r.t. them)."""
        p = self.init_weights[0]
        device = device or p.device
        dtype = dtype or p.dtype
        W = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, *w.shape)
                  for w in self.init_weights)
        S = tuple(torch.zeros(batch_size, *w.shape, device=device, dtype=dtype) for w in self.init_weights)
        conv = None
        if self.conv is not None and self.conv_kernel > 1:
            conv = torch.zeros(batch_size, self.conv.in_channels, self.conv_kernel - 1, device=device, dtype=dtype)
        return MemoryState(W, S, W, 0, conv, None)

    def reset_rows(self, state: MemoryState, rows: Tensor) -> MemoryState:
        """Return a state whose batch rows ``rows`` (bool (B,) or indices) are fresh; others unchanged.

        The chunk phase (``seen``) is shared by the batch, so a reset row keeps the batch's chunk grid.
        """
        B = state.batch_size
        mask = torch.zeros(B, dtype=torch.bool, device=state.weights[0].device)
        rows = torch.as_tensor(rows, device=mask.device)
        if rows.dtype == torch.bool:
            if rows.shape != (B,):
                raise ValueError(f"rows: expected a bool mask of shape ({B},), got {tuple(rows.shape)}")
            mask = rows
        else:
            if rows.numel() and (rows.min() < 0 or rows.max() >= B):
                raise ValueError(f"rows: indices must be in [0, {B}), got {rows.tolist()}")
            mask[rows] = True
        fresh = self.init_state(B, state.weights[0].device, state.weights[0].dtype)

        def pick(new, old):
            if old is None:
                return None
            m = mask.view(B, *([1] * (old.ndim - 1)))
            return torch.where(m, new if new is not None else torch.zeros_like(old), old)

        return MemoryState(
            tuple(pick(n, o) for n, o in zip(fresh.weights, state.weights)),
            tuple(pick(n, o) for n, o in zip(fresh.momentum, state.momentum)),
            tuple(pick(n, o) for n, o in zip(fresh.weights, state.chunk_weights)),
            state.seen, pick(fresh.conv, state.conv), state.chunk_gates)

    # ------------------------------------------------------------------ pieces

    def _check_x(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected shape (B, T, {self.dim}), got {got}")

    def _input_and_state(self, x: Tensor, state: MemoryState | None) -> tuple[int, int, MemoryState]:
        """x checked, its batch size and length, and the state to update (a fresh one for None; checked)."""
        self._check_x(x)
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device)
        if state.batch_size != B:
            raise ValueError(f"state: batch size {state.batch_size} does not match x's batch size {B}")
        return B, T, state

    def _project(self, x: Tensor, conv_cache: Tensor | None, channels: slice | None = None):
        """q/k/v (or a channel slice of them) after the causal conv and SiLU; returns (qkv, new_cache)."""
        # a channel slice (retrieval needs only q) projects with the matching rows of W_QKV: a third of the work
        proj = self.to_qkv.project_rows(x, channels)
        new_cache = conv_cache
        if self.conv is not None:
            # segment_param: a MAC segment's own stand-in of the parameter while weight gradients are deferred
            w, b = segment_param(self, "conv.weight"), segment_param(self, "conv.bias")
            if channels is not None:  # (the stand-ins carry the segment's tokens in front)
                w, b = w[..., channels, :, :], b[..., channels]
            proj, new_cache = causal_depthwise_conv(proj, conv_cache, w, b)
        return F.silu(proj), new_cache

    def _split_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, 3 * inner) -> q, k, v (B, H, T, head_dim): q and k l2-normalised, v too if configured (the
        one place both the update and the diagnostics take them from)."""
        qkv = rearrange(qkv, "b t (s h d) -> s b h t d", s=3, h=self.heads)
        # one normalisation pass over the stacked q and k (rows are normalised independently: the same values)
        if self.normalize_values:
            # unit-norm values keep the fitted fast weights O(1), so the curvature bound behind max_lr holds
            # (unnormalised values of norm ~10 drove the weights x45 within one 256-token segment and the inner
            # loop to NaN in MAC passkey training; benchmarks/RESULTS.md section 4e)
            q, k, v = F.normalize(qkv, dim=-1).unbind(0)
        else:
            (q, k), v = F.normalize(qkv[:2], dim=-1).unbind(0), qkv[2]
        return q, k, v

    def _gates(self, x: Tensor, state: MemoryState):
        """theta, eta, alpha: (B, H, T) each, and the chunk gates to carry."""
        raw = rearrange(self.to_gates(x), "b t (g h) -> b h t g", g=3)
        chunk_gates = state.chunk_gates
        if self.gates_per_chunk:
            T = x.shape[1]
            b = self.chunk_size
            t = torch.arange(T, device=x.device)
            start = t - (state.seen + t) % b  # local index of each token's chunk start (may be < 0)
            local = start.clamp(min=0)
            picked = raw[:, :, local]  # (B, H, T, 3)
            if state.seen % b:  # the call starts inside a chunk: its first tokens use the carried gates
                if chunk_gates is None:
                    raise ValueError("state.chunk_gates missing while resuming inside a chunk")
                carried = chunk_gates.to(raw.dtype).unsqueeze(2).expand_as(picked)
                picked = torch.where((start < 0).view(1, 1, T, 1), carried, picked)
            raw = picked
            chunk_gates = keep_last(raw, 1, 2).squeeze(2) if T else chunk_gates
        # the three gates' sigmoids in one kernel; unbind, not three selects: its backward is one stack
        sig_theta, sig_eta, sig_alpha = torch.sigmoid(raw).unbind(-1)
        eta = sig_eta if self.use_momentum else torch.zeros_like(sig_eta)
        theta = self.max_lr * (1 - eta) * sig_theta
        if self.use_weight_decay:
            alpha = sig_alpha
            if self.max_forget < 1.0:
                alpha = self.max_forget * alpha
        else:
            alpha = torch.zeros_like(sig_alpha)
        return theta, eta, alpha, (raw if self.gates_per_chunk else None), chunk_gates

    def _normed_gated(self, y: Tensor, g: Tensor | None, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """Per-head RMS norm with its ``weight`` (``out_norm_weight`` (H, d), or its segment stand-in (B, T, H, d)),
        times ``sigmoid(g)``: y (B, H, T, d), g (B, T, H * d) or None -> (B, T, H * d) in ``dtype``."""
        B, H, T, d = y.shape
        # the weight applied in the (B, T, H, d) layout, where (H, d) and a per-token stand-in both broadcast
        y = F.rms_norm(y, (d,), eps=self.norm_eps).transpose(1, 2) * weight.to(y.dtype)
        if g is not None:
            # the gate first: the product takes its (B, T, H, d) layout, so heads-to-features below is a view (no
            # copy for the transpose).  In y's dtype (the state's: float32 under autocast), cast once after
            y = torch.sigmoid(g).view(B, T, H, d) * y
        return y.reshape(B, T, H * d).to(dtype)

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMS norm, sigmoid gate from x, output projection.  y: (B, H, T, d) -> (B, T, dim)."""
        g = self.gate(x) if self.gate is not None else None
        # a cheap region: with TITANS_RECOMPUTE_CHEAP=1 recomputed in the backward (kept, the norm's and the gate's
        # float32 intermediates over every token are ~16 MB a layer per 4096 tokens, more than the memory update
        # itself keeps: benchmarks/RESULTS.md section 6, session 14); kept by default since session 33 (faster, for
        # memory to spare); the projections stay outside (their matmuls are not cheap to repeat)
        return self.to_out(recompute_when_recorded(self._normed_gated, y, g, segment_param(self, "out_norm_weight"),
                                                   x.dtype))

    # ------------------------------------------------------------------ forward / retrieve

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Write x into the memory and read it back token by token.

        x: (B, T, dim) -> y (B, T, dim) with y_t = M_t(q_t) after token t's update; returns the new state.
        """
        B, T, state = self._input_and_state(x, state)
        if T == 0:
            return x.new_zeros(B, 0, self.dim), state
        return self._write_read(x, state, lambda args: self._update_aligned(args, state, T))

    def step(self, x: Tensor, state: MemoryState, offset: Tensor) -> tuple[Tensor, MemoryState]:
        """One token, with the chunk grid decided on the device (static decoding, CUDA graphs).

        x: (B, 1, dim); ``offset``: 0-dim int64 tensor, the token's index inside its chunk (``state.seen``, a
        host int, is not read and is returned unchanged).  Same result as ``forward(x, state)``: the chunk's
        gradients are taken at the current weights when the token opens a chunk, and the chunk-start weights
        become the new weights when it completes one; ``torch.where`` replaces the host branches.
        """
        if self.gates_per_chunk:
            raise ValueError("memory_gates_per_chunk=True: the per-chunk gates are picked on the host; the static "
                             "single-token step supports per-token gates only (memory_gates_per_chunk=False)")
        self._check_x(x)
        if x.shape[1] != 1:
            raise ValueError(f"x: expected one token (B, 1, {self.dim}), got {tuple(x.shape)}")
        starts, ends = offset == 0, (offset + 1) % self.chunk_size == 0
        y, new = self._write_read(x, state, lambda args: self._token_step(_in_state_dtype(args, state), state, starts,
                                                                          ends))
        return y, MemoryState(new.weights, new.momentum, new.chunk_weights, state.seen, new.conv, new.chunk_gates)

    def write(self, x: Tensor, state: MemoryState | None = None) -> tuple[MemoryRead, MemoryState]:
        """Write x into the memory now and read it back later: returns ``(read, new state)`` with ``read.read()``
        equal to ``forward(x, state)[0]`` (values and gradients; tested in float64).

        Where the fused paths take the piece (whole chunks from a chunk boundary; Triton: memory depth 2) the
        update runs as two autograd nodes (:func:`~titans.core.memory.fused_update.neural_memory_update_split`):
        the state now, the read-out in ``read.read()``, whose backward needs only its output's gradient.  MAC's
        wavefront calls it on another CUDA stream, so that backward runs beside the chain of segments instead of
        on it.  Elsewhere the core's read-out is computed here and ``read`` holds it; the output norm, gate and
        projection run in ``read.read()`` either way."""
        B, T, state = self._input_and_state(x, state)
        C = self.chunk_size
        if T == 0:
            out, new = self.forward(x, state)
            return MemoryRead(self, out, x, done=True), new
        if T % C or state.seen % C:  # one node (forward's update); the read-back still waits for read()
            y, new = self._write(x, state, lambda args: self._update_aligned(args, state, T))
            return MemoryRead(self, y, x), new

        def update(args: list[Tensor]):
            which = resolve_backend(self.backend, args[0], args[1], args[2], state.weights, C, self.activation,
                                    self.residual, 0, strict=False)
            if which == "fused" or which == "triton" and len(state.weights) == 2:
                from titans.core.memory.fused_update import neural_memory_update_split

                if which == "fused":
                    args = _in_state_dtype(args, state)
                W, S, pending = neural_memory_update_split(*args, state.weights, state.momentum, chunk_size=C,
                                                           activation=self.activation, residual=self.residual,
                                                           impl="torch" if which == "fused" else "triton")
                return pending, W, S, W
            return self._update_aligned(args, state, T)

        y, new = self._write(x, state, update)
        return MemoryRead(self, y, x), new

    def _write_read(self, x: Tensor, state: MemoryState, update) -> tuple[Tensor, MemoryState]:
        """Project x, write it into the memory with ``update(args) -> (y, W, S, chunk-start W)`` (args: q, k, v,
        theta, eta, alpha in the state's dtype) and read back through the output norm / gate / projection."""
        y, new = self._write(x, state, update)
        return self._output(y, x), new

    def _write(self, x: Tensor, state: MemoryState, update):
        """:meth:`_write_read` without the read-back: ``(y or a pending read-out, new state)``."""
        qkv, conv = self._project(x, state.conv)
        q, k, v = self._split_qkv(qkv)
        theta, eta, alpha, _, chunk_gates = self._gates(x, state)
        # The inner loop is an optimiser: it runs in the state's dtype (float32 under bf16 autocast),
        # with autocast off so its matmuls and scans accumulate in full precision.
        with torch.autocast(x.device.type, enabled=False):
            mdtype = state.weights[0].dtype
            # q, k, v stay in their dtype (bf16 under autocast) until a path needs the state's: the Triton kernels
            # take them as they are (widened for the launch), so their backward keeps half the bytes (the same values:
            # a bf16 tensor widened is exact); every PyTorch path casts them first (_in_state_dtype)
            y, W, S, W0 = update([q, k, v] + [t.to(mdtype) for t in (theta, eta, alpha)])
        return y, MemoryState(W, S, W0, state.seen + x.shape[1], conv, chunk_gates)

    def _token_step(self, args: list[Tensor], state: MemoryState, starts: bool | Tensor, ends: bool | Tensor):
        """The rank-one step of one token: returns (y, W, S, chunk-start W).  ``starts``: the token opens a chunk
        (its gradient is taken at the current weights); ``ends``: it completes one (the next chunk starts at the
        new weights).  Host bools while streaming, 0-dim bool tensors in :meth:`step`.  ``args``: in the state's
        dtype (:func:`_in_state_dtype`)."""
        W0 = select_weights(starts, state.weights, state.chunk_weights)
        y, W, S = neural_memory_step(*args, state.weights, state.momentum, W0, activation=self.activation,
                                     residual=self.residual)
        return y, W, S, select_weights(ends, W, W0)

    def _update_aligned(self, args: list[Tensor], state: MemoryState, T: int):
        """Split a piece on the chunk grid: the tokens that finish the current chunk, the whole chunks, and
        the start of the last chunk.  The fused / Triton kernels take only whole chunks from a boundary, and
        a piece rarely is one (the memory of MAG / MAL / LMM reads the persistent tokens first, so every row
        starts 8 tokens into a chunk): without the split all of it went through the per-chunk loop.  Exact:
        each part continues from the previous part's state as a later streaming call would."""
        C = self.chunk_size
        offset = state.seen % C
        head = min(T, (C - offset) % C)
        body = (T - head) // C * C
        if self.backend in ("auto", "fused", "triton") and body and body < T:
            ys, st = [], state
            for a, b in ((0, head), (head, head + body), (head + body, T)):
                if b > a:
                    y, W, S, W0 = self._update_piece([t[:, :, a:b] for t in args], st, b - a)
                    ys.append(y)
                    st = MemoryState(W, S, W0, st.seen + b - a, None, None)
            return torch.cat(ys, dim=2), W, S, W0
        return self._update_piece(args, state, T)

    def _update_piece(self, args: list[Tensor], state: MemoryState, T: int):
        """One implementation call over ``T`` tokens from ``state``: returns (y, W, S, chunk-start W)."""
        offset = state.seen % self.chunk_size
        # non-strict: an explicit 'triton' meets pieces the kernels do not take (decode steps, pieces that
        # start mid-chunk) while streaming; those take the same exact fallback as 'auto'
        which = resolve_backend(self.backend, args[0], args[1], args[2], state.weights, self.chunk_size,
                                self.activation, self.residual, offset, strict=False)
        if which != "triton":
            args = _in_state_dtype(args, state)
        if T == 1 and which != "naive":
            # a decode step: the rank-one step instead of a one-token chunk
            y, W, S, W0 = self._token_step(args, state, offset == 0 or state.chunk_weights is None,
                                           (offset + 1) % self.chunk_size == 0)
        elif which in ("fused", "triton"):
            # the fused paths start at a chunk boundary and end on one (T % chunk_size == 0 is part of
            # their support check), so the chunk-start weights of the next chunk are the final weights
            from titans.core.memory.fused_update import neural_memory_update_fused

            y, W, S = neural_memory_update_fused(*args, state.weights, state.momentum,
                                                 chunk_size=self.chunk_size, activation=self.activation,
                                                 residual=self.residual, impl="torch" if which == "fused" else "triton")
            W0 = W
        elif which == "naive":
            y, W, S, W0, _ = neural_memory_update_naive(
                *args, state.weights, state.momentum, chunk_size=self.chunk_size, activation=self.activation,
                residual=self.residual, chunk_weights=state.chunk_weights, offset=offset,
                return_chunk_state=True, validate=False)
        else:
            y, W, S, W0, _ = neural_memory_update_chunked(
                *args, state.weights, state.momentum, chunk_size=self.chunk_size, activation=self.activation,
                residual=self.residual, chunk_weights=state.chunk_weights, offset=offset,
                return_chunk_state=True, validate=False, compiled=which == "compiled")
        return y, W, S, W0

    def retrieval_queries(self, x: Tensor, conv_cache: Tensor | None = None):
        """What a retrieval computes from its inputs alone, before it reads the memory: x (B, T, dim) -> ``(q, g,
        new_conv_cache)``, the queries q (B, H, T, d) (the module's W_Q, causal conv over the query stream whose
        cache is ``conv_cache``, SiLU, l2 norm), the output gate's input g (B, T, H * d) (None without the gate) and
        the stream's new cache.  :meth:`retrieve` with ``queries=(q, g)`` skips them (MAC's wavefront can compute
        them for a run of segments at once, off the segment chain)."""
        self._check_x(x, "x")
        q, new_cache = self._project(x, conv_cache, channels=slice(0, self.heads * self.head_dim))
        q = F.normalize(rearrange(q, "b t (h d) -> b h t d", h=self.heads), dim=-1)
        return q, (self.gate(x) if self.gate is not None else None), new_cache

    def retrieve(self, x_or_q: Tensor, state: MemoryState | None = None,
                 conv_cache: Tensor | None = None,
                 queries: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor | None]:
        """Read the memory without updating it (Eq. 15).  ``state`` is never modified.

        x_or_q: (B, T, dim) inputs (projected to queries with the module's W_Q, causal conv over the
        query stream whose cache is ``conv_cache`` (zeros if None), SiLU, l2 norm) -> (B, T, dim) after
        the output norm / gate / projection; or (B, H, T, d) ready queries -> raw memory output
        (B, H, T, d).  Returns ``(y, new_conv_cache)``; the cache belongs to the caller's query stream.
        ``queries``: x's ``(q, g)`` as :meth:`retrieval_queries` made them (the cache is then returned as given).
        """
        if x_or_q.ndim == 4:
            if state is None:
                state = self.init_state(x_or_q.shape[0], x_or_q.device)
            W = tuple(w.to(x_or_q.dtype) for w in state.weights)
            return memory_mlp(x_or_q, W, self.activation, self.residual), conv_cache
        self._check_x(x_or_q, "x_or_q")
        B = x_or_q.shape[0]
        if state is None:
            state = self.init_state(B, x_or_q.device)
        if queries is None:
            q, g, new_cache = self.retrieval_queries(x_or_q, conv_cache)
        else:
            (q, g), new_cache = queries, conv_cache
            if q.shape != (B, self.heads, x_or_q.shape[1], self.head_dim):
                raise ValueError(f"queries: q {tuple(q.shape)} does not match x_or_q {tuple(x_or_q.shape)} "
                                 f"({self.heads} heads of {self.head_dim})")

        def read(q: Tensor, g: Tensor | None, w_out: Tensor, *W: Tensor) -> Tensor:
            with torch.autocast(x_or_q.device.type, enabled=False):
                y = memory_mlp(q.to(W[0].dtype), W, self.activation, self.residual)
            return self._normed_gated(y, g, w_out, x_or_q.dtype)

        # the read and its output norm / gate: a cheap region (see _output; with TITANS_RECOMPUTE_CHEAP=1 recomputed
        # in the backward: the float32 hidden activations of the memory MLP are the largest tensors of a retrieval)
        return self.to_out(recompute_when_recorded(read, q, g, segment_param(self, "out_norm_weight"),
                                                   *state.weights)), new_cache

    def surprise(self, x: Tensor, state: MemoryState | None = None) -> dict[str, Tensor]:
        """Diagnostics without updating: per head and token the inner loss at the current weights and
        the gradient norm (momentary surprise), plus the gates.  Shapes (B, H, T)."""
        self._check_x(x)
        B = x.shape[0]
        if state is None:
            state = self.init_state(B, x.device)
        qkv, _ = self._project(x, state.conv)
        _, k, v = self._split_qkv(qkv)
        k = k.to(state.weights[0].dtype)
        v = v.to(k.dtype)
        from titans.core.memory.functional import _inner_backward

        hs, deltas = _inner_backward(k, v, state.weights, get_activation(self.activation), self.residual)
        out = memory_mlp(k, state.weights, self.activation, self.residual)
        loss = ((out - v) ** 2).sum(-1)
        # ||h^T delta||_F = ||h|| * ||delta|| for a rank-one per-token gradient
        sq = sum((h.pow(2).sum(-1) * d.pow(2).sum(-1)) for h, d in zip(hs, deltas))
        theta, eta, alpha, _, _ = self._gates(x, state)
        return {"inner_loss": loss, "grad_norm": sq.sqrt(), "theta": theta, "eta": eta, "alpha": alpha}


@dataclass
class MemoryRead:
    """What :meth:`NeuralMemory.write` leaves to read: the memory's output for its input x (B, T, dim), through
    :meth:`read`.  ``y``: the core's read-out (B, H, T, d), or a pending one (the split core), or with ``done``
    the finished output."""

    memory: NeuralMemory
    y: object
    x: Tensor
    done: bool = False

    def mismatch(self, other: MemoryRead) -> str | None:
        """Why ``other`` cannot be read back stacked with this read (:meth:`stack`), or None: the same memory, both
        pending read-outs that stack (:meth:`~titans.core.memory.fused_update.PendingReadout.mismatch`) or both
        tensors of the same kind, x of equal shapes."""
        if (other.memory is not self.memory or other.done != self.done
                or isinstance(other.y, Tensor) != isinstance(self.y, Tensor) or other.x.shape != self.x.shape):
            return (f" (x {tuple(other.x.shape)}, done={other.done}) differs from the first (x {tuple(self.x.shape)}, "
                    f"done={self.done}): one memory's reads, alike, of equal shapes")
        return None if isinstance(self.y, Tensor) else self.y.mismatch(other.y)

    @staticmethod
    def stack(reads: list[MemoryRead]) -> MemoryRead:
        """Reads of one memory, alike and of equal shapes, as one over their batches stacked (x (n B, T, dim), the
        first's batch first): ``MemoryRead.stack(rs).read()`` equals ``torch.cat([r.read() for r in rs])``, values
        and gradients (a pending read-out through :func:`~titans.core.memory.fused_update.stack_readouts`)."""
        first = reads[0]
        for i, r in enumerate(reads[1:], 1):
            why = first.mismatch(r)
            if why is not None:
                raise ValueError(f"MemoryRead.stack: read {i}{why}")
        if isinstance(first.y, Tensor):
            y = torch.cat([r.y for r in reads])
        else:
            from titans.core.memory.fused_update import stack_readouts

            y = stack_readouts([r.y for r in reads])
        return MemoryRead(first.memory, y, torch.cat([r.x for r in reads]), first.done)

    def read(self) -> Tensor:
        """The memory's output (B, T, dim) for x, as ``NeuralMemory.forward`` returns it."""
        if self.done:
            return self.y
        y = self.y
        if not isinstance(y, Tensor):
            with torch.autocast(self.x.device.type, enabled=False):  # the core's arithmetic, as in _write
                y = y.read()
        return self.memory._output(y, self.x)


def _in_state_dtype(args: list[Tensor], state: MemoryState) -> list[Tensor]:
    """The update's inputs (q, k, v, theta, eta, alpha) in the state's dtype, q / k / v laid out contiguously (they
    arrive as head-major views of the projection; one copy does the cast and the layout)."""
    dtype = state.weights[0].dtype
    return [t.to(dtype, memory_format=torch.contiguous_format) for t in args[:3]] + [t.to(dtype) for t in args[3:]]


__all__ = ["MemoryRead", "MemoryState", "NeuralMemory"]
