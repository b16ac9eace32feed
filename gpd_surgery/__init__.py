"""gpd-surgery: model surgery for Gap Preserving Distillation.

Trace a student with torch.fx, widen it into a teacher that computes exactly the
same function (inverse reparameterization), verify the equivalence, and collapse
a (trained) teacher back into the student (channel-branch reparameterization).
"""
from .api import Expanded, expand, extract, load_student_view, load_teacher, verify
from .student_view import StudentView
from .collapse import collapse
from .errors import GPDError, PlanError
from .io import load_teacher_file
from .plan import Plan

__version__ = "0.1.0"
__all__ = [
    "Expanded", "GPDError", "Plan", "PlanError", "StudentView", "collapse", "expand", "extract", "load_student_view",
    "load_teacher", "load_teacher_file", "verify",
]
