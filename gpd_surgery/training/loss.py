"""The paper's objective.

- dynamic teacher: ``teacher_ce * CE(t, y)`` (+ ``static_teacher_weight * D_static(t, static)``);
- student: ``student_ce * CE(s, y) + lam * D(s, t.detach())`` (+ ``static_student_weight * D_static(s, static)``);

where ``D`` (``distill``) and ``D_static`` (``static_distill``) are each KL divergence at a temperature (``kl``),
a soft-target cross-entropy against ``(1 - e) softmax(target / T) + e / K`` (``sce``; the official code's
``e = 0.1``), or decoupled KD (``dkd``, Zhao et al. 2022: ``alpha`` x target-class KL + ``beta`` x non-target
KL). Label smoothing applies to the label cross-entropies only. Labels may be soft (mixup, cutmix): class
probabilities per sample. Losses are computed in float32 whatever the autocast dtype of the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GPDError
from .config import TrainConfig

_MASK = -1.0e4  # logits of classes taken out of a softmax: far below any other, finite (0 * -inf would be NaN)


def _f(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) in float32 for the losses; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "kl", temperature: float = 1.0,
                 smoothing: float = 0.0, labels: torch.Tensor | None = None, alpha: float = 1.0,
                 beta: float = 0.5) -> torch.Tensor:
    """Distillation of ``target`` logits into ``student`` logits, averaged over the batch and scaled by T^2.

    ``kl``: KL(softmax(target/T) || softmax(student/T)). ``sce``: cross-entropy of the student against the
    soft targets softmax(target/T), smoothed towards the uniform distribution by ``smoothing``. ``dkd``: decoupled
    KD, which needs the hard ``labels``.
    """
    t = temperature
    student, target = _f(student), _f(target)
    if kind == "dkd":
        if labels is None or labels.dim() != 1:
            raise GPDError("dkd needs hard labels (it does not go with mixup or cutmix)")
        return dkd_loss(student, target, labels, alpha, beta, t)
    log_s = F.log_softmax(student / t, dim=-1)
    if kind == "kl":
        log_p = F.log_softmax(target / t, dim=-1)
        return F.kl_div(log_s, log_p, reduction="batchmean", log_target=True) * (t * t)
    if kind == "sce":
        p = F.softmax(target / t, dim=-1)
        if smoothing > 0:
            p = p * (1 - smoothing) + smoothing / p.shape[-1]
        return -(p * log_s).sum(dim=-1).mean() * (t * t)
    raise GPDError(f"unknown distillation loss {kind!r}")


def dkd_loss(student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
             temperature: float) -> torch.Tensor:
    """Decoupled knowledge distillation: the binary split "true class / all others" of both distributions
    compared by KL (TCKD, weight ``alpha``), and the distributions over the other classes alone (NCKD, ``beta``)."""
    t = temperature
    gt = F.one_hot(labels, student.shape[-1]).bool()
    p_s, p_t = F.softmax(student / t, dim=-1), F.softmax(target / t, dim=-1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        true = (p * gt).sum(-1, keepdim=True)
        return torch.cat([true, 1 - true], dim=-1).clamp_min(1e-12)

    b_s, b_t = binary(p_s), binary(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean()
    log_ns = F.log_softmax((student / t).masked_fill(gt, _MASK), dim=-1)
    log_nt = F.log_softmax((target / t).masked_fill(gt, _MASK), dim=-1)
    nckd = F.kl_div(log_ns, log_nt, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (t * t)


class GPDLoss:
    """The paper's objective; every weight comes from ``TrainConfig``. Returns the total loss and its parts
    (``teacher``, ``student``: each model's own terms). ``y``: class indices, or class probabilities (mixup)."""

    def __init__(self, config: TrainConfig) -> None:
        self.c = config

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _f(logits)
        if y.is_floating_point():  # soft labels (mixup): timm's Mixup has smoothed them already
            return F.cross_entropy(logits, y.to(logits.dtype))
        return F.cross_entropy(logits, y, label_smoothing=self.c.label_smoothing)

    def _d(self, student: torch.Tensor, target: torch.Tensor, kind: str, y: torch.Tensor) -> torch.Tensor:
        c = self.c
        return distill_loss(student, target.detach(), kind, c.temperature, c.sce_smoothing, y, c.dkd_alpha, c.dkd_beta)

    def __call__(self, teacher: torch.Tensor | None, student: torch.Tensor, y: torch.Tensor,
                 static: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.c
        parts: dict[str, torch.Tensor] = {}
        total = _f(student).new_zeros(())
        if teacher is not None:
            lt = c.teacher_ce * self._ce(teacher, y)
            if static is not None and c.static_teacher_weight:
                lt = lt + c.static_teacher_weight * self._d(teacher, static, c.static_kind, y)
            parts["teacher"] = lt
            total = total + lt
        ls = c.student_ce * self._ce(student, y)
        if teacher is not None and c.lam:
            ls = ls + c.lam * self._d(student, teacher, c.distill, y)
        if static is not None and c.static_student_weight:
            ls = ls + c.static_student_weight * self._d(student, static, c.static_kind, y)
        parts["student"] = ls
        return total + ls, parts
