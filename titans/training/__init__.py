"""Training: the loop, optimizer and schedule, distributed wrappers."""

from titans.training.optimizer import build_optimizer, build_scheduler, decay_groups
from titans.training.trainer import evaluate_loss, train

__all__ = ["build_optimizer", "build_scheduler", "decay_groups", "evaluate_loss", "train"]
