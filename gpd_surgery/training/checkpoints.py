"""The files of a run: the checkpoint (teacher file, or the student's when plain) and its training state, written
so that a kill at any moment leaves a matching pair, and every field of a state checked before a resume uses it.

Exact resume: a checkpoint at an epoch boundary holds everything that the rest of the run depends on: the
teacher's tensors and the student's buffers (teacher file), the optimizer's state, the step, the epoch, the
history (state file); the schedule follows from the step, the randomness from ``(seed, epoch, rank)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GPDError, first_line
from ..io import atomic_save, atomic_write, durable_replace, save_teacher
from .distributed import DistEnv

TEACHER_FILE = "teacher.safetensors"
STUDENT_FILE = "student.safetensors"
STATE_FILE = "train_state.pt"
NEXT_STATE_FILE = "train_state.next.pt"  # a checkpoint's state until its teacher file is written
STATE_FORMAT = "gpd-surgery/train-state"
STATE_VERSION = 1
OPTIMIZER_STATE = {"sgd": ("momentum_buffer",), "adamw": ("step", "exp_avg", "exp_avg_sq")}  # per parameter


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


class RunFolder:
    """Where a run writes: ``teacher.safetensors`` (GPD) or ``student.safetensors`` (plain) and ``train_state.pt``
    after every epoch, ``student.safetensors`` at the end. Only rank 0 writes; the others wait at a barrier.
    ``identity``: the settings the result depends on, recorded in every state and checked on resume."""

    def __init__(self, output_dir: str, gpd: bool, identity: dict[str, Any]) -> None:
        self.output_dir, self.gpd, self.identity = output_dir, gpd, identity

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    @property
    def checkpoint_file(self) -> str:
        return self.path(TEACHER_FILE if self.gpd else STUDENT_FILE)

    def write(self, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
              history: list[dict[str, Any]], env: DistEnv, extra: dict[str, Any] | None = None) -> None:
        """Write the checkpoint of ``epoch``: the checkpoint file (teacher, or student when plain) and its state.

        Two files cannot be replaced together atomically, so a kill may fall between the writes; their order
        leaves a matching pair at every moment: (1) the new state goes to ``train_state.next.pt``, with the
        digest of the tensors about to be written; (2) the checkpoint file is replaced; (3) the new state is
        renamed over ``train_state.pt``. Killed before (2) is complete, ``train_state.pt`` still matches the
        previous checkpoint file; killed between (2) and (3), ``train_state.next.pt`` matches the new one.
        ``--resume`` takes the state whose digest matches the checkpoint file (``resume_state``). ``extra``: more
        state of the run (the student's EMA, the fp16 gradient scaler), saved with the rest."""
        if env.main:
            tensors = model.file_tensors()
            state = {
                "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "step": step,
                "optimizer": opt.state_dict(), "history": history, "identity": self.identity,
                "checkpoint_sha256": tensors_digest(tensors), **(extra or {}),
            }
            atomic_write(self.path(NEXT_STATE_FILE), lambda f: torch.save(state, f), durable=True, overwrite=True)
            if self.gpd:
                save_teacher(self.checkpoint_file, model.plan, tensors, durable=True, overwrite=True)
            else:
                atomic_save(tensors, self.checkpoint_file, durable=True, overwrite=True)
            durable_replace(self.path(NEXT_STATE_FILE), self.path(STATE_FILE))
        if env.active:
            dist.barrier()

    def write_student(self, model: nn.Module, env: DistEnv) -> str:
        """The extracted student (GPD) or the student itself (plain), once every epoch is done."""
        path = self.path(STUDENT_FILE)
        if env.main:
            atomic_save(model.student_state_dict(), path, durable=True, overwrite=True)
        return path

    def resume_state(self, model: nn.Module, env: DistEnv) -> tuple[str, dict[str, Any]]:
        """The state file that matches ``model``'s checkpoint file, and its content, checked against this run's
        settings: ``train_state.pt``, or ``train_state.next.pt`` when a run was killed after writing the checkpoint
        file but before renaming its state into place (see ``write``); that one then takes the place of the
        other, and a next state that matches nothing (killed before the checkpoint file was written) goes."""
        digest = tensors_digest(model.file_tensors())
        main, nxt = self.path(STATE_FILE), self.path(NEXT_STATE_FILE)
        found = [p for p in (main, nxt) if os.path.isfile(p)] or [main]  # none: load_state says so
        states = [(p, load_state(p)) for p in found]
        match = next(((p, s) for p, s in states if s["checkpoint_sha256"] == digest), None)
        if match is None:
            raise GPDError(f"cannot resume: {self.checkpoint_file} is not the checkpoint {STATE_FILE} was written "
                           "with; start over with --force")
        self.check_identity(*match)
        if env.active:
            dist.barrier()  # every process has read the state files before rank 0 tidies them
        if env.main and nxt in found:
            if match[0] == nxt:
                durable_replace(nxt, main)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(nxt)
        return match

    def check_identity(self, path: str, state: dict[str, Any]) -> None:
        mine, theirs = self.identity, state.get("identity")
        if not isinstance(theirs, dict) or not _plain(theirs):
            raise _malformed(path, "identity", theirs, "the settings of the run")
        diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diffs:
            shown = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in diffs[:4])
            raise GPDError(f"cannot resume: the run in {self.output_dir} was started with other settings: {shown}; "
                           "resume with the same options, or start over with --force")


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: ties a state file to the teacher file of the same epoch."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise GPDError(f"cannot resume: {path} does not exist (no checkpoint of a previous run in that folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPDError(f"cannot resume: {path} is not a readable training state ({first_line(e)})") from None
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
