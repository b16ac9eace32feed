"""The gpd command line end to end on the built-in example model: expand, verify, extract, --json, errors."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import MODEL, randomize, gpd as run_gpd
from gpd_surgery.examples import small_cnn

SHAPE = "2,3,32,32"

def gpd(*args):
    return run_gpd(*args, catch_exceptions=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = randomize(small_cnn(), seed=3)
    weights, teacher = d / "w.safetensors", d / "t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    r = gpd("expand", MODEL, "--weights", weights, "--input-shape", SHAPE, "-o", teacher, "--json")
    assert r.exit_code == 0, r.output
    return d, model, weights, teacher, json.loads(r.output)


def test_expand_summary(files):
    _, model, _, teacher, summary = files
    assert summary["student_params"] == sum(p.numel() for p in model.parameters())
    assert summary["teacher_params"] >= 3 * summary["student_params"]
    assert summary["spaces_frozen"] == 0 and summary["spaces_expanded"] > 0
    with safe_open(str(teacher), "pt") as f:
        plan = json.loads(f.metadata()["gpd_plan"])
    assert plan["source"]["input_shape"] == [2, 3, 32, 32] and plan["ratio"] == 2


def test_verify_passes_and_prints_a_table(files):
    _, _, weights, teacher, _ = files
    r = gpd("verify", MODEL, teacher, "--weights", weights, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "float32" in r.output and "float64" in r.output and "equivalent" in r.output
    r = gpd("verify", MODEL, teacher, "--weights", weights, "--device", "cpu", "--json")
    rep = json.loads(r.output)
    assert rep["passed"] and {c["dtype"] for c in rep["checks"]} == {"float32", "float64"}
    assert all(c["max_rel"] <= c["tolerance"] for c in rep["checks"])


def test_extract_gives_back_the_student(files):
    d, model, _, teacher, _ = files
    out = d / "s.safetensors"
    r = gpd("extract", teacher, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    got = load_file(str(out))
    state = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert (got[k].double() - v.double()).abs().max() <= 1e-6, k
    fresh = small_cnn()
    fresh.load_state_dict(got, strict=True)
    # An existing output is not overwritten without --force.
    assert gpd("extract", teacher, "-o", out).exit_code == 2
    assert gpd("extract", teacher, "-o", out, "--force").exit_code == 0


def test_verify_fails_on_a_perturbed_weight_and_names_the_node(files):
    d, _, weights, teacher, _ = files
    with safe_open(str(teacher), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(teacher))
    w = tensors["stage2.b.0.weight"]
    w[0, 0, 1, 1] += 0.5 * w.abs().max()
    bad = d / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = gpd("verify", MODEL, bad, "--weights", weights, "--device", "cpu", "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.output)
    assert not rep["passed"]
    assert rep["divergence"]["node"] == "stage2_b_0"
    r = gpd("verify", MODEL, bad, "--weights", weights, "--device", "cpu")
    assert r.exit_code == 1 and "stage2_b_0" in r.output


def test_verify_refuses_a_teacher_of_another_architecture(files, tmp_path):
    _, _, weights, teacher, _ = files
    # The model is built on the meta device and its shapes compared with the plan's, before any allocation.
    r = gpd("verify", MODEL, teacher, "--model-arg", "width=8", "--device", "cpu")
    assert r.exit_code == 2 and "not made from gpd_surgery.examples:small_cnn with {'width': 8}" in r.output
    assert "stem.0.weight is [8, 3, 3, 3] in the model" in r.output
    plain = tmp_path / "t.safetensors"
    assert gpd("expand", MODEL, "--input-shape", SHAPE, "-o", plain).exit_code == 0
    r = gpd("verify", MODEL, plain, "--model-arg", "width=8", "--device", "cpu")
    assert r.exit_code == 2 and "not made from" in r.output


def test_pickled_model_needs_trust(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump(Evil(), f)
    r = gpd("expand", path, "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 2 and "--trust-pickle" in r.output
    assert not marker.exists()


def test_pickled_model_with_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small_cnn(width=8), path)
    r = gpd("expand", path, "--trust-pickle", "--input-shape", "1,3,16,16", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("ratio", ["0.5", "nan", "inf", "abc"])
def test_bad_ratio(tmp_path, ratio):
    r = gpd("expand", MODEL, "--ratio", ratio, "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 2 and "ratio" in r.output
    assert not os.listdir(tmp_path)


def test_model_args_reach_the_factory_and_the_plan(tmp_path):
    out = tmp_path / "t.safetensors"
    r = gpd("expand", MODEL, "--model-arg", "num_classes=4", "--input-shape", "1,3,16,16", "-o", out)
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        plan = json.loads(f.metadata()["gpd_plan"])
    assert plan["source"]["model_args"] == {"num_classes": 4}
    assert gpd("verify", MODEL, out, "--device", "cpu").exit_code == 0  # args come from the plan


def test_unknown_spec_and_missing_files(tmp_path):
    assert gpd("expand", "nosuchthing", "-o", tmp_path / "t.safetensors").exit_code == 2
    assert gpd("expand", "torchvision:nosuchnet", "-o", tmp_path / "t.safetensors").exit_code == 2
    assert gpd("extract", tmp_path / "missing.safetensors", "-o", tmp_path / "s.safetensors").exit_code == 2
    r = gpd("extract", tmp_path, "-o", tmp_path / "s.safetensors")
    assert r.exit_code == 2 and "not a file" in r.output
