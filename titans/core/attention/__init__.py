"""Causal multi-head attention with masks as data (full causal, sliding window, segment; prefixes)."""

from titans.core.attention.attention_layer import CausalSelfAttention, KVCache, attention
from titans.core.attention.attention_utils import (
    MaskSpec,
    RotaryEmbedding,
    build_dense_mask,
    causal_mask,
    segment_mask,
    sliding_window_mask,
)

__all__ = [
    "CausalSelfAttention", "KVCache", "MaskSpec", "RotaryEmbedding", "attention", "build_dense_mask",
    "causal_mask", "segment_mask", "sliding_window_mask",
]
