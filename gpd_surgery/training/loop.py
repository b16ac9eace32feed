"""The training loop: ``Trainer`` (set up, one epoch at a time, validate, checkpoint, finish) and ``train()``,
the entry point that builds the model pair first.

SGD or AdamW, cosine schedule with linear warm-up (per step), a checkpoint every epoch (the teacher file and a
separate optimizer state), exact resume, DDP under torchrun, and the extracted student at the end. Exact resume:
the sampler's permutation derives from ``(seed, epoch)``, the data loader's worker seeds and the global
generators are reseeded from ``(seed, epoch, rank)`` at every epoch start.
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
from .checkpoints import (STATE_FILE, STUDENT_FILE, TEACHER_FILE, RunFolder, check_state, load_optimizer,
                          prepare_output)
from .config import TrainConfig
from .distributed import DistEnv, dist_env, epoch_seed, pick_device, seed_everything, sync_buffers
from .loss import GPDLoss
from .metrics import Meter, evaluate
from .models import GPDModel, PlainModel, num_outputs
from .optim import lr_at, make_optimizer
from .report import Reporter


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
                 identity: dict[str, Any] | None = None) -> None:
        self.model, self.train_set, self.val_set = model, train_set, val_set
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
        try:
            t_start = time.perf_counter()
            r = self._setup(resume, device, env)
            end = c.epochs if c.stop_after is None else min(c.epochs, r.start_epoch + c.stop_after)
            for epoch in range(r.start_epoch, end):  # none left (a finished run resumed): the student again
                self._epoch(r, epoch)
            return self._finish(r, t_start)
        finally:
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
        model = self.model.to(device)
        dtype = next(model.parameters()).dtype
        static = self._static(device, dtype)
        opt = make_optimizer(model, c)
        start_epoch, step, history = self._restore(opt, env) if resume else (0, 0, [])
        wrapped: nn.Module = model
        if env.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
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
                 start_epoch=start_epoch, step=step, history=history)
        if env.main:
            self.reporter.start(self._start_info(r))
        return r

    def _check_finite(self) -> None:
        if self.gpd:
            what = f"the teacher file {self.model.source_file}" if self.model.source_file else "the starting teacher"
        else:
            what = "the student's weights"
        check_finite(self.model.file_tensors(), what)
        if self.static is not None:
            check_finite(self.static.state_dict(), "the static teacher's weights")

    def _static(self, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
        """The static teacher, frozen, on the model's device and in its dtype."""
        if self.static is None:
            return None
        static = self.static.to(device=device, dtype=dtype).eval()
        for p in static.parameters():
            p.requires_grad_(False)
        return static

    def _restore(self, opt: torch.optim.Optimizer, env: DistEnv) -> tuple[int, int, list[dict[str, Any]]]:
        """The epoch, step and history of the checkpoint to resume; its optimizer state loaded into ``opt``."""
        path, state = self.folder.resume_state(self.model, env)
        start_epoch, step, history = check_state(state, path, self.config.epochs)
        names = {id(p): n for n, p in self.model.named_parameters()}
        load_optimizer(opt, state.get("optimizer"), path, self.config.optimizer, names)
        return start_epoch, step, history

    def _start_info(self, r: _Run) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "mode": self.mode, "device": str(r.device), "world_size": r.env.world,
            "train_samples": len(self.train_set), "val_samples": len(self.val_set) if self.val_set else 0,
            "steps_per_epoch": r.steps_per_epoch, "epochs": self.config.epochs, "start_epoch": r.start_epoch,
            "params": params,
            "student_params": sum(math.prod(x.shape) for x in self.model.plan.recipes if x.kind == "param")
            if self.gpd else params,
        }

    # -- epochs -------------------------------------------------------------------------------------
    def _lr(self, r: _Run, step: int) -> float:
        return lr_at(step, r.total_steps, r.warmup_steps, self.config.base_lr)

    def _epoch(self, r: _Run, epoch: int) -> None:
        """Train epoch ``epoch`` (0-based), validate, write its checkpoint, report it."""
        record = self._train_epoch(r, epoch)
        if self.val_set is not None and len(self.val_set):
            record["val"] = evaluate(self.model, self.val_set, r.local_batch, r.device, r.dtype, r.env,
                                     self.config.num_workers)
        r.history.append(record)
        self.folder.write(self.model, r.opt, epoch + 1, r.step, r.history, r.env)
        if r.env.main:
            self.reporter.epoch_end(record)

    def _train_epoch(self, r: _Run, epoch: int) -> dict[str, Any]:
        """One pass over the training set; its record: learning rate, metrics summed over the processes, time."""
        c, env = self.config, r.env
        seed_everything(epoch_seed(c.seed, epoch, env.rank))
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
        lr = self._lr(r, r.step)
        for g in r.opt.param_groups:
            g["lr"] = lr
        x = x.to(r.device, dtype=r.dtype, non_blocking=True)
        y = y.to(r.device, non_blocking=True)
        s_static = None
        if r.static is not None:
            with torch.no_grad():
                s_static = r.static(x)
        t_logits, s_logits = r.wrapped(x)
        loss, _ = self.loss(t_logits, s_logits, y, s_static)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
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
    with GPD (or alone with ``config.plain``) and write ``teacher.safetensors``, ``train_state.pt`` and, at the
    end, ``student.safetensors`` into ``output_dir``. Returns the history and the files written. ``identity``:
    whatever else the result depends on (data, model spec), checked on resume."""
    from ..api import expand

    config = config or TrainConfig()
    prepare_output(output_dir, resume, force)
    outputs = num_outputs(student, input_shape)
    if num_classes is not None and num_classes != outputs:
        raise GPDError(f"the dataset has {num_classes} classes but the model has {outputs} outputs: "
                       f"pass --model-arg num_classes={num_classes}")
    if static_teacher is not None:
        s_out = num_outputs(static_teacher, input_shape)
        if s_out != outputs:
            raise GPDError(f"the static teacher has {s_out} outputs but the student has {outputs}: they must "
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
        identity["ratio"] = model.plan.ratio
    trainer = Trainer(model, train_set, val_set, output_dir, config, static_teacher, reporter, identity)
    return trainer.run(resume=resume)
