"""One row of scripts/gpu_check.sh: expand, verify on CUDA, and time one GPD step on the GPU."""
import sys
import time

import torch
import torchvision

from gpd_surgery import expand
from gpd_surgery.student_view import StudentView
from gpd_surgery.verification import verify

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
