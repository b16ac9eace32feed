"""Expand, verify and collapse torchvision models in-process and print a Markdown table (docs/models.md).

Usage: python scripts/model_table.py [--ratio R] NAME...
"""
import argparse
import sys
import time

import torch
import torchvision

sys.path.insert(0, "tests")
from conftest import randomize  # noqa: E402

from gpd_surgery import collapse, expand  # noqa: E402
from gpd_surgery.verification import compare  # noqa: E402

SHAPE = {"inception_v3": (2, 3, 96, 96)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--ratio", type=float, default=2.0)
    a = ap.parse_args()
    print("| model | student params (used) | teacher params | x | frozen | float32 rel | float64 rel | extract max abs | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.names:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = randomize(torchvision.models.get_model(name, weights=None))
        shape = SHAPE.get(name, (2, 3, 64, 64))
        res = expand(model, shape, a.ratio, seed=1)
        teacher = res.teacher()
        x = [torch.randn(shape)]
        f32 = compare(model, teacher, x, "cpu", torch.float32)
        f64 = compare(model, teacher, x, "cpu", torch.float64)
        back = collapse(res.plan, res.tensors)
        state = model.float().state_dict()
        err = max((back[k].double() - v.double()).abs().max().item() for k, v in state.items() if v.numel())
        used = [r for r in res.plan.recipes if r.kind == "param" and r.key in res.student.gm.state_dict()]
        s = sum(torch.Size(r.shape).numel() for r in used)
        t = sum(res.tensors[r.key].numel() for r in used)
        frozen = res.summary()["spaces_frozen"]
        print(f"| {name} | {s:,} | {t:,} | {t / s:.2f} | {frozen} | {f32.max_rel:.1e} | {f64.max_rel:.1e} | "
              f"{err:.1e} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
