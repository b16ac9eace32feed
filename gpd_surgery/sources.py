"""Where a student comes from: a MODEL spec and its weights, and what a teacher's plan records of them.

Shared by the commands and by training (``training/job.py``); nothing here prints: notes go to a callback.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, Callable, List, Optional

from .errors import GPDError, first_line


def load_student(model: str, weights: Optional[str], model_args: dict[str, Any], trust_pickle: bool,
                 plan: Any = None, note: Callable[[str], None] | None = None, trust_remote_code: bool = False,
                 init_seed: int | None = None) -> Any:
    """The student; with a teacher's ``plan``, checked against the shapes it records before it is allocated.
    ``note`` receives what loading the weights says on the way (a stripped DDP prefix). ``init_seed``: the seed
    of a random initialization (default: the one the plan records, as `gpd train --seed` does, else 0)."""
    from .io import load_weights
    from .limits import MAX_SEED
    from .trace import INIT_SEED, load_model

    if init_seed is None:
        recorded = plan.source.get("init_seed") if plan is not None else None
        ok = type(recorded) is int and 0 <= recorded <= MAX_SEED
        init_seed = recorded if ok else INIT_SEED

    if not model.startswith(("torchvision:", "timm:", "hf:")):  # those import nothing from the current directory
        cwd_on_path()
    expect = None if plan is None else {r.key: r.shape for r in plan.recipes}
    try:
        m = load_model(model, model_args, trust_pickle=trust_pickle, expect=expect,
                       trust_remote_code=trust_remote_code, init_seed=init_seed)
    except GPDError:
        raise
    except Exception as e:  # the factory's own complaint about its arguments, e.g. a negative width
        raise GPDError(f"{model} could not be built with {model_args}: {type(e).__name__}: {first_line(e)}") from None
    if weights:
        load_weights(m, weights, trust_pickle=trust_pickle, note=note)
    return m


def cwd_on_path() -> None:
    """As `python -m` does: a module.path:callable spec (or a pickled model's class) may live in the current
    directory. The console script's sys.path starts with its bin/ folder instead."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def plan_model(plan: Any, teacher: str, usage: str) -> str:
    """The MODEL spec a teacher's plan records, or a user error saying how to pass one."""
    spec = plan.source.get("model")
    if not spec:
        raise GPDError(f"the plan of {teacher} records no MODEL spec (the teacher was made from Python): pass it, "
                       f"{usage}")
    return spec


def model_args_of(items: List[str], plan: Any = None) -> dict[str, Any]:
    """``--model-arg`` values, or those a teacher's plan records when none are given."""
    from .trace import parse_model_args

    if items or plan is None:
        return parse_model_args(items)
    return dict(plan.source.get("model_args") or {})


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_source(weights: Optional[str]) -> dict[str, Any]:
    """What the plan records of the student weights, for `gpd verify TEACHER` to find and check them: the
    absolute path (a relative one would depend on where verify runs) and the file's SHA-256."""
    if not weights:
        return {"weights": None}
    return {"weights": os.path.basename(weights), "weights_path": os.path.abspath(weights),
            "weights_sha256": sha256(weights)}
