"""Load a student from a MODEL spec, trace it with torch.fx and propagate shapes."""
from __future__ import annotations

import ast
import copy
import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.fx as fx
from torch import nn

from .errors import GPDError
from .inputs import Inputs
from .memory import check_memory

INIT_SEED = 0  # models are built under a fixed seed so that `verify` rebuilds the same random student


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def parse_model_args(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are Python literals when they parse as one, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise GPDError(f"--model-arg {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_model(spec: str, model_args: dict[str, Any] | None = None, *, trust_pickle: bool = False,
               expect: dict[str, tuple[int, ...]] | None = None, trust_remote_code: bool = False,
               init_seed: int = INIT_SEED) -> nn.Module:
    """Build the student named by ``spec`` (random init, eval mode, seeded with ``init_seed``). ``expect``: the
    state dict's shapes a teacher's plan records, checked on the meta device before anything is allocated."""
    model_args = dict(model_args or {})
    torch.manual_seed(init_seed)
    if spec.endswith((".pt", ".pth")) and ":" not in os.path.basename(spec):
        model = _load_pickled(spec, trust_pickle)
    elif spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1], model_args, expect)
    elif spec.startswith("timm:"):
        model = _timm(spec.split(":", 1)[1], model_args, expect)
    elif spec.startswith("hf:"):
        from .hf import load as load_hf

        model = load_hf(spec, model_args, trust_remote_code, expect)
    elif ":" in spec:
        model = _factory(spec, model_args, expect)
    else:
        raise GPDError(
            f"unknown MODEL spec {spec!r}: use torchvision:NAME, timm:NAME, hf:DIR, module.path:callable or a .pt/.pth "
            "file"
        )
    if not isinstance(model, nn.Module):
        raise GPDError(f"{spec} did not give an nn.Module but a {type(model).__name__}")
    return model.eval()


def _torchvision(name: str, kwargs: dict[str, Any], expect: Any = None) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise GPDError("torchvision is not installed: pip install 'gpd-surgery[vision]'") from None
    if name not in torchvision.models.list_models():
        raise GPDError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", True)  # silences the init warning; random weights either way
    return _build(f"torchvision:{name}", lambda: torchvision.models.get_model(name, weights=None, **kwargs), kwargs,
                  expect)


def _timm(name: str, kwargs: dict[str, Any], expect: Any = None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise GPDError("timm is not installed: pip install timm") from None
    return _build(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, **kwargs), kwargs, expect)


def _factory(spec: str, kwargs: dict[str, Any], expect: Any = None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        # The gpd command looks in the current directory (as `python -m` does) and on PYTHONPATH.
        raise GPDError(f"cannot import {module_name!r} for MODEL spec {spec!r}: {e} (modules are found in the "
                       "current directory, installed packages and PYTHONPATH)") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise GPDError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise GPDError(f"{spec} is not callable")
    return _build(spec, lambda: factory(**kwargs), kwargs, expect)


def _build(spec: str, make: Any, kwargs: dict[str, Any], expect: dict[str, tuple[int, ...]] | None = None
           ) -> nn.Module:
    """Building runs the user's (or a library's) code on the user's arguments: its failures are user errors.
    The model is first built on the meta device (sizes, no data), so that arguments asking for more memory
    than is free, or (with ``expect``) for another model than a plan's (a recorded ``width`` of 6000), are
    refused before they allocate anything."""
    check_meta(spec, make, kwargs, expect)
    try:
        return make()
    except TypeError as e:
        raise GPDError(f"{spec} rejected the model arguments {kwargs}: {e}") from None
    except Exception as e:
        raise GPDError(f"{spec} could not be built with {kwargs}: {type(e).__name__}: {e}") from None


def check_meta(spec: str, make: Any, kwargs: dict[str, Any], expect: dict[str, tuple[int, ...]] | None = None
               ) -> None:
    """Build the model on the meta device (sizes, no data) and refuse, before anything is allocated, a model
    larger than free memory or (with ``expect``) other than a plan's."""
    meta = _on_meta_device(make)
    if meta is None:
        return
    if expect is not None:
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        wrong = next((k for k in expect if shapes.get(k, expect[k]) != expect[k]), None)
        if wrong is not None or set(shapes) != set(expect):
            what = (f"{wrong} is {list(shapes[wrong])} in the model, {list(expect[wrong])} in the plan" if wrong
                    else "their tensors have other names")
            raise GPDError(f"the teacher was not made from {spec} with {kwargs} ({what})")
    size = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    check_memory(size, None, f"building {spec} with {kwargs}", "use smaller --model-arg values")


def _on_meta_device(make: Any) -> nn.Module | None:
    """The model ``make`` builds, on the meta device: sizes without data (None where it cannot be built so)."""
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = make()
        return model if isinstance(model, nn.Module) else None
    except Exception:  # data-dependent construction: the real build will say what is wrong
        return None
    finally:
        torch.set_rng_state(rng)  # the real build draws the same random student as before


def _load_pickled(path: str, trust_pickle: bool) -> nn.Module:
    if not os.path.isfile(path):
        raise GPDError(f"model file {path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    # A weights-only load runs no code from the file, so it can say what the file is before any trust is asked:
    # a state dict is the commonest .pt, and needs the architecture as MODEL and the file as --weights.
    held = _weights_only(path)
    if held is not None:
        name = os.path.basename(path)
        if _is_state_dict(held):
            raise GPDError(f"{path} holds a state dict (weights), not a model: name the architecture as MODEL and "
                           f"pass the file with --weights, e.g. `gpd expand torchvision:resnet18 --weights {name}`")
        raise GPDError(f"{path} holds a {type(held).__name__}, not a pickled nn.Module")
    if not trust_pickle:
        raise GPDError(
            f"{path} is a pickled module: loading it runs code from the file. Pass --trust-pickle if you trust it"
        )
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (AttributeError, ImportError) as e:  # the class of the pickled model cannot be found
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "__main__" in text:
            raise GPDError(
                f"cannot unpickle {path}: its model class was defined in the script that saved it (__main__), so "
                "it cannot be imported here. Put the class in a module and use MODEL as module:factory, e.g. "
                f"`gpd expand mymodel:Net --weights weights.pt` with weights.pt from torch.save(model.state_dict(), "
                "...)") from None
        raise GPDError(f"cannot unpickle {path}: {text} (the model's class must be importable: run gpd in the "
                       "directory of its module or set PYTHONPATH)") from None
    except Exception as e:  # unpickling can raise anything
        raise GPDError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from None


def _weights_only(path: str) -> Any:
    """What a weights-only load of ``path`` gives, or None when it refuses the file (a pickled module)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None


def _is_state_dict(obj: Any) -> bool:
    """A dict of tensors, or a checkpoint holding one under ``state_dict`` or ``model``."""
    if not isinstance(obj, dict):
        return False
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return True
    return any(_is_state_dict(obj.get(k)) for k in ("state_dict", "model") if isinstance(obj.get(k), dict))


def default_input_shape(spec: str) -> tuple[int, ...]:
    return (1, 3, 299, 299) if spec.endswith("inception_v3") else (1, 3, 224, 224)


# -- tracing -----------------------------------------------------------------
class TraceRules(Protocol):
    """What the tracer asks of a rule registry (``rules.Registry``): which modules it keeps whole, and
    which functions it records as one call."""

    def is_leaf(self, m: nn.Module) -> bool: ...

    def autowrapped(self) -> set[Callable[..., Any]]: ...


def leaf_modules_and_wrapped(model: nn.Module) -> tuple[set[type], set]:
    """Leaf module types and autowrapped functions that timm registers for fx. Only a model that uses timm
    needs them, and timm is then imported already: a model without it never pays for importing timm."""
    if "timm" not in sys.modules:
        return set(), set()
    try:
        from timm.layers import _fx  # type: ignore[attr-defined]
    except Exception:
        return set(), set()
    return set(_fx.get_notrace_modules()), set(_fx.get_notrace_functions())


class TraceError(GPDError):
    """Capturing the model failed (not its input): another capture path may succeed."""


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[type], wrapped: set, rules: TraceRules | None) -> None:
        super().__init__(autowrap_functions=tuple(wrapped | (rules.autowrapped() if rules is not None else set())))
        self._leaves = tuple(leaves)
        self._rules = rules
        self.path: list[str] = []  # the submodules being traced, to say where tracing failed

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path.append(self.path_of_module(m) or type(m).__name__)
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()  # skipped by an exception, so the path names the innermost module that failed
        return out

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.MultiheadAttention) or (self._leaves and isinstance(m, self._leaves)):
            return True
        if self._rules is not None and self._rules.is_leaf(m):  # a module a rule was registered for
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, rules: TraceRules | None = None, inputs: Inputs | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``, keeping whole the modules that ``rules`` registered as leaves (and
    recording its functions as one call); an untraceable model is a ``TraceError`` naming where fx stopped.
    ``inputs``: the example inputs (by default one positional input); parameters of ``forward`` that they do
    not name are traced at their defaults."""
    tracer = _Tracer(*leaf_modules_and_wrapped(model), rules)
    try:
        graph = tracer.trace(model, concrete_args=_optional_args(model, inputs))
    except Exception as e:
        where = user_frame(e)
        inner = ""
        if tracer.path:
            name = tracer.path[-1]
            inner = f" in {name} ({type(model.get_submodule(name)).__name__})" if _has_module(model, name) else f" in {name}"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{inner}{where}: {type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0]} (try --capture export, or make the control flow static, e.g. with "
            "torch.where, or wrap the function with torch.fx.wrap)"
        ) from None
    if any(s.name for s in inputs or ()):
        _inline_defaults(graph, inputs)  # type: ignore[arg-type]
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _inline_defaults(graph: fx.Graph, inputs: Inputs) -> None:
    """Parameters traced at their defaults become constants, so that the graph's placeholders are exactly
    the example's inputs (``gm(*inputs)`` binds them in order whatever keywords the model takes)."""
    positional = sum(s.name is None for s in inputs)
    named = {s.name for s in inputs if s.name}
    holders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(holders):
        if i >= positional and n.target not in named:
            default = n.args[0] if n.args else None
            for user in list(n.users):
                user.args = fx.node.map_arg(user.args, lambda a: default if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: default if a is n else a)
            graph.erase_node(n)


def _optional_args(model: nn.Module, inputs: Inputs | None = None) -> dict[str, Any] | None:
    """Arguments of ``forward`` that have defaults (``mask=None``) and that the example's inputs do not give
    (by position or by name), traced at their defaults: the teacher is made for the call ``model(x)``, and
    ``if mask is not None`` must not be traced as taken."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    inputs = inputs or ()
    positional = sum(s.name is None for s in inputs) if inputs else 1
    named = {s.name for s in inputs if s.name}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    optional = {p.name: p.default for p in params[positional:] if p.kind in kinds and p.name not in named
                and p.default is not inspect.Parameter.empty}
    return optional or None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def user_frame(e: BaseException) -> str:
    """' at FILE:LINE (code)' of the last frame of ``e`` outside torch: where the model's code failed."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({(f.line or '').strip()})"


class ShapeProp(fx.Interpreter):
    """Run the graph once and record, per node, a TensorSpec (or nested tuple of them, or the plain value)."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["gpd_spec"] = _spec(out)
        return out


def _spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorSpec(tuple(v.shape), v.dtype)
    if isinstance(v, (tuple, list)):
        return type(v)(_spec(x) for x in v) if not hasattr(v, "_fields") else tuple(_spec(x) for x in v)
    if isinstance(v, torch.Size):
        return tuple(v)
    return v


class _Peak(fx.Interpreter):
    """Run the graph on fake tensors (shapes only, no data, no compute) and track the bytes of the values
    alive at once, freed after their last use as fx.Interpreter frees them: the forward's peak."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.last: dict[fx.Node, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.users:
                self.last.setdefault(max(n.users, key=order.__getitem__), []).append(n)
        self.live: dict[fx.Node, int] = {}
        self.now = self.peak = self.total = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "get_attr":  # parameters exist already: they are the model's memory, not the forward's
            size = sum(t.numel() * t.element_size() for t in tensors_in(out))
            self.live[n] = size
            self.total += size
            self.now += size
            self.peak = max(self.peak, self.now)
        for done in self.last.get(n, ()):
            self.now -= self.live.pop(done, 0)
        return out


def tensors_in(v: Any) -> list[torch.Tensor]:
    """The tensors in a value (a model's output: a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in tensors_in(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in tensors_in(x)]
    return []


def forward_bytes(gm: fx.GraphModule, inputs: Inputs, dtype: torch.dtype = torch.float32,
                  total: bool = False) -> int:
    """The peak memory of one forward on ``inputs`` (values alive at once, inputs included), or with ``total``
    the bytes of all its values together (what a run that records every node holds), found on the meta
    device (or fake tensors where the model builds CPU constants): sizes only, no data, no arithmetic.
    Where the model cannot run so (data-dependent Python), four times the inputs' size."""
    for fake in (False, True):  # meta tensors are 3-4x faster; fake ones also mix with CPU constants
        try:
            peak = _Peak(_meta_copy(gm))  # a copy: a forward that caches tensors on its modules caches them there
            if fake:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                    peak.run(*(torch.empty(s.shape, dtype=s.dtype or dtype) for s in inputs))
            else:
                with torch.no_grad():
                    peak.run(*(torch.empty(s.shape, dtype=s.dtype or dtype, device="meta") for s in inputs))
            return peak.total if total else peak.peak
        except Exception:
            continue
    return 4 * sum(math.prod(s.shape) * (s.dtype or dtype).itemsize for s in inputs)


def _meta_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its modules copied and its parameters and buffers on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(gm, memo)


def propagate(gm: fx.GraphModule, example: list[torch.Tensor], model: nn.Module | None = None,
              inputs: Inputs | None = None) -> None:
    """Run ``gm`` on ``example`` and record every node's shape. Where it fails, the model itself says whose
    fault it is: if ``model`` runs on the example, the capture is wrong (a ``TraceError``), else the input."""
    try:
        with torch.no_grad():
            ShapeProp(gm).run(*example)
        return
    except Exception as e:
        error = e
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    shapes = ", ".join(str(tuple(t.shape)) for t in example)
    if model is not None and inputs is not None:
        from .inputs import call

        try:
            with torch.no_grad():
                call(model, inputs, example)
        except Exception as e:
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            raise TraceError(f"the captured graph of {type(model).__name__} fails where the model runs (input "
                             f"{shapes}){user_frame(error)}: {text} (try --capture export)") from None
    raise GPDError(f"the model rejects an input of shape {shapes}: {text} (use --input-shape or --input)") from None
