"""`gpd train`: GPD training of a student with its dynamic teacher (docs/training.md)."""
from __future__ import annotations

import os
from typing import Any, List, Optional

import typer

from ..errors import GPDError
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
    recipe: Optional[str] = typer.Option(None, "--recipe", help="The official recipe as a preset: gpd-scratch or "
                                         "gpd-finetune (docs/training.md); options given explicitly win."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs to train (default: 10)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Global batch size (split among torchrun processes)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 0.1 for sgd, 1e-3 for adamw)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (momentum 0.9) or adamw (default: sgd)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay, not on 1-d tensors "
                                                 "(default: 5e-4 for sgd, 0.05 for adamw)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default: 0.9)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up before the schedule "
                                                  "(epochs, may be fractional; default: 0)."),
    sched: Optional[str] = typer.Option(None, "--sched", help="Learning-rate schedule: cosine (to 0) or step "
                                        "(x --decay-rate at each of --decay-epochs) (default: cosine)."),
    decay_epochs: Optional[str] = typer.Option(None, "--decay-epochs", help="Epochs where the step schedule drops "
                                               "the rate (default: 30,60,90)."),
    decay_rate: Optional[float] = typer.Option(None, "--decay-rate", help="Factor of each drop of the step schedule "
                                               "(default: 0.1)."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Clip the global gradient norm at this value "
                                              "(the official recipes: 5; default: no clipping)."),
    ema: Optional[float] = typer.Option(None, "--ema", help="Keep an EMA of the student with this decay (e.g. "
                                        "0.99996): evaluated every epoch, written as student_ema.safetensors."),
    ratio: Optional[str] = typer.Option(None, "--ratio", "-r", help="Width expansion ratio of the dynamic teacher (>= 1) "
                                        "(default: 2)."),
    branches: Optional[str] = typer.Option(None, "--branches", help="Teacher branches: default (kxk,1x1-kxk,lowrank), "
                                           "none, or a list of 1x1, kxk, avg, 1x1-kxk, lowrank, full (default: default)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Weight of the dynamic teacher -> student "
                                        "distillation (default: 3)."),
    teacher_ce: float = typer.Option(1.0, "--teacher-ce", help="Weight of the dynamic teacher's cross-entropy on labels."),
    student_ce: float = typer.Option(1.0, "--student-ce", help="Weight of the student's cross-entropy on labels."),
    distill: Optional[str] = typer.Option(None, "--distill", help="Dynamic teacher -> student loss: kl (KL divergence "
                                          "at --temperature), sce (cross-entropy against the soft targets, smoothed "
                                          "by --sce-smoothing) or dkd (decoupled KD) (default: kl)."),
    static_distill: Optional[str] = typer.Option(None, "--static-distill", help="Loss of the static-teacher terms: "
                                                 "kl, sce or dkd (default: as --distill)."),
    dkd_alpha: float = typer.Option(1.0, "--dkd-alpha", help="DKD's weight of the target-class term."),
    dkd_beta: float = typer.Option(0.5, "--dkd-beta", help="DKD's weight of the non-target term (official: 0.5 for "
                                   "ResNet-18, 2 for MobileNet)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the distillation losses."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing of the label "
                                                    "cross-entropies (and of mixup's targets) (default: 0)."),
    sce_smoothing: Optional[float] = typer.Option(None, "--sce-smoothing", help="sce's soft target is (1 - e) p + e/K "
                                                  "(default: the official 0.1)."),
    mixup: float = typer.Option(0.0, "--mixup", help="Mixup alpha (timm's Mixup; 0: off)."),
    cutmix: float = typer.Option(0.0, "--cutmix", help="CutMix alpha (timm's Mixup; 0: off)."),
    branch_init: Optional[str] = typer.Option(None, "--branch-init", help="Branch scales of a new teacher: zero (the "
                                              "teacher starts as the student) or active (the official from-scratch "
                                              "values) (default: zero)."),
    amp: str = typer.Option("off", "--amp", help="Mixed precision: bf16, fp16 (with a gradient scaler) or off; the "
                            "parameters stay float32."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Train in the channels-last memory format."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (--compile-backend)."),
    compile_backend: str = typer.Option("inductor", "--compile-backend", help="torch.compile's backend."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log the metrics for TensorBoard in "
                                     "OUTPUT_DIR/tensorboard (needs the tensorboard package)."),
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
                                "(padded random crop), crop-flip (and horizontal flips) or timm (timm's "
                                "create_transform: random resized crop, flip, --rand-augment, --reprob)."),
    rand_augment: Optional[str] = typer.Option(None, "--rand-augment", help="timm's auto-augment policy with --augment "
                                               "timm, e.g. rand-m9-mstd0.5."),
    reprob: float = typer.Option(0.0, "--reprob", help="Random erasing probability."),
    mean: Optional[str] = typer.Option(None, "--mean", help="R,G,B mean of the input normalization (default: the "
                                       "model's own: timm's pretrained_cfg, a Hugging Face preprocessor config, "
                                       "torchvision's weights; else 0.5)."),
    std: Optional[str] = typer.Option(None, "--std", help="R,G,B std of the input normalization (default: the model's "
                                      "own, else 0.5)."),
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
    from ..training.recipes import resolve

    o = resolve(recipe, {
        "epochs": epochs, "lr": lr, "optimizer": optimizer, "momentum": momentum, "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs, "schedule": sched, "decay_epochs": _epochs_list(decay_epochs),
        "decay_rate": decay_rate, "clip_grad": clip_grad, "ema": ema, "distill": distill,
        "sce_smoothing": sce_smoothing, "lam": lam, "label_smoothing": label_smoothing, "ratio": ratio,
        "branch_init": branch_init})
    if teacher or resume:
        o["ratio"] = ratio  # a teacher file has its own (--branch-init applies to new teachers only)
    config = TrainConfig(
        epochs=o["epochs"], batch_size=batch_size, lr=o["lr"], optimizer=o["optimizer"], momentum=o["momentum"],
        weight_decay=o["weight_decay"], warmup_epochs=o["warmup_epochs"], lam=o["lam"], teacher_ce=teacher_ce,
        student_ce=student_ce, static_teacher_weight=static_teacher_weight,
        static_student_weight=static_student_weight, distill=o["distill"], static_distill=static_distill,
        temperature=temperature, label_smoothing=o["label_smoothing"], sce_smoothing=o["sce_smoothing"],
        dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, schedule=o["schedule"], decay_epochs=o["decay_epochs"],
        decay_rate=o["decay_rate"], clip_grad=o["clip_grad"], ema=o["ema"], branch_init=o["branch_init"],
        mixup=mixup, cutmix=cutmix, amp=amp, channels_last=channels_last, seed=seed, plain=plain, device=device,
        num_workers=num_workers, stop_after=stop_after, compile=compile_model, compile_backend=compile_backend,
        tensorboard=tensorboard)
    request = TrainRequest(
        data=data, output_dir=output_dir, model=model, model_args=model_arg, weights=weights, teacher=teacher,
        ratio=o["ratio"], branches=branches, image_size=image_size, data_seed=data_seed, synthetic_size=synthetic_size,
        val_fraction=val_fraction, augment=augment, rand_augment=rand_augment, reprob=reprob, mean=mean, std=std,
        static_teacher=static_teacher, static_weights=static_weights, static_model_args=static_model_arg,
        recipe=recipe, resume=resume, force=force, trust_pickle=trust_pickle)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Only rank 0 shows progress; it ends before training starts its own live display.
    with steps(common.err, as_json or not main_rank) as step:
        job = prepare(request, config, step, note)
    n = job.normalization
    intro = [] if data == "synthetic" else [f"inputs normalized with mean {list(n.mean)}, std {list(n.std)}, "
                                            f"{n.interpolation} resizing ({safe(n.source)})"]
    reporter = ConsoleReporter(common.out, intro) if main_rank and not as_json else Reporter()
    try:
        result = job.run(reporter)
    finally:
        if isinstance(reporter, ConsoleReporter):
            reporter.close()
    if not main_rank:
        return 0
    emit({"model": job.model, "output_dir": output_dir, "recipe": recipe,
          "normalization": job.normalization.as_dict(), **result}, as_json, _print_train)
    return 0


def _epochs_list(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GPDError(f"--decay-epochs takes whole epochs separated by commas, e.g. 30,60,90; got {text!r}") from None


def _print_train(r: dict[str, Any]) -> None:
    from ..training import format_metrics

    last = r["history"][-1] if r["history"] else None
    if last is not None and "val" in last:
        common.out.print(f"final validation ({r['epochs_done']}/{r['epochs']} epochs): {format_metrics(last['val'])}",
                         highlight=False, soft_wrap=True)
    written = [r["files"]["checkpoint"], r["files"]["state"]] + [
        r["files"][k] for k in ("student", "student_ema", "best", "metrics", "curves") if k in r["files"]]
    common.out.print(f"wrote {', '.join(safe(f) for f in dict.fromkeys(written))} in {r['seconds']:.1f} s",
                     highlight=False, soft_wrap=True)
    if not r["complete"]:
        common.out.print(f"stopped after epoch {r['epochs_done']} of {r['epochs']}: continue with --resume",
                         highlight=False)
