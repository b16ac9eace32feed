"""Tensors made in the graph (``torch.arange``, ``x.new_zeros``, grids of them), comparisons and in-place fills.

torch.export records what a model's code builds from sizes (masks, position indices) as ops of their own,
where symbolic tracing often saw a tensor attribute. A made tensor has no channel copies: its dims are
new spaces, which freeze whatever they meet (correct, never wider than it can be). A size it is made
from that reads a widened dim would make the teacher's tensor another size: that dim is frozen too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..analyse import Ctx, Dims
from .common import BY_DESIGN
from .elementwise import broadcast, unary
from .registry import builtin
from .values import size_reads

MADE = f"{BY_DESIGN}: a tensor made in the graph"
CREATION = (torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.linspace,
            torch.tensor, torch.scalar_tensor, torch.randn, torch.rand,
            "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
COMPARISONS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
               operator.or_, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and,
               torch.logical_or, "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and",
               "bitwise_or", "masked_fill_", "floor_divide", "remainder", "fmod",
               "copy_")  # ``x[1:, 1:] = y``: y, broadcast, written into a view of x
UNARY = ("logical_not", "bitwise_not", "fill_", "zero_", "floor", "ceil", "round", "sin", "cos", "lift_fresh_copy",
         "long", "int", "bool", torch.ops.aten.alias.default, torch.ops.aten.lift_fresh_copy.default)


@builtin(*CREATION)
def made(ctx: Ctx) -> Dims:
    node = ctx.node
    for a in [*node.args, *node.kwargs.values()]:
        for item in a if isinstance(a, (tuple, list)) else (a,):
            if isinstance(item, fx.Node) and not ctx.is_tensor(item):
                for lay in size_reads(ctx, item) or ():
                    ctx.freeze(lay, f"{MADE} from its size")
    return ctx.fresh_like(ctx.spec(node), frozen=MADE)


builtin(*COMPARISONS)(broadcast)
builtin(*UNARY)(unary)


@builtin(torch.meshgrid)
def meshgrid(ctx: Ctx) -> Dims:
    """``torch.meshgrid(a, b, ...)``: output k repeats input k (1-D, or 0-D as one element) along its own dim,
    so each dim of the grids is its input's dim (the first two swapped with ``indexing="xy"``)."""
    axes = [ctx.dims(t)[0] if ctx.dims(t) else ctx.spaces.new(1) for t in ctx.tensor_args()]
    if ctx.node.kwargs.get("indexing", "ij") == "xy" and len(axes) > 1:
        axes[0], axes[1] = axes[1], axes[0]
    return tuple(list(axes) for _ in ctx.tensor_args())
