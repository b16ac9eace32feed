"""The training loop: ``Trainer`` (set up, one epoch at a time, validate, checkpoint, finish) and ``train()``,
the entry point that builds the model pair first.

SGD or AdamW, cosine or step schedule with linear warm-up (per step), gradient clipping, mixed precision
(autocast, a gradient scaler for fp16), mixup/cutmix (timm), the student's EMA, a checkpoint every epoch (the
teacher file and a separate optimizer state), exact resume, DDP under torchrun, and the extracted student at the
end; metrics.csv, curves.png and best.safetensors beside them (``outputs``). Exact resume: the sampler's
permutation derives from ``(seed, epoch)``, the data loader's worker seeds and the global generators (dropout,
augmentation, mixup) are reseeded from ``(seed, epoch, rank)`` at every epoch start.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import GPDError
from ..io import atomic_save
from .checkpoints import (STATE_FILE, STUDENT_FILE, TEACHER_FILE, RunFolder, check_state, load_optimizer,
                          prepare_output)
from .config import TrainConfig
from .distributed import DistEnv, dist_env, epoch_seed, pick_device, seed_everything, sync_buffers
from .ema import StudentEMA
from .loss import GPDLoss
from .metrics import Meter, autocast, evaluate
from .models import GPDModel, PlainModel, activate_branches, num_outputs
from .optim import lr_at, make_optimizer
from . import outputs
from .report import Reporter


def _mix(mixup: Any, x: torch.Tensor, y: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix on a batch; an odd batch (the last of an epoch) cannot pair its samples, so it keeps
    them and only gets soft (smoothed) labels like the others."""
    if len(x) % 2 == 0:
        return mixup(x, y)
    from timm.data.mixup import mixup_target

    return x, mixup_target(y, mixup.num_classes, 1.0, smoothing)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to train from NaN or infinite values: a step later they would read as a loss that diverged."""
    for k, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
                raise GPDError(f"cannot train: in {what}, {k} holds {kind} values ({bad} of {t.numel()}); start from "
                               "intact weights")


@dataclass
class _Run:
    """What a run holds from its setup to its end."""

    device: torch.device
    env: DistEnv
    dtype: torch.dtype
    wrapped: nn.Module  # the model, in DistributedDataParallel under torchrun
    static: nn.Module | None
    opt: torch.optim.Optimizer
    sampler: DistributedSampler
    loader: DataLoader
    loader_gen: torch.Generator
    local_batch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    scaler: Any = None  # torch.amp.GradScaler (a pass-through unless --amp fp16)
    ema: StudentEMA | None = None
    mixup: Any = None  # timm.data.Mixup
    milestones: tuple[int, ...] = ()  # step schedule: the steps where the rate drops
    memory_format: torch.memory_format = torch.contiguous_format
    tensorboard: Any = None
    plotted: int = -1  # the history length curves.png was last drawn for

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


class Trainer:
    """Train a ``GPDModel`` (or a ``PlainModel`` baseline) and write checkpoints into ``output_dir``.

    Files: ``teacher.safetensors`` (GPD) or ``student.safetensors`` (plain) and ``train_state.pt`` after every
    epoch; ``student.safetensors`` (GPD: extracted) when every epoch is done. Under torchrun the model is
    wrapped in DistributedDataParallel; only rank 0 reports and writes.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, output_dir: str,
                 config: TrainConfig, static_teacher: nn.Module | None = None, reporter: Reporter | None = None,
                 identity: dict[str, Any] | None = None, num_classes: int | None = None) -> None:
        self.model, self.train_set, self.val_set, self.num_classes = model, train_set, val_set, num_classes
        self.output_dir, self.config, self.static = output_dir, config, static_teacher
        self.reporter = reporter or Reporter()
        self.gpd = isinstance(model, GPDModel)
        self.loss = GPDLoss(config)
        self.folder = RunFolder(output_dir, self.gpd,
                                {"mode": self.mode, **(identity or {}), **config.fingerprint()})

    @property
    def mode(self) -> str:
        return "gpd" if self.gpd else "plain"

    def run(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        device = pick_device(c.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before nccl starts, so that each process talks from its own GPU
        env = dist_env(device.type)
        r = None
        try:
            t_start = time.perf_counter()
            r = self._setup(resume, device, env)
            end = c.epochs if c.stop_after is None else min(c.epochs, r.start_epoch + c.stop_after)
            for epoch in range(r.start_epoch, end):  # none left (a finished run resumed): the student again
                self._epoch(r, epoch)
            return self._finish(r, t_start)
        finally:
            if r is not None and r.tensorboard is not None:
                r.tensorboard.close()
            if env.initialized_here and dist.is_initialized():
                dist.destroy_process_group()

    # -- setup --------------------------------------------------------------------------------------
    def _setup(self, resume: bool, device: torch.device, env: DistEnv) -> _Run:
        c = self.config
        if c.batch_size % env.world:
            raise GPDError(f"--batch-size {c.batch_size} must be divisible by the number of processes ({env.world})")
        if env.main:
            try:
                os.makedirs(self.output_dir, exist_ok=True)
            except OSError as e:
                raise GPDError(f"cannot create {self.output_dir}: {e.strerror or e}") from None
        self._check_finite()
        memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
        model = self.model.to(device)
        if c.channels_last:  # only the layout of 4-d tensors changes: the files hold the same values
            model = model.to(memory_format=memory_format)
        dtype = next(model.parameters()).dtype
        static = self._static(device, dtype, memory_format)
        opt = make_optimizer(model, c)
        scaler = torch.amp.GradScaler(device.type, enabled=c.amp == "fp16")
        ema = StudentEMA(model, c.ema).to(device) if c.ema is not None else None
        start_epoch, step, history = self._restore(opt, env, scaler, ema) if resume else (0, 0, [])
        wrapped: nn.Module = model
        if env.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if c.compile:
            wrapped = torch.compile(wrapped, backend=c.compile_backend)
        local_batch = c.batch_size // env.world
        sampler = DistributedSampler(self.train_set, num_replicas=env.world, rank=env.rank, shuffle=True,
                                     seed=c.seed, drop_last=False)
        loader_gen = torch.Generator()
        loader = DataLoader(self.train_set, batch_size=local_batch, sampler=sampler, num_workers=c.num_workers,
                            generator=loader_gen, pin_memory=device.type == "cuda", persistent_workers=False)
        if len(loader) == 0:
            raise GPDError("the training set is empty")
        r = _Run(device, env, dtype, wrapped, static, opt, sampler, loader, loader_gen, local_batch,
                 total_steps=c.epochs * len(loader), warmup_steps=int(round(c.warmup_epochs * len(loader))),
                 start_epoch=start_epoch, step=step, history=history, scaler=scaler, ema=ema,
                 mixup=self._mixup(), milestones=tuple(e * len(loader) for e in c.decay_epochs),
                 memory_format=memory_format)
        if env.main and c.tensorboard:
            r.tensorboard = outputs.TensorBoard(self.output_dir)
        if env.main:
            self.reporter.start(self._start_info(r))
        return r

    def _mixup(self) -> Any:
        c = self.config
        if not (c.mixup or c.cutmix):
            return None
        try:
            from timm.data import Mixup
        except ImportError:
            raise GPDError("--mixup and --cutmix use timm's Mixup: pip install 'gpd-surgery[timm]'") from None
        if self.num_classes is None:
            raise GPDError("--mixup and --cutmix need the number of classes")
        return Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing,
                     num_classes=self.num_classes)

    def _check_finite(self) -> None:
        if self.gpd:
            what = f"the teacher file {self.model.source_file}" if self.model.source_file else "the starting teacher"
        else:
            what = "the student's weights"
        check_finite(self.model.file_tensors(), what)
        if self.static is not None:
            check_finite(self.static.state_dict(), "the static teacher's weights")

    def _static(self, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format
                ) -> nn.Module | None:
        """The static teacher, frozen, on the model's device and in its dtype."""
        if self.static is None:
            return None
        static = self.static.to(device=device, dtype=dtype).eval()
        if memory_format == torch.channels_last:
            static = static.to(memory_format=memory_format)
        for p in static.parameters():
            p.requires_grad_(False)
        return static

    def _restore(self, opt: torch.optim.Optimizer, env: DistEnv, scaler: Any, ema: StudentEMA | None
                 ) -> tuple[int, int, list[dict[str, Any]]]:
        """The epoch, step and history of the checkpoint to resume; its optimizer state loaded into ``opt``, the
        gradient scaler's and the EMA's into theirs."""
        path, state = self.folder.resume_state(self.model, env)
        start_epoch, step, history = check_state(state, path, self.config.epochs)
        names = {id(p): n for n, p in self.model.named_parameters()}
        load_optimizer(opt, state.get("optimizer"), path, self.config.optimizer, names)
        if ema is not None:
            ema.load(state.get("ema"), path)
        if scaler.is_enabled():
            saved = state.get("scaler")
            if not (isinstance(saved, dict) and isinstance(saved.get("scale"), float) and math.isfinite(saved["scale"])
                    and saved["scale"] > 0):
                raise GPDError(f"cannot resume: {path} holds no valid fp16 gradient scaler state; start over with "
                               "--force")
            scaler.load_state_dict(saved)
        return start_epoch, step, history

    def _start_info(self, r: _Run) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        tensors = self.model.file_tensors()
        return {
            "checkpoint_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "mode": self.mode, "device": str(r.device), "world_size": r.env.world,
            "train_samples": len(self.train_set), "val_samples": len(self.val_set) if self.val_set else 0,
            "steps_per_epoch": r.steps_per_epoch, "epochs": self.config.epochs, "start_epoch": r.start_epoch,
            "params": params,
            "student_params": sum(math.prod(x.shape) for x in self.model.plan.recipes if x.kind == "param")
            if self.gpd else params,
        }

    # -- epochs -------------------------------------------------------------------------------------
    def _lr(self, r: _Run, step: int) -> float:
        c = self.config
        return lr_at(step, r.total_steps, r.warmup_steps, c.base_lr, c.schedule, r.milestones, c.decay_rate)

    def _epoch(self, r: _Run, epoch: int) -> None:
        """Train epoch ``epoch`` (0-based), validate, write best.safetensors when it is the best so far, the
        checkpoint, then the metrics and curves; report it."""
        c = self.config
        record = self._train_epoch(r, epoch)
        if self.val_set is not None and len(self.val_set):
            record["val"] = evaluate(self.model, self.val_set, r.local_batch, r.device, r.dtype, r.env,
                                     c.num_workers, c.amp, memory_format=r.memory_format)
            if r.ema is not None:
                record["val_ema"] = evaluate(self.model, self.val_set, r.local_batch, r.device, r.dtype, r.env,
                                             c.num_workers, c.amp, forward=r.ema.forward,
                                             memory_format=r.memory_format)
            self._keep_best(r, record)
        r.history.append(record)
        # The best file goes before the checkpoint: a run killed in between redoes this epoch exactly.
        extra: dict[str, Any] = {}
        if r.ema is not None:
            extra["ema"] = r.ema.state_dict()
        if r.scaler.is_enabled():
            extra["scaler"] = r.scaler.state_dict()
        self.folder.write(self.model, r.opt, epoch + 1, r.step, r.history, r.env, extra)
        if r.env.main:
            self._write_outputs(r)
            if r.tensorboard is not None:
                r.tensorboard.epoch(record)
            self.reporter.epoch_end(record)

    def _keep_best(self, r: _Run, record: dict[str, Any]) -> None:
        """best.safetensors: the student (or its EMA) with the highest validation accuracy so far; the record
        says which (``best``: ``student`` or ``ema``) when this epoch's is the new best."""
        def score(rec: dict[str, Any]) -> tuple[float, str]:
            cands = [(rec["val"]["student_acc"], "student")]
            if "val_ema" in rec:
                cands.append((rec["val_ema"]["student_acc"], "ema"))
            return max(cands, key=lambda c: c[0])

        acc, which = score(record)
        if r.history and acc <= max(score(h)[0] for h in r.history if "val" in h):
            return
        record["best"] = which
        if r.env.main:
            state = r.ema.student_file(self.model) if which == "ema" and r.ema is not None \
                else self.model.student_state_dict()
            atomic_save(state, self.folder.path(outputs.BEST_FILE), durable=True, overwrite=True)

    def _write_outputs(self, r: _Run) -> None:
        outputs.write_metrics(self.output_dir, r.history)
        if outputs.write_curves(self.output_dir, r.history) is None and r.plotted == -1:
            self.reporter.note("curves.png needs matplotlib: pip install 'gpd-surgery[plot]'")
        r.plotted = len(r.history)

    def _train_epoch(self, r: _Run, epoch: int) -> dict[str, Any]:
        """One pass over the training set; its record: learning rate, metrics summed over the processes, time."""
        c, env = self.config, r.env
        seed_everything(epoch_seed(c.seed, epoch, env.rank))  # python's and numpy's too: timm's Mixup draws there
        r.sampler.set_epoch(epoch)
        r.loader_gen.manual_seed(epoch_seed(c.seed, epoch, env.rank) ^ 0x5DEECE66D)
        self.model.train()
        meter = Meter(r.device)
        if env.main:
            self.reporter.epoch_start(epoch, c.epochs, r.steps_per_epoch)
        t0 = last_report = time.perf_counter()
        for i, (x, y) in enumerate(r.loader):
            self._step(r, x, y, meter, epoch)
            if env.main and (time.perf_counter() - last_report > 0.2 or i == r.steps_per_epoch - 1):
                last_report = time.perf_counter()  # reading the meter waits for the device: not every step
                self.reporter.step(r.step, {"lr": self._lr(r, r.step - 1), **meter.summary(self.gpd, objective=True)},
                                   i + 1)
        meter.reduce(env)
        sync_buffers(self.model, env)  # rank 0's running statistics everywhere: what DDP's next forward would use
        return {"epoch": epoch + 1, "lr": self._lr(r, r.step - 1), "train": meter.summary(self.gpd, objective=True),
                "train_seconds": time.perf_counter() - t0}

    def _step(self, r: _Run, x: torch.Tensor, y: torch.Tensor, meter: Meter, epoch: int) -> None:
        """One optimizer step on a batch; its metrics go to ``meter``."""
        c = self.config
        lr = self._lr(r, r.step)
        for g in r.opt.param_groups:
            g["lr"] = lr
        x = x.to(r.device, dtype=r.dtype, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=r.memory_format)
        y = y.to(r.device, non_blocking=True)
        if r.mixup is not None:
            x, y = _mix(r.mixup, x, y, c.label_smoothing)
        s_static = None
        with autocast(r.device, c.amp):
            if r.static is not None:
                with torch.no_grad():
                    s_static = r.static(x)
            t_logits, s_logits = r.wrapped(x)
        loss, _ = self.loss(t_logits, s_logits, y, s_static)  # in float32 (or the model's dtype)
        r.opt.zero_grad(set_to_none=True)
        r.scaler.scale(loss).backward()
        if c.clip_grad is not None:
            r.scaler.unscale_(r.opt)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
        r.scaler.step(r.opt)
        r.scaler.update()
        if r.ema is not None:
            r.ema.update()
        r.step += 1
        if not torch.isfinite(loss):
            raise GPDError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {r.step}: "
                           "lower --lr or add --warmup-epochs")
        meter.add(y, s_logits.detach(), None if t_logits is None else t_logits.detach(), loss)

    # -- the end --------------------------------------------------------------------------------------
    def _finish(self, r: _Run, t_start: float) -> dict[str, Any]:
        """The student file once every epoch is done; the run's result, reported."""
        c, env = self.config, r.env
        done = len(r.history) >= c.epochs
        files = {"checkpoint": self.folder.checkpoint_file, "state": self.folder.path(STATE_FILE)}
        if done:
            files["student"] = self.folder.write_student(self.model, env)
            if r.ema is not None:
                files["student_ema"] = self.folder.path(outputs.EMA_FILE)
                if env.main:
                    atomic_save(r.ema.student_file(self.model), files["student_ema"], durable=True, overwrite=True)
        if env.main and r.history:
            if r.plotted != len(r.history):  # a resumed run with nothing left, or one killed before its outputs
                self._write_outputs(r)
            files["metrics"] = self.folder.path(outputs.METRICS_FILE)
            if os.path.exists(self.folder.path(outputs.CURVES_FILE)):
                files["curves"] = self.folder.path(outputs.CURVES_FILE)
            if os.path.exists(self.folder.path(outputs.BEST_FILE)):
                files["best"] = self.folder.path(outputs.BEST_FILE)
        if env.active:
            dist.barrier()
        result = {"mode": self.mode, "epochs_done": len(r.history), "epochs": c.epochs,
                  "complete": done, "history": r.history, "files": files, "world_size": env.world,
                  "seconds": time.perf_counter() - t_start}
        if env.main:
            self.reporter.finish(result)
        return result


def train(student: nn.Module, train_set: Dataset, val_set: Dataset | None, output_dir: str,
          config: TrainConfig | None = None, *, input_shape: tuple[int, ...], ratio: float = 2.0,
          branches: str | tuple[str, ...] = "default", expand_seed: int = 0, teacher_file: str | None = None,
          static_teacher: nn.Module | None = None, num_classes: int | None = None, source: dict[str, Any] | None = None,
          resume: bool = False, force: bool = False, reporter: Reporter | None = None,
          identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Expand ``student`` (or load ``teacher_file``, or the checkpoint in ``output_dir`` with ``resume``), train it
    with GPD (or alone with ``config.plain``) and write ``teacher.safetensors``, ``train_state.pt``, ``metrics.csv``,
    ``curves.png``, ``best.safetensors`` and, at the end, ``student.safetensors`` into ``output_dir``. A new
    teacher's branches start at zero, or at the official from-scratch values with ``config.branch_init``
    ``active``. Returns the history and the files written. ``identity``:
    whatever else the result depends on (data, model spec), checked on resume."""
    from ..api import expand

    config = config or TrainConfig()
    prepare_output(output_dir, resume, force)
    n_out = num_outputs(student, input_shape)
    if num_classes is not None and num_classes != n_out:
        raise GPDError(f"the dataset has {num_classes} classes but the model has {n_out} outputs: "
                       f"pass --model-arg num_classes={num_classes}")
    if static_teacher is not None:
        s_out = num_outputs(static_teacher, input_shape)
        if s_out != n_out:
            raise GPDError(f"the static teacher has {s_out} outputs but the student has {n_out}: they must "
                           "predict the same classes (see --static-model-arg)")
    identity = {**(identity or {}), "input_shape": list(input_shape)}
    if config.plain:
        model: nn.Module = PlainModel(copy.deepcopy(student))
        if resume:
            from ..io import load_weights

            load_weights(model.student, os.path.join(output_dir, STUDENT_FILE))
    else:
        if resume:
            model = GPDModel.from_file(os.path.join(output_dir, TEACHER_FILE), student, input_shape)
        elif teacher_file is not None:
            model = GPDModel.from_file(teacher_file, student, input_shape)
        else:
            model = GPDModel.from_expanded(expand(copy.deepcopy(student).eval(), input_shape, ratio,
                                                  seed=expand_seed, branches=branches, source=source))
            if config.branch_init == "active":
                activate_branches(model)
        identity["ratio"] = model.plan.ratio
    trainer = Trainer(model, train_set, val_set, output_dir, config, static_teacher, reporter, identity, n_out)
    return trainer.run(resume=resume)
