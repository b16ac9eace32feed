"""Channel-space analysis: walk the traced graph and let each op's rule relate its dimensions.

The result tells, for every node output and every parameter dimension, its
layout over the channel spaces, and which parameter dimensions are copied
(``copy``: per-channel and output dimensions) or shared among copies (``share``:
the input dimension of a dense consumer, whose copies must sum to the student's
weight).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch import nn

from .layout import BOUNDARY, Layout, Spaces
from .trace import TensorSpec

Dims = Any  # list[Layout] for a tensor, tuple of Dims for a tuple, None otherwise
# Build hooks get the teacher's module or node and an ``expand.Sizes`` (built after the analysis).
ModuleHook = Callable[[nn.Module, Any], "nn.Module | None"]
NodeHook = Callable[[fx.Node, Any], None]
Rule = Callable[["Ctx"], Dims]
PLAIN_VALUE = "gpd: plain value"  # the key of the rule for nodes that compute plain values (sizes) from no tensor


class RuleSource(Protocol):
    """What the analysis asks of a rule registry (``rules.Registry``)."""

    def lookup(self, node: fx.Node, gm: fx.GraphModule) -> Rule | None: ...

    def get(self, key: Any) -> Rule | None: ...


@dataclass
class ParamInfo:
    layouts: list[Layout]
    modes: list[str | None]  # per dim: "copy", "share" or None (unchanged)


@dataclass
class Analysis:
    gm: fx.GraphModule
    rules: RuleSource
    spaces: Spaces
    dims: dict[str, Dims]
    params: dict[str, ParamInfo]
    # Build hooks get the teacher module (or node) and an ``expand.Sizes``; a module hook may return a
    # replacement module (e.g. a weighted LayerNorm at a fractional ratio).
    module_hooks: dict[str, ModuleHook] = field(default_factory=dict)
    node_hooks: dict[str, NodeHook] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)  # node name -> op description


class Ctx:
    """What a rule sees: the node being analysed (``node``), its inputs' layouts and shapes, and ways to
    relate them. ``spaces`` is the union-find over all channel spaces (``layout.Spaces``): rules use its
    ``new(size, frozen=...)``, ``size_of(layout)`` and ``mark_expandable(layout)``."""

    def __init__(self, gm: fx.GraphModule, rules: RuleSource) -> None:
        self.gm = gm
        self.spaces = Spaces()
        self.result = Analysis(gm, rules, self.spaces, {}, {})
        self.node: fx.Node | None = None

    # -- reading ------------------------------------------------------------
    def spec(self, a: Any) -> Any:
        """What ``a`` holds: a ``TensorSpec`` (shape, dtype) for a tensor node, the value of a plain one."""
        return a.meta.get("gpd_spec") if isinstance(a, fx.Node) else a

    def is_tensor(self, a: Any) -> bool:
        """Whether ``a`` is a node whose value is a tensor."""
        return isinstance(self.spec(a), TensorSpec)

    def shape(self, a: Any) -> tuple[int, ...]:
        """The student's shape of tensor node ``a``."""
        return self.spec(a).shape

    def dims(self, a: fx.Node) -> list[Layout]:
        """The layouts of tensor node ``a``'s dims (already analysed: ``a`` comes before the node)."""
        return self.result.dims[a.name]

    def module(self, node: fx.Node) -> nn.Module:
        """The student's module that a ``call_module`` node calls."""
        return self.gm.get_submodule(node.target)  # type: ignore[arg-type]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The node's argument at position ``i`` or keyword ``name``."""
        node = self.node
        assert node is not None
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def tensor_args(self) -> list[fx.Node]:
        """The node's tensor arguments, in order."""
        out: list[fx.Node] = []
        node = self.node
        assert node is not None
        fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) if self.is_tensor(n) else None)
        return out

    @property
    def where(self) -> str:
        return self.node.name if self.node is not None else "?"

    # -- relating -----------------------------------------------------------
    def fresh(self, shape: tuple[int, ...] | list[int], *, frozen: str | None = None) -> list[Layout]:
        """New spaces, one per dim of ``shape`` (frozen for the reason given)."""
        return [self.spaces.new(s, frozen=frozen) for s in shape]

    def unify(self, a: Layout, b: Layout) -> None:
        """``a`` and ``b`` must be indexed the same way (refined or frozen where their structures differ)."""
        self.spaces.unify(a, b, self.where)

    def freeze(self, lay: Layout, reason: str) -> None:
        """``lay`` keeps its size (always correct; ``reason`` is reported)."""
        self.spaces.freeze(lay, reason)

    def expandable(self, size: int) -> int:
        """A new space that may widen (a number of heads or groups)."""
        return self.spaces.new(size, expandable=True)

    def param(self, qualname: str, modes: list[str | None]) -> list[Layout]:
        """The layouts of a parameter or buffer's dims (shared by every use of the tensor), ``qualname`` as in
        the student's ``state_dict()``. ``modes``, per leading dim, is its collapse recipe where it widens:
        ``"copy"`` (output and per-channel dims: every copy holds the student's value, collapse takes the
        first), ``"share"`` (the input dim of a dense layer: the copies' weights sum to the student's,
        collapse sums them) or None."""
        info = self.result.params.get(qualname)
        if info is None:
            tensor = self._tensor_attr(qualname)
            info = ParamInfo(self.fresh(tensor.shape), list(modes) + [None] * (tensor.dim() - len(modes)))
            self.result.params[qualname] = info
        else:
            for d, m in enumerate(modes):
                if m is not None and info.modes[d] not in (None, m):
                    self.freeze(info.layouts[d], f"tensor {qualname} used both as copied and as shared")
                info.modes[d] = info.modes[d] or m
        return info.layouts

    def _tensor_attr(self, qualname: str) -> torch.Tensor:
        owner, _, name = qualname.rpartition(".")
        mod = self.gm.get_submodule(owner) if owner else self.gm
        t = getattr(mod, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{qualname} is not a tensor")
        return t

    def on_build_module(self, hook: ModuleHook) -> None:
        """Call ``hook(teacher_module, sizes)`` on the teacher's copy of the node's module (its tensors already
        the teacher's) to set its sizes; a module it returns replaces it."""
        assert self.node is not None
        self.result.module_hooks[str(self.node.target)] = hook

    def on_build_node(self, hook: NodeHook) -> None:
        """Call ``hook(teacher_node, sizes)`` on the teacher's copy of the node, to rewrite its arguments."""
        assert self.node is not None
        self.result.node_hooks[self.node.name] = hook

    def unsupported(self, what: str) -> Dims:
        """Freeze every dimension the op touches and give its outputs fresh frozen dims."""
        reason = f"unsupported op {what} at {self.where}"
        self.result.unsupported[self.where] = what
        for t in self.tensor_args():
            for lay in self.dims(t):
                # What this op newly freezes is reported whether or not a rule offered it yet: the op hides
                # how its dims relate, so any of them may be a channel space (spatial and batch dims are frozen
                # already, by design or as graph inputs).
                self.spaces.offered.update(i for i in self.spaces.leaves(lay) if self.spaces.frozen[i] is None)
                self.freeze(lay, reason)
        return self.fresh_like(self.spec(self.node), frozen=reason)

    def fresh_like(self, spec: Any, *, frozen: str | None = None) -> Dims:
        """New spaces shaped like ``spec`` (a tensor's, or a tuple of them)."""
        if isinstance(spec, TensorSpec):
            return self.fresh(spec.shape, frozen=frozen)
        if isinstance(spec, (tuple, list)):
            return tuple(self.fresh_like(s, frozen=frozen) for s in spec)
        return None


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__  # type: ignore[arg-type]
    if node.op == "call_function":
        t = node.target
        return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")
    return f"{node.op} {node.target}"


def analyse(gm: fx.GraphModule, rules: RuleSource) -> Analysis:
    from .fallback import at_outputs, at_student_width  # what no rule widens runs at the student's width
    """Relate every dimension of ``gm`` (already shape-propagated) through the registry ``rules``."""
    ctx = Ctx(gm, rules)
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            out = ctx.fresh_like(ctx.spec(node), frozen=f"{BOUNDARY}: input {node.name}")
        elif node.op == "output":
            at_outputs(ctx)
            continue
        elif not ctx.tensor_args() and not _has_tensor(ctx.spec(node)) and node.op != "get_attr":
            rule = rules.get(PLAIN_VALUE)  # arithmetic on sizes and other plain values
            out = rule(ctx) if rule is not None else None
        else:
            rule = rules.lookup(node, gm)
            out = rule(ctx) if rule is not None else at_student_width(ctx, describe(node, gm))
        ctx.result.dims[node.name] = out
    ctx.node = None
    ctx.spaces.finalize()
    return ctx.result


def _has_tensor(spec: Any) -> bool:
    if isinstance(spec, TensorSpec):
        return True
    if isinstance(spec, (tuple, list)):
        return any(_has_tensor(s) for s in spec)
    return False


def offered(spaces: Spaces) -> set[int]:
    """Root spaces that a rule offered to widen (``expandable``), that were factors of a product offered to
    widen, or that an unsupported op froze (see ``Spaces.offered``), unless a deliberate freeze touched them."""
    out = {leaf for i in spaces.offered for leaf in spaces.leaves(i)}  # roots now, definitions resolved
    out -= spaces.designed
    out.update(i for i in range(len(spaces.parent)) if spaces.expandable[i])
    return {i for i in out if spaces.find(i) == i and i not in spaces.definition and spaces.size[i] > 1}


def frozen_report(spaces: Spaces) -> list[dict[str, Any]]:
    """Spaces offered to widen that something froze, with the reason; graph boundaries separately flagged."""
    out = []
    for i in sorted(offered(spaces)):
        reason = spaces.frozen[i]
        if reason is not None:
            out.append({"size": spaces.size[i], "reason": reason, "boundary": reason.startswith(BOUNDARY)})
    return out
