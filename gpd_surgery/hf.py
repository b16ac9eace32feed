"""Hugging Face models: ``hf:DIR`` specs (a local directory as ``save_pretrained`` writes it) and students
written back as such a directory.

A directory is loaded through transformers' own classes, named by its ``config.json`` (``architectures``),
with its weights from ``model.safetensors``: no code from the directory runs and no pickle is read. A
config that asks for the directory's own code (``auto_map``) is refused unless the user passes
``--trust-remote-code``. transformers is an optional dependency (``pip install 'gpd-surgery[hf]'``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .errors import GPDError, first_line
from .inputs import InputSpec, Inputs

PREFIX = "hf:"
MAX_CONFIG = 4 << 20  # a config.json is a few kB; refuse reading megabytes of JSON
TEXT_LENGTH = 16  # tokens of the default example input of a text model
# Files of a model directory that describe it (not weights): copied with the config into a student directory.
DESCRIPTIVE = ("config.json", "generation_config.json", "preprocessor_config.json", "image_processor_config.json",
               "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "vocab.json", "merges.txt")


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def directory(spec: str) -> str:
    return spec[len(PREFIX):]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise GPDError("transformers is not installed: pip install 'gpd-surgery[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def read_config(path: str) -> dict[str, Any]:
    """The directory's ``config.json``, checked: a JSON object of bounded size naming a model type."""
    if not os.path.isdir(path):
        raise GPDError(f"hf:{path}: not a directory (hf:DIR takes a folder written by save_pretrained)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise GPDError(f"hf:{path}: no config.json in the directory (hf:DIR takes a folder written by "
                       "save_pretrained)")
    if os.path.getsize(file) > MAX_CONFIG:
        raise GPDError(f"hf:{path}: config.json is larger than {MAX_CONFIG >> 20} MiB")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise GPDError(f"hf:{path}: config.json is not valid JSON: {first_line(e)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise GPDError(f"hf:{path}: config.json names no model_type")
    return config


def _model_class(config: dict[str, Any], path: str, trust_remote_code: bool) -> Any:
    transformers = _transformers()
    if config.get("auto_map") and not trust_remote_code:
        raise GPDError(f"hf:{path}: the model's config asks for code from the directory (auto_map): pass "
                       "--trust-remote-code if you trust it")
    names = config.get("architectures") or []
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise GPDError(f"hf:{path}: config.json names no architectures (the model class to build)")
    cls = getattr(transformers, names[0], None)
    if cls is None and trust_remote_code and config.get("auto_map"):
        return None  # built through the Auto classes from the directory's code
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise GPDError(f"hf:{path}: transformers {transformers.__version__} has no model class {names[0][:80]!r}")
    return cls


def load(spec: str, model_args: dict[str, Any], trust_remote_code: bool = False,
         expect: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """The model of an ``hf:DIR`` spec with its weights, in eval mode. ``model_args`` override config
    fields (``num_labels=10``); ``expect``: a plan's shapes, checked on the meta device first."""
    from .trace import INIT_SEED, check_meta

    path = directory(spec)
    config = read_config(path)
    cls = _model_class(config, path, trust_remote_code)
    transformers = _transformers()
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **model_args)
    except Exception as e:
        raise GPDError(f"hf:{path}: cannot read its config with {model_args}: {type(e).__name__}: "
                       f"{first_line(e)}") from None
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json") if os.path.isfile(os.path.join(path, f))]
    if not weights:
        if any(os.path.isfile(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise GPDError(f"hf:{path}: its weights are a pickle (pytorch_model.bin), which gpd does not read: "
                           "save the model again with save_pretrained(safe_serialization=True)")
        raise GPDError(f"hf:{path}: no model.safetensors in the directory")
    if cls is not None:
        check_meta(spec, lambda: cls(cfg), model_args, expect)
    torch.manual_seed(INIT_SEED)  # weights missing from the file (a new head) are drawn reproducibly
    try:
        if cls is None:
            model = transformers.AutoModel.from_pretrained(path, config=cfg, trust_remote_code=True,
                                                           use_safetensors=True)
        else:
            # A config field changed by --model-arg (num_labels=10) may resize a layer: that layer is new
            # (drawn under the fixed seed), as transformers does for fine-tuning on other labels.
            model = cls.from_pretrained(path, config=cfg, use_safetensors=True,
                                        ignore_mismatched_sizes=bool(model_args))
    except Exception as e:
        raise GPDError(f"hf:{path}: cannot load the model: {type(e).__name__}: {first_line(e)}") from None
    return model.eval()


def default_inputs(model: nn.Module) -> Inputs:
    """The example input of a Hugging Face model, from its config: ``pixel_values`` of one image at the
    config's size, or ``input_ids`` of a short text."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "pixel_values")
    if name == "input_ids":
        return (InputSpec((1, TEXT_LENGTH), torch.int64, name),)
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2] if isinstance(size, (list, tuple)) else (224, 224)
    channels = getattr(config, "num_channels", 3)
    return (InputSpec((1, int(channels), int(h), int(w)), None, name),)


def main_input(model: nn.Module) -> tuple[str, torch.dtype | None] | None:
    """(name, dtype) of a Hugging Face model's main input, None for any other model."""
    name = getattr(model, "main_input_name", None)
    if not isinstance(name, str) or not hasattr(model, "config"):
        return None
    return name, torch.int64 if name == "input_ids" else None


def write_dir(state: dict[str, torch.Tensor], source: str, out: str, force: bool = False) -> list[str]:
    """The student as a Hugging Face directory ``out``: the source directory's config (and processor files)
    copied, the weights as ``model.safetensors``, so that ``from_pretrained(out)`` loads it. Returns the files."""
    from .io import atomic_save, atomic_write, check_output

    src = directory(source) if is_hf(source) else source
    read_config(src)
    if os.path.exists(out) and not os.path.isdir(out):
        raise GPDError(f"--hf-dir {out} exists and is not a directory")
    target = os.path.join(out, "model.safetensors")
    if os.path.isdir(out):
        check_output(target, force)
    os.makedirs(out, exist_ok=True)
    written = []
    for name in DESCRIPTIVE:
        f = os.path.join(src, name)
        if os.path.isfile(f) and not os.path.islink(f):
            dest = os.path.join(out, name)
            if os.path.exists(dest) and not force and name == "config.json":
                raise GPDError(f"{dest} exists: pass --force to replace it")
            with open(f, "rb") as src_file:
                data = src_file.read()
            atomic_write(dest, lambda tmp, data=data: tmp.write(data), overwrite=True)
            written.append(dest)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_save(tensors, target, {"format": "pt"}, overwrite=force)
    return [*written, target]
