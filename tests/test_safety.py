"""Safe and robust I/O: no code from files, validated plans, atomic writes, one-line errors, plan/inspect, memory."""
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from conftest import MODEL, gpd, make_teacher, one_line_error, randomize
from gpd_surgery import api, io as gio, memory
from gpd_surgery.errors import GPDError, PlanError
from gpd_surgery.examples import small_cnn

SMALL = ["--model-arg", "width=4", "--input-shape", "1,3,8,8"]


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def rewrite(src, dst, plan=None, tensors=None, digest=True, meta=None):
    """Copy a teacher with its plan (a dict) or tensors changed; the checksum recomputed unless digest=False."""
    meta = dict(meta_of(src) if meta is None else meta)
    if plan is not None:
        meta[gio.PLAN_KEY] = json.dumps(plan)
        if digest:
            meta[gio.DIGEST_KEY] = gio.plan_digest(meta[gio.PLAN_KEY])
    save_file(load_file(str(src)) if tensors is None else tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    model = make_teacher(d / "t.safetensors")
    weights = d / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return d / "t.safetensors", weights, model


# -- 1. loading ------------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    with open(path, "wb") as f:
        pickle.dump({"stem.0.weight": Evil(str(marker))}, f)
    msg = one_line_error(gpd("expand", MODEL, "--weights", path, *SMALL, "-o", tmp_path / "t.safetensors"))
    assert "weights-only" in msg
    assert not marker.exists() and not (tmp_path / "t.safetensors").exists()


def test_weights_only_state_dict_loads(tmp_path):
    model = randomize(small_cnn(width=4), seed=1)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "t.safetensors"
    assert gpd("expand", MODEL, "--weights", tmp_path / "w.pt", *SMALL, "-o", out).exit_code == 0
    assert gpd("verify", MODEL, out, "--weights", tmp_path / "w.pt", "--device", "cpu").exit_code == 0


# -- 2. plan validation ----------------------------------------------------------------------
def _plan(path):
    return json.loads(meta_of(path)[gio.PLAN_KEY])


def _edit(fn):
    def go(path):
        p = _plan(path)
        fn(p)
        return p
    return go


PLAN_EDITS = {
    "another format version": (_edit(lambda p: p.update(version=4)), "format version 4"),
    "another format": (_edit(lambda p: p.update(format="pickle")), "format is 'pickle'"),
    "index out of range": (_edit(lambda p: next(s for s in p["spaces"].values() if "src" in s)["src"].__setitem__(0, 99)),
                           "indices in 0.."),
    "negative size": (_edit(lambda p: next(iter(p["spaces"].values())).update(size=-4)), "size must be an integer"),
    "huge size": (_edit(lambda p: next(iter(p["spaces"].values())).update(size=10**30)), "size must be an integer"),
    "wrong type": (_edit(lambda p: p["tensors"][0].update(shape="big")), "shape must be a list"),
    "unknown dtype": (_edit(lambda p: p["tensors"][0].update(dtype=["float32"])), "unknown dtype"),
    "recipe shape disagrees": (_edit(lambda p: p["tensors"][0]["shape"].__setitem__(0, 5)), "layout has size"),
    "tensor dropped from plan": (_edit(lambda p: p["tensors"].pop()), "does not describe"),
    "deep layout": (_edit(lambda p: p["tensors"][0]["dims"][0].__setitem__(1, json.loads('{"p":[' * 80 + "0" + "]}" * 80))),
                    "nested too deeply"),
    "layout past int64": (_edit(lambda p: (p["spaces"].update({"999": {"size": 2**62}}),
                                           p["tensors"][0]["dims"][0].__setitem__(1, {"p": [999, 999]}))),
                          "layout sizes beyond"),
    "layout of many parts": (_edit(lambda p: (p["spaces"].update({"999": {"size": 2**62}}),
                                              p["tensors"][0]["dims"][0].__setitem__(1, {"p": [999] * 200_000}))),
                             "layout has more than 4096 parts"),
    "report of wrong type": (_edit(lambda p: p.update(report={"frozen": [1]})), "report.frozen"),
    "not an object": (lambda path: [1, 2], "not a JSON object"),
}


@pytest.mark.parametrize("name", list(PLAN_EDITS))
def test_bad_plans_are_refused(teacher, tmp_path, name):
    t, _, _ = teacher
    edit, expected = PLAN_EDITS[name]
    bad = rewrite(t, tmp_path / "bad.safetensors", plan=edit(t))
    with pytest.raises(PlanError, match=re.escape(expected)):
        gio.load_teacher_file(str(bad))
    msg = one_line_error(gpd("extract", bad, "-o", tmp_path / "s.safetensors"))
    assert expected in msg
    assert not (tmp_path / "s.safetensors").exists()


def test_plan_edited_without_its_checksum_is_refused(teacher, tmp_path):
    t, _, _ = teacher
    p = _plan(t)
    src = next(s for s in p["spaces"].values() if "src" in s)["src"]
    src[0], src[1] = src[1], src[0]  # still a valid map: only the checksum can tell
    bad = rewrite(t, tmp_path / "bad.safetensors", plan=p, digest=False)
    assert "does not match its checksum" in one_line_error(gpd("extract", bad, "-o", tmp_path / "s.safetensors"))
    meta = meta_of(t)
    del meta[gio.DIGEST_KEY]
    bad = rewrite(t, tmp_path / "bad2.safetensors", meta=meta)
    assert "no gpd_plan_sha256 checksum" in one_line_error(gpd("extract", bad, "-o", tmp_path / "s.safetensors"))


def _tensor_edit(fn):
    def go(t):
        tensors = load_file(str(t))
        fn(tensors)
        return tensors
    return go


TENSOR_EDITS = {
    "missing tensor": (_tensor_edit(lambda d: d.pop("stem.0.weight")), "lacks tensors its plan names: 'stem.0.weight'"),
    "extra tensor": (_tensor_edit(lambda d: d.update(extra=torch.zeros(2))), "does not describe: 'extra'"),
    "shape": (_tensor_edit(lambda d: d.update({"stem.0.weight": d["stem.0.weight"][:3].contiguous()})),
              "tensor 'stem.0.weight' is [3, 3, 3, 3] float32, the plan expects [8, 3, 3, 3] float32"),
    "dtype": (_tensor_edit(lambda d: d.update({"head.2.bias": d["head.2.bias"].double()})),
              "tensor 'head.2.bias' is [10] float64, the plan expects [10] float32"),
    "student buffer": (_tensor_edit(lambda d: d.pop("student/stem.1.running_mean")), "student/stem.1.running_mean"),
}


@pytest.mark.parametrize("name", list(TENSOR_EDITS))
def test_tensors_that_disagree_with_the_plan_are_refused(teacher, tmp_path, name):
    t, _, _ = teacher
    edit, expected = TENSOR_EDITS[name]
    bad = rewrite(t, tmp_path / "bad.safetensors", tensors=edit(t))
    assert expected in one_line_error(gpd("extract", bad, "-o", tmp_path / "s.safetensors"))


def _cut(data):
    return data[: len(data) // 2]


def _bad_header_length(data):
    return (len(data) * 4).to_bytes(8, "little") + data[8:]


def _not_json(data):
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"#" + data[9 : 8 + n] + data[8 + n :]


BAD_FILES = {
    "empty": lambda data: b"",
    "truncated": _cut,
    "header length past the end": _bad_header_length,
    "header not JSON": _not_json,
    "not safetensors at all": lambda data: b"PK\x03\x04 this is a zip, or anything else" * 10,
    "pickle": lambda data: pickle.dumps({"a": 1}),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_damaged_files_are_refused(teacher, tmp_path, name):
    t, _, _ = teacher
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BAD_FILES[name](t.read_bytes()))
    with pytest.raises(PlanError):
        gio.load_teacher_file(str(bad))
    for cmd in (["extract", bad, "-o", tmp_path / "s.safetensors"], ["inspect", bad],
                ["verify", MODEL, bad, "--device", "cpu"]):
        assert re.search("not a safetensors file|is truncated", one_line_error(gpd(*cmd)))


def test_a_student_file_is_not_a_teacher(teacher, tmp_path):
    _, weights, _ = teacher
    assert "carries no gpd plan" in one_line_error(gpd("extract", weights, "-o", tmp_path / "s.safetensors"))


def test_nasty_plan_texts():
    nasty = ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "1" * 10_000, "NaN",
             '{"format":"gpd-surgery/teacher","version":true}', "\udcff", ""]
    for text in nasty:
        with pytest.raises(PlanError):
            gio.Plan.from_json(text)
    with pytest.raises(PlanError, match="JSON text"):
        gio.Plan.from_json(b"{}")


def test_verify_refuses_a_teacher_of_another_architecture(teacher, tmp_path):
    t, _, _ = teacher
    msg = one_line_error(gpd("verify", MODEL, t, "--model-arg", "width=8", "--device", "cpu"))
    assert "not made from" in msg


# -- 3. atomic writes -------------------------------------------------------------------------
def test_writer_matches_safetensors_byte_for_byte(tmp_path):
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(5), "b": torch.tensor([True, False]),
               "h": torch.randn(2, dtype=torch.bfloat16), "e": torch.empty(0, 2, dtype=torch.float16)}
    gio.atomic_save(tensors, str(tmp_path / "x.safetensors"), {"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == save(tensors, {"k": "v"})
    assert os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize("durable", [False, True])
def test_durable_saves_fsync_before_naming(tmp_path, monkeypatch, durable):
    """--durable: the data and the directory entry are fsynced, the data before the file has its name."""
    path = tmp_path / "x.safetensors"
    events = []
    real = os.fsync

    def fsync(fd):
        events.append(("fsync", path.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tensors = {"w": torch.randn(64, 64)}
    gio.atomic_save(tensors, str(path), durable=durable)
    assert path.read_bytes() == save(tensors)
    assert events == ([("fsync", False), ("fsync", True)] if durable else [])


def _fail_midway(monkeypatch, after=2):
    """Make the writer raise after it has written part of the file."""
    real = gio.write_safetensors

    def write(f, tensors, metadata, durable=False):
        first = dict(list(tensors.items())[:after])
        real(f, first, metadata, durable)
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio, "write_safetensors", write)


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_a_failed_write_leaves_nothing(teacher, tmp_path, monkeypatch, unnamed):
    t, _, _ = teacher
    if not unnamed:
        monkeypatch.setattr(gio, "_save_unnamed", lambda *a: False)
    out = tmp_path / "out"
    out.mkdir()
    _fail_midway(monkeypatch)
    msg = one_line_error(gpd("extract", t, "-o", out / "s.safetensors"))
    assert msg == f"error: cannot write {out / 's.safetensors'}: No space left on device"
    assert os.listdir(out) == []
    # With --force over an existing file, the old file stays whole.
    (out / "s.safetensors").write_bytes(b"old")
    assert gpd("extract", t, "-o", out / "s.safetensors", "--force").exit_code == 2
    assert os.listdir(out) == ["s.safetensors"] and (out / "s.safetensors").read_bytes() == b"old"
    monkeypatch.undo()
    if not unnamed:
        monkeypatch.setattr(gio, "_save_unnamed", lambda *a: False)
    assert gpd("extract", t, "-o", out / "s.safetensors", "--force").exit_code == 0
    assert os.listdir(out) == ["s.safetensors"]
    mode = stat.S_IMODE(os.stat(out / "s.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from gpd_surgery import io
    real = io.write_safetensors
    def slow(f, tensors, metadata, durable=False):
        real(f, dict(list(tensors.items())[:1]), metadata, durable)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
    io.write_safetensors = slow
    from gpd_surgery.cli import main
    sys.argv = ["gpd"] + sys.argv[1:]
    main()
""")


def test_sigkill_during_the_write_leaves_nothing(tmp_path):
    """The process is killed while the file is half written: no output, no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), "expand", MODEL, *SMALL, "-o", str(out / "t.safetensors")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing", p.stderr.read()
        # The half-written file exists (open in the process) but has no name in the directory.
        open_files = [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")]
        assert any(f.startswith(str(out)) for f in open_files), open_files
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert os.listdir(out) == []


def _file_being_written(pid, folder):
    """Size of the file that process ``pid`` has open in ``folder``, or None."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_size
    except OSError:
        pass  # the process or the descriptor went away meanwhile
    return None


@pytest.mark.slow
def test_sigkill_while_writing_a_large_teacher(tmp_path):
    """The real writer, unpatched: resnet50 x2 (about 400 MB) killed once its file is partly written."""
    out = tmp_path / "t.safetensors"
    p = subprocess.Popen([sys.executable, "-m", "gpd_surgery", "expand", "torchvision:resnet50",
                          "--input-shape", "1,3,32,32", "-o", str(out)], stderr=subprocess.PIPE)
    size = None
    try:
        while p.poll() is None and not size:
            size = _file_being_written(p.pid, tmp_path)
            time.sleep(0.001)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert size, f"the write was not caught in progress: {p.stderr.read()[-300:]!r}"
    assert os.listdir(tmp_path) == []


# -- 4. clear errors ----------------------------------------------------------------------------
def test_missing_file_and_directory(teacher, tmp_path):
    t, _, _ = teacher
    missing = tmp_path / "nope.safetensors"
    assert "does not exist" in one_line_error(gpd("extract", missing, "-o", tmp_path / "s.safetensors"))
    assert "does not exist" in one_line_error(gpd("inspect", missing))
    assert "does not exist" in one_line_error(gpd("verify", MODEL, missing))
    assert "does not exist" in one_line_error(gpd("expand", MODEL, "--weights", missing, *SMALL, "-o", tmp_path / "t"))
    assert "does not exist" in one_line_error(gpd("expand", tmp_path / "m.pt", "-o", tmp_path / "t"))
    assert "not a file" in one_line_error(gpd("extract", tmp_path, "-o", tmp_path / "s.safetensors"))
    assert "not a file" in one_line_error(gpd("inspect", tmp_path))
    assert "not a file" in one_line_error(gpd("plan", MODEL, "--weights", tmp_path, *SMALL))
    (tmp_path / "m.pt").mkdir()
    assert "is not a file" in one_line_error(gpd("plan", tmp_path / "m.pt", "--trust-pickle"))
    assert "is a directory" in one_line_error(gpd("extract", t, "-o", tmp_path))
    assert "output directory" in one_line_error(gpd("extract", t, "-o", tmp_path / "no" / "s.safetensors"))


@pytest.mark.parametrize("spec,expected", [
    ("nosuchthing", "unknown MODEL spec 'nosuchthing'"),
    ("torchvision:nosuchnet", "torchvision has no model 'nosuchnet'"),
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("gpd_surgery.examples:nosuch", "has no attribute 'nosuch'"),
    ("gpd_surgery.examples:__doc__", "is not callable"),
])
def test_unknown_model_spec(tmp_path, spec, expected):
    assert expected in one_line_error(gpd("plan", spec))
    assert expected in one_line_error(gpd("expand", spec, "-o", tmp_path / "t.safetensors"))


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module of user models importable as user_models_<n>:NAME."""
    name = f"user_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)

            def forward(self, x):
                y = self.conv(x)
                if y.sum() > 0:
                    y = y * 2
                return y

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 3, 1), Gate())

            def forward(self, x):
                return self.body(x)

        def gated():
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_untraceable_model_names_the_line_and_the_way_out(user_models, tmp_path):
    for cmd in (["plan", f"{user_models}:gated", "--input-shape", "1,3,8,8"],
                ["expand", f"{user_models}:gated", "--input-shape", "1,3,8,8", "-o", tmp_path / "t.safetensors"]):
        msg = one_line_error(gpd(*cmd))
        assert "torch.fx cannot trace" in msg
        assert f"{user_models}.py:12 (if y.sum() > 0:)" in msg
        assert "make the control flow static" in msg
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("ratio", ["0.5", "-1", "0", "nan", "inf", "-inf", "1e999", "abc", ""])
def test_bad_ratio(tmp_path, ratio):
    for cmd in (["expand", MODEL, "--ratio", ratio, "-o", tmp_path / "t.safetensors"], ["plan", MODEL, "--ratio", ratio]):
        msg = one_line_error(gpd(*cmd))
        assert "ratio" in msg and ("finite number >= 1" in msg or "not a number" in msg)
    assert os.listdir(tmp_path) == []


def test_input_shape_the_model_rejects(tmp_path):
    msg = one_line_error(gpd("expand", MODEL, "--input-shape", "1,4,8,8", "-o", tmp_path / "t.safetensors"))
    assert "rejects an input of shape (1, 4, 8, 8)" in msg and "expected input[1, 4, 8, 8] to have 3 channels" in msg
    assert "not a comma-separated list" in one_line_error(gpd("plan", MODEL, "--input-shape", "1,3,a,8"))
    assert "positive sizes" in one_line_error(gpd("plan", MODEL, "--input-shape", "1,3,0,8"))
    assert os.listdir(tmp_path) == []


def test_weights_that_do_not_fit(tmp_path):
    save_file(small_cnn(width=8).state_dict(), str(tmp_path / "w8.safetensors"))
    msg = one_line_error(gpd("expand", MODEL, "--weights", tmp_path / "w8.safetensors", *SMALL, "-o", tmp_path / "t"))
    assert "do not fit the model: stem.0.weight is [8, 3, 3, 3] but the model has [4, 3, 3, 3]" in msg
    state = small_cnn(width=4).state_dict()
    state.pop("head.2.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    msg = one_line_error(gpd("plan", MODEL, "--weights", tmp_path / "w.safetensors", *SMALL))
    assert "missing head.2.bias; unexpected extra.weight" in msg


def test_factory_errors_are_user_errors():
    msg = one_line_error(gpd("plan", MODEL, "--model-arg", "width=-3"))
    assert "could not be built with {'width': -3}" in msg
    assert "is not KEY=VALUE" in one_line_error(gpd("plan", MODEL, "--model-arg", "width"))
    assert "rejected the model arguments" in one_line_error(gpd("plan", MODEL, "--model-arg", "depth=3"))


@pytest.mark.parametrize("cmd", ["expand", "verify", "extract", "plan", "inspect"])
def test_debug_shows_the_traceback(tmp_path, cmd):
    missing = str(tmp_path / "missing.safetensors")
    args = {"expand": [MODEL, "--weights", missing, "-o", str(tmp_path / "t")], "verify": [MODEL, missing],
            "extract": [missing, "-o", str(tmp_path / "s")], "plan": [MODEL, "--weights", missing],
            "inspect": [missing]}[cmd]
    r = gpd(cmd, *args)
    one_line_error(r)
    r = gpd(cmd, *args, "--debug")
    assert isinstance(r.exception, GPDError) and "does not exist" in str(r.exception)


def test_debug_traceback_in_a_real_process(tmp_path):
    cmd = [sys.executable, "-m", "gpd_surgery", "inspect", str(tmp_path / "missing")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1
    assert "Traceback" in loud.stderr and "GPDError" in loud.stderr


def test_internal_errors_are_one_line_too(monkeypatch):
    def boom(*a, **k):
        raise ValueError("internal: unifying sizes 3 and 4 at add")

    monkeypatch.setattr(api, "plan_expansion", boom)
    msg = one_line_error(gpd("plan", MODEL, *SMALL), code=3)
    assert "internal error: ValueError: internal: unifying sizes" in msg and "--debug" in msg


def test_hostile_names_stay_one_inert_line(tmp_path):
    """Markup and terminal control characters from paths or files are shown escaped, never interpreted."""
    bad = tmp_path / "[/]\x1b[31m\nred[bold]"
    r = gpd("inspect", bad)
    msg = one_line_error(r)
    assert "\x1b" not in r.output and "\\x1b[31m\\nred[bold]" in msg


# -- 5. gpd plan and gpd inspect -----------------------------------------------------------------
def test_plan_is_a_dry_run_that_matches_expand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = gpd("plan", MODEL, *SMALL, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert os.listdir(tmp_path) == []
    r = gpd("expand", MODEL, *SMALL, "-o", "t.safetensors", "--json")
    done = json.loads(r.output)
    for k in ("student_params", "teacher_params", "teacher_bytes", "spaces_expanded", "spaces_frozen"):
        assert rep[k] == done[k], k
    assert rep["teacher_bytes"] == sum(v.numel() * v.element_size() for v in load_file("t.safetensors").values())
    assert rep["build_bytes"] >= rep["teacher_bytes"]
    expanded = [s for s in rep["spaces"] if s["status"] == "expanded"]
    assert len(expanded) == rep["spaces_expanded"] and all(s["expanded_size"] == 2 * s["size"] for s in expanded)
    stem = next(s for s in expanded if any(u["node"] == "stem_0" for u in s["used_by"]))
    assert {"stem_1", "stage1_body_0"} <= {u["node"] for u in stem["used_by"]}
    assert any(s["status"] == "frozen" and "graph boundary" in s["reason"] for s in rep["spaces"])


def test_plan_says_what_froze_and_why(tmp_path, monkeypatch):
    name = f"shuffled_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        @torch.fx.wrap
        def shuffle(x, w):  # a function fx keeps as one call, that no rule can know
            return x.flip(1) * w

        class Shuffled(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)
                self.w = nn.Parameter(torch.ones(1))  # read by the op: it cannot run at the student's width

            def forward(self, x):
                return self.c(torch.relu(self.b(shuffle(self.a(x), self.w))))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = gpd("plan", f"{name}:Shuffled", "--input-shape", "1,3,8,8", "--json")
    rep = json.loads(r.output)
    op = f"{name}.shuffle"
    frozen = [s for s in rep["spaces"] if s["status"] == "frozen" and op in s["reason"]]
    assert len(frozen) == 1 and frozen[0]["size"] == 8 and frozen[0]["expanded_size"] == 8
    assert {u["node"] for u in frozen[0]["used_by"]} == {"a", "shuffle"}
    expanded = [s for s in rep["spaces"] if s["status"] == "expanded"]
    assert [(s["size"], s["expanded_size"]) for s in expanded] == [(8, 16)]
    assert rep["unsupported_ops"] == [op] and rep["spaces_frozen"] == 1
    r = gpd("plan", f"{name}:Shuffled", "--input-shape", "1,3,8,8")
    assert r.exit_code == 0 and "frozen: unsupported op" in r.output and "teacher parameters" in r.output


def test_inspect_teacher_and_student(teacher, tmp_path):
    t, weights, model = teacher
    r = gpd("inspect", t, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    tensors = load_file(str(t))
    assert rep["kind"] == "teacher" and rep["format"] == "gpd-surgery/teacher v3" and rep["ratio"] == 2
    assert rep["source"]["model_args"] == {"width": 4} and rep["tensors"] == len(tensors)
    assert rep["tensor_bytes"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert rep["student_params"] == sum(p.numel() for p in model.parameters())
    assert rep["teacher_params"] == sum(tensors[k].numel() for k, _ in model.named_parameters())
    assert rep["student_tensors"] == len(model.state_dict())
    r = gpd("inspect", t)
    assert r.exit_code == 0 and "gpd teacher" in r.output and "spaces" in r.output
    r = gpd("inspect", weights, "--json")
    rep = json.loads(r.output)
    state = model.state_dict()
    assert rep["kind"] == "tensors" and rep["tensors"] == len(state)
    assert rep["values"] == sum(v.numel() for v in state.values())
    assert rep["dtypes"] == {"float32": len(state) - 3, "int64": 3}


def test_inspect_refuses_a_bad_teacher(teacher, tmp_path):
    t, _, _ = teacher
    bad = rewrite(t, tmp_path / "bad.safetensors", tensors=TENSOR_EDITS["dtype"][0](t))
    assert "the plan expects" in one_line_error(gpd("inspect", bad))


# -- 6. memory guard ---------------------------------------------------------------------------
def test_memory_guard_refuses_unless_forced(tmp_path, monkeypatch):
    out = tmp_path / "t.safetensors"
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    msg = one_line_error(gpd("expand", MODEL, *SMALL, "-o", out))
    assert "needs about" in msg and "only 9.8 KiB is free" in msg and "--force" in msg
    assert not out.exists()
    r = gpd("expand", MODEL, *SMALL, "-o", out, "--force", "--json")
    assert r.exit_code == 0, r.output
    need = api.plan_expansion(small_cnn(width=4), (1, 3, 8, 8), force=True).build_bytes()
    assert need >= json.loads(r.output)["teacher_bytes"] > 10_000
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    assert gpd("expand", MODEL, *SMALL, "-o", out, "--force").exit_code == 0


def test_available_memory_is_read():
    free = memory.available_bytes()
    assert free is None or 0 < free
    if os.path.exists("/proc/meminfo"):
        assert free is not None and free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
