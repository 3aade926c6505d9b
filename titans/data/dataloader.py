"""Deterministic batching of packed fixed-length sequences from token shards.

The batch of a step is a pure function of (seed, step, rank, world_size): resuming at step s, or
splitting a global batch across DDP ranks, sees exactly the tokens an uninterrupted single-process run
would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from titans.data.dataset import ShardDataset, prepare_shards
from titans.data.preprocessing import Tokenizer, load_tokenizer
from titans.utils.config import DataConfig


class TokenBatcher:
    """Random windows of ``seq_len + 1`` tokens.  The global batch at a step has
    ``world_size * batch_size`` rows; rank r takes rows [r * batch_size, (r + 1) * batch_size)."""

    def __init__(self, dataset: ShardDataset, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(dataset) < seq_len + 2:
            raise ValueError(f"dataset has {len(dataset)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def offsets(self, step: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        total = self.batch_size * self.world_size
        return torch.randint(0, len(self.dataset) - self.seq_len - 1, (total,), generator=g).numpy()

    def batch(self, step: int) -> torch.Tensor:
        """LongTensor (batch_size, seq_len + 1)."""
        offs = self.offsets(step)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = [self.dataset.get(int(o), self.seq_len + 1).astype(np.int64) for o in offs]
        return torch.from_numpy(np.stack(rows))


def eval_batches(dataset: ShardDataset, seq_len: int, batch_size: int, max_batches: int) -> Iterator[torch.Tensor]:
    """Deterministic contiguous, non-overlapping windows of ``seq_len + 1`` tokens from the start."""
    n_windows = (len(dataset) - 1) // seq_len
    idx = 0
    for _ in range(max_batches):
        rows = []
        while len(rows) < batch_size and idx < n_windows:
            rows.append(dataset.get(idx * seq_len, seq_len + 1).astype(np.int64))
            idx += 1
        if not rows:
            return
        yield torch.from_numpy(np.stack(rows))


def _cache_key(cfg: DataConfig) -> str:
    blob = json.dumps({"source": cfg.source, "tokenizer": cfg.tokenizer, "max_bytes": cfg.max_bytes,
                       "val_fraction": cfg.val_fraction, "text_field": cfg.text_field}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_data(cfg: DataConfig, cache_root: str | Path, progress: bool = True
               ) -> tuple[ShardDataset, ShardDataset, Tokenizer]:
    """Train / val datasets and the tokenizer for a data config, preparing shards on first use."""
    src = Path(cfg.source)
    if src.is_dir() and (src / "manifest.json").is_file():
        shard_dir = src
    elif cfg.shards_dir and (Path(cfg.shards_dir) / "manifest.json").is_file():
        shard_dir = Path(cfg.shards_dir)
    else:
        shard_dir = Path(cfg.shards_dir) if cfg.shards_dir else Path(cache_root) / _cache_key(cfg)
        if not (shard_dir / "manifest.json").is_file():
            prepare_shards(cfg.source, shard_dir, load_tokenizer(cfg.tokenizer), text_field=cfg.text_field,
                           val_fraction=cfg.val_fraction, max_bytes=cfg.max_bytes, progress=progress)
    train, val = ShardDataset(shard_dir, "train"), ShardDataset(shard_dir, "val")
    tokenizer = load_tokenizer(train.manifest["tokenizer"])
    return train, val, tokenizer
