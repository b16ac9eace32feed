"""Rules for torchvision's own functions, which torchvision wraps for fx: stochastic depth, and the
attention and patch merging of its Swin transformers. Loaded at the first node of a torchvision op
(see ``registry.LIBRARY_RULES``), so that importing gpd-surgery does not import torchvision."""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torchvision.models import swin_transformer as _swin
from torchvision.ops import stochastic_depth as _stochastic_depth

from ..analyse import Ctx, Dims
from ..errors import GPDError
from ..layout import Cat, Prod
from .attention import HEAD_DIM, fused_heads, width_in_heads
from .common import attr_param, first_tensor, spatial
from .elementwise import unary
from .registry import builtin

builtin(_stochastic_depth)(unary)  # drops whole samples: channels pass through


@builtin(_swin._patch_merging_pad)
def patch_merging_pad(ctx: Ctx) -> Dims:
    xd = ctx.dims(first_tensor(ctx))
    shape = ctx.shape(ctx.node)
    return list(xd[:-3]) + spatial(ctx, shape[-3:-1]) + [Cat((xd[-1],) * 4)]


@builtin(_swin._get_relative_position_bias)
def relative_position_bias(ctx: Ctx) -> Dims:
    table = ctx.dims(ctx.arg(0, "relative_position_bias_table"))
    n = ctx.shape(ctx.node)[-1]
    return [ctx.spaces.new(1), table[-1]] + spatial(ctx, (n, n))


@builtin(_swin.shifted_window_attention)
def shifted_window_attention(ctx: Ctx) -> Dims:
    x = ctx.arg(0, "input")
    xd = ctx.dims(x)
    num_heads = ctx.arg(5, "num_heads")
    W = attr_param(ctx, ctx.arg(1, "qkv_weight"), ["copy", "share"])
    P = attr_param(ctx, ctx.arg(2, "proj_weight"), ["copy", "share"])
    if W is None or P is None or not isinstance(num_heads, int):
        return ctx.unsupported("shifted_window_attention with computed weights")
    head_dim = ctx.shape(x)[-1] // num_heads
    heads = fused_heads(ctx, W[0], num_heads, head_dim)
    width_in_heads(ctx, W[1], num_heads, head_dim)
    ctx.unify(xd[-1], W[1])
    ctx.spaces.mark_expandable(P[0])
    ctx.unify(P[1], Prod((heads, ctx.spaces.new(head_dim, frozen=HEAD_DIM))))
    for i, name, target in ((9, "qkv_bias", W[0]), (10, "proj_bias", P[0])):
        B = attr_param(ctx, ctx.arg(i, name), ["copy"])
        if B is not None:
            ctx.unify(B[0], target)
    ctx.unify(ctx.dims(ctx.arg(3, "relative_position_bias"))[1], heads)
    scale = ctx.arg(11, "logit_scale")
    if isinstance(scale, fx.Node):
        ctx.unify(ctx.dims(scale)[0], heads)

    def rewrite(n: fx.Node, size: Any) -> None:
        if size(xd[-1]) != size(heads) * head_dim:  # the function derives head_dim from the width
            raise GPDError(f"{n.name}: shifted_window_attention needs width == heads x head_dim "
                           f"({size(xd[-1])} != {size(heads)} x {head_dim}; use an integer ratio)")
        if len(n.args) > 5:
            n.args = n.args[:5] + (size(heads),) + n.args[6:]
        else:
            n.kwargs = {**n.kwargs, "num_heads": size(heads)}

    ctx.on_build_node(rewrite)
    return list(xd[:-1]) + [P[0]]
