"""The capture front end: torch.export next to symbolic tracing, Hugging Face model directories (hf:DIR),
several, keyword and integer example inputs, and trace failures reported as such."""
import json
import os
import sys

import pytest
import torch
from torch import nn

from conftest import gpd, one_line_error, randomize

from gpd_surgery import api
from gpd_surgery.inputs import InputSpec, parse_input, parse_inputs
from gpd_surgery.errors import GPDError
from gpd_surgery.rules import DEFAULT
from gpd_surgery.verification import verify

transformers = pytest.importorskip("transformers")


# -- Hugging Face model directories ------------------------------------------------------------------
def _hf_models():
    T = transformers
    return {
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
            patch_size=8, num_labels=5)),
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5, image_size=32)),
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5, image_size=32)),
    }


def save_hf(root, name):
    """A Hugging Face model directory of ``name`` with random weights (no zero, no one), as save_pretrained
    writes it, and the model."""
    torch.manual_seed(0)
    model = _hf_models()[name]().eval()
    randomize(model)
    path = os.path.join(str(root), name)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf(root, name) for name in _hf_models()}


@pytest.mark.parametrize("name", ["vit", "swin", "convnext", "resnet"])
def test_hf_directories_expand_verify_and_extract_through_the_cli(name, hf_dirs, tmp_path):
    path, model = hf_dirs[name]
    teacher = tmp_path / "t.safetensors"
    for ratio in ("2", "1.5"):
        r = gpd("expand", f"hf:{path}", "--ratio", ratio, "-o", teacher, "--force", "--json")
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        if name == "vit" and ratio == "2":
            assert summary["param_ratio"] >= 3.0
        assert summary["param_ratio"] > 1.5 and summary["unsupported_ops"] == []
        r = gpd("verify", teacher, "--device", "cpu", "--json")
        assert r.exit_code == 0, r.output
        checks = json.loads(r.stdout)
        assert all(c["max_rel"] <= 1e-10 for c in checks["checks"] + checks["inside"] if c["dtype"] == "float64")
    out = tmp_path / "student"
    r = gpd("extract", teacher, "--hf-dir", out, "--json")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = type(model).from_pretrained(str(out)).eval()
    from safetensors.torch import load_file

    fresh = _hf_models()[name]().eval()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_hf_plan_records_the_keyword_input_and_export(hf_dirs, tmp_path):
    path, _ = hf_dirs["vit"]
    r = gpd("expand", f"hf:{path}", "-o", tmp_path / "t.safetensors", "--input-shape", "1,3,32,32", "--json")
    assert r.exit_code == 0, r.output
    from gpd_surgery.io import read_plan

    src = read_plan(str(tmp_path / "t.safetensors"))[0].source
    assert src["capture"] == "export"
    assert src["inputs"] == [{"shape": [1, 3, 32, 32], "name": "pixel_values"}]


def test_an_hf_teacher_runs_at_any_batch_size(hf_dirs):
    """Exported with a dynamic batch: sizes are read from the input (a whole-dim slice, ``x[:, 0]`` as
    export writes it, keeps no batch size either), so the teacher trains at any batch size."""
    _, model = hf_dirs["vit"]
    ex = api.expand(model, (1, 3, 32, 32), 2.0)
    assert ex.student.capture == "export"
    teacher = ex.teacher()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x).logits, atol=1e-5)


def test_a_graph_exported_at_fixed_shapes_refuses_others():
    from gpd_surgery.capture import export_graph

    model = _net()
    captured = export_graph(model, (InputSpec((1, 3, 8, 8)),), [torch.randn(1, 3, 8, 8)], DEFAULT,
                            dynamic=False)
    with torch.no_grad():
        assert torch.allclose(captured.gm(torch.ones(1, 3, 8, 8)), model(torch.ones(1, 3, 8, 8)))
        with pytest.raises(ValueError, match="fixed shapes"):
            captured.gm(torch.ones(2, 3, 8, 8))


def test_hf_symbolic_tracing_failure_is_reported_as_a_trace_failure(hf_dirs):
    path, _ = hf_dirs["vit"]
    line = one_line_error(gpd("plan", f"hf:{path}", "--capture", "fx"))
    assert "torch.fx cannot trace" in line and "--capture export" in line


def test_hf_remote_code_is_refused_without_trust(tmp_path, hf_dirs):
    path, _ = hf_dirs["resnet"]
    bad = tmp_path / "remote"
    bad.mkdir()
    config = json.load(open(os.path.join(path, "config.json")))
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes(open(os.path.join(path, "model.safetensors"), "rb").read())
    (bad / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    line = one_line_error(gpd("plan", f"hf:{bad}"))
    assert "--trust-remote-code" in line


@pytest.mark.parametrize("files, says", [
    ({}, "no config.json"),
    ({"config.json": "{not json"}, "not valid JSON"),
    ({"config.json": json.dumps({"model_type": "vit", "architectures": ["NoSuchModel"]}),
      "model.safetensors": b""}, "no model class"),
    ({"config.json": json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}),
      "pytorch_model.bin": b"pickle"}, "pickle"),
])
def test_bad_hf_directories_are_one_line(tmp_path, files, says):
    d = tmp_path / "m"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    assert says in one_line_error(gpd("plan", f"hf:{d}"))


def test_extract_hf_dir_needs_an_hf_teacher(tmp_path):
    from conftest import make_teacher

    make_teacher(tmp_path / "t.safetensors")
    assert "hf:DIR" in one_line_error(gpd("extract", tmp_path / "t.safetensors", "--hf-dir", tmp_path / "s"))


# -- torch.export on models fx traces too -----------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.LayerNorm([8, 8, 8]), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))


@pytest.mark.parametrize("ratio", [2.0, 3.0, 1.5])
def test_export_and_fx_give_the_same_plan_and_both_are_exact(ratio):
    model = _net().double()
    fx_plan = api.expand(model, (1, 3, 8, 8), ratio, capture="fx", branches="default")
    ex_plan = api.expand(model, (1, 3, 8, 8), ratio, capture="export", branches="default")
    assert ex_plan.plan.source["capture"] == "export" and fx_plan.plan.source["capture"] == "fx"
    assert api.summarize(ex_plan.plan, ex_plan.tensors)["param_ratio"] == \
        api.summarize(fx_plan.plan, fx_plan.tensors)["param_ratio"]
    for ex in (fx_plan, ex_plan):
        rep = verify(model, ex.plan, ex.tensors, device="cpu")
        assert rep.passed, rep.to_dict()


def test_an_exported_teacher_runs_at_other_batch_sizes():
    model = _net()
    ex = api.expand(model, (1, 3, 8, 8), 2.0, capture="export")
    from gpd_surgery.verification import rebuild

    _, _, t = rebuild(model, ex.plan, ex.tensors, ex.plan.inputs())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(t(x), model(x), atol=1e-5)


def test_auto_traces_through_a_library_leaf_that_no_rule_knows():
    """timm marks blocks fx cannot trace (TinyVitBlock, MobileVitBlock) as leaves: without a rule they would run
    at the student's width, so auto captures with torch.export, which traces through them."""
    register_notrace_module = pytest.importorskip("timm.layers").register_notrace_module

    @register_notrace_module
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(5, 8), Opaque(), nn.Linear(8, 3))).double()
    auto = api.expand(model, (2, 4, 5), 2.0)
    fx = api.expand(model, (2, 4, 5), 2.0, capture="fx")
    assert auto.plan.source["capture"] == "export" and fx.plan.source["capture"] == "fx"
    assert auto.tensors["1.fc1.weight"].shape == (32, 16) and fx.tensors["1.fc1.weight"].shape == (16, 8)
    rep = verify(model, auto.plan, auto.tensors, device="cpu")
    assert rep.passed and all(c.max_rel <= 1e-10 for c in rep.checks if c.dtype == "float64"), rep.to_dict()


def test_auto_keeps_fx_where_the_exported_graph_is_not_the_models_function_in_float64():
    """XCiT: export traces through its leaves, but its graph is not the model's function in float64 (a part the
    model computes in float32 follows the model's dtype in the graph, as export cannot tell such a cast from
    ``x.to(self.weight.dtype)``), so auto keeps fx's graph, exact. Export alone captures it too (its
    ``10000 ** x``, a scalar raised to a tensor, as ``torch.pow``, not as ``10000.pow(x)``)."""
    xcit = pytest.importorskip("timm.models.xcit")
    torch.manual_seed(0)
    model = randomize(xcit.Xcit(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, cls_attn_layers=1,
                                num_classes=3)).eval()
    auto = api.expand(model, (1, 3, 32, 32), 2.0)
    assert auto.plan.source["capture"] == "fx"
    rep = verify(model, auto.plan, auto.tensors, device="cpu")
    assert rep.passed and all(c.max_rel <= 1e-10 for c in rep.checks if c.dtype == "float64"), rep.to_dict()
    assert api.plan_expansion(model, (1, 3, 32, 32), 2.0, capture="export").plan.source["capture"] == "export"


class AttentionOnInput(nn.Module):
    """nn.MultiheadAttention straight on a graph input: its width cannot widen, so neither may its heads."""

    def __init__(self):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0].mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_attention_whose_width_is_frozen_keeps_its_heads(capture):
    torch.manual_seed(0)
    model = randomize(AttentionOnInput()).double()
    ex = api.expand(model, (2, 5, 8), 2.0, capture=capture)
    if capture == "fx":  # one module: embed_dim is its width and its heads' (export runs its ops one by one)
        assert ex.tensors["mha.in_proj_weight"].shape == (24, 8)
    rep = verify(model, ex.plan, ex.tensors, device="cpu")
    assert rep.passed, rep.to_dict()


# -- torchvision models fx cannot trace ------------------------------------------------------------
def small_swin3d():
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                             window_size=[2, 4, 4], num_classes=5)


def test_swin3d_is_captured_by_export_and_exact(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    spec = "test_capture:small_swin3d"
    line = one_line_error(gpd("plan", spec, "--input-shape", "1,3,4,32,32", "--capture", "fx"))
    assert "torch.fx" in line and "--capture export" in line and "rejects" not in line
    r = gpd("expand", spec, "--input-shape", "1,3,4,32,32", "-o", tmp_path / "t.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["param_ratio"] >= 3.0
    r = gpd("verify", tmp_path / "t.safetensors", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output


# -- several inputs ----------------------------------------------------------------------------------
class ImageAndText(nn.Module):
    """An image and token ids: a conv tower and an embedding, joined."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Embedding(50, 8)
        self.text = nn.Linear(8, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, image, ids, scale: float = 1.0):
        t = self.text(self.embed(ids)).mean(1)
        return self.head(torch.cat([self.conv(image), t], dim=1)) * scale


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, pixel_values=None, mask=None):
        x = self.conv(pixel_values).mean((2, 3))
        if mask is not None:
            x = x * mask
        return self.fc(x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_an_image_and_token_ids(capture):
    torch.manual_seed(0)
    model = randomize(ImageAndText()).double()
    inputs = (InputSpec((1, 3, 8, 8)), InputSpec((1, 5), torch.int64))
    ex = api.expand(model, inputs, 2.0, capture=capture)
    assert ex.plan.source["inputs"][1] == {"shape": [1, 5], "dtype": "int64", "high": 50}
    rep = verify(model, ex.plan, ex.tensors, device="cpu")
    assert rep.passed, rep.to_dict()
    summary = api.summarize(ex.plan, ex.tensors)
    # nothing frozen but the graph's inputs and outputs (the report lists only what froze otherwise)
    assert summary["frozen"] == [] and summary["unsupported_ops"] == [] and summary["param_ratio"] > 2.0


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_keyword_inputs(capture):
    torch.manual_seed(0)
    model = randomize(Keyword()).double()
    inputs = (InputSpec((1, 3, 8, 8), name="pixel_values"), InputSpec((1, 1), name="mask"))
    ex = api.expand(model, inputs, 2.0, capture=capture)
    assert [s.name for s in ex.student.inputs] == ["pixel_values", "mask"]
    rep = verify(model, ex.plan, ex.tensors, device="cpu")
    assert rep.passed, rep.to_dict()
    assert api.summarize(ex.plan, ex.tensors)["param_ratio"] > 1.5  # the mask is used: it broadcasts
    # a mask over the channels is a graph input: those channels stay the student's
    inputs = (InputSpec((1, 3, 8, 8), name="pixel_values"), InputSpec((1, 8), name="mask"))
    ex = api.expand(model, inputs, 2.0, capture=capture)
    assert api.summarize(ex.plan, ex.tensors)["param_ratio"] < 1.5


def test_several_inputs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    t = tmp_path / "t.safetensors"
    r = gpd("expand", "test_capture:ImageAndText", "--input", "1,3,8,8", "--input", "1,5:int64", "-o", t, "--json")
    assert r.exit_code == 0, r.output
    r = gpd("verify", t, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert "not both" in one_line_error(gpd("plan", "test_capture:ImageAndText", "--input", "1,3,8,8",
                                            "--input-shape", "1,3,8,8"))


@pytest.mark.parametrize("text, want", [
    ("1,3,8,8", InputSpec((1, 3, 8, 8))),
    ("pixel_values=1,3,8,8", InputSpec((1, 3, 8, 8), name="pixel_values")),
    ("ids=2,7:int64", InputSpec((2, 7), torch.int64, "ids")),
    ("m=2,7:bool", InputSpec((2, 7), torch.bool, "m")),
])
def test_parse_input(text, want):
    assert parse_input(text) == want


@pytest.mark.parametrize("text", ["1,3,x8", "a b=1,2", "1,2:complex", "0,3", "ids=1,2:int64 "])
def test_bad_inputs_are_refused(text):
    with pytest.raises(GPDError):
        parse_inputs([text])


def test_a_repeated_keyword_is_refused():
    with pytest.raises(GPDError, match="twice"):
        parse_inputs(["a=1,2", "a=1,3"])


# -- trace failures ----------------------------------------------------------------------------------
def scaled_by(x, sizes):
    sizes[0] = x.shape[-1]  # mutates its list argument: fine eagerly, not on the list an fx graph holds
    return x * sizes[0]


torch.fx.wrap("scaled_by")


class MutatesAList(nn.Module):
    """Runs eagerly, but its fx graph fails: fx records ``[1]`` as an immutable list (torchvision's swin3d)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return scaled_by(self.conv(x), [1])


def test_a_graph_that_fails_where_the_model_runs_is_a_trace_failure():
    model = MutatesAList()
    with pytest.raises(GPDError) as e:
        api.plan_expansion(model, (1, 3, 8, 8), 2.0, capture="fx")
    assert "rejects" not in str(e.value) and "--capture export" in str(e.value)
    planned = api.plan_expansion(model, (1, 3, 8, 8), 2.0)  # auto: export takes over
    assert planned.student.capture == "export"


def test_a_wrong_input_is_still_the_inputs_fault():
    with pytest.raises(GPDError, match="rejects an input"):
        api.plan_expansion(_net(), (1, 5, 8, 8), 2.0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
