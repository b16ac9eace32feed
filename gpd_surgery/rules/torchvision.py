"""Rules for torchvision's own modules and functions, which torchvision wraps for fx: stochastic depth, the
attention and patch merging of its Swin transformers, the helpers of its video MViT, and the
FrozenBatchNorm2d of its detection backbones. Loaded at the first node of a torchvision op (see
``registry.LIBRARY_RULES``), so that importing gpd-surgery does not import torchvision."""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torchvision.models import swin_transformer as _swin
from torchvision.models.video import mvit as _mvit
from torchvision.ops import stochastic_depth as _stochastic_depth
from torchvision.ops.misc import FrozenBatchNorm2d

from ..analyse import Ctx, Dims
from ..errors import GPDError
from ..layout import Cat, Prod
from .attention import HEAD_DIM, fused_heads, width_in_heads
from .common import attr_param, dim_index, first_tensor, per_channel, spatial
from .elementwise import unary
from .registry import builtin, register_rule

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


@register_rule(FrozenBatchNorm2d)
def frozen_batch_norm(ctx: Ctx) -> Dims:
    """BatchNorm with fixed statistics, per channel. A leaf: traced through, fx would fold its buffers into
    float32 constants (``w * (rv + eps).rsqrt()``), and a float64 teacher would differ by 1e-7."""
    xd = ctx.dims(first_tensor(ctx))
    per_channel(ctx, xd[1], ("weight", "bias", "running_mean", "running_var"))
    return list(xd)


# -- MViT (torchvision.models.video.mvit) ------------------------------------------------------------
@builtin(_mvit._unsqueeze)
def mvit_unsqueeze(ctx: Ctx) -> Dims:
    """``(x.unsqueeze(expand_dim) if x.dim() == target_dim - 1 else x, x.dim())``."""
    xd = list(ctx.dims(ctx.arg(0, "x")))
    if len(xd) == ctx.arg(1, "target_dim") - 1:
        xd.insert(dim_index(ctx.arg(2, "expand_dim"), len(xd) + 1), ctx.spaces.new(1))
    return (xd, None)


@builtin(_mvit._squeeze)
def mvit_squeeze(ctx: Ctx) -> Dims:
    """Undoes ``_unsqueeze``: ``x.squeeze(expand_dim)`` where the input had ``target_dim - 1`` dims."""
    xd = list(ctx.dims(ctx.arg(0, "x")))
    if ctx.spec(ctx.arg(3, "tensor_dim")) == ctx.arg(1, "target_dim") - 1:
        d = dim_index(ctx.arg(2, "expand_dim"), len(xd))
        if ctx.shape(ctx.arg(0, "x"))[d] == 1:
            del xd[d]
    return xd


@builtin(_mvit._add_rel_pos)
def mvit_add_rel_pos(ctx: Ctx) -> Dims:
    """``attn[:, :, 1:, 1:] += q . rel_pos`` (attn: B, heads, Nq, Nk; q: B, heads, Nq, head_dim): relative
    position tables over head_dim, which stays as it is (a bilinear form in q); the heads widen."""
    attn, q = ctx.arg(0, "attn"), ctx.arg(1, "q")
    ad, qd = ctx.dims(attn), ctx.dims(q)
    tables = [attr_param(ctx, ctx.arg(i, name), []) for i, name in ((4, "rel_pos_h"), (5, "rel_pos_w"), (6, "rel_pos_t"))]
    if any(t is None for t in tables):
        return ctx.unsupported("_add_rel_pos with computed tables")
    for a, b in zip(ad[:3], qd[:3]):
        ctx.unify(a, b)
    ctx.freeze(qd[3], HEAD_DIM)
    for t in tables:
        ctx.unify(t[1], qd[3])  # type: ignore[index]
    return list(ad)


@builtin(_mvit._add_shortcut)
def mvit_add_shortcut(ctx: Ctx) -> Dims:
    """``x += shortcut`` (over all tokens or all but the class token), in place: a residual add."""
    x, shortcut = ctx.arg(0, "x"), ctx.arg(1, "shortcut")
    if ctx.shape(x) != ctx.shape(shortcut):
        return ctx.unsupported("_add_shortcut of tensors of different shapes")
    xd, sd = ctx.dims(x), ctx.dims(shortcut)
    for a, b in zip(xd, sd):
        ctx.unify(a, b)
    return list(xd)
