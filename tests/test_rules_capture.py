"""The rules of issue 15 part 4: transposed convolutions, embeddings, the padding modules, torchvision's MViT
helpers and FrozenBatchNorm2d; frozen counts that show every space an unsupported op kept; and the
torchvision models beyond classification (video, segmentation, a detection backbone) exact in float64."""
from __future__ import annotations

import copy
import gc
import math
import os
import subprocess
import sys
from typing import Any
from unittest import mock

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from conftest import random_init, randomize
from gpd_surgery import collapse, expand, plan_expansion
from gpd_surgery.report import plan_report
from gpd_surgery.verification import compare, verify

torchvision = pytest.importorskip("torchvision")
from torchvision.models.video import mvit as tv_mvit  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

RATIOS = [2, 3, 1.5]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@pytest.fixture(autouse=True)
def _collect_garbage(request):
    """Replaces conftest's: one thread (on a shared 2-core runner, two threads that wait for each other cost
    more than they save: the whole models take 25 s on one, up to 3 minutes on two), and garbage collected
    after the whole models only (the small students leave little)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if request.node.get_closest_marker("slow"):
        gc.collect()


def w(c: int, r: float) -> int:
    return max(c, int(math.floor(r * c + 0.5)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(specs: Any, g: torch.Generator) -> list[torch.Tensor]:
    """Float64 inputs for a shape, or for input specs (integer ones drawn in [0, high))."""
    if isinstance(specs, tuple) and all(isinstance(s, int) for s in specs):
        return [torch.randn(specs, generator=g, dtype=torch.float64)]
    return [torch.randn(s.shape, generator=g, dtype=torch.float64) if s.dtype is None
            else torch.randint(0, s.high or 2, s.shape, generator=g) for s in specs]


def check(model: nn.Module, shape: Any, ratio: float = 2, seed: int = 0, *, frozen_ok: bool = False,
          unchanged: bool = True, wider: bool = True):
    """Expand a randomized ``model``: exact in float64, collapse gives the student back, nothing unsupported,
    nothing frozen (unless ``frozen_ok``), and ``wider``. ``unchanged``: the student's tensors are as they were
    (an embedding with max_norm renormalizes its rows in place when it runs)."""
    model = random_init(model, seed)
    res = expand(model, shape, ratio=ratio, seed=seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = res.teacher().double().eval()
    student = copy.deepcopy(model).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            xs = _inputs(shape, g)
            ys, yt = student(*xs), teacher(*xs)
            assert yt.shape == ys.shape
            assert _rel(yt, ys) <= 1e-10
    back = collapse(res.plan, res.tensors)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert (back[k].double() - v.double()).abs().max().item() <= 1e-6, k
        if unchanged:
            assert torch.equal(model.state_dict()[k], v), f"expand modified the student's {k}"
    s = res.summary()
    assert s["unsupported_ops"] == [], s["unsupported_ops"]
    if not frozen_ok:
        assert s["spaces_frozen"] == 0, s["frozen"]
    if wider:
        assert s["teacher_params"] > s["student_params"] and s["spaces_expanded"] >= 1
    return res


def tshape(res, key: str) -> tuple[int, ...]:
    return tuple(res.tensors[key].shape)


# -- transposed convolutions ------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose(nd, ratio):
    T = CONV_T[nd]
    m = nn.Sequential(T(3, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                      T(8, 6, 3, dilation=2, bias=False), CONV[nd](6, 5, 1), T(5, 4, 2, stride=2))
    res = check(m, (2, 3) + (3,) * nd, ratio)
    k = (3,) * nd
    assert tshape(res, "0.weight") == (3, w(8, ratio), *k)  # graph input: its 3 channels kept
    assert tshape(res, "0.bias") == (w(8, ratio),)
    assert tshape(res, "2.weight") == (w(8, ratio), w(6, ratio), *k)  # [in, out, *k]: in shared, out copied
    assert tshape(res, "4.weight") == (w(5, ratio), 4, *(2,) * nd)  # graph output: its 4 channels kept
    t = res.teacher().get_submodule("2")
    assert (t.in_channels, t.out_channels) == (w(8, ratio), w(6, ratio))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_conv_transpose(groups, ratio):
    """The number of groups widens; weights are copied group by group (no share)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 8, 3, stride=2, groups=groups), nn.BatchNorm2d(8),
                      nn.ConvTranspose2d(8, 16, 3, padding=1, groups=groups, bias=False), nn.Conv2d(16, 4, 1))
    res = check(m, (2, 3, 4, 4), ratio)
    g = w(groups, ratio)
    assert tshape(res, "1.weight") == (8 // groups * g, 8 // groups, 3, 3)
    assert tshape(res, "3.weight") == (8 // groups * g, 16 // groups, 3, 3)
    assert res.teacher().get_submodule("3").groups == g
    assert tshape(res, "4.weight") == (4, 16 // groups * g, 1, 1)


class FunctionalConvTranspose(nn.Module):
    def __init__(self, groups: int, keywords: bool):
        super().__init__()
        self.groups, self.keywords = groups, keywords
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(6, 4, 1)
        self.weight = nn.Parameter(torch.randn(8, 6 // groups, 3, 3))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        x = self.a(x)
        if self.keywords:
            y = F.conv_transpose2d(x, self.weight, bias=self.bias, stride=2, padding=1, output_padding=1,
                                   groups=self.groups)
        else:
            y = torch.conv_transpose2d(x, self.weight, self.bias, 2, 1, 1, self.groups, 1)
        return self.b(y)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("groups, keywords", [(1, False), (2, False), (2, True)])
def test_functional_conv_transpose(groups, keywords, ratio):
    res = check(FunctionalConvTranspose(groups, keywords), (2, 3, 4, 4), ratio)
    g = w(groups, ratio) if groups > 1 else 1
    out = w(6, ratio) if groups == 1 else 6 // groups * g
    assert tshape(res, "weight") == (w(8, ratio) if groups == 1 else 8 // groups * g, out // g, 3, 3)
    assert tshape(res, "bias") == (out,)


# -- embeddings -------------------------------------------------------------------------------------
class Embed(nn.Module):
    """Token ids (a buffer: the input is an image) looked up in a table whose dim meets the image's channels."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("ids", torch.tensor([[1, 4, 2], [7, 0, 4]]))
        self.register_buffer("flat", torch.tensor([1, 4, 2, 7, 0, 4, 9]))
        self.register_buffer("offsets", torch.tensor([0, 3]))
        self.conv, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        if how in ("module", "max_norm"):
            self.table = nn.Embedding(10, 6, padding_idx=0, max_norm=1.0 if how == "max_norm" else None)
        elif how == "function":
            self.weight = nn.Parameter(torch.randn(10, 6))
        else:
            mode = how.split("_")[1]
            self.table = nn.EmbeddingBag(10, 6, mode=mode)

    def forward(self, x):
        if self.how in ("module", "max_norm"):
            e = self.table(self.ids).mean(1)  # (2, 3, 6) -> (2, 6)
        elif self.how == "function":
            e = F.embedding(self.ids, self.weight).sum(1)
        elif self.how.endswith("offsets"):
            e = self.table(self.flat, self.offsets)
        else:
            e = self.table(self.ids)
        return self.head(self.conv(x) * e[:, :, None, None])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("how", ["module", "function", "bag_sum", "bag_mean", "bag_max", "bag_sum_offsets"])
def test_embedding(how, ratio):
    res = check(Embed(how), (2, 3, 4, 4), ratio)
    key = "weight" if how == "function" else "table.weight"
    assert tshape(res, key) == (10, w(6, ratio))  # the rows are not a channel space: the embedding dim widens
    if how != "function":
        assert res.teacher().get_submodule("table").embedding_dim == w(6, ratio)


def test_embedding_max_norm_keeps_its_dim():
    """Rows renormalized by their norm over the embedding dim: copies would change the norm, so that dim stays,
    reported with its reason; the teacher is exact (the table renormalizes itself in place as it runs)."""
    res = check(Embed("max_norm"), (2, 3, 4, 4), frozen_ok=True, unchanged=False, wider=False)
    assert tshape(res, "table.weight") == (10, 6)
    frozen = res.summary()["frozen"]
    assert len(frozen) == 1 and "max_norm" in frozen[0]["reason"], frozen


# -- padding modules --------------------------------------------------------------------------------
PADS = {
    "ZeroPad": lambda nd: getattr(nn, f"ZeroPad{nd}d")((1, 2) * nd),
    "ConstantPad": lambda nd: getattr(nn, f"ConstantPad{nd}d")((2, 1) * nd, 0.5),
    "ReflectionPad": lambda nd: getattr(nn, f"ReflectionPad{nd}d")(1),
    "ReplicationPad": lambda nd: getattr(nn, f"ReplicationPad{nd}d")((0, 2) * nd),
    "CircularPad": lambda nd: getattr(nn, f"CircularPad{nd}d")(1),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kind", list(PADS))
def test_padding_module(kind, nd, ratio):
    m = nn.Sequential(CONV[nd](3, 8, 1), PADS[kind](nd), nn.ReLU(), CONV[nd](8, 4, 3))
    res = check(m, (2, 3) + (4,) * nd, ratio)
    assert tshape(res, "0.weight")[0] == tshape(res, "3.weight")[1] == w(8, ratio)


def test_padding_a_channel_dim_runs_at_the_students_width():
    """Channels last: ZeroPad1d pads the Linear's 8 outputs to 10, which cannot be copies of anything: the pad
    runs on the canonical copies and its output is copied out, so nothing freezes and both Linears widen."""
    m = random_init(nn.Sequential(nn.Linear(3, 8), nn.ZeroPad1d((1, 1)), nn.Linear(10, 6), nn.ReLU(),
                                  nn.Linear(6, 2))).double()
    res = expand(m, (2, 5, 3), ratio=2)
    assert tshape(res, "0.weight") == (16, 3) and tshape(res, "2.weight") == (12, 20)
    s = res.summary()
    assert s["unsupported_ops"] == ["ZeroPad1d along a channel dimension (run at the student's width)"]
    assert s["frozen"] == []
    rep = verify(m, res.plan, res.tensors, device="cpu")
    assert rep.passed and all(c.max_rel <= 1e-10 for c in rep.checks if c.dtype == "float64"), rep.to_dict()


# -- torchvision: FrozenBatchNorm2d, MViT's helpers ------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
def test_frozen_batch_norm(ratio):
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    res = check(m, (2, 3, 5, 5), ratio)
    assert "1" in dict(res.student.gm.named_modules())  # a leaf: the module itself runs, at any dtype
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert tshape(res, f"1.{key}") == (w(8, ratio),)


class SqueezeHelpers(nn.Module):
    """MViT's fx-wrapped helpers on a 3-d input: ``_unsqueeze`` adds the heads dim, ``_squeeze`` removes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x):
        y, dims = tv_mvit._unsqueeze(self.a(x), 4, 1)  # (B, N, C) -> (B, 1, N, C)
        y, _ = tv_mvit._unsqueeze(torch.relu(y), 4, 1)  # 4 dims already: as it is
        return self.b(tv_mvit._squeeze(y, 4, 1, dims))


@pytest.mark.parametrize("ratio", RATIOS)
def test_mvit_squeeze_helpers(ratio):
    res = check(SqueezeHelpers(), (2, 5, 3), ratio)
    assert tshape(res, "a.weight") == (w(8, ratio), 3)
    targets = {n.target for n in res.student.gm.graph.nodes if n.op == "call_function"}
    assert {tv_mvit._unsqueeze, tv_mvit._squeeze} <= targets  # recorded as one call each, not traced through


# -- frozen counts: every space an unsupported op kept is reported ---------------------------------------
class UnflattenInto(nn.Module):
    """Linear(8, 64) -> (4, 4, 4) -> an op along the 4 channels: the Linear's outputs are a product."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.fc, self.conv = nn.Linear(8, 64), nn.Conv2d(4, 3, 3)

    def forward(self, x):
        y = self.fc(x).unflatten(1, (4, 4, 4))
        if self.op == "cumprod_":
            y = y.cumprod_(dim=1)  # no rule knows it, and it writes into its input: it cannot run apart
        return self.conv(y)


def test_unsupported_op_on_a_product_is_counted():
    """The Linear's 64 outputs as 4 x 4 x 4: an op no rule knows, and that cannot run at the student's width
    (it writes into its input), freezes every factor before the product could choose one to widen. Before, nothing offered them as expandable and the plan said "0 expanded,
    0 frozen at 1.00x"; now each is frozen with the op and its node named."""
    planned = plan_expansion(random_init(UnflattenInto("cumprod_")), (2, 8), 2)
    s = planned.plan.report
    assert s["unsupported"] == ["call_method cumprod_"] and s["expanded"] == 0, s
    reason = "unsupported op call_method cumprod_ at cumprod_"
    assert len(s["frozen"]) == 3 and all(f["reason"] == reason for f in s["frozen"]), s["frozen"]
    rows = [r for r in plan_report(planned)["spaces"] if r["status"] == "frozen" and r["reason"] == reason]
    assert [r["size"] for r in rows] == [4, 4, 4]
    assert all({"fc", "cumprod_"} <= {u["node"] for u in r["used_by"]} for r in rows)


def test_conv_after_unflatten_widens_the_channel_factor_only():
    """Before, the conv's input spatial dims were left free, and the product widened its innermost factor:
    the image's width, which doubled the output's width (2x3x2x6 instead of 2x3x2x2)."""
    res = check(UnflattenInto("none"), (2, 8))
    assert tshape(res, "fc.weight") == (128, 8) and tshape(res, "conv.weight") == (3, 8, 3, 3)


@torch.fx.wrap
def _opaque(x: torch.Tensor) -> torch.Tensor:  # a call fx keeps whole, that no rule knows
    return x.flip(-1)


class OpaqueOnFreshSpace(nn.Module):
    """An unsupported op on a parameter, a space that no rule offered to widen: the conv meets it only after."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(8))
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * _opaque(self.gamma)[None, :, None, None])


def test_unsupported_op_on_a_parameter_is_counted():
    planned = plan_expansion(random_init(OpaqueOnFreshSpace()), (1, 3, 4, 4), 2)
    frozen = planned.plan.report["frozen"]
    # gamma's 8 (the op's input, which no rule had offered: counted now) and the conv's 8 (met by its output)
    assert [f["size"] for f in frozen] == [8, 8], frozen
    assert all(f["reason"] == f"unsupported op {__name__}._opaque at _opaque" for f in frozen), frozen


# -- a generator: an index input and an image ---------------------------------------------------------
class Generator(nn.Module):
    """Token ids -> Embedding -> mean -> Linear -> Unflatten -> ConvTranspose2d, added to a conv of an image."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 4 * 4 * 4)
        self.up = nn.Sequential(nn.Unflatten(1, (4, 4, 4)), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                                               output_padding=1),
                                nn.BatchNorm2d(6), nn.ReLU())
        self.img = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, ids, x):
        z = self.up(self.fc(self.emb(ids).mean(1)))
        return self.head(torch.relu(self.img(x)) + z)


@pytest.mark.parametrize("ratio", RATIOS)
def test_index_input_embedding_and_transposed_conv_expand(ratio):
    """Nothing frozen but the graph's inputs and outputs: the embedding dim, the Linear's channel factor and
    the transposed conv's outputs all widen."""
    inputs = pytest.importorskip("gpd_surgery.inputs")  # several inputs and token ids: the capture front end
    specs = (inputs.InputSpec((2, 5), torch.int64, high=10), inputs.InputSpec((2, 3, 8, 8)))
    res = check(Generator(), specs, ratio)
    assert tshape(res, "emb.weight") == (10, w(6, ratio))
    assert tshape(res, "fc.weight") == (16 * w(4, ratio), w(6, ratio))
    assert tshape(res, "up.1.weight") == (w(4, ratio), w(6, ratio), 3, 3)
    assert res.plan.report["frozen"] == [] and res.plan.report["boundary"] >= 1


def deconv_generator(z: int = 8, c: int = 8) -> nn.Module:
    """A DCGAN-style generator: a latent vector up to an image by transposed convs. Its ends are fixed (the
    latent's width and the 3 colours), everything between them may widen."""
    return nn.Sequential(
        nn.ConvTranspose2d(z, 2 * c, 4, 1, 0, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh())


@pytest.mark.parametrize("ratio", RATIOS)
def test_a_deconv_generator_reaches_the_factor_its_ends_allow(ratio):
    """Every width but the latent's and the image's widens: the teacher's size is the arithmetic's maximum."""
    res = check(deconv_generator(), (2, 8, 1, 1), ratio)
    a, b = w(16, ratio), w(8, ratio)
    assert tshape(res, "0.weight") == (8, a, 4, 4) and tshape(res, "3.weight") == (a, b, 4, 4)
    assert tshape(res, "6.weight") == (b, 3, 4, 4) and tshape(res, "6.bias") == (3,)
    params = lambda c2, c1: 8 * c2 * 16 + c2 * c1 * 16 + c1 * 3 * 16 + 3 + 2 * (c2 + c1)  # convs, bias, BN affine
    assert res.plan.report["frozen"] == []
    assert sum(t.numel() for k, t in res.tensors.items() if not k.endswith(("running_mean", "running_var",
               "num_batches_tracked"))) == params(a, b)


class MViTBlock(nn.Module):
    """One MViT v2 block as mvit_v2_s builds them: pooled q, k, v (depthwise Conv3d and LayerNorm over
    head_dim), relative position tables, the pooled residual (``_add_shortcut``) and a projection."""

    def __init__(self, heads: int = 2):
        super().__init__()
        cnf = tv_mvit.MSBlockConfig(num_heads=heads, input_channels=8, output_channels=16, kernel_q=[3, 3, 3],
                                    kernel_kv=[3, 3, 3], stride_q=[1, 2, 2], stride_kv=[1, 2, 2])
        self.block = tv_mvit.MultiscaleBlock([2, 4, 4], cnf, residual_pool=True, residual_with_cls_embed=False,
                                             rel_pos_embed=True, proj_after_attn=True)
        self.stem, self.head = nn.Linear(3, 8), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x), (2, 4, 4))[0])


@pytest.mark.parametrize("ratio", RATIOS)
def test_mvit_block(ratio):
    res = check(MViTBlock(), (2, 1 + 2 * 4 * 4, 3), ratio)
    assert tshape(res, "block.attn.qkv.weight") == (3 * w(2, ratio) * 8, w(8, ratio))  # heads widen, head_dim 8
    assert tshape(res, "block.attn.rel_pos_h") == (3, 8)  # over head_dim: as it is
    assert tshape(res, "block.attn.pool_q.pool.weight") == (8, 1, 3, 3, 3)  # depthwise over head_dim
    targets = {getattr(n.target, "__name__", "") for n in res.student.gm.graph.nodes if n.op == "call_function"}
    assert {"_add_rel_pos", "_add_shortcut", "_unsqueeze", "_squeeze"} <= targets


# -- whole torchvision models beyond classification -------------------------------------------------------
def small_mvit_v2_s() -> nn.Module:
    """mvit_v2_s's architecture (its factory's arguments) for 4 frames of 32x32: mvit_v2_s itself fixes 16
    frames of 224x224 (its positional sizes), whose float64 teacher takes minutes here."""
    captured: dict[str, Any] = {}

    def capture(**kw: Any) -> nn.Module:
        captured.update(kw)
        raise StopIteration

    with mock.patch.object(tv_mvit, "_mvit", capture), pytest.raises(StopIteration):
        tv_mvit.mvit_v2_s()
    return tv_mvit._mvit(**{**captured, "spatial_size": (32, 32), "temporal_size": 4})


def small_s3d() -> nn.Module:
    """s3d's final AvgPool3d((2, 7, 7)) needs 16 frames of 224x224 at least: with a (1, 2, 2) window the same
    network runs on 8 frames of 64x64."""
    m = torchvision.models.get_model("s3d", weights=None)
    m.avgpool = nn.AvgPool3d(kernel_size=(1, 2, 2), stride=1)
    return m


def fpn_backbone() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None)  # FrozenBatchNorm2d by default


def segmentation(name: str):
    return lambda: torchvision.models.get_model(name, weights=None, weights_backbone=None)


WHOLE = {  # name: (factory, input shape)
    "r3d_18": (lambda: torchvision.models.get_model("r3d_18", weights=None), (1, 3, 4, 32, 32)),
    "s3d": (small_s3d, (1, 3, 8, 64, 64)),
    "mvit_v2_s": (small_mvit_v2_s, (1, 3, 4, 32, 32)),
    "fcn_resnet50": (segmentation("fcn_resnet50"), (1, 3, 32, 32)),
    "deeplabv3_mobilenet_v3_large": (segmentation("deeplabv3_mobilenet_v3_large"), (1, 3, 32, 32)),
    "lraspp_mobilenet_v3_large": (segmentation("lraspp_mobilenet_v3_large"), (1, 3, 32, 32)),
    "resnet_fpn_backbone": (fpn_backbone, (1, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_model(name):
    """Nothing unsupported or frozen, at least 3x the parameters at ratio 2, collapse gives the student back,
    and the teacher's outputs (a dict for segmentation and the FPN) equal the student's in float64 (and
    float32)."""
    factory, shape = WHOLE[name]
    torch.manual_seed(0)
    model = randomize(factory())
    res = expand(model, shape, 2, seed=1)
    s = res.summary()
    assert s["unsupported_ops"] == [] and s["spaces_frozen"] == 0, (s["unsupported_ops"], s["frozen"][:3])
    used = [r for r in res.plan.recipes if r.kind == "param" and r.key in res.student.gm.state_dict()]
    student = sum(math.prod(r.shape) for r in used)
    assert sum(res.tensors[r.key].numel() for r in used) >= 3 * student
    back = collapse(res.plan, res.tensors)
    for k, v in model.state_dict().items():
        assert back[k].shape == v.shape and (back[k].double() - v.double()).abs().max() <= 1e-6, k
    del back
    teacher = res.teacher()
    res.tensors.clear()  # the teacher holds the only references: converted in place, one tensor at a time
    x = [torch.randn(shape)]
    f64 = compare(model, teacher, x, "cpu", torch.float64, in_place=True)
    f32 = compare(model, teacher, x, "cpu", torch.float32, in_place=True)
    assert f64.max_rel <= 1e-10, f64
    assert f32.max_rel <= 1e-5, f32


# -- the tracer's and the verifier's side of these rules -------------------------------------------------
FRESH = """
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from gpd_surgery import plan_expansion

m = nn.Sequential(nn.Conv2d(3, 8, 1), FrozenBatchNorm2d(8), nn.Conv2d(8, 4, 1))
modules = dict(plan_expansion(m, (1, 3, 4, 4), 2).student.gm.named_modules())
print(type(modules["1"]).__name__ if "1" in modules else "traced through")
"""


@pytest.mark.slow
def test_frozen_batch_norm_is_a_leaf_in_a_fresh_process():
    """FrozenBatchNorm2d's rule makes it a leaf only if the tracer knows it: torchvision's rules must be loaded
    before tracing, not at the first torchvision op of the analysed graph (traced through, fx folds its
    buffers into float32 constants, and a float64 teacher differs by 1e-7)."""
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "FrozenBatchNorm2d"


def test_mvit_block_verifies_inside():
    """MViT's _add_rel_pos and _add_shortcut add into their first argument in place: the check inside must
    compare the teacher's attention scores with the student's before that addition, not after."""
    from gpd_surgery.verification import verify

    model = random_init(MViTBlock())
    shape = (2, 1 + 2 * 4 * 4, 3)
    res = expand(model, shape, 2)
    report = verify(model, res.plan, res.tensors, shape, device="cpu")
    assert all(c.passed for c in report.checks), report.checks  # the outputs agree
    assert report.passed, report.divergence


def main() -> None:
    """The table of docs/models.md, "torchvision beyond classification": ``python tests/test_rules_capture.py``
    (randomized weights and BatchNorm statistics, one random input, ratio 2, one thread)."""
    import time

    torch.set_num_threads(1)
    print("| model | input shape | x (params, ratio 2) | frozen | float64 rel | float32 rel | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (factory, shape) in WHOLE.items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = randomize(factory())
        res = expand(model, shape, 2, seed=1)
        used = [r for r in res.plan.recipes if r.kind == "param" and r.key in res.student.gm.state_dict()]
        factor = sum(res.tensors[r.key].numel() for r in used) / sum(math.prod(r.shape) for r in used)
        frozen = res.summary()["spaces_frozen"]
        teacher = res.teacher()
        res.tensors.clear()
        x = [torch.randn(shape)]
        f64 = compare(model, teacher, x, "cpu", torch.float64, in_place=True)
        f32 = compare(model, teacher, x, "cpu", torch.float32, in_place=True)
        print(f"| {name} | {'x'.join(map(str, shape))} | {factor:.2f} | {frozen} | {f64.max_rel:.1e} | "
              f"{f32.max_rel:.1e} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
