"""Fixtures and the helpers every test module shares (test modules import from here, never from each other)."""
import gc
import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

MODEL = "gpd_surgery.examples:small_cnn"  # the built-in example student: no downloads
_runner = CliRunner()


def gpd(*args, catch_exceptions: bool = True, env: dict | None = None):
    """Run the ``gpd`` command line in this process (typer's CliRunner); arguments may be paths."""
    from gpd_surgery.cli import app

    return _runner.invoke(app, [str(a) for a in args], catch_exceptions=catch_exceptions, env=env)


def one_line_error(r, code=2):
    """Exit ``code``, a single ``error:`` line, no traceback: what every bad input must get."""
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return lines[0]


def make_teacher(path, width=4, seed=0, branches=(), shape=(1, 3, 8, 8)):
    """A small valid teacher file (small_cnn, random weights, x2) at ``path``, and the student it came from."""
    from gpd_surgery import api
    from gpd_surgery.examples import small_cnn

    torch.manual_seed(seed)
    model = randomize(small_cnn(width=width), seed=seed)
    source = {"model": MODEL, "model_args": {"width": width}, "input_shape": list(shape)}
    api.expand(model, shape, 2.0, source=source, branches=branches).save(str(path))
    return model


def rewrite_teacher(src, dst, plan_edit=None, tensors_edit=None, digest=True):
    """Copy a teacher file with its plan (a dict, edited in place by ``plan_edit``) or its tensors (a dict,
    edited by ``tensors_edit``) changed; the plan's checksum recomputed unless ``digest`` is False."""
    from gpd_surgery import io as gio

    meta, _ = gio.read_header(str(src))
    tensors = gio.read_tensors(str(src))
    if plan_edit is not None:
        obj = json.loads(meta[gio.PLAN_KEY])
        obj = plan_edit(obj) or obj
        meta = {**meta, gio.PLAN_KEY: json.dumps(obj)}
        if digest:
            meta[gio.DIGEST_KEY] = gio.plan_digest(meta[gio.PLAN_KEY])
    if tensors_edit is not None:
        tensors = tensors_edit(tensors) or tensors
    if os.path.lexists(dst):
        os.unlink(dst)
    gio.atomic_save(tensors, str(dst), meta)
    return dst

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


@pytest.fixture(scope="session", autouse=True)
def _freeze_imports():
    """What exists when the first test starts (torch, timm, transformers, the test modules: ~500k objects) is
    moved out of the collector's sight, so that each test's collection below scans only what tests made:
    0.3 s a test otherwise, minutes over the suite."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _collect_garbage():
    """fx graphs hold reference cycles: free each test's teacher before the next allocates its own."""
    yield
    gc.collect()


def run_limited(args: list[str], memory: int = 1 << 30, seconds: float = 20.0, cwd: str | None = None
                ) -> tuple[int, str]:
    """Run ``gpd ARGS`` in a forked child whose address space may grow by at most ``memory`` bytes beyond
    what it starts with, killed after ``seconds``: (exit code, stdout + stderr). A child killed for time
    returns -9 (a test then fails on the code); one that hits the memory limit sees allocation failures."""
    import resource
    import signal
    import sys
    import tempfile
    import time

    out = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 70
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)  # pytest's capture replaced the streams: back to fd 1, 2
            sys.stderr = open(2, "w", closefd=False)
            if cwd:
                os.chdir(cwd)
            torch.set_num_threads(1)
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
            from gpd_surgery.cli import app

            sys.argv = ["gpd", *map(str, args)]
            try:
                app(prog_name="gpd")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -9
            break
        time.sleep(0.02)
    out.seek(0)
    text = out.read().decode(errors="replace")
    code = status if status == -9 else (os.waitstatus_to_exitcode(status))
    return code, text


def write_images(root, classes=2, per_class=4, size=8):
    """An image folder ``root/classK/N.png`` of random RGB images (PIL ships with torchvision)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(d / f"{i}.png")
