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
