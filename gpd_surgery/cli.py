"""The ``gpd`` command line: expand, verify, extract."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api
from .errors import GPDError
from .io import check_output, load_teacher_file, load_weights
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
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
DEBUG_OPT = typer.Option(False, "--debug", help="Show the full traceback of an error.")


def _run(debug: bool, fn: Callable[[], int | None]) -> None:
    """User errors become exit code 2 and one line; --debug shows the traceback."""
    try:
        code = fn()
    except GPDError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code or 0)


def _student(model: str, weights: Optional[str], model_args: dict[str, Any], trust_pickle: bool) -> Any:
    m = load_model(model, model_args, trust_pickle=trust_pickle)
    if weights:
        load_weights(m, weights)
    return m


@app.command()
def expand(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: str = typer.Option(..., "-o", "--output", help="Teacher file to write (.safetensors)."),
    ratio: str = typer.Option("2", "--ratio", "-r", help="Width expansion ratio (>= 1)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights: .safetensors, or a .pt state dict (loaded weights-only)."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE passed to the model factory (repeatable), e.g. num_classes=10."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    seed: int = typer.Option(0, "--seed", help="Seed of the symmetry-breaking shares (and of fractional maps)."),
    equal_shares: bool = typer.Option(False, "--equal-shares", help="Split dense weights equally among copies."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Widen MODEL into a teacher that computes exactly the same function, and write it with its plan."""

    def go() -> int:
        r = _ratio(ratio)
        check_output(output, force)
        args = parse_model_args(model_arg)
        shape = parse_shape(input_shape) if input_shape else default_input_shape(model)
        student = _student(model, weights, args, trust_pickle)
        source = {"model": model, "model_args": args, "weights": os.path.basename(weights) if weights else None}
        with _status(as_json, f"expanding {model} x{r:g}"):
            result = api.expand(student, shape, r, seed=seed, equal_shares=equal_shares, source=source)
            result.save(output)
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

    return contextlib.nullcontext() if quiet or not err.is_terminal else err.status(what)


def _print_expand(s: dict[str, Any]) -> None:
    t = Table(title=f"gpd expand {s['model']} x{s['ratio']:g}", show_header=False)
    t.add_row("student parameters", f"{s['student_params']:,}")
    t.add_row("teacher parameters", f"{s['teacher_params']:,} ({s['param_ratio']:.2f}x)")
    t.add_row("spaces expanded", str(s["spaces_expanded"]))
    t.add_row("spaces frozen", str(s["spaces_frozen"]))
    for reason, n in Counter(f["reason"] for f in s["frozen"]).most_common():
        t.add_row("", f"{n} x {reason}")
    t.add_row("time", f"{s['seconds']:.2f} s")
    t.add_row("written", s["output"])
    out.print(t)


@app.command()
def verify(
    model: str = typer.Argument(..., help=MODEL_HELP),
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand`."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Student weights, as given to `gpd expand`."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE for the factory (default: those the plan records)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape (default: the plan's)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: both when CUDA is present)."),
    inputs: int = typer.Option(3, "--inputs", min=1, help="Number of random inputs."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow loading a pickled module (runs code from the file)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Check that the teacher computes the student's function: exit 0 if it does, 1 if not, 2 on bad input."""

    def go() -> int:
        plan, tensors = load_teacher_file(teacher)
        args = parse_model_args(model_arg) if model_arg else dict(plan.source.get("model_args") or {})
        student = _student(model, weights, args, trust_pickle)
        shape = parse_shape(input_shape) if input_shape else None
        from .verify import verify as run_verify

        t0 = time.perf_counter()
        report = run_verify(student, plan, tensors, shape, device, inputs)
        result = {"model": model, "teacher": teacher, **report.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        if as_json:
            print(json.dumps(result))
        else:
            _print_verify(result)
        return 0 if report.passed else 1

    _run(debug, go)


def _print_verify(r: dict[str, Any]) -> None:
    t = Table(title=f"gpd verify {r['model']}")
    for col in ("device", "dtype", "max abs error", "max rel error", "tolerance", "result"):
        t.add_column(col)
    for c in r["checks"]:
        t.add_row(c["device"], c["dtype"], f"{c['max_abs']:.3e}", f"{c['max_rel']:.3e}", f"{c['tolerance']:.0e}",
                  "[green]pass[/]" if c["passed"] else "[red]FAIL[/]")
    out.print(t)
    d = r.get("divergence")
    if d:
        detail = f"max rel error {d['max_rel']:.3e}" if d.get("error") == "value" else d.get("detail", "")
        out.print(f"[red]teacher and student part at node[/] [bold]{d['node']}[/] ({d['op']}): {detail}",
                  highlight=False)
    elif not r["passed"]:
        out.print("[red]the outputs differ, but every node agrees in float64 on the CPU[/]")
    out.print("[green]equivalent[/]" if r["passed"] else "[red]NOT equivalent[/]")


@app.command()
def extract(
    teacher: str = typer.Argument(..., help="Teacher file written by `gpd expand` (trained or not)."),
    output: str = typer.Option(..., "-o", "--output", help="Student file to write (.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> None:
    """Collapse a teacher into a student state dict, loadable strictly into the original architecture."""

    def go() -> int:
        check_output(output, force)
        t0 = time.perf_counter()
        state = api.extract(teacher)
        from .io import atomic_save

        atomic_save(state, output)
        result = {
            "teacher": teacher, "output": output, "tensors": len(state),
            "student_params": sum(v.numel() for v in state.values()), "seconds": round(time.perf_counter() - t0, 3),
        }
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"wrote {output}: {result['tensors']} tensors, {result['student_params']:,} values "
                      f"in {result['seconds']:.2f} s", highlight=False)
        return 0

    _run(debug, go)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
