"""Capture a model as an FX graph the analysis reads: torch.fx's symbolic tracing, or torch.export.

Symbolic tracing runs ``forward`` on proxies and fails on data-dependent Python (Hugging Face models,
``if x.shape[1] != self.num_channels``, lists mutated in place). ``torch.export`` runs it on fake tensors
and records the ops actually run, so Python control flow on shapes simply happens. Its graph is at the
level of ATen operators; we take the *training IR* (what ``torch.export.export`` returns, before
``run_decompositions``): its ops are the ones a model's code calls (``aten.linear``, ``aten.conv2d``,
``aten.layer_norm``, ``aten.scaled_dot_product_attention``, views and permutes), not the core-ATen
decompositions (``addmm`` over a transposed weight, ``native_layer_norm``, ``_softmax``) that would
hide a layer's structure. Two passes then give the analysis the graph it knows:

1. *Modules back.* Every call of a module that a rule knows (``nn.Conv2d``, ``nn.LayerNorm``, a module a
   user registered) becomes one ``call_module`` node again, found through the ``nn_module_stack`` that
   export records on each node. Module rules then apply unchanged, and parameters keep the model's own
   ``state_dict()`` names, so an extracted student loads into the model with ``strict=True``.
2. *Torch-level ops.* Each remaining ATen op becomes the Tensor method or torch function of the same
   schema (``aten.view.default`` -> ``x.view``, ``aten.cat.default`` -> ``torch.cat``; ``aten.slice`` and
   ``aten.select`` become indexing), which is what the rules are keyed by. An op with no such form stays
   as it is and is frozen like any op without a rule.

The batch dimension is exported as dynamic where the model allows it (sizes are then read from the
input, ``x.size(0)``), so the teacher trains at any batch size; otherwise the graph is specialised to the
example's shapes.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import GPDError, first_line
from .inputs import Inputs, InputSpec, describe

CAPTURES = ("auto", "fx", "export")
_ASSERTS = ("_assert", "sym_constrain_range", "_functional_assert")


@dataclass
class Captured:
    gm: fx.GraphModule
    inputs: Inputs  # in the order of the graph's placeholders
    via: str  # "fx" or "export"


class ModuleRules:
    """What this module asks of a rule registry: whether a module's call can be one node, and the rule of
    a function or method (to choose the torch-level form of an ATen op)."""

    def knows_module(self, m: nn.Module) -> bool: ...

    def get(self, key: Any) -> Any: ...


def capture(model: nn.Module, inputs: Inputs, how: str, rules: Any, force: bool | None, dtype: torch.dtype
            ) -> Captured:
    """``model`` as a shape-propagated FX graph: by symbolic tracing (``fx``), torch.export (``export``), or
    (``auto``) the first that captures it. The forward's memory is checked before the example exists."""
    from .inputs import make
    from .memory import check_memory
    from .trace import TraceError, forward_bytes, propagate, trace

    if how not in CAPTURES:
        raise GPDError(f"--capture {how!r} is not one of {', '.join(CAPTURES)}")
    where = f"a forward at input shape {describe(inputs)}"
    hint = "use a smaller --input-shape or --input"
    failed: TraceError | None = None
    if how in ("auto", "fx"):
        try:
            gm = trace(model, rules, inputs)
            ordered = _fx_order(gm, inputs)
            check_memory(forward_bytes(gm, ordered, dtype), force, where, hint)
            propagate(gm, make(ordered, dtype), model, ordered)
            return Captured(gm, ordered, "fx")
        except TraceError as e:
            if how == "fx":
                raise
            failed = e
    check_memory(4 * sum(math.prod(s.shape) * (s.dtype or dtype).itemsize for s in inputs), force, where, hint)
    example = make(inputs, dtype)
    try:
        captured = export_graph(model, inputs, example, rules)
    except GPDError as e:
        if failed is None:
            raise
        raise TraceError(f"{first_line(failed, 1000)}; torch.export failed too: {first_line(e, 300)}") from None
    check_memory(forward_bytes(captured.gm, captured.inputs, dtype), force, where, hint)
    position = {id(s): i for i, s in enumerate(inputs)}
    propagate(captured.gm, [example[position[id(s)]] for s in captured.inputs], model, inputs)
    return captured


def _fx_order(gm: fx.GraphModule, inputs: Inputs) -> Inputs:
    """``inputs`` in the order of a symbolic trace's placeholders: positional ones first, then the keyword
    ones in the order of ``forward``'s parameters."""
    # The inputs come first; with keyword inputs the rest were inlined (trace._inline_defaults), else they are
    # parameters traced at their defaults.
    holders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"][: len(inputs)]
    named = {s.name: s for s in inputs if s.name}
    positional = iter(s for s in inputs if s.name is None)
    out = [named.get(h) or next(positional, None) for h in holders]
    if any(s is None for s in out) or len(out) != len(inputs):
        raise GPDError(f"the model's forward takes {', '.join(holders) or 'no tensor'}, the example gives "
                       f"{describe(inputs)}")
    return tuple(out)  # type: ignore[arg-type]


# -- torch.export -------------------------------------------------------------------------------------
def export_graph(model: nn.Module, inputs: Inputs, example: Sequence[torch.Tensor], rules: Any) -> Captured:
    """``model`` captured by torch.export and brought to the torch level (see the module's docstring)."""
    ep = _export(model, inputs, example)
    unlifted = ep.module()
    graph = _plain_graph(unlifted.graph)
    ordered = _placeholder_order(graph, model, inputs)
    _drop_guards(graph)
    _restore_modules(graph, model, rules)
    _torch_level(graph, rules)
    graph.eliminate_dead_code(is_impure_node=_impure)
    graph.lint()
    root = _root(graph, model, unlifted)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    return Captured(gm, ordered, "export")


def _export(model: nn.Module, inputs: Inputs, example: Sequence[torch.Tensor]) -> Any:
    """The exported program, with a dynamic batch dimension where the model allows one (a batch of 2 at
    export: sizes 0 and 1 are always specialised), else static at the example's shapes."""
    from torch.export import Dim

    def split(tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        args = tuple(t for s, t in zip(inputs, tensors) if s.name is None)
        return args, {s.name: t for s, t in zip(inputs, tensors) if s.name is not None}

    batched = [t.expand(2, *t.shape[1:]).clone() if t.dim() and t.shape[0] == 1 else t for t in example]
    dims = [{0: Dim.AUTO} if t.dim() else None for t in batched]
    dynamic = _signature_dynamic(model, *split(dims))  # type: ignore[arg-type]
    attempts = [(*split(batched), dynamic)] if dynamic is not None else []
    attempts.append((*split(example), None))
    error: Exception | None = None
    for args, kwargs, shapes in attempts:
        try:
            with torch.no_grad(), _quiet():
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # the model's own code failing under export: reported below
            error = e
            continue
        if shapes is None or _runs_at(ep, *split(example)):
            return ep
    assert error is not None
    raise GPDError(f"torch.export cannot capture {type(model).__name__}{_where(error)}: {type(error).__name__}: "
                   f"{first_line(error)}") from None


class _quiet:
    """torch.export prints graphs and warnings (data-dependent guards) to stdout, stderr and its logs: our
    errors say what failed, in one line."""

    def __enter__(self) -> None:
        import contextlib
        import io
        import logging

        self.saved = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self.stack.enter_context(contextlib.redirect_stderr(io.StringIO()))

    def __exit__(self, *exc: Any) -> None:
        import logging

        self.stack.close()
        logging.disable(self.saved)


def _signature_dynamic(model: nn.Module, dyn_args: tuple, dyn_kwargs: dict) -> Any:
    """``dynamic_shapes`` keyed as torch.export wants it: by the names of ``forward``'s parameters."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    if len(dyn_args) > len(params):
        return None
    out = {p.name: d for p, d in zip(params, dyn_args)}
    for name, d in dyn_kwargs.items():
        out[name] = d
    return out if all(name in {p.name for p in params} for name in dyn_kwargs) or not dyn_kwargs else None


def _runs_at(ep: Any, args: tuple, kwargs: dict) -> bool:
    try:
        with torch.no_grad():
            ep.module()(*args, **kwargs)
        return True
    except Exception:
        return False


def _where(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _plain_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with fx's default code generation: the inputs are the flat placeholders and the
    output is the flat tuple of leaves (a single tensor when there is one), not the model's pytrees."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "output":
            leaves = torch.utils._pytree.tree_leaves(n.args[0])
            outs = [env[x] if isinstance(x, fx.Node) else x for x in leaves]
            new.output(outs[0] if len(outs) == 1 else tuple(outs))
        else:
            env[n] = new.node_copy(n, lambda x: env[x])
    return new


def _placeholder_order(graph: fx.Graph, model: nn.Module, inputs: Inputs) -> Inputs:
    """``inputs`` in the order of the graph's placeholders (named after ``forward``'s parameters)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    positional = [s for s in inputs if s.name is None]
    by_name = {s.name: s for s in inputs if s.name is not None}
    by_name.update({params[i]: s for i, s in enumerate(positional) if i < len(params)})
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(holders) != len(inputs):
        raise GPDError(f"the exported graph takes {len(holders)} inputs, the example has {len(inputs)}")
    ordered = [by_name.get(n.target) for n in holders]
    if any(s is None for s in ordered) or len({id(s) for s in ordered}) != len(inputs):
        return tuple(positional) + tuple(s for s in inputs if s.name is not None)  # pytree's own order
    return tuple(ordered)  # type: ignore[arg-type]


def _is_assert(target: Any) -> bool:
    name = getattr(target, "__name__", "") or ""
    return isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket) and name.startswith(_ASSERTS) \
        or name.startswith(_ASSERTS)


def _drop_guards(graph: fx.Graph) -> None:
    """Export's input guards (``_guards_fn``) and runtime asserts: checks of the example's shapes."""
    for n in reversed(list(graph.nodes)):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            graph.erase_node(n)
        elif n.op == "call_function" and _is_assert(n.target) and not n.users:
            graph.erase_node(n)


def _impure(n: fx.Node) -> bool:
    """Nodes kept without users: in-place ops (a mask filled through a view) and anything with effects."""
    if n.op in ("placeholder", "output"):
        return True
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).endswith("__")
    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
        return n.target._schema.is_mutable or n.target._schema.name.endswith("_")
    return n.op == "call_module" or n.op == "call_function" and n.target in fx.node._side_effectful_functions


# -- modules back ------------------------------------------------------------------------------------
def _module_of(model: nn.Module, n: fx.Node, rules: Any) -> tuple[str, str] | None:
    """(stack key, module path) of the outermost module in ``n``'s stack that a rule knows."""
    for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
        if not path:
            continue
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if rules.knows_module(m) and _one_input(m):
            return key, path
    return None


def _one_input(m: nn.Module) -> bool:
    """Whether ``m`` is called with one tensor (``m(x)``): a call node can then be rebuilt from the graph."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _restore_modules(graph: fx.Graph, model: nn.Module, rules: Any) -> None:
    groups: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        found = _module_of(model, n, rules)
        if found is not None:
            groups.setdefault(found[0], []).append(n)
            paths[found[0]] = found[1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for key, nodes in groups.items():
        path = paths[key]
        inside = set(nodes)
        own = (path + ".",)
        external = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside or a.op == "get_attr" and str(a.target).startswith(own):
                    continue
                if a not in external:
                    external.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(external) != 1 or len(outputs) != 1:
            continue  # a module called with several tensors, or read from outside: its ops stay as they are
        (x,), (out,) = external, outputs
        if order[x] > order[out] or not isinstance(out.meta.get("val"), torch.Tensor):
            continue
        with graph.inserting_before(out):
            call = graph.call_module(path, (x,))
        call.meta = dict(out.meta)
        order[call] = order[out]
        out.replace_all_uses_with(call)
        for n in sorted(nodes, key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)


# -- torch-level ops -------------------------------------------------------------------------------
def _index(n: fx.Node, dim: int, item: Any) -> tuple:
    val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    ndim = val.dim() if isinstance(val, torch.Tensor) else dim + 1
    dim = dim + ndim if dim < 0 else dim
    return (slice(None),) * dim + (item,)


def _slice(n: fx.Node) -> tuple[Any, tuple]:
    x, dim, start, end, step = (list(n.args) + [0, None, None, 1][len(n.args) - 1 :])[:5]
    dim, start, end, step = (n.kwargs.get(k, v) for k, v in (("dim", dim), ("start", start), ("end", end),
                                                             ("step", step)))
    end = None if isinstance(end, int) and end >= 2**62 else end
    return operator.getitem, (x, _index(n, dim, slice(start, end, None if step == 1 else step)))


def _select(n: fx.Node) -> tuple[Any, tuple]:
    x, dim, index = n.args[:3]
    return operator.getitem, (x, _index(n, dim, index))


def _tensor_index(n: fx.Node) -> tuple[Any, tuple]:
    x, indices = n.args[:2]
    return operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices))


def _layer_norm(n: fx.Node) -> tuple[Any, tuple]:
    return F.layer_norm, tuple(n.args[:5])  # without cudnn_enable


SPECIAL: dict[str, Callable[[fx.Node], tuple[Any, tuple]]] = {
    "slice": _slice, "select": _select, "index": _tensor_index, "layer_norm": _layer_norm,
}
_FUNCTION_NAMESPACES = (torch, torch._C._nn, F)


def _torch_level(graph: fx.Graph, rules: Any) -> None:
    """Give each ATen op the torch-level form of the same schema that a rule knows (see the docstring)."""
    for n in list(graph.nodes):
        op = n.target
        if n.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        name = op._schema.name.split("::")[-1]
        overload = op._overloadname
        if name in SPECIAL and (name != "index" or overload == "Tensor"):
            n.target, n.args = SPECIAL[name](n)
            if n.kwargs and name in ("slice", "select"):
                n.kwargs = {}
            continue
        if name.startswith("sym_size") and overload == "int":
            n.op, n.target = "call_method", "size"
            continue
        if _is_method(op, name) and rules.get(name) is not None:
            n.op, n.target = "call_method", name
            continue
        for ns in _FUNCTION_NAMESPACES:
            fn = getattr(ns, name, None)
            if fn is not None and rules.get(fn) is not None and _same_schema(fn, op):
                n.target = fn
                break


def _is_method(op: torch._ops.OpOverload, name: str) -> bool:
    """Whether ``x.name(...)`` is the op: a Tensor method, and the op's first argument is the tensor."""
    args = op._schema.arguments
    return hasattr(torch.Tensor, name) and bool(args) and args[0].name == "self"


def _same_schema(fn: Any, op: torch._ops.OpOverload) -> bool:
    """Whether ``fn`` takes the op's arguments at the same positions and names: torch's own bindings are
    generated from the same schemas; a Python function of torch.nn.functional is checked by name."""
    if not inspect.isfunction(fn):
        return True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    names = [a.name for a in op._schema.arguments]
    for i, a in enumerate(names):
        if i == 0 and a in ("self", "input"):
            continue
        if i >= len(params) or params[i] != a and not (a == "train" and params[i] == "training"):
            return False
    return True


# -- the graph module ---------------------------------------------------------------------------------
def _root(graph: fx.Graph, model: nn.Module, unlifted: nn.Module) -> dict[str, Any]:
    """What the graph's nodes name: the model's own modules, parameters and buffers (shared with it, as a
    symbolic trace shares them), and export's lifted constants."""
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            root[n.target] = model.get_submodule(n.target)
        elif n.op == "get_attr":
            root[n.target] = _attr(model, n.target) if _has_attr(model, n.target) else _attr(unlifted, n.target)
    return root


def _attr(m: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    return getattr(m.get_submodule(owner) if owner else m, name)


def _has_attr(m: nn.Module, path: str) -> bool:
    try:
        _attr(m, path)
        return True
    except AttributeError:
        return False


__all__ = ["CAPTURES", "Captured", "InputSpec", "export_graph"]
