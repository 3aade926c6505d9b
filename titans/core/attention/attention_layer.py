"""One causal multi-head attention module (RoPE, optional qk-norm, optional GQA) whose mask is data.

Backends give the same outputs: ``reference`` (dense mask, explicit softmax; any device), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``), ``blocked`` (sliding windows over whole sequences:
SDPA over query blocks of one window, memory linear in T) and ``flex`` (FlexAttention with a block mask:
CUDA only, no T x T mask).  A :class:`KVCache` carries earlier tokens of the stream; it is pruned after
every call to what later queries can still see, so for sliding and segment masks its size is bounded by
the window / segment, not by the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.core.attention.attention_utils import (
    MaskSpec,
    PositionRuns,
    RotaryEmbedding,
    build_dense_mask,
    dense_mask,
    flex_mask_mod,
)
from titans.utils.tensors import keep_last
from titans.utils.weight_grads import TappedLinear


@dataclass
class KVCache:
    """Keys / values of earlier context tokens (and MAC memory tokens) of one stream.

    k, v: (B, Hkv, n, hd); pos: (n,) absolute positions.  mk, mv, mpos: the same for memory tokens.
    end: one past the last cached position, kept on the host so that checking a new piece's position costs
    no device sync while decoding (None for a cache rebuilt from tensors: then read from ``pos``).
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    mk: Tensor | None = None
    mv: Tensor | None = None
    mpos: Tensor | None = None
    end: int | None = None

    def _map(self, fn) -> KVCache:
        return KVCache(*(None if t is None else fn(t) for t in (self.k, self.v, self.pos, self.mk, self.mv, self.mpos)),
                       end=self.end)

    def last_position(self) -> int:
        return self.end - 1 if self.end is not None else int(self.pos[-1])

    def detach(self) -> KVCache:
        return self._map(lambda t: t.detach())

    def to(self, device=None) -> KVCache:
        return self._map(lambda t: t.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos, self.mk, self.mv, self.mpos)
                   if t is not None)

    def __len__(self) -> int:
        return int(self.pos.shape[0])


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception:  # noqa: BLE001 - older torch
        return False
    return True


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attention(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, q_pos: Tensor, k_pos: Tensor,
              mem_pos: Tensor | None = None, backend: str = "reference", runs: PositionRuns | None = None) -> Tensor:
    """Masked softmax attention over keys laid out as [prefix | memory | context].

    q: (B, H, Tq, hd); k, v: (B, Hkv, Tk_total, hd) with Hkv dividing H; q_pos (Tq,), k_pos (Tk,),
    mem_pos (Tm,) absolute positions.  ``runs``: the same positions as host-side runs when they are (the dense
    mask is then looked up, not built).  Returns (B, H, Tq, hd).
    """
    H, Hkv = q.shape[1], k.shape[1]
    n_mem = 0 if mem_pos is None else mem_pos.shape[0]
    if backend == "flex":
        if n_mem or q_pos.shape != k_pos.shape or spec.kind == "segment":
            raise ValueError("backend='flex': whole sequences only (no cache, no memory tokens, no segments)")
        block_mask = _block_mask(spec, q.shape[2], k.shape[2], q.device)
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=H != Hkv)
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if backend == "blocked":
        if spec.kind == "segment":
            return segment_blocked(q, k, v, spec)
        return sliding_window_blocked(q, k, v, spec)
    if backend == "sdpa":
        # a whole sequence passes the same position tensor for queries and keys (no device sync to check)
        plain_causal = spec.kind == "causal" and spec.prefix_len == 0 and n_mem == 0 and q_pos is k_pos
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if runs is None:
            mask = build_dense_mask(spec, q_pos, k_pos, mem_pos)
        else:
            mask = dense_mask(spec, runs, q.device, q.dtype)  # additive, as SDPA would make it
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend != "reference":
        raise ValueError(f"backend={backend!r}: expected 'reference', 'sdpa', 'blocked', 'flex' or 'auto'")
    mask = build_dense_mask(spec, q_pos, k_pos, mem_pos) if runs is None else dense_mask(spec, runs, q.device)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sliding_window_blocked(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec) -> Tensor:
    """Sliding-window attention over a whole sequence without a T x T mask.

    Queries are cut into blocks of W = window tokens; block b attends to [prefix | context tokens of blocks
    b-1 and b], which covers every key the window allows.  Block 0 (nothing before it) is one SDPA call over its
    own keys; blocks 1.. are one call with a single (W, P + 2W) mask, the same relative to every block start, so
    no mask grows with T or the heads.  q: (B, H, T, hd); k, v: (B, H, P + T, hd), keys laid out [prefix |
    context] with query i at context position i.
    """
    if spec.kind != "sliding" or spec.memory_tokens:
        raise ValueError("sliding_window_blocked: sliding masks without memory tokens only")
    B, H, T, hd = q.shape
    P, W = spec.prefix_len, spec.window
    nb = -(-T // W)
    pad = nb * W - T
    # padding at the end to whole blocks (padded keys lie after every real query: causally masked)
    ck = F.pad(k[:, :, P:], (0, 0, 0, pad))
    cv = F.pad(v[:, :, P:], (0, 0, 0, pad))
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, W, hd)
    i = torch.arange(W, device=q.device)
    first = _blocked_sdpa(qb[:, :, :1], ck[:, :, None, :W], cv[:, :, None, :W],
                          spec.allowed(i[:, None], i[None, :]), k, v, P, min(T, W))
    if nb == 1:
        return first
    # keys of block b >= 1: context [(b-1) W, (b+1) W); query W + i of that window sees keys j in (i, W + i]
    kb = ck.unfold(2, 2 * W, W).transpose(-1, -2)  # (B, H, nb - 1, 2W, hd)
    vb = cv.unfold(2, 2 * W, W).transpose(-1, -2)
    ok = spec.allowed(W + i[:, None], torch.arange(2 * W, device=q.device)[None, :])
    rest = _blocked_sdpa(qb[:, :, 1:], kb, vb, ok, k, v, P, T - W)
    return torch.cat([first, rest], dim=2)


def _blocked_sdpa(qb: Tensor, kb: Tensor, vb: Tensor, ok: Tensor, k: Tensor, v: Tensor, P: int, T: int) -> Tensor:
    """Prepend the P prefix keys (every query sees them) to every block and run one SDPA call.

    qb: (B, H, nb, W, hd); kb, vb: (B, H, nb, Wk, hd); ok: (W, Wk) bool, the same for every block; k, v: the full
    [prefix | context] keys.  Returns (B, H, T, hd) for the first T of the nb * W queries (the rest is padding)."""
    B, H, nb, W, hd = qb.shape
    if P:
        kb = torch.cat([k[:, :, None, :P].expand(B, H, nb, P, hd), kb], 3)
        vb = torch.cat([v[:, :, None, :P].expand(B, H, nb, P, hd), vb], 3)
        ok = torch.cat([torch.ones(W, P, dtype=torch.bool, device=ok.device), ok], -1)
    # SDPA's fused kernels (flash, cuDNN, memory-efficient) take 4-D inputs only: with (B, H, nb, W, hd) it falls
    # back to the math path, which materialises and saves the float32 probabilities.  Blocks are independent, so
    # they fold into the head dimension (a view where qb is contiguous; unfold's strided keys copy once)
    Wk = kb.shape[3]
    out = F.scaled_dot_product_attention(qb.reshape(B, H * nb, W, hd), kb.reshape(B, H * nb, Wk, hd),
                                         vb.reshape(B, H * nb, Wk, hd), attn_mask=ok)
    return out.reshape(B, H, nb * W, hd)[:, :, :T]  # the fused kernels may return another layout: not a view


def segment_blocked(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec) -> Tensor:
    """Segment-local attention over a whole sequence that starts on a segment boundary, without a T x T mask.

    Segment b (W = window tokens) attends to [prefix | its own tokens, causally]: one SDPA call over all
    segments with a (W, P + W) mask, so memory and work are linear in T.  q: (B, H, T, hd); k, v:
    (B, H, P + T, hd) laid out [prefix | context], query i at context position i, position 0 the start of
    a segment (the caller checks the alignment).
    """
    if spec.kind != "segment" or spec.memory_tokens:
        raise ValueError("segment_blocked: segment masks without memory tokens only")
    B, H, T, hd = q.shape
    P, W = spec.prefix_len, spec.window
    nb = -(-T // W)
    pad = nb * W - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, nb, W, hd)
    kb = F.pad(k[:, :, P:], (0, 0, 0, pad)).view(B, H, nb, W, hd)
    vb = F.pad(v[:, :, P:], (0, 0, 0, pad)).view(B, H, nb, W, hd)
    idx = torch.arange(W, device=q.device)
    ok = spec.allowed(idx[:, None], idx[None, :])  # inside one segment: causal
    return _blocked_sdpa(qb, kb, vb, ok, k, v, P, T)


@lru_cache(maxsize=64)
def _block_mask(spec: MaskSpec, Tq: int, Tk: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(flex_mask_mod(spec), B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=device)


@dataclass
class PrefixKV:
    """The keys and values of prefix tokens (B, Hkv, N_p, hd) each, from :meth:`CausalSelfAttention.prefix_kv`:
    given to ``forward`` as its ``prefix`` when one caller attends over the same prefix many times (MAC's segments:
    the persistent tokens' projection once per block call, not once per segment)."""

    k: Tensor
    v: Tensor


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE, optional RMS qk-norm and grouped-query heads.

    forward(x (B, T, D), mask=MaskSpec, start_pos, prefix (N_p, D) | (B, N_p, D), memory (B, T, D),
    cache, projected=(q, k, v) of x already made by :meth:`project`) -> (out (B, T, D), cache or None).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float = 10000.0, qk_norm: bool = False, backend: str = "auto",
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        head_dim = head_dim or dim // heads
        if backend not in ("auto", "reference", "sdpa", "blocked", "flex"):
            raise ValueError(f"backend={backend!r}: expected 'auto', 'reference', 'sdpa', 'blocked' or 'flex'")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.backend = backend
        self.q_proj = TappedLinear(dim, heads * head_dim, bias=False)
        self.kv_proj = TappedLinear(dim, 2 * kv_heads * head_dim, bias=False)
        self.o_proj = TappedLinear(heads * head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.kv_proj(x).view(*x.shape[:-1], 2, self.kv_heads, self.head_dim)
        k, v = kv.unbind(-3)
        k, v = k.transpose(-2, -3), v.transpose(-2, -3)  # (..., Hkv, T, hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def _pick_backend(self, spec: MaskSpec, device: torch.device, T: int, whole_sequence: bool,
                      start_pos: int = 0) -> str:
        """FlexAttention for long whole sequences with sliding / prefixed causal masks on CUDA (no T x T
        mask); SDPA otherwise: plain causal uses its flash path, and decode steps, cached pieces and MAC
        segments only build small (T x window-sized) masks."""
        flex_ok = (device.type == "cuda" and whole_sequence and spec.kind != "segment"
                   and not spec.memory_tokens and _flex_available())
        if self.backend == "flex":
            if not flex_ok:
                raise ValueError("backend='flex' needs CUDA and a whole causal / sliding sequence "
                                 "(no cache, no memory tokens, no segment mask)")
            return "flex"
        segment_ok = spec.kind == "segment" and start_pos % spec.window == 0
        if self.backend == "blocked":
            if not (spec.kind == "sliding" or segment_ok) or spec.memory_tokens or not whole_sequence:
                raise ValueError("backend='blocked' needs a whole sliding-window sequence or a whole segmented "
                                 "sequence starting on a segment boundary (no cache, no memory tokens)")
            return "blocked"
        if self.backend != "auto":
            return self.backend
        if spec.kind == "sliding" and whole_sequence and not spec.memory_tokens and T > 2 * spec.window:
            return "blocked"  # linear memory in T, SDPA kernels
        if segment_ok and whole_sequence and not spec.memory_tokens and T > spec.window:
            return "blocked"  # segments as a batch: no T x T mask
        plain_causal = spec.kind == "causal" and spec.prefix_len == 0
        return "flex" if flex_ok and T >= 128 and not plain_causal else "sdpa"

    def check_inputs(self, x: Tensor, mask: MaskSpec, prefix: Tensor | PrefixKV | None,
                     memory: Tensor | None) -> None:
        """Shape checks shared by :meth:`forward` and static decoding (host-side only: no device sync)."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, T, {self.dim}), got {got}")
        if mask.memory_tokens != (memory is not None):
            raise ValueError("memory: must be given exactly when mask.memory_tokens is True "
                             f"(memory_tokens={mask.memory_tokens}, memory={'given' if memory is not None else None})")
        if memory is not None and memory.shape != x.shape:
            raise ValueError(f"memory: expected shape {tuple(x.shape)} (aligned with x), got {tuple(memory.shape)}")
        if isinstance(prefix, PrefixKV):
            want = (x.shape[0], self.kv_heads, mask.prefix_len, self.head_dim)
            if tuple(prefix.k.shape) != want or tuple(prefix.v.shape) != want:
                raise ValueError(f"prefix: PrefixKV keys / values of shape {tuple(prefix.k.shape)} / "
                                 f"{tuple(prefix.v.shape)}, expected {want}")
            return
        n_prefix = 0 if prefix is None else prefix.shape[-2]
        if n_prefix != mask.prefix_len:
            raise ValueError(f"prefix: has {n_prefix} tokens but mask.prefix_len={mask.prefix_len}")
        if prefix is not None and (prefix.ndim not in (2, 3) or prefix.shape[-1] != self.dim):
            raise ValueError(f"prefix: expected shape (N_p, {self.dim}) or (B, N_p, {self.dim}), "
                             f"got {tuple(prefix.shape)}")

    def project(self, x: Tensor, pos: int | Tensor, memory: Tensor | None = None,
                projected: tuple[Tensor, Tensor, Tensor] | None = None):
        """Queries, keys and values of x (B, T, D) at absolute positions ``pos``: a host int, the first of T
        consecutive positions (streaming: the rotary tables are slices of kept ones), or a (T,) device tensor
        (static decoding's device position).  Rotated by RoPE: q (B, H, T, hd), k, v (B, Hkv, T, hd), and the
        keys / values of the memory tokens ``memory`` (B, T, D) at the same positions (or None, None).
        ``projected``: x's ``(q, k, v)`` as this method returned them before (made for a longer run at once, MAC's
        batched segment inputs): only the memory tokens are projected."""
        B, T, _ = x.shape
        if projected is not None:
            q, k, v = projected
            want_q, want_kv = (B, self.heads, T, self.head_dim), (B, self.kv_heads, T, self.head_dim)
            if tuple(q.shape) != want_q or tuple(k.shape) != want_kv or tuple(v.shape) != want_kv:
                raise ValueError(f"projected: q / k / v of shape {tuple(q.shape)} / {tuple(k.shape)} / "
                                 f"{tuple(v.shape)}, expected {want_q} / {want_kv} / {want_kv} for x {tuple(x.shape)}")
            if memory is None:
                return q, k, v, None, None
            mk, mv = self._kv(memory)
            return q, k, v, self.rope.rotate(mk, *self.rope.cos_sin(pos, T, q.dtype, x.device)), mv
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        rope = self.rope.cos_sin(pos, T, q.dtype, x.device)
        q = self.rope.rotate(q, *rope)
        if memory is None:
            k, v = self._kv(x)
            return q, self.rope.rotate(k, *rope), v, None, None
        # context and memory tokens share positions: one projection and one rotation of both, stacked on the batch
        k, v = self._kv(torch.cat([x, memory]))
        (k, mk), (v, mv) = self.rope.rotate(k, *rope).split(B), v.split(B)
        return q, k, v, mk, mv

    def prefix_kv(self, prefix: Tensor, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys / values of the prefix tokens (N_p, D) or (B, N_p, D) (no RoPE: they have no position):
        (B, Hkv, N_p, hd) each."""
        pk, pv = self._kv(prefix.to(dtype))
        if pk.ndim == 3:
            pk, pv = pk.unsqueeze(0), pv.unsqueeze(0)
        return pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1)

    def merge_heads(self, out: Tensor) -> Tensor:
        """(B, H, T, hd) attention output -> (B, T, D) through the output projection."""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def forward(self, x: Tensor, *, mask: MaskSpec, start_pos: int = 0, prefix: Tensor | PrefixKV | None = None,
                memory: Tensor | None = None, cache: KVCache | None = None, return_cache: bool = False,
                projected: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, KVCache | None]:
        self.check_inputs(x, mask, prefix, memory)
        B, T, _ = x.shape
        dev = x.device
        pos = torch.arange(start_pos, start_pos + T, device=dev)
        if cache is not None and len(cache) and cache.last_position() >= start_pos:
            raise ValueError(f"start_pos={start_pos}: the cache already holds position {cache.last_position()}")

        q, k, v, mk, mv = self.project(x, start_pos, memory, projected)
        ctx_k, ctx_v, ctx_pos = k, v, pos
        if cache is not None and len(cache):
            ctx_k, ctx_v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
            ctx_pos = torch.cat([cache.pos, pos])
        keys, values = [ctx_k], [ctx_v]
        mem_k = mem_v = mem_pos = None
        if memory is not None:
            mem_k, mem_v, mem_pos = mk, mv, pos
            if cache is not None and cache.mk is not None and len(cache.mpos):
                mem_k, mem_v = torch.cat([cache.mk, mk], 2), torch.cat([cache.mv, mv], 2)
                mem_pos = torch.cat([cache.mpos, pos])
            keys.insert(0, mem_k)
            values.insert(0, mem_v)
        if prefix is not None:
            pk, pv = (prefix.k, prefix.v) if isinstance(prefix, PrefixKV) else self.prefix_kv(prefix, B, x.dtype)
            keys.insert(0, pk)
            values.insert(0, pv)
        K = torch.cat(keys, 2) if len(keys) > 1 else keys[0]
        V = torch.cat(values, 2) if len(values) > 1 else values[0]
        whole = cache is None or len(cache) == 0
        runs = None
        if whole or cache.end == start_pos:  # the cache holds the run just before the piece (as forward keeps it)
            runs = PositionRuns((start_pos, T), (start_pos + T - ctx_pos.shape[0], ctx_pos.shape[0]),
                                None if mem_pos is None else (start_pos + T - mem_pos.shape[0], mem_pos.shape[0]))
        out = attention(q, K, V, mask, pos, ctx_pos, mem_pos, self._pick_backend(mask, dev, T, whole, start_pos), runs)
        out = self.merge_heads(out)

        new_cache = None
        if return_cache:
            # cached positions are always a contiguous run ending at start_pos + T - 1, so what stays is a
            # suffix whose length is known on the host: a slice, no boolean indexing (no device sync, no
            # data-dependent shape for torch.compile)
            last = start_pos + T - 1
            keep = mask.kept_positions(last)
            n = min(ctx_pos.shape[0], keep)
            new_cache = KVCache(keep_last(ctx_k, n, 2), keep_last(ctx_v, n, 2), keep_last(ctx_pos, n, 0),
                                end=last + 1)
            if mem_pos is not None:
                nm = min(mem_pos.shape[0], keep)
                new_cache.mk, new_cache.mv = keep_last(mem_k, nm, 2), keep_last(mem_v, nm, 2)
                new_cache.mpos = keep_last(mem_pos, nm, 0)
        return out, new_cache
