"""Linear branches on teacher convs and linears (the B in CBR), computed online as one merged kernel.

``K = W + sum_b s_b * f_b(theta_b)`` with a per-output-channel scale ``s_b`` that starts at 0, so
adding branches keeps the teacher exact. Branches never run as separate forward passes: the teacher
convolves with ``K``, and collapse merges ``K`` first, then folds the channel copies. Conv branches:
``1x1`` (zero-padded to the kernel), ``kxk``, ``avg`` (a 1x1 weight times a uniform kernel) and
``1x1-kxk`` (an identity-initialised 1x1 followed by a kxk). Linear branches: ``lowrank`` (A @ B)
and ``full``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GPDError

CONV_KINDS = ("1x1", "kxk", "avg", "1x1-kxk")
LINEAR_KINDS = ("lowrank", "full")
DEFAULT = ("kxk", "1x1-kxk", "lowrank")
PREFIX = "branch_"


def parse(text: str | None) -> tuple[str, ...]:
    """``none``, ``default`` or a comma-separated list of branch kinds."""
    if text is None or text.strip() in ("", "none"):
        return ()
    if text.strip() == "default":
        return DEFAULT
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in CONV_KINDS + LINEAR_KINDS]
    if bad:
        raise GPDError(f"unknown branch kind {bad[0]!r}: choose from {', '.join(CONV_KINDS + LINEAR_KINDS)}, "
                       "none or default")
    return tuple(dict.fromkeys(kinds))


def applicable(kinds: tuple[str, ...], module: nn.Module) -> tuple[str, ...]:
    """The kinds that make sense for one module: a pointwise conv gets no 1x1 or avg branch (they would
    duplicate its kernel), a grouped conv no 1x1-kxk (its 1x1 would mix groups)."""
    if isinstance(module, nn.Linear):
        return tuple(k for k in kinds if k in LINEAR_KINDS)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ()
    pointwise = all(s == 1 for s in module.kernel_size)
    return tuple(k for k in kinds if k in CONV_KINDS and not (pointwise and k in ("1x1", "avg"))
                 and not (k == "1x1-kxk" and module.groups != 1))


def _name(kind: str, part: str) -> str:
    return f"{PREFIX}{kind.replace('-', '_')}_{part}"


def branch_shapes(kind: str, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one branch on a weight of ``weight_shape`` (teacher layout)."""
    out, inp, *kernel = weight_shape
    ones = (1,) * len(kernel)
    shapes = {
        "1x1": {"weight": (out, inp, *ones)},
        "kxk": {"weight": weight_shape},
        "avg": {"weight": (out, inp, *ones)},
        "1x1-kxk": {"first": (inp, inp), "weight": weight_shape},
        "lowrank": {"a": (out, max(1, min(out, inp) // 8)), "b": (max(1, min(out, inp) // 8), inp)},
        "full": {"weight": weight_shape},
    }[kind]
    return {_name(kind, p): s for p, s in shapes.items()} | {_name(kind, "scale"): (out,)}


def init_branches(kinds: tuple[str, ...], weight: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random branch parameters with zero scales: the merged kernel equals ``weight`` exactly."""
    out: dict[str, torch.Tensor] = {}
    fan_in = max(1, weight[0].numel())
    for kind in kinds:
        for name, shape in branch_shapes(kind, tuple(weight.shape)).items():
            if name.endswith("_scale"):
                t = torch.zeros(shape, dtype=weight.dtype)
            elif name.endswith("_first"):
                t = torch.eye(shape[0], dtype=weight.dtype)  # identity: 1x1-kxk starts as plain kxk
            else:
                t = torch.randn(shape, generator=generator, dtype=torch.float64).to(weight.dtype) / math.sqrt(fan_in)
            out[name] = t
    return out


def merge(weight: torch.Tensor, kinds: tuple[str, ...], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The merged kernel ``W + sum_b s_b * f_b`` (differentiable). An empty kernel (a size of 0 anywhere, as
    only a forged file has) has nothing to merge: averaging over it would divide by zero."""
    if weight.numel() == 0:
        return weight
    k = weight
    spatial = weight.dim() - 2
    for kind in kinds:
        f = _branch_kernel(kind, weight, params, spatial)
        s = params[_name(kind, "scale")].view(-1, *([1] * (weight.dim() - 1)))
        k = k + s * f
    return k


def _branch_kernel(kind: str, weight: torch.Tensor, p: Mapping[str, torch.Tensor], spatial: int) -> torch.Tensor:
    if kind in ("kxk", "full"):
        return p[_name(kind, "weight")]
    if kind == "lowrank":
        return p[_name(kind, "a")] @ p[_name(kind, "b")]
    if kind == "1x1-kxk":
        return torch.einsum("om...,mi->oi...", p[_name(kind, "weight")], p[_name(kind, "first")])
    theta = p[_name(kind, "weight")]
    size = weight.shape[2:]
    if kind == "avg":  # a broadcast view: no kernel-sized constant, whatever size a file claims
        scale = torch.tensor(1.0 / math.prod(size), dtype=theta.dtype, device=theta.device)
        return (theta * scale).expand(*theta.shape[:2], *size)
    pads: list[int] = []
    for s in reversed(size):  # 1x1: the tap sits at the kernel's centre
        pads += [(s - 1) // 2, s // 2]
    return F.pad(theta, pads)


class _Branched:
    """Mixin for a teacher conv or linear that convolves with its merged kernel."""

    branch_kinds: tuple[str, ...]

    def merged_weight(self) -> torch.Tensor:
        return merge(self.weight, self.branch_kinds, dict(self.named_parameters(recurse=False)))  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self, nn.Linear):
            return F.linear(x, self.merged_weight(), self.bias)
        return self._conv_forward(x, self.merged_weight(), self.bias)  # type: ignore[attr-defined]


_CLASSES: dict[type, type] = {}


def attach(module: nn.Module, kinds: tuple[str, ...], tensors: Mapping[str, torch.Tensor], prefix: str) -> nn.Module:
    """Turn a teacher conv/linear into its branched form, with branch tensors ``prefix + name``."""
    if not kinds:
        return module
    base = type(module)
    cls = _CLASSES.setdefault(base, type(f"Branched{base.__name__}", (_Branched, base), {}))
    module.__class__ = cls
    module.branch_kinds = kinds
    for kind in kinds:
        for name in branch_shapes(kind, tuple(module.weight.shape)):
            module.register_parameter(name, nn.Parameter(tensors[prefix + name]))
    return module
