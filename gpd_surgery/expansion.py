"""Inverse reparameterization: from a student and its analysis to a plan, teacher tensors and a teacher module."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import branches
from .analyse import Analysis, analyse, frozen_report
from .errors import GPDError
from .layout import Cat, Layout
from .maps import Maps, leaf_src, teacher_size, whole_tiles
from .memory import check_memory, fmt_bytes
from .limits import MAX_RATIO, MAX_TEACHER_BYTES
from .plan import DTYPE_NAMES, STUDENT_PREFIX, Plan, Recipe
from .rules import DEFAULT, Registry, conv, linear
from .capture import capture as capture_graph
from .inputs import Inputs, as_inputs, resolve


def check_ratio(ratio: float) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError, OverflowError):
        raise GPDError(f"ratio {ratio!r} is not a number") from None
    if not math.isfinite(r) or r < 1:
        raise GPDError(f"ratio must be a finite number >= 1, got {ratio}")
    if r > MAX_RATIO:
        raise GPDError(f"ratio {ratio} is beyond {MAX_RATIO:g}: a teacher that wide would not train on any machine")
    return r


def teacher_bytes_estimate(analysis: Analysis, state: dict[str, torch.Tensor], ratio: float) -> int:
    """Bytes of the teacher's tensors from sizes alone, before any map exists: a ratio or a model too large
    for this machine is refused before it allocates anything."""
    spaces = analysis.spaces

    def tsize(lay: Any) -> int:
        lay = spaces.resolve(lay)
        if isinstance(lay, int):
            size = spaces.size[spaces.find(lay)]
            return teacher_size(size, ratio) if ratio > 1 and spaces.is_expanded(lay) else size
        sizes = [tsize(p) for p in lay.parts]
        return sum(sizes) if isinstance(lay, Cat) else math.prod(sizes)

    total = 0
    for key, t in state.items():
        info = analysis.params.get(key)
        n = math.prod(tsize(lay) for lay in info.layouts) if info is not None else t.numel()
        total += n * t.element_size()
    return total


def check_teacher_memory(analysis: Analysis, model: nn.Module, ratio: float, force: bool | None = False,
                         factor: int = 2) -> int:
    """Refuse (unless ``force``) a teacher whose tensors would not fit in free memory ``factor`` times over
    (building one takes about twice its size); refuse always one beyond any machine."""
    need = factor * teacher_bytes_estimate(analysis, student_state(model), ratio)
    if need > MAX_TEACHER_BYTES:
        raise GPDError(f"a teacher of {fmt_bytes(need / factor)} at ratio {ratio:g} is beyond any machine: lower --ratio")
    check_memory(need, force, f"the teacher at ratio {ratio:g}")
    return need


def analysis_maps(analysis: Analysis, ratio: float, seed: int) -> Maps:
    spaces = analysis.spaces

    def make_leaf(i: int) -> tuple[int, torch.Tensor | None]:
        size = spaces.size[i]
        return size, (leaf_src(size, ratio, seed, i) if spaces.is_expanded(i) and ratio > 1 else None)

    return Maps({}, spaces.resolve, make_leaf)


@dataclass
class Student:
    """A traced, shape-propagated and analysed student."""

    gm: fx.GraphModule
    analysis: Analysis
    inputs: Inputs  # in the order the graph takes them
    capture: str = "fx"  # how the graph was captured: "fx" or "export"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.inputs[0].shape


def prepare(model: nn.Module, inputs: Inputs | tuple[int, ...], force: bool | None = False,
            rules: Registry | None = None, capture: str = "auto") -> Student:
    """Capture (see ``capture.py``), shape-propagate and analyse ``model`` on ``inputs`` (specs, or one
    input's shape) with ``rules`` (a registry layered over the default one; None: the default rules), which
    also say which modules the tracer keeps whole."""
    rules = rules if rules is not None else DEFAULT
    inputs = resolve(as_inputs(inputs), model)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    captured = capture_graph(model, inputs, capture, rules, force, dtype)
    return Student(captured.gm, analyse(captured.gm, rules), captured.inputs, captured.via)


def make_plan(
    student: Student, model: nn.Module, ratio: float, seed: int, equal_shares: bool, source: dict[str, Any],
) -> tuple[Plan, Maps]:
    """One recipe per entry of ``model.state_dict()``; the widened dims of those the graph uses."""
    analysis = student.analysis
    maps = analysis_maps(analysis, ratio, seed)
    state = student_state(model)
    in_graph = set(student.gm.state_dict().keys())
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    recipes: list[Recipe] = []
    used: set[int] = set()
    for key, t in state.items():
        info = analysis.params.get(key)
        dims = []
        if info is not None and key in in_graph:
            for d, (lay, mode) in enumerate(zip(info.layouts, info.modes)):
                lay = maps.resolve(lay)
                if maps.src(lay) is not None:
                    # Summing copies only inverts splitting for floats: integer tensors are copied.
                    dims.append((d, lay, mode if mode and t.is_floating_point() else "copy"))
                    used.update(analysis.spaces.leaves(lay))
        kind = "param" if key in params else "buffer"
        if t.dtype not in DTYPE_NAMES:
            raise GPDError(f"{key} has dtype {t.dtype}, which teacher files do not support")
        recipes.append(Recipe(key, kind, tuple(t.shape), DTYPE_NAMES[t.dtype], key in in_graph or kind == "param", dims))
    frozen = frozen_report(analysis.spaces)
    report = {
        "frozen": [f for f in frozen if not f["boundary"] and not f["reason"].startswith("by design")],
        "boundary": sum(1 for f in frozen if f["boundary"]),
        "expanded": sum(1 for i in used if maps.leaf(i)[1] is not None),
        "unsupported": sorted(set(analysis.unsupported.values())),
    }
    leaves = {i: maps.leaf(i) for i in sorted(used)}
    return Plan(ratio, seed, equal_shares, source, leaves, recipes, report), maps


def expand_tensor(t: torch.Tensor, recipe: Recipe, maps: Maps, generator_seed: int | None) -> torch.Tensor:
    """Index every widened dim by its source map; divide dense inputs among their copies.

    Dense inputs are split first, while the tensor is still small, then the copied dims are indexed:
    every element's value depends only on its own indices, so the order gives the same tensor. Where
    every copied dim is whole tiles (integer ratios), the split is written straight into the first
    tile of the teacher tensor and copied into the others: one teacher-sized tensor, no intermediate."""
    floating = t.is_floating_point()
    shares = [(d, lay) for d, lay, mode in recipe.dims if mode == "share" and floating]
    copies = [(d, lay) for d, lay, mode in recipe.dims if not (mode == "share" and floating)]

    def split(x: torch.Tensor, d: int, lay: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        g = None if generator_seed is None else torch.Generator().manual_seed(generator_seed + d)
        return split_among_copies(x, d, maps.src(lay, x.device), g, out)

    tiles = [maps.tiles(lay) for _, lay in copies]
    if copies and all(tiles):
        shape = list(t.shape)
        for d, lay, _ in recipe.dims:
            shape[d] = maps.tsize(lay)
        out = t.new_empty(shape)
        first = out
        for d, _ in copies:
            first = first.narrow(d, 0, t.shape[d])
        core = t
        for i, (d, lay) in enumerate(shares):
            core = split(core, d, lay, first if i == len(shares) - 1 else None)
        if core is not first:
            first.copy_(core)
        for i, ((d, _), n) in enumerate(zip(copies, tiles)):
            filled = out  # the first tile along the copied dims not yet tiled, whole along the others
            for d2, _ in copies[i + 1:]:
                filled = filled.narrow(d2, 0, t.shape[d2])
            size = t.shape[d]
            for k in range(1, n):
                filled.narrow(d, k * size, size).copy_(filled.narrow(d, 0, size))
        return out
    out = t
    for d, lay in shares:
        out = split(out, d, lay)
    for d, lay in copies:
        out = out.index_select(d, maps.src(lay, out.device))
    return out if out is not t else t.clone()


def split_among_copies(t: torch.Tensor, d: int, src: torch.Tensor, g: torch.Generator | None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Widen dim ``d`` so that the copies of each entry sum to it *exactly* in ``t``'s own dtype.

    Random shares (``g`` given): copies are filled rank by rank, each taking a fraction f in [1/2, 1]
    of what remains and the last copy the rest. Since the part taken lies in [R/2, R], ``R - part`` is
    exact (Sterbenz), so the copies add up to the student's weight with no rounding, and a float32
    teacher verifies to float64 precision. Equal shares: every copy is ``w / copies``, exact when the
    number of copies is a power of two (division by a power of two only shifts the exponent).

    Where the copies of one rank are a block of consecutive teacher channels holding every student
    channel in order (whole tiles, as at integer ratios), the parts are written straight into that
    block of the output and the remainder with one subtraction (into the last block when the next
    rank is the last), without index passes. ``out``: where to write the result (a view is fine).
    """
    size = t.shape[d]
    count = torch.bincount(src, minlength=size)
    view = [1] * t.dim()
    view[d] = -1
    if out is None:
        out = t.new_empty(t.shape[:d] + (len(src),) + t.shape[d + 1 :])
    every = torch.arange(size, device=src.device)
    tiles = whole_tiles(src, size)
    if g is None:
        if tiles:
            first = torch.div(t, count.to(t.dtype).view(view), out=out.narrow(d, 0, size))
            for k in range(1, tiles):
                out.narrow(d, k * size, size).copy_(first)
        else:
            out.copy_(t.index_select(d, src).div_(count[src].to(t.dtype).view(view)))
        return out
    r = torch.rand(len(src), generator=g, dtype=torch.float64)
    if tiles:  # rank k is tile k: the same draws as below, without computing ranks
        frac = (0.5 + 0.5 * r).to(t.dtype)
        rest = t
        for k in range(tiles - 1):
            part = torch.mul(rest, frac[k * size:(k + 1) * size].view(view), out=out.narrow(d, k * size, size))
            if k == tiles - 2:  # the remainder is the last copy: written in place, multiplied by nothing
                torch.sub(rest, part, out=out.narrow(d, (k + 1) * size, size))
            else:
                rest = rest.sub_(part) if rest is not t else rest - part
        return out
    order = torch.argsort(src, stable=True)
    starts = torch.cumsum(count, 0) - count
    rank = torch.empty_like(src)
    rank[order] = torch.arange(len(src), device=src.device) - starts[src[order]]
    left = count[src] - rank  # copies still to fill, this one included
    frac = torch.where(left > 1, 0.5 + 0.5 * r, 1.0)
    steps = []  # per rank: teacher channels, their student channels, fractions, first channel of a block, whole
    for k in range(int(count.max())):
        cols = (rank == k).nonzero().squeeze(1)
        ch = src[cols]
        block = len(cols) > 0 and int(cols[-1]) - int(cols[0]) + 1 == len(cols)  # consecutive teacher channels
        whole = len(ch) == size and torch.equal(ch, every)  # every student channel, in order
        steps.append((cols, ch, frac[cols].to(t.dtype).view(view), int(cols[0]) if block else None, whole))
    rest, owned = t, False  # ``t`` is the caller's: copied before any update in place
    for k, (cols, ch, f, at, whole) in enumerate(steps):
        taken = rest if whole else rest.index_select(d, ch)
        if k == len(steps) - 1:  # the last copies take all that remains (their fraction is 1)
            if at is not None:
                out.narrow(d, at, len(cols)).copy_(taken)
            else:
                out.index_copy_(d, cols, taken)
            break
        if at is not None:
            part = torch.mul(taken, f, out=out.narrow(d, at, len(cols)))
        else:
            part = taken * f
            out.index_copy_(d, cols, part)
        if whole:
            rest = rest.sub_(part) if owned else rest - part
            owned = True
        else:
            if not owned:
                rest, owned = rest.clone(), True
            rest.index_add_(d, ch, part, alpha=-1)
    return out


def expand_tensors(plan: Plan, state: dict[str, torch.Tensor], maps: Maps | None = None) -> dict[str, torch.Tensor]:
    """The teacher file's tensors: teacher parameters and buffers, and the student's own buffers."""
    maps = maps or plan.maps
    out: dict[str, torch.Tensor] = {}
    for i, r in enumerate(plan.recipes):
        t = state[r.key].detach()
        if r.teacher:
            seed = None if plan.equal_shares else plan.seed * 7919 + 31 * i
            out[r.key] = expand_tensor(t, r, maps, seed).contiguous()
        if r.kind == "buffer":
            out[STUDENT_PREFIX + r.key] = t.clone().contiguous()
    return out


def plan_branches(plan: Plan, student: Student, kinds: tuple[str, ...]) -> None:
    """Record, for every teacher conv and linear, the branch kinds that fit it."""
    teacher_weights = {r.key for r in plan.recipes if r.kind == "param" and r.teacher}
    for node in student.gm.graph.nodes:
        key = f"{node.target}.weight"
        rule = student.analysis.rules.lookup(node, student.gm) if node.op == "call_module" else None
        # A rule whose teacher module convolves with a merged kernel says so (``takes_branches``).
        if key not in teacher_weights or not (rule in (conv, linear) or getattr(rule, "takes_branches", False)):
            continue
        fit = branches.applicable(kinds, student.gm.get_submodule(node.target))
        if fit:
            plan.branches[key] = list(fit)


def init_branch_tensors(plan: Plan, tensors: dict[str, torch.Tensor]) -> None:
    """Random branch parameters with zero scales, so the teacher stays exact."""
    g = torch.Generator().manual_seed(plan.seed * 7919 + 17)
    for key, kinds in plan.branches.items():
        prefix = key[: -len("weight")]
        for name, t in branches.init_branches(tuple(kinds), tensors[key], g).items():
            tensors[prefix + name] = t


class Sizes:
    """What build hooks see (``gpd_surgery.Sizes``): the teacher's sizes and maps of the layouts a rule
    returned or related, and a way to add constant tensors to the teacher."""

    def __init__(self, maps: Maps, graph: fx.Graph, root: nn.Module) -> None:
        self.maps, self.graph, self.root = maps, graph, root

    def __call__(self, lay: Layout) -> int:
        """The teacher's size of ``lay``."""
        return self.maps.tsize(lay)

    def src(self, lay: Layout) -> torch.Tensor | None:
        """Teacher channel j of ``lay`` copies student channel ``src[j]``; None where ``lay`` does not widen."""
        return self.maps.src(lay)

    def student(self, lay: Layout) -> int:
        """The student's size of ``lay``."""
        return self.maps.size(lay)

    def constant(self, before: fx.Node, value: torch.Tensor) -> fx.Node:
        """A non-persistent buffer of the teacher, read by a get_attr node inserted before ``before``."""
        name = f"_gpd_const_{len([n for n in self.root._buffers if n.startswith('_gpd_const_')])}"
        self.root.register_buffer(name, value, persistent=False)
        with self.graph.inserting_before(before):
            return self.graph.get_attr(name)


def _unsaved(t: torch.Tensor, info: Any, maps: Maps) -> torch.Tensor:
    """A tensor the teacher file does not hold, widened from the student's value: copied channels, and dense
    inputs split equally (it has no file to carry shares)."""
    if info is None:
        return t
    dims = [(d, maps.resolve(lay), mode or "copy") for d, (lay, mode) in enumerate(zip(info.layouts, info.modes))]
    dims = [(d, lay, mode) for d, lay, mode in dims if maps.src(lay) is not None]
    if not dims:
        return t
    recipe = Recipe("", "buffer", tuple(t.shape), DTYPE_NAMES.get(t.dtype, "float32"), False, dims)
    return expand_tensor(t.detach(), recipe, maps, None)


def build_teacher(student: Student, maps: Maps, tensors: dict[str, torch.Tensor],
                  plan_branches: dict[str, list[str]] | None = None) -> fx.GraphModule:
    """A GraphModule computing the teacher: the student's graph over widened modules (with their branches),
    with rewritten shapes."""
    plan_branches = plan_branches or {}
    gm, analysis = student.gm, student.analysis
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = nn.Module()
    sizes = Sizes(maps, graph, root)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            if _has_attr(root, target):
                continue
            mod = _clone(gm.get_submodule(target), target + ".", tensors)
            hook = analysis.module_hooks.get(target)
            if hook is not None:
                mod = hook(mod, sizes) or mod
            mod = branches.attach(mod, tuple(plan_branches.get(target + ".weight", ())), tensors, target + ".")
            _install(root, target, mod)
        elif node.op == "get_attr":
            target = str(node.target)
            if _has_attr(root, target) or not isinstance(getattr_path(gm, target), torch.Tensor):
                if not _has_attr(root, target):
                    _install(root, target, copy.copy(getattr_path(gm, target)))
                continue
            orig = getattr_path(gm, target)
            t = tensors.get(target)
            if t is None:  # not in the file (a non-persistent buffer, beit's zero k_bias): widened here
                t = _unsaved(orig, analysis.params.get(target), maps)
            _install(root, target, nn.Parameter(t, orig.requires_grad) if isinstance(orig, nn.Parameter) else t)
    outputs = {old: new for old, new in zip(gm.graph.find_nodes(op="output"), graph.find_nodes(op="output"))}
    for old, new in [*env.items(), *outputs.items()]:
        hook = analysis.node_hooks.get(old.name)
        if hook is not None:
            hook(new, sizes)
    graph.lint()
    teacher = fx.GraphModule(root, graph, "Teacher")
    teacher._non_persistent_buffers_set.update(n for n in teacher._buffers if n.startswith("_gpd_const_"))
    return teacher


def getattr_path(obj: Any, path: str) -> Any:
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def _has_attr(root: nn.Module, path: str) -> bool:
    try:
        getattr_path(root, path)
        return True
    except AttributeError:
        return False


def _install(root: nn.Module, path: str, value: Any) -> None:
    *owners, name = path.split(".")
    mod = root
    for o in owners:
        if not hasattr(mod, o):
            mod.add_module(o, nn.Module())
        mod = getattr(mod, o)
    if isinstance(value, nn.Module):
        mod.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        mod.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(name, value)
    else:
        setattr(mod, name, value)


def _clone(m: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``m`` whose tensors are the teacher's (same names), children cloned likewise."""
    t = copy.copy(m)
    t._parameters = {
        n: None if p is None else nn.Parameter(tensors.get(prefix + n, p), p.requires_grad)
        for n, p in m._parameters.items()
    }
    t._buffers = {n: None if b is None else tensors.get(prefix + n, b) for n, b in m._buffers.items()}
    t._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    t._modules = {n: None if c is None else _clone(c, f"{prefix}{n}.", tensors) for n, c in m._modules.items()}
    return t


def student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
