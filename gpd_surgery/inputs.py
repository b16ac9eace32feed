"""A model's example inputs: their shapes, dtypes, keyword names and the range of integer inputs.

The captured graph takes its inputs positionally, in the order of its placeholders; the model itself is
called with the positional ones first and the keyword ones by name (``model(x, pixel_values=...)``). A plan
records them (``source.inputs``), so that verify, extract and training rebuild the same example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import GPDError
from .limits import MAX_DIM, MAX_DIMS, MAX_INPUT_ELEMENTS, MAX_INT

# The dtypes an example input may have: float inputs follow the check's dtype (float32 or float64).
INPUT_DTYPES = {"float": None, "float32": None, "float64": None, "int64": torch.int64, "long": torch.int64,
                "int32": torch.int32, "int": torch.int64, "bool": torch.bool}


@dataclass(frozen=True)
class InputSpec:
    """One example input: ``shape``; ``dtype`` None for a float input (drawn from a normal distribution in
    the dtype of the run), else an integer or bool dtype (drawn uniformly in ``[0, high)``); ``name``: the
    keyword the model takes it by, None for a positional input."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    name: str | None = None
    high: int | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype is None

    def describe(self) -> str:
        dtype = "" if self.dtype is None else f":{str(self.dtype).removeprefix('torch.')}"
        return f"{self.name + '=' if self.name else ''}{'x'.join(map(str, self.shape))}{dtype}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape)}
        if self.dtype is not None:
            out["dtype"] = str(self.dtype).removeprefix("torch.")
        if self.name is not None:
            out["name"] = self.name
        if self.high is not None:
            out["high"] = self.high
        return out


Inputs = tuple[InputSpec, ...]


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise GPDError(f"input shape {text!r} is not a comma-separated list of integers, e.g. 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise GPDError(f"input shape {text!r} must have positive sizes")
    if len(shape) > MAX_DIMS or max(shape) > MAX_DIM or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise GPDError(f"input shape {text[:60]!r} is too large: at most {MAX_DIMS} dims of up to {MAX_DIM} and "
                       f"{MAX_INPUT_ELEMENTS:,} values in all")
    return shape


def parse_input(text: str) -> InputSpec:
    """``[NAME=]SHAPE[:DTYPE]``: ``1,3,224,224``, ``pixel_values=1,3,224,224``, ``input_ids=1,16:int64``."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    elif not name.isidentifier():
        raise GPDError(f"--input {text[:60]!r}: {name[:40]!r} is not a keyword name (use NAME=SHAPE[:DTYPE])")
    shape_text, _, dtype_text = rest.partition(":")
    if dtype_text and dtype_text not in INPUT_DTYPES:
        raise GPDError(f"--input {text[:60]!r}: dtype {dtype_text[:20]!r} is not one of {', '.join(INPUT_DTYPES)}")
    return InputSpec(parse_shape(shape_text), INPUT_DTYPES.get(dtype_text), name or None)


def parse_inputs(items: Sequence[str]) -> Inputs:
    specs = tuple(parse_input(t) for t in items)
    names = [s.name for s in specs if s.name]
    if len(set(names)) != len(names):
        raise GPDError("--input names a keyword twice")
    if sum(math.prod(s.shape) for s in specs) > MAX_INPUT_ELEMENTS:
        raise GPDError(f"--input asks for more than {MAX_INPUT_ELEMENTS:,} values in all")
    return specs


def as_inputs(value: Any) -> Inputs:
    """Inputs from a shape (one positional float input, as ``--input-shape``), a spec, or a sequence of specs."""
    if isinstance(value, InputSpec):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(s, InputSpec) for s in value):
        return tuple(value)
    if isinstance(value, (tuple, list, torch.Size)) and value and all(isinstance(s, int) for s in value):
        return (InputSpec(tuple(int(s) for s in value)),)
    raise TypeError(f"not an input shape or input specs: {value!r}")


def shape_of(inputs: Inputs) -> tuple[int, ...]:
    """The first input's shape (what one-input code paths and messages show)."""
    return inputs[0].shape


def describe(inputs: Inputs) -> str:
    return " ".join(s.describe() for s in inputs)


def with_batch(inputs: Inputs, batch: int) -> Inputs:
    """The same inputs at batch size ``batch`` (their first dim)."""
    return tuple(replace(s, shape=(batch, *s.shape[1:])) for s in inputs)


def integer_high(model: nn.Module) -> int:
    """The range integer inputs are drawn in: valid for every embedding of the model (token ids, positions);
    2 where it has none (a mask)."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    return max(1, min(sizes)) if sizes else 2


def resolve(inputs: Inputs, model: nn.Module) -> Inputs:
    """``inputs`` with the range of each integer input set (from the model's embeddings where not given)."""
    high = None
    out = []
    for s in inputs:
        if s.dtype is not None and s.high is None:
            high = high if high is not None else integer_high(model)
            s = replace(s, high=2 if s.dtype is torch.bool else high)
        out.append(s)
    return tuple(out)


def make(inputs: Inputs, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
         device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """One example of every input, in order: floats ~ N(0, 1) in ``dtype``, integers uniform in [0, high)."""
    out = []
    for s in inputs:
        if s.dtype is None:
            out.append(torch.randn(s.shape, generator=generator, dtype=dtype).to(device))
        else:
            t = torch.randint(0, max(1, s.high or 2), s.shape, generator=generator, dtype=torch.int64)
            out.append(t.to(s.dtype).to(device))
    return out


def call(model: nn.Module, inputs: Inputs, tensors: Sequence[torch.Tensor]) -> Any:
    """``model`` called as it is written: positional inputs first, keyword inputs by name."""
    args = [t for s, t in zip(inputs, tensors) if s.name is None]
    kwargs = {s.name: t for s, t in zip(inputs, tensors) if s.name is not None}
    return model(*args, **kwargs)


def from_json(value: Any) -> Inputs:
    """Inputs a plan records (validated in ``plan.py``)."""
    specs = []
    for v in value:
        dtype = v.get("dtype")
        specs.append(InputSpec(tuple(v["shape"]), INPUT_DTYPES[dtype] if dtype else None, v.get("name"),
                               v.get("high")))
    return tuple(specs)


def valid_json(value: Any) -> bool:
    """Whether a plan's ``source.inputs`` is a list of input specs within the bounds (see ``limits.py``)."""
    if not isinstance(value, list) or not 0 < len(value) <= 64:
        return False
    total = 0
    for v in value:
        if not isinstance(v, dict) or set(v) - {"shape", "dtype", "name", "high"}:
            return False
        shape = v.get("shape")
        if not (isinstance(shape, list) and 0 < len(shape) <= MAX_DIMS
                and all(type(s) is int and 0 < s <= MAX_DIM for s in shape)):
            return False
        total += math.prod(shape)
        if v.get("dtype") is not None and v["dtype"] not in INPUT_DTYPES:
            return False
        if v.get("name") is not None and not (isinstance(v["name"], str) and v["name"].isidentifier()
                                              and len(v["name"]) <= 200):
            return False
        if v.get("high") is not None and not (type(v["high"]) is int and 0 < v["high"] <= MAX_INT):
            return False
    return total <= MAX_INPUT_ELEMENTS


def names_in(inputs: Iterable[InputSpec]) -> list[str]:
    return [s.name for s in inputs if s.name]
