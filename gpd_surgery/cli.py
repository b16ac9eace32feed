"""The ``gpd`` command line: expand, verify, extract, plan, inspect."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import api
from .branches import parse as parse_branches
from .errors import GPDError
from .io import atomic_save, check_output, load_teacher_file, load_weights
from .memory import check_memory, fmt_bytes
from .plan import MAX_SEED
from .trace import default_input_shape, load_model, parse_model_args, parse_shape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model surgery for Gap Preserving Distillation: widen a student into an exact teacher and back.",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

MODEL_HELP = "torchvision:NAME, timm:NAME, module.path:callable, or a .pt/.pth file holding a pickled nn.Module."
DURABLE_HELP = "Also fsync the output before naming it, so that it survives a power cut (slower: waits for the disk)."
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
DEBUG_OPT = typer.Option(False, "--debug", help="Show the full traceback of an error.")


def _run(debug: bool, fn: Callable[[], int | None]) -> None:
    """User errors: exit 2 and one line. Anything else is a bug: exit 3 and one line. --debug: the traceback."""
    try:
        code = fn()
    except GPDError as e:
        if debug:
            raise
        _fail(str(e), 2)
    except Exception as e:
        if debug:
            raise
        what = "out of memory" if isinstance(e, MemoryError) else "internal error"
        _fail(f"{what}: {type(e).__name__}: {e} (rerun with --debug for the traceback, and report it)", 3)
    raise typer.Exit(code or 0)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {_safe(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _safe(text: Any) -> str:
    """Text from files and specs as one inert line: no rich markup, no terminal control characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return escape(text)


def _student(model: str, weights: Optional[str], model_args: dict[str, Any], trust_pickle: bool) -> Any:
    try:
        m = load_model(model, model_args, trust_pickle=trust_pickle)
    except GPDError:
        raise
    except Exception as e:  # the factory's own complaint about its arguments, e.g. a negative width
        raise GPDError(f"{model} could not be built with {model_args}: {type(e).__name__}: {e}") from None
    if weights:
        load_weights(m, weights)
    return m


def _options(model: str, ratio: str, model_arg: List[str], input_shape: Optional[str]
             ) -> tuple[float, dict[str, Any], tuple[int, ...]]:
    args = parse_model_args(model_arg)
    shape = parse_shape(input_shape) if input_shape else default_input_shape(model)
    return _ratio(ratio), args, shape


@app.command()
def expand(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: str = typer.Option(..., "-o", "--output", help="Teacher file to write (.safetensors)."),
    ratio: str = typer.Option("2", "--ratio", "-r", help="Width expansion ratio (>= 1)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights: .safetensors, or a .pt state dict (loaded weights-only)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE passed to the model factory (repeatable), e.g. num_classes=10."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the symmetry-breaking shares (and of fractional maps)."),
    equal_shares: bool = typer.Option(False, "--equal-shares", help="Split dense weights equally among copies."),
    branches: str = typer.Option("none", "--branches", help="Linear branches on teacher convs and linears: none, default "
                                 "(kxk,1x1-kxk,lowrank) or a list of 1x1, kxk, avg, 1x1-kxk, lowrank, full."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output, and skip the memory check."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Widen MODEL into a teacher that computes exactly the same function, and write it with its plan."""

    def go() -> int:
        r, args, shape = _options(model, ratio, model_arg, input_shape)
        kinds = parse_branches(branches)
        check_output(output, force)
        student = _student(model, weights, args, trust_pickle)
        source = {"model": model, "model_args": args, "weights": os.path.basename(weights) if weights else None}
        with _status(as_json, f"expanding {model} x{r:g}"):
            planned = api.plan_expansion(student, shape, r, seed=seed, equal_shares=equal_shares, source=source,
                                         branches=kinds)
            check_memory(planned.build_bytes(), force)  # before any teacher tensor exists
            result = planned.build()
            result.save(output, durable=durable)
        summary = {"output": output, "model": model, **result.summary()}
        if as_json:
            print(json.dumps(summary))
        else:
            _print_expand(summary)
        return 0

    _run(debug, go)


def _ratio(text: str) -> float:
    from .expand import check_ratio

    return check_ratio(text)


def _status(quiet: bool, what: str) -> Any:
    import contextlib

    return contextlib.nullcontext() if quiet or not err.is_terminal else err.status(_safe(what))


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
    model: str = typer.Argument(..., help=MODEL_HELP),
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand`."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights, as given to `gpd expand`."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE for the factory (default: those the plan records)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape (default: the plan's)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: both when CUDA is present)."),
    inputs: int = typer.Option(3, "--inputs", min=1, max=1000, help="Number of random inputs."),
    trained: bool = typer.Option(False, "--trained", help="The teacher was trained: report teacher vs student for "
                                 "information only; the exit code follows the extraction check alone."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Check that the teacher computes the student's function (IR) and that the extracted student equals the
    teacher's student view (CBR): exit 0 if both hold, 1 if not, 2 on bad input."""

    def go() -> int:
        plan, tensors = load_teacher_file(teacher)
        args = parse_model_args(model_arg) if model_arg else dict(plan.source.get("model_args") or {})
        student = _student(model, weights, args, trust_pickle)
        shape = parse_shape(input_shape) if input_shape else None
        from .verify import verify as run_verify

        t0 = time.perf_counter()
        report = run_verify(student, plan, tensors, shape, device, inputs, trained=trained)
        result = {"model": model, "teacher": teacher, **report.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        if as_json:
            print(json.dumps(result))
        else:
            _print_verify(result)
        return 0 if report.passed else 1

    _run(debug, go)


def _print_verify(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd verify {_safe(r['model'])}")
    for col in ("check", "device", "dtype", "max abs error", "max rel error", "tolerance", "result"):
        t.add_column(col)
    ir = "teacher = student" + (" (info)" if r["trained"] else "")
    for name, checks in ((ir, r["checks"]), ("extracted = student view", r["extraction"])):
        for c in checks:
            result = "[green]pass[/]" if c["passed"] else ("[yellow]differs[/]" if r["trained"] and name == ir
                                                           else "[red]FAIL[/]")
            t.add_row(name, c["device"], c["dtype"], f"{c['max_abs']:.3e}", f"{c['max_rel']:.3e}",
                      f"{c['tolerance']:.0e}", result)
    out.print(t)
    d = r.get("divergence")
    if d:
        detail = f"max rel error {d['max_rel']:.3e}" if d.get("error") == "value" else d.get("detail", "")
        out.print(f"[red]teacher and student part at node[/] [bold]{_safe(d['node'])}[/] ({_safe(d['op'])}): "
                  f"{_safe(detail)}",
                  highlight=False)
    elif not r["ir_passed"] and not r["trained"]:
        out.print("[red]the outputs differ, but every node agrees in float64 on the CPU[/]")
    out.print("[green]equivalent[/]" if r["passed"] else "[red]NOT equivalent[/]")


@app.command()
def extract(
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand` (trained or not)."),
    output: str = typer.Option(..., "-o", "--output", help="Student file to write (.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    durable: bool = typer.Option(False, "--durable", help=DURABLE_HELP),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Collapse a teacher into a student state dict, loadable strictly into the original architecture."""

    def go() -> int:
        check_output(output, force)
        t0 = time.perf_counter()
        state = api.extract(teacher)
        atomic_save(state, output, durable=durable)
        result = {
            "teacher": teacher, "output": output, "tensors": len(state),
            "student_params": sum(v.numel() for v in state.values()), "seconds": round(time.perf_counter() - t0, 3),
        }
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
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Dry run of `gpd expand`: the channel spaces, what froze and why, the teacher's size. Writes nothing."""

    def go() -> int:
        from .report import plan_report

        r, args, shape = _options(model, ratio, model_arg, input_shape)
        student = _student(model, weights, args, trust_pickle)
        with _status(as_json, f"planning {model} x{r:g}"):
            rep = {"model": model, **plan_report(api.plan_expansion(student, shape, r, source={"model": model}))}
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
    model: str = typer.Argument(..., help=MODEL_HELP + " The student."),
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
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Start over in an --output-dir that holds a previous run."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Train MODEL with Gap Preserving Distillation: a dynamic teacher (MODEL widened exactly) and the student,
    sharing parameters, trained together; then extract the student. Runs as DDP under torchrun."""

    def go() -> int:
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
        source_file = os.path.join(output_dir, gt.TEACHER_FILE) if resume and not plain else teacher
        plan = load_teacher_file(source_file)[0] if source_file else None
        if plan is not None and (ratio is not None or branches is not None):
            raise GPDError("--ratio and --branches set up a new teacher: they do not apply to "
                           + ("--resume" if resume else "--teacher") + ", whose file has its own")
        if plan is not None and weights:
            raise GPDError("--weights initialize a new student: the teacher file already holds the weights")
        r = _ratio(ratio or "2")
        kinds = parse_branches(branches or "default")
        args = parse_model_args(model_arg) if model_arg or plan is None else dict(plan.source.get("model_args") or {})
        planned = tuple(plan.source.get("input_shape") or ()) if plan is not None else ()
        size = image_size or (planned[-1] if len(planned) == 4 else (32 if data == "synthetic" else 224))
        shape = (1, 3, size, size)
        student = _student(model, None if resume else weights, args, trust_pickle)
        if data == "synthetic":
            k = gt.num_outputs(student, shape)
            train_set, val_set = datasets.synthetic(k, size, synthetic_size, seed=data_seed)
        else:
            train_set, val_set, classes = datasets.image_folder(data, size, val_fraction, data_seed, augment)
            k = len(classes)
        static = None
        if static_teacher:
            static = _student(static_teacher, static_weights, parse_model_args(static_model_arg), trust_pickle)
        identity = {"model": model, "model_args": args, "data": data, "image_size": size, "data_seed": data_seed}
        if data == "synthetic":
            identity["synthetic_size"] = synthetic_size
        else:
            identity.update(val_fraction=val_fraction, augment=augment)
        if static_teacher:
            identity["static_teacher"] = static_teacher
        source = {"model": model, "model_args": args, "weights": os.path.basename(weights) if weights else None}
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
    app()


if __name__ == "__main__":
    main()
