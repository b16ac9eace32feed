"""Teacher-side ops that keep statistics exact over non-uniformly replicated channels.

At a fractional ratio some channels have more copies than others, so a plain mean over a widened
dim would weight them unequally. Weighting every copy by ``1 / (copies x student width)`` gives
back the student's statistics exactly. A weight-standardised convolution's statistics run over its
weight's input dim, which holds shares rather than copies: they are taken over the folded weight.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def copy_weights(src: torch.Tensor, size: int) -> torch.Tensor:
    """Per teacher channel: 1 / (number of copies of its student channel x student width); sums to 1."""
    counts = torch.bincount(src, minlength=size).to(torch.float64)
    return 1.0 / (counts[src] * size)


def is_uniform(src: torch.Tensor, size: int) -> bool:
    counts = torch.bincount(src, minlength=size)
    return bool(counts.min() == counts.max())


def weighted_layer_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, copies: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dims whose statistics weight each channel by ``copies`` (flattened)."""
    k = len(normalized_shape)
    flat = x.flatten(x.dim() - k) if k > 1 else x
    w = copies.to(x.dtype)
    mean = (flat * w).sum(-1, keepdim=True)
    var = ((flat - mean).square() * w).sum(-1, keepdim=True)
    y = ((flat - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def weighted_rms_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
                      eps: float | None, copies: torch.Tensor) -> torch.Tensor:
    k = len(normalized_shape)
    flat = x.flatten(x.dim() - k) if k > 1 else x
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = (flat.square() * copies.to(x.dtype)).sum(-1, keepdim=True)
    y = (flat * torch.rsqrt(ms + eps)).reshape(x.shape)
    return y * weight if weight is not None else y


def weighted_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, copies: torch.Tensor) -> torch.Tensor:
    """GroupNorm whose statistics weight each channel within a group by ``copies`` (one weight per channel of
    a group, the same in every group; they sum to 1): the copies of a student channel stay in its group."""
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, c // num_groups, -1)
    w = copies.to(x.dtype).view(1, 1, -1, 1)
    mean = (g.mean(-1, keepdim=True) * w).sum(2, keepdim=True)
    centred = g - mean
    var = (centred.square().mean(-1, keepdim=True) * w).sum(2, keepdim=True)
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


torch.fx.wrap("weighted_layer_norm")
torch.fx.wrap("weighted_rms_norm")
torch.fx.wrap("weighted_group_norm")


class WeightedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics weight each channel by its copy weight (a buffer)."""

    def __init__(self, ln: nn.LayerNorm, copies: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = ln.normalized_shape, ln.eps
        self.elementwise_affine = ln.elementwise_affine
        self.weight, self.bias = ln.weight, ln.bias
        self.register_buffer("copies", copies, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.copies)


class WeightedRMSNorm(nn.RMSNorm):
    def __init__(self, norm: nn.RMSNorm, copies: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.weight = norm.weight
        self.register_buffer("copies", copies, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_rms_norm(x, self.normalized_shape, self.weight, self.eps, self.copies)


class WeightedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (or timm's GroupNormAct: its dropout and activation follow) whose statistics weight each
    channel within a group by its copy weight (a buffer)."""

    def __init__(self, gn: nn.GroupNorm, copies: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.num_groups, self.num_channels, self.eps, self.affine = gn.num_groups, gn.num_channels, gn.eps, gn.affine
        self.weight, self.bias = gn.weight, gn.bias
        for name in ("drop", "act"):  # GroupNormAct's tail, parameter-free
            if isinstance(getattr(gn, name, None), nn.Module):
                self.add_module(name, getattr(gn, name))
        self.register_buffer("copies", copies, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = weighted_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.copies)
        for name in ("drop", "act"):
            if name in self._modules:
                y = self._modules[name](y)
        return y


class FoldedStdConv(nn.Module):
    """A teacher's weight-standardised convolution (timm's StdConv2d and ScaledStdConv2d, BiT's): the statistics
    of each output row are the student's, those of the row with the copies of each input channel summed
    (``src``: the input dim's source map), and each copy's share of the row's mean is ``1 / copies``. The
    copies of an input channel then sum to the student's standardised weight, whatever their shares and at
    any ratio, and the collapse (output rows copied, input copies summed) gives a student whose own
    standardisation computes exactly that. Standardising the teacher's row as it is would not: its fan-in,
    mean and variance follow the copies' shares (exact only with equal shares and a gain and eps corrected by
    the ratio, never at uneven copies)."""

    def __init__(self, conv: nn.Conv2d, src: torch.Tensor, student_in: int, pad: Any = None) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        gain = getattr(conv, "gain", None)
        self.gain = gain if isinstance(gain, nn.Parameter) else None
        self.scale = float(getattr(conv, "scale", 1.0))  # gamma / sqrt(the student's fan-in)
        self.eps = float(conv.eps)  # type: ignore[arg-type]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.pad = pad  # same padding from the input's size (a function or a module), or None
        self.student_in = student_in
        counts = torch.bincount(src, minlength=student_in).to(torch.float64)
        self.register_buffer("src", src, persistent=False)
        self.register_buffer("share", 1.0 / counts[src], persistent=False)

    def standardized(self, weight: torch.Tensor) -> torch.Tensor:
        out, k = weight.shape[0], weight.shape[2:]
        folded = weight.new_zeros((out, self.student_in, *k)).index_add(1, self.src, weight).reshape(out, -1)
        mean, var = folded.mean(1), folded.var(1, unbiased=False)
        col = (-1,) + (1,) * (weight.dim() - 1)
        share = self.share.to(weight.dtype).view(1, -1, *(1,) * len(k))
        w = (weight - mean.view(col) * share) * torch.rsqrt(var + self.eps).view(col)
        return w * (self.gain * self.scale).view(col) if self.gain is not None else w

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return F.conv2d(x, self.standardized(weight), bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)
