"""`gpd expand`, `gpd plan`, `gpd extract` and `gpd inspect`: widening, its dry run, folding back, reading files."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import GPDError
from ..memory import fmt_bytes
from ..progress import steps
from . import common
from .common import (BRANCH_KINDS, CAPTURE_OPT, INPUT_OPT, REMOTE_OPT, emit, DEBUG_OPT, DURABLE_HELP, EQUAL_OPT,
                     INPUT_SHAPE_HELP, JSON_OPT, MODEL_ARG_HELP, MODEL_HELP, SEED_OPT, TRUST_OPT, app, default_output,
                     guarded, inputs_of, is_file_spec, ratio_of, safe, student)
from ..sources import model_args_of, weights_source

RATIO_OPT = typer.Option("2", "--ratio", "-r", help="Width expansion ratio (1 to 64, any real number).")
BRANCHES_HELP = f"Linear branches on teacher convs and linears: none, default (kxk,1x1-kxk,lowrank) or a list of {BRANCH_KINDS}."


@app.command()
@guarded
def expand(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Teacher file to write (default: "
                                         "NAME.teacher.safetensors next to the --weights or .pt MODEL file, else "
                                         "named after MODEL in the current directory)."),
    ratio: str = RATIO_OPT,
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights: .safetensors, or a .pt state "
                                          "dict (loaded weights-only); the plan records their path and SHA-256."),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    input: List[str] = INPUT_OPT,
    capture: str = CAPTURE_OPT,
    seed: int = SEED_OPT,
    equal_shares: bool = EQUAL_OPT,
    branches: str = typer.Option("none", "--branches", help=BRANCHES_HELP),
    trust_pickle: bool = TRUST_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output, and skip the memory checks."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Widen MODEL into a teacher that computes exactly the same function, and write it with its plan."""
    from .. import api
    from ..branches import parse as parse_branches
    from ..io import check_output
    from ..memory import check_memory

    r, args = ratio_of(ratio), model_args_of(model_arg)
    inputs_of(input_shape, input)  # a malformed shape is refused before the model is built
    kinds = parse_branches(branches)
    output = output or default_output([weights, model if is_file_spec(model) else None], model, "teacher")
    check_output(output, force)
    with steps(common.err, as_json) as step:
        step(f"loading {model}" + (f" with {weights}" if weights else ""))
        m = student(model, weights, args, trust_pickle, trust_remote_code=trust_remote_code)
        shape = inputs_of(input_shape, input, model, m)
        source = {"model": model, "model_args": args, **weights_source(weights)}
        step(f"capturing and planning x{r:g}")
        planned = api.plan_expansion(m, shape, r, seed=seed, equal_shares=equal_shares, source=source,
                                     branches=kinds, force=force, capture=capture)
        check_memory(planned.build_bytes(), force)  # before any teacher tensor exists
        step("building the teacher")
        result = planned.build()
        step(f"writing {output}")
        result.save(output, durable=durable, overwrite=force)
    summary = {"output": output, "model": model, **result.summary()}
    emit(summary, as_json, _print_expand)
    return 0


def _print_expand(s: dict[str, Any]) -> None:
    t = Table(title=f"gpd expand {safe(s['model'])} x{s['ratio']:g}", show_header=False)
    t.add_row("student parameters", f"{s['student_params']:,}")
    t.add_row("teacher parameters", f"{s['teacher_params']:,} ({s['param_ratio']:.2f}x)")
    t.add_row("teacher size", fmt_bytes(s["teacher_bytes"]))
    t.add_row("spaces expanded", str(s["spaces_expanded"]))
    t.add_row("spaces frozen", str(s["spaces_frozen"]))
    for reason, n in Counter(f["reason"] for f in s["frozen"]).most_common():
        t.add_row("", f"{n} x {safe(reason)}")
    t.add_row("time", f"{s['seconds']:.2f} s")
    t.add_row("written", safe(s["output"]))
    common.out.print(t)


@app.command("plan")
@guarded
def plan_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratio: str = RATIO_OPT,
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights (checked against the model)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help=MODEL_ARG_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=INPUT_SHAPE_HELP),
    input: List[str] = INPUT_OPT,
    capture: str = CAPTURE_OPT,
    seed: int = SEED_OPT,
    equal_shares: bool = EQUAL_OPT,
    branches: str = typer.Option("none", "--branches", help=BRANCHES_HELP + " Counted in the teacher's size."),
    trust_pickle: bool = TRUST_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Dry run of `gpd expand` with the same options: the channel spaces, what froze and why, the teacher's size
    (branches included) and the memory to build it. Writes nothing."""
    from .. import api
    from ..branches import parse as parse_branches
    from ..report import plan_report

    r, args = ratio_of(ratio), model_args_of(model_arg)
    inputs_of(input_shape, input)
    kinds = parse_branches(branches)
    with steps(common.err, as_json) as step:
        step(f"loading {model}" + (f" with {weights}" if weights else ""))
        m = student(model, weights, args, trust_pickle, trust_remote_code=trust_remote_code)
        shape = inputs_of(input_shape, input, model, m)
        step(f"capturing and planning x{r:g}")
        # a dry run makes no teacher tensor: a teacher too large for this machine is shown, not refused
        planned = api.plan_expansion(m, shape, r, seed=seed, equal_shares=equal_shares, branches=kinds,
                                     source={"model": model}, dry_run=True, capture=capture)
        rep = {"model": model, **plan_report(planned), "branches": list(kinds),
               "branched_weights": len(planned.plan.branches)}
    emit(rep, as_json, _print_plan)
    return 0


def _ops(users: list[dict[str, str]], n: int = 4) -> str:
    names = [u["node"] for u in users[:n]]
    return ", ".join(names) + (f" +{len(users) - n} more" if len(users) > n else "")


def _print_plan(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd plan {safe(r['model'])} x{r['ratio']:g}")
    for col in ("space", "size", "teacher", "status", "used by"):
        t.add_column(col)
    for sp in r["spaces"]:
        status = sp["status"] + (f": {sp['reason']}" if sp["reason"] else "")
        color = {"expanded": "green", "frozen": "yellow"}.get(sp["status"], "dim")
        t.add_row(str(sp["space"]), str(sp["size"]), str(sp["expanded_size"]), f"[{color}]{safe(status)}[/]",
                  safe(_ops(sp["used_by"])))
    common.out.print(t)
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
        s.add_row("unsupported ops", safe(", ".join(r["unsupported_ops"])))
    common.out.print(s)


@app.command()
@guarded
def extract(
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand` (trained or not)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Student file to write (default: next to "
                                         "TEACHER, NAME.student.safetensors for NAME.teacher.safetensors or "
                                         "NAME.safetensors)."),
    hf_dir: Optional[str] = typer.Option(None, "--hf-dir", help="Write the student as a Hugging Face model "
                                         "directory (the hf:DIR model's config and processor files copied, weights "
                                         "as model.safetensors) that from_pretrained loads; the .safetensors file "
                                         "is then written only if -o is given."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Collapse a teacher into a student state dict, loadable strictly into the original architecture."""
    from .. import api
    from ..hf import is_hf, write_dir
    from ..io import atomic_save, check_output, read_plan

    if output is None and hf_dir is None:
        output = default_output([teacher], None, "student")
    if output is not None:
        check_output(output, force)
    source = None
    if hf_dir is not None:
        source = read_plan(teacher)[0].source.get("model") or ""
        if not is_hf(source):
            raise GPDError(f"--hf-dir needs a teacher expanded from an hf:DIR model; {teacher} was expanded from "
                           f"{source or 'Python'}")
    with steps(common.err, as_json) as step:
        step(f"reading {teacher} and collapsing it")
        t0 = time.perf_counter()
        state = api.extract(teacher)
        written = []
        if output is not None:
            step(f"writing {output}")
            atomic_save(state, output, durable=durable, overwrite=force)
            written.append(output)
        if hf_dir is not None:
            step(f"writing the Hugging Face directory {hf_dir}")
            written += write_dir(state, source, hf_dir, force)
    result = {"teacher": teacher, "output": output, "hf_dir": hf_dir, "written": written, "tensors": len(state),
              "student_params": sum(v.numel() for v in state.values()), "seconds": round(time.perf_counter() - t0, 3)}
    emit(result, as_json, lambda r: common.out.print(
        f"wrote {safe(', '.join(r['written']))}: {r['tensors']} tensors, {r['student_params']:,} values in "
        f"{r['seconds']:.2f} s", highlight=False))
    return 0


@app.command()
@guarded
def inspect(
    file: str = typer.Argument(..., help="A teacher file (from `gpd expand`) or a student file (from `gpd extract`)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Summarize a teacher or student file from its header, without loading its tensors."""
    from ..report import inspect_file

    rep = inspect_file(file)
    emit(rep, as_json, _print_inspect)
    return 0


def _print_inspect(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd inspect {safe(r['file'])}", show_header=False)
    if r["kind"] == "teacher":
        src = r["source"]
        t.add_row("format", f"gpd teacher ({r['format']})")
        t.add_row("ratio", f"{r['ratio']:g} (seed {r['seed']}{', equal shares' if r['equal_shares'] else ''})")
        t.add_row("source", safe(" ".join(f"{k}={v}" for k, v in src.items() if v not in (None, {}, []))))
        t.add_row("student parameters", f"{r['student_params']:,} in {r['student_tensors']} tensors")
        t.add_row("teacher parameters", f"{r['teacher_params']:,} ({r['param_ratio']:.2f}x)")
        t.add_row("spaces", f"{r['spaces_expanded']} expanded, {r['spaces_frozen']} frozen by the analysis")
        for reason, n in Counter(f["reason"] for f in r["frozen"]).most_common():
            t.add_row("", f"{n} x {safe(reason)}")
        if r["unsupported_ops"]:
            t.add_row("unsupported ops", safe(", ".join(r["unsupported_ops"])))
    else:
        t.add_row("format", "safetensors (no gpd plan: a student or other weights)")
        if r["metadata_keys"]:
            t.add_row("metadata keys", safe(", ".join(r["metadata_keys"])))
    t.add_row("tensors", f"{r['tensors']} ({', '.join(f'{n} {d}' for d, n in r['dtypes'].items())})")
    t.add_row("values", f"{r['values']:,}")
    t.add_row("size", f"{fmt_bytes(r['tensor_bytes'])} of tensors, {fmt_bytes(r['file_bytes'])} on disk")
    common.out.print(t)
    if r["kind"] == "teacher":
        s = Table(title="spaces")
        for col in ("space", "size", "teacher", "tensors"):
            s.add_column(col)
        for sp in r["spaces"]:
            names = sp["tensors"]
            s.add_row(str(sp["space"]), str(sp["size"]), str(sp["expanded_size"]),
                      safe(", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")))
        common.out.print(s)
