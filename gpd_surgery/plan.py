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
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import PlanError, first_line
from .layout import Cat, Layout, Prod, leaf_ids
from .branches import branch_shapes
from .limits import MAX_DEPTH, MAX_DIMS, MAX_INPUT, MAX_INT, MAX_PARTS, MAX_RATIO, MAX_SEED
from .inputs import InputSpec, Inputs, as_inputs, valid_json
from .inputs import from_json as inputs_from_json
from .maps import Maps, teacher_size

FORMAT = "gpd-surgery/teacher"
# 2: the source may record the student weights' path and SHA-256 (``gpd verify TEACHER`` alone).
# 3: the source may record several example inputs (``inputs``) and how the student was captured
# (``capture``: fx or export). Older files read unchanged: every v1 and v2 field means the same in v3.
VERSION = 3
READS = (1, 2, 3)
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
    branches: dict[str, list[str]] = field(default_factory=dict)  # teacher weight -> branch kinds

    def input_shape(self, given: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """``given`` (an --input-shape) when there is one, else the (first) shape the student was expanded at."""
        return self.inputs(given)[0].shape

    def inputs(self, given: Any = None) -> Inputs:
        """``given`` (an --input-shape, or --input specs) when there is one, else the inputs the student was
        expanded with. A shape alone keeps the recorded dtypes and names of a one-input plan."""
        recorded = self.source.get("inputs")
        if given:
            specs = as_inputs(given)
            if recorded and len(recorded) == 1 and len(specs) == 1 and not isinstance(given[0], InputSpec):
                return (replace(inputs_from_json(recorded)[0], shape=specs[0].shape),)
            return specs
        if recorded:
            return inputs_from_json(recorded)
        shape = tuple(self.source.get("input_shape") or ())
        if not shape:
            raise PlanError("the plan records no input shape (the teacher was made from Python): pass --input-shape")
        return as_inputs(shape)

    @property
    def capture(self) -> str:
        """How the student was captured: "fx" (symbolic tracing; every plan before the torch.export path)."""
        return self.source.get("capture") or "fx"

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
                "branches": self.branches,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: Any) -> "Plan":
        if text is None:
            raise PlanError("the file carries no gpd plan: it is not a teacher written by `gpd expand`")
        if not isinstance(text, str):
            raise PlanError(f"the plan must be JSON text, not {type(text).__name__}")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError also covers integers too long to convert
            raise PlanError(f"the plan is not valid JSON ({first_line(e)})") from None
        return _parse(obj)

    def file_tensors(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of every tensor a teacher file with this plan must hold, nothing else."""
        maps = self.maps
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for r in self.recipes:
            names = ([r.key] if r.teacher else []) + ([STUDENT_PREFIX + r.key] if r.kind == "buffer" else [])
            for name in names:
                if name in out:  # e.g. a tensor named student/x next to a buffer x
                    raise PlanError(f"invalid plan: two tensors would be stored as {name}")
                out[name] = (r.teacher_shape(maps) if name == r.key else r.shape, r.dtype)
            for kind in self.branches.get(r.key, ()):
                for name, shape in branch_shapes(kind, r.teacher_shape(maps)).items():
                    full = r.key[: -len("weight")] + name
                    if full in out:
                        raise PlanError(f"invalid plan: two tensors would be stored as {full}")
                    out[full] = (shape, r.dtype)
        return out

    def teacher_parameters(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of the teacher's parameters: the widened student parameters and the branches."""
        files = self.file_tensors()
        known = {r.key: r.kind for r in self.recipes}
        return {k: v for k, v in files.items()
                if known.get(k) == "param" or (k not in known and not k.startswith(STUDENT_PREFIX))}

    def file_bytes(self) -> int:
        """Bytes of tensor data in a teacher file with this plan: the teacher's memory footprint."""
        return sum(math.prod(shape) * DTYPES[dtype].itemsize for shape, dtype in self.file_tensors().values())

def _lay_to_json(lay: Layout) -> Any:
    if isinstance(lay, int):
        return lay
    return {"p" if isinstance(lay, Prod) else "c": [_lay_to_json(p) for p in lay.parts]}


# -- validation ---------------------------------------------------------------------------
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(f"invalid plan: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    _need(_is_int(v) and lo <= v <= hi, f"{what} must be an integer in {lo}..{hi}")
    return v


def _parse(obj: Any) -> Plan:
    _need(isinstance(obj, dict), "not a JSON object")
    _need(obj.get("format") == FORMAT, f"format is {_short(obj.get('format'))}, expected {FORMAT!r}")
    version = obj.get("version")
    _need(_is_int(version) and version in READS,
          f"format version {_short(version)}, this gpd reads versions {', '.join(map(str, READS))}")
    ratio = obj.get("ratio")
    _need((isinstance(ratio, float) or (_is_int(ratio) and ratio <= MAX_INT)) and math.isfinite(ratio)
          and 1 <= ratio <= MAX_RATIO, f"ratio must be a number in 1..{MAX_RATIO}")
    seed = _int(obj.get("seed"), "seed", 0, MAX_SEED)
    _need(isinstance(obj.get("equal_shares"), bool), "equal_shares must be a boolean")
    source = _source(obj.get("source"))
    spaces = obj.get("spaces")
    _need(isinstance(spaces, dict), "spaces must be an object")
    leaves: dict[int, tuple[int, torch.Tensor | None]] = {}
    for k, v in spaces.items():
        _need(k.isascii() and k.isdigit() and len(k) < 12, f"space id {_short(k)} is not an integer")
        _need(isinstance(v, dict), f"space {k} must be an object")
        size = _int(v.get("size"), f"space {k} size", 1)
        src = v.get("src")
        if src is None:
            leaves[int(k)] = (size, None)
            continue
        # The map's length follows from the size and the ratio: a forged ratio cannot make `verify` rebuild
        # maps larger than those the file lists.
        _need(isinstance(src, list) and len(src) == teacher_size(size, ratio),
              f"space {k} map must list {teacher_size(size, ratio)} channels ({size} at ratio {ratio:g})")
        # Checked in Python before torch sees them: an int beyond int64 would overflow torch.tensor.
        _need(all(_is_int(i) and 0 <= i < size for i in src), f"space {k} map must hold indices in 0..{size - 1}")
        t = torch.tensor(src, dtype=torch.long)
        _need(bool((torch.bincount(t, minlength=size) > 0).all()), f"space {k} map leaves a channel without a copy")
        leaves[int(k)] = (size, t)
    tensors = obj.get("tensors")
    _need(isinstance(tensors, list) and tensors, "tensors must be a non-empty list")
    recipes: list[Recipe] = []
    seen: set[str] = set()
    for i, r in enumerate(tensors):
        _need(isinstance(r, dict), f"tensor entry {i} must be an object")
        key = r.get("key")
        _need(isinstance(key, str) and key and key not in seen, f"tensor entry {i} has a missing or repeated key")
        seen.add(key)
        kind, dtype, teacher = r.get("kind"), r.get("dtype"), r.get("teacher")
        _need(kind in ("param", "buffer"), f"{key}: kind must be param or buffer")
        shape = r.get("shape")
        _need(isinstance(shape, list) and len(shape) <= MAX_DIMS, f"{key}: shape must be a list of <= {MAX_DIMS} sizes")
        shape = tuple(_int(s, f"{key} shape") for s in shape)
        _need(isinstance(dtype, str) and dtype in DTYPES, f"{key}: unknown dtype {_short(dtype)}")
        _need(isinstance(teacher, bool), f"{key}: teacher must be a boolean")
        _need(teacher or kind == "buffer", f"{key}: a parameter must live in the teacher")
        dims = r.get("dims")
        _need(isinstance(dims, list), f"{key}: dims must be a list")
        parsed: list[tuple[int, Layout, str]] = []
        for e in dims:
            _need(isinstance(e, list) and len(e) == 3, f"{key}: each dim entry is [dim, layout, mode]")
            d = _int(e[0], f"{key} dim", 0, MAX_DIMS)
            _need(d < len(shape) and d not in [p[0] for p in parsed], f"{key}: dim {d} out of range or repeated")
            lay = _lay_from_json(e[1], leaves, key, [0])
            _need(isinstance(e[2], str) and e[2] in MODES, f"{key}: mode must be one of {MODES}")
            # Summing copies is only the inverse of splitting for floats; integer tensors are copied.
            _need(e[2] == "copy" or DTYPES[dtype].is_floating_point, f"{key}: share mode needs a floating dtype")
            size = _sizes(lay, leaves, key)[0]
            _need(size == shape[d], f"{key}: dim {d} layout has size {size}, tensor {shape[d]}")
            # A widened dim has a map somewhere in its layout; one over identity spaces only has nothing to do.
            _need(any(leaves[leaf][1] is not None for leaf in leaf_ids(lay)), f"{key}: dim {d} is not widened")
            parsed.append((d, lay, e[2]))
        recipes.append(Recipe(key, kind, shape, dtype, teacher, parsed))
    report = _report(obj.get("report", {}))
    plan = Plan(float(ratio), seed, obj["equal_shares"], source, leaves, recipes, report,
                _branches(obj.get("branches", {}), recipes))
    plan.file_tensors()  # refuses name clashes now rather than when the file is read
    return plan


def _short(v: Any) -> str:
    """A value quoted in an error message, cut short: the message stays one line."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _source(v: Any) -> dict[str, Any]:
    _need(isinstance(v, dict), "source must be an object")
    _need(isinstance(v.get("model_args", {}), dict), "source.model_args must be an object")
    _need(v.get("model") is None or isinstance(v["model"], str), "source.model must be a string")
    _need(v.get("weights") is None or isinstance(v["weights"], str), "source.weights must be a string")
    _need(v.get("weights_path") is None or (isinstance(v["weights_path"], str) and 0 < len(v["weights_path"]) <= 4096
                                           and "\0" not in v["weights_path"]), "source.weights_path must be a path")
    sha = v.get("weights_sha256")
    _need(sha is None or (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)),
          "source.weights_sha256 must be 64 lowercase hex digits")
    shape = v.get("input_shape")
    if shape is not None:
        _need(isinstance(shape, list) and 0 < len(shape) <= MAX_DIMS and all(_is_int(s) and s > 0 for s in shape)
              and math.prod(shape) <= MAX_INPUT, "source.input_shape must be a list of positive sizes")
    _need(v.get("inputs") is None or valid_json(v["inputs"]), "source.inputs must list input specs within bounds")
    _need(not v.get("inputs") or shape is None or v["inputs"][0]["shape"] == shape,
          "the input shape of source.input_shape and source.inputs differ")
    _need(v.get("capture") in (None, "fx", "export"), "source.capture must be fx or export")
    _need(v.get("hf_dir") is None or isinstance(v["hf_dir"], str) and len(v["hf_dir"]) <= 4096,
          "source.hf_dir must be a path")
    return v


def _report(v: Any) -> dict[str, Any]:
    """What froze and why: informative only, but the CLI prints it, so its types are checked too."""
    _need(isinstance(v, dict), "report must be an object")
    frozen = v.get("frozen", [])
    _need(isinstance(frozen, list) and all(
        isinstance(f, dict) and _is_int(f.get("size")) and isinstance(f.get("reason"), str) for f in frozen
    ), "report.frozen must list objects with a size and a reason")
    for k in ("expanded", "boundary"):
        _need(_is_int(v.get(k, 0)), f"report.{k} must be an integer")
    unsupported = v.get("unsupported", [])
    _need(isinstance(unsupported, list) and all(isinstance(u, str) for u in unsupported),
          "report.unsupported must list strings")
    return v


def _branches(v: Any, recipes: list[Recipe]) -> dict[str, list[str]]:
    from .branches import CONV_KINDS, LINEAR_KINDS

    _need(isinstance(v, dict), "branches must be an object")
    weights = {r.key: r for r in recipes if r.kind == "param" and r.teacher}
    out: dict[str, list[str]] = {}
    for key, kinds in v.items():
        r = weights.get(key)
        _need(r is not None and key.endswith("weight") and len(r.shape) >= 2,
              f"branches name {_short(key)}, which is not a teacher weight")
        _need(isinstance(kinds, list) and 0 < len(kinds) <= 8 and len(set(map(str, kinds))) == len(kinds)
              and all(k in CONV_KINDS + LINEAR_KINDS for k in kinds), f"branches of {_short(key)} are malformed")
        _need(all((k in LINEAR_KINDS) == (len(r.shape) == 2) for k in kinds),
              f"branches of {_short(key)} do not fit a weight of {len(r.shape)} dims")
        out[key] = list(kinds)
    return out


def _lay_from_json(v: Any, leaves: dict, key: str, count: list[int], depth: int = 0) -> Layout:
    _need(depth < MAX_DEPTH, f"{key}: layout nested too deeply")
    if _is_int(v):
        _need(v in leaves, f"{key}: layout names unknown space {_short(v)}")
        count[0] += 1
        _need(count[0] <= MAX_PARTS, f"{key}: layout has more than {MAX_PARTS} parts")
        return v
    _need(isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("p", "c"), f"{key}: malformed layout")
    kind, parts = next(iter(v.items()))
    _need(isinstance(parts, list) and len(parts) >= 1, f"{key}: malformed layout")
    laid = tuple(_lay_from_json(p, leaves, key, count, depth + 1) for p in parts)
    return Prod(laid) if kind == "p" else Cat(laid)



def _sizes(lay: Layout, leaves: dict, key: str) -> tuple[int, int]:
    """Student and teacher size of a layout, refused past MAX_INT: a product of many huge spaces
    would otherwise be big-integer arithmetic without end."""
    if isinstance(lay, int):
        size, src = leaves[lay]
        return size, size if src is None else len(src)
    prod = isinstance(lay, Prod)
    s, t = (1, 1) if prod else (0, 0)
    for p in lay.parts:
        ps, pt = _sizes(p, leaves, key)
        s, t = (s * ps, t * pt) if prod else (s + ps, t + pt)
        _need(s <= MAX_INT and t <= MAX_INT, f"{key}: layout sizes beyond {MAX_INT}")
    return s, t


def check_tensors(plan: Plan, header: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The file's tensors (name -> shape, dtype) must be exactly those the plan describes."""
    expected = plan.file_tensors()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        raise PlanError(f"the file lacks tensors its plan names: {', '.join(map(_short, missing[:3]))}")
    if extra:
        raise PlanError(f"the file holds tensors its plan does not describe: {', '.join(map(_short, extra[:3]))}")
    for k, (shape, dtype) in expected.items():
        got_shape, got_dtype = header[k]
        if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
            raise PlanError(f"tensor {_short(k)} is {list(got_shape)} {got_dtype}, the plan expects {list(shape)} {dtype}")
