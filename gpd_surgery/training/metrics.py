"""Loss and accuracy of the teacher and the student: running sums during an epoch, and validation."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import DistEnv
from .models import GPDModel


class Meter:
    """Sums over the samples seen: each model's cross-entropy on the labels and its correct predictions, and the
    objective (the loss being minimized); all-reduced across processes at the end of an epoch."""

    def __init__(self, device: torch.device) -> None:
        # teacher CE, teacher correct, student CE, student correct, objective, samples
        self.v = torch.zeros(6, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, y: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor | None = None,
            objective: torch.Tensor | None = None) -> None:
        n = len(y)
        if t_logits is not None:
            self.v[0] += F.cross_entropy(t_logits.float(), y).double() * n
            self.v[1] += (t_logits.argmax(-1) == y).sum()
        self.v[2] += F.cross_entropy(s_logits.float(), y).double() * n
        self.v[3] += (s_logits.argmax(-1) == y).sum()
        if objective is not None:
            self.v[4] += objective.detach().double() * n
        self.v[5] += n

    def reduce(self, env: DistEnv) -> None:
        if env.active:
            dist.all_reduce(self.v)

    def summary(self, teacher: bool, objective: bool = False) -> dict[str, float]:
        tl, tc, sl, sc, obj, n = self.v.tolist()
        n = max(n, 1.0)
        out = {"student_loss": sl / n, "student_acc": sc / n}
        if teacher:
            out.update(teacher_loss=tl / n, teacher_acc=tc / n)
        if objective:
            out["objective"] = obj / n
        return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype,
             env: DistEnv | None = None, num_workers: int = 0) -> dict[str, float]:
    """Cross-entropy and accuracy of the teacher (GPD) and the student in eval mode; each process takes every
    world-th sample and the sums are all-reduced."""
    env = env or DistEnv()
    part = Subset(data, range(env.rank, len(data), env.world)) if env.active else data
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was = model.training
    model.eval()
    meter = Meter(device)
    gpd = isinstance(model, GPDModel)
    for x, y in loader:
        x, y = x.to(device, dtype=dtype), y.to(device)
        t, s = model(x)
        meter.add(y, s, t)
    meter.reduce(env)
    model.train(was)
    return meter.summary(gpd)
