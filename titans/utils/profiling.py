"""Analytic FLOP counts per token (``titans profile``), split by attention / memory / MLP / other.

Forward FLOPs count 2 per multiply-add; training is taken as 3x forward (forward + backward).
The attention context is the average number of keys a query sees under the variant's mask.
"""

from __future__ import annotations

from titans.utils.config import ModelConfig


def _attention_context(cfg: ModelConfig, seq_len: int) -> float:
    P = cfg.persistent_tokens
    if cfg.variant == "transformer":
        return P + (seq_len + 1) / 2
    if cfg.variant == "mac":  # segment-causal over context and retrieved memory tokens
        C = min(cfg.window, seq_len)
        return P + 2 * (C + 1) / 2
    W = min(cfg.window, seq_len)
    return P + W - (W * W - W) / (2 * seq_len)  # sliding window, exact average over positions


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token: {"attention", "memory", "mlp", "other", "total"}."""
    d, hd = cfg.dim, cfg.dim // cfg.heads
    kv = cfg.kv_heads or cfg.heads
    attn = mem = 0.0
    mh = cfg.memory_heads or cfg.heads
    mhd = cfg.dim // mh
    hidden = max(1, int(round(cfg.memory_expansion * mhd)))
    dims = [mhd] + [hidden] * (cfg.memory_depth - 1) + [mhd]
    mm = sum(a * b for a, b in zip(dims, dims[1:]))  # one MLP application, multiply-adds per head
    n = cfg.memory_chunk_size
    for layer in range(cfg.depth):
        has_mem = cfg.layer_has_memory(layer)
        if not (cfg.variant == "lmm" and has_mem):
            ctx = _attention_context(cfg, seq_len)
            attn += 2 * d * (2 * cfg.heads * hd + 2 * kv * hd) + 2 * 2 * cfg.heads * hd * ctx
            if cfg.variant == "mac" and has_mem:
                attn += 2 * d * 2 * kv * hd  # keys / values of the retrieved tokens
        if has_mem:
            inner = mh * mhd
            mem += 2 * d * 3 * inner + 2 * d * 3 * mh + 2 * inner * d + 2 * d * inner  # q/k/v, gates, out, gate
            # per head: forward at chunk-start weights + backprop (2 MLPs), output: x W, x S, and the
            # within-chunk (x . h) delta products; weight / momentum update amortised over the chunk
            per_head = 2 * (2 * mm) + 2 * (2 * mm) + sum(2 * n * (a + b) for a, b in zip(dims, dims[1:])) / 2
            per_head += 2 * 2 * mm * 2 / n
            mem += mh * per_head
            if cfg.variant == "mac":
                mem += mh * 2 * mm + 2 * d * inner  # retrieval with the pre-segment memory
    mlp = cfg.depth * 2 * 3 * d * cfg.ffn_hidden
    other = 2 * d * cfg.vocab_size
    fwd = {"attention": attn, "memory": mem, "mlp": mlp, "other": other}
    out = {k: 3 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out
