"""What `gpd train` decides from its options before training: which option combinations go together, the
student's spec, model arguments and input size (given, or those a teacher file's plan records), the ratio and
branches of a new teacher, the data, the static teacher, the identity a resume is checked against and the
source the plan records. ``prepare`` turns a ``TrainRequest`` into a ``TrainJob``; ``TrainJob.run`` trains.

Students are loaded as every `gpd` command loads them (``sources.load_student``); notes go to ``note``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from ..branches import parse as parse_branches
from ..expansion import check_ratio
from ..sources import load_student, model_args_of, plan_model, weights_source
from ..errors import GPDError
from ..io import load_teacher_file
from ..plan import Plan
from ..progress import Step
from ..trace import parse_model_args
from . import data as datasets
from .checkpoints import TEACHER_FILE
from .config import TrainConfig
from .loop import train
from .models import num_outputs
from .normalization import Normalization, resolve
from .report import Reporter

AUGMENTS = ("none", "crop", "crop-flip", "timm")


@dataclass
class TrainRequest:
    """`gpd train`'s options beyond ``TrainConfig``: what is trained, on which data, starting from what."""

    data: str  # an image folder, or "synthetic"
    output_dir: str
    model: str | None = None  # the student's spec; None: the one a teacher file's plan records
    model_args: list[str] = field(default_factory=list)  # KEY=VALUE; none: those the plan records
    weights: str | None = None
    teacher: str | None = None  # a teacher file to start from
    ratio: str | None = None
    branches: str | None = None
    image_size: int | None = None
    data_seed: int = 0
    synthetic_size: int = 4000
    val_fraction: float = 0.1
    augment: str = "crop-flip"
    rand_augment: str | None = None  # timm's auto-augment policy, e.g. rand-m9-mstd0.5 (--augment timm)
    reprob: float = 0.0  # random erasing probability
    mean: str | None = None  # --mean R,G,B: overrides the model's own
    std: str | None = None
    static_teacher: str | None = None
    static_weights: str | None = None
    static_model_args: list[str] = field(default_factory=list)
    recipe: str | None = None  # recorded: a resume must use the same
    resume: bool = False
    force: bool = False
    trust_pickle: bool = False


@dataclass
class TrainJob:
    """A request resolved: the student and everything ``train()`` is called with."""

    request: TrainRequest
    config: TrainConfig
    model: str  # the student's spec
    student: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    ratio: float
    branches: tuple[str, ...]
    static: nn.Module | None
    identity: dict[str, Any]
    source: dict[str, Any]
    normalization: Normalization

    def run(self, reporter: Reporter | None = None) -> dict[str, Any]:
        q = self.request
        return train(self.student, self.train_set, self.val_set, q.output_dir, self.config,
                     input_shape=self.input_shape, ratio=self.ratio, branches=self.branches,
                     expand_seed=self.config.seed, teacher_file=q.teacher, static_teacher=self.static,
                     num_classes=self.num_classes, source=self.source, resume=q.resume, force=q.force,
                     reporter=reporter, identity=self.identity)


def prepare(q: TrainRequest, config: TrainConfig, step: Step, note: Callable[[str], None] | None = None) -> TrainJob:
    """Check the request, read the teacher file it starts from (``--teacher``, or the checkpoint with ``--resume``),
    load the student, the data and the static teacher; ``step`` names each stage as it begins, ``note`` receives
    what loading weights says on the way."""
    _check_options(q, config)
    source_file = os.path.join(q.output_dir, TEACHER_FILE) if q.resume and not config.plain else q.teacher
    if source_file:
        step(f"reading {source_file}")
    plan = load_teacher_file(source_file)[0] if source_file else None
    if plan is not None:
        _check_against_plan(q)
    model = q.model if q.model is not None else _planned_model(q, plan, source_file)
    ratio = check_ratio(q.ratio or "2")
    kinds = parse_branches(q.branches or "default")
    args = model_args_of(q.model_args, plan)
    size = _image_size(q, plan)
    shape = (1, 3, size, size)
    step(f"loading {model}")
    # From scratch, --seed draws the student's initialization too, so that the seeds of an experiment are
    # independent (with a teacher file or --weights the weights come from the file).
    scratch = not q.weights and plan is None and not q.resume
    m = load_student(model, None if q.resume else q.weights, args, q.trust_pickle, plan, note,
                     init_seed=config.seed if scratch else None)
    norm = resolve(m, model, q.mean, q.std)
    step(f"loading the data ({q.data})")
    if q.data == "synthetic":  # already standardized tensors: no normalization applies
        k = num_outputs(m, shape)
        train_set, val_set = datasets.synthetic(k, size, q.synthetic_size, seed=q.data_seed)
    else:
        train_set, val_set, classes = datasets.image_folder(q.data, size, q.val_fraction, q.data_seed, q.augment,
                                                            norm, q.rand_augment, q.reprob)
        k = len(classes)
    static = None
    if q.static_teacher:
        step(f"loading the static teacher {q.static_teacher}")
        static = load_student(q.static_teacher, q.static_weights, parse_model_args(q.static_model_args),
                              q.trust_pickle, note=note)
    source = {"model": model, "model_args": args, **weights_source(None if q.resume else q.weights)}
    if scratch:
        source["init_seed"] = config.seed  # `gpd verify TEACHER` rebuilds the same random student
    return TrainJob(q, config, model, m, train_set, val_set, k, shape, ratio, kinds, static,
                    _identity(q, model, args, size, norm), source, norm)


def _check_options(q: TrainRequest, config: TrainConfig) -> None:
    if q.augment not in AUGMENTS:
        raise GPDError(f"unknown --augment {q.augment!r}: choose {', '.join(AUGMENTS)}")
    if q.rand_augment and q.augment != "timm":
        raise GPDError("--rand-augment needs --augment timm (timm's create_transform)")
    if not 0 <= q.reprob <= 1:
        raise GPDError(f"--reprob must be in [0, 1], got {q.reprob}")
    if q.teacher and (q.resume or config.plain):
        raise GPDError(f"--teacher does not go with {'--resume' if q.resume else '--plain'}")
    if q.static_weights and not q.static_teacher:
        raise GPDError("--static-weights needs --static-teacher")


def _check_against_plan(q: TrainRequest) -> None:
    """Options that set up a new teacher or student, refused when a teacher file has its own."""
    if q.ratio is not None or q.branches is not None:
        raise GPDError("--ratio and --branches set up a new teacher: they do not apply to "
                       + ("--resume" if q.resume else "--teacher") + ", whose file has its own")
    if q.weights:
        raise GPDError("--weights initialize a new student: the teacher file already holds the weights")


def _planned_model(q: TrainRequest, plan: Plan | None, source_file: str | None) -> str:
    """No MODEL given: the spec the teacher file's plan records."""
    if plan is None:
        raise GPDError("pass MODEL, the student's spec (e.g. torchvision:resnet18): without --teacher or "
                       "--resume there is no plan to take it from")
    return plan_model(plan, source_file, f"gpd train MODEL --teacher {source_file}" if q.teacher else
                      "gpd train MODEL --resume")


def _image_size(q: TrainRequest, plan: Plan | None) -> int:
    """--image-size, else the teacher file's, else 32 for the synthetic task and 224 for an image folder."""
    planned = tuple(plan.source.get("input_shape") or ()) if plan is not None else ()
    return q.image_size or (planned[-1] if len(planned) == 4 else (32 if q.data == "synthetic" else 224))


def _identity(q: TrainRequest, model: str, args: dict[str, Any], size: int, norm: Normalization) -> dict[str, Any]:
    """What the result depends on beyond ``TrainConfig``: a resume must have the same."""
    identity = {"model": model, "model_args": args, "data": q.data, "image_size": size, "data_seed": q.data_seed}
    if q.data == "synthetic":
        identity["synthetic_size"] = q.synthetic_size
    else:
        identity.update(val_fraction=q.val_fraction, augment=q.augment, normalization=norm.as_dict())
        if q.augment == "timm" or q.reprob:
            identity.update(rand_augment=q.rand_augment, reprob=q.reprob)
    if q.static_teacher:
        identity["static_teacher"] = q.static_teacher
    if q.recipe:
        identity["recipe"] = q.recipe
    return identity
