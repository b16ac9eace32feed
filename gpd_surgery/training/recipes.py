"""The official recipes as presets (``--recipe``): what guoyongcs/GPD's commands for ResNet-18 on ImageNet set,
in this tool's options. An option given explicitly wins over its recipe's value.

- ``gpd-scratch`` (their "train from scratch"): SGD, lr 0.1, momentum 0.9, weight decay 1e-4, 100 epochs, the
  rate x0.1 at epochs 30, 60 and 90, no warm-up, gradients clipped at norm 5, the student's EMA at 0.99996,
  dynamic teacher -> student by ``sce`` (target 0.9 p + 0.1 / K) with weight 3, no label smoothing, ratio 2,
  branches active from the start.
- ``gpd-finetune`` (their "fine-tuning" of pretrained weights): the same with lr 0.01, 50 epochs (one drop, at
  30) and branches starting at zero, so that the teacher starts as the pretrained student.

Not set (the official batch is 512 on 4 GPUs; pick one that fits): the batch size, the data, the augmentation.
"""
from __future__ import annotations

from typing import Any

from ..errors import GPDError

_COMMON: dict[str, Any] = {
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step", "decay_epochs": (30, 60, 90),
    "decay_rate": 0.1, "warmup_epochs": 0.0, "clip_grad": 5.0, "ema": 0.99996, "distill": "sce",
    "sce_smoothing": 0.1, "lam": 3.0, "label_smoothing": 0.0, "ratio": "2",
}
RECIPES: dict[str, dict[str, Any]] = {
    "gpd-scratch": {**_COMMON, "lr": 0.1, "epochs": 100, "branch_init": "active"},
    "gpd-finetune": {**_COMMON, "lr": 0.01, "epochs": 50, "branch_init": "zero"},
}
# What an option is when neither it nor a recipe sets it.
DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd", "momentum": 0.9, "weight_decay": None, "schedule": "cosine", "decay_epochs": (30, 60, 90),
    "decay_rate": 0.1, "warmup_epochs": 0.0, "clip_grad": None, "ema": None, "distill": "kl", "sce_smoothing": 0.1,
    "lam": 3.0, "label_smoothing": 0.0, "ratio": None, "lr": None, "epochs": 10, "branch_init": "zero",
}


def resolve(recipe: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The value of every option ``RECIPES`` can set: the one ``given`` (not None), else the recipe's, else the
    default."""
    if recipe is not None and recipe not in RECIPES:
        raise GPDError(f"unknown --recipe {recipe!r}: choose {', '.join(RECIPES)}")
    preset = RECIPES.get(recipe or "", {})
    return {k: given[k] if given.get(k) is not None else preset.get(k, DEFAULTS[k]) for k in DEFAULTS}
