"""The registry of op rules: rules keyed by module type, function or method name.

A rule is a function of the :class:`~gpd_surgery.analyse.Ctx` of one node that relates the node's
dimensions and returns its output's (see ``docs/extending.md``). The default registry holds the built-in
rules; rules for torchvision's and timm's own ops are loaded the first time a graph holds one of that
library's modules or functions, so that importing gpd-surgery never imports those libraries. A
:class:`Registry` that a user creates is layered over the default one: its rules come first.
"""
from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..analyse import Rule

RuleKey = Any  # an nn.Module subclass, a function, or a method name such as "reshape"

# Rules for a library's own ops, by the library's top-level package: imported at the first node of it.
LIBRARY_RULES = {"torchvision": "gpd_surgery.rules.torchvision", "timm": "gpd_surgery.rules.timm",
                 "transformers": "gpd_surgery.rules.transformers"}


@dataclass(frozen=True)
class _Entry:
    rule: Rule
    leaf: bool  # a module class the tracer keeps whole, or a function it records as one node


class Registry:
    """Rules keyed by module type, function or method name, layered over ``parent`` (by default the default
    registry): a key this registry lacks is looked up there.

    >>> rules = Registry()
    >>> @rules.register(MyBlock)
    ... def my_block(ctx: Ctx) -> Dims: ...
    >>> gpd_surgery.expand(model, (1, 3, 32, 32), 2, rules=rules)
    """

    def __init__(self, parent: Registry | None = None) -> None:
        self._entries: dict[RuleKey, _Entry] = {}
        self.parent = parent if parent is not None else _default  # None only for the default registry itself

    def register(self, *keys: RuleKey, leaf: bool = True) -> Callable[[Rule], Rule]:
        """Use the decorated rule for ``keys``. With ``leaf`` (the default), a module class becomes a leaf of
        the trace (fx records one call of it and does not trace its ``forward``, which may then hold Python
        that fx cannot trace) and a Python function is recorded as one call wherever a module's code calls
        it by its name (``torch.fx.wrap``), its body not traced. A subclass of a registered module class
        counts only when it does not override ``forward``."""

        def deco(fn: Rule) -> Rule:
            for k in keys:
                self._entries[k] = _Entry(fn, leaf)
            return fn

        return deco

    def get(self, key: RuleKey) -> Rule | None:
        """The rule registered for exactly ``key``, here or in a parent registry."""
        entry = self._entry(key)
        return entry.rule if entry is not None else None

    def lookup(self, node: fx.Node, gm: fx.GraphModule) -> Rule | None:
        """The rule for ``node`` of ``gm``, or None where no rule knows its op."""
        if node.op == "call_module":
            cls = type(gm.get_submodule(node.target))  # type: ignore[arg-type]
            for base in cls.__mro__:
                _load_library_rules(base)
            entry = self._module_entry(cls)
            return entry.rule if entry is not None else None
        if node.op == "call_function":
            _load_library_rules(node.target)
            return self.get(node.target)
        if node.op == "call_method":
            return self.get(str(node.target))
        if node.op == "get_attr":
            return self.get("get_attr")
        return None

    def is_leaf(self, m: nn.Module) -> bool:
        """Whether the tracer keeps ``m`` whole: its class (or a base whose ``forward`` it keeps) was
        registered as a leaf."""
        entry = self._module_entry(type(m))
        return entry is not None and entry.leaf

    def knows_module(self, m: nn.Module) -> bool:
        """Whether a rule knows ``m``'s calls as a whole (a leaf or a built-in module rule): the torch.export
        capture then turns the ops of each call back into one ``call_module`` node."""
        cls = type(m)
        for base in cls.__mro__:
            _load_library_rules(base)
        return self._module_entry(cls) is not None

    def load_library_rules(self, model: nn.Module) -> None:
        """Import the rules of the libraries whose modules ``model`` holds, before it is traced: a module
        class is kept whole only if its rule is known when the tracer meets it (torchvision's
        FrozenBatchNorm2d would otherwise be traced through, its buffers folded into constants)."""
        for cls in {type(m) for m in model.modules()}:
            for base in cls.__mro__:
                _load_library_rules(base)

    def autowrapped(self) -> set[Callable[..., Any]]:
        """The Python functions registered as leaves, for the tracer to record as one call each."""
        out: set[Callable[..., Any]] = set()
        for registry in self._chain():
            out.update(k for k, e in registry._entries.items() if e.leaf and isinstance(k, types.FunctionType))
        return out

    def _chain(self) -> list[Registry]:
        out: list[Registry] = []
        registry: Registry | None = self
        while registry is not None:
            out.append(registry)
            registry = registry.parent
        return out

    def _entry(self, key: RuleKey) -> _Entry | None:
        for registry in self._chain():
            entry = registry._entries.get(key)
            if entry is not None:
                return entry
        return None

    def _module_entry(self, cls: type) -> _Entry | None:
        for base in cls.__mro__:
            entry = self._entry(base)
            if entry is not None:
                # A subclass that overrides forward computes something else: not ours to guess.
                return entry if base is cls or cls.forward is base.forward else None
        return None


def _load_library_rules(op: Any) -> None:
    """Import the rules for the library that ``op`` (a module class or a function) comes from, once. Never
    while tracing: fx then replaces the functions a library wraps, and their rules would be keyed by that."""
    owner = getattr(op, "__module__", None)
    name = LIBRARY_RULES.get(owner.partition(".")[0]) if isinstance(owner, str) else None
    if name is not None and name not in sys.modules:
        importlib.import_module(name)


_default: Registry | None = None
DEFAULT = Registry()  # the built-in rules and those of ``register_rule``
_default = DEFAULT


def builtin(*keys: RuleKey) -> Callable[[Rule], Rule]:
    """Register a built-in rule: its ops are torch's own, or a library's that the library makes fx record
    as one node itself, so nothing changes for the tracer."""
    return DEFAULT.register(*keys, leaf=False)


def register_rule(*keys: RuleKey, leaf: bool = True) -> Callable[[Rule], Rule]:
    """Register a rule in the default registry, used by every expansion (see :meth:`Registry.register`)."""
    return DEFAULT.register(*keys, leaf=leaf)
