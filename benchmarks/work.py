"""One measurement in a fresh process: ``python benchmarks/work.py CASE '{"json": "args"}'``.

Prints one JSON line (prefixed ``RESULT``) with the wall-clock phases in seconds and the peak resident
memory of the measured work: ``VmHWM`` at the end minus ``VmRSS`` once the libraries are imported (the
peak is reset there through ``/proc/self/clear_refs``), so that every case, tool or floor, is charged the
memory of its own work and nothing of the interpreter. Every case imports the same libraries.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torchvision  # noqa: F401  (imported by every case, so that all baselines are alike)
from safetensors.torch import load_file, save_file

import gpd_surgery.api as api
import gpd_surgery.expansion as gexpand
import gpd_surgery.verification as gverify
from gpd_surgery.io import atomic_save, load_teacher_file, load_weights
from gpd_surgery.memory import check_memory
from gpd_surgery.plan import STUDENT_PREFIX
from gpd_surgery.trace import load_model

MIB = 1024 * 1024


# -- memory -------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak RSS of what runs after construction, above the RSS at construction."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.base = _status_kib("VmRSS")

    def mib(self) -> float:
        return (_status_kib("VmHWM") - self.base) / 1024


class Clock:
    """Wall-clock seconds per phase; a phase entered inside another is charged to the outer one only."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.depth = 0

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def _wrap(module: Any, name: str, clock: Clock, phase: str) -> None:
    """Charge every call of ``module.name`` to ``phase`` (the function looked up at call time is the timed one)."""
    fn: Callable[..., Any] = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with clock(phase):
            return fn(*args, **kwargs)

    setattr(module, name, timed)


def _time_fsync() -> Clock:
    """Time every fsync of this process (gpd's saves with ``durable``; safetensors' save_file has none)."""
    clock = Clock()
    _wrap(os, "fsync", clock, "fsync")
    return clock


def _unlink(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


# -- cases --------------------------------------------------------------------------------------------
def prep(a: dict[str, Any]) -> dict[str, Any]:
    """Fixtures for one model: the student's weights, the shapes of its teacher, and a teacher file."""
    model = load_model(a["spec"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a["student"])
    planned = api.plan_expansion(model, tuple(a["shape"]), a["ratio"],
                                 source={"model": a["spec"], "model_args": {}, "weights": "student.safetensors"})
    shapes = {"teacher": {k: list(s) for k, (s, _) in planned.plan.file_tensors().items()},
              "student": {k: list(v.shape) for k, v in model.state_dict().items()}}
    with open(a["shapes"], "w") as f:
        json.dump(shapes, f)
    result = planned.build()
    _unlink(a["teacher"])
    result.save(a["teacher"])
    return {"summary": {k: v for k, v in result.summary().items() if isinstance(v, (int, float))}}


def expand(a: dict[str, Any]) -> dict[str, Any]:
    """What `gpd expand SPEC --weights W --ratio R -o OUT` does after parsing its options."""
    _unlink(a["out"])
    peak, clock, fsync = Peak(), Clock(), _time_fsync()
    with clock("model"):  # the user's model code: random init of the architecture (reported apart)
        model = load_model(a["spec"])
    t0 = time.perf_counter()
    with clock("load"):
        load_weights(model, a["student"])
    with clock("plan"):
        source = {"model": a["spec"], "model_args": {}, "weights": os.path.basename(a["student"])}
        planned = api.plan_expansion(model, tuple(a["shape"]), a["ratio"], source=source)
        check_memory(planned.build_bytes(), False)
    with clock("build"):
        result = planned.build()
    with clock("save"):
        result.save(a["out"], durable=a.get("durable", False))
    total = time.perf_counter() - t0
    return {"seconds": total, "phases": {**clock.phases, **fsync.phases}, "peak_mib": peak.mib(),
            "peak_reset": peak.reset}


def _floor_tensor(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    reps = [-(-n // m) for n, m in zip(shape, t.shape)]
    out = t.repeat(reps)
    if list(out.shape) != shape:
        out = out[tuple(slice(0, n) for n in shape)].contiguous()
    return out


def _floor(a: dict[str, Any], shapes_of: str, source: str, phase: str,
           make: Callable[[dict[str, torch.Tensor], dict[str, list[int]]], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A floor: ``load_file`` of ``a[source]``, ``make`` the output tensors (shapes of ``shapes_of``), ``save_file``."""
    _unlink(a["out"])
    with open(a["shapes"]) as f:
        shapes = json.load(f)[shapes_of]
    peak, clock = Peak(), Clock()
    t0 = time.perf_counter()
    with clock("load"):
        tensors = load_file(a[source])
    with clock(phase):
        out = make(tensors, shapes)
    with clock("save"):
        save_file(out, a["out"])
    total = time.perf_counter() - t0
    return {"seconds": total, "phases": clock.phases, "peak_mib": peak.mib(), "peak_reset": peak.reset}


def expand_floor(a: dict[str, Any]) -> dict[str, Any]:
    """Load the student's weights, make the teacher's tensors (same names, shapes, bytes) with ``repeat``, save."""
    return _floor(a, "teacher", "student", "build", lambda state, shapes: {
        k: _floor_tensor(state[k.removeprefix(STUDENT_PREFIX)], s) for k, s in shapes.items()})


def extract(a: dict[str, Any]) -> dict[str, Any]:
    """What `gpd extract TEACHER -o OUT` does: ``api.extract`` then an atomic save."""
    _unlink(a["out"])
    peak, clock, fsync = Peak(), Clock(), _time_fsync()
    _wrap(api, "load_teacher_file", clock, "load")
    t0 = time.perf_counter()
    state = api.extract(a["teacher"])
    with clock("save"):
        atomic_save(state, a["out"], durable=a.get("durable", False))
    total = time.perf_counter() - t0
    clock.phases["collapse"] = total - clock.phases["load"] - clock.phases["save"]  # with .contiguous()
    return {"seconds": total, "phases": {**clock.phases, **fsync.phases}, "peak_mib": peak.mib(),
            "peak_reset": peak.reset}


def extract_floor(a: dict[str, Any]) -> dict[str, Any]:
    """Load the teacher file, cut a student-sized tensor out of each, save them."""
    return _floor(a, "student", "teacher", "collapse", lambda teacher, shapes: {
        k: teacher.get(STUDENT_PREFIX + k, teacher[k])[tuple(slice(0, n) for n in s)].contiguous()
        for k, s in shapes.items()})


def verify(a: dict[str, Any]) -> dict[str, Any]:
    """`gpd verify SPEC TEACHER --weights W --device cpu`, with its time split by the functions it calls."""
    model = load_model(a["spec"])
    load_weights(model, a["student"])
    peak, clock = Peak(), Clock()
    for module, name, phase in [(gexpand, "trace", "trace"), (gexpand, "propagate", "propagate"),
                                (gexpand, "analyse", "analyse"), (gverify, "make_plan", "plan"),
                                (gverify, "build_teacher", "teacher"), (gverify, "_run_outputs", "student_forward"),
                                (gverify, "compare_inside", "inside"), (gverify, "_compare_placed", "forward_ir"),
                                (gverify, "extraction_check", "extraction")]:
        _wrap(module, name, clock, phase)
    t0 = time.perf_counter()
    with clock("load"):
        plan, tensors = load_teacher_file(a["teacher"])
    report = gverify.verify(model, plan, tensors, None, "cpu", a["inputs"])
    total = time.perf_counter() - t0
    named = sum(clock.phases.values())
    clock.phases["other"] = total - named  # plan comparison, inputs, report
    if not report.passed:
        raise SystemExit(f"verify failed: {report.to_dict()}")
    return {"seconds": total, "phases": clock.phases, "peak_mib": peak.mib(), "peak_reset": peak.reset,
            "max_rel": max(c.max_rel for c in report.checks)}


def train(a: dict[str, Any]) -> dict[str, Any]:
    """Training steps, interleaved: the GPD step (teacher and student view over shared parameters, one loss,
    one backward, one optimizer) against the teacher and a plain student as separate modules. ``amp``: ``bf16``
    or ``fp16`` runs every forward of both kinds under autocast (gpd train --amp); parameters stay float32."""
    import contextlib
    import copy
    import statistics

    import torch.nn.functional as F

    from gpd_surgery.training import GPDLoss, GPDModel, TrainConfig, make_optimizer

    torch.manual_seed(0)
    if a["arch"] == "resnet18":
        student = torchvision.models.resnet18(num_classes=a["classes"])
    else:
        student = torchvision.models.VisionTransformer(
            image_size=a["image"], patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
            num_classes=a["classes"])
    student.eval()
    shape = (1, 3, a["image"], a["image"])
    planned = api.plan_expansion(student, shape, a["ratio"])
    config = TrainConfig()
    loss_fn = GPDLoss(config)

    gpd = GPDModel.from_expanded(planned.build()).train()
    gpd_opt = make_optimizer(gpd, config)

    class Separate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = planned.build().teacher().train()
            self.student = copy.deepcopy(student).train()

    sep = Separate()
    sep_opt = make_optimizer(sep, config)
    amp = a.get("amp", "off")

    def cast() -> Any:
        if amp == "off":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    g = torch.Generator().manual_seed(1)
    x = torch.randn((a["batch"],) + shape[1:], generator=g)
    y = torch.randint(0, a["classes"], (a["batch"],), generator=g)

    def gpd_step() -> None:
        gpd_opt.zero_grad(set_to_none=True)
        with cast():
            t, s = gpd(x)
        loss, _ = loss_fn(t, s, y)
        loss.backward()
        gpd_opt.step()

    def separate_step() -> None:
        sep_opt.zero_grad(set_to_none=True)
        with cast():
            t = sep.teacher(x)
            s = sep.student(x)
        loss, _ = loss_fn(t, s, y)  # the same terms: teacher CE, student CE + lambda KL(s, t.detach())
        loss.backward()
        sep_opt.step()

    params = dict(gpd.teacher.named_parameters())

    def collapse_only() -> None:  # the view's extra work: collapse forward and backward, nothing else
        folded = gpd.view.student_parameters()
        sum(v.sum() for v in folded.values()).backward()
        for p in params.values():
            p.grad = None

    def teacher_step() -> None:
        sep_opt.zero_grad(set_to_none=True)
        with cast():
            out = sep.teacher(x)
        F.cross_entropy(out.float(), y).backward()

    def student_step() -> None:
        sep_opt.zero_grad(set_to_none=True)
        with cast():
            out = sep.student(x)
        F.cross_entropy(out.float(), y).backward()

    steps = {"gpd": gpd_step, "separate": separate_step, "collapse": collapse_only,
             "teacher_fwd_bwd": teacher_step, "student_fwd_bwd": student_step}
    order = [k for k in steps if k in a.get("kinds", list(steps))]
    times: dict[str, list[float]] = {k: [] for k in order}
    for i in range(a["warmup"] + a["reps"]):
        for name in (order if i % 2 == 0 else order[::-1]):  # alternate the order: drift hits both alike
            t0 = time.perf_counter()
            steps[name]()
            if i >= a["warmup"]:
                times[name].append(time.perf_counter() - t0)
    pairs = [gt / st for gt, st in zip(times["gpd"], times["separate"])]
    summary = {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in gpd.parameters()),
        "paired_ratio_median": statistics.median(pairs),
    }
    return {"times": times, "summary": summary, "threads": torch.get_num_threads()}


CASES = {f.__name__: f for f in (prep, expand, expand_floor, extract, extract_floor, verify, train)}

if __name__ == "__main__":
    case, args = sys.argv[1], json.loads(sys.argv[2])
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    out = CASES[case](args)
    print("RESULT " + json.dumps(out), flush=True)
