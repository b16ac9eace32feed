"""`gpd train`: GPD training of a student with its dynamic teacher (docs/training.md)."""
from __future__ import annotations

import os
from typing import Any, List, Optional

import typer

from ..limits import MAX_SEED
from ..progress import steps
from . import common
from .common import DEBUG_OPT, JSON_OPT, MODEL_HELP, TRUST_OPT, app, emit, guarded, note, safe


@app.command()
@guarded
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
    trust_pickle: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force", help="Start over in an --output-dir that holds a previous run."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
) -> int:
    """Train MODEL with Gap Preserving Distillation: a dynamic teacher (MODEL widened exactly) and the student,
    sharing parameters, trained together; then extract the student. Runs as DDP under torchrun."""
    from ..training import ConsoleReporter, Reporter, TrainConfig
    from ..training.job import TrainRequest, prepare

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, lam=lam, teacher_ce=teacher_ce,
        student_ce=student_ce, static_teacher_weight=static_teacher_weight,
        static_student_weight=static_student_weight, distill=distill, temperature=temperature,
        label_smoothing=label_smoothing, seed=seed, plain=plain, device=device, num_workers=num_workers,
        stop_after=stop_after)
    request = TrainRequest(
        data=data, output_dir=output_dir, model=model, model_args=model_arg, weights=weights, teacher=teacher,
        ratio=ratio, branches=branches, image_size=image_size, data_seed=data_seed, synthetic_size=synthetic_size,
        val_fraction=val_fraction, augment=augment, static_teacher=static_teacher, static_weights=static_weights,
        static_model_args=static_model_arg, resume=resume, force=force, trust_pickle=trust_pickle)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Only rank 0 shows progress; it ends before training starts its own live display.
    with steps(common.err, as_json or not main_rank) as step:
        job = prepare(request, config, step, note)
    reporter = ConsoleReporter(common.out) if main_rank and not as_json else Reporter()
    try:
        result = job.run(reporter)
    finally:
        if isinstance(reporter, ConsoleReporter):
            reporter.close()
    if not main_rank:
        return 0
    emit({"model": job.model, "output_dir": output_dir, **result}, as_json, _print_train)
    return 0


def _print_train(r: dict[str, Any]) -> None:
    from ..training import format_metrics

    last = r["history"][-1] if r["history"] else None
    if last is not None and "val" in last:
        common.out.print(f"final validation ({r['epochs_done']}/{r['epochs']} epochs): {format_metrics(last['val'])}",
                         highlight=False, soft_wrap=True)
    written = [r["files"]["checkpoint"], r["files"]["state"]] + ([r["files"]["student"]] if r["complete"] else [])
    common.out.print(f"wrote {', '.join(safe(f) for f in dict.fromkeys(written))} in {r['seconds']:.1f} s",
                     highlight=False, soft_wrap=True)
    if not r["complete"]:
        common.out.print(f"stopped after epoch {r['epochs_done']} of {r['epochs']}: continue with --resume",
                         highlight=False)
