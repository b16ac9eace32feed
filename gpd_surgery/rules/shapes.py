"""Data movement: reshape, flatten, permute, cat, stack, split, indexing, padding, repeats and windows.

A dimension can be a product of spaces (``C = heads x head_dim``, ``C*H*W`` after a flatten) or a
concatenation (``torch.cat`` along channels, the pieces of a ``chunk``): these rules relate the
dims exactly and rewrite the teacher's sizes (reshape targets, split sizes, slice bounds).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from ..fallback import at_student_width
from ..layout import Cat, Layout, Prod
from .common import BY_DESIGN, dim_index, first_tensor, may_widen, spatial
from .registry import builtin
from .values import size_reads


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


def _new_sizes(ctx: Ctx, sizes: list[Any], out: list[Layout], b: tuple[int, ...]
               ) -> Callable[[list[Any], Any], list[Any]]:
    """How the teacher computes each target size of a view, reshape or expand: -1 stays; a constant becomes
    the teacher's size; a size computed in the graph stays computed (a batch size follows the input) unless
    it reads a widened dim, where the teacher's size replaces it."""
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and isinstance(ctx.spec(sizes[0]), (tuple, list)):
        whole = size_reads(ctx, sizes[0])  # reshape(x.shape): one node for every size

        def new_whole(teacher_sizes: list[Any], size: Any) -> list[Any]:
            if whole is not None and len(whole) == len(out) and all(size(r) == size(lay) for r, lay in zip(whole, out)):
                return teacher_sizes  # the teacher's own shape is the one wanted
            return [size(lay) for lay in out]

        return new_whole
    reads = [size_reads(ctx, s) if isinstance(s, fx.Node) else None for s in sizes]

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


@builtin("view", "reshape", torch.reshape, torch.flatten, "flatten", nn.Flatten, nn.Unflatten, torch.unflatten,
          "unflatten", torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", "view_as", "reshape_as")
def reshape(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
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
        d0 = dim_index(m.dim, len(a)) if isinstance(m.dim, int) else 0
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
    d0 = dim_index(dim, ndim)
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


@builtin("expand")
def expand(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
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


@builtin("expand_as")
def expand_as(ctx: Ctx) -> Dims:
    """``y.expand_as(x)`` (ECA's gate): the teacher expands to its own ``x``, so only the dims relate."""
    y, x = ctx.tensor_args()[:2]
    yd, xd, a, b = ctx.dims(y), ctx.dims(x), ctx.shape(y), ctx.shape(x)
    lead = len(b) - len(a)
    for i in range(len(a)):
        if a[i] == b[lead + i]:
            ctx.unify(yd[i], xd[lead + i])
    return list(xd)


@builtin(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(ctx: Ctx) -> Dims:
    """``x.repeat_interleave(r, dim)`` (gcvit's global query, repeated per window): the other dims pass."""
    x = first_tensor(ctx)
    dim = ctx.arg(2, "dim")
    if not isinstance(dim, int) or isinstance(ctx.arg(1, "repeats"), fx.Node) and ctx.is_tensor(ctx.arg(1, "repeats")):
        return ctx.unsupported("repeat_interleave over the flattened tensor or by a tensor")
    xd = ctx.dims(x)
    d = dim_index(dim, len(xd))
    ctx.freeze(xd[d], "repeating a channel dimension")
    out = list(xd)
    out[d] = ctx.spaces.new(ctx.shape(ctx.node)[d], frozen="repeating a channel dimension")
    return out


@builtin("repeat", torch.tile, "tile")
def repeat(ctx: Ctx) -> Dims:
    """``x.repeat(1, r, 1)``: a repeated dim is ``r`` blocks of the channel space (row-major ``Prod(r, C)``),
    so its copies stay copies; the repetition counts are the same in the teacher."""
    x = first_tensor(ctx)
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


@builtin(torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes", "t", torch.t)
def permute(ctx: Ctx) -> Dims:
    xd = list(ctx.dims(first_tensor(ctx)))
    n = len(xd)
    target = ctx.node.target
    if target in ("t", torch.t):
        order = list(range(n))[::-1]
    elif target in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
        d0, d1 = dim_index(ctx.arg(1, "dim0"), n), dim_index(ctx.arg(2, "dim1"), n)
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        args = list(ctx.node.args[1:]) or [ctx.node.kwargs.get("dims")]
        order = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        order = [dim_index(d, n) for d in order]
    return [xd[i] for i in order]


@builtin(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: Ctx) -> Dims:
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    n = len(ctx.shape(ctx.node))
    d = dim_index(ctx.arg(1, "dim", 0), n)
    first = ctx.dims(tensors[0])
    for t in tensors[1:]:
        for k, lay in enumerate(ctx.dims(t)):
            if k != d:
                ctx.unify(first[k], lay)
    out = list(first)
    out[d] = Cat(tuple(ctx.dims(t)[d] for t in tensors))
    return out


@builtin(torch.stack)
def stack(ctx: Ctx) -> Dims:
    tensors = [t for t in ctx.arg(0, "tensors") if ctx.is_tensor(t)]
    n = len(ctx.shape(ctx.node))
    d = dim_index(ctx.arg(1, "dim", 0), n)
    first = ctx.dims(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(first, ctx.dims(t)):
            ctx.unify(a, b)
    new = ctx.spaces.new(len(tensors), frozen=f"{BY_DESIGN}: number of stacked tensors")
    return list(first[:d]) + [new] + list(first[d:])


@builtin(torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split", torch.unbind, "unbind")
def split(ctx: Ctx) -> Dims:
    x = first_tensor(ctx)
    xd = ctx.dims(x)
    target = ctx.node.target
    is_unbind = target in (torch.unbind, "unbind")
    d = dim_index(ctx.arg(1 if is_unbind else 2, "dim", 0), len(xd))
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


@builtin(operator.getitem)
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


def _padded(ctx: Ctx, widths: tuple[Any, ...] | list[Any], what: str) -> Dims:
    """Padding the last ``len(widths) // 2`` dims: a padded dim becomes a new spatial one (a padded channel
    dim keeps its size: the padding would not be copies); the others pass through. Padding a dim that may widen
    (CecaModule pads its pooled channel vector for a conv along it) runs at the student's width instead."""
    xd = ctx.dims(first_tensor(ctx))
    padded = [len(xd) - 1 - j for j in range(len(widths) // 2) if widths[2 * j] != 0 or widths[2 * j + 1] != 0]
    if any(may_widen(ctx, xd[d]) for d in padded):
        out = at_student_width(ctx, f"{what} along a channel dimension")
        for d in padded:  # still channels: what runs along them next (a conv) must not make them spatial
            if isinstance(out, list) and may_widen(ctx, xd[d]):
                ctx.spaces.mark_expandable(out[d])
        return out
    out = list(xd)
    shape = ctx.shape(ctx.node)
    for j in range(len(widths) // 2):
        d = len(xd) - 1 - j
        if widths[2 * j] != 0 or widths[2 * j + 1] != 0:  # a computed width counts as padding
            ctx.freeze(xd[d], f"padding a channel dimension ({what} at {ctx.where})")
            out[d] = spatial(ctx, (shape[d],))[0]
    return out


@builtin(F.pad)
def pad(ctx: Ctx) -> Dims:
    widths = ctx.arg(1, "pad")
    if not isinstance(widths, (tuple, list)):
        return ctx.unsupported("F.pad with computed widths")
    return _padded(ctx, widths, "F.pad")


PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
               nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


@builtin(*PAD_MODULES)
def pad_module(ctx: Ctx) -> Dims:
    """The padding modules: ``F.pad`` with the module's widths (``padding``, one pair per padded dim)."""
    m = ctx.module(ctx.node)
    return _padded(ctx, tuple(m.padding), type(m).__name__)  # type: ignore[arg-type]


@builtin(torch.roll, "roll")
def roll(ctx: Ctx) -> Dims:
    xd = ctx.dims(first_tensor(ctx))
    dims = ctx.arg(2, "dims")
    if dims is None:
        return ctx.unsupported("roll over the flattened tensor")
    for d in [dims] if isinstance(dims, int) else dims:
        ctx.freeze(xd[dim_index(d, len(xd))], "rolling a channel dimension")
    return list(xd)


@builtin(torch.flip, "flip")
def flip(ctx: Ctx) -> Dims:
    xd = ctx.dims(first_tensor(ctx))
    dims = ctx.arg(1, "dims")
    dims = ctx.node.args[1:] if isinstance(dims, int) and ctx.node.op == "call_method" else dims
    for d in [dims] if isinstance(dims, int) else dims:
        ctx.freeze(xd[dim_index(d, len(xd))], "flipping a channel dimension")
    return list(xd)


def channels_last_window(ctx: Ctx) -> Dims:
    """Window partition and reverse (B, H, W, C) <-> (B*nW, ws, ws, C): channels pass, the rest is spatial."""
    xd = ctx.dims(first_tensor(ctx))
    shape = ctx.shape(ctx.node)
    for lay in xd[:-1]:
        ctx.freeze(lay, f"{BY_DESIGN}: spatial")
    return spatial(ctx, shape[:-1]) + [xd[-1]]
