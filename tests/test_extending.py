"""The extension point: rules for a user's modules and functions (global or per call), the example in
examples/, and that importing the CLI imports neither torchvision nor timm."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gpd_surgery
from gpd_surgery import Ctx, GPDError, Registry, Sizes
from gpd_surgery.rules import DEFAULT

from conftest import random_init

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


class Gate(nn.Module):
    """``x * scale``, skipped when the input is all zero: a Python ``if`` on data, which fx cannot trace."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() == 0:
            return x
        return x * self.scale.view(1, -1, 1, 1)


def _net() -> nn.Module:
    return random_init(nn.Sequential(nn.Conv2d(3, 8, 3), Gate(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))


def _per_channel_gate(ctx: Ctx) -> list:
    x = ctx.dims(ctx.tensor_args()[0])
    ctx.unify(ctx.param(f"{ctx.node.target}.scale", ["copy"])[0], x[1])
    return list(x)


def _opaque_gate(ctx: Ctx) -> list:
    return ctx.unsupported("Gate, kept as it is")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _exact(model: nn.Module, res: gpd_surgery.Expanded, shape: tuple[int, ...]) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        return _rel(res.teacher().double()(x), model.double()(x))


def test_per_call_registries_do_not_collide():
    """Two registries with their own rule for the same class: each expansion uses its own, the default
    registry knows neither, and without one the model is untraceable, as before."""
    widen, keep = Registry(), Registry()
    widen.register(Gate)(_per_channel_gate)
    keep.register(Gate)(_opaque_gate)
    shape = (1, 3, 10, 10)
    wide = gpd_surgery.expand(_net(), shape, 2, rules=widen)
    kept = gpd_surgery.expand(_net(), shape, 2, rules=keep)
    assert wide.tensors["1.scale"].shape == (16,) and wide.tensors["0.weight"].shape[0] == 16
    assert kept.tensors["1.scale"].shape == (8,) and kept.tensors["0.weight"].shape[0] == 8
    assert kept.plan.report["unsupported"] == ["Gate, kept as it is"]
    for res in (wide, kept):
        assert _exact(_net(), res, shape) <= 1e-10
    assert DEFAULT.get(Gate) is None and not DEFAULT.is_leaf(Gate(1))
    with pytest.raises(GPDError, match="cannot trace"):
        gpd_surgery.expand(_net(), shape, 2)


def test_rules_verify_and_reload(tmp_path):
    """verify and load_teacher trace the model again: with the same rules they find the teacher's plan."""
    rules = Registry()
    rules.register(Gate)(_per_channel_gate)
    model, shape = _net(), (1, 3, 10, 10)
    path = str(tmp_path / "t.safetensors")
    gpd_surgery.expand(model, shape, 2, rules=rules).save(path)
    assert gpd_surgery.verify(model, path, rules=rules).passed
    teacher = gpd_surgery.load_teacher(path, model, rules=rules)
    assert teacher.get_submodule("0").weight.shape[0] == 16
    with pytest.raises(GPDError, match="cannot trace"):
        gpd_surgery.load_teacher(path, model)


def test_subclass_that_overrides_forward_is_not_covered():
    """A rule for a class covers its subclasses only where they keep its forward."""

    class Same(Gate):
        pass

    class Other(Gate):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.view(1, -1, 1, 1) + 1

    rules = Registry()
    rules.register(Gate)(_per_channel_gate)
    assert rules.is_leaf(Same(2)) and not rules.is_leaf(Other(2))
    model = random_init(nn.Sequential(nn.Conv2d(3, 8, 3), Other(8), nn.Conv2d(8, 4, 1)))
    res = gpd_surgery.expand(model, (1, 3, 10, 10), 2, rules=rules)  # Other is traced through
    assert _exact(model, res, (1, 3, 10, 10)) <= 1e-10


def soft_clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Python on data (fx cannot trace it): tanh-clipped only when something exceeds the limit."""
    if x.abs().max().item() > limit:
        return limit * torch.tanh(x / limit)
    return x


class Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(soft_clip(self.conv1(x), 0.5))


@gpd_surgery.register_rule(soft_clip)
def _soft_clip_rule(ctx: Ctx) -> list:
    return list(ctx.dims(ctx.tensor_args()[0]))  # elementwise: channels pass through


def test_registered_function_is_one_node_and_widens():
    model, shape = random_init(Clipped()), (2, 3, 8, 8)
    res = gpd_surgery.expand(model, shape, 2)
    assert [n.target for n in res.student.gm.graph.nodes if n.op == "call_function"] == [soft_clip]
    assert res.tensors["conv1.weight"].shape == (12, 3, 3, 3) and not res.plan.report["unsupported"]
    assert _exact(model, res, shape) <= 1e-10


def test_build_hook_receives_sizes():
    """A module hook sees the teacher's copy of the module and the Sizes of its layouts."""
    seen: list[tuple[int, int]] = []

    def rule(ctx: Ctx) -> list:
        x = _per_channel_gate(ctx)

        def build(teacher: nn.Module, size: Sizes) -> None:
            seen.append((size(x[1]), size.student(x[1])))
            assert torch.equal(size.src(x[1]), torch.arange(16) % 8)

        ctx.on_build_module(build)
        return x

    rules = Registry()
    rules.register(Gate)(rule)
    gpd_surgery.expand(_net(), (1, 3, 10, 10), 2, rules=rules).teacher()
    assert seen == [(16, 8)]


def test_example_custom_rule_runs():
    """examples/custom_rule.py expands, verifies and extracts an untraceable block's model, or exits 1."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_rule.py")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: passed" in done.stdout


def test_library_rules_load_lazily():
    """Importing the CLI imports neither torchvision nor timm; neither does expanding a plain torch model;
    torchvision's rules load at the first torchvision op of a graph."""
    code = textwrap.dedent("""
        import sys
        import torch
        import gpd_surgery.cli
        import gpd_surgery
        assert "timm" not in sys.modules and "torchvision" not in sys.modules, "imported by the CLI"
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
        gpd_surgery.expand(net, (1, 3, 8, 8), 2)
        assert "timm" not in sys.modules and "torchvision" not in sys.modules, "imported by expand"
        from torchvision.ops import StochasticDepth
        assert "gpd_surgery.rules.torchvision" not in sys.modules
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), StochasticDepth(0.1, "row"), torch.nn.Conv2d(4, 2, 1))
        res = gpd_surgery.expand(net, (1, 3, 8, 8), 2)
        assert "gpd_surgery.rules.torchvision" in sys.modules and not res.plan.report["unsupported"]
        assert "timm" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
