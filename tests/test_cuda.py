"""CUDA equivalence (skipped without a GPU; run on a lent device with scripts/gpu_check.sh)."""
import copy

import pytest
import torch
from torch import nn

from conftest import randomize
from gpd_surgery import collapse, expand
from gpd_surgery.examples import small_cnn
from gpd_surgery.student_view import StudentView
from gpd_surgery.verification import compare, verify

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet50", {}, (2, 3, 64, 64)),
    ("vit_b_16", {"image_size": 32}, (2, 3, 32, 32)),
    ("swin_t", {}, (2, 3, 64, 64)),
])
@pytest.mark.parametrize("ratio,branches", [(2, "none"), (1.5, "none"), (2, "default")])
def test_verify_on_cuda(name, kwargs, shape, ratio, branches):
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None, **kwargs))
    res = expand(model, shape, ratio, branches=branches)
    report = verify(model, res.plan, res.tensors, shape, device="cuda")
    assert {(c.device, c.dtype) for c in report.checks} == {("cuda", "float32"), ("cuda", "float64")}
    assert report.passed, report.to_dict()


def test_teacher_rebuilt_on_cuda_and_tf32_is_off():
    torch.backends.cuda.matmul.allow_tf32 = True  # verify must switch it off for its comparison
    model = randomize(small_cnn())
    res = expand(model, (4, 3, 32, 32), 2)
    teacher = res.teacher().cuda()
    x = torch.randn(4, 3, 32, 32)
    assert compare(model, teacher, [x], "cuda", torch.float64).max_rel <= 1e-10
    assert compare(model, teacher, [x], "cuda", torch.float32).max_rel <= 1e-5
    assert torch.backends.cuda.matmul.allow_tf32  # restored afterwards


def test_extraction_from_a_cuda_trained_teacher():
    torch.manual_seed(0)
    model = randomize(small_cnn())
    res = expand(model, (8, 3, 32, 32), 2, branches="default")
    teacher = res.teacher().cuda().train()
    view = StudentView(teacher, res.plan, res.student.gm).cuda().train()
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(teacher(x), y) + nn.functional.cross_entropy(view(x), y)
        loss.backward()
        opt.step()
    state = {k: v.detach().cpu().double() for k, v in teacher.state_dict().items()}
    state.update({k: v.double() if v.is_floating_point() else v for k, v in res.tensors.items() if k not in state})
    for name, buf in view.student.named_buffers():
        state["student/" + name] = buf.detach().cpu().double() if buf.is_floating_point() else buf.cpu()
    extracted = copy.deepcopy(model).double()
    extracted.load_state_dict(collapse(res.plan, state), strict=True)
    view64 = copy.deepcopy(view).double().eval()
    x64 = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = view64(x64.cuda()).cpu(), extracted.eval()(x64)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-12


def test_student_view_gradients_on_cuda():
    model = randomize(small_cnn())
    res = expand(model, (4, 3, 32, 32), 2, branches="default")
    teacher = res.teacher().cuda()
    view = StudentView(teacher, res.plan, res.student.gm).cuda().train()
    nn.functional.cross_entropy(view(torch.randn(4, 3, 32, 32, device="cuda")),
                                torch.tensor([0, 1, 2, 3], device="cuda")).backward()
    scales = [p.grad for n, p in teacher.named_parameters() if n.endswith("_scale")]
    assert scales and all(g is not None and g.abs().sum() > 0 for g in scales)
