"""GPD training: the dynamic teacher and the student trained together, with shared parameters.

``GPDModel`` holds the dynamic teacher (a trainable fx.GraphModule) and the student view, whose
parameters are ``collapse(teacher parameters)`` and whose buffers (BatchNorm statistics) are its
own. One ``forward(x)`` returns ``(teacher_logits, student_logits)``, so DistributedDataParallel
sees a single forward and backward. ``GPDLoss`` follows the paper:

- dynamic teacher: ``teacher_ce * CE(t, y)`` (+ ``static_teacher_weight * D(t, static)``);
- student: ``student_ce * CE(s, y) + lam * D(s, t.detach())`` (+ ``static_student_weight * D(s, static)``);

where ``D`` is KL divergence at a temperature (``kl``) or a soft-target cross-entropy whose targets
are label-smoothed (``sce``). ``Trainer`` runs the loop: SGD or AdamW, cosine schedule with linear
warm-up (per step), a checkpoint every epoch (the teacher file and a separate optimizer state),
exact resume, DDP under torchrun, and the extracted student at the end.

Exact resume: all randomness of an epoch (data order, augmentation, dropout) derives from
``(seed, epoch, rank)``: the sampler's permutation from ``(seed, epoch)``, the data loader's
worker seeds and the global generators are reseeded at every epoch start. A checkpoint at an
epoch boundary therefore holds everything that the rest of the run depends on: the teacher's
tensors and the student's buffers (teacher file), the optimizer's state, the step, the epoch,
the history (state file), and the schedule follows from the step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .collapse import collapse
from .errors import GPDError, first_line
from .io import atomic_save, atomic_write, durable_replace, load_teacher_file, save_teacher
from .plan import DTYPE_NAMES, STUDENT_PREFIX, Plan
from .student_view import StudentView

TEACHER_FILE = "teacher.safetensors"
STUDENT_FILE = "student.safetensors"
STATE_FILE = "train_state.pt"
NEXT_STATE_FILE = "train_state.next.pt"  # a checkpoint's state until its teacher file is written
STATE_FORMAT = "gpd-surgery/train-state"
STATE_VERSION = 1
DISTILL_KINDS = ("kl", "sce")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
OPTIMIZER_STATE = {"sgd": ("momentum_buffer",), "adamw": ("step", "exp_avg", "exp_avg_sq")}  # per parameter


# -- configuration ---------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every knob of a run. ``lr`` and ``weight_decay`` default by optimizer (SGD: 0.1, 5e-4; AdamW: 1e-3,
    0.05). ``batch_size`` is the *global* batch, split evenly among DDP processes."""

    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    warmup_epochs: float = 0.0
    lam: float = 3.0  # weight of the dynamic teacher -> student distillation (lambda in the paper)
    teacher_ce: float = 1.0
    student_ce: float = 1.0
    static_teacher_weight: float = 1.0  # static teacher -> dynamic teacher (when a static teacher is given)
    static_student_weight: float = 1.0  # static teacher -> student (when a static teacher is given)
    distill: str = "kl"
    temperature: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    plain: bool = False  # train the student alone (the baseline): no dynamic teacher
    # Not part of the result (may change between a run and its resume):
    device: Optional[str] = None
    num_workers: int = 0
    stop_after: Optional[int] = None  # end this run after that many epochs (a later --resume continues)

    RUNTIME = ("device", "num_workers", "stop_after")

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()
        self.distill = self.distill.lower()
        if self.optimizer not in OPTIMIZERS:
            raise GPDError(f"unknown optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.distill not in DISTILL_KINDS:
            raise GPDError(f"unknown distillation loss {self.distill!r}: choose {' or '.join(DISTILL_KINDS)}")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or (math.isfinite(self.weight_decay) and self.weight_decay >= 0),
             f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"--temperature must be > 0, got {self.temperature}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.stop_after is None or self.stop_after >= 1, f"--stop-after must be >= 1, got {self.stop_after}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for name in ("lam", "teacher_ce", "student_ce", "static_teacher_weight", "static_student_weight", "momentum"):
            v = getattr(self, name)
            checks.append((math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}"))
        for ok, message in checks:
            if not ok:
                raise GPDError(message)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WD[self.optimizer]

    def fingerprint(self) -> dict[str, Any]:
        """What the result depends on: a resumed run must have the same."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME}
        d["lr"], d["weight_decay"] = self.base_lr, self.decay
        return d


# -- the model ---------------------------------------------------------------------------------
class GPDModel(nn.Module):
    """The dynamic teacher and the student view over the same parameters; the student keeps its own buffers.

    ``forward(x)`` returns ``(teacher_logits, student_logits)``. ``parameters()`` are the teacher's (the view
    shares them), so one optimizer and one DDP wrapper cover both. The student view's BatchNorms use and,
    in train mode, update the student's own running statistics; the teacher's use its own.
    """

    def __init__(self, teacher: fx.GraphModule, plan: Plan, student_gm: fx.GraphModule,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.teacher = teacher
        self.source_file: str | None = None  # the teacher file it was read from, for messages
        self.view = StudentView(teacher, plan, student_gm)
        expected = plan.file_tensors()
        # The student's buffers as the file holds them: kept for those the student graph does not use.
        self._file_buffers = {k: v.detach().clone() for k, v in (tensors or {}).items()
                              if k.startswith(STUDENT_PREFIX) and k in expected}
        if tensors is not None:
            self.view.load_student_buffers(dict(tensors))

    @classmethod
    def from_expanded(cls, expanded: Any) -> "GPDModel":
        """From ``gpd_surgery.expand(...)``'s result (the teacher shares its tensors with ``expanded.tensors``)."""
        return cls(expanded.teacher(), expanded.plan, expanded.student.gm, expanded.tensors)

    @classmethod
    def from_file(cls, path: str, student: nn.Module, input_shape: tuple[int, ...] | None = None) -> "GPDModel":
        """From a teacher file (trained or not), rebuilt over ``student``'s architecture (checked)."""
        from .verify import rebuild

        plan, tensors = load_teacher_file(path)
        shape = tuple(input_shape or plan.source.get("input_shape") or ())
        if not shape:
            raise GPDError(f"the plan in {path} records no input shape")
        traced, _, teacher = rebuild(copy.deepcopy(student).eval(), plan, tensors, shape)
        model = cls(teacher, plan, traced.gm, tensors)
        model.source_file = path
        return model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.teacher(x), self.view(x)

    def student_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.view(x)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The teacher file's tensors now: teacher parameters and buffers, the student's current buffers."""
        expected = self.plan.file_tensors()
        out = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items() if k in expected}
        out.update(self._file_buffers)
        for name, buf in self.view.student.named_buffers():
            if STUDENT_PREFIX + name in expected:
                out[STUDENT_PREFIX + name] = buf.detach().cpu()
        got = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype)) for k, v in out.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got)) or sorted(k for k in got if got[k] != expected.get(k))
            raise RuntimeError(f"the teacher's tensors do not match its plan (first: {missing[:1]})")
        return {k: out[k].contiguous() for k in expected}

    def save(self, path: str, *, overwrite: bool = False) -> None:
        save_teacher(path, self.plan, self.file_tensors(), durable=True, overwrite=overwrite)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """What `gpd extract` would write from the current teacher file: the original ``state_dict()``'s keys."""
        with torch.no_grad():
            return {k: v.detach().contiguous() for k, v in collapse(self.plan, self.file_tensors()).items()}


class PlainModel(nn.Module):
    """The baseline: the student trained alone. ``forward(x)`` returns ``(None, student_logits)``."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.student(x)

    def student_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return self.student_state_dict()

    def save(self, path: str, *, overwrite: bool = False) -> None:
        atomic_save(self.student_state_dict(), path, durable=True, overwrite=overwrite)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}


# -- the loss ------------------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "kl", temperature: float = 1.0,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Distillation of ``target`` logits into ``student`` logits, averaged over the batch and scaled by T^2.

    ``kl``: KL(softmax(target/T) || softmax(student/T)). ``sce``: cross-entropy of the student against the
    soft targets softmax(target/T), label-smoothed towards the uniform distribution.
    """
    t = temperature
    log_s = F.log_softmax(student / t, dim=-1)
    if kind == "kl":
        log_p = F.log_softmax(target / t, dim=-1)
        return F.kl_div(log_s, log_p, reduction="batchmean", log_target=True) * (t * t)
    if kind == "sce":
        p = F.softmax(target / t, dim=-1)
        if label_smoothing > 0:
            p = p * (1 - label_smoothing) + label_smoothing / p.shape[-1]
        return -(p * log_s).sum(dim=-1).mean() * (t * t)
    raise GPDError(f"unknown distillation loss {kind!r}")


class GPDLoss:
    """The paper's objective; every weight comes from ``TrainConfig``. Returns the total loss and its parts
    (``teacher``, ``student``: each model's own terms)."""

    def __init__(self, config: TrainConfig) -> None:
        self.c = config

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.c.label_smoothing)

    def _d(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return distill_loss(student, target.detach(), self.c.distill, self.c.temperature, self.c.label_smoothing)

    def __call__(self, teacher: torch.Tensor | None, student: torch.Tensor, y: torch.Tensor,
                 static: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.c
        parts: dict[str, torch.Tensor] = {}
        total = student.new_zeros(())
        if teacher is not None:
            lt = c.teacher_ce * self._ce(teacher, y)
            if static is not None and c.static_teacher_weight:
                lt = lt + c.static_teacher_weight * self._d(teacher, static)
            parts["teacher"] = lt
            total = total + lt
        ls = c.student_ce * self._ce(student, y)
        if teacher is not None and c.lam:
            ls = ls + c.lam * self._d(student, teacher)
        if static is not None and c.static_student_weight:
            ls = ls + c.static_student_weight * self._d(student, static)
        parts["student"] = ls
        return total + ls, parts


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_env(device: str) -> DistEnv:
    """Read torchrun's environment; start the process group (gloo on CPU, nccl on CUDA) when it is a DDP run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, world, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        env.initialized_here = True
    if dist.is_initialized():
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
    return env


def pick_device(requested: str | None, env_local_rank: int) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GPDError("--device cuda was asked for, but no CUDA device is available")
        if name == "cuda":  # an explicit index: torch.cuda.set_device and DDP's device_ids need one
            name = f"cuda:{env_local_rank if int(os.environ.get('WORLD_SIZE', '1')) > 1 else torch.cuda.current_device()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPDError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GPDError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise GPDError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


# -- reproducibility ---------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: ties a state file to the teacher file of the same epoch."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to train from NaN or infinite values: a step later they would read as a loss that diverged."""
    for k, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                kind = "NaN" if bool(torch.isnan(t).any()) else "infinite"
                raise GPDError(f"cannot train: in {what}, {k} holds {kind} values ({bad} of {t.numel()}); start from "
                               "intact weights")


def load_state(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise GPDError(f"cannot resume: {path} does not exist (no checkpoint of a previous run in that folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPDError(f"cannot resume: {path} is not a readable training state ({str(e).splitlines()[0][:200]})"
                       ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise GPDError(f"cannot resume: {path} is not a gpd training state (format {STATE_FORMAT} v{STATE_VERSION})")
    if not isinstance(state.get("checkpoint_sha256"), str):
        raise _malformed(path, "checkpoint_sha256", state.get("checkpoint_sha256"))
    return state


def _malformed(path: str, field: str, value: Any, expected: str = "") -> GPDError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return GPDError(f"cannot resume: {path} holds a malformed {field} ({shown}{', expected ' + expected if expected else ''}); "
                    "start over with --force")


def _plain(x: Any, depth: int = 0) -> bool:
    """Whether ``x`` is JSON-like data (what the history and the settings are), nothing that compares or prints
    differently (a tensor, another object)."""
    if depth > 16:
        return False
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain(v, depth + 1) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))


def _metrics(m: Any) -> bool:
    need = ("student_loss", "student_acc") + (("teacher_acc",) if isinstance(m, dict) and "teacher_loss" in m else ())
    return (isinstance(m, dict) and all(k in m for k in need)
            and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in m.items()))


def check_state(state: dict[str, Any], path: str, epochs: int) -> tuple[int, int, list[dict[str, Any]]]:
    """The epoch, step and history of a training state, each checked for type and range (the identity and the
    optimizer state are checked where they are used)."""
    epoch, step, history = state.get("epoch"), state.get("step"), state.get("history")
    if type(epoch) is not int or not 1 <= epoch <= epochs:
        raise _malformed(path, "epoch", epoch, f"a whole number from 1 to {epochs}")
    if type(step) is not int or step < 0:
        raise _malformed(path, "step", step, "a whole number >= 0")
    if not isinstance(history, list) or len(history) != epoch:
        raise _malformed(path, "history", history, f"a list of {epoch} epoch records")
    for i, record in enumerate(history):
        if (not isinstance(record, dict) or not _plain(record) or record.get("epoch") != i + 1
                or not _metrics(record.get("train")) or ("val" in record and not _metrics(record["val"]))):
            raise _malformed(path, f"history record {i + 1}", record, "the epoch's train and val metrics")
    return epoch, step, list(history)


def _like(value: Any, option: Any) -> bool:
    """Whether a saved optimizer setting has the form of this run's: a flag, a finite number, a tuple of them."""
    if isinstance(option, bool) or option is None:
        return value is None or isinstance(value, bool)
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(option, tuple):
        return (isinstance(value, (tuple, list)) and len(value) == len(option)
                and all(_like(v, o) for v, o in zip(value, option)))
    return True


def load_optimizer(opt: torch.optim.Optimizer, saved: Any, path: str, kind: str,
                   names: Mapping[int, str]) -> None:
    """Load an optimizer state, checked: its groups and parameters must be this optimizer's, its settings of
    the same form, and every parameter's state the tensors a step of ``kind`` keeps (shape, finite values).
    The settings then stay those of the options, which the identity check has shown equal to the run's:
    the file's copies add nothing, and an odd one (a momentum of 1e30) would only do harm."""
    options = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(saved)
    except Exception as e:  # its own words on a structure that does not fit, e.g. another number of groups
        raise GPDError(f"cannot resume: the optimizer state in {path} does not fit the optimizer "
                       f"({type(e).__name__}: {first_line(e)}); start over with --force"
                       ) from None
    for g, o in zip(opt.param_groups, options):
        for k, v in o.items():
            if k not in g or not _like(g[k], v):
                raise _malformed(path, f"optimizer setting {k}", g.get(k), f"like {v!r}")
        params = g["params"]
        g.clear()
        g.update(o, params=params)
    params = {id(p): p for g in opt.param_groups for p in g["params"]}
    keys = () if kind == "sgd" and not options[0]["momentum"] else OPTIMIZER_STATE[kind]  # SGD without momentum: none
    for p, s in opt.state.items():
        name = names.get(id(p), "?")
        if not isinstance(p, torch.Tensor) or params.get(id(p)) is not p:
            raise _malformed(path, "optimizer state", p, "a state per parameter of the model")
        if not isinstance(s, dict) or (s and sorted(s) != sorted(keys)):
            raise _malformed(path, f"optimizer state of {name}", s, f"{', '.join(keys) or 'nothing'}")
        for k, v in s.items():
            shape = () if k == "step" else tuple(p.shape)
            if (not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != shape
                    or not bool(torch.isfinite(v).all()) or (k in ("step", "exp_avg_sq") and bool((v < 0).any()))):
                raise _malformed(path, f"optimizer state {k} of {name}", v,
                                 f"finite values of shape {list(shape)}")


# -- the loop -------------------------------------------------------------------------------------
class Reporter:
    """Receives progress on the main process. Subclass it for a display; the default says nothing."""

    def start(self, info: dict[str, Any]) -> None:
        """Before the first epoch: mode, device, world size, sample and step counts, parameters."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` begins; it has ``steps`` steps."""

    def step(self, step: int, metrics: dict[str, float], done: int) -> None:
        """``done`` steps of this epoch are done; ``metrics`` are running means over them (this process)."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """The epoch's record: train metrics (all processes), validation metrics, learning rate, time."""

    def finish(self, result: dict[str, Any]) -> None:
        """The run's result, as ``Trainer.run`` returns it."""


class _Meter:
    """Sums over the samples seen: each model's cross-entropy on the labels and its correct predictions, and the
    objective (the loss being minimized); all-reduced across processes at the end of an epoch."""

    def __init__(self, device: torch.device) -> None:
        # teacher CE, teacher correct, student CE, student correct, objective, samples
        self.v = torch.zeros(6, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, y: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor | None = None,
            objective: torch.Tensor | None = None) -> None:
        n = len(y)
        if t_logits is not None:
            self.v[0] += F.cross_entropy(t_logits.float(), y).double() * n
            self.v[1] += (t_logits.argmax(-1) == y).sum()
        self.v[2] += F.cross_entropy(s_logits.float(), y).double() * n
        self.v[3] += (s_logits.argmax(-1) == y).sum()
        if objective is not None:
            self.v[4] += objective.detach().double() * n
        self.v[5] += n

    def reduce(self, env: DistEnv) -> None:
        if env.active:
            dist.all_reduce(self.v)

    def summary(self, teacher: bool, objective: bool = False) -> dict[str, float]:
        tl, tc, sl, sc, obj, n = self.v.tolist()
        n = max(n, 1.0)
        out = {"student_loss": sl / n, "student_acc": sc / n}
        if teacher:
            out.update(teacher_loss=tl / n, teacher_acc=tc / n)
        if objective:
            out["objective"] = obj / n
        return out


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
        self.identity = identity or {}
        self.gpd = isinstance(model, GPDModel)
        self.loss = GPDLoss(config)

    # paths
    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    @property
    def checkpoint_file(self) -> str:
        return self.path(TEACHER_FILE if self.gpd else STUDENT_FILE)

    def _identity(self) -> dict[str, Any]:
        return {"mode": "gpd" if self.gpd else "plain", **self.identity, **self.config.fingerprint()}

    def run(self, resume: bool = False) -> dict[str, Any]:
        c = self.config
        device = pick_device(c.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before nccl starts, so that each process talks from its own GPU
        env = dist_env(device.type)
        try:
            return self._run(resume, device, env)
        finally:
            if env.initialized_here and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self, resume: bool, device: torch.device, env: DistEnv) -> dict[str, Any]:
        c = self.config
        t_start = time.perf_counter()
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
        static = None
        if self.static is not None:
            static = self.static.to(device=device, dtype=dtype).eval()
            for p in static.parameters():
                p.requires_grad_(False)
        opt = make_optimizer(model, c)
        start_epoch, step, history = 0, 0, []
        if resume:
            path, state = self._resume_state(env)
            start_epoch, step, history = check_state(state, path, c.epochs)
            names = {id(p): n for n, p in model.named_parameters()}
            load_optimizer(opt, state.get("optimizer"), path, c.optimizer, names)
        wrapped: nn.Module = model
        if env.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        local_batch = c.batch_size // env.world
        sampler = DistributedSampler(self.train_set, num_replicas=env.world, rank=env.rank, shuffle=True,
                                     seed=c.seed, drop_last=False)
        loader_gen = torch.Generator()
        loader = DataLoader(self.train_set, batch_size=local_batch, sampler=sampler, num_workers=c.num_workers,
                            generator=loader_gen, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise GPDError("the training set is empty")
        total_steps = c.epochs * steps_per_epoch
        warmup_steps = int(round(c.warmup_epochs * steps_per_epoch))
        if env.main:
            self.reporter.start({
                "mode": "gpd" if self.gpd else "plain", "device": str(device), "world_size": env.world,
                "train_samples": len(self.train_set), "val_samples": len(self.val_set) if self.val_set else 0,
                "steps_per_epoch": steps_per_epoch, "epochs": c.epochs, "start_epoch": start_epoch,
                "params": sum(p.numel() for p in model.parameters()),
                "student_params": sum(math.prod(r.shape) for r in model.plan.recipes if r.kind == "param")
                if self.gpd else sum(p.numel() for p in model.parameters()),
            })
        if start_epoch >= c.epochs and env.main:
            pass  # nothing left to train: write the student again below
        end_epoch = c.epochs if c.stop_after is None else min(c.epochs, start_epoch + c.stop_after)
        for epoch in range(start_epoch, end_epoch):
            seed_everything(epoch_seed(c.seed, epoch, env.rank))
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(epoch_seed(c.seed, epoch, env.rank) ^ 0x5DEECE66D)
            model.train()
            meter = _Meter(device)
            if env.main:
                self.reporter.epoch_start(epoch, c.epochs, steps_per_epoch)
            t0 = last_report = time.perf_counter()
            for i, (x, y) in enumerate(loader):
                lr = lr_at(step, total_steps, warmup_steps, c.base_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                x = x.to(device, dtype=dtype, non_blocking=True)
                y = y.to(device, non_blocking=True)
                s_static = None
                if static is not None:
                    with torch.no_grad():
                        s_static = static(x)
                t_logits, s_logits = wrapped(x)
                loss, parts = self.loss(t_logits, s_logits, y, s_static)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if not torch.isfinite(loss):
                    raise GPDError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                                   "lower --lr or add --warmup-epochs")
                meter.add(y, s_logits.detach(), None if t_logits is None else t_logits.detach(), loss)
                if env.main and (time.perf_counter() - last_report > 0.2 or i == steps_per_epoch - 1):
                    last_report = time.perf_counter()  # reading the meter waits for the device: not every step
                    self.reporter.step(step, {"lr": lr, **meter.summary(self.gpd, objective=True)}, i + 1)
            meter.reduce(env)
            sync_buffers(model, env)  # rank 0's running statistics everywhere: what DDP's next forward would use
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_at(step - 1, total_steps, warmup_steps, c.base_lr),
                                      "train": meter.summary(self.gpd, objective=True), "train_seconds": time.perf_counter() - t0}
            if self.val_set is not None and len(self.val_set):
                record["val"] = evaluate(model, self.val_set, local_batch, device, dtype, env, c.num_workers)
            history.append(record)
            self._checkpoint(model, opt, epoch + 1, step, history, env)
            if env.main:
                self.reporter.epoch_end(record)
        done = len(history) >= c.epochs
        files = {"checkpoint": self.checkpoint_file, "state": self.path(STATE_FILE)}
        if done and env.main:
            atomic_save(model.student_state_dict(), self.path(STUDENT_FILE), durable=True, overwrite=True)
        if done:
            files["student"] = self.path(STUDENT_FILE)
        if env.active:
            dist.barrier()
        result = {"mode": "gpd" if self.gpd else "plain", "epochs_done": len(history), "epochs": c.epochs,
                  "complete": done, "history": history, "files": files, "world_size": env.world,
                  "seconds": time.perf_counter() - t_start}
        if env.main:
            self.reporter.finish(result)
        return result

    def _check_finite(self) -> None:
        if self.gpd:
            what = f"the teacher file {self.model.source_file}" if self.model.source_file else "the starting teacher"
        else:
            what = "the student's weights"
        check_finite(self.model.file_tensors(), what)
        if self.static is not None:
            check_finite(self.static.state_dict(), "the static teacher's weights")

    def _checkpoint(self, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                    history: list[dict[str, Any]], env: DistEnv) -> None:
        """Write the checkpoint of ``epoch``: the checkpoint file (teacher, or student when plain) and its state.

        Two files cannot be replaced together atomically, so a kill may fall between the writes; their order
        leaves a matching pair at every moment: (1) the new state goes to ``train_state.next.pt``, with the
        digest of the tensors about to be written; (2) the checkpoint file is replaced; (3) the new state is
        renamed over ``train_state.pt``. Killed before (2) is complete, ``train_state.pt`` still matches the
        previous checkpoint file; killed between (2) and (3), ``train_state.next.pt`` matches the new one.
        ``--resume`` takes the state whose digest matches the checkpoint file (``_resume_state``)."""
        if env.main:
            tensors = model.file_tensors()
            state = {
                "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "step": step,
                "optimizer": opt.state_dict(), "history": history, "identity": self._identity(),
                "checkpoint_sha256": tensors_digest(tensors),
            }
            atomic_write(self.path(NEXT_STATE_FILE), lambda f: torch.save(state, f), durable=True, overwrite=True)
            if self.gpd:
                save_teacher(self.checkpoint_file, model.plan, tensors, durable=True, overwrite=True)
            else:
                atomic_save(tensors, self.checkpoint_file, durable=True, overwrite=True)
            durable_replace(self.path(NEXT_STATE_FILE), self.path(STATE_FILE))
        if env.active:
            dist.barrier()

    def _resume_state(self, env: DistEnv) -> tuple[str, dict[str, Any]]:
        """The state file that matches the checkpoint file, and its content, checked against this run's settings:
        ``train_state.pt``, or ``train_state.next.pt`` when a run was killed after writing the checkpoint file
        but before renaming its state into place (see ``_checkpoint``); that one then takes the place of the
        other, and a next state that matches nothing (killed before the checkpoint file was written) goes."""
        digest = tensors_digest(self.model.file_tensors())
        main, nxt = self.path(STATE_FILE), self.path(NEXT_STATE_FILE)
        found = [p for p in (main, nxt) if os.path.isfile(p)] or [main]  # none: load_state says so
        states = [(p, load_state(p)) for p in found]
        match = next(((p, s) for p, s in states if s["checkpoint_sha256"] == digest), None)
        if match is None:
            raise GPDError(f"cannot resume: {self.checkpoint_file} is not the checkpoint {STATE_FILE} was written "
                           "with; start over with --force")
        self._check_identity(*match)
        if env.active:
            dist.barrier()  # every process has read the state files before rank 0 tidies them
        if env.main and nxt in found:
            if match[0] == nxt:
                durable_replace(nxt, main)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(nxt)
        return match

    def _check_identity(self, path: str, state: dict[str, Any]) -> None:
        mine, theirs = self._identity(), state.get("identity")
        if not isinstance(theirs, dict) or not _plain(theirs):
            raise _malformed(path, "identity", theirs, "the settings of the run")
        diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diffs:
            shown = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in diffs[:4])
            raise GPDError(f"cannot resume: the run in {self.output_dir} was started with other settings: {shown}; "
                           "resume with the same options, or start over with --force")


def sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    if env.active:
        for b in model.buffers():
            dist.broadcast(b, 0)


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on 1-d tensors (norms, biases, branch scales)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": c.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.base_lr, momentum=c.momentum)
    return torch.optim.AdamW(groups, lr=c.base_lr)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype,
             env: DistEnv | None = None, num_workers: int = 0) -> dict[str, float]:
    """Cross-entropy and accuracy of the teacher (GPD) and the student in eval mode; each process takes every
    world-th sample and the sums are all-reduced."""
    env = env or DistEnv()
    part = Subset(data, range(env.rank, len(data), env.world)) if env.active else data
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was = model.training
    model.eval()
    meter = _Meter(device)
    gpd = isinstance(model, GPDModel)
    for x, y in loader:
        x, y = x.to(device, dtype=dtype), y.to(device)
        t, s = model(x)
        meter.add(y, s, t)
    meter.reduce(env)
    model.train(was)
    return meter.summary(gpd)


# -- the high-level entry point ----------------------------------------------------------------------
def num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The size of the model's last output dimension (its number of classes), from one forward in eval mode."""
    m = copy.deepcopy(model).eval()
    p = next(iter(m.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    shape = (2, *input_shape[1:])
    try:
        with torch.no_grad():
            y = m(torch.zeros(shape, dtype=dtype))
    except Exception as e:
        raise GPDError(f"the model rejects an input of shape {shape}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''} (check --image-size)") from None
    if isinstance(y, (tuple, list)):
        y = y[0]
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise GPDError(f"the model's output is not a batch of logits (got {getattr(y, 'shape', type(y).__name__)})")
    return int(y.shape[-1])


def prepare_output(output_dir: str, resume: bool, force: bool) -> None:
    """Refuse to mix runs: a folder with a checkpoint needs --resume (continue) or --force (start over)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise GPDError(f"output {output_dir} is not a folder")
    taken = [n for n in (TEACHER_FILE, STUDENT_FILE, STATE_FILE) if os.path.exists(os.path.join(output_dir, n))]
    if resume:
        return
    if taken and not force:
        raise GPDError(f"{output_dir} already holds a training run ({', '.join(taken)}): pass --resume to continue "
                       "it, or --force to start over")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise GPDError(f"cannot create {output_dir}: {e.strerror or e}") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for n in (STUDENT_FILE, STATE_FILE, NEXT_STATE_FILE):  # stale files of the run being replaced (--force)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, n))


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
    from .api import expand

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
            from .io import load_weights

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


# -- console display -------------------------------------------------------------------------------
def _pair(m: dict[str, float], who: str) -> str:
    return f"{m[who + '_loss']:.3f} / {100 * m[who + '_acc']:.1f}%"


def format_metrics(m: dict[str, float]) -> str:
    """``teacher CE / ACC  student CE / ACC`` (the teacher only when there is one)."""
    parts = [f"teacher {_pair(m, 'teacher')}"] if "teacher_loss" in m else []
    return "  ".join(parts + [f"student {_pair(m, 'student')}"])


class ConsoleReporter(Reporter):
    """A rich progress bar with live loss and accuracy of teacher and student, and one line per epoch."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: Any = None
        self.task: Any = None

    def start(self, info: dict[str, Any]) -> None:
        if info["mode"] == "gpd":
            what = (f"GPD: dynamic teacher ({info['params']:,} parameters) and student "
                    f"({info['student_params']:,}, shared)")
        else:
            what = f"the student alone ({info['params']:,} parameters)"
        procs = f" x {info['world_size']} processes" if info["world_size"] > 1 else ""
        self.console.print(f"training {what} on {info['device']}{procs}; {info['train_samples']:,} training and "
                           f"{info['val_samples']:,} validation samples, {info['steps_per_epoch']} steps per epoch",
                           highlight=False, soft_wrap=True)
        if info["start_epoch"]:
            self.console.print(f"resuming after epoch {info['start_epoch']}", highlight=False)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.close()
        if not self.console.is_terminal:
            return
        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"), console=self.console,
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, metrics="")

    def step(self, step: int, metrics: dict[str, float], done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, metrics=f"lr {metrics['lr']:.3g}  {format_metrics(metrics)}")

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.close()
        line = f"epoch {record['epoch']:>3}  train  {format_metrics(record['train'])}"
        if "val" in record:
            line += f"  |  val  {format_metrics(record['val'])}"
        self.console.print(line + f"  ({record['train_seconds']:.1f} s)", highlight=False, soft_wrap=True)

    def finish(self, result: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
