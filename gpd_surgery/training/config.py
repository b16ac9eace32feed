"""``TrainConfig``: every knob of a training run, checked when it is made."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GPDError

DISTILL_KINDS = ("kl", "sce")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}


@dataclass
class TrainConfig:
    """Every knob of a run. ``lr`` and ``weight_decay`` default by optimizer (SGD: 0.1, 5e-4; AdamW: 1e-3,
    0.05). ``batch_size`` is the *global* batch, split evenly among DDP processes."""

    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    warmup_epochs: float = 0.0
    lam: float = 3.0  # weight of the dynamic teacher -> student distillation (lambda in the paper)
    teacher_ce: float = 1.0
    student_ce: float = 1.0
    static_teacher_weight: float = 1.0  # static teacher -> dynamic teacher (when a static teacher is given)
    static_student_weight: float = 1.0  # static teacher -> student (when a static teacher is given)
    distill: str = "kl"
    temperature: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    plain: bool = False  # train the student alone (the baseline): no dynamic teacher
    # Not part of the result (may change between a run and its resume):
    device: Optional[str] = None
    num_workers: int = 0
    stop_after: Optional[int] = None  # end this run after that many epochs (a later --resume continues)

    RUNTIME = ("device", "num_workers", "stop_after")

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()
        self.distill = self.distill.lower()
        if self.optimizer not in OPTIMIZERS:
            raise GPDError(f"unknown optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.distill not in DISTILL_KINDS:
            raise GPDError(f"unknown distillation loss {self.distill!r}: choose {' or '.join(DISTILL_KINDS)}")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"--temperature must be > 0, got {self.temperature}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.stop_after is None or self.stop_after >= 1, f"--stop-after must be >= 1, got {self.stop_after}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for name in ("lam", "teacher_ce", "student_ce", "static_teacher_weight", "static_student_weight", "momentum"):
            v = getattr(self, name)
            checks.append((math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}"))
        for ok, message in checks:
            if not ok:
                raise GPDError(message)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WD[self.optimizer]

    def fingerprint(self) -> dict[str, Any]:
        """What the result depends on: a resumed run must have the same."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME}
        d["lr"], d["weight_decay"] = self.base_lr, self.decay
        return d
