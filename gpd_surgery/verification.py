"""Numerical equivalence of a teacher and its student, and where they part when they do."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .analyse import describe
from .errors import GPDError
from .fallback import STUDENT_NAME
from .expansion import Student, build_teacher, check_teacher_memory, make_plan, prepare
from .inputs import Inputs, call, make
from .inputs import describe as describe_inputs
from .maps import Maps
from .memory import check_memory
from .plan import Plan
from .rules import Registry
from .student_view import StudentView
from .trace import forward_bytes, tensors_in

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
# Inside the graph each node is measured against the largest value flowing into or out of it: float32
# rounding of a split sum reaches ~1e-6 of that at deep nodes, float64 ~1e-14.
INSIDE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


@dataclass
class Check:
    device: str
    dtype: str
    max_abs: float  # NaN where a value is not finite on one side only: never equal to anything
    max_rel: float
    tolerance: float
    passed: bool
    nodes: int | None = None  # inside checks: how many nodes were compared
    worst: str | None = None  # inside checks: the node with the largest error

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("max_abs", "max_rel"):  # JSON has no NaN: null, with the check failed
            out[k] = out[k] if math.isfinite(out[k]) else None
        return out


@dataclass
class Report:
    """``checks``: teacher vs student outputs (IR); ``inside``: the activation invariant at every node of the
    graph (IR, the real proof: outputs alone are vacuous for a student that ignores its input); ``extraction``:
    extracted student vs the teacher's student view (CBR). With ``trained`` the IR checks are for information:
    a trained teacher has left the student on purpose, and the extraction check alone decides."""

    checks: list[Check]
    extraction: list[Check] = field(default_factory=list)
    trained: bool = False
    divergence: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    inside: list[Check] = field(default_factory=list)
    constant_output: bool = False  # the student's output does not depend on its input

    @property
    def ir_passed(self) -> bool:
        return all(c.passed for c in self.checks + self.inside)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.extraction) and (self.trained or self.ir_passed)

    @property
    def decided_by(self) -> str:
        return "extraction" if self.trained else "all"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "ir_passed": self.ir_passed, "trained": self.trained,
                "decided_by": self.decided_by, "constant_output": self.constant_output,
                "checks": [c.to_dict() for c in self.checks], "inside": [c.to_dict() for c in self.inside],
                "extraction": [c.to_dict() for c in self.extraction],
                "divergence": self.divergence, "timings": self.timings}


def devices(choice: str | None) -> list[str]:
    if choice is None:
        return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    if choice not in ("cpu", "cuda"):
        raise GPDError(f"--device must be cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise GPDError("--device cuda asked for, but no CUDA device is available")
    return [choice]


def rebuild(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], input_shape: Any,
            rules: Registry | None = None) -> tuple[Student, Maps, fx.GraphModule]:
    """Trace the student again (with the ``rules`` it was expanded with), check that it is the architecture
    the plan was made from, build the teacher."""
    student, maps = replan(model, plan, input_shape, rules=rules)
    return student, maps, build_teacher(student, maps, tensors, plan.branches)


def replan(model: nn.Module, plan: Plan, input_shape: Any, memory_factor: int = 2,
           rules: Registry | None = None) -> tuple[Student, Maps]:
    """The traced student and its maps, checked against the plan; memory for ``memory_factor`` teachers (in
    the model's dtype) checked from sizes before any map is built. ``input_shape``: a shape or input specs;
    the student is captured as the plan records (fx or torch.export)."""
    student = prepare(model, input_shape, None, rules, capture=plan.capture)
    check_teacher_memory(student.analysis, model, plan.ratio, None, memory_factor)
    again, maps = make_plan(student, model, plan.ratio, plan.seed, plan.equal_shares, plan.source)
    mine, theirs = _structure(again), _structure(plan)
    if mine != theirs:
        raise GPDError(f"the teacher was not made from this model ({_first_difference(mine, theirs)})")
    return student, maps


def _structure(plan: Plan) -> dict[str, Any]:
    obj = json.loads(plan.to_json())
    return {"spaces": obj["spaces"], "tensors": obj["tensors"]}


def _first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    a = {t["key"]: t for t in mine["tensors"]}
    b = {t["key"]: t for t in theirs["tensors"]}
    for k in a:
        if k not in b:
            return f"the model has {k}, the teacher does not"
    for k in b:
        if k not in a:
            return f"the teacher has {k}, the model does not"
    for k in a:
        if a[k] != b[k]:
            return f"{k} is {a[k]['shape']} widened as {a[k]['dims']} in the model, {b[k]['shape']} as {b[k]['dims']} in the teacher"
    return "the channel spaces differ"


def compare(student: nn.Module, teacher: nn.Module, inputs: Iterable[Any], device: str,
            dtype: torch.dtype, *, in_place: bool = False, specs: Inputs | None = None) -> Check:
    """Outputs of copies of ``student`` and ``teacher`` in ``dtype`` on ``device`` (the modules are left as they
    are), or with ``in_place`` of the modules themselves, moved there (no copy: for models of gigabytes).
    ``inputs``: tensors, or tuples of tensors for a model of several inputs (``specs`` says how the model
    takes them; captured graphs take them in order)."""
    place = (lambda m: m) if in_place else copy.deepcopy
    s = place(student).to(device=device, dtype=dtype).eval()
    t = place(teacher).to(device=device, dtype=dtype).eval()
    return _compare_placed(s, t, inputs, device, dtype, specs=specs)


def difference(ref: torch.Tensor, got: torch.Tensor, finite: torch.Tensor | None = None) -> float:
    """Largest ``|got - ref|``, or NaN where ``got`` is not finite although ``finite`` (default: ``ref``'s
    own finiteness) says the value should be: a NaN never compares equal, and never hides in a max."""
    if finite is None:
        fast = float(torch.linalg.vector_norm(got - ref, ord=math.inf)) if got.numel() else 0.0
        if math.isfinite(fast):  # then neither side holds a NaN or an inf: the common case, in two passes
            return fast
        finite = torch.isfinite(ref)
    ok = torch.isfinite(got)
    if bool((finite & ~ok).any()) or bool((~finite & ok & ~torch.isfinite(ref)).any()):
        return math.nan
    both = finite & ok & torch.isfinite(ref)
    if not bool(both.any()):
        return 0.0
    return float((got - ref).abs()[both].max())


def _worse(a: float, b: float) -> float:
    """``max`` that keeps a NaN (Python's ``max(x, nan)`` is ``x``)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _scale(t: torch.Tensor) -> float:
    """The largest finite magnitude in ``t``."""
    if not t.numel():
        return 0.0
    top = float(torch.linalg.vector_norm(t.double() if not t.is_floating_point() else t, ord=math.inf))
    if math.isfinite(top):
        return top
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _check(device: str, dtype: torch.dtype, max_abs: float, scale: float, tol: float, **extra: Any) -> Check:
    rel = max_abs / scale if scale > 0 else (max_abs if max_abs != 0 else 0.0)
    return Check(device, str(dtype).replace("torch.", ""), max_abs, rel, tol, bool(rel <= tol), **extra)


Example = tuple[torch.Tensor, ...]  # one value of every input, in the captured graph's order
Outputs = Callable[[int, Example], list[torch.Tensor]]  # (input index, example) -> output tensors


def placed_example(x: Any, device: str, dtype: torch.dtype) -> Example:
    """An example (a tensor or a tuple of them) on ``device``, its float inputs in ``dtype`` (token ids stay)."""
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in xs)


def run_model(m: nn.Module, xs: Example, specs: Inputs | None = None) -> Any:
    """``m`` on an example: a captured graph (or a view of one) takes its inputs in order; the model itself
    takes its keyword inputs by name."""
    if specs is None or isinstance(m, (fx.GraphModule, StudentView)) or not any(s.name for s in specs):
        return m(*xs)
    return call(m, specs, xs)


def _compare_placed(a: nn.Module | Outputs, b: nn.Module | Outputs, inputs: Iterable[Any], device: str,
                    dtype: torch.dtype, reference: list[list[torch.Tensor]] | None = None,
                    specs: Inputs | None = None) -> Check:
    """Relative to ``a``'s largest output, the largest difference of ``b``'s outputs: modules already placed,
    or functions giving the outputs of input ``i`` (outputs computed already). ``reference``: per input, the
    student's own outputs; a value that is finite there must be finite in both (two NaN students are not
    "equal")."""
    fa, fb = (_astensors_in(m, specs) for m in (a, b))
    max_abs, scale = 0.0, 0.0
    broken = Check(device, str(dtype).replace("torch.", ""), math.nan, math.nan, TOLERANCE[dtype], False)
    with torch.no_grad(), _no_tf32():
        for i, x in enumerate(inputs):
            x = placed_example(x, device, dtype)
            ref = reference[i] if reference is not None else None
            ya_all, yb_all = fa(i, x), fb(i, x)
            if len(ya_all) != len(yb_all):
                return broken
            for j, (ya, yb) in enumerate(zip(ya_all, yb_all)):
                if ya.shape != yb.shape:
                    return broken
                if not ya.is_floating_point():
                    ya, yb = ya.double(), yb.double()
                finite = torch.isfinite(ref[j].to(ya.device)) if ref is not None and ref[j].shape == ya.shape else None
                if finite is not None and ref[j] is not ya:
                    max_abs = _worse(max_abs, difference(ya, ya, finite))  # ``a`` itself broken
                max_abs = _worse(max_abs, difference(ya, yb, finite))
                scale = max(scale, _scale(ya))
    return _check(device, dtype, max_abs, scale, TOLERANCE[dtype])


def _astensors_in(m: nn.Module | Outputs, specs: Inputs | None = None) -> Outputs:
    if isinstance(m, nn.Module):
        return lambda i, x: tensors_in(run_model(m, x, specs))
    return m


class _no_tf32:
    """TF32 would round matmuls to 10 bits of mantissa on CUDA and hide real differences."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _activations(gm: fx.GraphModule) -> set[str]:
    """Nodes whose value depends on the graph's input: the activations. A value computed from parameters
    alone (a weight reshaped in the graph) holds shares of the student's, by design."""
    out: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a.name in out for a in n.all_input_nodes):
            out.add(n.name)
    return out


class _Record(fx.Interpreter):
    """Runs the student graph, keeping the activations that the analysis describes, and every node's scale."""

    def __init__(self, gm: fx.GraphModule, dims: dict[str, Any], changed: set[str] = frozenset()) -> None:
        super().__init__(gm)
        self.keep = {n for n in _activations(gm) if isinstance(dims.get(n), list)}
        self.changed = {n.name for n in gm.graph.nodes if any(_in_place(u, gm) for u in n.users)} | set(changed)
        self.values: dict[str, torch.Tensor] = {}
        self.scales: dict[str, float] = {}
        self.mutated: set[str] = set()  # recorded values that a later node wrote into (their version moved)
        self.versions: dict[str, int] = {}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        # Written through an alias after it was recorded: nn.Identity's output (the same tensor) or a view, fed
        # to ReLU(inplace=True), moves the version of the value recorded before it.
        self.mutated.update(k for k, v in self.versions.items() if self.values[k]._version != v)
        return out

    def run_node(self, n: fx.Node) -> Any:
        held = [(a.name, self.values[a.name]) for a in n.all_input_nodes
                if a.name in self.values and a.name not in self.changed]
        versions = [t._version for _, t in held]
        out = super().run_node(n)
        self.mutated.update(name for (name, t), v in zip(held, versions) if t._version != v)
        if n.name in self.keep and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.values[n.name] = out.clone() if n.name in self.changed else out
            if n.name not in self.changed:
                self.versions[n.name] = out._version
            self.scales[n.name] = _scale(out)
        return out


def _in_place(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``n`` may write into its input (ReLU(inplace=True), x.add_(y)): then the value recorded before
    it must be a copy. A miss would make a correct teacher fail, never a wrong one pass."""
    if n.op == "call_module":
        return bool(getattr(gm.get_submodule(str(n.target)), "inplace", False))
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return bool(n.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__"))


class _Inside(fx.Interpreter):
    """Runs the teacher graph and checks every node that the student recorded against its copies there."""

    def __init__(self, gm: fx.GraphModule, student: Student, maps: Maps, record: _Record, tol: float) -> None:
        super().__init__(gm)
        self.student, self.maps, self.record, self.tol = student, maps, record, tol
        self.nodes, self.max_abs, self.max_rel, self.worst = 0, 0.0, 0.0, None
        self.first: dict[str, Any] | None = None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        # An op run at the student's width (fallback.py) holds the student's value in the node copying it out.
        name = n.meta.get(STUDENT_NAME, n.name)
        vs = self.record.values.pop(name, None) if name is not None else None
        if vs is not None:
            self._check(n, vs, out, name)
        return out

    def _check(self, n: fx.Node, vs: torch.Tensor, vt: Any, name: str) -> None:
        expected = vs
        for d, lay in enumerate(self.student.analysis.dims[name]):
            src = self.maps.src(lay, vs.device)
            if src is not None:
                expected = expected.index_select(d, src)
        where = {"node": name, "op": describe(_student_node(self.student, name), self.student.gm)}
        self.nodes += 1
        if not isinstance(vt, torch.Tensor) or vt.shape != expected.shape:
            self._fail(where, math.nan, {"error": "shape", "detail": f"teacher {tuple(getattr(vt, 'shape', ()))}, "
                                                                     f"expected {tuple(expected.shape)}"})
            return
        inputs = [self.record.scales.get(a.name, 0.0) for a in _student_node(self.student, name).all_input_nodes]
        scale = max([self.record.scales[name], *inputs])
        err = difference(expected, vt.to(expected.dtype))
        rel = err / scale if scale > 0 else err
        if not math.isnan(self.max_rel) and (math.isnan(rel) or rel > self.max_rel):
            self.max_rel, self.max_abs, self.worst = rel, err, name
        if not rel <= self.tol:
            self._fail(where, rel, {"error": "value" if math.isfinite(err) else "nonfinite", "max_rel": rel})

    def _fail(self, where: dict[str, Any], rel: float, detail: dict[str, Any]) -> None:
        if math.isnan(rel) and not math.isnan(self.max_rel):
            self.max_rel = self.max_abs = math.nan
            self.worst = where["node"]
        if self.first is None:
            self.first = {**where, **detail}


def _student_node(student: Student, name: str) -> fx.Node:
    nodes = getattr(student, "_by_name", None)
    if nodes is None:
        nodes = {n.name: n for n in student.gm.graph.nodes}
        student._by_name = nodes  # type: ignore[attr-defined]
    return nodes[name]


def compare_inside(student: Student, maps: Maps, student_gm: fx.GraphModule, teacher: fx.GraphModule,
                   x: Any, device: str, dtype: torch.dtype
                   ) -> tuple[Check, dict[str, Any] | None, list[torch.Tensor], list[torch.Tensor]]:
    """The activation invariant at every node: each copy of a student channel in the teacher holds the
    student's activation. ``student_gm`` and ``teacher`` are placed in ``dtype`` on ``device``. Returns the
    check, the first node (in graph order) where it fails, and the student's and the teacher's outputs (so
    that the output check need not run either again on this input)."""
    tol = INSIDE_TOLERANCE[dtype]
    with torch.no_grad(), _no_tf32():
        xs = placed_example(x, device, dtype)
        record = _Record(student_gm, student.analysis.dims)
        student_out = tensors_in(record.run(*xs))
        if record.mutated:  # a function that writes into its input (mvit's _add_rel_pos): record copies again
            record = _Record(student_gm, student.analysis.dims, record.mutated)
            student_out = tensors_in(record.run(*xs))
        inside = _Inside(teacher, student, maps, record, tol)
        teacher_out = tensors_in(inside.run(*xs))
        record.values.clear()
    check = Check(device, str(dtype).replace("torch.", ""), inside.max_abs, inside.max_rel, tol,
                  inside.first is None, nodes=inside.nodes, worst=inside.worst)
    return check, inside.first, student_out, teacher_out


class _Cast(Mapping[str, torch.Tensor]):
    """The teacher file's tensors in ``dtype`` on ``device``, taken from the placed teacher module where it has
    them (no second teacher-sized copy), cast one by one from the file otherwise (the student's buffers)."""

    def __init__(self, placed: nn.Module, tensors: Mapping[str, torch.Tensor], device: str, dtype: torch.dtype):
        self.placed = dict(placed.state_dict(keep_vars=True))
        self.tensors, self.device, self.dtype = tensors, device, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.placed.get(key)
        if t is None:
            t = self.tensors[key]
            t = t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
        return t.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def extraction_check(model: nn.Module, plan: Plan, tensors: Mapping[str, torch.Tensor], teacher: nn.Module,
                     student: Student, inputs: list[Any], device: str, dtype: torch.dtype,
                     reference: list[list[torch.Tensor]] | None = None) -> Check:
    """The student that `gpd extract` writes, loaded into ``model``, against the teacher's student view;
    both collapsed in ``dtype`` so that the comparison measures the two paths, not a rounding. ``teacher``
    must already be in ``dtype`` on ``device``: it is shared by the view, not copied. ``reference``: the
    original student's outputs, where a finite value must stay finite in both."""
    from .collapsing import collapse
    from .student_view import StudentView

    with torch.no_grad():
        state = collapse(plan, _Cast(teacher, tensors, device, dtype))
    extracted = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    extracted.load_state_dict(state, strict=True)
    del state
    view = StudentView(teacher, plan, student.gm).to(device=device, dtype=dtype).eval()
    view.load_student_buffers(tensors)
    return _compare_placed(extracted, view, inputs, device, dtype, reference, specs=student.inputs)


def _placed(model: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def _runtensors_in(model: nn.Module, inputs: list[Any], device: str, dtype: torch.dtype,
                   specs: Inputs | None = None) -> list[list[torch.Tensor]]:
    with torch.no_grad(), _no_tf32():
        return [tensors_in(run_model(model, placed_example(x, device, dtype), specs)) for x in inputs]


def is_constant(outputs: list[list[torch.Tensor]]) -> bool:
    """Whether the outputs for different inputs are all the same (a zero head, a constant model)."""
    return len(outputs) > 1 and all(len(o) == len(outputs[0]) and all(a.shape == b.shape and torch.equal(a, b)
                                                                     for a, b in zip(o, outputs[0]))
                                    for o in outputs[1:])


def verify(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], input_shape: Any = None,
           device: str | None = None, n_inputs: int = 3, seed: int = 0, trained: bool = False,
           progress: Callable[[str], None] | None = None, rules: Registry | None = None) -> Report:
    """Compare the student ``model`` with the teacher rebuilt from ``plan`` and ``tensors`` (IR): outputs, and
    the activation invariant at every node; and the extracted student with the teacher's student view (CBR).
    ``progress`` is called with a short label before each step; ``rules``: those the teacher was expanded
    with."""
    import time

    step = progress or (lambda label: None)
    given = plan.inputs(input_shape)
    t0 = time.perf_counter()
    step("tracing the student")
    # Memory for the float32 and float64 teachers, built one at a time.
    student, maps = replan(model, plan, given, memory_factor=3, rules=rules)
    # The comparison inside keeps every student activation (float64) while the teacher, up to ``ratio`` times
    # wider, runs: refused before it starts when a shape (the plan's, or --input-shape) makes that too much.
    need = forward_bytes(student.gm, student.inputs, torch.float64, total=True) * (1 + plan.ratio)
    check_memory(need, None, f"verifying at input {describe_inputs(student.inputs)}", "use a smaller --input-shape")
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    inputs = [tuple(make(student.inputs, torch.float64, g)) for _ in range(n_inputs)]
    checks, inside, extraction = [], [], []
    firsts: list[tuple[bool, dict[str, Any]]] = []
    constant = False
    for dev in devices(device):
        for dt in (torch.float32, torch.float64):
            name = f"{dev} {str(dt).replace('torch.', '')}"
            step(f"building the teacher ({name})")
            # One teacher in this dtype at a time, made from the file's tensors (a float64 teacher of a
            # 300M-parameter model is 2.4 GB): never a copy of another teacher.
            placed = build_teacher(student, maps, tensors, plan.branches).to(device=dev, dtype=dt).eval()
            # The comparison inside runs student and teacher on the first input and gives their outputs too; the
            # original model runs on the others (the extraction check runs it on every input).
            known: dict[int, list[torch.Tensor]] = {}
            reference: list[list[torch.Tensor]] = []
            if not trained:
                step(f"teacher = student inside ({name})")
                check, first, s_out, known[0] = compare_inside(student, maps, _placed(student.gm, dev, dt), placed,
                                                               inputs[0], dev, dt)
                reference.append(s_out)
                inside.append(check)
                if first is not None:
                    firsts.append((dt == torch.float64 and dev == "cpu", {**first, "device": dev, "dtype": check.dtype}))
            step(f"teacher = student ({name})")
            if len(reference) < len(inputs):
                reference += _runtensors_in(_placed(model, dev, dt), inputs[len(reference):], dev, dt,
                                            student.inputs)
            constant = constant or (dt == torch.float64 and is_constant(reference))
            teacher_out: Outputs = lambda i, x, t=placed: known.pop(i) if i in known else tensors_in(t(*x))  # noqa: B023
            checks.append(_compare_placed(lambda i, x: reference[i], teacher_out, inputs, dev, dt, reference))
            step(f"extracted = student view ({name})")
            extraction.append(extraction_check(model, plan, tensors, placed, student, inputs, dev, dt, reference))
            del placed
    report = Report(checks, extraction, trained, inside=inside, constant_output=constant)
    if firsts:  # the float64 CPU run names the node most reliably
        report.divergence = max(firsts, key=lambda f: f[0])[1]
    report.timings = {"rebuild_s": t1 - t0, "compare_s": time.perf_counter() - t1}
    return report
