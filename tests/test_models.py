"""The torchvision CNNs of the core acceptance, with random weights and BatchNorm statistics, at small inputs."""
import os

import pytest
import torch

from conftest import randomize
from gpd_surgery import collapse, expand
from gpd_surgery.verification import compare

torchvision = pytest.importorskip("torchvision")

# vgg11_bn's 4x-widened 25088x4096 classifier alone is 1.6 GB: checked in float64 it takes the suite to 7.6 GB,
# past an 8 GB laptop. It runs with GPD_HEAVY_TESTS=1, and in `make zoo` with all 80 torchvision models.
HEAVY = pytest.mark.skipif(not os.environ.get("GPD_HEAVY_TESTS"), reason="peaks at 7.6 GB: GPD_HEAVY_TESTS=1")
MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "efficientnet_b0", "regnet_y_400mf", "regnet_x_400mf", "densenet121", "googlenet", "inception_v3",
    "squeezenet1_0", "shufflenet_v2_x0_5", "alexnet", pytest.param("vgg11_bn", marks=HEAVY),
]
SHAPE = {"inception_v3": (2, 3, 96, 96), "alexnet": (2, 3, 64, 64)}
# The classifier's output is the graph's output and keeps its size: where it holds most of the parameters,
# ratio 2 cannot reach 3x. Their bound is checked instead: every other space is widened (nothing frozen).
HEAD_HEAVY = {"mnasnet0_5": 2.5}
# ShuffleNetV2 chunks the output of its previous channel shuffle block after block: after log2(C) blocks the
# halves no longer fall on whole channels of the spaces the layout algebra tracks, and four spaces freeze
# (the teacher stays exact). Tracked in test_shufflenet_nothing_frozen.
PARTLY_FROZEN = {"shufflenet_v2_x0_5": 2.4}


def build(name, **kw):
    torch.manual_seed(0)
    return randomize(torchvision.models.get_model(name, weights=None, **kw))


def used_params(res):
    """Student and teacher parameter counts over the tensors the traced graph uses."""
    used = [r for r in res.plan.recipes if r.kind == "param" and r.key in res.student.gm.state_dict()]
    s = sum(torch.Size(r.shape).numel() for r in used)
    return s, sum(res.tensors[r.key].numel() for r in used)


def roundtrip(name, ratio, shape=None):
    """Expand, collapse back, compare in float32 then float64. The modules are converted in place and the
    teacher's float32 tensors dropped before the float64 check: vgg11_bn's teacher is 2 GB, and copies of
    it would put the suite past what an 8 GB laptop has."""
    model = build(name)
    shape = shape or SHAPE.get(name, (2, 3, 64, 64))
    res = expand(model, shape, ratio, seed=1)
    back = collapse(res.plan, res.tensors)
    state = model.state_dict()
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert (back[k].double() - v.double()).abs().max() <= 1e-6, k
    del back, state
    summary, counts = res.summary(), used_params(res)
    teacher = res.teacher()
    res.tensors.clear()  # the teacher module holds the only references now: .double() replaces them one by one
    x = [torch.randn(shape)]
    f64 = compare(model, teacher, x, "cpu", torch.float64, in_place=True)  # first: float64 constants stay exact
    f32 = compare(model, teacher, x, "cpu", torch.float32, in_place=True)
    assert f32.max_rel <= 1e-5, f32
    assert f64.max_rel <= 1e-10, f64
    return summary, counts


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_ratio_2(name):
    summary, (s, t) = roundtrip(name, 2)
    assert summary["unsupported_ops"] == []
    if name not in PARTLY_FROZEN:
        assert summary["spaces_frozen"] == 0, summary["frozen"][:3]
    assert t >= {**HEAD_HEAVY, **PARTLY_FROZEN}.get(name, 3.0) * s, (s, t)


@pytest.mark.xfail(strict=True, reason="chunks of interleaved channels below one channel per space freeze 4 spaces")
def test_shufflenet_nothing_frozen():
    res = expand(build("shufflenet_v2_x0_5"), (1, 3, 64, 64), 2)
    assert res.summary()["spaces_frozen"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_ratio_3(name):
    _, (s, t) = roundtrip(name, 3)
    assert t >= 5 * s


def test_head_heavy_bound_is_the_head():
    """mnasnet0_5 misses 3x only because of its 1000-way head: with 10 classes it clears it."""
    model = build("mnasnet0_5", num_classes=10)
    res = expand(model, (1, 3, 32, 32), 2)
    s, t = used_params(res)
    assert t >= 3 * s
