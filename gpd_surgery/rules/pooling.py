"""Pooling and resampling over space: channels pass through, the spatial dims are new."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from .common import first_tensor, spatial
from .registry import builtin

POOL_MODULES = {  # the number of pooled (last) dims; 0: all but (N, C)
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: 0,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.interpolate: 0, torch.max_pool2d: 2,
    torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}


@builtin(*POOL_MODULES, *POOL_FUNCTIONS)
def pool(ctx: Ctx) -> Dims:
    if not ctx.is_tensor(ctx.node):
        return ctx.unsupported("pooling with indices")
    xd = ctx.dims(first_tensor(ctx))
    out_shape = ctx.shape(ctx.node)
    key = type(ctx.module(ctx.node)) if ctx.node.op == "call_module" else ctx.node.target
    k = {**POOL_MODULES, **POOL_FUNCTIONS}[key] or len(out_shape) - 2  # interpolate: all but (N, C)
    keep = len(out_shape) - k
    for lay in xd[keep:]:  # windows over copies of a channel would mix other channels, and change the size
        ctx.freeze(lay, f"pooling or resampling along this dimension at {ctx.where}")
    return list(xd[:keep]) + spatial(ctx, out_shape[keep:])
