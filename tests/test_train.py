"""GPD training: end to end on a small CNN and a small ViT, gradients through the shared parameters, DDP against a
single process, exact resume, the `gpd train` command line and its errors."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.main import get_command

from conftest import MODEL, gpd, randomize, write_images
from gpd_surgery import expand
from gpd_surgery.cli import app
from gpd_surgery.examples import small_cnn
from gpd_surgery.io import load_teacher_file
from gpd_surgery.training import (GPDLoss, GPDModel, PlainModel, TrainConfig, Trainer, distill_loss, lr_at,
                                  num_outputs, synthetic)

torchvision = pytest.importorskip("torchvision")

VIT = "torchvision.models.vision_transformer:VisionTransformer"
VIT_ARGS = {"image_size": 16, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
            "num_classes": 4}
SHAPE = (1, 3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def vit_args():
    return [x for k, v in VIT_ARGS.items() for x in ("--model-arg", f"{k}={v}")]


def tiny_cnn():
    return small_cnn(num_classes=4, width=8)


def tiny_vit():
    return torchvision.models.VisionTransformer(**VIT_ARGS)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- Python API: end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_cnn, tiny_vit], ids=["cnn", "vit"])
def test_end_to_end_float64(factory, tmp_path):
    """Expand, train a few steps on the synthetic task, extract: the extracted student is the student view."""
    torch.manual_seed(0)
    student = randomize(factory()).double()  # torchvision's ViT starts with a zero head
    train_set, val_set = synthetic(4, 16, 64, 32, seed=1)
    res = expand(copy.deepcopy(student).eval(), SHAPE, 2, branches="default", source={"model": "test"})
    before = {k: v.clone() for k, v in res.tensors.items()}
    model = GPDModel.from_expanded(res)
    # At the start there is no gap: the teacher computes the student's function.
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        t0, s0 = model.eval()(x)
    assert rel_err(t0, student.eval()(x)) <= 1e-12 and rel_err(s0, student(x)) <= 1e-12

    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05, device="cpu")
    result = Trainer(model, train_set, val_set, str(tmp_path), cfg).run()
    hist = result["history"]
    assert result["complete"] and len(hist) == 4
    assert hist[-1]["train"]["objective"] < hist[0]["train"]["objective"]  # the training loss goes down
    assert hist[-1]["train"]["student_loss"] < hist[0]["train"]["student_loss"]
    assert set(hist[-1]["val"]) == {"teacher_loss", "teacher_acc", "teacher_top5", "student_loss", "student_acc",
                                    "student_top5"}

    # The extracted student: the original state_dict's keys, shapes and dtypes, loadable strictly.
    state = load_file(str(tmp_path / "student.safetensors"))
    ref = student.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    extracted = factory().double()
    extracted.load_state_dict(state, strict=True)
    model.eval()
    extracted.eval()
    with torch.no_grad():
        view = model.view(x)
        assert rel_err(extracted(x), view) <= 1e-12
        # The teacher file written at the end holds the same student (trained weights and buffers).
        again = GPDModel.from_file(str(tmp_path / "teacher.safetensors"), factory().double()).eval()
        assert rel_err(again.view(x), view) <= 1e-12
        assert rel_err(again.teacher(x), model.teacher(x)) <= 1e-12
    # Training moved the teacher, and the student's own BatchNorm statistics (the CNN has some).
    plan, tensors = load_teacher_file(str(tmp_path / "teacher.safetensors"))
    assert plan.to_json() == res.plan.to_json()
    assert any(not torch.equal(tensors[k], before[k]) for k in before if not k.startswith("student/"))
    stats = [k for k in tensors if k.startswith("student/") and k.endswith("running_mean")]
    assert all(not torch.equal(tensors[k], before[k]) for k in stats)
    assert (factory is tiny_cnn) == bool(stats)


def test_student_loss_reaches_branches_and_shared_weights():
    torch.manual_seed(0)
    res = expand(tiny_cnn().eval(), SHAPE, 2, branches="default", source={"model": "test"})
    model = GPDModel.from_expanded(res).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    t, s = model(x)
    _, parts = GPDLoss(TrainConfig())(t, s, y)
    parts["student"].backward()  # the student's loss alone
    grads = {k: p.grad for k, p in model.teacher.named_parameters()}
    scales = [k for k in grads if "branch_" in k and k.endswith("_scale")]
    main = [r.key for r in res.plan.recipes if r.kind == "param" and r.key.endswith("weight") and r.dims]
    assert scales and main
    for k in scales + main:
        g = grads[k]
        assert g is not None and g.abs().sum() > 0, k
    # Train mode: both BatchNorms updated their statistics, each its own.
    s_bn, t_bn = model.view.student.get_submodule("stem.1"), model.teacher.get_submodule("stem.1")
    assert s_bn.running_mean.abs().sum() > 0 and s_bn.num_batches_tracked == 1 == t_bn.num_batches_tracked
    assert s_bn.running_mean.data_ptr() != t_bn.running_mean.data_ptr()


def test_losses_and_schedule():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert distill_loss(a, a, "kl").abs() < 1e-6
    p = torch.softmax(b, -1)
    assert torch.allclose(distill_loss(a, b, "sce"), -(p * torch.log_softmax(a, -1)).sum(-1).mean())
    sce = TrainConfig(distill="sce", lam=1.0, student_ce=0.0, teacher_ce=0.0)  # the official target 0.9 p + 0.1 / K
    q = p * 0.9 + 0.1 / 7
    assert torch.allclose(GPDLoss(sce)(b, a, torch.zeros(5, dtype=torch.long))[0], -(q * torch.log_softmax(a, -1)).sum(-1).mean())
    q = p * 0.9 + 0.1 / 7
    assert torch.allclose(distill_loss(a, b, "sce", smoothing=0.1), -(q * torch.log_softmax(a, -1)).sum(-1).mean())
    t = 4.0
    kl = torch.nn.functional.kl_div(torch.log_softmax(a / t, -1), torch.softmax(b / t, -1), reduction="batchmean")
    assert torch.allclose(distill_loss(a, b, "kl", t), kl * t * t)
    y = torch.randint(0, 7, (5,))
    ce = torch.nn.functional.cross_entropy
    total, parts = GPDLoss(TrainConfig(lam=2.0))(b, a, y)
    assert torch.allclose(parts["teacher"], ce(b, y))
    assert torch.allclose(parts["student"], ce(a, y) + 2.0 * distill_loss(a, b))
    static = torch.randn(5, 7)
    cfg = TrainConfig(lam=3.0, static_teacher_weight=0.5, static_student_weight=0.25, distill="sce", teacher_ce=2.0,
                      sce_smoothing=0.0)
    total, parts = GPDLoss(cfg)(b, a, y, static)
    assert torch.allclose(parts["teacher"], 2 * ce(b, y) + 0.5 * distill_loss(b, static, "sce"))
    assert torch.allclose(parts["student"], ce(a, y) + 3 * distill_loss(a, b, "sce") + 0.25 * distill_loss(a, static, "sce"))
    assert torch.allclose(total, parts["teacher"] + parts["student"])
    # Warm-up rises linearly to the peak, the cosine decays to 0.
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1) and lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0) and lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_plain_baseline(tmp_path):
    torch.manual_seed(0)
    student = tiny_cnn()
    train_set, val_set = synthetic(4, 16, 32, 16, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", plain=True)
    result = Trainer(PlainModel(copy.deepcopy(student)), train_set, val_set, str(tmp_path), cfg).run()
    assert result["mode"] == "plain" and "teacher_loss" not in result["history"][0]["train"]
    tiny_cnn().load_state_dict(load_file(str(tmp_path / "student.safetensors")), strict=True)
    assert not os.path.exists(tmp_path / "teacher.safetensors")


# -- resume ------------------------------------------------------------------------------------------
def _cli_run(out, *extra):
    r = gpd("train", MODEL, "--model-arg", "num_classes=4", "--model-arg", "width=8", "--data", "synthetic",
            "--synthetic-size", 48, "--image-size", 16, "--batch-size", 16, "--epochs", 2, "--device", "cpu",
            "--output-dir", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


def test_resume_is_exact(tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume for the 2nd: bit for bit (BatchNorm, dropout, branches)."""
    a, b = tmp_path / "a", tmp_path / "b"
    full = _cli_run(a)
    first = _cli_run(b, "--stop-after", 1)
    assert not first["complete"] and first["epochs_done"] == 1 and not (b / "student.safetensors").exists()
    rest = _cli_run(b, "--resume")
    assert rest["complete"] and _strip(rest["history"]) == _strip(full["history"])
    for name in ("teacher.safetensors", "student.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    # Resuming with other settings, or from a checkpoint that does not match its state, is refused.
    r = gpd("train", MODEL, "--data", "synthetic", "--synthetic-size", 48, "--image-size", 16, "--batch-size", 16,
            "--epochs", 2, "--lr", 0.01, "--device", "cpu", "--output-dir", b, "--resume")
    assert r.exit_code == 2 and "other settings" in r.output and "lr" in r.output
    shutil.copy(a / "train_state.pt", tmp_path / "state.pt")
    c = tmp_path / "c"
    _cli_run(c, "--stop-after", 1)
    shutil.copy(tmp_path / "state.pt", c / "train_state.pt")  # the state of another epoch
    r = gpd("train", MODEL, "--model-arg", "num_classes=4", "--model-arg", "width=8", "--data", "synthetic",
            "--synthetic-size", 48, "--image-size", 16, "--batch-size", 16, "--epochs", 2, "--device", "cpu",
            "--output-dir", c, "--resume")
    assert r.exit_code == 2 and "is not the checkpoint" in r.output
    # A folder holding a run needs --resume or --force.
    r = gpd("train", MODEL, "--data", "synthetic", "--output-dir", a)
    assert r.exit_code == 2 and "--resume" in r.output and "--force" in r.output


# -- DDP ---------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo over loopback) == 1 process on the same global batch.

    The model is a small ViT: LayerNorm and no dropout. DDP averages gradients but not BatchNorm statistics,
    so with BatchNorm each process would normalize its half batch by its own statistics and the runs would
    differ by design (SyncBatchNorm would be needed); dropout would draw other masks per process.
    """
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available")
    common = [VIT, *vit_args(), "--data", "synthetic", "--synthetic-size", 64, "--image-size", 16,
              "--batch-size", 16, "--epochs", 2, "--device", "cpu", "--json"]
    common = [str(c) for c in common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpd_surgery.cli", "train", *common, "--output-dir", str(tmp_path / "ddp")]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 240 s")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 alone reports
    ddp = lines[0]
    r = gpd("train", *common, "--output-dir", tmp_path / "one")
    assert r.exit_code == 0, r.output
    one = json.loads(r.output)
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    for hd, h1 in zip(ddp["history"], one["history"], strict=True):
        for split in ("train", "val"):
            for k, v in h1[split].items():
                assert hd[split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (split, k)
    for name in ("teacher.safetensors", "student.safetensors"):
        a, b = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "one" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (name, k)


# -- the command line ---------------------------------------------------------------------------------
def test_help_documents_every_option():
    r = gpd("train", "--help", env={"COLUMNS": "250"})
    assert r.exit_code == 0
    cmd = get_command(app).commands["train"]
    for param in cmd.params:
        if param.param_type_name == "option":
            assert param.help and len(param.help) > 10, param.name
            assert param.opts[0] in r.output, param.opts[0]
    for name in ("--data", "--output-dir", "--epochs", "--batch-size", "--lr", "--optimizer", "--weight-decay",
                 "--warmup-epochs", "--ratio", "--branches", "--lambda", "--distill", "--temperature",
                 "--label-smoothing", "--static-teacher", "--static-weights", "--seed", "--device", "--image-size",
                 "--num-workers", "--weights", "--model-arg", "--teacher", "--resume", "--json", "--debug", "--force",
                 "--val-fraction", "--plain"):
        assert name in r.output, name


def test_image_folder_training(tmp_path):
    write_images(tmp_path / "data" / "train", 3, per_class=3)
    write_images(tmp_path / "data" / "val", 3, per_class=1)
    out = tmp_path / "out"
    r = gpd("train", MODEL, "--model-arg", "num_classes=3", "--model-arg", "width=8", "--data", tmp_path / "data",
            "--image-size", 8, "--batch-size", 3, "--epochs", 1, "--device", "cpu", "--output-dir", out,
            "--ratio", "1.5", "--branches", "kxk,lowrank", "--optimizer", "adamw", "--distill", "sce",
            "--label-smoothing", "0.1", "--warmup-epochs", "0.5")
    assert r.exit_code == 0, r.output
    assert "epoch   1" in r.output and "val" in r.output and "final validation" in r.output
    small_cnn(num_classes=3, width=8).load_state_dict(load_file(str(out / "student.safetensors")), strict=True)
    # Training on from the trained teacher file (a second stage), with a static teacher.
    r = gpd("train", MODEL, "--data", tmp_path / "data", "--batch-size", 3, "--epochs", 1, "--device", "cpu",
            "--output-dir", tmp_path / "out2", "--teacher", out / "teacher.safetensors",
            "--static-teacher", MODEL, "--static-model-arg", "num_classes=3", "--static-model-arg", "width=4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["complete"]


def test_errors(tmp_path):
    """Bad input: exit 2 and one clear line."""
    def err(*args):
        r = gpd("train", *args, "--output-dir", tmp_path / "out", "--device", "cpu", "--epochs", 1)
        assert r.exit_code == 2, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
        return lines[0]

    assert "does not exist" in err(MODEL, "--data", tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in err(MODEL, "--data", tmp_path / "file")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "is empty" in err(MODEL, "--data", tmp_path / "empty")
    (tmp_path / "empty" / "train" / "cat").mkdir()
    (tmp_path / "empty" / "train" / "dog").mkdir()
    assert "is empty: no images" in err(MODEL, "--data", tmp_path / "empty")
    write_images(tmp_path / "three" / "train", 3, per_class=3)
    line = err(MODEL, "--data", tmp_path / "three", "--image-size", 8)
    assert "3 classes" in line and "10 outputs" in line and "--model-arg num_classes=3" in line
    line = err(MODEL, "--data", "synthetic", "--static-teacher", MODEL, "--static-model-arg", "num_classes=5",
               "--image-size", 8)
    assert "static teacher has 5 outputs" in line and "10" in line
    assert "--static-teacher" in err(MODEL, "--data", "synthetic", "--static-weights", tmp_path / "file")
    assert "unknown distillation loss" in err(MODEL, "--data", "synthetic", "--distill", "mse")
    assert "unknown optimizer" in err(MODEL, "--data", "synthetic", "--optimizer", "lbfgs")
    assert "--resume" in err(MODEL, "--data", "synthetic", "--teacher", tmp_path / "file", "--resume")
    assert "does not exist" in err(MODEL, "--data", "synthetic", "--resume")


def test_num_outputs_and_synthetic_task():
    assert num_outputs(tiny_cnn(), SHAPE) == 4
    a, _ = synthetic(5, 16, 40, 10, seed=3)
    b, _ = synthetic(5, 16, 40, 10, seed=3)
    c, _ = synthetic(5, 16, 40, 10, seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])
    assert a.tensors[0].shape == (40, 3, 16, 16) and set(a.tensors[1].tolist()) <= set(range(5))
    assert math.isfinite(a.tensors[0].std().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training(tmp_path):
    """On the GPU: train, stop, resume; the extracted student is the student view of the file on the CPU."""
    args = ["--model-arg", "num_classes=4", "--model-arg", "width=8", "--data", "synthetic", "--synthetic-size", 64,
            "--image-size", 16, "--batch-size", 16, "--epochs", 2, "--device", "cuda", "--json"]
    r = gpd("train", MODEL, *args, "--output-dir", tmp_path / "a", "--stop-after", 1)
    assert r.exit_code == 0, r.output
    r = gpd("train", MODEL, *args, "--output-dir", tmp_path / "a", "--resume")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["complete"]
    full = json.loads(gpd("train", MODEL, *args, "--output-dir", tmp_path / "b").output)
    for h1, h2 in zip(res["history"], full["history"], strict=True):
        assert h1["val"]["student_acc"] == pytest.approx(h2["val"]["student_acc"], abs=0.05)
    model = GPDModel.from_file(str(tmp_path / "a" / "teacher.safetensors"), tiny_cnn()).double().eval()
    student = tiny_cnn().double().eval()
    student.load_state_dict(load_file(str(tmp_path / "a" / "student.safetensors")), strict=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(student(x), model.view(x)) <= 1e-5  # float32 weights: collapsed in float32 vs float64
