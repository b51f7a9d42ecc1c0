"""Optimisers and learning-rate schedules shared by teacher and student training.

The schedule is a per-iteration multiplier of the base learning rate: linear warmup from
``warmup_ratio`` (mmdetection's default 0.001) over ``warmup_iters``, then either steps
(×``gamma`` at each milestone, given in iterations) or a cosine decay to ``min_ratio``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ScheduleConfig:
    total_iters: int
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    kind: str = "step"                      # "step" | "cosine"
    milestones: tuple[int, ...] = field(default_factory=tuple)   # iterations, for "step"
    gamma: float = 0.1
    min_ratio: float = 0.0                  # cosine floor, as a fraction of the base lr

    def __post_init__(self):
        if self.kind not in ("step", "cosine"):
            raise ValueError(f"unknown schedule kind {self.kind!r}: use 'step' or 'cosine'")


def lr_factor(it: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based)."""
    if cfg.kind == "step":
        factor = cfg.gamma ** sum(it >= m for m in cfg.milestones)
    else:
        progress = min(1.0, it / max(1, cfg.total_iters))
        factor = cfg.min_ratio + (1 - cfg.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def build_sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD as mmdetection's detection configs use it: weight decay on every trainable parameter."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)
