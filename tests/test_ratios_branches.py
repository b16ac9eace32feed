"""Arbitrary ratios, CBR branches and the differentiable student view (the two mappings of GPD)."""
import copy

import pytest
import torch
from torch import nn

from conftest import randomize
from gpd_surgery import collapse, expand
from gpd_surgery.examples import small_cnn
from gpd_surgery.student_view import StudentView
from gpd_surgery.verification import compare, verify

torchvision = pytest.importorskip("torchvision")

MODELS = {
    "resnet18": ({}, (1, 3, 32, 32)),
    "mobilenet_v2": ({}, (1, 3, 32, 32)),
    "efficientnet_b0": ({}, (1, 3, 32, 32)),
    "densenet121": ({}, (1, 3, 32, 32)),
    "vit_b_16": ({"image_size": 32, "num_layers": 2}, (1, 3, 32, 32)),  # ViT-B/16 blocks; 2 of its 12 keep memory
    "swin_t": ({}, (1, 3, 32, 32)),
    "convnext_tiny": ({}, (1, 3, 32, 32)),
}


def build(name):
    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    if name == "vit_b_16":  # torchvision's vit_b_16 fixes num_layers: the same blocks, built directly
        model = torchvision.models.VisionTransformer(patch_size=16, num_heads=12, hidden_dim=768, mlp_dim=3072,
                                                     **kwargs)
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize(model), shape


def exact(model, teacher, shape):
    """float64 then float32, converting the modules in place (no copies of a teacher of gigabytes). float64
    first: the teacher's own float64 constants (copy weights at fractional ratios) must not have been rounded
    to float32 before. The modules end in float32, as they started."""
    x = [torch.randn(shape)]
    assert compare(model, teacher, x, "cpu", torch.float64, in_place=True).max_rel <= 1e-10
    assert compare(model, teacher, x, "cpu", torch.float32, in_place=True).max_rel <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.25, 1.5, 2.5])
@pytest.mark.parametrize("name", list(MODELS))
def test_fractional_ratios(name, ratio):
    model, shape = build(name)
    res = expand(model, shape, ratio, seed=3)
    back = collapse(res.plan, res.tensors)
    for k, v in model.state_dict().items():
        assert (back[k].double() - v.double()).abs().max() <= 1e-6, k
    del back
    s = res.summary()
    teacher = res.teacher()
    res.tensors.clear()  # the teacher holds the only references: converting it replaces them one by one
    exact(model, teacher, shape)
    assert s["spaces_frozen"] == 0
    assert s["teacher_params"] > (ratio ** 2 * 0.7) * s["student_params"]  # widened by about ratio^2


def perturb_all(teacher: nn.Module, tensors: dict, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g)).add_(0.01 * torch.randn(p.shape, generator=g))
        for k, v in tensors.items():
            if k.startswith("student/") and v.is_floating_point() and "running_var" not in k:
                v.add_(0.01 * torch.randn(v.shape, generator=g))


def extracted_vs_view(model, res, teacher, shape):
    """Float64 relative error between the student `gpd extract` gives and the teacher's student view (the
    teacher is converted to float64 in place)."""
    t64 = teacher.double()
    state = {k: v.detach() for k, v in t64.state_dict().items()}
    state.update({k: v.double() if v.is_floating_point() else v for k, v in res.tensors.items() if k.startswith("student/")})
    state.update({k: v.double() for k, v in res.tensors.items() if k not in state and v.is_floating_point()})
    extracted = copy.deepcopy(model).double()
    extracted.load_state_dict(collapse(res.plan, state), strict=True)
    view = StudentView(t64, res.plan, res.student.gm.double())
    view.load_student_buffers(state)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        a, b = view.eval()(x), extracted.eval()(x)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_branches_exact_then_view_equals_extraction(name):
    model, shape = build(name)
    # Every kind on the CNNs; on the transformers, whose linears dominate, the cheaper low-rank one.
    kinds = "kxk,lowrank" if name in ("vit_b_16", "swin_t", "convnext_tiny") else "1x1,kxk,avg,1x1-kxk,lowrank,full"
    res = expand(model, shape, 2, seed=4, branches=kinds)
    assert res.plan.branches, "no conv or linear got branches"
    teacher = res.teacher()
    exact(model, teacher, shape)
    for k in [k for k in res.tensors if not k.startswith("student/")]:
        del res.tensors[k]  # the teacher module has its own (converted) copies now
    perturb_all(teacher, res.tensors)
    assert extracted_vs_view(model, res, teacher, shape) <= 1e-12
    assert compare(model, teacher, [torch.randn(shape)], "cpu", torch.float64, in_place=True).max_rel > 1e-3


def test_verify_trained_teacher():
    """A perturbed teacher: plain verify fails (IR broken on purpose), --trained passes (CBR holds)."""
    model = randomize(small_cnn(width=8))
    res = expand(model, (2, 3, 16, 16), 2, branches="default")
    assert verify(model, res.plan, res.tensors, device="cpu").passed
    g = torch.Generator().manual_seed(0)
    tensors = {k: v * (1 + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
               for k, v in res.tensors.items()}
    plain = verify(model, res.plan, tensors, device="cpu")
    trained = verify(model, res.plan, tensors, device="cpu", trained=True)
    assert not plain.passed and plain.divergence is not None
    assert trained.passed and not trained.ir_passed
    assert all(c.max_rel <= c.tolerance for c in trained.extraction)


@pytest.mark.parametrize("branches", ["default", "1x1,kxk,avg,1x1-kxk,lowrank,full"])
def test_student_loss_reaches_branch_scales_and_main_weights(branches):
    torch.manual_seed(0)
    model = randomize(small_cnn(width=8))
    res = expand(model, (4, 3, 16, 16), 2, branches=branches)
    teacher = res.teacher()
    view = StudentView(teacher, res.plan, res.student.gm).train()
    loss = nn.functional.cross_entropy(view(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = {n: p.grad for n, p in teacher.named_parameters()}
    scales = [n for n in grads if n.endswith("_scale")]
    assert scales and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in scales)
    mains = [n for n in grads if n.endswith(".weight") and "branch_" not in n and grads[n] is not None]
    assert mains and all(grads[n].abs().sum() > 0 for n in mains)


def test_ratio_one_is_the_identity():
    model = randomize(small_cnn(width=8))
    res = expand(model, (1, 3, 16, 16), 1)
    for k, v in model.state_dict().items():
        assert torch.equal(res.tensors[k], v), k
    assert res.summary()["teacher_params"] == res.summary()["student_params"]


def test_fractional_ratio_rounds_heads_and_groups():
    from gpd_surgery.examples import small_cnn as net

    model = randomize(net(width=16))
    res = expand(model, (1, 3, 16, 16), 1.5)
    teacher = res.teacher()
    assert teacher.stage2.norm.num_groups == 6  # 4 groups x 1.5
    assert teacher.get_submodule("stage1.body.3").groups == 6
    exact(model, teacher, (1, 3, 16, 16))
