"""Reductions over dims (mean, sum, max, std, ...) and ops along one dim (softmax, cumsum).

A teacher channel holds a copy of a student channel, so a max or min over copies is the student's as it
is; a sum or mean over a widened dim becomes a weighted sum, each copy weighing ``1 / copies``. Other
statistics over a channel dim keep the channel's size.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims, NodeHook
from ..layout import Layout
from ..teacher_ops import copy_weights, is_uniform
from ..trace import TensorSpec
from .common import BY_DESIGN, dim_index, first_tensor
from .elementwise import broadcast
from .registry import builtin


def _dims_arg(ctx: Ctx, ndim: int, i: int = 1, name: str = "dim") -> list[int]:
    d = ctx.arg(i, name)
    if d is None:
        return list(range(ndim))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(dim_index(x, ndim) for x in d)


@builtin(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.max,
         torch.min, torch.norm, "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "max", "min", "norm")
def reduce(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
    xd, n = ctx.dims(x), len(ctx.shape(x))
    if len([a for a in ctx.tensor_args()]) > 1:
        return broadcast(ctx)  # torch.max(a, b) is elementwise
    kind = getattr(ctx.node.target, "__name__", ctx.node.target)
    reduced = _dims_arg(ctx, n, 2 if kind == "norm" else 1)
    keepdim = bool(ctx.arg(3 if kind == "norm" else 2, "keepdim", False))
    if kind in ("amax", "amin"):
        pass  # the copies of a channel hold its value: the largest over them is the student's
    elif kind in ("mean", "sum") and isinstance(ctx.spec(ctx.node), TensorSpec) and ctx.spec(ctx.node).dtype.is_floating_point:
        ctx.on_build_node(_weighted_reduction(xd, reduced, keepdim, kind))
    else:
        for d in reduced:
            ctx.freeze(xd[d], f"reduction over a channel dimension ({kind})")
    out = [ctx.spaces.new(1) if d in reduced else lay for d, lay in enumerate(xd) if keepdim or d not in reduced]
    spec = ctx.spec(ctx.node)
    return (out, list(out)) if isinstance(spec, tuple) else out


def _weighted_reduction(xd: list[Layout], reduced: list[int], keepdim: bool, kind: str) -> NodeHook:
    """A mean or sum over widened dims, as the student's: each teacher channel weighs 1 / (number of copies of
    its student channel), and a mean divides by the student's sizes (convnextv2's GRN, a channel mean). Left
    as it is where that changes nothing: a mean over dims whose channels all have as many copies."""

    def rewrite(n: fx.Node, size: Any) -> None:
        factors, plain = [], True
        for d in reduced:
            src, student = size.src(xd[d]), size.student(xd[d])
            if src is None:
                factors.append(None if kind == "sum" else torch.full((student,), 1.0 / student, dtype=torch.float64))
                continue
            w = copy_weights(src, student)  # 1 / (copies x student width): a mean's weights
            factors.append(w if kind == "mean" else w * student)
            plain = plain and kind == "mean" and is_uniform(src, student)
        if plain or all(f is None for f in factors):
            return
        x = n.args[0]
        ndim = len(xd)
        weight = torch.ones([1] * ndim, dtype=torch.float64)
        for d, f in zip(reduced, factors):
            if f is not None:
                shape = [1] * ndim
                shape[d] = len(f)
                weight = weight * f.view(shape)
        const = size.constant(n, weight)  # float64, cast to the activation's dtype where it is used
        graph = n.graph
        with graph.inserting_before(n):
            w = graph.call_method("type_as", (const, x))
            prod = graph.call_function(operator.mul, (x, w))
        n.op, n.target = "call_function", torch.sum
        n.args, n.kwargs = (prod,), {"dim": tuple(reduced), "keepdim": keepdim}

    return rewrite


@builtin(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", nn.Softmax,
         nn.LogSoftmax, torch.cumsum, "cumsum")
def along_dim(ctx: Ctx) -> Dims:
    """Normalizes or accumulates along one dim: that dim must keep its size."""
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    if ctx.node.op == "call_module":
        d = ctx.module(ctx.node).dim
    else:
        d = ctx.arg(1, "dim")
    if d is None:
        return ctx.unsupported(f"{ctx.node.target} without dim")
    module = ctx.node.op == "call_module"
    what = type(ctx.module(ctx.node)).__name__ if module else getattr(ctx.node.target, "__name__", ctx.node.target)
    d = dim_index(d, len(xd))
    # Along groups whose channels are another dim (resnest's radix softmax over (B, radix, cardinality, C)): the
    # groups keep their size and the channels within them widen, as attention's head_dim and heads do.
    free = any(ctx.spaces.frozen[leaf] is None and ctx.spaces.size[leaf] > 1
               for i, lay in enumerate(xd) if i != d for leaf in ctx.spaces.leaves(lay))
    reason = f"normalization along a channel dimension ({what})"
    ctx.freeze(xd[d], f"{BY_DESIGN}: {reason}, the channels of its other dims widen" if free else reason)
    return list(xd)
