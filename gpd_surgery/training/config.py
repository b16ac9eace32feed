"""``TrainConfig``: every knob of a training run, checked when it is made."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GPDError

DISTILL_KINDS = ("kl", "sce", "dkd")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
AMP_MODES = ("off", "bf16", "fp16")
BRANCH_INITS = ("zero", "active")
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
    distill: str = "kl"  # dynamic teacher -> student
    static_distill: Optional[str] = None  # the static-teacher terms (default: as ``distill``)
    temperature: float = 1.0
    label_smoothing: float = 0.0  # of the label cross-entropies only
    sce_smoothing: float = 0.1  # the sce soft target: (1 - e) p + e / K (the official 0.9 p + 0.1 / K)
    dkd_alpha: float = 1.0  # DKD: target-class term (the official value)
    dkd_beta: float = 0.5  # DKD: non-target term (official: 0.5 for ResNet-18, 2.0 for MobileNet)
    schedule: str = "cosine"
    decay_epochs: tuple[int, ...] = (30, 60, 90)  # step schedule: multiply by decay_rate at each
    decay_rate: float = 0.1
    clip_grad: Optional[float] = None  # max global gradient norm (official: 5)
    ema: Optional[float] = None  # decay of the student's EMA (official: 0.99996)
    branch_init: str = "zero"  # active: branch scales at the official from-scratch values
    mixup: float = 0.0  # alpha of timm's Mixup (0: off)
    cutmix: float = 0.0  # alpha of timm's CutMix (0: off)
    amp: str = "off"
    channels_last: bool = False
    seed: int = 0
    plain: bool = False  # train the student alone (the baseline): no dynamic teacher
    # Not part of the result (may change between a run and its resume):
    device: Optional[str] = None
    num_workers: int = 0
    stop_after: Optional[int] = None  # end this run after that many epochs (a later --resume continues)
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"
    tensorboard: bool = False

    RUNTIME = ("device", "num_workers", "stop_after", "compile", "compile_backend", "tensorboard")

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()
        self.distill = self.distill.lower()
        self.static_distill = self.static_distill.lower() if self.static_distill else None
        self.decay_epochs = tuple(self.decay_epochs)
        for value, kinds, what in ((self.optimizer, OPTIMIZERS, "optimizer"),
                                   (self.distill, DISTILL_KINDS, "distillation loss"),
                                   (self.static_distill or "kl", DISTILL_KINDS, "distillation loss"),
                                   (self.schedule, SCHEDULES, "--sched"), (self.amp, AMP_MODES, "--amp"),
                                   (self.branch_init, BRANCH_INITS, "--branch-init")):
            if value not in kinds:
                raise GPDError(f"unknown {what} {value!r}: choose {', '.join(kinds)}")
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
            (0 <= self.sce_smoothing < 1, f"--sce-smoothing must be in [0, 1), got {self.sce_smoothing}"),
            (all(type(e) is int and e >= 1 for e in self.decay_epochs) and list(self.decay_epochs)
             == sorted(set(self.decay_epochs)), f"--decay-epochs must be increasing whole epochs >= 1, "
             f"got {list(self.decay_epochs)}"),
            (math.isfinite(self.decay_rate) and 0 < self.decay_rate <= 1,
             f"--decay-rate must be in (0, 1], got {self.decay_rate}"),
            (self.clip_grad is None or (math.isfinite(self.clip_grad) and self.clip_grad > 0),
             f"--clip-grad must be > 0, got {self.clip_grad}"),
            (self.ema is None or 0 < self.ema < 1, f"--ema must be a decay in (0, 1), got {self.ema}"),
            (not ("dkd" in (self.distill, self.static_distill) and (self.mixup or self.cutmix)),
             "dkd needs hard labels: it does not go with --mixup or --cutmix"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.stop_after is None or self.stop_after >= 1, f"--stop-after must be >= 1, got {self.stop_after}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for name in ("lam", "teacher_ce", "student_ce", "static_teacher_weight", "static_student_weight", "momentum",
                     "dkd_alpha", "dkd_beta", "mixup", "cutmix"):
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
        d["decay_epochs"] = list(self.decay_epochs)  # as JSON and torch.load give it back
        d["static_distill"] = self.static_kind
        return d

    @property
    def static_kind(self) -> str:
        return self.static_distill or self.distill
