"""Model EMA of the student: an exponential moving average of the student's weights (collapsed from the teacher
under GPD) and of its own buffers, updated after every optimizer step.

What it is: ``ema = decay * ema + (1 - decay) * student`` over the student's ``state_dict()`` (floating tensors;
integer buffers such as BatchNorm's ``num_batches_tracked`` are copied). Under GPD the student is a function of
the teacher, so its EMA is not a function of any teacher: it is a separate student of the same architecture,
evaluated on its own (``val_ema`` in the history) and written as ``student_ema.safetensors`` at the end; the
teacher file and ``student.safetensors`` (the exact extraction) are unchanged by it. It lives in
``train_state.pt``, so that a resumed run continues the same average.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..errors import GPDError
from .models import GPDModel, logits


def _student_module(model: nn.Module) -> nn.Module:
    return model.view.student if isinstance(model, GPDModel) else model.student


def _current(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's parameters (collapsed, under GPD) and buffers now, detached, on the model's device."""
    if isinstance(model, GPDModel):
        return model.view.student_state_dict()
    return {k: v.detach() for k, v in model.student.state_dict().items()}


class StudentEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.state = {k: v.clone() for k, v in _current(model).items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in _current(self.model).items():
            e = self.state[k]
            if e.is_floating_point():
                e.lerp_(v.to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(v)

    def forward(self, x: torch.Tensor) -> Any:
        """The EMA student's output (the caller sets eval mode and no_grad)."""
        return logits(functional_call(_student_module(self.model), self.state, (x,)))

    def to(self, device: torch.device) -> "StudentEMA":
        self.state = {k: v.to(device) for k, v in self.state.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def load(self, saved: Any, path: str) -> None:
        """A saved average, checked: this student's tensors (names, shapes, dtypes), finite values."""
        ok = isinstance(saved, Mapping) and set(saved) == set(self.state)
        for k, v in (saved.items() if ok else ()):
            ref = self.state[k]
            if (not isinstance(v, torch.Tensor) or v.shape != ref.shape or v.dtype != ref.dtype
                    or (v.is_floating_point() and not bool(torch.isfinite(v).all()))):
                ok = False
                break
        if not ok:
            raise GPDError(f"cannot resume: {path} holds a malformed ema (expected the student's tensors, finite); "
                           "start over with --force")
        with torch.no_grad():
            for k, v in saved.items():
                self.state[k].copy_(v)

    def student_file(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA student as a ``state_dict()`` file: the extracted student's keys, the averaged values."""
        out = dict(model.student_state_dict())
        for k, v in self.state.items():
            if k in out:
                out[k] = v.detach().cpu().to(out[k].dtype).contiguous()
        return out
