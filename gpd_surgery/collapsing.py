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


def _sum_tiles(t: torch.Tensor, d: int, n: int) -> torch.Tensor:
    """Sum the ``n`` whole tiles of dim ``d``, the last tile first."""
    tiles = t.unflatten(d, (n, t.shape[d] // n))
    out = tiles.select(d, n - 1) + tiles.select(d, n - 2)
    for k in range(n - 3, -1, -1):
        out.add_(tiles.select(d, k))
    return out


class _Fold(torch.autograd.Function):
    """Collapse one tensor whose maps are all whole tiles: ``("first", d, size)`` keeps the first ``size``
    channels of dim ``d`` (the canonical copies), ``("tiles", d, n)`` sums the ``n`` tiles of dim ``d``.
    The backward writes the teacher-sized gradient once: the incoming gradient broadcast over the tiles
    into the canonical block, zeros elsewhere (autograd's slice and repeat would write it twice)."""

    @staticmethod
    def forward(t: torch.Tensor, steps: tuple[tuple[str, int, int], ...]) -> torch.Tensor:  # type: ignore[override]
        out = t
        for kind, d, k in steps:
            out = out.narrow(d, 0, k) if kind == "first" else _sum_tiles(out, d, k)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        t, ctx.steps = inputs
        ctx.shape = t.shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        out = grad.new_empty(ctx.shape)
        block = out
        for kind, d, k in ctx.steps:
            if kind == "first":
                out.narrow(d, k, ctx.shape[d] - k).zero_()
                block = block.narrow(d, 0, k)
        for kind, d, n in sorted(ctx.steps, key=lambda s: -s[1]):  # from the last dim: indices stay valid
            if kind == "tiles":
                block = block.unflatten(d, (n, ctx.shape[d] // n))
                grad = grad.unsqueeze(d)
        block.copy_(grad)
        return out, None


class _SumTiles(torch.autograd.Function):
    """``_sum_tiles`` as a differentiable function: the gradient repeats along ``d``."""

    @staticmethod
    def forward(t: torch.Tensor, d: int, n: int) -> torch.Tensor:  # type: ignore[override]
        return _sum_tiles(t, d, n)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _, ctx.d, ctx.n = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def]
        reps = [1] * grad.dim()
        reps[ctx.d] = ctx.n
        return grad.repeat(reps), None, None


def _fold_steps(recipe: Recipe, maps: Maps) -> tuple[tuple[str, int, int], ...] | None:
    """The recipe as ``_Fold`` steps, or None where some map is not whole tiles (or nothing is summed)."""
    steps = []
    for d, lay, mode in recipe.dims:
        if mode == "share":
            n = maps.tiles(lay)
            if not n:
                return None
            steps.append(("tiles", d, n))
        elif maps.canon_is_prefix(lay):
            steps.append(("first", d, maps.size(lay)))
        else:
            return None
    return tuple(steps) if any(kind == "tiles" for kind, _, _ in steps) else None


def collapse_tensor(t: torch.Tensor, recipe: Recipe, maps: Maps) -> torch.Tensor:
    if t.numel() == 0:  # nothing to fold, and no map to build: a forged size stays a number
        return t.new_zeros(recipe.shape)
    steps = _fold_steps(recipe, maps)
    if steps is not None:
        return _Fold.apply(t, steps)
    out = t
    for d, lay, mode in recipe.dims:
        if mode == "share" and maps.tiles(lay):
            out = _SumTiles.apply(out, d, maps.tiles(lay))
        elif mode == "share":
            src = maps.src(lay, out.device)  # copies summed in reverse teacher order, i.e. last copy first
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
