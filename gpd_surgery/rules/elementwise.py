"""Elementwise ops, activations and dropout: copy semantics is preserved as it is."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from ..layout import Layout
from .common import first_tensor
from .registry import builtin

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
UNARY_FUNCTIONS = (
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,  # constants shaped like x: the teacher's x
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.clamp, torch.erf, torch.square, torch.reciprocal, operator.neg, F.logsigmoid,
)
UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp",
    "clamp_", "clamp_min", "clamp_max", "square", "erf", "reciprocal", "sign", "requires_grad_",
)


@builtin(*UNARY_MODULES, *UNARY_FUNCTIONS, *UNARY_METHODS)
def unary(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
    if ctx.shape(x) != ctx.shape(ctx.node):
        return broadcast(ctx)
    return list(ctx.dims(x))


BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "masked_fill",
    operator.pow, torch.pow, "pow", torch.addcmul, "addcmul", torch.addcdiv, "addcdiv", torch.lerp, "lerp",
)


@builtin(*BINARY)
def broadcast(ctx: Ctx) -> Dims:
    """Elementwise with broadcasting: any elementwise op preserves copy semantics as it is."""
    out_shape = ctx.shape(ctx.node)
    out: list[Layout | None] = [None] * len(out_shape)
    for t in ctx.tensor_args():
        shape, dims = ctx.shape(t), ctx.dims(t)
        for k in range(1, len(shape) + 1):
            if shape[-k] != out_shape[-k]:
                continue  # a size-1 dim broadcast over the output's
            if out[-k] is None:
                out[-k] = dims[-k]
            else:
                ctx.unify(out[-k], dims[-k])  # type: ignore[arg-type]
    fill = ctx.fresh(out_shape)
    return [o if o is not None else f for o, f in zip(out, fill)]
