"""What is trained: ``GPDModel`` (the dynamic teacher and the student view over shared parameters) or
``PlainModel`` (the student alone, the baseline). Both return ``(teacher_logits, student_logits)`` from one
forward, so that DistributedDataParallel sees a single forward and backward.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..collapsing import collapse
from ..errors import GPDError, first_line
from ..io import load_teacher_file, save_teacher
from ..plan import DTYPE_NAMES, STUDENT_PREFIX, Plan
from ..student_view import StudentView


class GPDModel(nn.Module):
    """The dynamic teacher and the student view over the same parameters; the student keeps its own buffers.

    ``forward(x)`` returns ``(teacher_logits, student_logits)``. ``parameters()`` are the teacher's (the view
    shares them), so one optimizer and one DDP wrapper cover both. The student view's BatchNorms use and,
    in train mode, update the student's own running statistics; the teacher's use its own.
    """

    def __init__(self, teacher: fx.GraphModule, plan: Plan, student_gm: fx.GraphModule,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.teacher = teacher
        self.source_file: str | None = None  # the teacher file it was read from, for messages
        self.view = StudentView(teacher, plan, student_gm)
        expected = plan.file_tensors()
        # The student's buffers as the file holds them: kept for those the student graph does not use.
        self._file_buffers = {k: v.detach().clone() for k, v in (tensors or {}).items()
                              if k.startswith(STUDENT_PREFIX) and k in expected}
        if tensors is not None:
            self.view.load_student_buffers(dict(tensors))

    @classmethod
    def from_expanded(cls, expanded: Any) -> "GPDModel":
        """From ``gpd_surgery.expand(...)``'s result (the teacher shares its tensors with ``expanded.tensors``)."""
        return cls(expanded.teacher(), expanded.plan, expanded.student.gm, expanded.tensors)

    @classmethod
    def from_file(cls, path: str, student: nn.Module, input_shape: tuple[int, ...] | None = None) -> "GPDModel":
        """From a teacher file (trained or not), rebuilt over ``student``'s architecture (checked)."""
        from ..verification import rebuild

        plan, tensors = load_teacher_file(path)
        shape = plan.input_shape(input_shape)
        traced, _, teacher = rebuild(copy.deepcopy(student).eval(), plan, tensors, shape)
        model = cls(teacher, plan, traced.gm, tensors)
        model.source_file = path
        return model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits(self.teacher(x)), logits(self.view(x))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The teacher file's tensors now: teacher parameters and buffers, the student's current buffers."""
        expected = self.plan.file_tensors()
        out = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items() if k in expected}
        out.update(self._file_buffers)
        for name, buf in self.view.student.named_buffers():
            if STUDENT_PREFIX + name in expected:
                out[STUDENT_PREFIX + name] = buf.detach().cpu()
        got = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype)) for k, v in out.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got)) or sorted(k for k in got if got[k] != expected.get(k))
            raise RuntimeError(f"the teacher's tensors do not match its plan (first: {missing[:1]})")
        return {k: out[k].contiguous() for k in expected}

    def save(self, path: str, *, overwrite: bool = False) -> None:
        save_teacher(path, self.plan, self.file_tensors(), durable=True, overwrite=overwrite)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """What `gpd extract` would write from the current teacher file: the original ``state_dict()``'s keys."""
        with torch.no_grad():
            return {k: v.detach().contiguous() for k, v in collapse(self.plan, self.file_tensors()).items()}


class PlainModel(nn.Module):
    """The baseline: the student trained alone. ``forward(x)`` returns ``(None, student_logits)``; its checkpoint
    file is the student's ``state_dict()``."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, logits(self.student(x))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return self.student_state_dict()

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}


# The official code's from-scratch values of its OREPA branch scales (its "origin" and "avg" branches 0.25, "1x1-kxk"
# 0.5, "1x1" 0.05), by the branch of ours that plays the same part; the official code has no linear branches, whose
# 0.25 is ours.
ACTIVE_SCALES = {"kxk": 0.25, "avg": 0.25, "1x1_kxk": 0.5, "1x1": 0.05, "lowrank": 0.25, "full": 0.25}


def activate_branches(model: GPDModel) -> int:
    """Branch scales at ``ACTIVE_SCALES`` instead of 0 (``--branch-init active``, training from scratch): the
    branches train from the first step, and the teacher (and the student, which collapses the merged kernels) no
    longer computes the random student it was expanded from, which from scratch does not matter. Returns the
    number of scale tensors set."""
    from ..branches import PREFIX

    n = 0
    with torch.no_grad():
        for name, p in model.teacher.named_parameters():
            leaf = name.rpartition(".")[2]
            if leaf.startswith(PREFIX) and leaf.endswith("_scale"):
                kind = leaf[len(PREFIX):-len("_scale")]
                p.fill_(ACTIVE_SCALES[kind])
                n += 1
    return n


def logits(y: Any) -> Any:
    """A classifier's logits from its output: the tensor itself, the first of a tuple (auxiliary heads), or a
    Hugging Face output's ``logits``."""
    if isinstance(y, Mapping):
        return y["logits"] if "logits" in y else next(iter(y.values()), y)
    if isinstance(y, (tuple, list)) and y:
        return y[0]
    return y


def num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The size of the model's last output dimension (its number of classes), from one forward in eval mode."""
    m = copy.deepcopy(model).eval()
    p = next(iter(m.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    shape = (2, *input_shape[1:])
    try:
        with torch.no_grad():
            y = m(torch.zeros(shape, dtype=dtype))
    except Exception as e:
        raise GPDError(f"the model rejects an input of shape {shape}: {type(e).__name__}: {first_line(e)} "
                       "(check --image-size)") from None
    y = logits(y)
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise GPDError(f"the model's output is not a batch of logits (got {getattr(y, 'shape', type(y).__name__)})")
    return int(y.shape[-1])
