"""Reading and writing teacher and student files: validated on the way in, atomic on the way out."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import GPDError, PlanError
from .plan import Plan, check_tensors

PLAN_KEY = "gpd_plan"
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def check_input_file(path: str, what: str = "file") -> None:
    if not os.path.exists(path):
        raise GPDError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise GPDError(f"{what} {path} is not a file")


def check_output(path: str, force: bool) -> None:
    if os.path.isdir(path):
        raise GPDError(f"output {path} is a directory")
    if os.path.exists(path) and not force:
        raise GPDError(f"output {path} exists: pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GPDError(f"output directory {parent} does not exist")


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file next to ``path`` and rename it into place: no partial output, ever."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gpd-", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_teacher(path: str, plan: Plan, tensors: dict[str, torch.Tensor]) -> None:
    atomic_save(tensors, path, {PLAN_KEY: plan.to_json()})


def _open(path: str) -> Any:
    check_input_file(path)
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PlanError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    f = _open(path)
    with f:
        meta = f.metadata() or {}
        header = {}
        for k in f.keys():
            sl = f.get_slice(k)
            dtype = _ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise PlanError(f"tensor {k} in {path} has unsupported dtype {sl.get_dtype()}")
            header[k] = (tuple(sl.get_shape()), dtype)
    return meta, header


def load_teacher_file(path: str) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Plan and tensors of a teacher file, after checking that they agree exactly."""
    meta, header = read_header(path)
    plan = Plan.from_json(meta.get(PLAN_KEY))
    check_tensors(plan, header)
    with _open(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return plan, tensors


def read_state(path: str) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or, weights-only (no code runs), from a torch.save file."""
    check_input_file(path, "weights file")
    if path.endswith(".safetensors"):
        f = _open(path)
        with f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPDError(f"cannot load weights from {path} weights-only: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GPDError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str) -> None:
    state = read_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {list(state[k].shape)} but the model has {list(own[k].shape)}")
        raise GPDError(f"weights {path} do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
