"""The fast paths of expand and collapse give exactly what the plain index-based algorithm gives."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from gpd_surgery import expand
from gpd_surgery.collapsing import collapse, collapse_tensor
from gpd_surgery.expansion import expand_tensor, split_among_copies
from gpd_surgery.maps import Maps, leaf_src
from gpd_surgery.layout import Cat, Prod
from gpd_surgery.plan import Recipe
from gpd_surgery.verification import verify

from conftest import randomize


# -- reference implementations: the index-based algorithm, one index pass per rank -----------------------
def split_reference(t, d, src, g):
    count = torch.bincount(src, minlength=t.shape[d])
    view = [1] * t.dim()
    view[d] = -1
    if g is None:
        return t.index_select(d, src) / count[src].to(t.dtype).view(view)
    order = torch.argsort(src, stable=True)
    starts = torch.cumsum(count, 0) - count
    rank = torch.empty_like(src)
    rank[order] = torch.arange(len(src)) - starts[src[order]]
    left = count[src] - rank
    frac = torch.where(left > 1, 0.5 + 0.5 * torch.rand(len(src), generator=g, dtype=torch.float64), 1.0)
    out = t.new_empty(t.shape[:d] + (len(src),) + t.shape[d + 1:])
    rest = t.clone()
    for k in range(int(count.max())):
        cols = (rank == k).nonzero().squeeze(1)
        ch = src[cols]
        part = rest.index_select(d, ch) * frac[cols].to(t.dtype).view(view)
        out.index_copy_(d, cols, part)
        rest.index_add_(d, ch, part, alpha=-1)
    return out


def expand_reference(t, recipe, maps, seed):
    out = t
    for d, lay, mode in recipe.dims:
        src = maps.src(lay)
        if mode == "share" and out.is_floating_point():
            g = None if seed is None else torch.Generator().manual_seed(seed + d)
            out = split_reference(out, d, src, g)
        else:
            out = out.index_select(d, src)
    return out


def collapse_reference(t, recipe, maps):
    """Copies summed in reverse teacher order (last copy first), canonical copies by index."""
    out = t
    for d, lay, mode in recipe.dims:
        if mode == "share":
            src = maps.src(lay)
            back = torch.arange(len(src) - 1, -1, -1)
            shape = list(out.shape)
            shape[d] = maps.size(lay)
            out = out.new_zeros(shape).index_add(d, src[back], out.index_select(d, back))
        else:
            out = out.index_select(d, maps.canon(lay))
    return out


def _maps(ratio, sizes=(6, 5, 4), seed=3):
    leaves = {i: (n, leaf_src(n, ratio, seed, i)) for i, n in enumerate(sizes)}
    leaves[9] = (3, None)  # a frozen space
    return Maps(leaves)


LAYOUTS = [0, 1, Prod((0, 9)), Prod((9, 1)), Cat((0, 2)), Cat((9, 1))]



@pytest.mark.parametrize("ratio", [2, 3, 4, 1.5, 2.5])
@pytest.mark.parametrize("equal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_expand_tensor_matches_reference_bit_for_bit(ratio, equal, dtype):
    maps = _maps(ratio)
    g = torch.Generator().manual_seed(int(ratio * 10))
    for rows in LAYOUTS:
        for cols in LAYOUTS:
            for modes in [("copy", "share"), ("copy", "copy"), ("share", "copy"), ("share", "share")]:
                shape = (maps.size(rows), maps.size(cols), 2)
                t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
                dims = [(d, lay, m) for d, (lay, m) in enumerate(zip((rows, cols), modes)) if maps.src(lay) is not None]
                r = Recipe("w", "param", shape, "float32", True, dims)
                seed = None if equal else 1234
                got, want = expand_tensor(t, r, maps, seed), expand_reference(t, r, maps, seed)
                assert got.shape == want.shape and torch.equal(got, want), (rows, cols, modes)
                assert got.is_contiguous()


def test_split_writes_into_a_view():
    src = torch.arange(4).repeat(2)
    t = torch.randn(3, 4, dtype=torch.float64)
    big = torch.zeros(6, 8, dtype=torch.float64)
    split_among_copies(t, 1, src, torch.Generator().manual_seed(0), out=big[:3])
    assert torch.equal(big[:3], split_reference(t, 1, src, torch.Generator().manual_seed(0)))
    assert torch.equal(big[3:], torch.zeros(3, 8, dtype=torch.float64))


def test_expand_leaves_the_student_alone_and_integer_tensors_are_copied():
    maps = _maps(2)
    t = torch.randn(6, 5)
    before = t.clone()
    expand_tensor(t, Recipe("w", "param", (6, 5), "float32", True, [(0, 0, "copy"), (1, 1, "share")]), maps, 7)
    assert torch.equal(t, before)
    i = torch.arange(30).view(6, 5)
    out = expand_tensor(i, Recipe("i", "buffer", (6, 5), "int64", True, [(1, 1, "share")]), maps, 7)
    assert torch.equal(out, i.index_select(1, maps.src(1)))


@pytest.mark.parametrize("ratio", [2, 3, 4, 1.5, 2.5])
def test_collapse_tensor_matches_reference_and_gradients(ratio):
    maps = _maps(ratio)
    g = torch.Generator().manual_seed(5)
    for rows in LAYOUTS:
        for cols in LAYOUTS:
            for modes in [("copy", "share"), ("share", "copy"), ("share", "share"), ("copy", "copy")]:
                dims = [(d, lay, m) for d, (lay, m) in enumerate(zip((rows, cols), modes)) if maps.src(lay) is not None]
                shape = (maps.tsize(rows), maps.tsize(cols))
                r = Recipe("w", "param", (maps.size(rows), maps.size(cols)), "float64", True, dims)
                t1 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
                t2 = t1.detach().clone().requires_grad_()
                a, b = collapse_tensor(t1, r, maps), collapse_reference(t2, r, maps)
                assert torch.equal(a, b), (rows, cols, modes)
                w = torch.randn(a.shape, generator=g, dtype=torch.float64)
                (a * w).sum().backward()
                (b * w).sum().backward()
                assert torch.equal(t1.grad, t2.grad), (rows, cols, modes)
                with torch.no_grad():  # without autograd: a tensor of its own, not a view of the teacher's
                    c = collapse_tensor(t1.detach(), r, maps)
                assert c._base is None or c._base is not t1.detach()._base


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        x = torch.relu(self.bn(self.c2(torch.relu(self.c1(x)))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("ratio", [2, 3, 4, 2.5, 1.5])
def test_random_shares_collapse_back_bit_for_bit_at_any_copy_count(ratio):
    """The copies are summed last copy first, so every remainder comes back exactly."""
    model = randomize(_Net(), seed=1)
    res = expand(model, (1, 3, 4, 4), ratio=ratio, seed=11)
    back = collapse(res.plan, res.tensors)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_verify_vit_with_extraction_check():
    """The student view of a model with graph-level parameters (class token) can be deep-copied."""
    m = randomize(torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                       hidden_dim=8, mlp_dim=16, num_classes=3))
    res = expand(m, (1, 3, 16, 16), ratio=2)
    report = verify(m, res.plan, res.tensors, (1, 3, 16, 16), device="cpu", n_inputs=1)
    assert report.passed and report.extraction


def test_verify_holds_one_teacher_at_a_time(monkeypatch):
    """verify never deep-copies a teacher (a float64 copy of a large teacher is gigabytes): at any moment it
    holds the file's tensors and one teacher in the dtype it checks. The copies it makes are students."""
    m = randomize(torchvision.models.resnet18(num_classes=5))
    res = expand(m, (1, 3, 32, 32), ratio=2)
    student_n = sum(p.numel() for p in m.parameters())
    copied, real = [], copy.deepcopy

    def deepcopy(obj, *a):
        if isinstance(obj, nn.Module):
            copied.append(sum(p.numel() for p in obj.parameters()))
        return real(obj, *a)

    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    report = verify(m, res.plan, res.tensors, (1, 3, 32, 32), device="cpu", n_inputs=1)
    assert report.passed and len(report.extraction) == 2
    assert copied and max(copied) <= student_n, (copied, student_n)
    for t in res.tensors.values():  # the file's tensors are read, never cast in place
        assert t.dtype in (torch.float32, torch.int64)


def test_student_view_deepcopy_and_forward():
    from gpd_surgery.student_view import StudentView

    m = randomize(torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                       hidden_dim=8, mlp_dim=16, num_classes=3))
    res = expand(m, (1, 3, 16, 16), ratio=2)
    view = StudentView(res.teacher(), res.plan, res.student.gm)
    view.load_student_buffers(res.tensors)
    x = torch.randn(2, 3, 16, 16)
    y = copy.deepcopy(view)(x)
    assert torch.allclose(y, m(x), rtol=1e-5, atol=1e-6)
    assert not list(view.student.parameters())
