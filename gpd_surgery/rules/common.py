"""Helpers that rules of several op families share."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..analyse import Ctx
from ..layout import Layout

BY_DESIGN = "by design"  # prefix of deliberate freezes (channels within a group, head_dim): not a loss


def dim_index(d: int, ndim: int) -> int:
    """A dim argument as a non-negative index."""
    return d + ndim if d < 0 else d


def first_tensor(ctx: Ctx) -> fx.Node:
    """The node's first tensor argument (the input of most ops)."""
    return ctx.tensor_args()[0]


def spatial(ctx: Ctx, shape: tuple[int, ...]) -> list[Layout]:
    """New spatial (or token) dims: never widened, whatever a later rule says."""
    return ctx.fresh(shape, frozen=f"{BY_DESIGN}: spatial")


def attr_param(ctx: Ctx, node: Any, modes: list[str | None]) -> list[Layout] | None:
    """Layouts of a parameter passed to a functional op through get_attr (None if it is computed)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ctx.param(str(node.target), modes)
    return None


def per_channel(ctx: Ctx, channel: Layout, names: tuple[str, ...]) -> None:
    """The module's vectors among ``names`` are copied along ``channel``; its other tensors keep their size."""
    m = ctx.module(ctx.node)
    for n in names:
        t = getattr(m, n, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            ctx.unify(ctx.param(f"{ctx.node.target}.{n}", ["copy"])[0], channel)
        elif isinstance(t, torch.Tensor):
            ctx.param(f"{ctx.node.target}.{n}", [])


def may_widen(ctx: Ctx, lay: Layout) -> bool:
    """Whether ``lay`` is a channel space that may widen: an unfrozen space that a rule offered (a layer's
    outputs, groups). A factor of a product offered as a whole (a Linear's output unflattened to C x H x W) is
    not: freezing it leaves the product another factor to widen."""
    sp = ctx.spaces
    return any(sp.frozen[leaf] is None and sp.size[leaf] > 1 and sp.expandable[leaf] for leaf in sp.leaves(lay))
