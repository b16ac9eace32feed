"""The registry of op rules.

A rule is keyed by a module type, a function or a method name. Given the
:class:`~gpd_surgery.analyse.Ctx` of one node it (a) relates the dimensions of
the node's inputs, outputs and parameters (``ctx.unify``, ``ctx.param``), (b)
registers how to build the teacher's module or rewrite the teacher's node from
the teacher sizes (``ctx.on_build_module``, ``ctx.on_build_node``) and (c) says,
through the parameter modes, how each parameter collapses (``copy`` dims take
the canonical copy, ``share`` dims sum over copies).

Adding support for an op means adding one function here.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .analyse import Ctx, Dims, NodeHook
from .errors import GPDError
from .layout import Cat, Layout, Prod
from .trace import TensorSpec
from .teacher_ops import (WeightedLayerNorm, WeightedRMSNorm, copy_weights, is_uniform, weighted_layer_norm,
                          weighted_rms_norm)

Rule = Callable[[Ctx], Dims]
RULES: dict[Any, Rule] = {}

BY_DESIGN = "by design"  # prefix of deliberate freezes (channels within a group, head_dim): not a loss


def register(*keys: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for k in keys:
            RULES[k] = fn
        return fn

    return deco


def lookup(node: fx.Node, gm: fx.GraphModule) -> Rule | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
        for base in type(mod).__mro__:
            if base in RULES:
                # A subclass that overrides forward computes something else: not ours to guess.
                if base is type(mod) or type(mod).forward is base.forward:
                    return RULES[base]
                return None
        return None
    if node.op == "call_function":
        return RULES.get(node.target)
    if node.op == "call_method":
        return RULES.get(str(node.target))
    if node.op == "get_attr":
        return RULES.get("get_attr")
    return None


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _first(ctx: Ctx) -> fx.Node:
    return ctx.tensor_args()[0]


def spatial(ctx: Ctx, shape: tuple[int, ...]) -> list[Layout]:
    """New spatial (or token) dims: never widened, whatever a later rule says."""
    return ctx.fresh(shape, frozen=f"{BY_DESIGN}: spatial")


def _attr_param(ctx: Ctx, node: Any, modes: list[str | None]) -> list[Layout] | None:
    """Layouts of a parameter passed to a functional op through get_attr (None if it is computed)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ctx.param(str(node.target), modes)
    return None


# -- values that carry no channel semantics ---------------------------------------
@register("size", "dim", "numel", "get_device", getattr)
def introspection(ctx: Ctx) -> Dims:
    # The teacher reads its own sizes; reshape rules rewrite any size that must change, and a size used
    # as a number keeps the student's value (see plain_value).
    plain_value(ctx)
    return None


_SIZE_CONSUMERS = {"view", "reshape", "expand", "unflatten", torch.reshape, torch.unflatten}


def plain_value(ctx: Ctx) -> None:
    """A number computed from tensor sizes (``C = x.shape[-1]``, ``(C // heads) ** -0.5``). Where it reads a
    widened dim, the teacher computes another value; used as a number (a scale, a divisor) it must be the
    student's, so the teacher gets the student's value there. Sizes given to view, reshape and expand are
    left to their rules, which set the teacher's sizes; other sizes computed from it decide for themselves."""
    node = ctx.node
    assert node is not None
    value = ctx.spec(node)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    reads = _size_reads(ctx, node)
    if not reads:
        return

    def hook(n: fx.Node, size: Any) -> None:
        if all(size(r) == size.student(r) for r in reads):
            return
        for user in list(n.users):
            if user.target in _SIZE_CONSUMERS or _is_plain_arithmetic(user):
                continue
            user.args = fx.node.map_arg(user.args, lambda a: value if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is n else a)

    ctx.on_build_node(hook)


def _is_plain_arithmetic(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ARITHMETIC and not any(
        isinstance(a, fx.Node) and isinstance(a.meta.get("gpd_spec"), TensorSpec) for a in n.all_input_nodes)


@register("get_attr")
def get_attr(ctx: Ctx) -> Dims:
    if not ctx.is_tensor(ctx.node):
        return ctx.unsupported(f"attribute {ctx.node.target}")
    return list(ctx.param(str(ctx.node.target), []))


# -- elementwise --------------------------------------------------------------------
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


@register(*UNARY_MODULES, *UNARY_FUNCTIONS, *UNARY_METHODS)
def unary(ctx: Ctx) -> Dims:
    x = _first(ctx)
    if ctx.shape(x) != ctx.shape(ctx.node):
        return broadcast(ctx)
    return list(ctx.dims(x))


BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum", "masked_fill",
    operator.pow, torch.pow, "pow", torch.addcmul, "addcmul", torch.addcdiv, "addcdiv", torch.lerp, "lerp",
)


@register(*BINARY)
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


# -- parameterized layers ---------------------------------------------------------------
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


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: Ctx) -> Dims:
    """Dense convs share their input copies; grouped convs expand the number of groups."""
    m: nn.Conv2d = ctx.module(ctx.node)  # type: ignore[assignment]
    name = str(ctx.node.target)
    x = _first(ctx)
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


@register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def conv_function(ctx: Ctx) -> Dims:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with a weight read through get_attr
    (tresnet's fixed anti-aliasing filter, groups = channels): as the module; the groups are rewritten."""
    x = _first(ctx)
    xd = ctx.dims(x)
    W = _attr_param(ctx, ctx.arg(1, "weight"), ["copy", "share"])
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
        B = _attr_param(ctx, bias, ["copy"])
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


@register(nn.Linear)
def linear(ctx: Ctx) -> Dims:
    name = str(ctx.node.target)
    xd = ctx.dims(_first(ctx))
    W = ctx.param(f"{name}.weight", ["copy", "share"])
    ctx.spaces.mark_expandable(W[0])
    ctx.unify(xd[-1], W[1])
    if ctx.module(ctx.node).bias is not None:
        ctx.unify(ctx.param(f"{name}.bias", ["copy"])[0], W[0])

    def build(t: nn.Module, size: Any) -> None:
        t.in_features, t.out_features = size(W[1]), size(W[0])

    ctx.on_build_module(build)
    return list(xd[:-1]) + [W[0]]


def _per_channel(ctx: Ctx, channel: Layout, names: tuple[str, ...]) -> None:
    m = ctx.module(ctx.node)
    for n in names:
        t = getattr(m, n, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            ctx.unify(ctx.param(f"{ctx.node.target}.{n}", ["copy"])[0], channel)
        elif isinstance(t, torch.Tensor):
            ctx.param(f"{ctx.node.target}.{n}", [])


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(ctx: Ctx) -> Dims:
    xd = ctx.dims(_first(ctx))
    _per_channel(ctx, xd[1], ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    def build(t: nn.Module, size: Any) -> None:
        t.num_features = size(xd[1])

    ctx.on_build_module(build)
    return list(xd)


def _norm_groups(ctx: Ctx, channel: Layout, num_groups: int, num_channels: int) -> Layout:
    """The channels as ``groups x channels-per-group``; the number of groups widens (returned)."""
    groups = ctx.expandable(num_groups)
    within = ctx.spaces.new(num_channels // num_groups, frozen=f"{BY_DESIGN}: channels within a group")
    ctx.unify(channel, Prod((groups, within)))
    return groups


@register(nn.GroupNorm)
def group_norm(ctx: Ctx) -> Dims:
    """Statistics run within a group: expanding the number of groups is exact at any ratio."""
    m: nn.GroupNorm = ctx.module(ctx.node)  # type: ignore[assignment]
    xd = ctx.dims(_first(ctx))
    groups = _norm_groups(ctx, xd[1], m.num_groups, m.num_channels)
    _per_channel(ctx, xd[1], ("weight", "bias"))

    def build(t: nn.Module, size: Any) -> None:
        t.num_groups, t.num_channels = size(groups), size(xd[1])

    ctx.on_build_module(build)
    return list(xd)


@register(F.group_norm)
def group_norm_function(ctx: Ctx) -> Dims:
    """``F.group_norm(x, num_groups, weight, bias)`` (timm's GroupNorm1): as the module, the groups widen."""
    xd = ctx.dims(_first(ctx))
    num_groups = ctx.arg(1, "num_groups")
    if not isinstance(num_groups, int):
        return ctx.unsupported("F.group_norm with a computed number of groups")
    params = []
    for i, name in ((2, "weight"), (3, "bias")):
        p = ctx.arg(i, name)
        if isinstance(p, fx.Node):
            P = _attr_param(ctx, p, ["copy"])
            if P is None:
                return ctx.unsupported(f"F.group_norm with a computed {name}")
            params.append(P[0])
    groups = _norm_groups(ctx, xd[1], num_groups, ctx.shape(_first(ctx))[1])
    for P in params:
        ctx.unify(P, xd[1])

    def rewrite(n: fx.Node, size: Any) -> None:
        if len(n.args) > 1:
            n.args = (n.args[0], size(groups), *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "num_groups": size(groups)}

    ctx.on_build_node(rewrite)
    return list(xd)


@register(nn.PReLU)
def prelu(ctx: Ctx) -> Dims:
    m: nn.PReLU = ctx.module(ctx.node)  # type: ignore[assignment]
    xd = ctx.dims(_first(ctx))
    channel = xd[1] if len(xd) >= 2 else xd[0]
    if m.num_parameters > 1:
        _per_channel(ctx, channel, ("weight",))
    else:
        ctx.param(f"{ctx.node.target}.weight", [])

    def build(t: nn.Module, size: Any) -> None:
        t.num_parameters = size(channel) if m.num_parameters > 1 else 1

    ctx.on_build_module(build)
    return list(xd)


# -- spatial ops: channels pass through, spatial dims are new -----------------------------
POOL_MODULES = {
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


@register(*POOL_MODULES, *POOL_FUNCTIONS)
def pool(ctx: Ctx) -> Dims:
    if not ctx.is_tensor(ctx.node):
        return ctx.unsupported("pooling with indices")
    xd = ctx.dims(_first(ctx))
    out_shape = ctx.shape(ctx.node)
    key = type(ctx.module(ctx.node)) if ctx.node.op == "call_module" else ctx.node.target
    k = {**POOL_MODULES, **POOL_FUNCTIONS}[key] or len(out_shape) - 2  # interpolate: all but (N, C)
    keep = len(out_shape) - k
    return list(xd[:keep]) + spatial(ctx, out_shape[keep:])


# -- reductions and normalizations over a dim -----------------------------------------------
def _dims_arg(ctx: Ctx, ndim: int, i: int = 1, name: str = "dim") -> list[int]:
    d = ctx.arg(i, name)
    if d is None:
        return list(range(ndim))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(_dim(x, ndim) for x in d)


@register(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.max,
          torch.min, torch.norm, "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "max", "min", "norm")
def reduce(ctx: Ctx) -> Dims:
    x = _first(ctx)
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


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", nn.Softmax,
          nn.LogSoftmax, torch.cumsum, "cumsum")
def along_dim(ctx: Ctx) -> Dims:
    """Normalizes or accumulates along one dim: that dim must keep its size."""
    x = _first(ctx)
    xd = ctx.dims(x)
    if ctx.node.op == "call_module":
        d = ctx.module(ctx.node).dim
    else:
        d = ctx.arg(1, "dim")
    if d is None:
        return ctx.unsupported(f"{ctx.node.target} without dim")
    module = ctx.node.op == "call_module"
    what = type(ctx.module(ctx.node)).__name__ if module else getattr(ctx.node.target, "__name__", ctx.node.target)
    ctx.freeze(xd[_dim(d, len(xd))], f"normalization along a channel dimension ({what})")
    return list(xd)


# -- data movement ---------------------------------------------------------------------
def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into groups of input and output dims with equal products."""
    if 0 in a or 0 in b:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                gj.append(j)
                pb *= b[j]
                j += 1
        groups.append((gi, gj))
    if groups:  # trailing size-1 dims join the last group
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    else:
        groups.append((list(range(len(a))), list(range(len(b)))))
    return groups


def _size_args(node: fx.Node) -> tuple[list[Any], bool]:
    """The target shape of view/reshape/expand as a list, and whether it was passed as one sequence."""
    rest = list(node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        return list(node.kwargs.get("shape", node.kwargs.get("size"))), True
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    return rest, False


_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.pow, int, float, max, min}


def _size_reads(ctx: Ctx, a: Any, depth: int = 0) -> list[Layout] | None:
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
        return list(xd) if dim is None else [xd[_dim(dim, len(xd))]] if isinstance(dim, int) else None
    if a.op == "call_function" and a.target is getattr and a.args[1] == "shape" and ctx.is_tensor(a.args[0]):
        return list(ctx.dims(a.args[0]))  # type: ignore[arg-type]
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[1], int):
        whole = a.args[0]
        if isinstance(whole, fx.Node) and (whole.op == "call_method" and whole.target == "size"
                                           or whole.op == "call_function" and whole.target is getattr):
            tensor = whole.args[0]
            if ctx.is_tensor(tensor):
                xd = ctx.dims(tensor)  # type: ignore[arg-type]
                return [xd[_dim(a.args[1], len(xd))]]
        return None
    if a.op == "call_method" and a.target == "numel" and ctx.is_tensor(a.args[0]):
        return list(ctx.dims(a.args[0]))  # type: ignore[arg-type]
    if a.op == "call_function" and a.target in _ARITHMETIC:
        reads: list[Layout] = []
        for arg in a.args:
            r = _size_reads(ctx, arg, depth + 1)
            if r is None:
                return None
            reads += r
        return reads
    return None


def _new_sizes(ctx: Ctx, sizes: list[Any], out: list[Layout], b: tuple[int, ...]
               ) -> Callable[[list[Any], Any], list[Any]]:
    """How the teacher computes each target size of a view, reshape or expand: -1 stays; a constant becomes
    the teacher's size; a size computed in the graph stays computed (a batch size follows the input) unless
    it reads a widened dim, where the teacher's size replaces it."""
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and isinstance(ctx.spec(sizes[0]), (tuple, list)):
        whole = _size_reads(ctx, sizes[0])  # reshape(x.shape): one node for every size

        def new_whole(teacher_sizes: list[Any], size: Any) -> list[Any]:
            if whole is not None and len(whole) == len(out) and all(size(r) == size(lay) for r, lay in zip(whole, out)):
                return teacher_sizes  # the teacher's own shape is the one wanted
            return [size(lay) for lay in out]

        return new_whole
    reads = [_size_reads(ctx, s) if isinstance(s, fx.Node) else None for s in sizes]

    def new(teacher_sizes: list[Any], size: Any) -> list[Any]:  # the same sizes, as nodes of the teacher's graph
        result = []
        for d, (s, lay) in enumerate(zip(teacher_sizes, out)):
            if isinstance(s, int) and s == -1:
                result.append(s)
            elif isinstance(s, fx.Node) and size(lay) == b[d] and (
                    reads[d] is None or all(size(r) == size.student(r) for r in reads[d])):
                result.append(s)  # a size that does not change, computed from sizes that do not either
            else:
                result.append(size(lay))
        return result

    return new


@register("view", "reshape", torch.reshape, torch.flatten, "flatten", nn.Flatten, nn.Unflatten, torch.unflatten,
          "unflatten", torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", "view_as", "reshape_as")
def reshape(ctx: Ctx) -> Dims:
    x = _first(ctx)
    a, b = ctx.shape(x), ctx.shape(ctx.node)
    xd = ctx.dims(x)
    groups = _reshape_groups(a, b)
    if groups is None:
        return ctx.unsupported(f"{ctx.node.target} of an empty tensor")
    out: list[Layout] = [0] * len(b)
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = xd[gi[0]]
            continue
        fresh = ctx.fresh([b[j] for j in gj])
        ctx.unify(Prod(tuple(xd[i] for i in gi)), Prod(tuple(fresh)))
        for j, f in zip(gj, fresh):
            out[j] = f
    if str(ctx.node.target) in ("view", "reshape") or ctx.node.target is torch.reshape:
        sizes, as_seq = _size_args(ctx.node)
        new_sizes = _new_sizes(ctx, sizes, out, b)

        def rewrite(n: fx.Node, size: Any) -> None:
            new = new_sizes(_size_args(n)[0], size)
            n.args = (n.args[0], tuple(new)) if as_seq or n.kwargs else (n.args[0], *new)
            n.kwargs = {}

        ctx.on_build_node(rewrite)
    elif str(ctx.node.target) in ("view_as", "reshape_as"):
        ctx.unify(Prod(tuple(out)), Prod(tuple(ctx.dims(ctx.tensor_args()[1]))))
    elif ctx.node.target in ("unflatten", torch.unflatten):
        _unflatten_sizes(ctx, out, b, len(a))
    elif ctx.node.op == "call_module" and isinstance(ctx.module(ctx.node), nn.Unflatten):
        m: nn.Unflatten = ctx.module(ctx.node)  # type: ignore[assignment]
        d0 = _dim(m.dim, len(a)) if isinstance(m.dim, int) else 0
        part = out[d0 : d0 + len(m.unflattened_size)]

        def build(t: nn.Module, size: Any) -> None:
            t.unflattened_size = tuple(size(lay) for lay in part)  # type: ignore[assignment]

        ctx.on_build_module(build)
    return out


def _unflatten_sizes(ctx: Ctx, out: list[Layout], b: tuple[int, ...], ndim: int) -> None:
    """``x.unflatten(dim, (3, heads, C // heads))``: its sizes, as a reshape's (see ``_new_sizes``)."""
    sizes = ctx.arg(2, "sizes")
    dim = ctx.arg(1, "dim")
    if not isinstance(dim, int) or not isinstance(sizes, (tuple, list)):
        return
    d0 = _dim(dim, ndim)
    part = slice(d0, d0 + len(sizes))
    new_sizes = _new_sizes(ctx, list(sizes), out[part], b[part])

    def rewrite(n: fx.Node, size: Any) -> None:
        positional = len(n.args) > 2
        new = tuple(new_sizes(list(n.args[2] if positional else n.kwargs["sizes"]), size))
        if positional:
            n.args = (*n.args[:2], new, *n.args[3:])
        else:
            n.kwargs = {**n.kwargs, "sizes": new}

    ctx.on_build_node(rewrite)


@register("expand")
def expand(ctx: Ctx) -> Dims:
    x = _first(ctx)
    xd, a, b = ctx.dims(x), ctx.shape(x), ctx.shape(ctx.node)
    lead = len(b) - len(a)
    out = ctx.fresh(b[:lead]) + [xd[i] if a[i] == b[lead + i] else ctx.spaces.new(b[lead + i]) for i in range(len(a))]
    sizes, as_seq = _size_args(ctx.node)
    new_sizes = _new_sizes(ctx, sizes, out, b)

    def rewrite(n: fx.Node, size: Any) -> None:
        new = new_sizes(_size_args(n)[0], size)
        n.args = (n.args[0], tuple(new)) if as_seq else (n.args[0], *new)
        n.kwargs = {}

    ctx.on_build_node(rewrite)
    return out


@register("expand_as")
def expand_as(ctx: Ctx) -> Dims:
    """``y.expand_as(x)`` (ECA's gate): the teacher expands to its own ``x``, so only the dims relate."""
    y, x = ctx.tensor_args()[:2]
    yd, xd, a, b = ctx.dims(y), ctx.dims(x), ctx.shape(y), ctx.shape(x)
    lead = len(b) - len(a)
    for i in range(len(a)):
        if a[i] == b[lead + i]:
            ctx.unify(yd[i], xd[lead + i])
    return list(xd)


@register(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(ctx: Ctx) -> Dims:
    """``x.repeat_interleave(r, dim)`` (gcvit's global query, repeated per window): the other dims pass."""
    x = _first(ctx)
    dim = ctx.arg(2, "dim")
    if not isinstance(dim, int) or isinstance(ctx.arg(1, "repeats"), fx.Node) and ctx.is_tensor(ctx.arg(1, "repeats")):
        return ctx.unsupported("repeat_interleave over the flattened tensor or by a tensor")
    xd = ctx.dims(x)
    d = _dim(dim, len(xd))
    ctx.freeze(xd[d], "repeating a channel dimension")
    out = list(xd)
    out[d] = ctx.spaces.new(ctx.shape(ctx.node)[d], frozen="repeating a channel dimension")
    return out


@register("repeat", torch.tile, "tile")
def repeat(ctx: Ctx) -> Dims:
    """``x.repeat(1, r, 1)``: a repeated dim is ``r`` blocks of the channel space (row-major ``Prod(r, C)``),
    so its copies stay copies; the repetition counts are the same in the teacher."""
    x = _first(ctx)
    xd = ctx.dims(x)
    reps = list(ctx.node.args[1:])
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
        reps = list(reps[0])
    if not all(isinstance(r, int) for r in reps) or len(reps) < len(xd):
        return ctx.unsupported("repeat with computed or fewer counts than dims")
    lead = len(reps) - len(xd)
    out = ctx.fresh(ctx.shape(ctx.node)[:lead], frozen=f"{BY_DESIGN}: repetitions")
    for lay, r in zip(xd, reps[lead:]):
        if r == 1:
            out.append(lay)
        else:
            whole = ctx.spaces.new(r * ctx.spaces.size_of(lay))
            ctx.unify(whole, Prod((ctx.spaces.new(r, frozen=f"{BY_DESIGN}: repetitions"), lay)))
            out.append(whole)
    return out


@register(torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes", "t", torch.t)
def permute(ctx: Ctx) -> Dims:
    xd = list(ctx.dims(_first(ctx)))
    n = len(xd)
    target = ctx.node.target
    if target in ("t", torch.t):
        order = list(range(n))[::-1]
    elif target in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
        d0, d1 = _dim(ctx.arg(1, "dim0"), n), _dim(ctx.arg(2, "dim1"), n)
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        args = list(ctx.node.args[1:]) or [ctx.node.kwargs.get("dims")]
        order = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        order = [_dim(d, n) for d in order]
    return [xd[i] for i in order]


@register(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: Ctx) -> Dims:
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    n = len(ctx.shape(ctx.node))
    d = _dim(ctx.arg(1, "dim", 0), n)
    first = ctx.dims(tensors[0])
    for t in tensors[1:]:
        for k, lay in enumerate(ctx.dims(t)):
            if k != d:
                ctx.unify(first[k], lay)
    out = list(first)
    out[d] = Cat(tuple(ctx.dims(t)[d] for t in tensors))
    return out


@register(torch.stack)
def stack(ctx: Ctx) -> Dims:
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    n = len(ctx.shape(ctx.node))
    d = _dim(ctx.arg(1, "dim", 0), n)
    first = ctx.dims(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(first, ctx.dims(t)):
            ctx.unify(a, b)
    new = ctx.spaces.new(len(tensors), frozen=f"{BY_DESIGN}: number of stacked tensors")
    return list(first[:d]) + [new] + list(first[d:])


@register(torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split", torch.unbind, "unbind")
def split(ctx: Ctx) -> Dims:
    x = _first(ctx)
    xd = ctx.dims(x)
    target = ctx.node.target
    is_unbind = target in (torch.unbind, "unbind")
    d = _dim(ctx.arg(1 if is_unbind else 2, "dim", 0), len(xd))
    outs = ctx.spec(ctx.node)
    pieces = [ctx.spaces.new(1 if is_unbind else s.shape[d]) for s in outs]
    ctx.unify(xd[d], Cat(tuple(pieces)))
    if is_unbind:
        return tuple([lay for k, lay in enumerate(xd) if k != d] for _ in outs)

    def rewrite(n: fx.Node, size: Any) -> None:
        n.target = "split" if n.op == "call_method" else torch.split
        n.args, n.kwargs = (n.args[0], [size(p) for p in pieces]), {"dim": d}

    ctx.on_build_node(rewrite)
    return tuple(list(xd[:d]) + [p] + list(xd[d + 1 :]) for p in pieces)


@register(operator.getitem)
def getitem(ctx: Ctx) -> Dims:
    src, idx = ctx.node.args[0], ctx.node.args[1]
    if isinstance(src, fx.Node) and isinstance(ctx.spec(src), (tuple, list)):
        return ctx.result.dims[src.name][idx]
    if not ctx.is_tensor(src):
        return ctx.unsupported("getitem")
    xd = ctx.dims(src)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tensors = [k for k, i in enumerate(items) if isinstance(i, fx.Node) and ctx.is_tensor(i)]
    if len(tensors) == 1 and Ellipsis not in items and all(
            i == slice(None) for k, i in enumerate(items) if k != tensors[0]):
        # table[index], bias[:, index] (levit, efficientformer): a lookup along one dim; the others pass
        k = tensors[0]
        ctx.freeze(xd[k], "indexing into a channel dimension")
        return list(xd[:k]) + ctx.fresh(ctx.shape(items[k])) + list(xd[k + 1 :])
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return ctx.unsupported("advanced indexing")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items[k : k + 1] = [slice(None)] * (len(xd) - sum(i is not None for i in items if i is not Ellipsis))
    out: list[Layout] = []
    cuts: dict[int, tuple[Layout | None, Layout]] = {}  # item position -> (what precedes the slice, the slice)
    d = 0
    for k, it in enumerate(items):
        if it is None:
            out.append(ctx.spaces.new(1))
            continue
        if isinstance(it, slice) and it.step in (None, 1) and all(
                isinstance(v, int) or v is None for v in (it.start, it.stop)):
            n = ctx.shape(src)[d]
            start, stop, _ = it.indices(n)
            stop = max(start, stop)
            if start == 0 and stop == n:  # the whole dim, however written ([:n], [0:], [:])
                out.append(xd[d])
                if it != slice(None):
                    cuts[k] = (None, xd[d])
            else:  # a contiguous piece: the dim is the concatenation of what comes before, it, and after
                pre = ctx.spaces.new(start) if start else None
                piece = ctx.spaces.new(stop - start)
                post = ctx.spaces.new(n - stop) if stop < n else None
                ctx.unify(xd[d], Cat(tuple(p for p in (pre, piece, post) if p is not None)))
                out.append(piece)
                cuts[k] = (pre, piece)
        else:
            ctx.freeze(xd[d], "indexing into a channel dimension")
            if isinstance(it, slice):
                out.append(ctx.spaces.new(ctx.shape(ctx.node)[len(out)], frozen="strided slice of a channel dimension"))
        d += 1
    if cuts:
        def rewrite(n: fx.Node, size: Any) -> None:
            idx = list(n.args[1]) if isinstance(n.args[1], tuple) else [n.args[1]]
            if Ellipsis in idx:  # the positions above are after expanding the ellipsis
                e = idx.index(Ellipsis)
                idx[e : e + 1] = [slice(None)] * (len(items) - len(idx) + 1)
            for k, (pre, piece) in cuts.items():
                start = size(pre) if pre is not None else 0
                idx[k] = slice(start or None, start + size(piece))
            n.args = (n.args[0], tuple(idx) if isinstance(n.args[1], tuple) or len(idx) > 1 else idx[0])

        ctx.on_build_node(rewrite)
    return out + list(xd[d:])


@register(F.pad)
def pad(ctx: Ctx) -> Dims:
    """Padding the last dims: padded dims keep their size class (spatial); others pass through."""
    xd = ctx.dims(_first(ctx))
    widths = ctx.arg(1, "pad")
    if not isinstance(widths, (tuple, list)):
        return ctx.unsupported("F.pad with computed widths")
    k = len(widths) // 2
    out = list(xd)
    shape = ctx.shape(ctx.node)
    for j in range(k):
        d = len(xd) - 1 - j
        if widths[2 * j] != 0 or widths[2 * j + 1] != 0:  # a computed width counts as padding
            ctx.freeze(xd[d], "padding a channel dimension")
            out[d] = spatial(ctx, (shape[d],))[0]
    return out


@register(torch.roll, "roll")
def roll(ctx: Ctx) -> Dims:
    xd = ctx.dims(_first(ctx))
    dims = ctx.arg(2, "dims")
    if dims is None:
        return ctx.unsupported("roll over the flattened tensor")
    for d in [dims] if isinstance(dims, int) else dims:
        ctx.freeze(xd[_dim(d, len(xd))], "rolling a channel dimension")
    return list(xd)


@register(torch.flip, "flip")
def flip(ctx: Ctx) -> Dims:
    xd = ctx.dims(_first(ctx))
    dims = ctx.arg(1, "dims")
    dims = ctx.node.args[1:] if isinstance(dims, int) and ctx.node.op == "call_method" else dims
    for d in [dims] if isinstance(dims, int) else dims:
        ctx.freeze(xd[_dim(d, len(xd))], "flipping a channel dimension")
    return list(xd)


def channels_last_window(ctx: Ctx) -> Dims:
    """Window partition and reverse (B, H, W, C) <-> (B*nW, ws, ws, C): channels pass, the rest is spatial."""
    xd = ctx.dims(_first(ctx))
    shape = ctx.shape(ctx.node)
    for lay in xd[:-1]:
        ctx.freeze(lay, f"{BY_DESIGN}: spatial")
    return spatial(ctx, shape[:-1]) + [xd[-1]]


# -- normalizations over the last dims ----------------------------------------------------
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


@register(nn.LayerNorm, nn.RMSNorm)
def layer_norm(ctx: Ctx) -> Dims:
    m = ctx.module(ctx.node)
    k = len(m.normalized_shape)
    name = str(ctx.node.target)
    w = ctx.param(f"{name}.weight", ["copy"] * k) if m.weight is not None else None
    b = ctx.param(f"{name}.bias", ["copy"] * k) if getattr(m, "bias", None) is not None else None
    x = _first(ctx)
    out = _layer_norm(ctx, x, k, w, b)

    def build(t: nn.Module, size: Any) -> nn.Module | None:
        t.normalized_shape = tuple(size(lay) for lay in out[len(out) - k :])
        copies = _norm_copies(size, out, k)
        if copies is None:
            return None
        return WeightedRMSNorm(t, copies) if isinstance(t, nn.RMSNorm) else WeightedLayerNorm(t, copies)

    ctx.on_build_module(build)
    return out


@register(F.layer_norm, F.rms_norm)
def layer_norm_function(ctx: Ctx) -> Dims:
    x = _first(ctx)
    is_ln = ctx.node.target is F.layer_norm
    k = len(ctx.arg(1, "normalized_shape"))
    w = _attr_param(ctx, ctx.arg(2, "weight"), ["copy"] * k)
    b = _attr_param(ctx, ctx.arg(3, "bias"), ["copy"] * k) if is_ln else None
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


# -- attention: widen the number of heads, never the head dim ------------------------------------
HEAD_DIM = f"{BY_DESIGN}: head dimension"
CONTRACTED = f"{BY_DESIGN}: contracted by a product of two activations"


def _heads(ctx: Ctx, proj_out: Layout, num_heads: int, head_dim: int, parts: int = 3) -> Layout:
    """Structure a fused projection's output as (parts, heads, head_dim); return the heads space."""
    heads = ctx.expandable(num_heads)
    hd = ctx.spaces.new(head_dim, frozen=HEAD_DIM)
    whole = Prod((ctx.spaces.new(parts, frozen=f"{BY_DESIGN}: q, k, v"), heads, hd)) if parts > 1 else Prod((heads, hd))
    ctx.unify(proj_out, whole)
    return heads


def _width_in_heads(ctx: Ctx, width: Layout, num_heads: int, head_dim: int) -> None:
    """Ops that derive head_dim as width // heads need the input width to widen by whole heads: structure
    it as (blocks, head_dim) so that fractional ratios round on the number of blocks, like the heads."""
    blocks = ctx.expandable(num_heads)
    ctx.unify(width, Prod((blocks, ctx.spaces.new(head_dim, frozen=HEAD_DIM))))


@register(nn.MultiheadAttention)
def multihead_attention(ctx: Ctx) -> Dims:
    m: nn.MultiheadAttention = ctx.module(ctx.node)  # type: ignore[assignment]
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return ctx.unsupported("MultiheadAttention with separate q/k/v widths or extra key/value biases")
    name = str(ctx.node.target)
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    W = ctx.param(f"{name}.in_proj_weight", ["copy", "share"])
    heads = _heads(ctx, W[0], m.num_heads, m.head_dim)
    _width_in_heads(ctx, W[1], m.num_heads, m.head_dim)
    for t in (q, k, v):
        ctx.unify(ctx.dims(t)[-1], W[1])
    if m.in_proj_bias is not None:
        ctx.unify(ctx.param(f"{name}.in_proj_bias", ["copy"])[0], W[0])
    O = ctx.param(f"{name}.out_proj.weight", ["copy", "share"])
    ctx.spaces.mark_expandable(O[0])
    ctx.unify(O[1], Prod((heads, ctx.spaces.new(m.head_dim, frozen=HEAD_DIM))))
    if m.out_proj.bias is not None:
        ctx.unify(ctx.param(f"{name}.out_proj.bias", ["copy"])[0], O[0])

    def build(t: nn.Module, size: Any) -> None:
        width, h = size(W[1]), size(heads)
        if width != h * m.head_dim:  # nn.MultiheadAttention derives head_dim from the width
            raise GPDError(f"{name}: nn.MultiheadAttention needs width == heads x head_dim, teacher has "
                           f"{width} != {h} x {m.head_dim} (use an integer ratio)")
        t.embed_dim = t.kdim = t.vdim = width
        t.num_heads = h
        t.out_proj.in_features, t.out_proj.out_features = size(O[1]), size(O[0])

    ctx.on_build_module(build)
    spec = ctx.spec(ctx.node)
    out = list(ctx.dims(q)[:-1]) + [O[0]]
    return (out, ctx.fresh_like(spec[1])) if isinstance(spec, tuple) else out


def _batch_unify(ctx: Ctx, *dims: list[Layout]) -> list[Layout]:
    """Broadcast batch dims of several operands from the right; copies of a batch entry stay copies."""
    n = max(len(d) for d in dims)
    out: list[Layout | None] = [None] * n
    for d in dims:
        for k in range(1, len(d) + 1):
            if ctx.spaces.size_of(d[-k]) == 1:
                continue
            if out[-k] is None:
                out[-k] = d[-k]
            else:
                ctx.unify(out[-k], d[-k])  # type: ignore[arg-type]
    res = [o if o is not None else ctx.spaces.new(1) for o in out]
    for lay in res:
        ctx.spaces.mark_expandable(lay)
    return res


@register(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def matmul(ctx: Ctx) -> Dims:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if not (ctx.is_tensor(a) and ctx.is_tensor(b)) or len(ctx.shape(a)) < 2 or len(ctx.shape(b)) < 2:
        return ctx.unsupported("matmul of vectors")
    da, db = ctx.dims(a), ctx.dims(b)
    W = _attr_param(ctx, b, [None] * (len(db) - 2) + ["share", "copy"]) if len(db) == 2 else None
    if W is not None:  # x @ W with a parameter W: a linear layer written by hand
        ctx.spaces.mark_expandable(W[1])
        ctx.unify(da[-1], W[0])
        return list(da[:-1]) + [W[1]]
    ctx.unify(da[-1], db[-2])
    ctx.freeze(da[-1], CONTRACTED)
    return _batch_unify(ctx, list(da[:-2]), list(db[:-2])) + [da[-2], db[-1]]


@register(torch.einsum)
def einsum(ctx: Ctx) -> Dims:
    eq = ctx.node.args[0]
    ops = list(ctx.node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return ctx.unsupported("einsum without an explicit output")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return ctx.unsupported("einsum")
    letters: dict[str, Layout] = {}
    count: dict[str, int] = {}
    for term, op in zip(terms, ops):
        for ch, lay in zip(term, ctx.dims(op)):
            if ctx.spaces.size_of(lay) == 1 and ch in letters:
                continue
            if ch in letters:
                ctx.unify(letters[ch], lay)
            else:
                letters[ch] = lay
            count[ch] = count.get(ch, 0) + 1
    for ch, lay in letters.items():
        if ch not in rhs and len(ops) > 1:
            ctx.freeze(lay, CONTRACTED)
        elif ch not in rhs:
            ctx.freeze(lay, f"reduction over a channel dimension (einsum {eq})")
        elif count[ch] == len(ops) and len(ops) > 1:
            ctx.spaces.mark_expandable(lay)
    return [letters[ch] for ch in rhs]


@register(F.scaled_dot_product_attention)
def sdpa(ctx: Ctx) -> Dims:
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    dq, dk, dv = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    ctx.unify(dq[-1], dk[-1])
    ctx.freeze(dq[-1], HEAD_DIM)
    ctx.unify(dk[-2], dv[-2])
    batch = _batch_unify(ctx, list(dq[:-2]), list(dk[:-2]), list(dv[:-2]))
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.is_tensor(mask):
        full = batch + [dq[-2], dk[-2]]
        md, ms = ctx.dims(mask), ctx.shape(mask)
        for j in range(1, len(md) + 1):
            if ms[-j] != 1:
                ctx.unify(md[-j], full[-j])
    return batch + [dq[-2], dv[-1]]


@register(F.linear)
def linear_function(ctx: Ctx) -> Dims:
    x = _first(ctx)
    W = _attr_param(ctx, ctx.arg(1, "weight"), ["copy", "share"])
    if W is None:
        return ctx.unsupported("F.linear with a computed weight")
    b = ctx.arg(2, "bias")
    B = _attr_param(ctx, b, ["copy"])
    if B is None and isinstance(b, fx.Node):  # beit's qkv bias: cat(q_bias, zeros, v_bias), copied per channel
        if not ctx.is_tensor(b) or len(ctx.shape(b)) != 1:
            return ctx.unsupported("F.linear with a computed bias that is not a vector")
        B = ctx.dims(b)
    ctx.spaces.mark_expandable(W[0])
    ctx.unify(ctx.dims(x)[-1], W[1])
    if B is not None:
        ctx.unify(B[0], W[0])
    return list(ctx.dims(x)[:-1]) + [W[0]]


@register(F.normalize)
def normalize(ctx: Ctx) -> Dims:
    xd = ctx.dims(_first(ctx))
    ctx.freeze(xd[_dim(ctx.arg(2, "dim", 1), len(xd))], "normalization along a channel dimension (F.normalize)")
    return list(xd)


try:  # torchvision wraps stochastic depth for fx: it drops whole samples, so channels pass through
    from torchvision.ops import stochastic_depth as _stochastic_depth

    register(_stochastic_depth)(unary)
except ImportError:  # pragma: no cover - torchvision is optional
    pass


try:  # torchvision's Swin wraps its attention and patch merging for fx: rules for the wrapped functions
    from torchvision.models import swin_transformer as _swin

    @register(_swin._patch_merging_pad)
    def patch_merging_pad(ctx: Ctx) -> Dims:
        xd = ctx.dims(_first(ctx))
        shape = ctx.shape(ctx.node)
        return list(xd[:-3]) + spatial(ctx, shape[-3:-1]) + [Cat((xd[-1],) * 4)]

    @register(_swin._get_relative_position_bias)
    def relative_position_bias(ctx: Ctx) -> Dims:
        table = ctx.dims(ctx.arg(0, "relative_position_bias_table"))
        n = ctx.shape(ctx.node)[-1]
        return [ctx.spaces.new(1), table[-1]] + spatial(ctx, (n, n))

    @register(_swin.shifted_window_attention)
    def shifted_window_attention(ctx: Ctx) -> Dims:
        x = ctx.arg(0, "input")
        xd = ctx.dims(x)
        num_heads = ctx.arg(5, "num_heads")
        W = _attr_param(ctx, ctx.arg(1, "qkv_weight"), ["copy", "share"])
        P = _attr_param(ctx, ctx.arg(2, "proj_weight"), ["copy", "share"])
        if W is None or P is None or not isinstance(num_heads, int):
            return ctx.unsupported("shifted_window_attention with computed weights")
        head_dim = ctx.shape(x)[-1] // num_heads
        heads = _heads(ctx, W[0], num_heads, head_dim)
        _width_in_heads(ctx, W[1], num_heads, head_dim)
        ctx.unify(xd[-1], W[1])
        ctx.spaces.mark_expandable(P[0])
        ctx.unify(P[1], Prod((heads, ctx.spaces.new(head_dim, frozen=HEAD_DIM))))
        for i, name, target in ((9, "qkv_bias", W[0]), (10, "proj_bias", P[0])):
            B = _attr_param(ctx, ctx.arg(i, name), ["copy"])
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
except ImportError:  # pragma: no cover - torchvision is optional
    pass


try:  # timm fuses norm and activation into leaf modules; the activation acts per element
    from timm.layers import norm_act as _timm_norm_act

    register(_timm_norm_act.BatchNormAct2d)(batch_norm)
    register(_timm_norm_act.GroupNormAct)(group_norm)
    from timm.layers.conv2d_same import Conv2dSame as _Conv2dSame

    register(_Conv2dSame)(conv)  # an nn.Conv2d whose padding is computed from the input's size: spatial only
except Exception:  # timm is optional
    pass

def _timm_channels_last_windows() -> None:
    """timm's window and block (un)partitions, wrapped from tracing: (B, H, W, C) <-> windows of (..., C)."""
    import importlib

    names = {"swin_transformer": ("window_partition", "window_reverse"),
             "swin_transformer_v2": ("window_partition", "window_reverse"),
             "swin_transformer_v2_cr": ("window_partition", "window_reverse"),
             "maxxvit": ("window_partition", "window_reverse", "grid_partition", "grid_reverse"),
             "gcvit": ("window_partition", "window_reverse"), "davit": ("window_partition", "window_reverse"),
             "nest": ("blockify", "deblockify")}
    for module, fns in names.items():
        try:
            mod = importlib.import_module(f"timm.models.{module}")
        except Exception:  # timm is optional, and its modules come and go
            continue
        register(*[getattr(mod, f) for f in fns if hasattr(mod, f)])(channels_last_window)


_timm_channels_last_windows()
