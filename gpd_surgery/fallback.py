"""The fallback for an op that no rule knows: it runs at the student's width inside the widened teacher.

By the activation invariant every copy of a student channel holds the student's activation, so the
teacher can gather one copy of each channel of the op's inputs (the *canonical* copy, the first), run
the op exactly as the student does, with its own parameters at the student's size, and copy its output
out to whatever layout the ops around it widen it to. Only the op is frozen, not the channel spaces it
touches: a residual stream or a concatenation through it still widens.

The op's output gets new spaces that nothing marks as widening: they widen only where what follows
them does (an addition to a widened stream), and stay the student's otherwise. The fallback is not
possible, and the op's spaces are frozen as before, where the op writes into its input (a gathered
copy would take the write) or reads a tensor that is not an activation (a parameter used by the op
holds *shares* of the student's where it widens, not copies). Of an op returning several tensors (an
LSTM), each tensor taken from its result is copied out; nested ones keep their size.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .layout import BOUNDARY, Layout
from .trace import TensorSpec

STUDENT_NAME = "gpd_student"  # node meta: the student node whose value a teacher node holds (None: none)


def at_student_width(ctx: Any, what: str) -> Any:
    """The dims of an op without a rule (``ctx.node``): run at the student's width where it can be,
    frozen (``ctx.unsupported``) where it cannot."""
    node: fx.Node = ctx.node
    spec = ctx.spec(node)
    args = ctx.tensor_args()
    # A module called with no tensor (xcit's positional encoding, from sizes and its own weights) computes
    # the student's value from the student's parameters: copied out, it is an activation like any other.
    several = isinstance(spec, (tuple, list)) and any(isinstance(e, TensorSpec) for e in spec) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)
    if not (isinstance(spec, TensorSpec) or several) or not args and node.op != "call_module" \
            or _writes_in_place(ctx, node):
        return ctx.unsupported(what)
    live = _activations(ctx)
    if any(a.name not in live for a in args):
        return ctx.unsupported(what)
    ctx.result.unsupported[ctx.where] = f"{what} (run at the student's width)"
    if node.op == "call_module":  # its own tensors stay the student's
        for name, _ in [*ctx.module(node).named_parameters(), *ctx.module(node).named_buffers()]:
            ctx.param(f"{node.target}.{name}", [])
    inputs = [list(ctx.dims(a)) if ctx.is_tensor(a) else None for a in node.all_input_nodes]
    if isinstance(spec, TensorSpec):
        out: Any = ctx.fresh(spec.shape)
        # Any layout of the output is exact (it is copied out by its own map), but a new batch dim would be
        # free to widen (a later matmul offers its batch dims), and a copy by a map would fix the batch size:
        # a leading dim the size of the first input's takes that input's layout (the batch). The other dims
        # start new spaces, free of the input's structure (groups, concatenated pieces).
        first = next((a for a in args if len(ctx.shape(a)) == len(spec.shape)), None)
        if first is not None and spec.shape and ctx.shape(first)[0] == spec.shape[0]:
            out[0] = ctx.dims(first)[0]
    else:  # an LSTM's (output, (h, c)): each tensor item is copied out where it is taken; nested ones keep
        # their size (nothing copies them out)
        out = tuple(ctx.fresh(e.shape) if isinstance(e, TensorSpec)
                    else ctx.fresh_like(e, frozen=f"a nested output of {what}, run at the student's width")
                    for e in spec)
        lead = ctx.dims(args[0])[0] if args and ctx.shape(args[0]) else None
        for e, item in zip(spec, out):  # the batch, as above
            if lead is not None and isinstance(e, TensorSpec) and e.shape and e.shape[0] == ctx.shape(args[0])[0]:
                item[0] = lead

    def build(n: fx.Node, size: Any) -> None:
        _gather_inputs(n, inputs, size)
        if isinstance(out, list):
            _copy_out(n, out, size)
            return
        for u in list(n.users):
            item = out[u.args[1]]
            if isinstance(item, list):
                _copy_out(u, item, size)

    ctx.on_build_node(build)
    return out


def at_outputs(ctx: Any) -> None:
    """The graph's outputs keep the student's shape: a space some dense layer sums over (a residual stream, the
    features under a head) widens inside and is narrowed to its canonical copies where it leaves the graph; any
    other (logits, a head's own output) keeps its size, as copying it out would widen a layer for nothing."""
    spaces = ctx.spaces
    contracted = {spaces.find(i) for info in ctx.result.params.values()
                  for lay, mode in zip(info.layouts, info.modes) if mode == "share" for i in spaces.leaves(lay)}
    inputs = []
    for a in ctx.node.all_input_nodes:
        dims = list(ctx.dims(a)) if ctx.is_tensor(a) else None
        for lay in dims or ():
            for i in spaces.leaves(lay):
                if spaces.find(i) not in contracted:
                    ctx.freeze(i, f"{BOUNDARY}: output")
        inputs.append(dims)
    ctx.on_build_node(lambda n, size: _gather_inputs(n, inputs, size))


def _writes_in_place(ctx: Any, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(ctx.module(node), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__"))


def _activations(ctx: Any) -> set[str]:
    """Names of the nodes whose value depends on a graph input (computed once per analysis)."""
    live = getattr(ctx.result, "_activations", None)
    if live is None:
        live = set()
        for n in ctx.gm.graph.nodes:
            if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
                live.add(n.name)
        ctx.result._activations = live
    return live


def canonical(src: torch.Tensor, size: int) -> torch.Tensor:
    """For each student channel, the index of its first copy in a teacher dim with source map ``src``."""
    first = torch.full((size,), len(src), dtype=torch.long)
    return first.scatter_reduce(0, src, torch.arange(len(src)), "amin")


def _gather_inputs(n: fx.Node, inputs: list[list[Layout] | None], size: Any) -> None:
    """Each widened dim of each input of ``n`` narrowed to the canonical copies (student width)."""
    for a, dims in zip(list(n.all_input_nodes), inputs):
        x = a
        for d, lay in enumerate(dims or ()):
            src = size.src(lay)
            if src is None:
                continue
            index = size.constant(n, canonical(src, size.student(lay)))
            with n.graph.inserting_before(n):
                x = n.graph.call_function(torch.index_select, (x, d, index))
            x.meta[STUDENT_NAME] = None
        if x is not a:
            n.replace_input_with(a, x)


def _copy_out(n: fx.Node, out: list[Layout], size: Any) -> None:
    """The output of ``n`` copied out to the teacher's layout; its users read the copy, which stands for the
    student's node in the check inside (the op's own output is at the student's width)."""
    users = list(n.users)
    y = n
    for d, lay in enumerate(out):
        src = size.src(lay)
        if src is None:
            continue
        index = size.constant(n, src)
        with n.graph.inserting_after(y):
            y = n.graph.call_function(torch.index_select, (y, d, index))
    if y is n:
        return
    y.meta[STUDENT_NAME] = n.name
    n.meta[STUDENT_NAME] = None
    for u in users:
        u.replace_input_with(n, y)
