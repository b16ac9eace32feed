"""Values that carry no channel semantics: sizes and numbers computed in the graph, and attributes it reads.

Models compute sizes from shapes (``B, N, C = x.shape``, then ``C // heads``). In the teacher a size
that reads a widened dim has another value: used as a number (a scale, a divisor) the teacher must get
the student's; used as a size of a view or reshape, the shape rules set the teacher's (``shapes.py``).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..analyse import PLAIN_VALUE, Ctx, Dims
from ..layout import Layout
from ..trace import TensorSpec
from .common import dim_index
from .registry import builtin

_SIZE_CONSUMERS = {"view", "reshape", "expand", "unflatten", torch.reshape, torch.unflatten}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.pow, int, float, max, min}


@builtin(PLAIN_VALUE, "size", "dim", "numel", "get_device", getattr)
def plain_value(ctx: Ctx) -> Dims:
    """A number computed from tensor sizes (``C = x.shape[-1]``, ``(C // heads) ** -0.5``). Where it reads a
    widened dim, the teacher computes another value; used as a number (a scale, a divisor) it must be the
    student's, so the teacher gets the student's value there. Sizes given to view, reshape and expand are
    left to their rules, which set the teacher's sizes; other sizes computed from it decide for themselves.
    The teacher reads its own sizes (introspection: ``size``, ``getattr(x, "shape")``)."""
    node = ctx.node
    assert node is not None
    value = ctx.spec(node)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    reads = size_reads(ctx, node)
    if not reads:
        return None

    def hook(n: fx.Node, size: Any) -> None:
        if all(size(r) == size.student(r) for r in reads):
            return
        for user in list(n.users):
            if user.target in _SIZE_CONSUMERS or _is_plain_arithmetic(user):
                continue
            user.args = fx.node.map_arg(user.args, lambda a: value if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is n else a)

    ctx.on_build_node(hook)
    return None


def _is_plain_arithmetic(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ARITHMETIC and not any(
        isinstance(a, fx.Node) and isinstance(a.meta.get("gpd_spec"), TensorSpec) for a in n.all_input_nodes)


@builtin("get_attr")
def get_attr(ctx: Ctx) -> Dims:
    if not ctx.is_tensor(ctx.node):
        return ctx.unsupported(f"attribute {ctx.node.target}")
    return list(ctx.param(str(ctx.node.target), []))


def size_reads(ctx: Ctx, a: Any, depth: int = 0) -> list[Layout] | None:
    """The tensor dims that a size computed in the graph (``C // self.num_heads`` with ``B, N, C = x.shape``)
    reads, or None where it depends on something else. A size that reads a widened dim has another value
    in the teacher, which the teacher must not take (the heads widen, the head size does not)."""
    if not isinstance(a, fx.Node):
        return [] if isinstance(a, (int, float, bool)) or a is None else None
    if depth > 32:
        return None
    if a.op == "call_method" and a.target == "size" and ctx.is_tensor(a.args[0]):
        xd = ctx.dims(a.args[0])  # type: ignore[arg-type]
        dim = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
        return list(xd) if dim is None else [xd[dim_index(dim, len(xd))]] if isinstance(dim, int) else None
    if a.op == "call_function" and a.target is getattr and a.args[1] == "shape" and ctx.is_tensor(a.args[0]):
        return list(ctx.dims(a.args[0]))  # type: ignore[arg-type]
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[1], int):
        whole = a.args[0]
        if isinstance(whole, fx.Node) and (whole.op == "call_method" and whole.target == "size"
                                           or whole.op == "call_function" and whole.target is getattr):
            tensor = whole.args[0]
            if ctx.is_tensor(tensor):
                xd = ctx.dims(tensor)  # type: ignore[arg-type]
                return [xd[dim_index(a.args[1], len(xd))]]
        return None
    if a.op == "call_method" and a.target == "numel" and ctx.is_tensor(a.args[0]):
        return list(ctx.dims(a.args[0]))  # type: ignore[arg-type]
    if a.op == "call_function" and a.target in _ARITHMETIC:
        reads: list[Layout] = []
        for arg in a.args:
            r = size_reads(ctx, arg, depth + 1)
            if r is None:
                return None
            reads += r
        return reads
    return None
