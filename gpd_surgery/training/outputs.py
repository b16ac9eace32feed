"""What a run leaves for people besides its checkpoints: ``metrics.csv`` (one row per epoch), ``curves.png``
(teacher and student accuracy and their gap over the epochs) and, with ``--tensorboard``, TensorBoard events.

All are derived from the history alone (rewritten whole after every epoch, atomically), so a resumed run writes
the same files as an uninterrupted one, and a kill leaves the previous epoch's version.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from ..errors import GPDError
from ..io import atomic_write

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
BEST_FILE = "best.safetensors"
EMA_FILE = "student_ema.safetensors"
COLUMNS = ("epoch", "lr", "seconds", "train_objective", "train_teacher_loss", "train_teacher_acc", "train_student_loss",
           "train_student_acc", "val_teacher_loss", "val_teacher_acc", "val_teacher_top5", "val_student_loss",
           "val_student_acc", "val_student_top5", "gap", "val_ema_loss", "val_ema_acc", "val_ema_top5")


def row(record: dict[str, Any]) -> dict[str, Any]:
    """One epoch's record as a row of ``COLUMNS`` (empty where it has no value: no teacher when plain, no
    validation, no EMA). ``gap``: the teacher's validation accuracy minus the student's."""
    tr, va, ema = record.get("train", {}), record.get("val", {}), record.get("val_ema", {})
    out: dict[str, Any] = {"epoch": record["epoch"], "lr": record.get("lr"), "seconds": record.get("train_seconds")}
    out["train_objective"] = tr.get("objective")
    for who in ("teacher", "student"):
        for k in ("loss", "acc"):
            out[f"train_{who}_{k}"] = tr.get(f"{who}_{k}")
        for k in ("loss", "acc", "top5"):
            out[f"val_{who}_{k}"] = va.get(f"{who}_{k}")
    if "teacher_acc" in va:
        out["gap"] = va["teacher_acc"] - va["student_acc"]
    for k in ("loss", "acc", "top5"):
        out[f"val_ema_{k}"] = ema.get(f"student_{k}")
    return {k: ("" if out.get(k) is None else out[k]) for k in COLUMNS}


def write_metrics(output_dir: str, history: list[dict[str, Any]]) -> str:
    path = os.path.join(output_dir, METRICS_FILE)
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for record in history:
        w.writerow(row(record))
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data), overwrite=True)
    return path


def plotting_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_curves(output_dir: str, history: list[dict[str, Any]]) -> str | None:
    """``curves.png``: validation (else training) accuracy of the teacher and the student per epoch, and the gap
    between them. None when matplotlib is not installed (the caller says so once)."""
    if not plotting_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    split = "val" if history and all("val" in r for r in history) else "train"
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.4), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    acc, gap = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    teacher = [100 * r[split]["teacher_acc"] for r in history if "teacher_acc" in r[split]]
    student = [100 * r[split]["student_acc"] for r in history]
    if teacher:
        # Wider and under the student's: where the two are equal, the teacher's still shows around it.
        acc.plot(epochs, teacher, color="tab:blue", marker="o", markersize=9, linewidth=4, label="dynamic teacher")
    acc.plot(epochs, student, color="tab:orange", marker="o", markersize=4, linewidth=1.5, label="student")
    if history and all("val_ema" in r for r in history):
        acc.plot(epochs, [100 * r["val_ema"]["student_acc"] for r in history], color="tab:green", marker=".",
                 linestyle="--", label="student EMA")
    acc.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title="accuracy")
    acc.legend(loc="lower right")
    acc.grid(alpha=0.3)
    if teacher:
        gap.plot(epochs, [t - s for t, s in zip(teacher, student)], color="tab:red", marker="o")
    gap.axhline(0, color="grey", linewidth=0.8)
    gap.set(xlabel="epoch", ylabel="teacher - student (points)", title="gap")
    gap.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (acc, gap):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = os.path.join(output_dir, CURVES_FILE)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), overwrite=True)
    return path


class TensorBoard:
    """Scalars per epoch in ``OUTPUT_DIR/tensorboard`` (the same values as metrics.csv)."""

    def __init__(self, output_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GPDError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def epoch(self, record: dict[str, Any]) -> None:
        for k, v in row(record).items():
            if k != "epoch" and v != "":
                self.writer.add_scalar(k.replace("_", "/", 1), v, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
