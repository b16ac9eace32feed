"""The student as a differentiable function of the teacher's parameters (parameter sharing in GPD).

``StudentView(teacher, plan, student)`` computes the student's forward from
``collapse(teacher parameters)`` and the student's own buffers: gradients of a loss on the
student's output reach the teacher's parameters, and the student's BatchNorm statistics stay its own.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .collapsing import collapse
from .plan import STUDENT_PREFIX, Plan


def strip_parameters(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that keeps its buffers and has no parameters (they come from the teacher).

    Each parameter stays registered as ``None`` rather than being deleted: the graph's ``get_attr``
    nodes (a ViT's class token) still name an attribute, so the copy can itself be deep-copied."""
    out = copy.deepcopy(gm)
    for name, _ in list(out.named_parameters()):
        owner, _, attr = name.rpartition(".")
        (out.get_submodule(owner) if owner else out)._parameters[attr] = None
    return out


class StudentView(nn.Module):
    def __init__(self, teacher: nn.Module, plan: Plan, student: fx.GraphModule) -> None:
        super().__init__()
        self.teacher = teacher
        self.plan = plan
        self._param_keys = {k for k, _ in student.named_parameters()}
        self.student = strip_parameters(student)

    def load_student_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the student's own buffers (``student/NAME`` in a teacher file)."""
        with torch.no_grad():
            for name, buf in self.student.named_buffers():
                src = tensors.get(STUDENT_PREFIX + name)
                if src is not None:
                    buf.copy_(src)

    def student_parameters(self) -> dict[str, torch.Tensor]:
        """The student's parameters, collapsed from the teacher's (differentiable)."""
        tensors = dict(self.teacher.named_parameters())
        return collapse(self.plan, tensors, buffers=False, keys=self._param_keys)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        params = self.student_parameters()
        for name, m in self.student.named_modules():
            if isinstance(m, nn.RNNBase):  # an RNN runs on its cached list of weights, not its attributes
                m._flat_weights = [params.get(f"{name}.{w}", getattr(m, w, None)) for w in m._flat_weights_names]
        return functional_call(self.student, params, args)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """Collapsed parameters and the student's own buffers, detached: what `gpd extract` writes."""
        with torch.no_grad():
            state = {k: v.detach() for k, v in self.student_parameters().items()}
        state.update({k: v.detach() for k, v in self.student.named_buffers()})
        return state
