"""`gpd verify`: is the teacher the student? Outputs, every node inside, and the extracted student."""
from __future__ import annotations

import os
import time
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import GPDError
from ..progress import steps
from . import common
from .common import (DEBUG_OPT, emit, JSON_OPT, MODEL_HELP, REMOTE_OPT, TRUST_OPT, app, guarded, inputs_of, is_file_spec,
                     note, safe, student)
from ..sources import model_args_of, plan_model, sha256


@app.command()
@guarded
def verify(
    first: Optional[str] = typer.Argument(None, metavar="MODEL", show_default=False,
                                          help="Optional: " + MODEL_HELP + " Rebuild the student from this spec "
                                          "instead of the one the plan records. Given alone, the argument is TEACHER."),
    second: Optional[str] = typer.Argument(None, metavar="TEACHER", show_default=False,
                                           help="Teacher file written by `gpd expand`: the student (MODEL spec, model "
                                           "arguments, input shape, weights) is rebuilt from its plan."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights, as given to `gpd expand` "
                                          "(default: those the plan records, found by path and checked by SHA-256)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE for the factory (default: those the plan records)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape (default: the plan's)."),
    input: List[str] = typer.Option([], "--input", help="Example inputs as [NAME=]SHAPE[:DTYPE], repeatable "
                                    "(default: the plan's)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: both when CUDA is present)."),
    inputs: int = typer.Option(3, "--inputs", min=1, max=1000, help="Number of random inputs."),
    trained: bool = typer.Option(False, "--trained", help="The teacher was trained: report teacher vs student for "
                                 "information only; the exit code follows the extraction check alone."),
    trust_pickle: bool = TRUST_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Check that the teacher computes the student's function (IR: outputs, and every node inside the graph) and
    that the extracted student equals the teacher's student view (CBR): exit 0 if both hold, 1 if not, 2 on bad
    input."""
    from ..io import load_teacher_file
    from ..verification import verify as run_verify

    if first is None:
        raise typer.BadParameter("missing: the teacher file written by `gpd expand`", param_hint="'TEACHER'")
    spec, teacher = (first, second) if second is not None else (None, first)
    if spec is None and not os.path.exists(teacher) and (":" in teacher or is_file_spec(teacher)):
        raise GPDError(f"{teacher} looks like a MODEL spec, and no TEACHER file follows it: gpd verify [MODEL] TEACHER")
    with steps(common.err, as_json) as step:
        step(f"reading {teacher}")
        plan, tensors = load_teacher_file(teacher)
        model = spec or plan_model(plan, teacher, f"gpd verify MODEL {teacher}")
        args = model_args_of(model_arg, plan)
        step("finding the student weights" if weights is None else f"checking {weights}")
        used = _weights(plan, teacher, weights)
        step(f"loading {model}" + (f" with {used}" if used else ""))
        m = student(model, used, args, trust_pickle, plan, trust_remote_code)
        t0 = time.perf_counter()
        report = run_verify(m, plan, tensors, inputs_of(input_shape, input), device, inputs, trained=trained,
                            progress=step)
    result = {"model": model, "teacher": teacher, "weights": used, **report.to_dict(),
              "seconds": round(time.perf_counter() - t0, 3)}
    emit(result, as_json, _print_verify)
    return 0 if report.passed else 1


def _weights(plan: Any, teacher: str, given: Optional[str]) -> Optional[str]:
    """The student weights to verify with: ``given`` (--weights), else the file the plan records, looked for at
    its recorded path, then next to the teacher, then in the current directory, and used only if its SHA-256
    is the recorded one. None: the teacher was made from the seeded random student."""
    src = plan.source
    name, path, digest = src.get("weights"), src.get("weights_path"), src.get("weights_sha256")
    if given is not None:
        if not name and not path:
            note(f"note: {teacher} was expanded without --weights, from the seeded random student")
        elif digest and os.path.isfile(given) and sha256(given) != digest:
            note(f"note: {given} is not the file {teacher} was expanded from ({name}; its SHA-256 differs)")
        return given
    if not name and not path:
        return None
    shown = path or name
    if not digest:  # written before plans recorded the weights' checksum, or from Python: nothing to check
        raise GPDError(f"{teacher} was expanded from the weights {shown}, which its plan cannot check: pass them "
                       "with --weights FILE")
    base = os.path.basename(name or path)
    changed = None
    for candidate in dict.fromkeys(p for p in (path, os.path.join(os.path.dirname(teacher), base), base) if p):
        if os.path.isfile(candidate):
            try:
                if sha256(candidate) == digest:
                    return candidate
            except OSError:
                pass
            changed = changed or candidate
    if changed:
        raise GPDError(f"the student weights {changed} changed since `gpd expand` wrote {teacher} (SHA-256 differs): "
                       "pass the weights it was made from with --weights FILE")
    raise GPDError(f"the student weights {shown} that {teacher} was made from are missing: pass them with "
                   "--weights FILE")


def _num(x: float | None, fmt: str = ".3e") -> str:
    return "NaN" if x is None else format(x, fmt)  # None: a value was not finite on one side only


def _print_verify(r: dict[str, Any]) -> None:
    out = common.out
    t = Table(title=f"gpd verify {safe(r['model'])}")
    for col in ("check", "device", "dtype", "max abs error", "max rel error", "tolerance", "result"):
        t.add_column(col)
    info = " (info)" if r["trained"] else ""
    rows = [("teacher = student" + info, r["checks"], True), ("teacher = student inside" + info, r["inside"], True),
            ("extracted = student view", r["extraction"], False)]
    for name, checks, ir in rows:
        for c in checks:
            result = "[green]pass[/]" if c["passed"] else ("[yellow]differs[/]" if r["trained"] and ir else "[red]FAIL[/]")
            label = name + (f", {c['nodes']} nodes" if c.get("nodes") is not None else "")
            t.add_row(label, c["device"], c["dtype"], _num(c["max_abs"]), _num(c["max_rel"]), f"{c['tolerance']:.0e}",
                      result)
    out.print(t)
    for c in r["inside"][-1:]:
        if c.get("worst"):
            out.print(f"worst node inside: {safe(c['worst'])} ({c['dtype']}, max rel error {_num(c['max_rel'])} of "
                      f"the values flowing through it)", highlight=False)
    if r["constant_output"]:
        out.print("[yellow]the student's output does not depend on its input (a zero-initialized head?): the output "
                  "comparison proves nothing here, the comparison inside the graph decides[/]", highlight=False)
    d = r["divergence"]
    if d:
        detail = f"max rel error {_num(d['max_rel'])}" if d.get("error") in ("value", "nonfinite") else d.get("detail", "")
        out.print(f"[red]teacher and student part at node[/] [bold]{safe(d['node'])}[/] ({safe(d['op'])}, "
                  f"{d.get('device', 'cpu')} {d.get('dtype', 'float64')}): {safe(detail)}", highlight=False)
    elif not r["ir_passed"] and not r["trained"]:
        out.print("[red]the outputs differ, but every node inside agrees[/]")
    if r["trained"]:
        why = ("a trained teacher has left the student on purpose, so teacher = student is for information; "
               "the extraction check decides")
        out.print(f"[green]equivalent[/] ({why})" if r["passed"] else f"[red]NOT equivalent[/] ({why})", highlight=False)
    else:
        out.print("[green]equivalent[/]" if r["passed"] else "[red]NOT equivalent[/]")
