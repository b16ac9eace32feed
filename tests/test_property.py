"""Property: for any small CNN of supported blocks and ops no rule knows (run at the student's width), the teacher
is exact, collapse inverts expand, nothing freezes."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gpd_surgery import collapse, expand

from conftest import random_init


pytestmark = pytest.mark.usefixtures("one_thread")


# -- blocks ------------------------------------------------------------------------------------------
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish,
        "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky": lambda c: nn.LeakyReLU(0.1), "prelu": nn.PReLU,
        "prelu1": lambda c: nn.PReLU(1)}
POOLS = {"max2": lambda: nn.MaxPool2d(2), "avg2": lambda: nn.AvgPool2d(2), "max3s1": lambda: nn.MaxPool2d(3, 1, 1),
         "avg3s1": lambda: nn.AvgPool2d(3, 1, 1)}


class Residual(nn.Module):
    def __init__(self, c: int, hidden: int, k: int, groups: int):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, c, k, padding=k // 2, groups=groups)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn(self.conv1(x))))


class Branches(nn.Module):
    def __init__(self, c: int, widths: list[int], ks: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, w, k, padding=k // 2) for w, k in zip(widths, ks))

    def forward(self, x):
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class SE(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class SplitCat(nn.Module):
    def __init__(self, c: int, k: int, swap: bool, slices: bool = False):
        super().__init__()
        self.sizes, self.swap, self.conv = [k, c - k], swap, nn.Conv2d(k, k, 3, padding=1)
        self.slices = slices

    def forward(self, x):
        k = self.sizes[0]
        a, b = (x[:, :k], x[:, k:]) if self.slices else x.split(self.sizes, dim=1)
        a = F.relu(self.conv(a))
        return torch.cat([b, a] if self.swap else [a, b], dim=1)


class Shuffle(nn.Module):
    def __init__(self, g: int):
        super().__init__()
        self.g = g

    def forward(self, x):
        b, c, h, w = x.size()
        return x.view(b, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ChannelStats(nn.Module):
    """Statistics over the channels (GRN-like): a mean, a sum and a max over the widened dim."""

    def forward(self, x):
        g = x.mean(1, keepdim=True) + 0.1 * x.sum(1, keepdim=True) - torch.amax(x, dim=1, keepdim=True)
        return x * torch.sigmoid(g)


def unknown_mix(x):
    """Mixes channels in a way no rule knows (fx records it as one call): it runs at the student's width."""
    return torch.cumprod(torch.tanh(x.flip(1)), 1) + x


torch.fx.wrap("unknown_mix")


class Unknown(nn.Module):
    def forward(self, x):
        return unknown_mix(x)


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class FeaturesAndLogits(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        f = x.mean((2, 3))
        return f, self.fc(f)


def build(blocks: list[tuple], head: str, c: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    for kind, *a in blocks:
        if kind == "conv":
            out, k, groups = a
            layers.append(nn.Conv2d(c, out, k, padding=k // 2, groups=groups))
            c = out
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif kind == "gn":
            layers.append(nn.GroupNorm(a[0], c))
        elif kind == "act":
            layers.append(ACTS[a[0]](c) if a[0].startswith(("prelu", "leaky")) else ACTS[a[0]]())
        elif kind == "pool":
            layers.append(POOLS[a[0]]())
        elif kind == "res":
            layers.append(Residual(c, *a))
        elif kind == "cat":
            layers.append(Branches(c, *a))
            c = sum(a[0])
        elif kind == "se":
            layers.append(SE(c, a[0]))
        elif kind in ("split", "slice"):
            layers.append(SplitCat(c, *a, slices=kind == "slice"))
        elif kind == "stats":
            layers.append(ChannelStats())
        elif kind == "shuffle":
            layers.append(Shuffle(a[0]))
        elif kind == "unknown":
            layers.append(Unknown())
    if head == "conv":
        layers.append(nn.Conv2d(c, 4, 1))
    elif head == "features":  # the pooled features leave the graph beside the logits (narrowed to the student's)
        layers.append(FeaturesAndLogits(c))
    elif head == "mean":
        layers += [Mean(), nn.Linear(c, 5)]
    else:  # adaptive pool to s x s, flatten C*s*s into a Linear
        s = int(head[-1])
        layers += [nn.AdaptiveAvgPool2d(s), nn.Flatten(), nn.Linear(c * s * s, 5)]
    return nn.Sequential(*layers)


# -- the generator -----------------------------------------------------------------------------------
def _common_divisors(a: int, b: int) -> list[int]:
    return [d for d in range(1, math.gcd(a, b) + 1) if a % d == 0 and b % d == 0]


KINDS = ["conv", "bn", "gn", "act", "pool", "res", "cat", "se", "split", "slice", "shuffle", "stats", "unknown"]


def _cut(pieces: list[int], k: int) -> list[int] | None:
    """The pieces after channel ``k`` if cutting there leaves no piece under 2 channels, else None."""
    start = 0
    for i, p in enumerate(pieces):
        if start == k:
            return pieces[i:]
        if start < k < start + p:
            return [start + p - k, *pieces[i + 1 :]] if min(k - start, start + p - k) >= 2 else None
        start += p
    return None


@st.composite
def nets(draw):
    """A block list, a head and an input shape; only combinations that the design widens by exactly ``ratio``.

    ``struct`` follows the current channel space: None (one plain space), "cat" (``pieces``, after cat or split)
    or "prod" (groups x channels, after a grouped op or a shuffle). Grouping a structured space, or splitting
    a product inside a factor, cannot keep whole groups as copies: those are frozen by design, so the generator
    does not make them. A known bug (xfail in test_rules) is avoided too: no 1-channel cat pieces.
    """
    width = st.integers(2, 12)
    hw = draw(st.sampled_from([6, 8]))
    shape = (draw(st.integers(1, 2)), 3, hw, hw)
    c = draw(width)
    blocks: list[tuple] = [("conv", c, draw(st.sampled_from([1, 3])), 1)]  # a dense first conv always widens
    struct, pieces = None, [c]
    for kind in draw(st.lists(st.sampled_from(KINDS), max_size=6)):
        if kind == "conv":
            out, k = draw(width), draw(st.sampled_from([1, 3]))
            groups = draw(st.sampled_from(_common_divisors(c, out))) if struct is None else 1
            blocks.append(("conv", out, k, groups))
            c, pieces, struct = out, [out], ("prod" if 1 < groups < out else None)
        elif kind in ("bn", "act"):
            blocks.append(("bn",) if kind == "bn" else ("act", draw(st.sampled_from(list(ACTS)))))
        elif kind == "pool":
            arg = draw(st.sampled_from(list(POOLS) if hw >= 2 else ["max3s1", "avg3s1"]))
            hw = hw // 2 if arg.endswith("2") else hw
            blocks.append(("pool", arg))
        elif kind == "gn" and struct is None and (gs := [d for d in range(2, c + 1) if c % d == 0 and c * hw**2 > d]):
            g = draw(st.sampled_from(gs))  # GroupNorm needs 2 values per group
            blocks.append(("gn", g))
            struct = "prod" if g < c else None
        elif kind == "res":
            hidden, k = draw(width), draw(st.sampled_from([1, 3]))
            groups = draw(st.sampled_from(_common_divisors(c, hidden))) if struct is None else 1
            blocks.append(("res", hidden, k, groups))
            struct = "prod" if 1 < groups < c else struct
        elif kind == "cat":
            n = draw(st.integers(2, 3))
            widths = draw(st.lists(st.integers(2, 6), min_size=n, max_size=n))
            blocks.append(("cat", widths, draw(st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n))))
            c, pieces, struct = sum(widths), widths, "cat"
        elif kind == "se":
            blocks.append(("se", draw(width)))
        elif kind == "stats":
            blocks.append(("stats",))
        elif kind in ("split", "slice") and struct != "prod":
            cuts = [k for k in range(2, c - 1) if _cut(pieces, k) is not None]
            if cuts:
                k, swap = draw(st.sampled_from(cuts)), draw(st.booleans())
                blocks.append((kind, k, swap))
                rest = _cut(pieces, k)
                pieces, struct = (rest + [k] if swap else [k] + rest), "cat"
        elif kind == "unknown":  # its output is a new space: whatever structure came before, it is gone
            blocks.append(("unknown",))
            struct, pieces = None, [c]
        elif kind == "shuffle" and struct is None and any(c % g == 0 for g in range(2, c)):
            blocks.append(("shuffle", draw(st.sampled_from([g for g in range(2, c) if c % g == 0]))))
            struct = "prod"
    head = draw(st.sampled_from(["conv", "mean", "pool1", "pool2", "features"]))
    return blocks, head, shape


# -- the property ------------------------------------------------------------------------------------
@settings(max_examples=int(os.environ.get("GPD_PROPERTY_EXAMPLES", 40)), deadline=None)
@given(net=nets(), ratio=st.sampled_from([2, 3, 1.5]), seed=st.integers(0, 2**16), equal=st.booleans())
def test_teacher_is_exact_and_collapses_back(net, ratio, seed, equal):
    blocks, head, shape = net
    model = random_init(build(blocks, head), seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    equal = equal and ratio == 2  # equal shares are exact in float32 only for power-of-two copy counts
    res = expand(model, shape, ratio=ratio, seed=seed, equal_shares=equal)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ys, yt = copy.deepcopy(model).double()(x), res.teacher().double().eval()(x)
    for s_, t_ in zip(ys if isinstance(ys, tuple) else (ys,), yt if isinstance(yt, tuple) else (yt,)):
        assert t_.shape == s_.shape
        assert ((t_ - s_).abs().max() / s_.abs().max()).item() <= 1e-10

    back = collapse(res.plan, res.tensors)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert (back[k].double() - v.double()).abs().max().item() <= 1e-6, k

    s = res.summary()
    unknown = any(b[0] == "unknown" for b in blocks)
    assert s["unsupported_ops"] == (["test_property.unknown_mix (run at the student's width)"] if unknown else [])
    assert s["spaces_frozen"] == 0, s["frozen"]
    assert s["teacher_params"] > s["student_params"]
    if head == "features":  # the features widen inside, though they leave the graph at the student's width
        assert res.tensors[f"{len(model) - 1}.fc.weight"].shape[1] > model[-1].fc.in_features
    first = res.tensors["0.weight"].shape
    c = blocks[0][1]  # the first conv widens its outputs, never the graph input (at 1.5, piece by piece)
    assert first[1] == 3 and (first[0] == c * ratio if ratio == int(ratio) else first[0] > c)
