"""The Python API: the same operations as the CLI, on modules and files.

``plan_expansion`` (`gpd plan`), ``expand`` (`gpd expand`), ``verify`` (`gpd verify`), ``extract``
(`gpd extract`), ``inspect`` (`gpd inspect`); `gpd train` is ``gpd_surgery.training.train``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .collapsing import collapse
from .branches import parse as parse_branches
from .expansion import (Student, build_teacher, check_ratio, check_teacher_memory, expand_tensors, init_branch_tensors,
                     make_plan, plan_branches, prepare, student_state)
from .io import load_teacher_file, save_teacher
from .maps import Maps
from .plan import DTYPES, Plan
from .rules import Registry
from .student_view import StudentView
from .verification import Report, verify as _verify


@dataclass
class Expanded:
    """A teacher made by inverse reparameterization: its plan, its file's tensors, and the traced student."""

    plan: Plan
    tensors: dict[str, torch.Tensor]
    student: Student
    maps: Maps
    seconds: float

    def teacher(self) -> fx.GraphModule:
        return build_teacher(self.student, self.maps, self.tensors, self.plan.branches)

    def save(self, path: str, *, durable: bool = False, overwrite: bool = False) -> None:
        """Write the teacher file atomically; ``durable`` also fsyncs it; an existing file is replaced only with
        ``overwrite`` (see ``io.atomic_write``)."""
        save_teacher(path, self.plan, self.tensors, durable=durable, overwrite=overwrite)

    def summary(self) -> dict[str, Any]:
        return summarize(self.plan, self.tensors, self.seconds)


@dataclass
class Planned:
    """A traced and analysed student with its plan: everything of an expansion but the teacher's tensors."""

    model: nn.Module
    student: Student
    plan: Plan
    maps: Maps
    seconds: float

    def build_bytes(self) -> int:
        """About the memory that building the teacher takes, on top of the student: twice the teacher's
        tensors plus its largest one. Working copies while widening a tensor and the allocator's
        fragmentation put measured peaks at 1.05x (vit_b_16 x2.5) to 1.8x (convnext_tiny x2) the
        teacher, and 2.5x for vgg11 x2, whose 1.6 GB classifier dominates."""
        sizes = [math.prod(shape) * DTYPES[dtype].itemsize for shape, dtype in self.plan.file_tensors().values()]
        return 2 * sum(sizes) + max(sizes, default=0)

    def build(self) -> Expanded:
        t0 = time.perf_counter()
        with torch.no_grad():
            tensors = expand_tensors(self.plan, student_state(self.model), self.maps)
            init_branch_tensors(self.plan, tensors)
        return Expanded(self.plan, tensors, self.student, self.maps, self.seconds + time.perf_counter() - t0)


def plan_expansion(model: nn.Module, input_shape: Any, ratio: float = 2.0, *, seed: int = 0,
                   equal_shares: bool = False, source: dict[str, Any] | None = None,
                   branches: str | tuple[str, ...] = (), force: bool = False, dry_run: bool = False,
                   rules: Registry | None = None, capture: str = "auto") -> Planned:
    """Trace and analyse ``model`` and plan its widening by ``ratio`` (with ``branches``, e.g. "default" or
    ("kxk", "lowrank")); no teacher tensor is made yet. An input shape whose forward, or a teacher whose
    tensors, would not fit in free memory is refused from sizes alone, before anything is allocated, unless
    ``force``; a ``dry_run`` (no teacher will be built) checks only the forward. ``rules``: a ``Registry`` of
    extra rules, layered over the default ones (see docs/extending.md). ``input_shape``: one input's shape, or
    ``InputSpec``s (several inputs, keyword inputs, token ids); ``capture``: "fx", "export" or "auto" (fx, and
    torch.export where fx cannot trace the model)."""
    ratio = check_ratio(ratio)
    t0 = time.perf_counter()
    model = model.eval()
    student = prepare(model, input_shape, force, rules, capture)
    check_teacher_memory(student.analysis, model, ratio, force or dry_run)
    source = {"input_shape": list(student.inputs[0].shape), "inputs": [s.to_json() for s in student.inputs],
              "capture": student.capture, **(source or {})}
    plan, maps = make_plan(student, model, ratio, seed, equal_shares, source)
    plan_branches(plan, student, parse_branches(branches) if isinstance(branches, str) else tuple(branches))
    return Planned(model, student, plan, maps, time.perf_counter() - t0)


def expand(model: nn.Module, input_shape: Any, ratio: float = 2.0, *, seed: int = 0,
           equal_shares: bool = False, source: dict[str, Any] | None = None,
           branches: str | tuple[str, ...] = (), rules: Registry | None = None, capture: str = "auto") -> Expanded:
    """Widen ``model`` by ``ratio`` so that the teacher computes exactly the student's function. ``rules``: a
    ``Registry`` of extra rules, layered over the default ones (see docs/extending.md); ``input_shape`` and
    ``capture``: as for :func:`plan_expansion`."""
    return plan_expansion(model, input_shape, ratio, seed=seed, equal_shares=equal_shares, source=source,
                          branches=branches, rules=rules, capture=capture).build()


def extract(path: str) -> dict[str, torch.Tensor]:
    """The student's state dict collapsed from a teacher file (no model code involved)."""
    plan, tensors = load_teacher_file(path)
    with torch.no_grad():
        return {k: v.contiguous() for k, v in collapse(plan, tensors).items()}


def verify(model: nn.Module, path: str, input_shape: Any = None, device: str | None = None,
           n_inputs: int = 3, *, trained: bool = False, rules: Registry | None = None) -> Report:
    """`gpd verify`: the teacher file at ``path`` against the student ``model`` (outputs, every node inside, and
    the extraction); ``trained``: the teacher was trained, so only the extraction check decides. ``rules``:
    those the teacher was expanded with."""
    plan, tensors = load_teacher_file(path)
    return _verify(model, plan, tensors, input_shape, device, n_inputs, trained=trained, rules=rules)


def inspect(path: str) -> dict[str, Any]:
    """`gpd inspect`: what a teacher or student file holds, from its header (no tensor data read)."""
    from .report import inspect_file

    return inspect_file(path)


def summarize(plan: Plan, tensors: dict[str, torch.Tensor], seconds: float | None = None) -> dict[str, Any]:
    params = [r for r in plan.recipes if r.kind == "param"]
    used = [r for r in params if r.dims]
    student = sum(_numel(r.shape) for r in params)
    teacher = sum(_numel(shape) for shape, _ in plan.teacher_parameters().values())
    out = {
        "ratio": plan.ratio,
        "student_params": student,
        "teacher_params": teacher,
        "param_ratio": teacher / student if student else 1.0,
        "teacher_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "widened_tensors": len(used),
        "spaces_expanded": plan.report.get("expanded", 0),
        "spaces_frozen": len(plan.report.get("frozen", [])),
        "frozen": plan.report.get("frozen", []),
        "unsupported_ops": plan.report.get("unsupported", []),
    }
    if seconds is not None:
        out["seconds"] = round(seconds, 3)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def load_teacher(path: str, student: nn.Module, input_shape: Any = None, *,
                 rules: Registry | None = None) -> fx.GraphModule:
    """The teacher in ``path`` as a trainable module, rebuilt over ``student``'s architecture (checked);
    ``rules``: those the teacher was expanded with."""
    from .verification import rebuild

    plan, tensors = load_teacher_file(path)
    _, _, teacher = rebuild(student.eval(), plan, tensors, plan.inputs(input_shape), rules)
    return teacher


def load_student_view(path: str, student: nn.Module, input_shape: Any = None, *,
                      rules: Registry | None = None) -> tuple[fx.GraphModule, StudentView]:
    """The teacher in ``path`` and its student view (sharing the teacher's parameters, own buffers); ``rules``:
    those the teacher was expanded with."""
    from .verification import rebuild

    plan, tensors = load_teacher_file(path)
    traced, _, teacher = rebuild(student.eval(), plan, tensors, plan.inputs(input_shape), rules)
    view = StudentView(teacher, plan, traced.gm)
    view.load_student_buffers(tensors)
    return teacher, view
