"""Normalizations: BatchNorm (per channel), GroupNorm (the number of groups widens, or else the channels within
a group), LayerNorm and RMSNorm (statistics over widened dims: weighted by copies at a fractional ratio), and
F.normalize."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from ..layout import Layout, Prod
from ..teacher_ops import (WeightedGroupNorm, WeightedLayerNorm, WeightedRMSNorm, copy_weights, is_uniform,
                           weighted_group_norm, weighted_layer_norm, weighted_rms_norm)
from .common import attr_param, dim_index, first_tensor, per_channel
from .registry import builtin


@builtin(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(ctx: Ctx) -> Dims:
    xd = ctx.dims(first_tensor(ctx))
    per_channel(ctx, xd[1], ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    def build(t: nn.Module, size: Any) -> None:
        t.num_features = size(xd[1])

    ctx.on_build_module(build)
    return list(xd)


def _norm_groups(ctx: Ctx, channel: Layout, num_groups: int, num_channels: int) -> tuple[Layout, Layout]:
    """The channels as ``groups x channels-per-group``: (groups, within). The number of groups is offered to
    widen (exact at any ratio: a teacher group copies a student group); where it cannot (one group, or groups
    frozen elsewhere) the channels within a group widen instead, their copies kept in their group, so that
    the statistics see every student channel as often (weighted by copies where they are not)."""
    groups = ctx.expandable(num_groups)
    within = ctx.spaces.new(num_channels // num_groups)
    ctx.unify(channel, Prod((groups, within)))
    return groups, within


def _group_copies(size: Any, within: Layout) -> torch.Tensor | None:
    """Copy weights of the channels within a group, or None where each has as many copies (plain GroupNorm)."""
    src = size.src(within)
    if src is None or is_uniform(src, size.student(within)):
        return None
    return copy_weights(src, size.student(within))


@builtin(nn.GroupNorm)
def group_norm(ctx: Ctx) -> Dims:
    """Statistics run within a group: its number of groups widens, or else the channels within a group."""
    m: nn.GroupNorm = ctx.module(ctx.node)  # type: ignore[assignment]
    xd = ctx.dims(first_tensor(ctx))
    groups, within = _norm_groups(ctx, xd[1], m.num_groups, m.num_channels)
    per_channel(ctx, xd[1], ("weight", "bias"))

    def build(t: nn.Module, size: Any) -> nn.Module | None:
        t.num_groups, t.num_channels = size(groups), size(xd[1])
        copies = _group_copies(size, within)
        return None if copies is None else WeightedGroupNorm(t, copies)

    ctx.on_build_module(build)
    return list(xd)


@builtin(F.group_norm)
def group_norm_function(ctx: Ctx) -> Dims:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` (timm's GroupNorm1): as the module."""
    xd = ctx.dims(first_tensor(ctx))
    num_groups = ctx.arg(1, "num_groups")
    if not isinstance(num_groups, int):
        return ctx.unsupported("F.group_norm with a computed number of groups")
    params = []
    for i, name in ((2, "weight"), (3, "bias")):
        p = ctx.arg(i, name)
        if isinstance(p, fx.Node):
            P = attr_param(ctx, p, ["copy"])
            if P is None:
                return ctx.unsupported(f"F.group_norm with a computed {name}")
            params.append(P[0])
    groups, within = _norm_groups(ctx, xd[1], num_groups, ctx.shape(first_tensor(ctx))[1])
    for P in params:
        ctx.unify(P, xd[1])

    def rewrite(n: fx.Node, size: Any) -> None:
        args = [n.args[0], size(groups)] + [n.kwargs.get(key, d) if len(n.args) <= i else n.args[i]
                                            for i, key, d in ((2, "weight", None), (3, "bias", None), (4, "eps", 1e-5))]
        copies = _group_copies(size, within)
        if copies is not None:
            n.target = weighted_group_norm
            args.append(size.constant(n, copies))
        n.args, n.kwargs = tuple(args), {}

    ctx.on_build_node(rewrite)
    return list(xd)


def _layer_norm(ctx: Ctx, x: fx.Node, k: int, weight: list[Layout] | None, bias: list[Layout] | None) -> list[Layout]:
    """Statistics over the last k dims: exact when every channel there has the same number of copies."""
    xd = ctx.dims(x)
    for p in (weight, bias):
        if p is not None:
            for a, b in zip(p, xd[len(xd) - k :]):
                ctx.unify(a, b)
    return list(xd)


def _norm_copies(size: Any, out: list[Layout], k: int) -> torch.Tensor | None:
    """Copy weights over the normalized dims, or None where every channel has as many copies."""
    lay = Prod(tuple(out[len(out) - k :]))
    src = size.src(lay)
    if src is None or is_uniform(src, size.student(lay)):
        return None
    return copy_weights(src, size.student(lay))


@builtin(nn.LayerNorm, nn.RMSNorm)
def layer_norm(ctx: Ctx) -> Dims:
    m = ctx.module(ctx.node)
    k = len(m.normalized_shape)
    name = str(ctx.node.target)
    w = ctx.param(f"{name}.weight", ["copy"] * k) if m.weight is not None else None
    b = ctx.param(f"{name}.bias", ["copy"] * k) if getattr(m, "bias", None) is not None else None
    x = first_tensor(ctx)
    out = _layer_norm(ctx, x, k, w, b)

    def build(t: nn.Module, size: Any) -> nn.Module | None:
        t.normalized_shape = tuple(size(lay) for lay in out[len(out) - k :])
        copies = _norm_copies(size, out, k)
        if copies is None:
            return None
        return WeightedRMSNorm(t, copies) if isinstance(t, nn.RMSNorm) else WeightedLayerNorm(t, copies)

    ctx.on_build_module(build)
    return out


@builtin(F.layer_norm, F.rms_norm)
def layer_norm_function(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
    is_ln = ctx.node.target is F.layer_norm
    k = len(ctx.arg(1, "normalized_shape"))
    w = attr_param(ctx, ctx.arg(2, "weight"), ["copy"] * k)
    b = attr_param(ctx, ctx.arg(3, "bias"), ["copy"] * k) if is_ln else None
    computed = [(ctx.arg(2, "weight"), w)] + ([(ctx.arg(3, "bias"), b)] if is_ln else [])
    if any(isinstance(a, fx.Node) and p is None for a, p in computed):
        return ctx.unsupported(f"{ctx.node.target.__name__} with computed affine parameters")
    out = _layer_norm(ctx, x, k, w, b)
    eps_at = 4 if is_ln else 3

    def rewrite(n: fx.Node, size: Any) -> None:
        shape = tuple(size(lay) for lay in out[len(out) - k :])
        full = [n.args[0], shape] + [n.kwargs.get(key, d) if len(n.args) <= i else n.args[i] for i, key, d in
                                     ((2, "weight", None), (3, "bias", None), (4, "eps", 1e-5))[: eps_at - 1]]
        copies = _norm_copies(size, out, k)
        if copies is None:
            n.args, n.kwargs = tuple(full), {}
            return
        n.target = weighted_layer_norm if is_ln else weighted_rms_norm
        n.args, n.kwargs = (*full, size.constant(n, copies)), {}

    ctx.on_build_node(rewrite)
    return out


@builtin(F.normalize)
def normalize(ctx: Ctx) -> Dims:
    xd = ctx.dims(first_tensor(ctx))
    ctx.freeze(xd[dim_index(ctx.arg(2, "dim", 1), len(xd))], "normalization along a channel dimension (F.normalize)")
    return list(xd)
