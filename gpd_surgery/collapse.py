"""Channel-branch reparameterization: fold a teacher back to the student, from the plan alone.

``copy`` dims take the canonical copy of every student channel; ``share`` dims
sum over all copies. Pure indexing and summation, so it is differentiable: the
student view during training is ``functional_call(student, collapse(teacher))``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .branches import branch_shapes, merge
from .maps import Maps
from .plan import STUDENT_PREFIX, Plan, Recipe


def collapse_tensor(t: torch.Tensor, recipe: Recipe, maps: Maps) -> torch.Tensor:
    out = t
    for d, lay, mode in recipe.dims:
        if mode == "share":
            src = maps.src(lay).to(out.device)
            shape = list(out.shape)
            shape[d] = maps.size(lay)
            out = out.new_zeros(shape).index_add(d, src, out)
        else:
            out = out.index_select(d, maps.canon(lay).to(out.device))
    return out


def merged(plan: Plan, tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A teacher weight with its branches merged in (the weight itself when it has none)."""
    kinds = tuple(plan.branches.get(key, ()))
    if not kinds:
        return tensors[key]
    prefix = key[: -len("weight")]
    return merge(tensors[key], kinds, {n: tensors[prefix + n] for kind in kinds
                                       for n in branch_shapes(kind, tuple(tensors[key].shape))})


def collapse(plan: Plan, tensors: Mapping[str, torch.Tensor], *, buffers: bool = True,
             keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The student's state dict: parameters merged and folded from the teacher, buffers from the student's
    own copies. ``keys`` limits the result to those tensors (the ones a student graph uses)."""
    maps = plan.maps
    out: dict[str, torch.Tensor] = {}
    for r in plan.recipes:
        if keys is not None and r.key not in keys:
            continue
        if r.kind == "buffer":
            if buffers:
                out[r.key] = tensors[STUDENT_PREFIX + r.key]
        else:
            out[r.key] = collapse_tensor(merged(plan, tensors, r.key), r, maps)
    return out
