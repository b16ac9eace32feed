"""The output writer never replaces a file without --force: not one that appeared while the output was being
built (another run), not a dangling symlink; never writes into a device, FIFO or socket, even with --force; and
the one atomic writer serves safetensors files and torch.save alike."""
import errno
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpd_surgery import api
from gpd_surgery import io as gio
from gpd_surgery.cli import app
from gpd_surgery.errors import GPDError
from gpd_surgery.examples import small_cnn

MODEL = "gpd_surgery.examples:small_cnn"
SMALL = ["--input-shape", "1,3,16,16", "--model-arg", "width=4"]
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


def gpd(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "t.safetensors"
    api.expand(small_cnn(width=4).eval(), (1, 3, 16, 16), 2.0, source={"model": MODEL}).save(str(path))
    return path


@pytest.fixture(params=["O_TMPFILE", "named-temp"])
def writer(request, monkeypatch):
    """Both ways of writing: the unnamed file (Linux) and the named temporary file (elsewhere)."""
    if request.param == "named-temp":
        monkeypatch.setattr(gio, "_save_unnamed", lambda *a: False)
    return request.param


def _appear_during(monkeypatch, obj, name, path, content=b"another run's output"):
    """Make ``obj.name`` create ``path`` when called: a file that appears after the existence check, before the
    output is written (a second run writing the same -o)."""
    real = getattr(obj, name)

    def late(*args, **kwargs):
        result = real(*args, **kwargs)
        path.write_bytes(content)
        return result

    monkeypatch.setattr(obj, name, late)


def _names(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("command", ["extract", "expand"])
def test_an_output_that_appears_meanwhile_is_not_replaced(teacher, tmp_path, monkeypatch, writer, command):
    out = tmp_path / "out.safetensors"
    if command == "extract":
        _appear_during(monkeypatch, api, "extract", out)
        args = ["extract", teacher, "-o", out]
    else:
        _appear_during(monkeypatch, api.Planned, "build", out)
        args = ["expand", MODEL, *SMALL, "-o", out]
    msg = one_line_error(gpd(*args))
    assert msg == f"error: output {out} exists: pass --force to overwrite it"
    assert out.read_bytes() == b"another run's output"
    assert _names(tmp_path) == ["out.safetensors"]  # no temporary file left either
    # With --force the same race replaces it, complete.
    r = gpd(*args, "--force")
    assert r.exit_code == 0, r.output
    assert load_file(str(out)) and _names(tmp_path) == ["out.safetensors"]


def test_a_dangling_symlink_is_an_existing_output(teacher, tmp_path, writer):
    out = tmp_path / "s.safetensors"
    out.symlink_to(tmp_path / "nowhere")
    msg = one_line_error(gpd("extract", teacher, "-o", out))
    assert msg == f"error: output {out} exists: pass --force to overwrite it"
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    # --force replaces the link itself, not its target.
    assert gpd("extract", teacher, "-o", out, "--force").exit_code == 0
    assert not out.is_symlink() and load_file(str(out)) and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "device"])
def test_a_special_file_is_refused_even_with_force(teacher, tmp_path, kind):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = {"fifo": fifo, "link-to-fifo": tmp_path / "link", "device": "/dev/null"}[kind]
    if kind == "link-to-fifo":
        out.symlink_to(fifo)
    for force in ([], ["--force"]):
        msg = one_line_error(gpd("extract", teacher, "-o", out, *force))
        assert msg == f"error: output {out} is not a regular file (a device, FIFO or socket): gpd does not write to it"
    assert fifo.is_fifo() and os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_the_api_does_not_overwrite_unless_asked(tmp_path, writer):
    path = tmp_path / "x.safetensors"
    gio.atomic_save({"w": torch.ones(2)}, str(path))
    with pytest.raises(GPDError, match="exists: pass --force"):
        gio.atomic_save({"w": torch.zeros(2)}, str(path))
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    gio.atomic_save({"w": torch.zeros(2)}, str(path), overwrite=True)
    assert torch.equal(load_file(str(path))["w"], torch.zeros(2))
    res = api.expand(small_cnn(width=4).eval(), (1, 3, 16, 16), 2.0)
    res.save(str(tmp_path / "t.safetensors"))
    with pytest.raises(GPDError, match="exists"):
        res.save(str(tmp_path / "t.safetensors"))
    res.save(str(tmp_path / "t.safetensors"), overwrite=True)
    assert _names(tmp_path) == ["t.safetensors", "x.safetensors"]


def test_one_writer_for_torch_save(tmp_path, writer):
    """torch.save goes through the same atomic writer: complete file, usual permissions, nothing else left."""
    path = tmp_path / "state.pt"
    gio.atomic_write(str(path), lambda f: torch.save({"a": torch.arange(3)}, f), durable=True)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(GPDError, match="exists"):
        gio.atomic_write(str(path), lambda f: torch.save({}, f))
    gio.atomic_write(str(path), lambda f: torch.save({"a": 1}, f), overwrite=True)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert _names(tmp_path) == ["state.pt"]


def test_no_hard_links_is_a_clear_error(tmp_path, monkeypatch):
    """Where O_TMPFILE is missing and the file system has no hard links, a safe write without --force is not
    possible: one line that says so and what to do, nothing left behind."""
    monkeypatch.setattr(gio, "_save_unnamed", lambda *a: False)

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(GPDError, match="no hard links.*pass --force"):
        gio.atomic_save({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert _names(tmp_path) == []
    gio.atomic_save({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"), overwrite=True)
    assert _names(tmp_path) == ["x.safetensors"]
