"""Layers with weights: convolutions and transposed convolutions (modules and functions), linear layers,
embeddings and PReLU.

A dense layer widens its outputs and shares its weight among the copies of each input channel
(``share``); a grouped convolution widens its number of groups, channels within a group kept. An
embedding table is a lookup: its embedding dim widens (copied), its number of rows is not a channel.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims, Rule
from ..fallback import at_student_width
from ..layout import Layout, Prod
from ..teacher_ops import FoldedStdConv
from .common import BY_DESIGN, attr_param, first_tensor, may_widen, per_channel, spatial
from .registry import builtin


def _conv_channels(ctx: Ctx, channel: Layout, W: list[Layout], n_groups: int, out_channels: int) -> Layout | None:
    """Relate a convolution's input channels to its weight: a dense conv shares its input copies and widens
    its outputs; a grouped conv widens the number of groups (returned). Where its groups cannot widen
    (resnest's radix, whose softmax runs across them), the channels within a group widen instead: within a
    group the conv is dense (outputs copied, input copies sharing the weight), and the copies of a channel
    stay in its group."""
    ctx.spaces.mark_expandable(W[0])  # a product (groups x within): its groups widen first, see Spaces.finalize
    if n_groups == 1:
        ctx.unify(channel, W[1])
        return None
    groups = ctx.expandable(n_groups)
    ctx.unify(channel, Prod((groups, W[1])))
    ctx.unify(W[0], Prod((groups, ctx.spaces.new(out_channels // n_groups))))
    return groups


def _conv_transpose_channels(ctx: Ctx, channel: Layout, W: list[Layout], n_groups: int,
                             in_channels: int) -> tuple[Layout, Layout | None]:
    """A transposed convolution's weight is ``[in, out / groups, *k]``: a dense one shares its input copies
    (dim 0) and widens its outputs (dim 1); a grouped one widens the number of groups, whose weights are
    copied (each teacher output sees one copy of each input of its group). Returns the output channels'
    layout and the groups (None when dense)."""
    if n_groups == 1:
        ctx.spaces.mark_expandable(W[1])
        ctx.unify(channel, W[0])
        return W[1], None
    groups = ctx.expandable(n_groups)
    ctx.freeze(W[1], f"{BY_DESIGN}: channels within a group")
    within = ctx.spaces.new(in_channels // n_groups, frozen=f"{BY_DESIGN}: channels within a group")
    ctx.unify(W[0], Prod((groups, within)))
    ctx.unify(channel, W[0])
    out = ctx.spaces.new(ctx.spaces.size_of(W[1]) * n_groups)
    ctx.unify(out, Prod((groups, W[1])))
    return out, groups


def _weight_modes(transposed: bool, n_groups: int) -> list[str | None]:
    """Collapse recipe of a convolution's weight: its input dim shared among copies where it is dense."""
    if not transposed:
        return ["copy", "share"]
    return ["share", "copy"] if n_groups == 1 else ["copy", None]


def conv_output(ctx: Ctx, xd: list[Layout], c: int, out: Layout) -> Dims:
    """A convolution's output: the leading dims of its input, its output channels, new spatial dims. The
    input's spatial dims keep their size (a kernel over copies of a channel would see other neighbours, and
    a widened factor there would change the output's size): a channel space met there is frozen."""
    for lay in xd[c + 1 :]:
        ctx.freeze(lay, f"a convolution runs along this dimension at {ctx.where}")
    return list(xd[:c]) + [out] + spatial(ctx, ctx.shape(ctx.node)[c + 1 :])


def conv_module(ctx: Ctx) -> tuple[list[Layout], int, list[Layout], Layout | None]:
    """Relate a conv module's input, weight and bias: (the input's dims, its channel dim, the weight's dims, the
    widened groups or None). Its build hook is the caller's (``conv_build``)."""
    m: nn.Conv2d = ctx.module(ctx.node)  # type: ignore[assignment]
    name = str(ctx.node.target)
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    c = len(ctx.shape(x)) - len(m.kernel_size) - 1  # channel dim (0 when unbatched)
    W = ctx.param(f"{name}.weight", _weight_modes(False, m.groups))
    groups = _conv_channels(ctx, xd[c], W, m.groups, m.out_channels)
    if m.bias is not None:
        ctx.unify(ctx.param(f"{name}.bias", ["copy"])[0], W[0])
    return xd, c, W, groups


def conv_build(t: nn.Module, size: Any, channel: Layout, W: list[Layout], groups: Layout | None) -> None:
    """A teacher conv's sizes."""
    t.in_channels, t.out_channels = size(channel), size(W[0])
    t.groups = size(groups) if groups is not None else 1


@builtin(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(ctx: Ctx) -> Dims:
    """Dense convs share their input copies; grouped convs expand the number of groups. A conv whose kernel runs
    along a dim that may widen (ECA's Conv1d across a pooled channel vector: a kernel over copies would see
    other neighbours) runs at the student's width, so that the channels stay free to widen around it."""
    m = ctx.module(ctx.node)
    x = first_tensor(ctx)
    c = len(ctx.shape(x)) - len(m.kernel_size) - 1
    if any(may_widen(ctx, lay) for lay in ctx.dims(x)[c + 1 :]):
        return at_student_width(ctx, f"{type(m).__name__} along a channel dimension")
    xd, c, W, groups = conv_module(ctx)
    ctx.on_build_module(lambda t, size: conv_build(t, size, xd[c], W, groups))
    return conv_output(ctx, xd, c, W[0])


@builtin(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(ctx: Ctx) -> Dims:
    """The input dim of the weight (dim 0) is the shared one; stride, padding, output_padding and dilation
    act on space only."""
    m: nn.ConvTranspose2d = ctx.module(ctx.node)  # type: ignore[assignment]
    name = str(ctx.node.target)
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    c = len(ctx.shape(x)) - len(m.kernel_size) - 1
    W = ctx.param(f"{name}.weight", _weight_modes(True, m.groups))
    out, groups = _conv_transpose_channels(ctx, xd[c], W, m.groups, m.in_channels)
    if m.bias is not None:
        ctx.unify(ctx.param(f"{name}.bias", ["copy"])[0], out)

    def build(t: nn.Module, size: Any) -> None:
        t.in_channels, t.out_channels = size(xd[c]), size(out)
        t.groups = size(groups) if groups is not None else 1

    ctx.on_build_module(build)
    return conv_output(ctx, xd, c, out)


TRANSPOSED = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose1d,
              torch.conv_transpose2d, torch.conv_transpose3d)


@builtin(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, *TRANSPOSED)
def conv_function(ctx: Ctx) -> Dims:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with a weight read through get_attr
    (tresnet's fixed anti-aliasing filter, groups = channels): as the module; the groups are rewritten. The
    same for ``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)``."""
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    transposed = ctx.node.target in TRANSPOSED
    groups_arg = ctx.arg(6, "groups", 1)
    n_groups = ctx.spec(groups_arg)
    if not isinstance(n_groups, int):
        return ctx.unsupported("a convolution function with unknown groups")
    W = attr_param(ctx, ctx.arg(1, "weight"), _weight_modes(transposed, n_groups))
    if W is None:
        return ctx.unsupported("a convolution function with a computed weight")
    weight_shape = ctx.shape(ctx.arg(1, "weight"))
    c = len(ctx.shape(x)) - (len(weight_shape) - 2) - 1
    if transposed:
        out, groups = _conv_transpose_channels(ctx, xd[c], W, n_groups, weight_shape[0])
    else:
        out, groups = W[0], _conv_channels(ctx, xd[c], W, n_groups, weight_shape[0])
    bias = ctx.arg(2, "bias")
    if isinstance(bias, fx.Node):
        B = attr_param(ctx, bias, ["copy"])
        if B is None:
            return ctx.unsupported("a convolution function with a computed bias")
        ctx.unify(B[0], out)

    def rewrite(n: fx.Node, size: Any) -> None:
        if groups is None:
            return
        if len(n.args) > 6:
            n.args = (*n.args[:6], size(groups), *n.args[7:])
        else:
            n.kwargs = {**n.kwargs, "groups": size(groups)}

    ctx.on_build_node(rewrite)
    return conv_output(ctx, xd, c, out)


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


def _embedding(ctx: Ctx, W: list[Layout], max_norm: Any) -> None:
    """An embedding's dim widens (copied: a row lookup gives every copy the student's value); its rows are
    not channels. ``max_norm`` rescales each looked-up row by its norm over the embedding dim, which copies
    would change: that dim keeps its size then."""
    ctx.spaces.mark_expandable(W[1])
    if max_norm is not None:
        ctx.freeze(W[1], f"embedding rows renormalized to max_norm at {ctx.where}")


def _embedding_module(ctx: Ctx) -> Layout:
    """An nn.Embedding's or nn.EmbeddingBag's weight related and its embedding_dim set in the teacher: the
    embedding dim's layout."""
    m = ctx.module(ctx.node)
    W = ctx.param(f"{ctx.node.target}.weight", [None, "copy"])
    _embedding(ctx, W, m.max_norm)

    def build(t: nn.Module, size: Any) -> None:
        t.embedding_dim = size(W[1])

    ctx.on_build_module(build)
    return W[1]


@builtin(nn.Embedding)
def embedding(ctx: Ctx) -> Dims:
    """``weight[index]``: the index tensor's dims, then the embedding dim."""
    return list(ctx.dims(first_tensor(ctx))) + [_embedding_module(ctx)]


@builtin(F.embedding)
def embedding_function(ctx: Ctx) -> Dims:
    W = attr_param(ctx, ctx.arg(1, "weight"), [None, "copy"])
    if W is None:
        return ctx.unsupported("F.embedding with a computed weight")
    _embedding(ctx, W, ctx.arg(3, "max_norm"))
    return list(ctx.dims(ctx.arg(0, "input"))) + [W[1]]


@builtin(nn.EmbeddingBag)
def embedding_bag(ctx: Ctx) -> Dims:
    """Bags of rows reduced per channel (sum, mean or max, optionally weighted per sample): one row per bag
    (the index tensor's first dim when it is 2-D), then the embedding dim."""
    dim = _embedding_module(ctx)
    index = ctx.dims(first_tensor(ctx))
    bags = [index[0]] if len(index) == 2 else spatial(ctx, ctx.shape(ctx.node)[:1])
    return bags + [dim]


def weight_standardised(pad_of: Callable[[nn.Module], Any]) -> Rule:
    """The rule of a weight-standardised conv (timm's StdConv2d and ScaledStdConv2d, BiT's), whose weight's rows
    are standardised over their fan-in (by F.batch_norm in training mode), then scaled by a gain: as a conv, its
    gain copied per output channel. Where its input dim widens, the teacher standardises each row with the
    statistics of the row folded back to the student's width (``FoldedStdConv``): exact at any ratio and
    shares, and the collapse is a conv's. The module is kept whole (a leaf), the standardisation one op.
    ``pad_of(module)``: the padding it applies to its input first (a function or a module), or None."""

    def rule(ctx: Ctx) -> Dims:
        m = ctx.module(ctx.node)
        xd, c, W, groups = conv_module(ctx)
        if isinstance(getattr(m, "gain", None), nn.Parameter):
            ctx.unify(ctx.param(f"{ctx.node.target}.gain", ["copy"])[0], W[0])

        def build(t: nn.Module, size: Any) -> nn.Module:
            conv_build(t, size, xd[c], W, groups)
            src = size.src(W[1])  # None: each row's fan-in is the student's, folding changes nothing
            student = size.student(W[1])
            # Always FoldedStdConv: with branches its _conv_forward standardises the merged kernel, where the
            # student's class would convolve with it as it is.
            return FoldedStdConv(t, torch.arange(student) if src is None else src, student, pad_of(t))

        ctx.on_build_module(build)
        return conv_output(ctx, xd, c, W[0])

    rule.takes_branches = True  # type: ignore[attr-defined]  # see expansion.plan_branches
    return rule
