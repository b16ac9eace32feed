"""Attention: widen the number of heads, never the head dimension.

A teacher head is a copy of a student head, so ``q @ k^T`` and the softmax scale are unchanged: fused
projections are structured as ``(3, heads, head_dim)`` with ``head_dim`` frozen, and products of two
activations (``q @ k^T``, einsum) freeze their contracted dims and let their batch dims (the heads) widen.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyse import Ctx, Dims
from ..errors import GPDError
from ..fallback import STUDENT_NAME
from ..layout import Layout, Prod
from .common import BY_DESIGN, attr_param
from .registry import builtin


HEAD_DIM = f"{BY_DESIGN}: head dimension"
CONTRACTED = f"{BY_DESIGN}: contracted by a product of two activations"


def fused_heads(ctx: Ctx, proj_out: Layout, num_heads: int, head_dim: int, parts: int = 3) -> Layout:
    """Structure a fused projection's output as (parts, heads, head_dim); return the heads space."""
    heads = ctx.expandable(num_heads)
    hd = ctx.spaces.new(head_dim, frozen=HEAD_DIM)
    whole = Prod((ctx.spaces.new(parts, frozen=f"{BY_DESIGN}: q, k, v"), heads, hd)) if parts > 1 else Prod((heads, hd))
    ctx.unify(proj_out, whole)
    return heads


def width_in_heads(ctx: Ctx, width: Layout, num_heads: int, head_dim: int) -> Layout:
    """Ops that derive head_dim as width // heads need the input width to widen by whole heads: structure
    it as (blocks, head_dim) so that fractional ratios round on the number of blocks, like the heads.
    Returns the blocks."""
    blocks = ctx.expandable(num_heads)
    ctx.unify(width, Prod((blocks, ctx.spaces.new(head_dim, frozen=HEAD_DIM))))
    return blocks


@builtin(nn.MultiheadAttention)
def multihead_attention(ctx: Ctx) -> Dims:
    m: nn.MultiheadAttention = ctx.module(ctx.node)  # type: ignore[assignment]
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return ctx.unsupported("MultiheadAttention with separate q/k/v widths or extra key/value biases")
    name = str(ctx.node.target)
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    W = ctx.param(f"{name}.in_proj_weight", ["copy", "share"])
    heads = fused_heads(ctx, W[0], m.num_heads, m.head_dim)
    # nn.MultiheadAttention has one embed_dim for its input and its heads: the two widen (or freeze) together
    ctx.unify(width_in_heads(ctx, W[1], m.num_heads, m.head_dim), heads)
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


def contract(ctx: Ctx, lay: Layout, batch: list[Layout], operand: int, dim: int, reason: str = CONTRACTED) -> None:
    """``lay``, summed over by a product of two activations (operand ``operand`` of the node holds it at
    ``dim``). Where the product has batch dims that may widen (the heads), it keeps its size: the heads widen,
    as copies. Otherwise (a single head, any bilinear form x . y over channels) it may widen: the teacher weighs
    that operand by 1 / copies along it, so the sum over the copies is the student's sum, at any ratio."""
    sp = ctx.spaces
    heads = any(sp.frozen[leaf] is None and sp.size[leaf] > 1 for b in batch for leaf in sp.leaves(b))
    if heads or any(sp.frozen[leaf] is not None for leaf in sp.leaves(lay)):  # (a rotary embedding's strided
        ctx.freeze(lay, reason)  # slice of head_dim froze it already: by design, as with several heads)
        return

    def weigh(n: fx.Node, size: Any) -> None:
        src = size.src(lay)
        if src is None:
            return
        x = n.args[operand]
        ndim = len(x.meta["gpd_spec"].shape) if "gpd_spec" in x.meta else None
        w = (1.0 / torch.bincount(src).to(torch.float64))[src]
        if ndim is not None and dim != -1:
            w = w.view(-1, *(1,) * (ndim - dim % ndim - 1))
        const = size.constant(n, w)
        with n.graph.inserting_before(n):
            cast = n.graph.call_method("to", (const, x))  # the operand's dtype and device
            y = n.graph.call_function(operator.mul, (x, cast))
        cast.meta[STUDENT_NAME] = y.meta[STUDENT_NAME] = None  # no student node holds these
        n.args = tuple(y if i == operand else a for i, a in enumerate(n.args))

    ctx.on_build_node(_chain(ctx, weigh))


def _chain(ctx: Ctx, hook: Any) -> Any:
    """``hook`` after the node's build hook registered so far (a rule may register two)."""
    before = ctx.result.node_hooks.get(ctx.where)
    if before is None:
        return hook

    def both(n: fx.Node, size: Any) -> None:
        before(n, size)
        hook(n, size)
    return both


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


@builtin(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def matmul(ctx: Ctx) -> Dims:
    a, b = ctx.node.args[0], ctx.node.args[1]
    if not (ctx.is_tensor(a) and ctx.is_tensor(b)) or len(ctx.shape(a)) < 2 or len(ctx.shape(b)) < 2:
        return ctx.unsupported("matmul of vectors")
    da, db = ctx.dims(a), ctx.dims(b)
    W = attr_param(ctx, b, [None] * (len(db) - 2) + ["share", "copy"]) if len(db) == 2 else None
    if W is not None:  # x @ W with a parameter W: a linear layer written by hand
        ctx.spaces.mark_expandable(W[1])
        ctx.unify(da[-1], W[0])
        return list(da[:-1]) + [W[1]]
    ctx.unify(da[-1], db[-2])
    batch = _batch_unify(ctx, list(da[:-2]), list(db[:-2]))
    contract(ctx, da[-1], batch, 0, -1)
    return batch + [da[-2], db[-1]]


@builtin(torch.einsum)
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
    shared = [lay for ch, lay in letters.items() if ch in rhs and count[ch] == len(ops) and len(ops) > 1]
    for lay in shared:
        ctx.spaces.mark_expandable(lay)
    for ch, lay in letters.items():
        if ch not in rhs and len(ops) > 1:
            if ch in terms[0]:
                contract(ctx, lay, shared, 1, terms[0].index(ch))
            else:
                ctx.freeze(lay, CONTRACTED)
        elif ch not in rhs:
            ctx.freeze(lay, f"reduction over a channel dimension (einsum {eq})")
    return [letters[ch] for ch in rhs]


@builtin(F.scaled_dot_product_attention)
def sdpa(ctx: Ctx) -> Dims:
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    dq, dk, dv = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    ctx.unify(dq[-1], dk[-1])
    ctx.unify(dk[-2], dv[-2])
    batch = _batch_unify(ctx, list(dq[:-2]), list(dk[:-2]), list(dv[:-2]))
    contract(ctx, dq[-1], batch, 0, -1, reason=HEAD_DIM)
    if ctx.spaces.frozen[ctx.spaces.leaves(dq[-1])[0]] is None:  # head_dim may widen: the scale stays the student's
        student = ctx.shape(q)[-1]

        def keep_scale(n: fx.Node, size: Any) -> None:
            if len(n.args) <= 6 and n.kwargs.get("scale") is None:
                n.kwargs = {**n.kwargs, "scale": student ** -0.5}

        ctx.on_build_node(_chain(ctx, keep_scale))
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.is_tensor(mask):
        full = batch + [dq[-2], dk[-2]]
        md, ms = ctx.dims(mask), ctx.shape(mask)
        for j in range(1, len(md) + 1):
            if ms[-j] != 1:
                ctx.unify(md[-j], full[-j])
    return batch + [dq[-2], dv[-1]]
