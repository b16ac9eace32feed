"""Expand, verify and extract every torchvision classification model, or one model of each timm family;
a table in docs/zoo.md or docs/zoo-timm.md.

Run with ``make zoo`` / ``make zoo-timm``, or
``python -m gpd_surgery.zoo [--source torchvision|timm] [--ratio R] [--output FILE] [NAME...]``.
"""
from __future__ import annotations

import argparse
import gc
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from .api import expand
from .collapsing import collapse_tensor, merged
from .memory import available_bytes
from .trace import tensors_in
from .verification import TOLERANCE, _no_tf32

TRANSFORMERS = ("vit", "swin", "maxvit")

# One small model of each timm family (timm 1.0): convolutional networks of every kind, vision
# transformers, hybrids and MLP mixers. Names that this timm does not know are reported as such.
TIMM_MODELS = (
    # residual and grouped CNNs
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18",
    "res2net50_14w_8s", "resnest14d", "regnetx_002", "regnety_002", "regnetz_b16", "resnetrs50",
    "cspresnet50", "cspdarknet53", "darknet53", "dla34", "dpn68", "densenet121", "hrnet_w18_small",
    "ese_vovnet19b_dw", "selecsls42b", "xception41", "inception_v3", "inception_v4", "repvgg_a0",
    "nf_resnet26", "tresnet_m", "gernet_s", "hgnetv2_b0", "rdnet_tiny",
    # mobile CNNs
    "efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnet_lite0", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "mnasnet_small", "fbnetc_100", "ghostnet_100", "ghostnetv2_100", "lcnet_050",
    "rexnet_100", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "starnet_s1",
    # modern CNNs and metaformers
    "convnext_atto", "convnextv2_atto", "edgenext_xx_small", "poolformer_s12", "poolformerv2_s12",
    "inception_next_tiny", "efficientformer_l1", "efficientformerv2_s0",
    # vision transformers
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch16_rope_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224", "flexivit_small",
    "pit_ti_224", "tnt_s_patch16_224", "crossvit_tiny_240", "levit_128s", "visformer_tiny",
    "deit3_small_patch16_224",
    # hierarchical and windowed transformers, hybrids
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "pvt_v2_b0", "twins_pcpvt_small", "coat_lite_tiny",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "gcvit_xxtiny", "davit_tiny", "mvitv2_tiny", "nest_tiny",
    "tiny_vit_5m_224", "mobilevit_xxs", "mobilevitv2_050", "efficientvit_b0", "efficientvit_m0", "hiera_tiny_224",
    "fastvit_sa12", "volo_d1_224",
    # MLPs
    "mixer_b16_224", "resmlp_12_224", "gmlp_ti16_224", "convmixer_768_32", "sequencer2d_s",
)


def input_shape(name: str) -> tuple[int, ...]:
    """Small inputs where the architecture allows them; ViTs and windowed models need their own size."""
    if any(name.startswith(p) for p in TRANSFORMERS):
        return (1, 3, 224, 224)
    if name == "inception_v3":
        return (1, 3, 128, 128)
    return (1, 3, 64, 64)


@torch.no_grad()
def timm_input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """64x64 where the model runs on it (most CNNs), else the input size of its default config."""
    try:
        model(torch.randn(1, 3, 64, 64))
        return (1, 3, 64, 64)
    except Exception:  # fixed position embeddings, windows, strides that need more pixels
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        return (1, *size)


def make_model(name: str, source: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = randomize(timm.create_model(name, pretrained=False))
        return model, timm_input_shape(model)
    import torchvision

    return randomize(torchvision.models.get_model(name, weights=None)), input_shape(name)


@dataclass
class Row:
    model: str
    input: str
    student: int = 0
    teacher: int = 0
    frozen: int = 0
    f32: float | None = None
    f64: float | None = None
    extract: float | None = None
    floor: float | None = None  # the student's own float32 error against its float64 self
    sens: float | None = None  # the student's float64 output change for a 1-ulp change of its input
    seconds: float = 0.0
    note: str = ""

    @property
    def f32_tolerance(self) -> float:
        """1e-5, or twice the student's own float32 error where float32 itself is coarser than that: two
        float32 computations of one function differ by up to the sum of their rounding errors."""
        return max(TOLERANCE[torch.float32], 2 * (self.floor or 0.0))

    @property
    def f64_tolerance(self) -> float:
        """1e-10, or ten times the student's own float64 sensitivity where the function is so ill-conditioned
        (a deep random network whose activations grow block after block) that a change of the input in its
        last bit moves the output by more: a teacher sums in another order, which perturbs it as much."""
        return max(TOLERANCE[torch.float64], 10 * (self.sens or 0.0))

    @property
    def passed(self) -> bool:
        return (self.f32 is not None and self.f32 <= self.f32_tolerance and self.f64 is not None
                and self.f64 <= self.f64_tolerance and self.extract is not None and self.extract <= 1e-6)


def _rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    err = max((g.double() - r.double()).abs().max().item() for g, r in zip(got, ref, strict=True))
    scale = max(r.abs().max().item() for r in ref)
    return err / scale if scale else err


@torch.no_grad()
def _run(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with _no_tf32():
        return [y.detach() for y in tensors_in(model(x))]


class _Float64Interpreter(torch.fx.Interpreter):
    """Run a float32 graph in float64 one module at a time: the peak is the float32 model plus its largest
    module in float64, so a teacher too large to hold in float64 can still be checked in float64.
    float32 -> float64 -> float32 is lossless, so the model is left as it was."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        mod.double()
        try:
            return super().call_module(target, args, kwargs)
        finally:
            mod.float()

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


@torch.no_grad()
def _run64_low_memory(model: torch.fx.GraphModule, x: torch.Tensor) -> list[torch.Tensor]:
    return tensors_in(_Float64Interpreter(model).run(x.double()))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return model.eval()


def _extract_error(res: Any, model: torch.nn.Module) -> float:
    """Max abs difference between the collapsed and the original weights, one tensor at a time (low peak)."""
    state = model.state_dict()
    err = 0.0
    for r in res.plan.recipes:
        v = state[r.key]
        if r.kind == "buffer" or not v.is_floating_point() or not v.numel():
            continue
        got = collapse_tensor(merged(res.plan, res.tensors, r.key), r, res.plan.maps)
        err = max(err, (got.double() - v.double()).abs().max().item())
    return err


def run_one(name: str, ratio: float, source: str = "torchvision") -> Row:
    row = Row(name, "")
    t0 = time.perf_counter()
    try:
        model, shape = make_model(name, source)
        row.input = "x".join(map(str, shape[2:]))
        res = expand(model, shape, ratio, seed=0)
        summary = res.summary()
        row.student, row.teacher, row.frozen = summary["student_params"], summary["teacher_params"], summary["spaces_frozen"]
        row.extract = _extract_error(res, model)
        teacher = res.teacher().eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        ys32, yt32 = _run(model, x), _run(teacher, x)
        need = 2 * sum(t.numel() * 8 for t in teacher.state_dict().values())
        plan, student_gm = res.plan, res.student.gm
        del res
        gc.collect()
        free = available_bytes()
        if free is not None and need > 0.8 * free:
            ys64, yt64 = _run64_low_memory(student_gm, x), _run64_low_memory(teacher, x)
            row.note = f"float64 module by module (a float64 teacher needs {need / 2**30:.0f} GiB)"
        else:
            ys64, yt64 = _run(model.double(), x.double()), _run(teacher.double(), x.double())
        row.f32, row.f64, row.floor = _rel(yt32, ys32), _rel(yt64, ys64), _rel(ys32, ys64)
        if row.f64 > TOLERANCE[torch.float64]:  # how much the student itself moves for a 1-ulp change of x
            nudged = x.double() * (1 + 2.0**-52)
            moved = _run64_low_memory(student_gm, nudged) if row.note else _run(model, nudged)
            row.sens = _rel(moved, ys64)
        if plan.report.get("frozen"):
            row.note = (row.note + "; " if row.note else "") + plan.report["frozen"][0]["reason"]
        elif plan.report.get("unsupported"):  # nothing that could widen reached them, yet they stop it
            row.note = (row.note + "; " if row.note else "") + "unsupported: " + ", ".join(plan.report["unsupported"])
    except Exception as e:  # one model's failure is a row, not the end of the run
        row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row.seconds = time.perf_counter() - t0
    gc.collect()
    return row


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def markdown(rows: list[Row], ratio: float, source: str = "torchvision") -> str:
    ok = sum(r.passed for r in rows)
    title = ("The torchvision zoo" if source == "torchvision" else "One model of each timm family") + f" at ratio {ratio:g}"
    lines = [
        f"# {title}", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Random weights and BatchNorm statistics; one random input; relative error = max|teacher - student| / "
        "max|student|; extract = max abs difference of the collapsed weights. A model passes with float64 <= 1e-10, "
        "extract <= 1e-6 and float32 <= 1e-5, or <= twice the student's own float32 error against its float64 "
        "self where float32 is coarser than that (two float32 computations of one function differ by up to the sum "
        "of their rounding errors). Likewise float64 may reach ten times the student's own float64 sensitivity "
        "(its output's change when its input changes in the last bit, measured where float64 exceeds 1e-10) for a "
        "function so ill-conditioned that this sensitivity exceeds 1e-11. Produced by `make "
        + ("zoo" if source == "torchvision" else "zoo-timm")
        + f"` on {time.strftime('%Y-%m-%d')}.", "",
        "| model | input | student params | teacher params | x | frozen | float32 rel | student f32 vs f64 | float64 rel "
        "| student f64 sensitivity | extract | result | s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        x = r.teacher / r.student if r.student else 0
        lines.append(f"| {r.model} | {r.input} | {r.student:,} | {r.teacher:,} | {x:.2f} | {r.frozen} | {_fmt(r.f32)} | "
                     f"{_fmt(r.floor)} | {_fmt(r.f64)} | {'' if r.sens is None else _fmt(r.sens)} | {_fmt(r.extract)} | "
                     f"{'pass' if r.passed else 'FAIL'} | {r.seconds:.0f} | {r.note} |")
    lines += ["", f"**{ok} of {len(rows)} models pass.**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torchvision
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--source", choices=("torchvision", "timm"), default="torchvision")
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--output", default=None, help="docs/zoo.md, or docs/zoo-timm.md for --source timm")
    a = ap.parse_args(argv)
    output = a.output or ("docs/zoo.md" if a.source == "torchvision" else "docs/zoo-timm.md")
    if a.names:
        names = a.names
    elif a.source == "timm":
        names = list(TIMM_MODELS)
    else:
        names = sorted(torchvision.models.list_models(module=torchvision.models))
    console = Console()
    rows: list[Row] = []
    for name in names:
        row = run_one(name, a.ratio, a.source)
        rows.append(row)
        console.print(f"{name:24s} {'[green]pass[/]' if row.passed else '[red]FAIL[/]'} f32 {_fmt(row.f32)} "
                      f"f64 {_fmt(row.f64)} extract {_fmt(row.extract)} x{row.teacher / max(row.student, 1):.2f} "
                      f"frozen {row.frozen} {row.seconds:.0f}s {row.note}", highlight=False)
        with open(output, "w") as f:
            f.write(markdown(rows, a.ratio, a.source))
    ok = sum(r.passed for r in rows)
    console.print(f"{ok} of {len(rows)} models pass")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
