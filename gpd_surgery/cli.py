"""The ``gpd`` command line: expand, verify, extract, plan, inspect."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable, List, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, api
from .branches import parse as parse_branches
from .errors import GPDError
from .io import atomic_save, check_output, load_teacher_file, load_weights
from .memory import check_memory, fmt_bytes
from .plan import MAX_SEED
from .progress import Step, steps
from .trace import default_input_shape, load_model, parse_model_args, parse_shape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model surgery for Gap Preserving Distillation: widen a student into an exact teacher and back.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
out = Console()
err = Console(stderr=True)

MODEL_HELP = "torchvision:NAME, timm:NAME, module.path:callable, or a .pt/.pth file holding a pickled nn.Module."
TRUST_HELP = ("Allow unpickling a .pt MODEL, or --weights that a weights-only load refuses (a whole pickled model): "
              "runs code from the file.")
DURABLE_HELP = "Also fsync the output before naming it, so that it survives a power cut (slower: waits for the disk)."
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
DEBUG_OPT = typer.Option(False, "--debug", help="Show the full traceback of an error.")


def _version(value: bool) -> None:
    if value:
        out.print(f"gpd-surgery {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _app(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
) -> None:
    """Model surgery for Gap Preserving Distillation: widen a student into an exact teacher and back."""


def _run(debug: bool, fn: Callable[[], int | None]) -> None:
    """User errors: exit 2 and one line. Anything else is a bug: exit 3 and one line. --debug: the exception
    propagates with its traceback, and main() still exits 2 or 3 (1 would read as "not equivalent")."""
    try:
        code = fn()
    except GPDError as e:
        if debug:
            raise
        _fail(str(e), 2)
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if _out_of_memory(e):  # the machine's limit, not a bug: the checks before allocating estimate, not promise
            _fail(f"out of memory ({first}): free memory, or use a smaller --ratio, --input-shape or model", 2)
        _fail(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback, and report it)", 3)
    raise typer.Exit(code or 0)


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {_safe(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _safe(text: Any) -> str:
    """Text from files and specs as one inert line: no rich markup, no terminal control characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return escape(text)


def _student(model: str, weights: Optional[str], model_args: dict[str, Any], trust_pickle: bool,
             plan: Any = None) -> Any:
    """The student; with a teacher's ``plan``, checked against the shapes it records before it is allocated."""
    if not model.startswith(("torchvision:", "timm:")):  # those import nothing from the current directory
        _cwd_on_path()
    expect = None if plan is None else {r.key: r.shape for r in plan.recipes}
    try:
        m = load_model(model, model_args, trust_pickle=trust_pickle, expect=expect)
    except GPDError:
        raise
    except Exception as e:  # the factory's own complaint about its arguments, e.g. a negative width
        raise GPDError(f"{model} could not be built with {model_args}: {type(e).__name__}: {e}") from None
    if weights:
        load_weights(m, weights, trust_pickle=trust_pickle, note=_note)
    return m


def _note(message: str) -> None:
    err.print(_safe(message), highlight=False, soft_wrap=True)


def _cwd_on_path() -> None:
    """As `python -m` does: a module.path:callable spec (or a pickled model's class) may live in the current
    directory. The console script's sys.path starts with its bin/ folder instead."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weights_source(weights: Optional[str]) -> dict[str, Any]:
    """What the plan records of the student weights, for `gpd verify TEACHER` to find and check them: the
    absolute path (a relative one would depend on where verify runs) and the file's SHA-256."""
    if not weights:
        return {"weights": None}
    return {"weights": os.path.basename(weights), "weights_path": os.path.abspath(weights),
            "weights_sha256": _sha256(weights)}


def _default_output(inputs: List[Optional[str]], spec: Optional[str], kind: str) -> str:
    """``NAME.{kind}.safetensors``: next to the first input file given (``x.teacher.safetensors`` gives
    ``x.student.safetensors``), else named after the spec (``torchvision:resnet18`` -> ``resnet18``) in the
    current directory. Never the input's own name: ``.{kind}`` is always added."""
    for path in inputs:
        if path:
            stem = os.path.splitext(path)[0]
            if kind != "teacher" and stem.endswith(".teacher"):
                stem = stem[: -len(".teacher")]
            return f"{stem}.{kind}.safetensors"
    name = re.sub(r"[^\w.-]", "_", (spec or "model").rpartition(":")[2]).strip(".") or "model"
    return f"{name}.{kind}.safetensors"


def _options(model: str, ratio: str, model_arg: List[str], input_shape: Optional[str]
             ) -> tuple[float, dict[str, Any], tuple[int, ...]]:
    args = parse_model_args(model_arg)
    shape = parse_shape(input_shape) if input_shape else default_input_shape(model)
    return _ratio(ratio), args, shape


@app.command()
def expand(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Teacher file to write (default: "
                                         "NAME.teacher.safetensors next to the --weights or .pt MODEL file, else "
                                         "named after MODEL in the current directory)."),
    ratio: str = typer.Option("2", "--ratio", "-r", help="Width expansion ratio (>= 1)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights: .safetensors, or a .pt state "
                                          "dict (loaded weights-only); the plan records their path and SHA-256."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE passed to the model factory (repeatable), e.g. num_classes=10."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the symmetry-breaking shares (and of fractional maps)."),
    equal_shares: bool = typer.Option(False, "--equal-shares", help="Split dense weights equally among copies."),
    branches: str = typer.Option("none", "--branches", help="Linear branches on teacher convs and linears: none, default "
                                 "(kxk,1x1-kxk,lowrank) or a list of 1x1, kxk, avg, 1x1-kxk, lowrank, full."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output, and skip the memory check."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Widen MODEL into a teacher that computes exactly the same function, and write it with its plan."""

    def go() -> int:
        nonlocal output
        r, args, shape = _options(model, ratio, model_arg, input_shape)
        kinds = parse_branches(branches)
        output = output or _default_output([weights, model if _is_file_spec(model) else None], model, "teacher")
        check_output(output, force)
        with steps(err, as_json) as step:
            step(f"loading {model}" + (f" with {weights}" if weights else ""))
            student = _student(model, weights, args, trust_pickle)
            source = {"model": model, "model_args": args, **_weights_source(weights)}
            step(f"tracing and planning x{r:g}")
            planned = api.plan_expansion(student, shape, r, seed=seed, equal_shares=equal_shares, source=source,
                                         branches=kinds, force=force)
            check_memory(planned.build_bytes(), force)  # before any teacher tensor exists
            step("building the teacher")
            result = planned.build()
            step(f"writing {output}")
            result.save(output, durable=durable, overwrite=force)
        summary = {"output": output, "model": model, **result.summary()}
        if as_json:
            print(json.dumps(summary))
        else:
            _print_expand(summary)
        return 0

    _run(debug, go)


def _is_file_spec(model: str) -> bool:
    return model.endswith((".pt", ".pth")) and ":" not in os.path.basename(model)  # as load_model tells them


def _ratio(text: str) -> float:
    from .expand import check_ratio

    return check_ratio(text)


def _print_expand(s: dict[str, Any]) -> None:
    t = Table(title=f"gpd expand {_safe(s['model'])} x{s['ratio']:g}", show_header=False)
    t.add_row("student parameters", f"{s['student_params']:,}")
    t.add_row("teacher parameters", f"{s['teacher_params']:,} ({s['param_ratio']:.2f}x)")
    t.add_row("teacher size", fmt_bytes(s["teacher_bytes"]))
    t.add_row("spaces expanded", str(s["spaces_expanded"]))
    t.add_row("spaces frozen", str(s["spaces_frozen"]))
    for reason, n in Counter(f["reason"] for f in s["frozen"]).most_common():
        t.add_row("", f"{n} x {_safe(reason)}")
    t.add_row("time", f"{s['seconds']:.2f} s")
    t.add_row("written", _safe(s["output"]))
    out.print(t)


@app.command()
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
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: both when CUDA is present)."),
    inputs: int = typer.Option(3, "--inputs", min=1, max=1000, help="Number of random inputs."),
    trained: bool = typer.Option(False, "--trained", help="The teacher was trained: report teacher vs student for "
                                 "information only; the exit code follows the extraction check alone."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Check that the teacher computes the student's function (IR) and that the extracted student equals the
    teacher's student view (CBR): exit 0 if both hold, 1 if not, 2 on bad input."""
    if first is None:
        raise typer.BadParameter("missing: the teacher file written by `gpd expand`", param_hint="'TEACHER'")
    spec, teacher = (first, second) if second is not None else (None, first)

    def go() -> int:
        if spec is None and not os.path.exists(teacher) and (":" in teacher or _is_file_spec(teacher)):
            raise GPDError(f"{teacher} looks like a MODEL spec, and no TEACHER file follows it: "
                           "gpd verify [MODEL] TEACHER")
        with steps(err, as_json) as step:
            step(f"reading {teacher}")
            plan, tensors = load_teacher_file(teacher)
            model = spec or _plan_model(plan, teacher, f"gpd verify MODEL {teacher}")
            args = parse_model_args(model_arg) if model_arg else dict(plan.source.get("model_args") or {})
            step("finding the student weights" if weights is None else f"checking {weights}")
            used = _verify_weights(plan, teacher, weights)
            step(f"loading {model}" + (f" with {used}" if used else ""))
            student = _student(model, used, args, trust_pickle, plan)
            shape = parse_shape(input_shape) if input_shape else None
            from .verify import verify as run_verify

            t0 = time.perf_counter()
            report = run_verify(student, plan, tensors, shape, device, inputs, trained=trained, progress=step)
        result = {"model": model, "teacher": teacher, "weights": used, **report.to_dict(),
                  "seconds": round(time.perf_counter() - t0, 3)}
        if as_json:
            print(json.dumps(result))
        else:
            _print_verify(result)
        return 0 if report.passed else 1

    _run(debug, go)


def _num(x: float | None, fmt: str = ".3e") -> str:
    return "NaN" if x is None else format(x, fmt)  # None: a value was not finite on one side only


def _plan_model(plan: Any, teacher: str, usage: str) -> str:
    spec = plan.source.get("model")
    if not spec:
        raise GPDError(f"the plan of {teacher} records no MODEL spec (the teacher was made from Python): pass it, "
                       f"{usage}")
    return spec


def _verify_weights(plan: Any, teacher: str, given: Optional[str]) -> Optional[str]:
    """The student weights to verify with: ``given`` (--weights), else the file the plan records, looked for at
    its recorded path, then next to the teacher, then in the current directory, and used only if its SHA-256
    is the recorded one. None: the teacher was made from the seeded random student."""
    src = plan.source
    name, path, digest = src.get("weights"), src.get("weights_path"), src.get("weights_sha256")
    if given is not None:
        if not name and not path:
            _note(f"note: {teacher} was expanded without --weights, from the seeded random student")
        elif digest and os.path.isfile(given) and _sha256(given) != digest:
            _note(f"note: {given} is not the file {teacher} was expanded from ({name}; its SHA-256 differs)")
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
                if _sha256(candidate) == digest:
                    return candidate
            except OSError:
                pass
            changed = changed or candidate
    if changed:
        raise GPDError(f"the student weights {changed} changed since `gpd expand` wrote {teacher} (SHA-256 differs): "
                       "pass the weights it was made from with --weights FILE")
    raise GPDError(f"the student weights {shown} that {teacher} was made from are missing: pass them with "
                   "--weights FILE")


def _print_verify(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd verify {_safe(r['model'])}")
    for col in ("check", "device", "dtype", "max abs error", "max rel error", "tolerance", "result"):
        t.add_column(col)
    info = " (info)" if r["trained"] else ""
    rows = [("teacher = student" + info, r["checks"], True), ("teacher = student inside" + info, r.get("inside", []), True),
            ("extracted = student view", r["extraction"], False)]
    for name, checks, ir in rows:
        for c in checks:
            result = "[green]pass[/]" if c["passed"] else ("[yellow]differs[/]" if r["trained"] and ir else "[red]FAIL[/]")
            label = name + (f", {c['nodes']} nodes" if c.get("nodes") is not None else "")
            t.add_row(label, c["device"], c["dtype"], _num(c["max_abs"]), _num(c["max_rel"]), f"{c['tolerance']:.0e}",
                      result)
    out.print(t)
    for c in r.get("inside", [])[-1:]:
        if c.get("worst"):
            out.print(f"worst node inside: {_safe(c['worst'])} ({c['dtype']}, max rel error {_num(c['max_rel'])} of "
                      f"the values flowing through it)", highlight=False)
    if r.get("constant_output"):
        out.print("[yellow]the student's output does not depend on its input (a zero-initialized head?): the output "
                  "comparison proves nothing here, the comparison inside the graph decides[/]", highlight=False)
    d = r.get("divergence")
    if d:
        detail = f"max rel error {_num(d['max_rel'])}" if d.get("error") in ("value", "nonfinite") else d.get("detail", "")
        out.print(f"[red]teacher and student part at node[/] [bold]{_safe(d['node'])}[/] ({_safe(d['op'])}, "
                  f"{d.get('device', 'cpu')} {d.get('dtype', 'float64')}): {_safe(detail)}", highlight=False)
    elif not r["ir_passed"] and not r["trained"]:
        out.print("[red]the outputs differ, but every node inside agrees[/]")
    if r["trained"]:
        why = ("a trained teacher has left the student on purpose, so teacher = student is for information; "
               "the extraction check decides")
        out.print(f"[green]equivalent[/] ({why})" if r["passed"] else f"[red]NOT equivalent[/] ({why})", highlight=False)
    else:
        out.print("[green]equivalent[/]" if r["passed"] else "[red]NOT equivalent[/]")


@app.command()
def extract(
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand` (trained or not)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Student file to write (default: next to "
                                         "TEACHER, NAME.student.safetensors for NAME.teacher.safetensors or "
                                         "NAME.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Collapse a teacher into a student state dict, loadable strictly into the original architecture."""

    def work(step: Step) -> dict[str, Any]:
        nonlocal output
        output = output or _default_output([teacher], None, "student")
        check_output(output, force)
        step(f"reading {teacher} and collapsing it")
        t0 = time.perf_counter()
        state = api.extract(teacher)
        step(f"writing {output}")
        atomic_save(state, output, durable=durable, overwrite=force)
        return {
            "teacher": teacher, "output": output, "tensors": len(state),
            "student_params": sum(v.numel() for v in state.values()), "seconds": round(time.perf_counter() - t0, 3),
        }

    def go() -> int:
        with steps(err, as_json) as step:
            result = work(step)
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"wrote {_safe(output)}: {result['tensors']} tensors, {result['student_params']:,} values "
                      f"in {result['seconds']:.2f} s", highlight=False)
        return 0

    _run(debug, go)


@app.command("plan")
def plan_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratio: str = typer.Option("2", "--ratio", "-r", help="Width expansion ratio (>= 1)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights (checked against the model)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE passed to the model factory (repeatable)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the symmetry-breaking shares (and of "
                             "fractional maps), as for `gpd expand`."),
    equal_shares: bool = typer.Option(False, "--equal-shares", help="Split dense weights equally among copies, as "
                                      "for `gpd expand`."),
    branches: str = typer.Option("none", "--branches", help="Linear branches on teacher convs and linears, counted in "
                                 "the teacher's size: none, default (kxk,1x1-kxk,lowrank) or a list of 1x1, kxk, avg, "
                                 "1x1-kxk, lowrank, full."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Dry run of `gpd expand` with the same options: the channel spaces, what froze and why, the teacher's size
    (branches included) and the memory to build it. Writes nothing."""

    def go() -> int:
        from .report import plan_report

        r, args, shape = _options(model, ratio, model_arg, input_shape)
        kinds = parse_branches(branches)
        with steps(err, as_json) as step:
            step(f"loading {model}" + (f" with {weights}" if weights else ""))
            student = _student(model, weights, args, trust_pickle)
            step(f"tracing and planning x{r:g}")
            # a dry run makes no teacher tensor: a teacher too large for this machine is shown, not refused
            planned = api.plan_expansion(student, shape, r, seed=seed, equal_shares=equal_shares, branches=kinds,
                                         source={"model": model}, dry_run=True)
            rep = {"model": model, **plan_report(planned), "branches": list(kinds),
                   "branched_weights": len(planned.plan.branches)}
        if as_json:
            print(json.dumps(rep))
        else:
            _print_plan(rep)
        return 0

    _run(debug, go)


def _ops(users: list[dict[str, str]], n: int = 4) -> str:
    names = [u["node"] for u in users[:n]]
    return ", ".join(names) + (f" +{len(users) - n} more" if len(users) > n else "")


def _print_plan(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd plan {_safe(r['model'])} x{r['ratio']:g}")
    for col in ("space", "size", "teacher", "status", "used by"):
        t.add_column(col)
    for sp in r["spaces"]:
        status = sp["status"] + (f": {sp['reason']}" if sp["reason"] else "")
        color = {"expanded": "green", "frozen": "yellow"}.get(sp["status"], "dim")
        t.add_row(str(sp["space"]), str(sp["size"]), str(sp["expanded_size"]), f"[{color}]{_safe(status)}[/]",
                  _safe(_ops(sp["used_by"])))
    out.print(t)
    s = Table(show_header=False, box=None)
    s.add_row("input shape", "x".join(map(str, r["input_shape"])))
    s.add_row("student parameters", f"{r['student_params']:,}")
    s.add_row("teacher parameters", f"{r['teacher_params']:,} ({r['param_ratio']:.2f}x)")
    if r.get("branched_weights"):
        s.add_row("branches", f"{', '.join(r['branches'])} on {r['branched_weights']} weights (counted above)")
    s.add_row("teacher size", fmt_bytes(r["teacher_bytes"]))
    free = r["available_bytes"]
    s.add_row("memory to build", fmt_bytes(r["build_bytes"]) + (f" (free: {fmt_bytes(free)})" if free else ""))
    s.add_row("spaces", f"{r['spaces_expanded']} expanded, {r['spaces_frozen']} frozen by the analysis")
    if r["unsupported_ops"]:
        s.add_row("unsupported ops", _safe(", ".join(r["unsupported_ops"])))
    out.print(s)


@app.command()
def inspect(
    file: str = typer.Argument(..., help="A teacher file (from `gpd expand`) or a student file (from `gpd extract`)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Summarize a teacher or student file from its header, without loading its tensors."""

    def go() -> int:
        from .report import inspect_file

        rep = inspect_file(file)
        if as_json:
            print(json.dumps(rep))
        else:
            _print_inspect(rep)
        return 0

    _run(debug, go)


def _print_inspect(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd inspect {_safe(r['file'])}", show_header=False)
    if r["kind"] == "teacher":
        src = r["source"]
        t.add_row("format", f"gpd teacher ({r['format']})")
        t.add_row("ratio", f"{r['ratio']:g} (seed {r['seed']}{', equal shares' if r['equal_shares'] else ''})")
        t.add_row("source", _safe(" ".join(f"{k}={v}" for k, v in src.items() if v not in (None, {}, []))))
        t.add_row("student parameters", f"{r['student_params']:,} in {r['student_tensors']} tensors")
        t.add_row("teacher parameters", f"{r['teacher_params']:,} ({r['param_ratio']:.2f}x)")
        t.add_row("spaces", f"{r['spaces_expanded']} expanded, {r['spaces_frozen']} frozen by the analysis")
        for reason, n in Counter(f["reason"] for f in r["frozen"]).most_common():
            t.add_row("", f"{n} x {_safe(reason)}")
        if r["unsupported_ops"]:
            t.add_row("unsupported ops", _safe(", ".join(r["unsupported_ops"])))
    else:
        t.add_row("format", "safetensors (no gpd plan: a student or other weights)")
        if r["metadata_keys"]:
            t.add_row("metadata keys", _safe(", ".join(r["metadata_keys"])))
    t.add_row("tensors", f"{r['tensors']} ({', '.join(f'{n} {d}' for d, n in r['dtypes'].items())})")
    t.add_row("values", f"{r['values']:,}")
    t.add_row("size", f"{fmt_bytes(r['tensor_bytes'])} of tensors, {fmt_bytes(r['file_bytes'])} on disk")
    out.print(t)
    if r["kind"] == "teacher":
        s = Table(title="spaces")
        for col in ("space", "size", "teacher", "tensors"):
            s.add_column(col)
        for sp in r["spaces"]:
            names = sp["tensors"]
            s.add_row(str(sp["space"]), str(sp["size"]), str(sp["expanded_size"]),
                      _safe(", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")))
        out.print(s)


@app.command()
def train(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " The student (default with --teacher or --resume: "
                                          "the spec the teacher file's plan records).", show_default=False),
    data: str = typer.Option(..., "--data", help="Image folder (DIR/train/CLASS/IMAGE, optional DIR/val/...; or "
                             "DIR/CLASS/IMAGE with --val-fraction held out), or 'synthetic' for a built-in task."),
    output_dir: str = typer.Option(..., "--output-dir", "-o", help="Folder for teacher.safetensors, train_state.pt "
                                   "(every epoch) and student.safetensors (at the end)."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Epochs to train."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Global batch size (split among torchrun processes)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 0.1 for sgd, 1e-3 for adamw)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) or adamw."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay, not on 1-d tensors "
                                                 "(default: 5e-4 for sgd, 0.05 for adamw)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Linear warm-up before the cosine schedule (epochs, "
                                        "may be fractional)."),
    ratio: Optional[str] = typer.Option(None, "--ratio", "-r", help="Width expansion ratio of the dynamic teacher (>= 1) "
                                        "(default: 2)."),
    branches: Optional[str] = typer.Option(None, "--branches", help="Teacher branches: default (kxk,1x1-kxk,lowrank), "
                                           "none, or a list of 1x1, kxk, avg, 1x1-kxk, lowrank, full (default: default)."),
    lam: float = typer.Option(3.0, "--lambda", help="Weight of the dynamic teacher -> student distillation."),
    teacher_ce: float = typer.Option(1.0, "--teacher-ce", help="Weight of the dynamic teacher's cross-entropy on labels."),
    student_ce: float = typer.Option(1.0, "--student-ce", help="Weight of the student's cross-entropy on labels."),
    distill: str = typer.Option("kl", "--distill", help="Distillation loss: kl (KL divergence at --temperature) or sce "
                                "(soft-target cross-entropy, targets label-smoothed)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the distillation losses."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="Label smoothing of the label cross-entropies "
                                          "and of the sce soft targets."),
    static_teacher: Optional[str] = typer.Option(None, "--static-teacher", help="A fixed, pre-trained teacher MODEL "
                                                 "(spec as for MODEL) that both the dynamic teacher and the student "
                                                 "also distill from."),
    static_weights: Optional[str] = typer.Option(None, "--static-weights", help="Weights of the static teacher."),
    static_model_arg: List[str] = typer.Option([], "--static-model-arg", help="KEY=VALUE for the static teacher's factory."),
    static_teacher_weight: float = typer.Option(1.0, "--static-teacher-weight", help="Weight of static -> dynamic teacher distillation."),
    static_student_weight: float = typer.Option(1.0, "--static-student-weight", help="Weight of static teacher -> student distillation."),
    plain: bool = typer.Option(False, "--plain", help="Baseline: train the student alone (cross-entropy, no dynamic "
                               "teacher); writes student.safetensors every epoch."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the training run (data order, "
                             "augmentation, dropout) and of the teacher's symmetry-breaking shares."),
    data_seed: int = typer.Option(0, "--data-seed", min=0, max=MAX_SEED, help="Seed of the synthetic dataset and of "
                                  "the --val-fraction split (kept apart from --seed so that runs compare on the same data)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when present; "
                                         "under torchrun cuda:LOCAL_RANK)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="Square input size (default: the "
                                             "teacher file's, else 32 for synthetic, 224 for a folder)."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Data loading worker processes."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of the images held out for validation when "
                                       "the folder has no val/ split (0: no validation)."),
    augment: str = typer.Option("crop-flip", "--augment", help="Training augmentation of image folders: none, crop "
                                "(padded random crop) or crop-flip (and horizontal flips)."),
    synthetic_size: int = typer.Option(4000, "--synthetic-size", min=1, help="Training samples of the synthetic task "
                                       "(plus a quarter as many for validation)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Initial student weights (.safetensors or a "
                                          ".pt state dict, loaded weights-only)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE for the model factory (repeatable), e.g. "
                                        "num_classes=10 (default with a teacher file: those its plan records)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Start from this teacher file (from `gpd expand` "
                                          "or a previous run) instead of expanding MODEL."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Stop after this many epochs of this "
                                             "run (the schedule still spans --epochs); continue later with --resume."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --output-dir exactly "
                                "(same options required)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help="Start over in an --output-dir that holds a previous run."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Train MODEL with Gap Preserving Distillation: a dynamic teacher (MODEL widened exactly) and the student,
    sharing parameters, trained together; then extract the student. Runs as DDP under torchrun."""

    def go() -> int:
        nonlocal model
        from . import data as datasets
        from . import train as gt

        cfg = gt.TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
            weight_decay=weight_decay, warmup_epochs=warmup_epochs, lam=lam, teacher_ce=teacher_ce,
            student_ce=student_ce, static_teacher_weight=static_teacher_weight,
            static_student_weight=static_student_weight, distill=distill, temperature=temperature,
            label_smoothing=label_smoothing, seed=seed, plain=plain, device=device, num_workers=num_workers,
            stop_after=stop_after)
        if augment not in ("none", "crop", "crop-flip"):
            raise GPDError(f"unknown --augment {augment!r}: choose none, crop or crop-flip")
        if teacher and (resume or plain):
            raise GPDError(f"--teacher does not go with {'--resume' if resume else '--plain'}")
        if static_weights and not static_teacher:
            raise GPDError("--static-weights needs --static-teacher")
        # Only rank 0 shows progress; it ends before training starts its own live display.
        with steps(err, as_json or int(os.environ.get("RANK", "0")) != 0) as step:
            source_file = os.path.join(output_dir, gt.TEACHER_FILE) if resume and not plain else teacher
            if source_file:
                step(f"reading {source_file}")
            plan = load_teacher_file(source_file)[0] if source_file else None
            if plan is not None and (ratio is not None or branches is not None):
                raise GPDError("--ratio and --branches set up a new teacher: they do not apply to "
                               + ("--resume" if resume else "--teacher") + ", whose file has its own")
            if plan is not None and weights:
                raise GPDError("--weights initialize a new student: the teacher file already holds the weights")
            if model is None:
                if plan is None:
                    raise GPDError("pass MODEL, the student's spec (e.g. torchvision:resnet18): without --teacher or "
                                   "--resume there is no plan to take it from")
                model = _plan_model(plan, source_file, f"gpd train MODEL --teacher {source_file}" if teacher else
                                    "gpd train MODEL --resume")
            r = _ratio(ratio or "2")
            kinds = parse_branches(branches or "default")
            args = (parse_model_args(model_arg) if model_arg or plan is None
                    else dict(plan.source.get("model_args") or {}))
            planned = tuple(plan.source.get("input_shape") or ()) if plan is not None else ()
            size = image_size or (planned[-1] if len(planned) == 4 else (32 if data == "synthetic" else 224))
            shape = (1, 3, size, size)
            step(f"loading {model}")
            student = _student(model, None if resume else weights, args, trust_pickle, plan)
            step(f"loading the data ({data})")
            if data == "synthetic":
                k = gt.num_outputs(student, shape)
                train_set, val_set = datasets.synthetic(k, size, synthetic_size, seed=data_seed)
            else:
                train_set, val_set, classes = datasets.image_folder(data, size, val_fraction, data_seed, augment)
                k = len(classes)
            static = None
            if static_teacher:
                step(f"loading the static teacher {static_teacher}")
                static = _student(static_teacher, static_weights, parse_model_args(static_model_arg), trust_pickle)
        identity = {"model": model, "model_args": args, "data": data, "image_size": size, "data_seed": data_seed}
        if data == "synthetic":
            identity["synthetic_size"] = synthetic_size
        else:
            identity.update(val_fraction=val_fraction, augment=augment)
        if static_teacher:
            identity["static_teacher"] = static_teacher
        source = {"model": model, "model_args": args, **_weights_source(None if resume else weights)}
        main_rank = int(os.environ.get("RANK", "0")) == 0
        reporter = gt.ConsoleReporter(out) if main_rank and not as_json else gt.Reporter()
        try:
            result = gt.train(student, train_set, val_set, output_dir, cfg, input_shape=shape, ratio=r, branches=kinds,
                              expand_seed=seed, teacher_file=teacher, static_teacher=static, num_classes=k,
                              source=source, resume=resume, force=force, reporter=reporter, identity=identity)
        finally:
            if isinstance(reporter, gt.ConsoleReporter):
                reporter.close()
        if not main_rank:
            return 0
        if as_json:
            print(json.dumps({"model": model, "output_dir": output_dir, **result}))
        else:
            _print_train(result)
        return 0

    _run(debug, go)


def _print_train(r: dict[str, Any]) -> None:
    from .train import format_metrics

    last = r["history"][-1] if r["history"] else None
    if last is not None and "val" in last:
        out.print(f"final validation ({r['epochs_done']}/{r['epochs']} epochs): {format_metrics(last['val'])}",
                  highlight=False, soft_wrap=True)
    written = [r["files"]["checkpoint"], r["files"]["state"]] + ([r["files"]["student"]] if r["complete"] else [])
    out.print(f"wrote {', '.join(_safe(f) for f in dict.fromkeys(written))} in {r['seconds']:.1f} s", highlight=False,
              soft_wrap=True)
    if not r["complete"]:
        out.print(f"stopped after epoch {r['epochs_done']} of {r['epochs']}: continue with --resume", highlight=False)


def main() -> None:
    try:
        app()
    except GPDError:  # only with --debug: otherwise _run has made it one line and exit 2
        traceback.print_exc()
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        sys.exit(3)


if __name__ == "__main__":
    main()
