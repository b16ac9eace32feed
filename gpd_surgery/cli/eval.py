"""`gpd eval`: accuracy of a trained student, or of a teacher file's teacher and student, on a validation split."""
from __future__ import annotations

from typing import Any, List, Optional

import typer

from ..limits import MAX_SEED
from ..progress import steps
from . import common
from .common import DEBUG_OPT, JSON_OPT, MODEL_HELP, TRUST_OPT, app, emit, guarded, note, safe


@app.command(name="eval")
@guarded
def eval_cmd(
    first: Optional[str] = typer.Argument(None, metavar="MODEL", show_default=False,
                                          help=MODEL_HELP + " Optional with a teacher file (its plan records it); "
                                          "given alone, the argument is FILE."),
    second: Optional[str] = typer.Argument(None, metavar="FILE", show_default=False,
                                           help="A student file (student.safetensors, best.safetensors, a state "
                                           "dict) or a teacher file (teacher.safetensors: its teacher and student)."),
    data: str = typer.Option(..., "--data", help="The image folder (its val/ split, or the --val-fraction held out "
                             "as gpd train does) or 'synthetic'."),
    model_arg: List[str] = typer.Option([], "--model-arg", help="KEY=VALUE for the model factory (default with a "
                                        "teacher file: those its plan records)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="Square input size (default: the "
                                             "teacher file's, else 32 for synthetic, 224 for a folder)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share held out for validation when the folder "
                                       "has no val/ split (as given to gpd train)."),
    data_seed: int = typer.Option(0, "--data-seed", min=0, max=MAX_SEED, help="Seed of the synthetic dataset and of "
                                  "the --val-fraction split (as given to gpd train)."),
    synthetic_size: int = typer.Option(4000, "--synthetic-size", min=1, help="Training samples of the synthetic "
                                       "task (the validation split is a quarter as many; as given to gpd train)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Evaluation batch size."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when present)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="R,G,B mean (default: the model's own, else 0.5)."),
    std: Optional[str] = typer.Option(None, "--std", help="R,G,B std (default: the model's own, else 0.5)."),
    amp: str = typer.Option("off", "--amp", help="Mixed precision of the forward: bf16, fp16 or off."),
    trust_pickle: bool = TRUST_OPT,
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Top-1, top-5 and loss of a student file, or of a teacher file's dynamic teacher and its student, on the
    validation split of --data."""
    from ..errors import GPDError
    from ..training.evaluation import EvalRequest, run_eval

    if first is None:
        raise GPDError("pass FILE (a student or teacher file), after MODEL for a student file")
    model, file = (first, second) if second is not None else (None, first)
    q = EvalRequest(file=file, data=data, model=model, model_args=model_arg, image_size=image_size,
                    val_fraction=val_fraction, data_seed=data_seed, synthetic_size=synthetic_size,
                    batch_size=batch_size, device=device, mean=mean, std=std, amp=amp, trust_pickle=trust_pickle)
    with steps(common.err, as_json) as step:
        result = run_eval(q, step, note)
    emit(result, as_json, _print_eval)
    return 0


def _print_eval(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{safe(r['file'])} on {r['samples']:,} validation samples")
    for col in ("model", "top-1", "top-5", "loss"):
        t.add_column(col)
    for who in ("teacher", "student"):
        if who in r:
            m = r[who]
            t.add_row("dynamic teacher" if who == "teacher" else "student", f"{100 * m['top1']:.2f}%",
                      f"{100 * m['top5']:.2f}%", f"{m['loss']:.4f}")
    common.out.print(t)
