"""`gpd train` hardening: a kill at any point of a checkpoint leaves no temporary file and a run that --resume
continues exactly; a malformed train_state.pt, a NaN starting teacher, a corrupt image, a decompression bomb and
a symlink loop in the data folder are each one clear line (exit 2) or a warning, never a crash."""
import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from safetensors.torch import save_file

from conftest import MODEL, gpd, one_line_error, write_images
from gpd_surgery import api
from gpd_surgery.examples import small_cnn
from gpd_surgery.io import save_teacher
from gpd_surgery.plan import STUDENT_PREFIX
from gpd_surgery.training import data as gdata

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (after the skip: PIL comes with torchvision)

MODEL_ARGS = ["--model-arg", "num_classes=4", "--model-arg", "width=8"]
RUN = [MODEL, *MODEL_ARGS, "--data", "synthetic", "--synthetic-size", "32", "--image-size", "16", "--batch-size",
       "16", "--epochs", "2", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(out, *extra):
    r = gpd("train", *RUN, "--output-dir", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Two epochs in one go: what every interrupted and resumed run must equal."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(out)


# -- SIGKILL during a checkpoint -------------------------------------------------------------------
KILL_POINTS = {"during-state-write": ("state", 2), "between-teacher-and-state": ("teacher", 2),
               "first-checkpoint": ("teacher", 1)}
# One process loads the modules once, then forks a `gpd train` per kill point, which kills itself with SIGKILL:
# half way through writing its n-th training state ("state"), or right after its n-th teacher file ("teacher").
# (A fork from pytest itself is refused by autograd once a test has run a backward pass.)
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from gpd_surgery.training import checkpoints as gt
    from gpd_surgery.cli import main

    def run(mode, n, argv):
        count = {"state": 0, "teacher": 0}
        real_save, real_teacher = torch.save, gt.save_teacher

        def save(obj, f, *args, **kwargs):
            count["state"] += 1
            if mode == "state" and count["state"] == n:
                f.write(b"half a state" * 1000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        def save_teacher(*args, **kwargs):
            real_teacher(*args, **kwargs)
            count["teacher"] += 1
            if mode == "teacher" and count["teacher"] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save, gt.save_teacher = save, save_teacher
        sys.argv = ["gpd", *argv]
        main()

    for mode, n, argv in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            try:
                run(mode, n, argv)
            finally:
                os._exit(1)  # only when the kill did not come
        _, status = os.waitpid(pid, 0)
        print(json.dumps(os.WIFSIGNALED(status) and os.WTERMSIG(status)), flush=True)
""")


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Output folder per kill point, each left by a run killed there."""
    root = tmp_path_factory.mktemp("killed")
    runs = {name: (mode, n, ["train", *RUN, "--output-dir", str(root / name), "--json"])
            for name, (mode, n) in KILL_POINTS.items()}
    p = subprocess.run([sys.executable, "-c", KILLER, json.dumps(list(runs.values()))], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0 and p.stdout.split() == [str(int(signal.SIGKILL))] * len(runs), p.stderr[-3000:]
    return {name: root / name for name in runs}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_in_a_checkpoint_leaves_no_temp_file_and_resume_continues(killed_runs, full_run, point):
    ref_dir, ref = full_run
    out = killed_runs[point]
    assert not [f for f in os.listdir(out) if f.startswith(".gpd-")], os.listdir(out)
    res = train(out, "--resume")
    assert res["complete"] and _strip(res["history"]) == _strip(ref["history"])
    for name in ("teacher.safetensors", "student.safetensors", "best.safetensors"):
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name

    def rows(d):  # metrics.csv: the same rows but for the time each epoch took
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(d / "metrics.csv"))]

    assert rows(out) == rows(ref_dir) and len(rows(out)) == 2
    assert sorted(os.listdir(out)) == ["best.safetensors", "curves.png", "metrics.csv", "student.safetensors",
                                       "teacher.safetensors", "train_state.pt"]
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 2


# -- malformed train_state.pt ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after its first of two epochs, per optimizer: a valid state to damage."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            out = tmp_path_factory.mktemp(optimizer) / "run"
            train(out, "--stop-after", "1", "--optimizer", optimizer)
            runs[optimizer] = out
        return runs[optimizer]

    return get


def _param_state(s, key):
    first = next(iter(s["optimizer"]["state"].values()))
    return first, first[key]


def _set(path, value):
    def mutate(s):
        *parents, last = path
        target = s
        for k in parents:
            target = target[k]
        target[last] = value
    return mutate


def _drop_exp_avg(s):
    del _param_state(s, "exp_avg")[0]["exp_avg"]


def _stranger(s):
    s["optimizer"]["state"][999] = {"momentum_buffer": torch.zeros(1)}


CASES = {
    "epoch text": ("sgd", _set(["epoch"], "1"), "malformed epoch"),
    "epoch past the end": ("sgd", _set(["epoch"], 7), "malformed epoch"),
    "epoch a flag": ("sgd", _set(["epoch"], True), "malformed epoch"),
    "step negative": ("sgd", _set(["step"], -1), "malformed step"),
    "step a float": ("sgd", _set(["step"], 2.0), "malformed step"),
    "history text": ("sgd", _set(["history"], "x"), "malformed history"),
    "history too short": ("sgd", _set(["history"], []), "malformed history"),
    "history a tensor": ("sgd", _set(["history", 0, "train", "student_loss"], torch.ones(2)), "malformed history record 1"),
    "history no metrics": ("sgd", _set(["history", 0, "train"], {}), "malformed history record 1"),
    "identity text": ("sgd", _set(["identity"], "x"), "malformed identity"),
    "identity a tensor": ("sgd", _set(["identity", "lr"], torch.zeros(3)), "malformed identity"),
    "checksum a number": ("sgd", _set(["checkpoint_sha256"], 5), "malformed checkpoint_sha256"),
    "optimizer missing": ("sgd", _set(["optimizer"], None), "optimizer state in"),
    "optimizer no groups": ("sgd", _set(["optimizer"], {"state": {}, "param_groups": []}), "does not fit the optimizer"),
    "optimizer setting text": ("sgd", _set(["optimizer", "param_groups", 0, "momentum"], "x"),
                               "malformed optimizer setting momentum"),
    "momentum buffer shape": ("sgd", lambda s: _param_state(s, "momentum_buffer")[0].update(momentum_buffer=torch.zeros(3)),
                              "malformed optimizer state momentum_buffer"),
    "momentum buffer text": ("sgd", lambda s: _param_state(s, "momentum_buffer")[0].update(momentum_buffer="x"),
                             "malformed optimizer state momentum_buffer"),
    "momentum buffer NaN": ("sgd", lambda s: _param_state(s, "momentum_buffer")[1].fill_(float("nan")),
                            "malformed optimizer state momentum_buffer"),
    "state of no parameter": ("sgd", _stranger, "malformed optimizer state (999"),
    "adamw missing exp_avg": ("adamw", _drop_exp_avg, "malformed optimizer state of"),
    "adamw negative exp_avg_sq": ("adamw", lambda s: _param_state(s, "exp_avg_sq")[1].fill_(-1.0),
                                  "malformed optimizer state exp_avg_sq"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_state_is_one_line(stopped, tmp_path, case):
    optimizer, mutate, expected = CASES[case]
    out = tmp_path / "run"
    shutil.copytree(stopped(optimizer), out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    mutate(state)
    torch.save(state, out / "train_state.pt")
    msg = one_line_error(gpd("train", *RUN, "--optimizer", optimizer, "--output-dir", out, "--resume"))
    assert expected in msg and str(out / "train_state.pt") in msg, msg


def test_the_intact_state_resumes(stopped, full_run, tmp_path):
    """The control for the cases above: the same copy, undamaged, resumes to the uninterrupted result."""
    out = tmp_path / "run"
    shutil.copytree(stopped("sgd"), out)
    res = train(out, "--resume")
    assert _strip(res["history"]) == _strip(full_run[1]["history"])


# -- non-finite starting weights -------------------------------------------------------------------
def test_a_nan_teacher_is_named_not_blamed_on_the_learning_rate(tmp_path):
    res = api.expand(small_cnn(num_classes=4, width=8).eval(), (1, 3, 16, 16), 2.0, source={"model": MODEL})
    plan, tensors = res.plan, dict(res.tensors)
    key = next(k for k in tensors if not k.startswith(STUDENT_PREFIX) and k.endswith("weight"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[:3] = float("nan")
    save_teacher(str(tmp_path / "nan.safetensors"), plan, tensors)
    msg = one_line_error(gpd("train", *RUN, "--teacher", tmp_path / "nan.safetensors", "--output-dir", tmp_path / "o"))
    assert f"in the teacher file {tmp_path / 'nan.safetensors'}, {key} holds NaN values (3 of" in msg
    assert "--lr" not in msg


@pytest.mark.parametrize("who", ["student", "static"])
def test_non_finite_student_or_static_weights_are_named(tmp_path, who):
    state = {k: v.clone() for k, v in small_cnn(num_classes=4, width=8).state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key].view(-1)[0] = float("inf")
    save_file(state, str(tmp_path / "w.safetensors"))
    extra = (["--plain", "--weights", tmp_path / "w.safetensors"] if who == "student" else
             ["--static-teacher", MODEL, "--static-model-arg", "num_classes=4", "--static-model-arg", "width=8",
              "--static-weights", tmp_path / "w.safetensors"])
    msg = one_line_error(gpd("train", *RUN, *extra, "--output-dir", tmp_path / "o"))
    what = "the student's weights" if who == "student" else "the static teacher's weights"
    assert f"in {what}, {key} holds infinite values (1 of" in msg and "--lr" not in msg


# -- image folders -----------------------------------------------------------------------------------
def _png_bomb(path, side=100_000):
    """A valid PNG header that claims side x side pixels: PIL's decompression bomb case, in 60 bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)


IMAGE_RUN = [MODEL, "--model-arg", "num_classes=2", "--model-arg", "width=8", "--image-size", "8", "--batch-size",
             "4", "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["not an image", "truncated", "bomb", "over the bound"])
def test_a_bad_image_is_refused_before_training(tmp_path, monkeypatch, damage):
    write_images(tmp_path / "data" / "train")
    bad = tmp_path / "data" / "train" / "class1" / "2.png"
    if damage == "not an image":
        bad.write_bytes(os.urandom(300))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "bomb":
        _png_bomb(bad)
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 8 x 8 = 64 pixels: over this bound
    out = tmp_path / "out"
    msg = one_line_error(gpd("train", *IMAGE_RUN, "--data", tmp_path / "data", "--output-dir", out))
    if damage == "over the bound":
        assert "8 x 8 pixels, more than PIL's bound of 50" in msg and "(8 of 8 images are" in msg
    else:
        assert f"image {bad} cannot be used" in msg and "images are" not in msg
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_breaks_during_training_is_one_line(tmp_path, monkeypatch, workers):
    """A file that passed the check and then cannot be decoded (changed, or damage only decoding finds): exit 2
    naming it, also from a DataLoader worker process, never exit 3."""
    write_images(tmp_path / "data" / "train")
    bad = tmp_path / "data" / "train" / "class0" / "1.png"
    real = gdata.check_images

    def check_then_break(root, files):
        real(root, files)
        bad.write_bytes(b"gone bad")

    monkeypatch.setattr(gdata, "check_images", check_then_break)
    msg = one_line_error(gpd("train", *IMAGE_RUN, "--data", tmp_path / "data", "--output-dir", tmp_path / "out",
                             "--num-workers", workers, "--json"))
    assert f"cannot read image {bad} (" in msg and "--resume" in msg


def test_symlinked_folders_that_loop_are_skipped_with_a_warning(tmp_path, capsys):
    write_images(tmp_path / "data" / "train")
    train_dir = tmp_path / "data" / "train"
    (train_dir / "class0" / "loop").symlink_to("..")  # back into the tree: 8 images became 328
    (train_dir / "class1" / "up").symlink_to("../../..")  # to a folder that contains the tree
    outside = tmp_path / "more"
    write_images(outside, classes=1, per_class=2)
    (train_dir / "class1" / "copy1").symlink_to(outside / "class0")  # out of the tree: followed
    (train_dir / "class1" / "copy2").symlink_to(outside / "class0")  # the same folder a second time
    train_set, val_set, classes = gdata.image_folder(str(tmp_path / "data"), 8, val_fraction=0)
    assert classes == ["class0", "class1"] and val_set is None
    assert len(train_set) == 10 and train_set.targets == [0] * 4 + [1] * 6
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("warning: skipped ") for line in err), err
    assert f"{train_dir / 'class0' / 'loop'}: a link back into the dataset folder" in err[0]
    assert f"{train_dir / 'class1' / 'copy2'}: a link to {outside / 'class0'}, which is read already" in err[1]
    assert f"{train_dir / 'class1' / 'up'}: a link to {tmp_path}, which contains the dataset folder" in err[2]


def test_the_sample_list_is_torchvisions(tmp_path):
    """Without links, the samples and their order are ImageFolder's: runs started before keep their data order."""
    from torchvision.datasets import ImageFolder

    write_images(tmp_path / "train", classes=3, per_class=3)
    nested = tmp_path / "train" / "class1" / "sub"
    write_images(nested, classes=1, per_class=2)
    (tmp_path / "train" / "class2" / "notes.txt").write_text("not an image")
    classes, samples = gdata._folder(str(tmp_path / "train"))
    ref = ImageFolder(str(tmp_path / "train"))
    assert classes == ref.classes and samples == ref.samples and len(samples) == 11
