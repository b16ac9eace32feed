"""gpd-surgery: model surgery for Gap Preserving Distillation.

Trace a student with torch.fx, widen it into a teacher that computes exactly the
same function (inverse reparameterization), verify the equivalence, and collapse
a (trained) teacher back into the student (channel-branch reparameterization).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .analyse import Ctx
from .api import (Expanded, Planned, expand, extract, inspect, load_student_view, load_teacher, plan_expansion,
                  verify)
from .collapsing import collapse
from .errors import GPDError, PlanError
from .expansion import Sizes
from .io import load_teacher_file
from .plan import Plan
from .rules import Registry, register_rule
from .student_view import StudentView
from .verification import Report

__all__ = [
    "Ctx", "Expanded", "GPDError", "Plan", "PlanError", "Planned", "Registry", "Report", "Sizes", "StudentView",
    "collapse", "expand", "extract", "inspect", "load_student_view", "load_teacher", "load_teacher_file",
    "plan_expansion", "register_rule", "verify",
]
