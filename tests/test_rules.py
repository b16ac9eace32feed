"""One small hand-made student per rule: the teacher is exact, collapse gives the student back, and it widened."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpd_surgery import collapse, expand
from gpd_surgery.verification import verify

from conftest import random_init

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Replaces conftest's per-test gc.collect (~0.2 s a test, most of this file's time): these students are
    tiny, so garbage is collected once, at the end of the module."""
    yield


class Fn(nn.Module):
    """A traced-through wrapper around a function, so that fx records call_function / call_method nodes."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check(model: nn.Module, shape: tuple[int, ...], ratio: float = 2, seed: int = 0, *, wider: bool = True,
          unsupported: bool = False, frozen_ok: bool = False, equal_shares: bool = False):
    """Expand ``model`` and check exactness (float64), collapse round trip and that it actually widened."""
    model = random_init(model, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = expand(model, shape, ratio=ratio, seed=seed, equal_shares=equal_shares)
    teacher = res.teacher().double().eval()
    student = copy.deepcopy(model).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            ys, yt = student(x), teacher(x)
            assert yt.shape == ys.shape  # the graph output keeps its size
            assert _rel(yt, ys) <= 1e-10
    back = collapse(res.plan, res.tensors)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert (back[k].double() - v.double()).abs().max().item() <= 1e-6, k
        assert torch.equal(model.state_dict()[k], v), f"expand modified the student's {k}"
    s = res.summary()
    assert bool(s["unsupported_ops"]) == unsupported, s["unsupported_ops"]
    if not (unsupported or frozen_ok):
        assert s["spaces_frozen"] == 0, s["frozen"]
    if wider:
        assert s["teacher_params"] > s["student_params"] and s["spaces_expanded"] >= 1
    return res


def tshape(res, key: str) -> tuple[int, ...]:
    return tuple(res.tensors[key].shape)


def w(c: int, r: float) -> int:
    return max(c, int(math.floor(r * c + 0.5)))


# -- convolutions and linear layers ----------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 3, 1.5])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_dense_conv(nd, ratio):
    Conv = CONV[nd]
    m = nn.Sequential(Conv(8, 16, 3, padding=1), Conv(16, 12, 3, padding=1, bias=False), nn.ReLU(), Conv(12, 4, 1))
    res = check(m, (2, 8) + (5,) * nd, ratio)
    k = (3,) * nd
    assert tshape(res, "0.weight") == (w(16, ratio), 8, *k)  # graph input keeps its 8 channels
    assert tshape(res, "0.bias") == (w(16, ratio),)
    assert tshape(res, "1.weight") == (w(12, ratio), w(16, ratio), *k)
    assert tshape(res, "3.weight") == (4, w(12, ratio), *(1,) * nd)  # graph output keeps its 4 channels
    assert tshape(res, "3.bias") == (4,)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_grouped_conv(nd, ratio):
    Conv = CONV[nd]
    m = nn.Sequential(Conv(3, 8, 3, padding=1), Conv(8, 12, 3, padding=1, groups=4), nn.ReLU(), Conv(12, 5, 1))
    res = check(m, (1, 3) + (5,) * nd, ratio)
    assert tshape(res, "1.weight") == (12 * ratio, 2, *(3,) * nd)
    assert res.teacher().get_submodule("1").groups == 4 * ratio
    assert tshape(res, "3.weight") == (5, 12 * ratio, *(1,) * nd)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv(mult, ratio):
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8),
                      nn.BatchNorm2d(8 * mult), nn.ReLU6(), nn.Conv2d(8 * mult, 5, 1))
    res = check(m, (2, 3, 6, 6), ratio)
    assert tshape(res, "2.weight") == (8 * mult * ratio, 1, 3, 3)
    assert res.teacher().get_submodule("2").groups == 8 * ratio
    assert tshape(res, "3.running_var") == (8 * mult * ratio,)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6)])
def test_linear(shape, ratio):
    m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7, bias=False), nn.Linear(7, 3))
    res = check(m, shape, ratio)
    assert tshape(res, "0.weight") == (10 * ratio, 6)
    assert tshape(res, "2.weight") == (7 * ratio, 10 * ratio)
    assert tshape(res, "3.weight") == (3, 7 * ratio)


# -- normalizations ------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_batch_norm(kind, ratio):
    if kind == "linear":
        m, shape = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Linear(10, 3)), (4, 6)
    elif kind == "conv1d":
        m, shape = nn.Sequential(nn.Conv1d(4, 10, 3), nn.BatchNorm1d(10), nn.Conv1d(10, 3, 1)), (2, 4, 7)
    else:
        m, shape = nn.Sequential(nn.Conv2d(4, 10, 3), nn.BatchNorm2d(10), nn.Conv2d(10, 3, 1)), (2, 4, 6, 6)
    res = check(m, shape, ratio)
    for key in ("weight", "bias", "running_mean", "running_var"):
        student = m.state_dict()[f"1.{key}"]
        assert torch.equal(res.tensors[f"1.{key}"], student.repeat(ratio)), key  # tiled copies
    assert torch.equal(res.tensors["student/1.running_mean"], m.state_dict()["1.running_mean"])


@pytest.mark.parametrize("ratio", [2, 3])
def test_group_norm(ratio):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    res = check(m, (2, 3, 5, 5), ratio)
    gn = res.teacher().get_submodule("1")
    assert (gn.num_groups, gn.num_channels) == (4 * ratio, 8 * ratio)
    assert tshape(res, "1.weight") == (8 * ratio,)


# -- elementwise ---------------------------------------------------------------------------------
ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"), "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "prelu_c": lambda: nn.PReLU(8), "prelu_1": lambda: nn.PReLU(1),
    "dropout": lambda: nn.Dropout(0.3), "dropout2d": lambda: nn.Dropout2d(0.3),
    "F.relu": lambda: Fn(F.relu), "F.gelu": lambda: Fn(F.gelu),
    "F.leaky_relu": lambda: Fn(lambda x: F.leaky_relu(x, 0.2)),
    "torch.sigmoid": lambda: Fn(torch.sigmoid), "x.relu()": lambda: Fn(lambda x: x.relu()),
    "F.dropout": lambda: Fn(lambda x: F.dropout(x, 0.5, training=False)),
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation(act):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ACTIVATIONS[act](), nn.Conv2d(8, 4, 1))
    res = check(m, (2, 3, 5, 5))
    assert tshape(res, "0.weight") == (16, 3, 3, 3)
    if act == "prelu_c":
        assert tshape(res, "1.weight") == (16,)
    if act == "prelu_1":
        assert tshape(res, "1.weight") == (1,)


POOLS = {
    "max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(3, stride=1, padding=1),
    "adaptive_avg": lambda: nn.AdaptiveAvgPool2d(2), "adaptive_max": lambda: nn.AdaptiveMaxPool2d((2, 3)),
    "F.max_pool2d": lambda: Fn(lambda x: F.max_pool2d(x, 3, 2, 1)),
    "F.adaptive_avg_pool2d": lambda: Fn(lambda x: F.adaptive_avg_pool2d(x, 1)),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_pool(pool):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), POOLS[pool](), nn.Conv2d(8, 4, 1))
    res = check(m, (2, 3, 6, 6))
    assert tshape(res, "2.weight") == (4, 16, 1, 1)


# -- reshapes --------------------------------------------------------------------------------------
FLATTENS = {
    "nn.Flatten": lambda s: nn.Flatten(), "torch.flatten": lambda s: Fn(lambda x: torch.flatten(x, 1)),
    "view(size(0), -1)": lambda s: Fn(lambda x: x.view(x.size(0), -1)),
    "reshape(constants)": lambda s: Fn(lambda x: x.reshape(2, 8 * s * s)),
}


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("flatten", list(FLATTENS))
@pytest.mark.parametrize("side", [1, 3])
def test_flatten_into_linear(side, flatten, ratio):
    """C*H*W after flatten is a product space: the Linear's input becomes (C*r)*H*W."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(side), FLATTENS[flatten](side),
                      nn.Linear(8 * side * side, 10), nn.ReLU(), nn.Linear(10, 5))
    res = check(m, (2, 3, 6, 6), ratio)
    assert tshape(res, "4.weight") == (10 * ratio, 8 * ratio * side * side)
    assert tshape(res, "6.weight") == (5, 10 * ratio)


MEANS = {
    "mean((2, 3))": lambda x: x.mean((2, 3)), "mean([-2, -1])": lambda x: x.mean(dim=[-2, -1]),
    "torch.mean": lambda x: torch.mean(x, dim=(2, 3)),
    "keepdim+flatten": lambda x: x.mean((2, 3), keepdim=True).flatten(1),
}


@pytest.mark.parametrize("mean", list(MEANS))
def test_mean_over_space(mean):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Fn(MEANS[mean]), nn.Linear(8, 5))
    res = check(m, (2, 3, 5, 5))
    assert tshape(res, "3.weight") == (5, 16)


class Permute(nn.Module):
    """Channels-last Linear between convs (the ConvNeXt pattern)."""

    def __init__(self, transpose: bool):
        super().__init__()
        self.transpose = transpose
        self.conv0, self.lin, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 12), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.conv0(x)
        if self.transpose:  # (B, C, H, W) -> (B, H*W, C) tokens and back
            b, c, h, ww = x.shape
            y = F.gelu(self.lin(x.flatten(2).transpose(1, 2)))
            return self.conv1(y.transpose(1, 2).reshape(b, 12, h, ww))
        return self.conv1(F.gelu(self.lin(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2))


@pytest.mark.parametrize("transpose", [False, True])
def test_permute(transpose):
    res = check(Permute(transpose), (2, 3, 4, 5))
    assert tshape(res, "lin.weight") == (24, 16)
    assert tshape(res, "conv1.weight") == (4, 24, 1, 1)


# -- graph structure: residuals, gates, cat, split, shuffle ----------------------------------------
class Residual(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, c, 3, padding=1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(x)


@pytest.mark.parametrize("ratio", [2, 3])
def test_residual_add(ratio):
    res = check(Residual(), (2, 3, 5, 5), ratio)
    assert tshape(res, "conv1.weight") == (6 * ratio, 8 * ratio, 3, 3)
    assert tshape(res, "conv2.weight") == (8 * ratio, 6 * ratio, 3, 3)


class SE(nn.Module):
    """x * sigmoid(fc(pool(x))), with 1x1 convs on the pooled map or with Linears and a view back."""

    def __init__(self, linear: bool):
        super().__init__()
        self.linear = linear
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = (nn.Linear(8, 4), nn.Linear(4, 8)) if linear else (nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.silu(self.stem(x))
        if self.linear:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(-1, 8, 1, 1)
        else:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("linear", [False, True])
def test_squeeze_excitation(linear, ratio):
    res = check(SE(linear), (2, 3, 5, 5), ratio)
    assert tshape(res, "fc1.weight")[:2] == (4 * ratio, 8 * ratio)
    assert tshape(res, "fc2.weight")[:2] == (8 * ratio, 4 * ratio)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn, self.head = nn.BatchNorm2d(10), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


@pytest.mark.parametrize("ratio", [2, 3])
def test_cat_channels(ratio):
    res = check(Concat(), (2, 3, 5, 5), ratio)
    assert tshape(res, "a.weight") == (4 * ratio, 3, 3, 3)
    assert tshape(res, "b.weight") == (6 * ratio, 3, 1, 1)
    assert tshape(res, "bn.running_mean") == (10 * ratio,)
    assert tshape(res, "head.weight") == (5, 10 * ratio, 1, 1)


SPLITS = {
    "x.chunk(2, 1)": lambda x: x.chunk(2, dim=1),
    "torch.chunk(3)": lambda x: torch.chunk(x, 3, 1),
    "x.split([4, 8])": lambda x: x.split([4, 8], dim=1),
    "torch.split(5)": lambda x: torch.split(x, 5, dim=1),  # pieces 5, 5, 2
}


class Split(nn.Module):
    """Split the channels, convolve the first piece, put the pieces back together."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        pieces = SPLITS[how](torch.zeros(1, 12, 1, 1))
        self.n, first = len(pieces), pieces[0].shape[1]
        self.stem, self.head = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 5, 1)
        self.conv = nn.Conv2d(first, first, 3, padding=1)

    def forward(self, x):
        pieces = SPLITS[self.how](F.relu(self.stem(x)))
        return self.head(torch.cat([self.conv(pieces[0])] + [pieces[i] for i in range(1, self.n)], dim=1))


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("how", list(SPLITS))
def test_split_channels(how, ratio):
    m = Split(how)
    res = check(m, (2, 3, 5, 5), ratio)
    first = m.conv.in_channels
    assert tshape(res, "stem.weight") == (12 * ratio, 3, 3, 3)
    assert tshape(res, "conv.weight") == (first * ratio, first * ratio, 3, 3)
    assert tshape(res, "head.weight") == (5, 12 * ratio, 1, 1)


def _shuffle(x, g: int, dynamic: bool):
    if dynamic:
        b, c, h, ww = x.size()
        return x.view(b, g, c // g, h, ww).transpose(1, 2).contiguous().view(b, c, h, ww)
    return x.view(2, g, 12 // g, 5, 5).transpose(1, 2).contiguous().view(2, 12, 5, 5)


class ShuffleV2(nn.Module):
    """ShuffleNetV2 unit: split, branch (1x1, depthwise, 1x1), cat, channel shuffle (view-transpose-view)."""

    def __init__(self, dynamic: bool):
        super().__init__()
        self.dynamic = dynamic
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.pw1, self.dw, self.pw2 = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        a, b = F.relu(self.stem(x)).chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.pw2(self.dw(F.relu(self.pw1(b)))))], dim=1)
        return self.head(_shuffle(x, 2, self.dynamic))


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("dynamic", [False, True])
def test_channel_shuffle(dynamic, ratio):
    res = check(ShuffleV2(dynamic), (2, 3, 5, 5), ratio)
    assert tshape(res, "stem.weight") == (12 * ratio, 3, 3, 3)
    assert tshape(res, "dw.weight") == (6 * ratio, 1, 3, 3)
    assert tshape(res, "head.weight") == (4, 12 * ratio, 1, 1)


class ShuffleV1(nn.Module):
    """ShuffleNetV1: a shuffle between two grouped convs."""

    def __init__(self, dynamic: bool):
        super().__init__()
        self.dynamic = dynamic
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.gconv1, self.gconv2 = nn.Conv2d(12, 12, 1, groups=3), nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.relu(self.gconv1(F.relu(self.stem(x))))
        return self.head(self.gconv2(_shuffle(x, 3, self.dynamic)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_channel_shuffle_between_grouped_convs_stays_exact(dynamic):
    # Groups cannot be copied through this shuffle (a teacher group would mix copies of different student groups):
    # the analysis must freeze those spaces, say so, and stay exact.
    res = check(ShuffleV1(dynamic), (2, 3, 5, 5), wider=False, frozen_ok=True)
    assert all("incompatible channel layouts" in f["reason"] for f in res.summary()["frozen"])
    assert res.teacher().get_submodule("gconv2").groups == 3


class ShuffleGate(nn.Module):
    """A channel shuffle whose output feeds a residual add or a squeeze-excitation gate."""

    def __init__(self, gate: str):
        super().__init__()
        self.gate = gate
        self.conv0, self.conv1, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.conv0(x).view(2, 2, 2, 5, 5).transpose(1, 2).reshape(2, 4, 5, 5)
        if self.gate == "residual":
            return self.head(x + self.conv1(x))
        return self.head(x * torch.sigmoid(self.conv1(x.mean((2, 3), keepdim=True))))


@pytest.mark.parametrize("gate", ["residual", "se"])
def test_shuffle_then_gate_widens_by_ratio(gate):
    # Prod(a, b) on one side, Prod(b, a) on the other: widening both factors would give ratio**2.
    res = check(ShuffleGate(gate), (2, 3, 5, 5))
    assert tshape(res, "conv0.weight") == (8, 3, 1, 1)
    assert tshape(res, "conv1.weight")[:2] == (8, 8)


class Slices(nn.Module):
    """Channel slices as timm writes them: rexnet's partial residual ``x[:, :c] + shortcut`` then ``x[:, c:]``,
    ghostnet's ``cat(...)[:, :out]`` over the whole cat, DPN's ``x[:, :k]`` / ``x[:, k:]``, and a slice with an
    ellipsis and negative bounds."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 10, 1), nn.Conv2d(6, 4, 1)
        self.head, self.head2 = nn.Conv2d(10, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = self.a(s)
        y = torch.cat([y[:, :6] + s, y[:, 6:]], dim=1)  # rexnet
        y = torch.cat([y[:, 0:3], y[:, 3:]], dim=1)[:, :10]  # DPN-style cut, then a slice of the whole
        z = torch.cat([self.b(s), y], dim=1)[..., -4:, :][:, :, :, 1:]  # spatial slices stay spatial
        return self.head(z[:, 4:]) + self.head2(z[:, -14:-10])


@pytest.mark.parametrize("ratio", [2, 3, 1.5])
def test_channel_slices_widen_with_their_pieces(ratio):
    res = check(Slices(), (2, 3, 5, 5), ratio)
    # a's 10 channels are cut as 3 + 3 + 4 (the pieces every slice names), the stem's 6 as 3 + 3
    assert tshape(res, "a.weight") == (2 * w(3, ratio) + w(4, ratio), 2 * w(3, ratio), 1, 1)
    assert tshape(res, "head.weight")[1] == tshape(res, "a.weight")[0]


class StridedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.head(self.a(x)[:, ::2])  # every other channel: not a piece of a concatenation


def test_strided_channel_slice_is_frozen():
    res = check(StridedSlice(), (2, 3, 5, 5), frozen_ok=True, wider=False)
    assert tshape(res, "a.weight") == (8, 3, 1, 1)
    assert res.summary()["spaces_frozen"] >= 1


class HeadsFromShape(nn.Module):
    """timm's attention: ``B, N, C = x.shape`` then ``reshape(B, N, 3, heads, C // heads)``; the head size is
    computed from the widened width, yet must stay as it is while the heads widen."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.inp, self.out = nn.Linear(4, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = torch.stack([-q[..., 1::2], q[..., ::2]], -1).reshape(q.shape)  # rotary embedding: a whole shape
        a = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(B, N, C)
        y = y.view(x.size(0), -1, x.size(-1))  # sizes read from another tensor
        return self.out(self.proj(y) + x)


@pytest.mark.parametrize("ratio", [2, 3])
def test_reshape_sizes_computed_from_shapes(ratio):
    res = check(HeadsFromShape(), (2, 5, 4), ratio)
    assert tshape(res, "qkv.weight") == (3 * 8 * ratio, 8 * ratio)
    teacher = res.teacher().eval()
    with torch.no_grad():  # the batch size stays a computed size: the teacher takes any batch
        assert teacher(torch.randn(7, 5, 4)).shape == (7, 5, 3)


class OptionalMask(nn.Module):
    """hiera's ``forward(x, mask=None)``: traced at the default, not as if a mask were given."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None, scale: float = 1.0):
        y = F.relu(self.a(x))
        if mask is not None:
            y = y * mask.view(1, -1, 1, 1)
        return self.b(y) * scale


def test_optional_forward_arguments_are_traced_at_their_defaults():
    res = check(OptionalMask(), (2, 3, 5, 5))
    assert tshape(res, "a.weight") == (16, 3, 1, 1)


class SplitOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(7, 7, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = F.relu(self.stem(x)).split([1, 7], dim=1)
        return self.head(torch.cat([a, self.conv(b)], dim=1))


@pytest.mark.xfail(strict=True, reason="bug: a 1-channel piece of a split/cat is a size-1 atom, which is never "
                   "expandable: that channel silently keeps 1 copy (stem widens to 15, not 16), unreported as frozen")
def test_split_into_one_channel_piece_widens():
    res = check(SplitOne(), (2, 3, 5, 5))
    assert tshape(res, "stem.weight") == (16, 3, 1, 1)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_equal_shares_power_of_two_copies_are_exact(ratio):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    res = check(m, (2, 3, 5, 5), ratio, equal_shares=True)
    assert tshape(res, "2.weight") == (4, 8 * ratio, 1, 1)


# -- what the rules do not know runs at the student's width, or is frozen: never guessed -------------
class Cumprod(nn.Module):
    def __init__(self, in_place: bool = False):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 1)
        self.in_place = in_place

    def forward(self, x):
        x = torch.tanh(self.conv0(x))
        if self.in_place:
            x = x.cumprod_(dim=1)  # writes into its input: a gathered copy would take the write
        else:
            x = torch.cumprod(x, dim=1)  # not in the registry, along channels
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("ratio", [2, 3])
def test_unsupported_op_runs_at_the_students_width_and_exact(ratio):
    res = check(Cumprod(), (2, 3, 5, 5), ratio, unsupported=True)
    s = res.summary()
    assert any("cumprod (run at the student's width)" in op for op in s["unsupported_ops"]), s["unsupported_ops"]
    assert s["frozen"] == []
    assert tshape(res, "conv0.weight") == (8 * ratio, 3, 3, 3)  # feeds cumprod: widened, its copies gathered
    assert tshape(res, "conv1.weight") == (16 * ratio, 8, 3, 3)  # cumprod's output is the student's width
    assert tshape(res, "conv2.weight") == (4, 16 * ratio, 1, 1)


@pytest.mark.parametrize("ratio", [2, 3])
def test_unsupported_op_writing_in_place_is_frozen_and_exact(ratio):
    res = check(Cumprod(in_place=True), (2, 3, 5, 5), ratio, unsupported=True)
    s = res.summary()
    assert any("cumprod_" in op for op in s["unsupported_ops"]), s["unsupported_ops"]
    assert s["spaces_frozen"] >= 1 and any("unsupported" in f["reason"] for f in s["frozen"])
    assert tshape(res, "conv0.weight") == (8, 3, 3, 3)  # feeds cumprod_: kept
    assert tshape(res, "conv1.weight") == (16 * ratio, 8, 3, 3)  # past it: still widened
    assert tshape(res, "conv2.weight") == (4, 16 * ratio, 1, 1)


# -- verify localizes a broken teacher --------------------------------------------------------------
@pytest.mark.parametrize("rows", ["canonical", "copy"])
def test_verify_localizes_perturbed_weight(rows):
    m = random_init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 4, 1)))
    shape = (2, 3, 5, 5)
    res = expand(m, shape, ratio=2)
    assert verify(m, res.plan, res.tensors, shape, device="cpu").passed
    tensors = dict(res.tensors)
    weight = tensors["3.weight"].clone()
    weight[1 if rows == "canonical" else 12 + 1] += 0.5  # row 13 is the second copy of student channel 1
    tensors["3.weight"] = weight
    report = verify(m, res.plan, tensors, shape, device="cpu")
    assert not report.passed
    assert report.divergence is not None and report.divergence["node"] == "_3"  # the perturbed conv's output
    # a non-canonical copy breaks the teacher but not the collapsed student
    back = collapse(res.plan, tensors)["3.weight"]
    assert torch.equal(back, m.state_dict()["3.weight"]) == (rows == "copy")


class FunctionalGroupNorm(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups, self.a, self.b = groups, nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        y = F.group_norm(self.a(x), self.groups, self.weight, self.bias, 1e-5)
        return self.b(y.pow(2) + torch.addcmul(y, y, y, value=0.5))


@pytest.mark.parametrize("ratio", [2, 3])
def test_functional_group_norm_widens_its_groups(ratio):
    res = check(FunctionalGroupNorm(4), (2, 3, 5, 5), ratio)
    assert tshape(res, "weight") == (8 * ratio,)
    assert tshape(res, "a.weight") == (8 * ratio, 3, 1, 1)


def test_functional_group_norm_with_one_group_widens_within_it():
    res = check(FunctionalGroupNorm(1), (2, 3, 5, 5))  # the copies of each channel stay in the one group
    assert tshape(res, "a.weight") == (16, 3, 1, 1)


class EcaGate(nn.Module):
    """timm's ECA: a 1-d conv across channels is not used here; the gate is expanded with expand_as."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        gate = torch.sigmoid(self.g(y.mean((2, 3), keepdim=True)))
        return self.b(y * gate.expand_as(y))


@pytest.mark.parametrize("ratio", [2, 3])
def test_expand_as_relates_the_channels(ratio):
    res = check(EcaGate(), (2, 3, 5, 5), ratio)
    assert tshape(res, "g.weight") == (8 * ratio, 8 * ratio, 1, 1)


class ChannelReductions(nn.Module):
    """convnextv2's GRN (a mean over channels, channels last), a channel sum and a channel max."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)
        g = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
        y = y * (g / (g.mean(dim=-1, keepdim=True) + 1e-6))
        y = y.permute(0, 3, 1, 2)
        s = y.sum(1, keepdim=True) + torch.amax(y, dim=1, keepdim=True) + y.mean((1, 2, 3), keepdim=True)
        return self.b(y * torch.sigmoid(s))


@pytest.mark.parametrize("ratio", [2, 3, 1.5, 2.5])
def test_reductions_over_channels_weigh_the_copies(ratio):
    res = check(ChannelReductions(), (2, 3, 5, 5), ratio)
    assert tshape(res, "a.weight") == (w(8, ratio), 3, 3, 3)


class BiasTable(nn.Module):
    """levit's attention bias: a (heads, positions) table looked up with bias[:, index] per head."""

    def __init__(self, heads=2, n=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(8, 24), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(heads, 7))
        self.register_buffer("index", torch.randint(0, 7, (n, n)), persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, 4).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) + self.bias[:, self.index]).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, 8))


@pytest.mark.parametrize("ratio", [2, 3])
def test_bias_table_lookup_keeps_its_heads_widening(ratio):
    res = check(BiasTable(), (2, 4, 8), ratio)
    assert tshape(res, "bias") == (2 * ratio, 7)


class RepeatPerWindow(nn.Module):
    """gcvit: a per-image tensor repeated along the batch for each window, then used channel-wise."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        windows = torch.cat([x, x.flip(-1)], dim=0)
        g = self.g(x).repeat_interleave(windows.shape[0] // x.shape[0], dim=0)
        return self.b(self.a(windows) * g)


def test_repeat_interleave_along_the_batch_keeps_channels_widening():
    res = check(RepeatPerWindow(), (2, 3, 5, 5))
    assert tshape(res, "g.weight") == (16, 3, 1, 1)


class BlurPool(nn.Module):
    """tresnet's anti-aliasing: a fixed depthwise filter buffer applied with F.conv2d(groups=x.shape[1])."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.register_buffer("filt", torch.rand(8, 1, 3, 3))
        self.dense = nn.Parameter(torch.randn(8, 8, 1, 1) / 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, padding=0, groups=y.shape[1])
        return self.b(F.conv2d(y, self.dense))


@pytest.mark.parametrize("ratio", [2, 3])
def test_convolution_functions_with_attribute_weights(ratio):
    res = check(BlurPool(), (2, 3, 6, 6), ratio)
    assert tshape(res, "filt") == (8 * ratio, 1, 3, 3)
    assert tshape(res, "dense") == (8 * ratio, 8 * ratio, 1, 1)


class Unflattens(nn.Module):
    """Heads split by ``unflatten`` with a computed head size, and by an ``nn.Unflatten`` module."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads, self.inp, self.qkv, self.out = heads, nn.Linear(4, 8), nn.Linear(8, 24), nn.Linear(8, 3)
        self.split = nn.Unflatten(-1, (heads, 4))

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (a @ v).transpose(1, 2).flatten(2) + x
        return self.out(torch.relu(self.split(y)).flatten(2))


@pytest.mark.parametrize("ratio", [2, 3])
def test_unflatten_sizes_follow_the_teacher(ratio):
    res = check(Unflattens(), (2, 5, 4), ratio)
    assert tshape(res, "qkv.weight") == (24 * ratio, 8 * ratio)


class RepeatChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.a(x)
        z = y.repeat(1, 2, 1, 1) + torch.ones_like(y).repeat(1, 2, 1, 1) + torch.zeros_like(y.repeat(1, 2, 1, 1))
        return self.b(z) + torch.full_like(self.b(z), 0.5)


@pytest.mark.parametrize("ratio", [2, 3])
def test_repeated_channels_are_blocks_of_copies(ratio):
    res = check(RepeatChannels(), (2, 3, 5, 5), ratio)
    assert tshape(res, "a.weight") == (4 * ratio, 3, 1, 1)
    assert tshape(res, "b.weight") == (5, 8 * ratio, 1, 1)
