"""`gpd train`'s options beyond the minimal loop (issue 16): seeds, normalization, recipes, clipping, EMA, DKD,
branch initialization, mixed precision, schedules, mixup, outputs (metrics.csv, curves.png, best.safetensors) and
`gpd eval`. Tiny models, one epoch, a few synthetic samples."""
import json

import pytest
import torch

from conftest import MODEL, gpd
from gpd_surgery.training import TrainConfig
from gpd_surgery.training.job import TrainRequest, prepare

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model-arg", "num_classes=4", "--model-arg", "width=4", "--data", "synthetic", "--synthetic-size", "32",
        "--image-size", "8", "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--json"]


def run(out, *extra, code=0):
    r = gpd("train", MODEL, *TINY, "--output-dir", out, *extra)
    assert r.exit_code == code, r.output
    return json.loads(r.output) if code == 0 else r.output


def _student(seed, **kw):
    q = TrainRequest(data="synthetic", output_dir="unused", model=MODEL, model_args=["num_classes=4", "width=4"],
                     image_size=8, synthetic_size=8, **kw)
    job = prepare(q, TrainConfig(seed=seed), lambda _: None)
    return job.student.state_dict(), job.source


def test_seed_sets_the_students_initialization(tmp_path):
    """From scratch --seed draws the student: two seeds give two students, one seed the same one, and seed 0 is
    the fixed initialization `gpd expand` uses (what `gpd verify` rebuilds)."""
    a, src = _student(1)
    b, _ = _student(1)
    c, _ = _student(2)
    zero, src0 = _student(0)
    w = "stem.0.weight"
    assert torch.equal(a[w], b[w]) and not torch.equal(a[w], c[w]) and not torch.equal(a[w], zero[w])
    assert src["init_seed"] == 1 and src0["init_seed"] == 0
    from gpd_surgery.trace import load_model

    assert torch.equal(load_model(MODEL, {"num_classes": 4, "width": 4}).state_dict()[w], zero[w])


# -- normalization ---------------------------------------------------------------------------------------
def test_normalization_comes_from_the_models_config(tmp_path):
    from gpd_surgery.examples import small_cnn
    from gpd_surgery.training.normalization import resolve

    timm = pytest.importorskip("timm")
    tv = pytest.importorskip("torchvision")
    assert resolve(small_cnn(), MODEL).mean == (0.5, 0.5, 0.5)  # no configuration: the neutral default
    m = timm.create_model("test_efficientnet", num_classes=3)
    n = resolve(m, "timm:test_efficientnet")
    assert n.mean == (0.485, 0.456, 0.406) and n.std == (0.229, 0.224, 0.225) and n.interpolation == "bicubic"
    assert n.crop_pct == 0.95 and "timm" in n.source
    n = resolve(tv.models.resnet18(), "torchvision:resnet18")
    assert n.mean == (0.485, 0.456, 0.406) and n.crop_pct == 224 / 256 and "torchvision" in n.source
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": 0.5, "resample": 3, "crop_pct": 0.9}))
    n = resolve(small_cnn(), f"hf:{tmp_path}")
    assert n.mean == (0.1, 0.2, 0.3) and n.std == (0.5, 0.5, 0.5) and n.interpolation == "bicubic"
    n = resolve(m, "timm:test_efficientnet", mean="0.4,0.4,0.4", std="0.2,0.2,0.2")
    assert n.mean == (0.4, 0.4, 0.4) and n.std == (0.2, 0.2, 0.2) and "--mean" in n.source
    assert "three" in run(tmp_path / "x", "--mean", "1,2", code=2)


def test_finetune_recipe_of_a_timm_model_uses_its_mean_and_std(tmp_path):
    """`--recipe gpd-finetune --weights W` of a timm model: the images are normalized with the model's statistics
    (recorded in the run's settings), and the recipe's settings are the run's; timm's transforms (--augment timm)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from conftest import write_images

    write_images(tmp_path / "data" / "train", 3, per_class=2, size=20)
    write_images(tmp_path / "data" / "val", 3, per_class=1, size=20)
    torch.manual_seed(3)
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(), str(tmp_path / "w.safetensors"))
    r = gpd("train", "timm:test_efficientnet", "--model-arg", "num_classes=3", "--weights", tmp_path / "w.safetensors",
            "--recipe", "gpd-finetune", "--epochs", "1", "--data", tmp_path / "data", "--image-size", "16",
            "--batch-size", "3", "--branches", "none", "--augment", "timm", "--rand-augment", "rand-m9-mstd0.5",
            "--reprob", "0.25", "--device", "cpu", "--output-dir", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["normalization"]["mean"] == [0.485, 0.456, 0.406] and res["normalization"]["std"] == [0.229, 0.224, 0.225]
    state = torch.load(tmp_path / "out" / "train_state.pt", weights_only=True)
    ident = state["identity"]
    assert ident["normalization"]["mean"] == [0.485, 0.456, 0.406] and ident["recipe"] == "gpd-finetune"
    assert (ident["lr"], ident["clip_grad"], ident["ema"], ident["distill"], ident["schedule"], ident["branch_init"]) \
        == (0.01, 5.0, 0.99996, "sce", "step", "zero")
    assert ident["weight_decay"] == 1e-4 and ident["lam"] == 3.0 and ident["sce_smoothing"] == 0.1
    assert "val_ema" in res["history"][0] and (tmp_path / "out" / "student_ema.safetensors").exists()


def test_recipes_and_explicit_options():
    from gpd_surgery.training.recipes import resolve

    o = resolve("gpd-scratch", {"lr": 0.2})
    assert o["lr"] == 0.2 and o["epochs"] == 100 and o["branch_init"] == "active" and o["decay_epochs"] == (30, 60, 90)
    assert resolve(None, {})["schedule"] == "cosine" and resolve(None, {})["ema"] is None


# -- losses, schedule, branches -------------------------------------------------------------------------
def test_dkd_and_the_step_schedule():
    from gpd_surgery.training import GPDLoss, distill_loss, lr_at

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert distill_loss(t, t, "dkd", labels=y).abs() < 1e-6
    # DKD written out: binary true-class/others KL (alpha) + KL over the other classes (beta).
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    gt = torch.nn.functional.one_hot(y, 5).bool()
    bs = torch.stack([ps[gt], 1 - ps[gt]], -1)
    bt = torch.stack([pt[gt], 1 - pt[gt]], -1)
    tckd = (bt * (bt / bs).log()).sum(-1).mean()
    qs = ps.masked_fill(gt, 0) / (1 - ps[gt])[:, None]
    qt = pt.masked_fill(gt, 0) / (1 - pt[gt])[:, None]
    nckd = (qt * ((qt + 1e-30) / (qs + 1e-30)).log()).sum(-1).mean()
    got = distill_loss(s, t, "dkd", labels=y, alpha=2.0, beta=0.5)
    assert torch.allclose(got, 2.0 * tckd + 0.5 * nckd, atol=1e-5)
    # --static-distill dkd: only the static-teacher terms use DKD.
    cfg = TrainConfig(distill="kl", static_distill="dkd", lam=1.0, static_teacher_weight=1.0, static_student_weight=1.0)
    _, parts = GPDLoss(cfg)(t, s, y, t)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(parts["student"], ce(s, y) + distill_loss(s, t, "kl") + distill_loss(s, t, "dkd", labels=y))
    assert "hard labels" in run("unused", "--distill", "dkd", "--mixup", "0.2", code=2)
    # Step: x0.1 at each milestone, after a linear warm-up.
    assert lr_at(0, 100, 0, 1.0, "step", (30, 60)) == 1.0 and lr_at(30, 100, 0, 1.0, "step", (30, 60)) == pytest.approx(0.1)
    assert lr_at(99, 100, 0, 1.0, "step", (30, 60)) == pytest.approx(0.01) and lr_at(1, 100, 4, 1.0, "step") == 0.5


def test_branch_init_active(tmp_path):
    from gpd_surgery.io import load_teacher_file

    res = run(tmp_path / "a", "--branch-init", "active", "--lr", "1e-9", "--branches", "1x1,kxk,1x1-kxk")
    assert res["complete"]
    _, tensors = load_teacher_file(str(tmp_path / "a" / "teacher.safetensors"))
    scales = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.endswith("_scale")}
    assert scales and all(v.abs().max() > 0 for v in scales.values())
    assert torch.allclose(scales["branch_1x1_kxk_scale"], torch.full_like(scales["branch_1x1_kxk_scale"], 0.5), atol=1e-6)
    step = run(tmp_path / "z", "--lr", "1e-9", "--sched", "step", "--decay-epochs", "1", "--epochs", "2")
    assert [h["lr"] for h in step["history"]] == pytest.approx([1e-9, 1e-10])  # x0.1 once epoch 1 is done


# -- EMA, clipping, mixed precision, mixup, outputs, eval ------------------------------------------------
def test_ema_amp_channels_last_mixup_and_outputs(tmp_path):
    """One run with the student's EMA, bf16 autocast, channels-last, mixup and cutmix: the files are float32, the
    EMA student is a loadable student that differs from the last one, metrics.csv has one row per epoch and
    curves.png shows the teacher's and the student's curves."""
    import csv

    from matplotlib.image import imread
    from safetensors.torch import load_file

    from gpd_surgery.examples import small_cnn

    out = tmp_path / "run"
    res = run(out, "--epochs", "2", "--ema", "0.5", "--amp", "bf16", "--channels-last", "--mixup", "0.4",
              "--cutmix", "1.0", "--label-smoothing", "0.1")
    files = res["files"]
    assert {"student_ema", "best", "metrics", "curves"} <= set(files)
    ema, last = load_file(files["student_ema"]), load_file(files["student"])
    assert all(v.dtype == last[k].dtype for k, v in ema.items()) and ema.keys() == last.keys()
    assert any(not torch.equal(ema[k], last[k]) for k in ema if k.endswith("weight"))
    small_cnn(num_classes=4, width=4).load_state_dict(ema, strict=True)
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "teacher.safetensors")).values()
               if v.is_floating_point())
    rows = list(csv.DictReader(open(files["metrics"])))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    h = res["history"]
    assert float(rows[1]["val_student_acc"]) == h[1]["val"]["student_acc"] and rows[1]["val_ema_acc"] != ""
    assert float(rows[0]["gap"]) == pytest.approx(h[0]["val"]["teacher_acc"] - h[0]["val"]["student_acc"])
    png = imread(files["curves"])[..., :3]

    def share(rgb):  # the share of pixels drawn in a colour (matplotlib's tab:blue, tab:orange)
        return float((torch.tensor(png) - torch.tensor(rgb) / 255).abs().amax(-1).lt(0.02).float().mean())

    assert share((31, 119, 180)) > 1e-3 and share((255, 127, 14)) > 1e-3


def test_clip_grad_and_compile_reach_the_step(tmp_path, monkeypatch):
    norms, compiled = [], []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        norms.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch, "compile", lambda m, backend: compiled.append(backend) or m)
    run(tmp_path / "a", "--clip-grad", "0.5", "--compile", "--compile-backend", "eager")
    assert norms == [0.5, 0.5] and compiled == ["eager"]  # 32 samples, batch 16: two steps


def test_fp16_and_ema_resume(tmp_path):
    """With fp16 (a gradient scaler) and EMA on, a run stopped after one epoch resumes: the scaler's and the EMA's
    states come back from train_state.pt and the run ends as an uninterrupted one does."""
    extra = ("--epochs", "2", "--amp", "fp16", "--ema", "0.9")
    full = run(tmp_path / "a", *extra)
    run(tmp_path / "b", *extra, "--stop-after", "1")
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "stem.0.weight" in state["ema"]
    rest = run(tmp_path / "b", *extra, "--resume")
    assert rest["complete"]
    for split in ("val", "val_ema"):
        for k, v in full["history"][-1][split].items():
            assert rest["history"][-1][split][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (split, k)


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path / "a", "--tensorboard")
    assert any(f.startswith("events.") for f in __import__("os").listdir(tmp_path / "a" / "tensorboard"))


def test_eval_agrees_with_the_training_history(tmp_path):
    out = tmp_path / "run"
    res = run(out, "--epochs", "2")
    h = res["history"]
    r = gpd("eval", out / "teacher.safetensors", "--data", "synthetic", "--synthetic-size", "32", "--device", "cpu",
            "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["kind"] == "teacher" and ev["samples"] == 8
    for who in ("teacher", "student"):
        assert ev[who]["top1"] == h[-1]["val"][f"{who}_acc"] and ev[who]["top5"] == h[-1]["val"][f"{who}_top5"]
        assert ev[who]["loss"] == pytest.approx(h[-1]["val"][f"{who}_loss"], rel=1e-5)
    best = next(x for x in reversed(h) if "best" in x)
    r = gpd("eval", MODEL, out / "best.safetensors", "--model-arg", "num_classes=4", "--model-arg", "width=4",
            "--data", "synthetic", "--synthetic-size", "32", "--image-size", "8", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["kind"] == "student" and "teacher" not in ev
    assert ev["student"]["top1"] == best["val"]["student_acc"]
    assert ev["student"]["loss"] == pytest.approx(best["val"]["student_loss"], rel=1e-5)
    r = gpd("eval", out / "best.safetensors", "--data", "synthetic")
    assert r.exit_code == 2 and "pass MODEL" in r.output
