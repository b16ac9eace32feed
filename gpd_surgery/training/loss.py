"""The paper's objective.

- dynamic teacher: ``teacher_ce * CE(t, y)`` (+ ``static_teacher_weight * D(t, static)``);
- student: ``student_ce * CE(s, y) + lam * D(s, t.detach())`` (+ ``static_student_weight * D(s, static)``);

where ``D`` is KL divergence at a temperature (``kl``) or a soft-target cross-entropy whose targets
are label-smoothed (``sce``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GPDError
from .config import TrainConfig


def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "kl", temperature: float = 1.0,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Distillation of ``target`` logits into ``student`` logits, averaged over the batch and scaled by T^2.

    ``kl``: KL(softmax(target/T) || softmax(student/T)). ``sce``: cross-entropy of the student against the
    soft targets softmax(target/T), label-smoothed towards the uniform distribution.
    """
    t = temperature
    log_s = F.log_softmax(student / t, dim=-1)
    if kind == "kl":
        log_p = F.log_softmax(target / t, dim=-1)
        return F.kl_div(log_s, log_p, reduction="batchmean", log_target=True) * (t * t)
    if kind == "sce":
        p = F.softmax(target / t, dim=-1)
        if label_smoothing > 0:
            p = p * (1 - label_smoothing) + label_smoothing / p.shape[-1]
        return -(p * log_s).sum(dim=-1).mean() * (t * t)
    raise GPDError(f"unknown distillation loss {kind!r}")


class GPDLoss:
    """The paper's objective; every weight comes from ``TrainConfig``. Returns the total loss and its parts
    (``teacher``, ``student``: each model's own terms)."""

    def __init__(self, config: TrainConfig) -> None:
        self.c = config

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.c.label_smoothing)

    def _d(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return distill_loss(student, target.detach(), self.c.distill, self.c.temperature, self.c.label_smoothing)

    def __call__(self, teacher: torch.Tensor | None, student: torch.Tensor, y: torch.Tensor,
                 static: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.c
        parts: dict[str, torch.Tensor] = {}
        total = student.new_zeros(())
        if teacher is not None:
            lt = c.teacher_ce * self._ce(teacher, y)
            if static is not None and c.static_teacher_weight:
                lt = lt + c.static_teacher_weight * self._d(teacher, static)
            parts["teacher"] = lt
            total = total + lt
        ls = c.student_ce * self._ce(student, y)
        if teacher is not None and c.lam:
            ls = ls + c.lam * self._d(student, teacher)
        if static is not None and c.static_student_weight:
            ls = ls + c.static_student_weight * self._d(student, static)
        parts["student"] = ls
        return total + ls, parts
