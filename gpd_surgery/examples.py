"""Small built-in students for demos and tests (no downloads): ``gpd_surgery.examples:small_cnn``."""
from __future__ import annotations

import torch
from torch import nn


class _SE(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class _Mixed(nn.Module):
    """Two branches concatenated along channels, then a depthwise conv gated by squeeze-excitation."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.norm = nn.GroupNorm(4, 2 * c)
        self.se = _SE(2 * c, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.se(self.norm(self.dw(y)))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.Hardswish())
        self.stage1 = _Residual(width)
        self.stage2 = _Mixed(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))))


def small_cnn(num_classes: int = 10, width: int = 16) -> SmallCNN:
    """A 20k-parameter CNN with residual, grouped, depthwise, concatenated and gated layers."""
    return SmallCNN(num_classes, width)
