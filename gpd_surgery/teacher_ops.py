"""Teacher-side ops that keep statistics exact over non-uniformly replicated channels.

At a fractional ratio some channels have more copies than others, so a plain mean over a widened
dim would weight them unequally. Weighting every copy by ``1 / (copies x student width)`` gives
back the student's statistics exactly.
"""
from __future__ import annotations

import torch
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
