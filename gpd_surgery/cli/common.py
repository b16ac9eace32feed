"""What every `gpd` command shares: the app, the consoles, the error wrapper, option texts, loading students.

Imports stay light (typer, rich and gpd's own small modules): `gpd --help` must not pay for torch.fx's
rules, torchvision or timm. Commands import the heavy parts inside their bodies.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__
from ..errors import GPDError, first_line
from ..limits import MAX_SEED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Model surgery for Gap Preserving Distillation: widen a student into an exact teacher and back.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
out = Console()
err = Console(stderr=True)

MODEL_HELP = ("torchvision:NAME, timm:NAME, hf:DIR (a Hugging Face model directory), module.path:callable, or a "
              ".pt/.pth file holding a pickled nn.Module.")
TRUST_HELP = ("Allow unpickling a .pt MODEL, or --weights that a weights-only load refuses (a whole pickled model): "
              "runs code from the file.")
DURABLE_HELP = "Also fsync the output before naming it, so that it survives a power cut (slower: waits for the disk)."
BRANCH_KINDS = "1x1, kxk, avg, 1x1-kxk, lowrank, full"
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
DEBUG_OPT = typer.Option(False, "--debug", help="Show the full traceback of an error.")
TRUST_OPT = typer.Option(False, "--trust-pickle", help=TRUST_HELP)
MODEL_ARG_HELP = "KEY=VALUE passed to the model factory (repeatable), e.g. num_classes=10."
SEED_OPT = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the symmetry-breaking shares (and of "
                        "fractional maps).")
EQUAL_OPT = typer.Option(False, "--equal-shares", help="Split dense weights equally among copies.")
INPUT_SHAPE_HELP = "Example input shape, e.g. 1,3,224,224 (one input; see --input for several)."
INPUT_OPT = typer.Option([], "--input", help="An example input as [NAME=]SHAPE[:DTYPE], repeatable: positional "
                         "inputs in order, NAME= for a keyword input, DTYPE float (default), int64 or bool (token ids "
                         "are drawn within the model's embeddings), e.g. --input 1,3,224,224 --input ids=1,16:int64.")
CAPTURE_OPT = typer.Option("auto", "--capture", help="How the model is captured: fx (symbolic tracing), export "
                           "(torch.export) or auto (fx, and torch.export where fx cannot trace the model).")
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Allow an hf:DIR model whose config asks for code from "
                          "the directory (auto_map): runs that code.")


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


def guarded(fn: Callable[..., int | None]) -> Callable[..., None]:
    """The one error wrapper of every command: the command returns its exit code; a user error is exit 2 and
    one line, running out of memory too, anything else is a bug: exit 3 and one line. With ``--debug`` the
    exception propagates with its traceback, and main() still exits 2 or 3 (1 would read as "not
    equivalent")."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> None:
        debug = bool(kwargs.get("debug"))
        try:
            code = fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except GPDError as e:
            if debug:
                raise
            fail(str(e), 2)
        except Exception as e:
            if debug:
                raise
            if out_of_memory(e):  # the machine's limit, not a bug: the checks before allocating estimate
                fail(f"out of memory ({first_line(e, 300)}): free memory, or use a smaller --ratio, --input-shape "
                     "or model", 2)
            fail(f"internal error: {type(e).__name__}: {first_line(e, 300)} (rerun with --debug for the traceback, "
                 "and report it)", 3)
        raise typer.Exit(code or 0)

    return command


def out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def emit(result: dict[str, Any], as_json: bool, show: Callable[[dict[str, Any]], None]) -> None:
    """A command's result: one JSON object on stdout for scripts, else ``show`` draws it for people."""
    if as_json:
        print(json.dumps(result))
    else:
        show(result)


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {safe(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def note(message: str) -> None:
    err.print(safe(message), highlight=False, soft_wrap=True)


def safe(text: Any) -> str:
    """Text from files and specs as one inert line: no rich markup, no terminal control characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return escape(text)


def main() -> None:
    try:
        app()
    except GPDError:  # only with --debug: otherwise guarded() has made it one line and exit 2
        traceback.print_exc()
        sys.exit(2)
    except Exception:
        traceback.print_exc()
        sys.exit(3)


# -- students -------------------------------------------------------------------------------------
def student(model: str, weights: Optional[str], model_args: dict[str, Any], trust_pickle: bool,
            plan: Any = None, trust_remote_code: bool = False) -> Any:
    """``sources.load_student``, its notes on stderr."""
    from ..sources import load_student

    return load_student(model, weights, model_args, trust_pickle, plan, note, trust_remote_code)


# -- options --------------------------------------------------------------------------------------
def default_output(inputs: List[Optional[str]], spec: Optional[str], kind: str) -> str:
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


def is_file_spec(model: str) -> bool:
    return model.endswith((".pt", ".pth")) and ":" not in os.path.basename(model)  # as load_model tells them


def ratio_of(text: str) -> float:
    from ..expansion import check_ratio

    return check_ratio(text)


def input_shape_of(text: Optional[str], model: Optional[str] = None) -> Optional[tuple[int, ...]]:
    """The one place an input shape is chosen: ``--input-shape`` when given, else the model's usual one (with a
    MODEL spec), else None (the teacher's plan decides)."""
    from ..inputs import parse_shape
    from ..trace import default_input_shape

    if text:
        return parse_shape(text)
    return default_input_shape(model) if model else None


def inputs_of(shape_text: Optional[str], items: List[str], spec: Optional[str] = None, model: Any = None) -> Any:
    """The example inputs: ``--input`` specs, or ``--input-shape``, or the model's usual input (a Hugging Face
    model's from its config); None when neither is given and there is no model (the teacher's plan decides).
    A shape given for a Hugging Face model is its main input (``pixel_values``, ``input_ids``)."""
    from ..hf import default_inputs, main_input
    from ..inputs import InputSpec, parse_inputs

    if items and shape_text:
        raise GPDError("give the example input with --input-shape or with --input, not both")
    if items:
        return parse_inputs(items)
    main = main_input(model) if model is not None else None
    if shape_text:
        shape = input_shape_of(shape_text)
        return (InputSpec(shape, main[1], main[0]),) if main else shape
    if main is not None:
        return default_inputs(model)
    return input_shape_of(None, spec) if spec else None
