"""Rules that widen what the student-width fallback would keep at the student's size: GroupNorm's channels
within a group, weight-standardised convolutions, grouped convolutions whose groups cannot widen (resnest's
radix softmax) and ECA's convolution across channels. Each student is checked by ``verify`` (float32 and
float64 outputs, the activation invariant at every node, the extracted student against the student view),
at ratios 2, 3 and 1.5, with and without branches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_init
from gpd_surgery import collapse, expand
from gpd_surgery.teacher_ops import FoldedStdConv
from gpd_surgery.verification import verify

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Replaces conftest's per-test gc.collect (over a second a test here): these students are tiny, and
    ``one_thread`` collects once at the end of the module."""
    yield

RATIOS = [2, 3, 1.5]
BRANCHES = [(), "default"]


def check(model: nn.Module, shape: tuple[int, ...], ratio: float, branches: str | tuple = (), seed: int = 0,
          capture: str = "auto"):
    """Expand a randomly initialised ``model`` and verify it; the collapse gives the student back. Returns the
    expansion and the float64 relative error of the outputs."""
    model = random_init(model, seed)
    res = expand(model, shape, ratio, seed=seed, branches=branches, capture=capture)
    report = verify(model, res.plan, res.tensors, shape, device="cpu", n_inputs=1)
    assert report.passed and not report.constant_output, report.to_dict()
    f64 = next(c.max_rel for c in report.checks if c.dtype == "float64")
    assert f64 <= 1e-12
    back = collapse(res.plan, res.tensors)
    for k, v in model.state_dict().items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k
    assert not res.summary()["frozen"], res.summary()["frozen"]
    return res, f64


def width(c: int, r: float) -> int:
    return max(c, int(r * c + 0.5))


# -- GroupNorm: the groups widen, or else the channels within a group --------------------------------------
class GroupNorms(nn.Module):
    """A residual stream through GroupNorm(1) (poolformer's), F.group_norm with 2 groups and GroupNorm(4)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.n1, self.f1 = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(1, c), nn.Conv2d(c, c, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.n4, self.f2, self.head = nn.GroupNorm(4, c), nn.Conv2d(c, c, 1), nn.Conv2d(c, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.f1(self.n1(y))
        y = y + self.f2(F.gelu(F.group_norm(y, 2, self.w, self.b, 1e-5)))
        return self.head(self.n4(y))


class GroupNormOneOnly(nn.Module):
    """GroupNorm(1) on a stream: its single group cannot widen, so the channels within it must."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem, self.norm, self.mix = nn.Conv2d(3, c, 1), nn.GroupNorm(1, c), nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.mix(self.norm(y))
        return self.head(y)


@pytest.mark.parametrize("branches", BRANCHES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_group_norms_widen_their_stream(ratio, branches):
    res, _ = check(GroupNorms(), (2, 3, 5, 5), ratio, branches)
    assert tuple(res.tensors["f1.weight"].shape[:2]) == (width(8, ratio),) * 2
    assert tuple(res.tensors["w"].shape) == (width(8, ratio),)


@pytest.mark.parametrize("ratio", RATIOS)
def test_one_group_widens_within_weighted_at_fractional_ratios(ratio):
    res, _ = check(GroupNormOneOnly(), (2, 3, 4, 4), ratio)
    norm = res.teacher().get_submodule("norm")
    assert (norm.num_groups, norm.num_channels) == (1, width(6, ratio))
    assert (type(norm).__name__ == "WeightedGroupNorm") == (ratio == 1.5)  # uneven copies: weighted statistics


def test_groups_widen_before_the_channels_within():
    res, _ = check(nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1)), (1, 3, 4, 4), 1.5)
    norm = res.teacher().get_submodule("1")
    assert (norm.num_groups, norm.num_channels) == (6, 12) and type(norm) is nn.GroupNorm


# -- weight-standardised convolutions: statistics of the folded row ---------------------------------------
class StdConvs(nn.Module):
    """timm's four weight-standardised convs, dense and grouped, with a residual and strides."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

        self.a, self.b = ScaledStdConv2d(3, 8, 3, gamma=1.7), ScaledStdConv2d(8, 12, 3, stride=2)
        self.c, self.d = StdConv2d(12, 12, 1, bias=True), StdConv2dSame(12, 12, 3, stride=2)
        self.e, self.head = ScaledStdConv2dSame(12, 12, 3, groups=3), nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b(F.relu(self.a(x))))
        y = self.d(y + self.c(y))
        return self.head(y + self.e(y))


@pytest.mark.parametrize("branches", BRANCHES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_weight_standardised_convs_widen_exactly(ratio, branches):
    pytest.importorskip("timm")
    res, _ = check(StdConvs(), (2, 3, 11, 11), ratio, branches)
    teacher = res.teacher()
    assert all(isinstance(teacher.get_submodule(k), FoldedStdConv) for k in "abcde")  # rows standardised as folded
    assert teacher.get_submodule("e").groups == width(3, ratio)  # grouped: its groups widen, rows copied
    assert tuple(res.tensors["b.gain"].shape) == (width(12, ratio), 1, 1, 1)
    assert tuple(res.tensors["c.weight"].shape[:2]) == (width(12, ratio),) * 2
    # With branches the merged kernel is standardised (checked by verify above), and collapse merges then folds.
    assert ("b.branch_kxk_scale" in res.tensors) == bool(branches)



def test_branches_of_a_weight_standardised_conv_merge_before_standardising():
    """At ratio 1 a teacher with branches is its student's architecture over merged kernels: with the branches'
    scales nonzero, the teacher must equal the extracted student (merged, then standardised by its own class)."""
    pytest.importorskip("timm")
    import copy

    model = random_init(StdConvs()).double()
    res = expand(model, (2, 3, 11, 11), 1, branches="default")
    g = torch.Generator().manual_seed(5)
    for k in [k for k in res.tensors if k.endswith("_scale")]:
        res.tensors[k] = torch.randn(res.tensors[k].shape, generator=g, dtype=torch.float64)
    teacher = res.teacher().double()
    extracted = copy.deepcopy(model)
    extracted.load_state_dict(collapse(res.plan, res.tensors), strict=True)
    x = torch.randn(2, 3, 11, 11, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y, ref, before = teacher(x), extracted(x), model(x)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-12
    assert ((ref - before).abs().max() / before.abs().max()).item() > 1e-3  # the branches did change the function

# -- grouped convs whose groups cannot widen: resnest's radix softmax --------------------------------------
class Splat(nn.Module):
    """timm's split attention (radix 2): a grouped conv whose groups are the radix, a softmax across them."""

    def __init__(self, cardinality: int) -> None:
        super().__init__()
        from timm.layers.split_attn import SplitAttn

        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)
        self.attn = SplitAttn(8, 8, groups=cardinality, radix=2, norm_layer=nn.BatchNorm2d, rd_channels=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y + self.attn(y))


@pytest.mark.parametrize("branches", BRANCHES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_radix_softmax_widens_the_channels_within_its_groups(ratio, branches):
    pytest.importorskip("timm")
    res, _ = check(Splat(2), (2, 3, 5, 5), ratio, branches)
    conv = res.teacher().get_submodule("attn.conv")
    assert conv.groups == 4  # cardinality x radix: the softmax runs across the radix, which keeps its size
    assert tuple(res.tensors["attn.conv.weight"].shape[:2]) == (4 * width(4, ratio), width(2, ratio))
    assert tuple(res.tensors["attn.fc2.weight"].shape[0:1]) == (4 * width(4, ratio),)


# -- ECA: a Conv1d across the channels of a pooled vector runs at the student's width ---------------------
class Eca(nn.Module):
    """A residual stream gated by timm's ECA (or CecaModule, which pads the channel vector circularly first),
    then again before the head."""

    def __init__(self, circular: bool = False) -> None:
        super().__init__()
        from timm.layers import CecaModule, EcaModule

        gate = CecaModule if circular else EcaModule
        self.stem, self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 5, 1)
        self.eca, self.eca2 = gate(kernel_size=3), gate(kernel_size=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.eca(self.conv(y))
        return self.head(self.eca2(y))


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("ratio", RATIOS)
def test_eca_gate_runs_at_the_students_width_and_the_stream_widens(ratio, circular):
    pytest.importorskip("timm")
    res, _ = check(Eca(circular), (2, 3, 5, 5), ratio)
    assert tuple(res.tensors["conv.weight"].shape[:2]) == (width(8, ratio),) * 2
    assert tuple(res.tensors["eca.conv.weight"].shape) == (1, 1, 3)  # the gate's own conv keeps its size
    assert any("along a channel dimension" in u for u in res.summary()["unsupported_ops"])


# -- timm's own blocks: the factor at ratio 2 ---------------------------------------------------------------
def _poolformer() -> nn.Module:
    from timm.models.metaformer import MetaFormer
    from timm.layers import GroupNorm1

    return MetaFormer(depths=(1, 1), dims=(8, 16), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                      norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False, num_classes=5)


def _block(name: str) -> nn.Module:
    """One of timm's bottlenecks between a stem and a head, 16 channels."""
    import functools

    from timm.layers import EcaModule, ScaledStdConv2d
    from timm.models.nfnet import NormFreeBlock
    from timm.models.resnest import ResNestBottleneck
    from timm.models.resnet import Bottleneck

    block = {
        "resnest": lambda: ResNestBottleneck(16, 4, radix=2, avd=True),
        "eca": lambda: Bottleneck(16, 4, attn_layer=EcaModule),
        "nf": lambda: NormFreeBlock(16, 16, bottle_ratio=0.25, conv_layer=functools.partial(ScaledStdConv2d, eps=1e-8),
                                    act_layer=nn.ReLU, alpha=0.2, beta=0.7),
    }[name]()
    return nn.Sequential(nn.Conv2d(3, 16, 1), block, nn.Conv2d(16, 5, 1))


# Measured before these rules (timm families at ratio 2): poolformer_s12 1.79x, resnest14d 2.23x, ecaresnet26t
# 2.49x, nf_resnet26 1.00x. NormFreeBlock is a leaf timm declares for fx (run at the student's width there):
# captured by torch.export, its convs widen.
@pytest.mark.parametrize("name, shape, capture, least", [
    ("poolformer", (1, 3, 16, 16), "auto", 3.3), ("resnest", (1, 3, 8, 8), "auto", 3.3),
    ("eca", (1, 3, 8, 8), "auto", 3.1), ("nf", (1, 3, 8, 8), "export", 3.1)])
def test_timm_blocks_widen(name, shape, capture, least):
    pytest.importorskip("timm")
    res, _ = check(_poolformer() if name == "poolformer" else _block(name), shape, 2, capture=capture)
    assert res.summary()["param_ratio"] >= least


# -- products of two activations over a widened dim: one operand weighed by 1 / copies -----------------------
class OneHead(nn.Module):
    """A single attention head (fused sdpa or q @ k^T written out) and a bilinear form over channels (einsum):
    no heads to widen, so the contracted dim itself widens."""

    def __init__(self, fused: bool, c: int = 6) -> None:
        super().__init__()
        self.fused, self.embed, self.qkv, self.proj = fused, nn.Linear(4, c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.a, self.b, self.head = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        q, k, v = self.qkv(y).chunk(3, -1)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        y = y + self.proj(o)
        gram = torch.einsum("bnc,bmc->bnm", self.a(y), self.b(y)).softmax(-1)  # x . y over channels
        return self.head((gram @ y).mean(1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("ratio", RATIOS)
def test_a_single_head_and_a_bilinear_form_widen_their_contracted_dim(ratio, fused):
    res, _ = check(OneHead(fused), (2, 5, 4), ratio)
    c = width(6, ratio)
    assert tuple(res.tensors["qkv.weight"].shape) == (3 * c, c) and tuple(res.tensors["proj.weight"].shape) == (c, c)
    assert tuple(res.tensors["a.weight"].shape) == (c, c) and tuple(res.tensors["b.weight"].shape) == (c, c)
