import gc
import math
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter and buffer (BatchNorm variances stay positive) so that no zero hides a bug."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("running_mean"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        else:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every weight, bias and BatchNorm statistic with random values (variances positive, dense
    weights scaled by their fan-in), so that no zero-initialised tensor hides a bug."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if name.endswith("running_var"):
            r = r.abs() + 0.5
        elif t.dim() >= 2:
            r = r / math.sqrt(t[0].numel())
        t.copy_(r)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core runner: thread hand-offs cost far more than the arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    gc.collect()


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(autouse=True)
def _collect_garbage():
    """fx graphs hold reference cycles: free each test's teacher before the next allocates its own."""
    yield
    gc.collect()
