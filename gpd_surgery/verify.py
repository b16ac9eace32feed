"""Numerical equivalence of a teacher and its student, and where they part when they do."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .analyse import describe
from .errors import GPDError
from .expand import Student, build_teacher, make_plan, prepare
from .maps import Maps
from .plan import Plan

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass
class Check:
    device: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool


@dataclass
class Report:
    """``checks``: teacher vs student (IR); ``extraction``: extracted student vs the teacher's student view.
    With ``trained`` the IR checks are for information: a trained teacher has left the student on purpose."""

    checks: list[Check]
    extraction: list[Check] = field(default_factory=list)
    trained: bool = False
    divergence: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ir_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.extraction) and (self.trained or self.ir_passed)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "ir_passed": self.ir_passed, "trained": self.trained,
                "checks": [asdict(c) for c in self.checks], "extraction": [asdict(c) for c in self.extraction],
                "divergence": self.divergence, "timings": self.timings}


def devices(choice: str | None) -> list[str]:
    if choice is None:
        return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    if choice not in ("cpu", "cuda"):
        raise GPDError(f"--device must be cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise GPDError("--device cuda asked for, but no CUDA device is available")
    return [choice]


def rebuild(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], input_shape: tuple[int, ...]
            ) -> tuple[Student, Maps, fx.GraphModule]:
    """Trace the student again and check that it is the architecture the plan was made from."""
    student = prepare(model, input_shape)
    again, maps = make_plan(student, model, plan.ratio, plan.seed, plan.equal_shares, plan.source)
    mine, theirs = _structure(again), _structure(plan)
    if mine != theirs:
        raise GPDError(f"the teacher was not made from this model ({_first_difference(mine, theirs)})")
    return student, maps, build_teacher(student, maps, tensors, plan.branches)


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


def _outputs(y: Any) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _outputs(v)]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _outputs(v)]
    return []


def compare(student: nn.Module, teacher: nn.Module, inputs: Iterable[torch.Tensor], device: str,
            dtype: torch.dtype) -> Check:
    """Outputs of copies of ``student`` and ``teacher`` in ``dtype`` on ``device`` (the modules are left as they are)."""
    s = copy.deepcopy(student).to(device=device, dtype=dtype).eval()
    t = copy.deepcopy(teacher).to(device=device, dtype=dtype).eval()
    return _compare_placed(s, t, inputs, device, dtype)


def _compare_placed(a: nn.Module, b: nn.Module, inputs: Iterable[torch.Tensor], device: str,
                    dtype: torch.dtype) -> Check:
    """Relative to ``a``'s largest output, the largest difference of ``b``'s outputs: modules already placed."""
    max_abs, scale = 0.0, 0.0
    with torch.no_grad(), _no_tf32():
        for x in inputs:
            x = x.to(device=device, dtype=dtype)
            for ya, yb in zip(_outputs(a(x)), _outputs(b(x)), strict=True):
                max_abs = max(max_abs, (ya - yb).abs().max().item())
                scale = max(scale, ya.abs().max().item())
    rel = max_abs / scale if scale > 0 else max_abs
    tol = TOLERANCE[dtype]
    ok = rel <= tol and rel == rel
    return Check(device, str(dtype).replace("torch.", ""), max_abs, rel, tol, ok)


class _no_tf32:
    """TF32 would round matmuls to 10 bits of mantissa on CUDA and hide real differences."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: list[tuple[fx.Node, Any]] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values.append((n, out))
        return out


def localize(student: Student, maps: Maps, teacher: fx.GraphModule, x: torch.Tensor,
             tol: float = TOLERANCE[torch.float64]) -> dict[str, Any] | None:
    """The first node whose teacher activation is not the student's, copied through the maps (float64, CPU)."""
    s_gm = copy.deepcopy(student.gm).double().eval()
    t_gm = copy.deepcopy(teacher).double().eval()
    rs, rt = _Recorder(s_gm), _Recorder(t_gm)
    with torch.no_grad():
        rs.run(x.double().cpu())
        rt.run(x.double().cpu())
    for (ns, vs), (nt, vt) in zip(rs.values, rt.values):
        dims = student.analysis.dims.get(ns.name)
        if ns.op == "get_attr":  # a parameter: its copies hold shares of the student's value by design
            continue
        if not isinstance(vs, torch.Tensor) or not isinstance(dims, list) or not vs.is_floating_point():
            continue
        expected = vs
        for d, lay in enumerate(dims):
            src = maps.src(lay)
            if src is not None:
                expected = expected.index_select(d, src)
        where = {"node": ns.name, "op": describe(ns, student.gm)}
        if not isinstance(vt, torch.Tensor) or vt.shape != expected.shape:
            return {**where, "error": "shape", "detail": f"teacher {tuple(getattr(vt, 'shape', ()))}, "
                                                           f"expected {tuple(expected.shape)}"}
        scale = vs.abs().max().item() or 1.0
        rel = (vt - expected).abs().max().item() / scale
        if not rel <= tol:
            return {**where, "error": "value", "max_rel": rel}
    return None


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
                     student: Student, inputs: list[torch.Tensor], device: str, dtype: torch.dtype) -> Check:
    """The student that `gpd extract` writes, loaded into ``model``, against the teacher's student view;
    both collapsed in ``dtype`` so that the comparison measures the two paths, not a rounding. ``teacher``
    must already be in ``dtype`` on ``device``: it is shared by the view, not copied."""
    from .collapse import collapse
    from .student_view import StudentView

    with torch.no_grad():
        state = collapse(plan, _Cast(teacher, tensors, device, dtype))
    extracted = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    extracted.load_state_dict(state, strict=True)
    del state
    view = StudentView(teacher, plan, student.gm).to(device=device, dtype=dtype).eval()
    view.load_student_buffers(tensors)
    return _compare_placed(extracted, view, inputs, device, dtype)


def _placed(model: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def verify(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], input_shape: tuple[int, ...] | None = None,
           device: str | None = None, n_inputs: int = 3, seed: int = 0, trained: bool = False) -> Report:
    """Compare the student ``model`` with the teacher rebuilt from ``plan`` and ``tensors`` (IR), and the
    extracted student with the teacher's student view (CBR)."""
    import time

    shape = tuple(input_shape or plan.source.get("input_shape") or ())
    if not shape:
        raise GPDError("the plan records no input shape: pass --input-shape")
    t0 = time.perf_counter()
    student, maps, teacher = rebuild(model, plan, tensors, shape)
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_inputs)]
    checks, extraction = [], []
    for dev in devices(device):
        for dt in (torch.float32, torch.float64):
            # One teacher in this dtype at a time, made from the file's tensors (a float64 teacher of a
            # 300M-parameter model is 2.4 GB): never a copy of another teacher.
            placed = build_teacher(student, maps, tensors, plan.branches).to(device=dev, dtype=dt).eval()
            checks.append(_compare_placed(_placed(model, dev, dt), placed, inputs, dev, dt))
            extraction.append(extraction_check(model, plan, tensors, placed, student, inputs, dev, dt))
            del placed
    report = Report(checks, extraction, trained)
    if not report.ir_passed and not trained:
        failed = next(c for c in checks if not c.passed)
        tol = TOLERANCE[torch.float64] if failed.dtype == "float64" else 1e-6
        report.divergence = localize(student, maps, teacher, inputs[0], tol)
    report.timings = {"rebuild_s": t1 - t0, "compare_s": time.perf_counter() - t1}
    return report
