"""Loss and accuracy (top-1, top-5) of the teacher and the student: running sums during an epoch, and validation."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import DistEnv
from .models import GPDModel


def _correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum()


class Meter:
    """Sums over the samples seen: each model's cross-entropy on the labels and its correct predictions (top-1,
    top-5), and the objective (the loss being minimized); all-reduced across processes at the end of an epoch.
    Soft labels (mixup) count the most probable class as the label."""

    def __init__(self, device: torch.device) -> None:
        # teacher CE, teacher correct, student CE, student correct, objective, samples, teacher top-5, student top-5
        self.v = torch.zeros(8, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, y: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor | None = None,
            objective: torch.Tensor | None = None) -> None:
        n = len(y)
        hard = y if y.dim() == 1 else y.argmax(-1)
        if t_logits is not None:
            self.v[0] += F.cross_entropy(t_logits.float(), y).double() * n
            self.v[1] += (t_logits.argmax(-1) == hard).sum()
            self.v[6] += _correct(t_logits, hard, 5)
        self.v[2] += F.cross_entropy(s_logits.float(), y).double() * n
        self.v[3] += (s_logits.argmax(-1) == hard).sum()
        self.v[7] += _correct(s_logits, hard, 5)
        if objective is not None:
            self.v[4] += objective.detach().double() * n
        self.v[5] += n

    def reduce(self, env: DistEnv) -> None:
        if env.active:
            dist.all_reduce(self.v)

    def summary(self, teacher: bool, objective: bool = False, top5: bool = False) -> dict[str, float]:
        tl, tc, sl, sc, obj, n, t5, s5 = self.v.tolist()
        n = max(n, 1.0)
        out = {"student_loss": sl / n, "student_acc": sc / n}
        if top5:
            out["student_top5"] = s5 / n
        if teacher:
            out.update(teacher_loss=tl / n, teacher_acc=tc / n)
            if top5:
                out["teacher_top5"] = t5 / n
        if objective:
            out["objective"] = obj / n
        return out


def autocast(device: torch.device, amp: str) -> Any:
    """Mixed precision for the forward (``bf16`` or ``fp16``); parameters stay float32."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype,
             env: DistEnv | None = None, num_workers: int = 0, amp: str = "off",
             forward: Callable[[torch.Tensor], Any] | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy of the teacher (GPD) and the student in eval mode; each process
    takes every world-th sample and the sums are all-reduced. ``forward``: another student (the EMA), whose
    metrics are reported as the student's."""
    env = env or DistEnv()
    part = Subset(data, range(env.rank, len(data), env.world)) if env.active else data
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was = model.training
    model.eval()
    meter = Meter(device)
    gpd = isinstance(model, GPDModel) and forward is None
    for x, y in loader:
        x, y = x.to(device, dtype=dtype), y.to(device)
        if x.dim() == 4:
            x = x.contiguous(memory_format=memory_format)
        with autocast(device, amp):
            if forward is not None:
                t, s = None, forward(x)
            else:
                t, s = model(x)
        meter.add(y, s, t)
    meter.reduce(env)
    model.train(was)
    return meter.summary(gpd, top5=True)
