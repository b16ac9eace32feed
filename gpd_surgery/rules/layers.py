"""Layers with weights: convolutions (modules and functions), linear layers and PReLU.

A dense layer widens its outputs and shares its weight among the copies of each input channel
(``share``); a grouped convolution widens its number of groups, channels within a group kept.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from ..layout import Layout, Prod
from .common import BY_DESIGN, attr_param, first_tensor, per_channel, spatial
from .registry import builtin


def _conv_channels(ctx: Ctx, channel: Layout, W: list[Layout], n_groups: int, out_channels: int) -> Layout | None:
    """Relate a convolution's input channels to its weight: a dense conv shares its input copies and widens
    its outputs; a grouped conv widens the number of groups (returned), channels within a group kept."""
    if n_groups == 1:
        ctx.spaces.mark_expandable(W[0])
        ctx.unify(channel, W[1])
        return None
    groups = ctx.expandable(n_groups)
    ctx.freeze(W[1], f"{BY_DESIGN}: channels within a group")
    ctx.unify(channel, Prod((groups, W[1])))
    within = ctx.spaces.new(out_channels // n_groups, frozen=f"{BY_DESIGN}: channels within a group")
    ctx.unify(W[0], Prod((groups, within)))
    return groups


@builtin(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: Ctx) -> Dims:
    """Dense convs share their input copies; grouped convs expand the number of groups."""
    m: nn.Conv2d = ctx.module(ctx.node)  # type: ignore[assignment]
    name = str(ctx.node.target)
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    c = len(ctx.shape(x)) - len(m.kernel_size) - 1  # channel dim (0 when unbatched)
    W = ctx.param(f"{name}.weight", ["copy", "share"])
    groups = _conv_channels(ctx, xd[c], W, m.groups, m.out_channels)
    if m.bias is not None:
        ctx.unify(ctx.param(f"{name}.bias", ["copy"])[0], W[0])

    def build(t: nn.Module, size: Any) -> None:
        t.in_channels, t.out_channels = size(xd[c]), size(W[0])
        t.groups = size(groups) if groups is not None else 1

    ctx.on_build_module(build)
    return list(xd[:c]) + [W[0]] + spatial(ctx, ctx.shape(ctx.node)[c + 1 :])


@builtin(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def conv_function(ctx: Ctx) -> Dims:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with a weight read through get_attr
    (tresnet's fixed anti-aliasing filter, groups = channels): as the module; the groups are rewritten."""
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    W = attr_param(ctx, ctx.arg(1, "weight"), ["copy", "share"])
    if W is None:
        return ctx.unsupported("a convolution function with a computed weight")
    groups_arg = ctx.arg(6, "groups", 1)
    n_groups = ctx.spec(groups_arg)
    if not isinstance(n_groups, int):
        return ctx.unsupported("a convolution function with unknown groups")
    weight_shape = ctx.shape(ctx.arg(1, "weight"))
    c = len(ctx.shape(x)) - (len(weight_shape) - 2) - 1
    groups = _conv_channels(ctx, xd[c], W, n_groups, weight_shape[0])
    bias = ctx.arg(2, "bias")
    if isinstance(bias, fx.Node):
        B = attr_param(ctx, bias, ["copy"])
        if B is None:
            return ctx.unsupported("a convolution function with a computed bias")
        ctx.unify(B[0], W[0])

    def rewrite(n: fx.Node, size: Any) -> None:
        if groups is None:
            return
        if len(n.args) > 6:
            n.args = (*n.args[:6], size(groups), *n.args[7:])
        else:
            n.kwargs = {**n.kwargs, "groups": size(groups)}

    ctx.on_build_node(rewrite)
    return list(xd[:c]) + [W[0]] + spatial(ctx, ctx.shape(ctx.node)[c + 1 :])


@builtin(nn.Linear)
def linear(ctx: Ctx) -> Dims:
    name = str(ctx.node.target)
    xd = ctx.dims(first_tensor(ctx))
    W = ctx.param(f"{name}.weight", ["copy", "share"])
    ctx.spaces.mark_expandable(W[0])
    ctx.unify(xd[-1], W[1])
    if ctx.module(ctx.node).bias is not None:
        ctx.unify(ctx.param(f"{name}.bias", ["copy"])[0], W[0])

    def build(t: nn.Module, size: Any) -> None:
        t.in_features, t.out_features = size(W[1]), size(W[0])

    ctx.on_build_module(build)
    return list(xd[:-1]) + [W[0]]


@builtin(F.linear)
def linear_function(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
    W = attr_param(ctx, ctx.arg(1, "weight"), ["copy", "share"])
    if W is None:
        return ctx.unsupported("F.linear with a computed weight")
    b = ctx.arg(2, "bias")
    B = attr_param(ctx, b, ["copy"])
    if B is None and isinstance(b, fx.Node):  # beit's qkv bias: cat(q_bias, zeros, v_bias), copied per channel
        if not ctx.is_tensor(b) or len(ctx.shape(b)) != 1:
            return ctx.unsupported("F.linear with a computed bias that is not a vector")
        B = ctx.dims(b)
    ctx.spaces.mark_expandable(W[0])
    ctx.unify(ctx.dims(x)[-1], W[1])
    if B is not None:
        ctx.unify(B[0], W[0])
    return list(ctx.dims(x)[:-1]) + [W[0]]


@builtin(nn.PReLU)
def prelu(ctx: Ctx) -> Dims:
    m: nn.PReLU = ctx.module(ctx.node)  # type: ignore[assignment]
    xd = ctx.dims(first_tensor(ctx))
    channel = xd[1] if len(xd) >= 2 else xd[0]
    if m.num_parameters > 1:
        per_channel(ctx, channel, ("weight",))
    else:
        ctx.param(f"{ctx.node.target}.weight", [])

    def build(t: nn.Module, size: Any) -> None:
        t.num_parameters = size(channel) if m.num_parameters > 1 else 1

    ctx.on_build_module(build)
    return list(xd)
