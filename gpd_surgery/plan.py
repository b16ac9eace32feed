"""The plan: everything needed to collapse a teacher without the model's code.

It records the leaf spaces (student size and source map), and one recipe per
student tensor: its shape and dtype, whether the teacher holds a tensor of the
same name, and for each widened dimension its layout and mode (``copy``: take
the canonical copy; ``share``: sum over the copies). The plan travels as JSON in
the teacher file's metadata and is validated before any use.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PlanError
from .layout import Cat, Layout, Prod
from .maps import Maps

FORMAT = "gpd-surgery/teacher"
VERSION = 1
STUDENT_PREFIX = "student/"  # the student's own buffers inside a teacher file
MODES = ("copy", "share")
DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Recipe:
    key: str
    kind: str  # "param" or "buffer"
    shape: tuple[int, ...]
    dtype: str
    teacher: bool  # the teacher file holds a tensor under ``key``
    dims: list[tuple[int, Layout, str]] = field(default_factory=list)

    def teacher_shape(self, maps: Maps) -> tuple[int, ...]:
        shape = list(self.shape)
        for d, lay, _ in self.dims:
            shape[d] = maps.tsize(lay)
        return tuple(shape)


@dataclass
class Plan:
    ratio: float
    seed: int
    equal_shares: bool
    source: dict[str, Any]
    leaves: dict[int, tuple[int, torch.Tensor | None]]
    recipes: list[Recipe]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def maps(self) -> Maps:
        if not hasattr(self, "_maps"):
            self._maps = Maps(self.leaves)
        return self._maps

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "ratio": self.ratio,
                "seed": self.seed,
                "equal_shares": self.equal_shares,
                "source": self.source,
                "spaces": {
                    str(i): {"size": size, **({} if src is None else {"src": src.tolist()})}
                    for i, (size, src) in sorted(self.leaves.items())
                },
                "tensors": [
                    {
                        "key": r.key, "kind": r.kind, "shape": list(r.shape), "dtype": r.dtype, "teacher": r.teacher,
                        "dims": [[d, _lay_to_json(lay), mode] for d, lay, mode in r.dims],
                    }
                    for r in self.recipes
                ],
                "report": self.report,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> "Plan":
        if text is None:
            raise PlanError("the file carries no gpd plan: it is not a teacher written by `gpd expand`")
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"the plan is not valid JSON ({e})") from None
        return _parse(obj)


def _lay_to_json(lay: Layout) -> Any:
    if isinstance(lay, int):
        return lay
    return {"p" if isinstance(lay, Prod) else "c": [_lay_to_json(p) for p in lay.parts]}


# -- validation ---------------------------------------------------------------------------
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(f"invalid plan: {msg}")


def _int(v: Any, what: str, lo: int = 0) -> int:
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{what} must be an integer >= {lo}")
    return v


def _parse(obj: Any) -> Plan:
    _need(isinstance(obj, dict), "not a JSON object")
    _need(obj.get("format") == FORMAT, f"format is {obj.get('format')!r}, expected {FORMAT!r}")
    _need(obj.get("version") == VERSION, f"format version {obj.get('version')!r}, this gpd reads version {VERSION}")
    ratio = obj.get("ratio")
    _need(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio >= 1,
          "ratio must be a finite number >= 1")
    seed = _int(obj.get("seed"), "seed")
    _need(isinstance(obj.get("equal_shares"), bool), "equal_shares must be a boolean")
    _need(isinstance(obj.get("source"), dict), "source must be an object")
    spaces = obj.get("spaces")
    _need(isinstance(spaces, dict), "spaces must be an object")
    leaves: dict[int, tuple[int, torch.Tensor | None]] = {}
    for k, v in spaces.items():
        _need(isinstance(k, str) and k.isdigit() and len(k) < 12, f"space id {k!r} is not an integer")
        _need(isinstance(v, dict), f"space {k} must be an object")
        size = _int(v.get("size"), f"space {k} size", 1)
        src = v.get("src")
        if src is None:
            leaves[int(k)] = (size, None)
            continue
        _need(isinstance(src, list) and len(src) >= size, f"space {k} map must list at least {size} channels")
        _need(all(isinstance(i, int) and not isinstance(i, bool) for i in src), f"space {k} map must hold integers")
        t = torch.tensor(src, dtype=torch.long)
        _need(bool(((t >= 0) & (t < size)).all()), f"space {k} map has indices outside 0..{size - 1}")
        _need(bool((torch.bincount(t, minlength=size) > 0).all()), f"space {k} map leaves a channel without a copy")
        leaves[int(k)] = (size, t)
    maps = Maps(leaves)
    tensors = obj.get("tensors")
    _need(isinstance(tensors, list) and tensors, "tensors must be a non-empty list")
    recipes: list[Recipe] = []
    seen: set[str] = set()
    for i, r in enumerate(tensors):
        _need(isinstance(r, dict), f"tensor entry {i} must be an object")
        key = r.get("key")
        _need(isinstance(key, str) and key and key not in seen, f"tensor entry {i} has a missing or repeated key")
        seen.add(key)
        _need(r.get("kind") in ("param", "buffer"), f"{key}: kind must be param or buffer")
        shape = r.get("shape")
        _need(isinstance(shape, list) and len(shape) <= 8, f"{key}: shape must be a list")
        shape = tuple(_int(s, f"{key} shape") for s in shape)
        _need(r.get("dtype") in DTYPES, f"{key}: unknown dtype {r.get('dtype')!r}")
        _need(isinstance(r.get("teacher"), bool), f"{key}: teacher must be a boolean")
        _need(r["teacher"] or r["kind"] == "buffer", f"{key}: a parameter must live in the teacher")
        dims = r.get("dims")
        _need(isinstance(dims, list), f"{key}: dims must be a list")
        parsed: list[tuple[int, Layout, str]] = []
        for e in dims:
            _need(isinstance(e, list) and len(e) == 3, f"{key}: each dim entry is [dim, layout, mode]")
            d = _int(e[0], f"{key} dim")
            _need(d < len(shape) and d not in [p[0] for p in parsed], f"{key}: dim {d} out of range or repeated")
            lay = _lay_from_json(e[1], leaves, key)
            _need(e[2] in MODES, f"{key}: mode must be one of {MODES}")
            _need(maps.size(lay) == shape[d], f"{key}: dim {d} layout has size {maps.size(lay)}, tensor {shape[d]}")
            parsed.append((d, lay, e[2]))
        recipes.append(Recipe(key, r["kind"], shape, r["dtype"], r["teacher"], parsed))
    report = obj.get("report", {})
    _need(isinstance(report, dict), "report must be an object")
    return Plan(float(ratio), seed, obj["equal_shares"], obj["source"], leaves, recipes, report)


def _lay_from_json(v: Any, leaves: dict, key: str, depth: int = 0) -> Layout:
    _need(depth < 64, f"{key}: layout nested too deeply")
    if isinstance(v, int) and not isinstance(v, bool):
        _need(v in leaves, f"{key}: layout names unknown space {v}")
        return v
    _need(isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("p", "c"), f"{key}: malformed layout")
    kind, parts = next(iter(v.items()))
    _need(isinstance(parts, list) and len(parts) >= 1, f"{key}: malformed layout")
    laid = tuple(_lay_from_json(p, leaves, key, depth + 1) for p in parts)
    return Prod(laid) if kind == "p" else Cat(laid)


def check_tensors(plan: Plan, header: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The file's tensors (name -> shape, dtype) must be exactly those the plan describes."""
    maps = plan.maps
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for r in plan.recipes:
        if r.teacher:
            expected[r.key] = (r.teacher_shape(maps), r.dtype)
        if r.kind == "buffer":
            expected[STUDENT_PREFIX + r.key] = (r.shape, r.dtype)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        raise PlanError(f"the file lacks tensors its plan names: {', '.join(missing[:3])}")
    if extra:
        raise PlanError(f"the file holds tensors its plan does not describe: {', '.join(extra[:3])}")
    for k, (shape, dtype) in expected.items():
        got_shape, got_dtype = header[k]
        if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
            raise PlanError(
                f"tensor {k} is {list(got_shape)} {got_dtype}, the plan expects {list(shape)} {dtype}"
            )
