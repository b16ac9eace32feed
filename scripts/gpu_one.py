"""One row of scripts/gpu_check.sh: expand, verify on CUDA, and time one GPD step on the GPU.

``gpu_one.py amp NAME``: instead, one row of the mixed-precision table: the GPD step (gpd train's: teacher and
student view, GPDLoss, one backward) against the teacher's and the student's steps as separate modules, each
under --amp off, bf16 and fp16 (a gradient scaler), channels-last, median of 10 steps after 3 warm-up.
"""
import contextlib
import copy
import statistics
import sys
import time

import torch
import torchvision

from gpd_surgery import expand
from gpd_surgery.student_view import StudentView
from gpd_surgery.verification import verify



def amp_row(name: str) -> None:
    from gpd_surgery.training import GPDLoss, GPDModel, TrainConfig, make_optimizer

    torch.manual_seed(0)
    student = torchvision.models.get_model(name, weights=None).eval()
    shape = (1, 3, 224, 224)
    res = expand(student, shape, 2.0, branches="default")
    x = torch.randn(64, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device="cuda")
    loss_fn = GPDLoss(TrainConfig())
    cells = []
    for amp in ("off", "bf16", "fp16"):
        gpd = GPDModel.from_expanded(expand(student, shape, 2.0, branches="default")).cuda().train()
        gpd = gpd.to(memory_format=torch.channels_last)
        sep = torch.nn.ModuleDict({"teacher": res.teacher(), "student": copy.deepcopy(student)}).cuda().train()
        sep = sep.to(memory_format=torch.channels_last)
        runs = {"gpd": (gpd, make_optimizer(gpd, TrainConfig())), "sep": (sep, make_optimizer(sep, TrainConfig()))}
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        cast = (contextlib.nullcontext if amp == "off" else
                lambda: torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16))
        times = {"gpd": [], "sep": []}
        for i in range(13):
            for kind in ("gpd", "sep") if i % 2 == 0 else ("sep", "gpd"):
                m, opt = runs[kind]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with cast():
                    t, s = m(x) if kind == "gpd" else (m["teacher"](x), m["student"](x))
                loss, _ = loss_fn(t, s, y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                torch.cuda.synchronize()
                if i >= 3:
                    times[kind].append(time.perf_counter() - t0)
        g, p = statistics.median(times["gpd"]), statistics.median(times["sep"])
        cells.append(f"{g * 1000:.0f} / {p * 1000:.0f} ms ({g / p:.2f}x)")
        del gpd, sep, runs
        torch.cuda.empty_cache()
    print(f"| {name} | " + " | ".join(cells) + " |")


if sys.argv[1] == "amp":
    amp_row(sys.argv[2])
    sys.exit(0)

name, ratio, branches = sys.argv[1], float(sys.argv[2]), sys.argv[3]
shape = (2, 3, 224, 224)
torch.manual_seed(0)
model = torchvision.models.get_model(name, weights=None).eval()
with torch.no_grad():
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.5) if n.endswith("running_var") else t.add_(torch.randn_like(t) * 0.02)
t0 = time.perf_counter()
res = expand(model, shape, ratio, branches=branches)
t_expand = time.perf_counter() - t0
t0 = time.perf_counter()
rep = verify(model, res.plan, res.tensors, shape, device="cuda", n_inputs=2)
t_verify = time.perf_counter() - t0
f32 = next(c for c in rep.checks if c.dtype == "float32")
f64 = next(c for c in rep.checks if c.dtype == "float64")
ext = next(c for c in rep.extraction if c.dtype == "float64")
teacher = res.teacher().cuda().train()
view = StudentView(teacher, res.plan, res.student.gm).cuda().train()
opt = torch.optim.SGD(teacher.parameters(), lr=0.01)
x, y = torch.randn(32, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (32,), device="cuda")
for i in range(3):  # the first steps warm up cuDNN
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(teacher(x), y) + torch.nn.functional.cross_entropy(view(x), y)
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    t_step = time.perf_counter() - t0
ok = "pass" if rep.passed else "FAIL"
print(f"| {name} | {ratio:g} | {branches} | {f32.max_rel:.1e} | {f64.max_rel:.1e} | {ext.max_rel:.1e} ({ok}) | "
      f"{t_expand:.1f} | {t_verify:.1f} | {t_step:.2f} |")
