"""A rule for your own module: a block whose forward torch.fx cannot trace, kept whole and widened exactly.

``ClippedResidual`` clips, in a Python loop with ``.item()``, the channels whose activations overshoot a
limit. fx cannot trace that (a Python ``if`` on a tensor's value), so ``gpd_surgery.expand`` refuses the
model as it is. Registering a rule for the class makes it a leaf of the trace (fx records one call of it)
and tells the analysis how its channels relate; the teacher then runs the block's own Python on wider
tensors, which stays exact because every copy of a channel makes the same decision as the student's.

Run ``python examples/custom_rule.py``: it expands, verifies and extracts the model through the Python
API and exits non-zero if anything is off. See docs/extending.md.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import gpd_surgery
from gpd_surgery import Ctx, GPDError, Sizes
from gpd_surgery.layout import Layout


class ClippedResidual(nn.Module):
    """``x + gain * y`` with ``y = conv(x)``, each channel of ``y`` clipped to the limit where it overshoots."""

    def __init__(self, channels: int, limit: float = 0.8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gain = nn.Parameter(torch.full((channels,), 0.5))
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for c in range(y.shape[1]):  # data-dependent Python: fx cannot trace it
            if y[:, c].abs().max().item() > self.limit:
                y = torch.cat([y[:, :c], y[:, c : c + 1].clamp(-self.limit, self.limit), y[:, c + 1 :]], dim=1)
        return x + self.gain.view(1, -1, 1, 1) * y


def clipped_residual(ctx: Ctx) -> list[Layout]:
    """The rule: how the block's dims and tensors relate, how its teacher is built. Its output has the input's
    dims; the conv reads the input's channels (a dense input: ``share``) and adds its output channels back to
    them (``copy``), and the gain is per channel (``copy``)."""
    name = str(ctx.node.target)  # the block's path in the model, e.g. "3"
    x = ctx.dims(ctx.tensor_args()[0])  # layouts of (N, C, H, W)
    weight = ctx.param(f"{name}.conv.weight", ["copy", "share"])  # (out, in, kh, kw)
    ctx.spaces.mark_expandable(weight[0])  # a dense layer's output channels may widen
    ctx.unify(weight[0], x[1])  # the residual: the conv's outputs are the input's channels
    ctx.unify(weight[1], x[1])  # and so are its inputs
    ctx.unify(ctx.param(f"{name}.conv.bias", ["copy"])[0], x[1])
    ctx.unify(ctx.param(f"{name}.gain", ["copy"])[0], x[1])

    def build(teacher: nn.Module, size: Sizes) -> None:  # the teacher's copy, its tensors already widened
        teacher.conv.in_channels = teacher.conv.out_channels = size(x[1])

    ctx.on_build_module(build)
    return list(x)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ClippedResidual(16), ClippedResidual(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def main() -> int:
    failures: list[str] = []
    shape = (2, 3, 16, 16)
    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)

    try:
        gpd_surgery.expand(model, shape, 2)
        failures.append("without the rule, the model traced (the example needs an untraceable block)")
    except GPDError as e:
        print(f"without the rule: {str(e)[:100]}...")

    rules = gpd_surgery.Registry()  # layered over the default rules; gpd_surgery.register_rule is global
    rules.register(ClippedResidual)(clipped_residual)
    expanded = gpd_surgery.expand(model, shape, 2, rules=rules)
    widened = expanded.tensors["3.conv.weight"].shape
    print(f"3.conv.weight: {tuple(model[3].conv.weight.shape)} -> {tuple(widened)}")
    if widened != (32, 32, 3, 3):
        failures.append(f"the block did not widen: {tuple(widened)}")

    teacher = expanded.teacher().double().eval()
    student = make_model().double().eval()
    student.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            block = student[3]
            clipped = int((block.conv(student[:3](x)).abs().amax(dim=(0, 2, 3)) > block.limit).sum())
            if not 0 < clipped < 16:  # both ways through the block's Python must run
                failures.append(f"{clipped} of 16 channels clipped: the example does not test the clipping")
            ys, yt = student(x), teacher(x)
            rel = ((yt - ys).abs().max() / ys.abs().max()).item()
            print(f"teacher vs student (float64, {clipped} of 16 channels clipped): relative error {rel:.1e}")
            if not rel <= 1e-10:
                failures.append(f"teacher differs from the student: {rel:.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "teacher.safetensors")
        expanded.save(path)
        report = gpd_surgery.verify(model, path, rules=rules)  # the same rules: verify traces the model again
        print(f"gpd_surgery.verify: {'passed' if report.passed else 'FAILED'}")
        if not report.passed:
            failures.append("verify failed")

        extracted = make_model().eval()
        extracted.load_state_dict(gpd_surgery.extract(path), strict=True)
    with torch.no_grad():
        x = torch.randn(shape, generator=g)
        if not all(torch.equal(a, b) for a, b in zip(extracted.state_dict().values(), model.state_dict().values())):
            failures.append("the extracted weights differ from the student's")
        if not torch.equal(extracted(x), model(x)):
            failures.append("the extracted student computes something else")
    print("extracted student: loads strictly and matches" if not failures else "\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
