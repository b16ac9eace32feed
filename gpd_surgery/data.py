"""Datasets for `gpd train`: an image folder (``train/`` and optional ``val/``), or a synthetic task.

The synthetic task is for demos and tests: every class is a smooth pattern (a few random plane
waves per colour channel); a sample is its class's pattern, shifted at random, blended with
another class's pattern and drowned in noise. A small CNN learns it quickly but does not reach
100%, so that two training methods can be told apart. Everything derives from ``seed``.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import GPDError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def synthetic(num_classes: int, image_size: int, train_size: int = 4000, val_size: int | None = None,
              seed: int = 0, channels: int = 3) -> tuple[TensorDataset, TensorDataset]:
    """A train and a validation split of the synthetic task (``val_size`` defaults to a quarter)."""
    if num_classes < 2:
        raise GPDError(f"the synthetic task needs at least 2 classes, the model has {num_classes} outputs")
    if train_size < 1:
        raise GPDError(f"the synthetic training set needs at least one sample, got {train_size}")
    val_size = train_size // 4 if val_size is None else val_size
    g = torch.Generator().manual_seed(seed * 1_000_003 + 12345)
    protos = _patterns(num_classes, channels, image_size, g)
    train = _samples(protos, train_size, g)
    val = _samples(protos, val_size, g)
    return train, val


def _patterns(k: int, c: int, s: int, g: torch.Generator, waves: int = 4) -> torch.Tensor:
    """``k`` smooth patterns of shape (c, s, s): sums of plane waves of low frequency, unit variance."""
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float64) / s, torch.arange(s, dtype=torch.float64) / s,
                            indexing="ij")
    out = torch.zeros(k, c, s, s, dtype=torch.float64)
    for i in range(k):
        for ch in range(c):
            for _ in range(waves):
                freq = 0.5 + 2.5 * torch.rand((), generator=g, dtype=torch.float64)
                angle = 2 * math.pi * torch.rand((), generator=g, dtype=torch.float64)
                phase = 2 * math.pi * torch.rand((), generator=g, dtype=torch.float64)
                amp = torch.randn((), generator=g, dtype=torch.float64)
                out[i, ch] += amp * torch.cos(2 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle))
                                              + phase)
    out -= out.mean(dim=(1, 2, 3), keepdim=True)
    out /= out.std(dim=(1, 2, 3), keepdim=True)
    return out


def _samples(protos: torch.Tensor, n: int, g: torch.Generator) -> TensorDataset:
    k, c, s, _ = protos.shape
    labels = torch.randint(0, k, (n,), generator=g)
    other = (labels + torch.randint(1, k, (n,), generator=g)) % k  # a different class, blended in
    mix = 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    shift = torch.randint(-(s // 4), s // 4 + 1, (n, 2), generator=g)
    x = torch.empty(n, c, s, s, dtype=torch.float64)
    for i in range(n):
        p = protos[labels[i]] + mix[i] * protos[other[i]]
        x[i] = torch.roll(p, (int(shift[i, 0]), int(shift[i, 1])), dims=(1, 2))
    x += 2.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # small_cnn: ~90% after 15 epochs of 4000
    return TensorDataset(x.float(), labels)


def image_folder(root: str, image_size: int, val_fraction: float = 0.1, seed: int = 0, augment: str = "crop-flip"
                 ) -> tuple[Dataset, Dataset | None, list[str]]:
    """``root/train/CLASS/IMAGE`` (and ``root/val/CLASS/IMAGE`` when present), or ``root/CLASS/IMAGE`` with a
    held-out fraction for validation. Returns the train and validation sets and the class names."""
    try:
        from torchvision import datasets, transforms
    except ImportError:  # pragma: no cover - torchvision is an optional dependency
        raise GPDError("reading an image folder needs torchvision: pip install 'gpd-surgery[vision]'") from None
    if not os.path.exists(root):
        raise GPDError(f"dataset {root} does not exist (give a folder with train/CLASS/IMAGE files, or 'synthetic')")
    if not os.path.isdir(root):
        raise GPDError(f"dataset {root} is not a folder (give a folder with train/CLASS/IMAGE files, or 'synthetic')")
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    plain = transforms.Compose([transforms.Resize((image_size, image_size)), *norm])
    aug: list[Any] = [transforms.Resize((image_size, image_size))]
    if augment in ("crop", "crop-flip"):
        aug.append(transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
    if augment == "crop-flip":
        aug.append(transforms.RandomHorizontalFlip())
    train_tf = transforms.Compose(aug + norm)
    train_dir = os.path.join(root, "train")
    split = os.path.isdir(train_dir)
    train_root = train_dir if split else root
    train = _folder(datasets, train_root, train_tf)
    val_dir = os.path.join(root, "val")
    if split and os.path.isdir(val_dir):
        val = _folder(datasets, val_dir, plain)
        if val.classes != train.classes:
            raise GPDError(f"the classes of {val_dir} ({_names(val.classes)}) differ from those of {train_root} "
                           f"({_names(train.classes)})")
        return train, val, list(train.classes)
    if not 0 <= val_fraction < 1:
        raise GPDError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(train) * val_fraction))
    if n_val == 0:
        return train, None, list(train.classes)
    if n_val >= len(train):
        raise GPDError(f"dataset {train_root} has only {len(train)} images: too few to hold out a validation split")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    evaluation = _folder(datasets, train_root, plain)
    return Subset(train, order[n_val:]), Subset(evaluation, order[:n_val]), list(train.classes)


def _folder(datasets: Any, path: str, tf: Any) -> Any:
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise GPDError(f"dataset {path} is empty: it has no class folders (expected {path}/CLASS/IMAGE files)")
    try:
        ds = datasets.ImageFolder(path, transform=tf, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise GPDError(f"dataset {path} cannot be read: {e}") from None
    if len(ds) == 0:
        raise GPDError(f"dataset {path} is empty: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) "
                       f"in its {len(classes)} class folders")
    return ds


def _names(classes: list[str], n: int = 4) -> str:
    return ", ".join(classes[:n]) + (f" +{len(classes) - n} more" if len(classes) > n else "")
