"""torch.distributed set-up: under ``torchrun`` init the process group and wrap the model with DDP or
FSDP2; a plain single process is left untouched."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from titans.utils.config import TrainingConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainingConfig) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); init NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def wrap_model(model: nn.Module, cfg: TrainingConfig, dist: DistInfo, device: torch.device) -> nn.Module:
    if dist.world_size <= 1:
        return model
    if cfg.distributed == "fsdp":
        defers = getattr(model, "defers_weight_grads", None)
        if defers is not None and defers(in_wavefront=False):  # (the wavefront is single-process)
            # FSDP2 reduce-scatters a block's gradients once the gradients of its inputs are done; the deferred
            # sums (titans.utils.weight_grads) are not on that path and could land after it
            raise ValueError("deferred weight gradients (training.defer_weight_grads=true or "
                             "TITANS_DEFER_WEIGHT_GRADS=1) do not work with training.distributed=fsdp (use ddp, or "
                             "leave them to the wavefront)")
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
