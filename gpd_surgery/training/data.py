"""Datasets for `gpd train`: an image folder (``train/`` and optional ``val/``), or a synthetic task.

The synthetic task is for demos and tests: every class is a smooth pattern (a few random plane
waves per colour channel); a sample is its class's pattern, shifted at random, blended with
another class's pattern and drowned in noise. A small CNN learns it quickly but does not reach
100%, so that two training methods can be told apart. Everything derives from ``seed``.

An image folder is checked before training starts (every image's header, its pixel count, PIL's
``verify``), so that a corrupt file or a decompression bomb is refused at once, not after an hour of
training; a file that still cannot be decoded later is one clear error (``ImageReadError``).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import GPDError, first_line
from .normalization import Normalization

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def image_folder(root: str, image_size: int, val_fraction: float = 0.1, seed: int = 0, augment: str = "crop-flip",
                 norm: Normalization | None = None, rand_augment: str | None = None, reprob: float = 0.0
                 ) -> tuple[Dataset, Dataset | None, list[str]]:
    """``root/train/CLASS/IMAGE`` (and ``root/val/CLASS/IMAGE`` when present), or ``root/CLASS/IMAGE`` with a
    held-out fraction for validation. Returns the train and validation sets and the class names. Every image is
    checked first (``check_images``): a bad one is refused, named. ``norm``: the model's mean, std, interpolation
    and crop (``normalization.resolve``); ``augment`` ``timm``: timm's ``create_transform`` (random resized crop,
    flip, ``rand_augment`` such as ``rand-m9-mstd0.5``, random erasing with probability ``reprob``)."""
    if not os.path.exists(root):
        raise GPDError(f"dataset {root} does not exist (give a folder with train/CLASS/IMAGE files, or 'synthetic')")
    if not os.path.isdir(root):
        raise GPDError(f"dataset {root} is not a folder (give a folder with train/CLASS/IMAGE files, or 'synthetic')")
    train_tf, plain = transforms_for(image_size, norm or Normalization(), augment, rand_augment, reprob)
    train_dir = os.path.join(root, "train")
    split = os.path.isdir(train_dir)
    train_root = train_dir if split else root
    classes, samples = _folder(train_root)
    train = ImageFiles(classes, samples, train_tf)
    val_dir = os.path.join(root, "val")
    if split and os.path.isdir(val_dir):
        val_classes, val_samples = _folder(val_dir)
        if val_classes != classes:
            raise GPDError(f"the classes of {val_dir} ({_names(val_classes)}) differ from those of {train_root} "
                           f"({_names(classes)})")
        check_images(root, [f for f, _ in samples + val_samples])
        return train, ImageFiles(classes, val_samples, plain), classes
    check_images(root, [f for f, _ in samples])
    if not 0 <= val_fraction < 1:
        raise GPDError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(train) * val_fraction))
    if n_val == 0:
        return train, None, classes
    if n_val >= len(train):
        raise GPDError(f"dataset {train_root} has only {len(train)} images: too few to hold out a validation split")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    evaluation = ImageFiles(classes, samples, plain)
    return Subset(train, order[n_val:]), Subset(evaluation, order[:n_val]), classes


def transforms_for(image_size: int, norm: Normalization, augment: str = "crop-flip", rand_augment: str | None = None,
                   reprob: float = 0.0) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The training and the evaluation transforms of an image folder."""
    try:
        from torchvision import transforms
    except ImportError:  # pragma: no cover - torchvision is an optional dependency
        raise GPDError("reading an image folder needs torchvision: pip install 'gpd-surgery[vision]'") from None
    if augment == "timm":
        try:
            from timm.data import create_transform
        except ImportError:
            raise GPDError("--augment timm needs timm: pip install 'gpd-surgery[timm]'") from None
        common = dict(input_size=image_size, interpolation=norm.interpolation, mean=norm.mean, std=norm.std)
        train_tf = create_transform(is_training=True, auto_augment=rand_augment or None, re_prob=reprob, **common)
        plain = create_transform(is_training=False, crop_pct=norm.crop_pct or 1.0, **common)
        return train_tf, plain
    mode = transforms.InterpolationMode(norm.interpolation)
    tail = [transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)]
    if norm.crop_pct is None:  # no configuration: the whole image, squeezed to the square
        resize = [transforms.Resize((image_size, image_size), interpolation=mode)]
    else:  # as the weights were evaluated: the shorter side to size / crop_pct, the centre cropped
        resize = [transforms.Resize(int(math.floor(image_size / norm.crop_pct)), interpolation=mode),
                  transforms.CenterCrop(image_size)]
    aug: list[Any] = list(resize)
    if augment in ("crop", "crop-flip"):
        aug.append(transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
    if augment == "crop-flip":
        aug.append(transforms.RandomHorizontalFlip())
    train_tf = transforms.Compose(aug + tail + ([transforms.RandomErasing(p=reprob)] if reprob > 0 else []))
    return train_tf, transforms.Compose(resize + tail)


class ImageReadError(GPDError):
    """An image that cannot be read during training. Raised in a DataLoader worker, it comes back re-made from
    the worker's traceback text; its own line is recovered from that, so that it still reads as one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            tag = f"{type(self).__module__}.{type(self).__qualname__}: "
            lines = [line for line in message.splitlines() if line.startswith(tag)]
            message = lines[-1][len(tag):] if lines else message.strip().splitlines()[-1]
        super().__init__(message)


class ImageFiles(Dataset):
    """Image files and their class indices (as torchvision's ImageFolder), read by ``load_image``."""

    def __init__(self, classes: list[str], samples: list[tuple[str, int]], transform: Callable[[Any], Any]) -> None:
        self.classes, self.samples, self.transform = classes, samples, transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        return self.transform(load_image(path)), target


def load_image(path: str) -> Any:
    """The image at ``path`` in RGB. Whatever makes that fail (the file changed or vanished since the check, a
    truncated JPEG that only decoding finds) is an ``ImageReadError`` naming it, not a crash of the run."""
    try:
        with _open_image(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for a damaged file
        raise ImageReadError(f"cannot read image {path} ({first_line(e)}): the checkpoints written so far are intact; "
                             "replace the file and continue with --resume") from None


def _open_image(path: str) -> Any:
    """``Image.open`` (reads the header only), refusing more pixels than PIL's bound: a decompression bomb."""
    from PIL import Image

    img = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        img.close()
        raise ValueError(f"{img.width} x {img.height} pixels, more than PIL's bound of {limit}: a decompression bomb?")
    return img


def _problem(path: str) -> str | None:
    try:
        with _open_image(path) as img:
            img.verify()  # the file's structure (PNG: every chunk and checksum), without decoding the pixels
    except Exception as e:
        return first_line(e)
    return None


def check_images(root: str, files: list[str]) -> None:
    """Refuse a dataset with an image that cannot be opened, holds more pixels than PIL allows, or fails PIL's
    ``verify``, naming the first such file. Reads headers and structure only (no decoding), in threads."""
    from PIL import Image

    with warnings.catch_warnings():  # over the bound: refused below, with the file's name
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            problems = [(f, p) for f, p in zip(files, pool.map(_problem, files, chunksize=64)) if p is not None]
    if problems:
        (first, why), n = problems[0], len(problems)
        more = f" ({n} of {len(files)} images are; the first)" if n > 1 else ""
        raise GPDError(f"dataset {root}: image {first} cannot be used{more}: {why}; fix or remove it")


def _warn(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one process speaks under torchrun
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _folder(path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders of ``path`` and their image files, in torchvision ImageFolder's order (classes sorted,
    then the folders of each class's walk and their files sorted).

    Folder symlinks are followed only out of the tree to a folder not read yet: one that leads back into the
    tree, or to a folder that contains it, would read images again under another label or loop (a link
    ``train/a/loop -> ..`` made 8 images 328); those are skipped, each with a warning."""
    try:
        top = os.path.realpath(path)
        seen = {top}
        classes = [e.name for e in sorted(os.scandir(path), key=lambda e: e.name) if _is_dir(e) and _enter(e.path, top, seen)]
        if not classes:
            raise GPDError(f"dataset {path} is empty: it has no class folders (expected {path}/CLASS/IMAGE files)")
        samples = []
        for i, c in enumerate(classes):
            for folder, files in sorted(_walk(os.path.join(path, c), top, seen)):
                samples.extend((os.path.join(folder, f), i) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    except OSError as e:
        raise GPDError(f"dataset {path} cannot be read: {e.strerror or e}") from None
    if not samples:
        raise GPDError(f"dataset {path} is empty: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) "
                       f"in its {len(classes)} class folders")
    return classes, samples


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symlink; a dangling one is a file, as os.walk has it
    except OSError:
        return False


def _enter(folder: str, top: str, seen: set[str]) -> bool:
    """Whether to read ``folder``: a symlink only when it leads out of the tree ``top`` and not to a folder that
    contains it; any folder only once."""
    real = os.path.realpath(folder)
    if os.path.islink(folder):
        if real == top or real.startswith(top + os.sep):
            _warn(f"skipped {folder}: a link back into the dataset folder ({real})")
            return False
        if top.startswith(real.rstrip(os.sep) + os.sep):
            _warn(f"skipped {folder}: a link to {real}, which contains the dataset folder")
            return False
    if real in seen:
        _warn(f"skipped {folder}: a link to {real}, which is read already")
        return False
    seen.add(real)
    return True


def _walk(start: str, top: str, seen: set[str]) -> list[tuple[str, list[str]]]:
    """``(folder, file names)`` for ``start`` and the folders under it that ``_enter`` allows."""
    out, stack = [], [start]
    while stack:
        folder = stack.pop()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        out.append((folder, [e.name for e in entries if not _is_dir(e)]))
        stack.extend(reversed([e.path for e in entries if _is_dir(e) and _enter(e.path, top, seen)]))
    return out


def _names(classes: list[str], n: int = 4) -> str:
    return ", ".join(classes[:n]) + (f" +{len(classes) - n} more" if len(classes) > n else "")
