"""How a model expects its images: mean, std, interpolation and crop, from the model's own configuration.

Pretrained weights are trained on inputs normalized with particular statistics (torchvision's and most of timm's:
ImageNet's; some timm and Hugging Face models: 0.5), so fine-tuning with other ones starts from a worse model
than the weights are. The configuration is read, in this order, from: a timm model's ``pretrained_cfg`` (timm
models, and any model carrying one), a Hugging Face directory's ``preprocessor_config.json``, torchvision's
weight transforms of the model's name; else the neutral 0.5 / 0.5 of a model that has none (training from
scratch). ``--mean`` / ``--std`` override the statistics.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..errors import GPDError

NEUTRAL = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
MAX_PREPROCESSOR = 1 << 20


@dataclass(frozen=True)
class Normalization:
    """What the images are turned into: ``(x - mean) / std`` per channel after resizing with ``interpolation``;
    ``crop_pct``: evaluation resizes to ``size / crop_pct`` and crops the centre (None: resize to the square, the
    whole image). ``source``: where the values came from."""

    mean: tuple[float, ...] = NEUTRAL
    std: tuple[float, ...] = NEUTRAL
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    source: str = "default"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def parse_triple(text: str, option: str) -> tuple[float, float, float]:
    """``0.485,0.456,0.406``: three finite numbers (one per RGB channel)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise GPDError(f"{option} takes three numbers separated by commas (R,G,B), got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise GPDError(f"{option} takes three finite numbers separated by commas (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def resolve(model: nn.Module, spec: str, mean: str | None = None, std: str | None = None) -> Normalization:
    """The normalization ``model`` (built from ``spec``) expects, with ``--mean`` / ``--std`` overriding."""
    found = _timm(model) or _hf(spec) or _torchvision(spec) or Normalization()
    over: dict[str, Any] = {}
    if mean is not None:
        over["mean"] = parse_triple(mean, "--mean")
    if std is not None:
        over["std"] = parse_triple(std, "--std")
        if any(v <= 0 for v in over["std"]):
            raise GPDError(f"--std must be > 0 for every channel, got {std!r}")
    if not over:
        return found
    return Normalization(**{**asdict(found), **over, "source": found.source + " with --mean/--std"})


def _triple(v: Any) -> tuple[float, ...] | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3
    if (isinstance(v, (list, tuple)) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
        return tuple(float(x) for x in v)
    return None


def _make(mean: Any, std: Any, interpolation: Any, crop_pct: Any, source: str) -> Normalization | None:
    m, s = _triple(mean), _triple(std)
    if m is None or s is None or any(x <= 0 for x in s):
        return None
    interp = interpolation if interpolation in INTERPOLATIONS else "bilinear"
    crop = float(crop_pct) if isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1 else None
    return Normalization(m, s, interp, crop, source)


def _timm(model: nn.Module) -> Normalization | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return None
    return _make(cfg.get("mean"), cfg.get("std"), cfg.get("interpolation"), cfg.get("crop_pct"),
                 "the model's pretrained_cfg (timm)")


def _hf(spec: str) -> Normalization | None:
    if not spec.startswith("hf:"):
        return None
    path = os.path.join(spec[3:], "preprocessor_config.json")
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_PREPROCESSOR:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    resample = cfg.get("resample")
    crop = cfg.get("crop_pct")
    size, crop_size = cfg.get("size"), cfg.get("crop_size")
    if crop is None and cfg.get("do_center_crop") and isinstance(size, dict) and isinstance(crop_size, dict):
        short, side = size.get("shortest_edge") or size.get("height"), crop_size.get("height")
        if isinstance(short, int) and isinstance(side, int) and short > 0:
            crop = side / short
    return _make(cfg.get("image_mean"), cfg.get("image_std"), _PIL_RESAMPLE.get(resample) if isinstance(resample, int)
                 else None, crop, "the model's preprocessor_config.json (Hugging Face)")


def _torchvision(spec: str) -> Normalization | None:
    if not spec.startswith("torchvision:"):
        return None
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(spec.split(":", 1)[1]).DEFAULT
        t = weights.transforms()
    except Exception:  # no weights enum for that name (a model without published weights)
        return None
    crop = t.crop_size[0] / t.resize_size[0] if t.crop_size and t.resize_size else None
    return _make(t.mean, t.std, str(t.interpolation.value), crop, f"torchvision's {weights} transforms")
