"""`gpd eval`: top-1, top-5 and loss of a student file, or of a teacher file's teacher and student, on the validation
split of the data a run was trained on (the same split, transforms and normalization as ``gpd train``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable


from ..errors import GPDError
from ..io import PLAN_KEY, load_teacher_file, read_header
from ..sources import load_student, model_args_of, plan_model
from . import data as datasets
from .distributed import pick_device
from .metrics import evaluate
from .models import GPDModel, PlainModel, num_outputs
from .normalization import resolve


@dataclass
class EvalRequest:
    file: str  # a student file (state_dict) or a teacher file (with its plan)
    data: str  # an image folder, or "synthetic"
    model: str | None = None  # default with a teacher file: the spec its plan records
    model_args: list[str] = field(default_factory=list)
    image_size: int | None = None
    val_fraction: float = 0.1
    data_seed: int = 0
    synthetic_size: int = 4000
    batch_size: int = 64
    device: str | None = None
    mean: str | None = None
    std: str | None = None
    amp: str = "off"
    trust_pickle: bool = False


def is_teacher_file(path: str) -> bool:
    if not os.path.isfile(path):
        raise GPDError(f"{path} does not exist")
    if not path.endswith(".safetensors"):
        return False
    return PLAN_KEY in read_header(path)[0]


def run_eval(q: EvalRequest, step: Callable[[str], None], note: Callable[[str], None] | None = None
             ) -> dict[str, Any]:
    """The metrics of ``q.file`` on the validation split of ``q.data``: ``teacher`` and ``student`` (teacher file)
    or ``student`` alone."""
    if q.amp not in ("off", "bf16", "fp16"):
        raise GPDError(f"unknown --amp {q.amp!r}: choose off, bf16 or fp16")
    teacher = is_teacher_file(q.file)
    step(f"reading {q.file}")
    plan = load_teacher_file(q.file)[0] if teacher else None
    if q.model is None and plan is None:
        raise GPDError("pass MODEL, the student's spec: a student file does not record it")
    spec = q.model if q.model is not None else plan_model(plan, q.file, "gpd eval MODEL FILE")
    args = model_args_of(q.model_args, plan)
    planned = tuple(plan.source.get("input_shape") or ()) if plan is not None else ()
    size = q.image_size or (planned[-1] if len(planned) == 4 else (32 if q.data == "synthetic" else 224))
    shape = (1, 3, size, size)
    step(f"loading {spec}")
    student = load_student(spec, None if teacher else q.file, args, q.trust_pickle, plan, note)
    norm = resolve(student, spec, q.mean, q.std)
    step(f"loading the data ({q.data})")
    if q.data == "synthetic":
        _, val = datasets.synthetic(num_outputs(student, shape), size, q.synthetic_size, seed=q.data_seed)
    else:
        _, val, classes = datasets.image_folder(q.data, size, q.val_fraction, q.data_seed, "none", norm)
        if len(classes) != num_outputs(student, shape):
            raise GPDError(f"the dataset has {len(classes)} classes but the model has {num_outputs(student, shape)} "
                           "outputs (check --model-arg)")
    if val is None or not len(val):
        raise GPDError(f"{q.data} has no validation split (give a val/ folder or --val-fraction > 0)")
    model = GPDModel.from_file(q.file, student, shape) if teacher else PlainModel(student)
    device = pick_device(q.device, 0)
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    step(f"evaluating on {len(val):,} samples")
    metrics = evaluate(model, val, q.batch_size, device, dtype, amp=q.amp)
    out: dict[str, Any] = {"file": q.file, "kind": "teacher" if teacher else "student", "model": spec,
                           "samples": len(val), "normalization": norm.as_dict()}
    for who in ("teacher", "student"):
        if f"{who}_acc" in metrics:
            out[who] = {"top1": metrics[f"{who}_acc"], "top5": metrics[f"{who}_top5"], "loss": metrics[f"{who}_loss"]}
    return out
