"""Channel-branch reparameterization: fold a teacher back to the student, from the plan alone.

``copy`` dims take the canonical copy of every student channel; ``share`` dims
sum over all copies. Pure indexing and summation, so it is differentiable: the
student view during training is ``functional_call(student, collapse(teacher))``.

The copies of a channel are summed last copy first: ``split_among_copies`` leaves in
every copy but the last a part ``p_k`` of a remainder ``R_k`` with ``R_k - p_k`` exact,
so adding from the last copy back gives every ``R_k`` in turn and finally the student's
weight, bit for bit, however many copies a channel has.

Fast paths for the common maps (whole tiles, as at integer ratios): a canonical copy
that is the first block of channels is a slice (a view, no copy while training), and
whole tiles are summed with one addition per tile instead of an index pass.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .branches import branch_shapes, merge
from .maps import Maps
from .plan import STUDENT_PREFIX, Plan, Recipe


class _SumTiles(torch.autograd.Function):
    """Sum the ``n`` whole tiles of dim ``d``, the last tile first; the gradient repeats along ``d``."""

    @staticmethod
    def forward(t: torch.Tensor, d: int, n: int) -> torch.Tensor:  # type: ignore[override]
        tiles = t.unflatten(d, (n, t.shape[d] // n))
        out = tiles.select(d, n - 1) + tiles.select(d, n - 2)
        for k in range(n - 3, -1, -1):
            out.add_(tiles.select(d, k))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _, ctx.d, ctx.n = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        reps = [1] * grad.dim()
        reps[ctx.d] = ctx.n
        return grad.repeat(reps), None, None


def collapse_tensor(t: torch.Tensor, recipe: Recipe, maps: Maps) -> torch.Tensor:
    out = t
    for d, lay, mode in recipe.dims:
        if mode == "share":
            tiles = maps.tiles(lay)
            if tiles:
                out = _SumTiles.apply(out, d, tiles)
            else:  # copies summed in reverse teacher order, i.e. last copy first
                src = maps.src(lay, out.device)
                back = torch.arange(len(src) - 1, -1, -1, device=out.device)
                shape = list(out.shape)
                shape[d] = maps.size(lay)
                out = out.new_zeros(shape).index_add(d, src[back], out.index_select(d, back))
        elif maps.canon_is_prefix(lay):
            out = out.narrow(d, 0, maps.size(lay))
        else:
            out = out.index_select(d, maps.canon(lay, out.device))
    if out is not t and out._base is not None and not out.requires_grad:
        out = out.clone()  # a slice of the teacher: copied, so that it does not keep the teacher's tensor alive
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
