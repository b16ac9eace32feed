"""The optimizer and its schedule: SGD or AdamW, linear warm-up then cosine decay, set per step."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on 1-d tensors (norms, biases, branch scales)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": c.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.base_lr, momentum=c.momentum)
    return torch.optim.AdamW(groups, lr=c.base_lr)


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str = "cosine",
          milestones: tuple[int, ...] = (), rate: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total`` (``cosine``) or ``base`` times
    ``rate`` once per milestone step passed (``step``, as torch's MultiStepLR and the official from-scratch
    recipe: x0.1 at epochs 30, 60, 90). A pure function of the step, so that a resumed run needs no scheduler
    state (timm's and torch's schedulers compute the same values; they would add state to check on resume)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "step":
        return base * rate ** sum(1 for m in milestones if step >= m)
    span = max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
