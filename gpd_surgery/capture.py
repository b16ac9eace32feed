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

import copy
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
from .rules.registry import builtin
from .trace import TraceError, user_frame
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
    from .trace import forward_bytes, propagate, trace

    if how not in CAPTURES:
        raise GPDError(f"--capture {how!r} is not one of {', '.join(CAPTURES)}")
    where = f"a forward at input shape {describe(inputs)}"
    hint = "use a smaller --input-shape or --input"
    failed: TraceError | None = None
    fx_captured: Captured | None = None  # fx's graph, where export is tried for what fx kept opaque
    if hasattr(rules, "load_library_rules"):
        rules.load_library_rules(model)
    if how in ("auto", "fx"):
        try:
            gm = trace(model, rules, inputs)
            ordered = _fx_order(gm, inputs)
            check_memory(forward_bytes(gm, ordered, dtype), force, where, hint)
            propagate(gm, make(ordered, dtype), model, ordered)
            fx_captured = Captured(gm, ordered, "fx")
            if how == "fx" or not _opaque_leaves(gm, rules):
                return fx_captured
        except TraceError as e:
            if how == "fx":
                raise
            failed = e
    check_memory(4 * sum(math.prod(s.shape) * (s.dtype or dtype).itemsize for s in inputs), force, where, hint)
    example = make(inputs, dtype)
    position = {id(s): i for i, s in enumerate(inputs)}
    error: GPDError | None = None
    for dynamic in (True, False):  # a dynamic batch where the model allows one, else the example's shapes
        try:
            captured = export_graph(model, inputs, example, rules, dynamic)
            check_memory(forward_bytes(captured.gm, captured.inputs, dtype), force, where, hint)
            propagate(captured.gm, [example[position[id(s)]] for s in captured.inputs], model, inputs)
            if fx_captured is not None and not _same_in_float64(captured, model, inputs, example):
                return fx_captured
            return captured
        except TraceError as e:  # not the input's fault (propagate raises that at once)
            error = e
    assert error is not None
    if fx_captured is not None:  # fx captured it, with leaves that export could not open either
        return fx_captured
    if failed is None:
        raise error
    raise TraceError(f"{first_line(failed, 1000)}; torch.export failed too: {first_line(error, 300)}") from None


def _same_in_float64(captured: Captured, model: nn.Module, inputs: Inputs, example: Sequence[torch.Tensor]) -> bool:
    """Whether the exported graph computes the model's function to float64's rounding. A model that computes a
    part in float32 on purpose (timm's PositionalEncodingFourier: ``torch.arange(..., dtype=torch.float32)``)
    does not: the graph's casts follow the model's dtype, as export cannot tell such a cast from
    ``x.to(self.weight.dtype)``. fx keeps the code as written, so auto keeps fx's graph there."""
    from torch.utils._pytree import tree_leaves

    from .inputs import call

    x = [t.double() if t.is_floating_point() else t for t in example]
    position = {id(s): i for i, s in enumerate(inputs)}
    try:
        with torch.no_grad():
            want = tree_leaves(call(copy.deepcopy(model).double(), inputs, x))
            got = tree_leaves(copy.deepcopy(captured.gm).double()(*[x[position[id(s)]] for s in captured.inputs]))
    except Exception:  # an op the graph holds at a fixed dtype
        return False
    pairs = [(a, b) for a, b in zip(want, got) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return len(want) == len(got) and all(
        isinstance(b, torch.Tensor) and a.shape == b.shape
        and float((a - b).abs().max()) <= 1e-10 * max(float(a.abs().max()), 1e-30) for a, b in pairs)


def _opaque_leaves(gm: fx.GraphModule, rules: Any) -> list[str]:
    """Modules that fx kept whole only because their library marks them untraceable (timm's notrace modules)
    and that no rule knows: they would run at the student's width, where torch.export can trace through them."""
    from .trace import leaf_modules_and_wrapped

    marked = tuple(leaf_modules_and_wrapped(gm)[0])
    knows = getattr(rules, "knows_module", lambda m: False)
    return [str(n.target) for n in gm.graph.find_nodes(op="call_module")
            if marked and isinstance(m := gm.get_submodule(str(n.target)), marked) and not knows(m)]


def check_input_shape(x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    """The guard of a graph exported at fixed shapes: another shape would run with the example's sizes baked
    in (a view to the example's batch), so it is refused."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"this graph was captured by torch.export at fixed shapes: input {name} must be "
                         f"{tuple(shape)}, not {tuple(x.shape)}")


torch.fx.node.has_side_effect(check_input_shape)  # kept by dead-code elimination, although unused


@builtin(check_input_shape)
def _guard_rule(ctx: Any) -> None:
    """The guard relates no dimension and gives no tensor."""
    return None


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
def export_graph(model: nn.Module, inputs: Inputs, example: Sequence[torch.Tensor], rules: Any,
                 dynamic: bool = True) -> Captured:
    """``model`` captured by torch.export and brought to the torch level (see the module's docstring), with a
    dynamic batch dimension (``dynamic``) or at the example's shapes, then guarded against any other."""
    with _ModuleCalls(model, rules) as calls:
        ep = _export(model, inputs, example, dynamic)
    unlifted = ep.module()
    graph = _plain_graph(unlifted.graph)
    ordered = _placeholder_order(graph, model, inputs)
    _drop_guards(graph)
    # Dead ops go while every node is an ATen op, whose schema says whether it writes: a module restored below
    # is kept whole even unused (it may write in place), and a dead one (SigLIP's attention-pooling head, whose
    # output the classifier ignores) would freeze the widths it reads.
    graph.eliminate_dead_code(is_impure_node=_impure)
    _restore_modules(graph, model, rules, calls.seen)
    _torch_level(graph, rules)
    _follow_model(graph, model)
    graph.eliminate_dead_code(is_impure_node=_impure)
    if not dynamic:
        _guard_shapes(graph)
    graph.lint()
    root = _root(graph, model, unlifted)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    return Captured(gm, ordered, "export")


def _guard_shapes(graph: fx.Graph) -> None:
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    if not holders:
        return
    with graph.inserting_after(holders[-1]):
        for n in reversed(holders):
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                graph.call_function(check_input_shape, (n, tuple(val.shape), n.name))


def _export(model: nn.Module, inputs: Inputs, example: Sequence[torch.Tensor], dynamic: bool) -> Any:
    """The exported program: with a dynamic batch dimension (exported at a batch of 2: export specialises
    sizes 0 and 1; the graph's own guards, which say the batch is at least 2, are dropped), or static at the
    example's shapes."""
    from torch.export import Dim

    def split(tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        args = tuple(t for s, t in zip(inputs, tensors) if s.name is None)
        return args, {s.name: t for s, t in zip(inputs, tensors) if s.name is not None}

    if dynamic:
        batched = [t.expand(2, *t.shape[1:]).clone() if t.dim() and t.shape[0] == 1 else t for t in example]
        shapes = _signature_dynamic(model, *split([{0: Dim.AUTO} if t.dim() else None for t in batched]))
        if shapes is None:
            raise TraceError("torch.export: the model's forward has no signature to give a dynamic batch to")
        args, kwargs = split(batched)
    else:
        shapes, (args, kwargs) = None, split(example)
    try:
        with torch.no_grad(), _quiet():
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # the model's own code failing under export
        raise TraceError(f"torch.export cannot capture {type(model).__name__}{user_frame(e)}: {type(e).__name__}: "
                         f"{first_line(e)}") from None


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


def _plain_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with fx's default code generation: the inputs are the flat placeholders and the
    output is the flat tuple of leaves (a single tensor when there is one), not the model's pytrees. The
    placeholders come first (export puts its get_attr nodes before them), so nodes inserted after them can read
    any input."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in sorted(graph.nodes, key=lambda n: n.op != "placeholder"):  # stable: otherwise in order
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
@dataclass(frozen=True)
class _Ref:
    """A tensor that a module call took or gave: the name of its node in the exported graph."""

    name: str


_UNREAD = object()  # a tensor of a module call whose node the tracer did not say
Call = tuple[tuple, dict, Any]  # a module call's arguments, keyword arguments and result, tensors as _Ref


class _ModuleCalls:
    """What modules that take several tensors (``nn.MultiheadAttention(q, k, v)``) and that a rule knows are
    called with while export traces them: each tensor as its node (the tracer's proxy of it), the other
    arguments as they are. The graph alone says which tensors reach a module, not in which parameter."""

    def __init__(self, model: nn.Module, rules: Any) -> None:
        self.modules = [(path, m) for path, m in model.named_modules()
                        if path and rules.knows_module(m) and not _one_input(m)]
        self.seen: dict[str, list[Call]] = {}

    def __enter__(self) -> _ModuleCalls:
        self.handles = [m.register_forward_hook(self._hook(path), with_kwargs=True) for path, m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, path: str) -> Callable[..., None]:
        def record(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

            mode = get_proxy_mode()
            if mode is None:  # an eager call (export's own checks): nothing to read
                return

            def ref(v: Any) -> Any:
                if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                    return _UNREAD  # a size passed in: the rebuilt call would need its node too
                if not isinstance(v, torch.Tensor):
                    return v
                try:
                    return _Ref(get_proxy_slot(v, mode.tracer).proxy.node.name)
                except Exception:  # a tensor the tracer does not know: the call stays as its ops
                    return _UNREAD

            self.seen.setdefault(path, []).append(torch.utils._pytree.tree_map(ref, (args, kwargs, out)))
        return record


def _module_of(model: nn.Module, n: fx.Node, rules: Any, calls: dict[str, list[Call]]) -> tuple[str, str] | None:
    """(stack key, module path) of the outermost module in ``n``'s stack that a rule knows and whose call can
    be rebuilt: one tensor in, or a call seen by ``_ModuleCalls``."""
    for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
        if not path:
            continue
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if rules.knows_module(m) and (_one_input(m) or path in calls):
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


def _call_of(path: str, external: list[fx.Node], outputs: list[fx.Node], calls: dict[str, list[Call]],
             node: Callable[[str], fx.Node | None]) -> tuple[tuple, dict, list[int | None]] | None:
    """The arguments (``node`` gives the node a tensor's name now stands for) of the call of ``path`` that takes
    exactly the tensors among ``external``, and where in its result each of ``outputs`` is (None: the result
    itself); None where no seen call fits. A size read from outside (export computes ``x.size(0)`` once for
    the whole graph) is the module's own when no size is passed to it."""
    if path not in calls:  # one tensor in, one out
        ok = len(external) == 1 and len(outputs) == 1 and isinstance(outputs[0].meta.get("val"), torch.Tensor)
        return ((external[0],), {}, [None]) if ok else None
    tensors = {x for x in external if isinstance(x.meta.get("val"), torch.Tensor)}
    for args, kwargs, out in calls[path]:
        if any(v is _UNREAD for v in torch.utils._pytree.tree_leaves((args, kwargs, out))):
            continue
        if {node(v.name) for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, _Ref)} != tensors:
            continue
        results = list(out) if isinstance(out, (tuple, list)) else [out]
        where = [next((i for i, r in enumerate(results) if r == _Ref(o.name)), -1) for o in outputs]
        if -1 in where:
            continue
        to_node = lambda v: node(v.name) if isinstance(v, _Ref) else v  # noqa: E731
        args, kwargs = torch.utils._pytree.tree_map(to_node, (args, kwargs))
        return args, kwargs, [i if isinstance(out, (tuple, list)) else None for i in where]
    return None


def _restore_modules(graph: fx.Graph, model: nn.Module, rules: Any, calls: dict[str, list[Call]]) -> None:
    groups: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        found = _module_of(model, n, rules, calls)
        if found is not None:
            groups.setdefault(found[0], []).append(n)
            paths[found[0]] = found[1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    named = {n.name: n for n in graph.nodes}  # the exported nodes, which the seen calls name
    moved: dict[fx.Node, fx.Node] = {}  # a restored module's output -> the node that now gives it

    def node(name: str) -> fx.Node | None:
        n = named.get(name)
        while n in moved:
            n = moved[n]
        return n

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
        outputs = sorted((n for n in nodes if any(u not in inside for u in n.users)), key=order.__getitem__)
        call = _call_of(path, external, outputs, calls, node) if outputs else None
        if call is None or max((order[x] for x in external), default=-1) > order[outputs[0]]:
            continue  # read from outside, or a call not seen: its ops stay as they are
        args, kwargs, where = call
        with graph.inserting_before(outputs[0]):
            call_node = graph.call_module(path, args, kwargs)
            for out, i in zip(outputs, where):
                result = call_node if i is None else graph.call_function(operator.getitem, (call_node, i))
                result.meta = dict(out.meta)
                order[result] = order[call_node] = order[outputs[0]]  # a later group may read it
                out.replace_all_uses_with(result)
                moved[out] = result
        for n in sorted(nodes, key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)


# -- torch-level ops -------------------------------------------------------------------------------
def _index(n: fx.Node, dim: int, item: Any) -> tuple:
    val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    ndim = val.dim() if isinstance(val, torch.Tensor) else dim + 1
    dim = dim + ndim if dim < 0 else dim
    return (slice(None),) * dim + (item,)


def _bound(n: fx.Node) -> dict[str, Any]:
    """The ATen op's arguments by their schema's names, defaults filled in."""
    schema = n.target._schema  # type: ignore[union-attr]
    out = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    out.update({a.name: v for a, v in zip(schema.arguments, n.args)})
    out.update(n.kwargs)
    return out


Form = tuple[Any, tuple, dict[str, Any]]  # (torch function, or the name of a Tensor method), args, kwargs


def _slice(n: fx.Node) -> Form:
    """``x[start:end]`` along ``dim``; export's ``x[0:INT64_MAX]`` becomes ``x[:]``, which the rules keep whole
    whatever the size (a slice ending at the example's batch would fix the teacher's batch)."""
    a = _bound(n)
    start = None if a["start"] == 0 else a["start"]
    end = None if isinstance(a["end"], int) and a["end"] >= 2**62 else a["end"]
    step = None if a["step"] == 1 else a["step"]
    return operator.getitem, (a["self"], _index(n, a["dim"], slice(start, end, step))), {}


def _select(n: fx.Node) -> Form:
    a = _bound(n)
    return operator.getitem, (a["self"], _index(n, a["dim"], a["index"])), {}


def _tensor_index(n: fx.Node) -> Form:
    x, indices = n.args[:2]
    return operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _layer_norm(n: fx.Node) -> Form:
    a = _bound(n)  # without cudnn_enable
    return F.layer_norm, tuple(a[k] for k in ("input", "normalized_shape", "weight", "bias", "eps")), {}


def _group_norm(n: fx.Node) -> Form:
    a = _bound(n)
    return F.group_norm, (a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"]), {}


def _batch_norm(n: fx.Node) -> Form:  # F.batch_norm takes the statistics before the affine parameters
    a = _bound(n)
    return F.batch_norm, tuple(a[k] for k in ("input", "running_mean", "running_var", "weight", "bias", "training",
                                              "momentum", "eps")), {}


def _vector_norm(n: fx.Node) -> Form:
    """torch.norm with a numeric ``p`` is ``torch.linalg.vector_norm`` (same positions: p, dim, keepdim)."""
    a = _bound(n)
    return torch.norm, (a["self"], a["ord"], a["dim"], a["keepdim"]), {} if a["dtype"] is None else {"dtype": a["dtype"]}


def _split_with_sizes(n: fx.Node) -> Form:
    a = _bound(n)
    return "split", (a["self"], list(a["split_sizes"]), a["dim"]), {}


def _einsum(n: fx.Node) -> Form:  # without the contraction path, a hint of torch.einsum's optimiser
    a = _bound(n)
    return torch.einsum, (a["equation"], *a["tensors"]), {}


def _meshgrid(n: fx.Node) -> Form:
    a = _bound(n)
    return torch.meshgrid, tuple(a["tensors"]), {"indexing": a.get("indexing", "ij")}


# F.interpolate's modes by the ATen op it calls (``.vec``: by output size or by scale factors).
_UPSAMPLE = {f"{pre}upsample_{kind}{d}d": mode for kind, mode, ds, pre in (
    ("nearest", "nearest", (1, 2, 3), ""), ("nearest_exact", "nearest-exact", (1, 2, 3), "_"),
    ("linear", "linear", (1,), ""), ("bilinear", "bilinear", (2,), ""), ("trilinear", "trilinear", (3,), ""),
    ("bicubic", "bicubic", (2,), ""), ("bilinear", "bilinear", (2,), "_"), ("bicubic", "bicubic", (2,), "_"))
    for d in ds}


def _upsample(n: fx.Node) -> Form:
    """F.interpolate calls ``aten.upsample_<mode>.vec(input, output_size, [align_corners,] scale_factors)``
    with exactly one of the size and the scale factors (recompute_scale_factor=None passes them on)."""
    a = _bound(n)
    name = n.target._schema.name.split("::")[-1]  # type: ignore[union-attr]
    kwargs = {"size": a["output_size"], "scale_factor": a["scale_factors"], "mode": _UPSAMPLE[name]}
    if "align_corners" in a:
        kwargs["align_corners"] = a["align_corners"]
    if name.endswith("_aa"):  # _upsample_bilinear2d_aa: antialiased
        kwargs["antialias"] = True
    return F.interpolate, (a["input"],), kwargs


def _to(n: fx.Node) -> Form | None:
    """``x.to(dtype=, device=)`` for ``_to_copy`` (a copy) and ``to.dtype_layout``; None (the ATen op stays)
    for a change of layout or pinned memory, which Tensor.to does not take."""
    a = _bound(n)
    if a.get("layout") not in (None, torch.strided) or a.get("pin_memory"):
        return None
    kwargs = {k: a[k] for k in ("dtype", "device", "memory_format") if a.get(k) is not None}
    kwargs.update(non_blocking=a["non_blocking"], copy=a.get("copy", True))  # _to_copy: always a copy
    return "to", (a["self"],), kwargs


SPECIAL: dict[str, Callable[[fx.Node], Form | None]] = {
    "slice": _slice, "select": _select, "index": _tensor_index, "layer_norm": _layer_norm,
    "group_norm": _group_norm, "batch_norm": _batch_norm, "linalg_vector_norm": _vector_norm,
    "split_with_sizes": _split_with_sizes, "meshgrid": _meshgrid, "einsum": _einsum, "_to_copy": _to, "to": _to,
    **{name: _upsample for name in _UPSAMPLE},
}
# Overloads a SPECIAL form is for (others take the generic way below): indexing by tensors, F.interpolate's
# calls, the keyword-only ``to``.
_OVERLOADS = {"index": "Tensor", "to": "dtype_layout", **{name: "vec" for name in _UPSAMPLE}}
_FUNCTION_NAMESPACES = (torch, torch._C._nn, F)


def _torch_level(graph: fx.Graph, rules: Any) -> None:
    """Give each ATen op the torch-level form of the same schema that a rule knows (see the docstring)."""
    for n in list(graph.nodes):
        op = n.target
        if n.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        name = op._schema.name.split("::")[-1]
        overload = op._overloadname
        form = SPECIAL[name](n) if name in SPECIAL and _OVERLOADS.get(name, overload) == overload else None
        if form is not None:
            target, n.args, n.kwargs = form
            n.op, n.target = ("call_method", target) if isinstance(target, str) else ("call_function", target)
            continue
        if name.startswith("sym_size") and overload == "int":
            n.op, n.target = "call_method", "size"
            continue
        if _is_method(op, name) and rules.get(name) is not None and isinstance(n.args[0] if n.args else None,
                                                                               fx.Node):  # not 10000.pow(x)
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


# -- the model's dtype and device ---------------------------------------------------------------------
def _follow_model(graph: fx.Graph, model: nn.Module) -> None:
    """Export records the dtype and device that the model's code reads (``pixel_values.to(self.weight.dtype)``,
    ``torch.arange(n, device=x.device)``) as constants of the example's run. Where a constant is the model's
    own, the graph reads it at run time from a reference (``_reference``), so that the student's graph and
    the teacher run in float64 and on CUDA as the model does. Only casts follow the dtype: a tensor made in
    float32 (``torch.arange(n, dtype=torch.float32)`` of a sine embedding) is often made so deliberately, and
    stays as the model makes it whatever its dtype."""
    found = _reference(graph, model)
    if found is None:
        return
    target, value = found
    first = next(n for n in graph.nodes if n.op != "placeholder")
    reads: dict[str, fx.Node] = {}

    def read(attr: str) -> fx.Node:
        if not reads:
            with graph.inserting_before(first):
                reads["ref"] = target if isinstance(target, fx.Node) else graph.get_attr(target)
        if attr not in reads:
            with graph.inserting_before(first):
                reads[attr] = graph.call_function(getattr, (reads["ref"], attr))
        return reads[attr]

    def follow(v: Any, cast: bool) -> Any:
        if isinstance(v, torch.device) and v == value.device:
            return read("device")
        return read("dtype") if cast and isinstance(v, torch.dtype) and v is value.dtype else v

    for n in list(graph.nodes):
        if n.op in ("call_function", "call_method") and n not in reads.values():
            cast = n.op == "call_method" and n.target in ("to", "type")
            n.args = tuple(follow(a, cast) for a in n.args)
            n.kwargs = {k: follow(v, cast) for k, v in n.kwargs.items()}


def _reference(graph: fx.Graph, model: nn.Module) -> tuple[str | fx.Node, torch.Tensor] | None:
    """What holds the model's dtype and device at run time: a floating parameter that the graph reads itself
    (a class token), or else the first floating input (gpd makes inputs in the model's dtype, on its device).
    Not a parameter of a module the graph calls: a read of it before the call would make the teacher's
    builder take the module's path for an attribute's owner."""
    called = tuple(str(n.target) + "." for n in graph.nodes if n.op == "call_module")
    for n in graph.nodes:
        path = str(n.target)
        if n.op == "get_attr" and not path.startswith(called) and _has_attr(model, path):
            t = _attr(model, path)
            if isinstance(t, nn.Parameter) and t.is_floating_point():
                return path, t
    for n in graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor) and val.is_floating_point():
            return n, val
    return None


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
