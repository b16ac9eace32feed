"""Issue 12: a verify that never passes a broken teacher, forged files that never allocate gigabytes, bad
input that always exits 2. Commands that could allocate run in a child limited to 1 GiB and 20 s."""
import json
import math
import os
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import MODEL, gpd, random_init, rewrite_teacher, run_limited
from gpd_surgery import api, io as gio
from gpd_surgery.errors import PlanError
from gpd_surgery.examples import small_cnn
from gpd_surgery.verification import difference, verify

def exits_2(code, text):
    """Exit 2 and one ``error:`` line, the last (a ``note:`` before it may say where defaults came from)."""
    assert code == 2, text
    lines = text.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and all(line.startswith("note: ") for line in lines[:-1]), text
    return errors[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """small_cnn width 4, random weights, x2 at 1x3x8x8: its weights file and teacher file."""
    d = tmp_path_factory.mktemp("hard")
    torch.manual_seed(0)
    model = random_init(small_cnn(width=4))
    weights = d / "w.safetensors"
    gio.atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    source = {"model": MODEL, "model_args": {"width": 4}, "input_shape": [1, 3, 8, 8]}
    api.expand(model, (1, 3, 8, 8), 2.0, source=source).save(str(d / "t.safetensors"))
    return d, model, weights


forge = rewrite_teacher


def write_plan(dst, obj, tensors):
    text = json.dumps(obj)
    if os.path.exists(dst):
        os.unlink(dst)
    gio.atomic_save(tensors, str(dst), {gio.PLAN_KEY: text, gio.DIGEST_KEY: gio.plan_digest(text)})
    return dst


# -- 1. NaN and inf are never "equivalent" ------------------------------------------------------------
def _poison(key, index, value):
    def edit(tensors):
        t = tensors[key].clone()
        t.view(-1)[index] = value
        tensors[key] = t
    return edit


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_verify_fails_a_teacher_with_a_non_finite_weight(small, tmp_path, value):
    d, _, weights = small
    bad = forge(d / "t.safetensors", tmp_path / "nan.safetensors", tensors_edit=_poison("stem.0.weight", 0, value))
    r = gpd("verify", MODEL, bad, "--weights", weights, "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "NaN" in r.output and "NOT equivalent" in r.output
    r = gpd("verify", MODEL, bad, "--weights", weights, "--device", "cpu", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and not rep["passed"] and rep["checks"][0]["max_rel"] is None
    assert rep["divergence"]["node"].startswith("stem")


def test_verify_trained_fails_a_nan_teacher_through_the_extraction_check(small, tmp_path):
    d, _, weights = small
    bad = forge(d / "t.safetensors", tmp_path / "nan.safetensors", tensors_edit=_poison("stem.0.weight", 0, math.nan))
    r = gpd("verify", MODEL, bad, "--weights", weights, "--device", "cpu", "--trained", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and not rep["passed"], r.output
    assert not all(c["passed"] for c in rep["extraction"])


def test_a_nan_in_a_copy_that_extraction_ignores_still_fails(small, tmp_path):
    """Row 8 of the stem conv is the second copy of student channel 0: the collapsed student never reads
    it, so only the comparison of teacher and student can see it."""
    d, model, weights = small
    plan, tensors = gio.load_teacher_file(str(d / "t.safetensors"))
    width = model.state_dict()["stem.0.weight"].shape[0]
    t = tensors["stem.0.weight"].clone()
    t[width] = math.nan
    tensors["stem.0.weight"] = t
    rep = verify(model, plan, tensors, device="cpu")
    assert not rep.passed and all(c.passed for c in rep.extraction)
    assert math.isnan(rep.checks[0].max_rel) and math.isnan(rep.inside[0].max_rel)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
special = st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(finite, st.one_of(finite, special)), min_size=1, max_size=20))
def test_difference_is_nan_exactly_where_finiteness_differs(pairs):
    ref = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    got = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    err = difference(ref, got)
    if all(math.isfinite(b) for _, b in pairs):
        assert err == float((ref - got).abs().max())
    else:
        assert math.isnan(err)


# -- 2. tiny forged files allocate nothing big --------------------------------------------------------
def _teacher_plan(spaces, tensors, branches=None):
    return {"format": "gpd-surgery/teacher", "version": 2, "ratio": 2.0, "seed": 0, "equal_shares": False,
            "source": {}, "spaces": spaces, "tensors": tensors, "report": {}, "branches": branches or {}}


def test_a_product_over_a_huge_unmapped_space_with_no_data(tmp_path):
    """560 bytes used to take 3.8 GB: a [0, 2^28] tensor over a product of a mapped and a 2^27 space."""
    obj = _teacher_plan({"0": {"size": 2, "src": [0, 1, 0, 1]}, "1": {"size": 2**27}},
                        [{"key": "w", "kind": "param", "shape": [0, 2**28], "dtype": "float32", "teacher": True,
                          "dims": [[1, {"p": [0, 1]}, "share"]]}])
    path = write_plan(tmp_path / "t.safetensors", obj, {"w": torch.zeros(0, 2**29)})
    assert os.path.getsize(path) < 2000
    t0 = time.perf_counter()
    code, out = run_limited(["extract", path, "-o", tmp_path / "s.safetensors"])
    assert code == 0, out
    assert gio.read_header(str(tmp_path / "s.safetensors"))[1] == {"w": ((0, 2**28), "float32")}
    assert time.perf_counter() - t0 < 20
    code, out = run_limited(["inspect", path])
    assert code == 0, out


def test_an_avg_branch_over_a_huge_empty_kernel(tmp_path):
    """664 bytes used to take 4.8 GB: torch.full of a 32768x32768 averaging kernel for an empty weight."""
    obj = _teacher_plan({"0": {"size": 1, "src": [0, 0]}},
                        [{"key": "c.weight", "kind": "param", "shape": [1, 0, 32768, 32768], "dtype": "float32",
                          "teacher": True, "dims": [[0, 0, "copy"]]}], {"c.weight": ["avg"]})
    tensors = {"c.weight": torch.zeros(2, 0, 32768, 32768), "c.branch_avg_weight": torch.zeros(2, 0, 1, 1),
               "c.branch_avg_scale": torch.zeros(2)}
    path = write_plan(tmp_path / "t.safetensors", obj, tensors)
    code, out = run_limited(["extract", path, "-o", tmp_path / "s.safetensors"])
    assert code == 0, out


@pytest.mark.parametrize("kind", ["1x1", "kxk", "avg", "1x1-kxk"])
@pytest.mark.parametrize("shape", [(1, 1, 0, 5), (1, 1, 5, 0), (1, 0, 3, 3), (1, 1, 0, 2**40)])
def test_branches_over_empty_kernels(tmp_path, kind, shape):
    """A branch on a kernel with a size of 0 (averaging over it divided by zero): nothing to merge."""
    from gpd_surgery.branches import branch_shapes

    teacher_shape = (2,) + shape[1:]
    obj = _teacher_plan({"0": {"size": 1, "src": [0, 0]}},
                        [{"key": "c.weight", "kind": "param", "shape": list(shape), "dtype": "float32",
                          "teacher": True, "dims": [[0, 0, "copy"]]}], {"c.weight": [kind]})
    tensors = {"c.weight": torch.zeros(teacher_shape)}
    tensors.update({"c." + n: torch.zeros(s) for n, s in branch_shapes(kind, teacher_shape).items()})
    path = write_plan(tmp_path / "t.safetensors", obj, tensors)
    code, out = run_limited(["extract", path, "-o", tmp_path / "s.safetensors"])
    assert code == 0, out
    assert gio.read_header(str(tmp_path / "s.safetensors"))[1] == {"c.weight": (shape, "float32")}


def test_a_dim_over_spaces_with_no_map_is_refused(small, tmp_path):
    """A widened dim whose layout has no copy map ended in index_select(None): now the plan is invalid."""
    d, _, _ = small

    def edit(obj):
        obj["spaces"]["999999"] = {"size": 3}
        obj["tensors"].append({"key": "x", "kind": "param", "shape": [3], "dtype": "float32", "teacher": True,
                               "dims": [[0, 999999, "copy"]]})

    bad = forge(d / "t.safetensors", tmp_path / "t.safetensors", edit, lambda t: t.update(x=torch.zeros(3)))
    line = exits_2(*run_limited(["extract", bad, "-o", tmp_path / "s.safetensors"]))
    assert "not widened" in line
    with pytest.raises(PlanError):
        gio.load_teacher_file(str(bad))


# -- 3. inspect is linear in the plan ------------------------------------------------------------------
def test_inspect_of_a_large_forged_plan_is_fast(tmp_path):
    """Thousands of spaces, tensors and layout parts: one pass, not spaces x tensors x parts."""
    n = 3000
    spaces = {str(i): {"size": 1, "src": [0, 0]} for i in range(n)}
    recipes = [{"key": f"p{i}", "kind": "param", "shape": [1], "dtype": "float32", "teacher": True,
                "dims": [[0, i, "copy"]]} for i in range(n)]
    recipes.append({"key": "cat", "kind": "param", "shape": [n], "dtype": "float32", "teacher": True,
                    "dims": [[0, {"c": list(range(n))}, "copy"]]})
    tensors = {f"p{i}": torch.zeros(2) for i in range(n)} | {"cat": torch.zeros(2 * n)}
    path = write_plan(tmp_path / "t.safetensors", _teacher_plan(spaces, recipes), tensors)
    t0 = time.perf_counter()
    code, out = run_limited(["inspect", path, "--json"], seconds=30)
    assert code == 0, out
    assert time.perf_counter() - t0 < 15
    assert len(json.loads(out)["spaces"]) == n


# -- 4, 5. sizes from options and plans are checked before anything is built ---------------------------
@pytest.mark.parametrize("ratio", ["1e9", "1e18", "65"])
@pytest.mark.parametrize("command", ["plan", "expand"])
def test_absurd_ratios_exit_2(tmp_path, command, ratio):
    args = [command, MODEL, "--input-shape", "1,3,8,8", "--ratio", ratio]
    line = exits_2(*run_limited(args + (["-o", tmp_path / "t.safetensors"] if command == "expand" else [])))
    assert "ratio" in line


@pytest.mark.parametrize("shape", ["1,3,99999999999999999999,2", "1,3,40000,40000", "1,3,9,9,9,9,9,9,9,9"])
def test_huge_input_shapes_exit_2(tmp_path, shape):
    line = exits_2(*run_limited(["expand", MODEL, "--input-shape", shape, "-o", tmp_path / "t.safetensors"]))
    assert "input shape" in line


@pytest.mark.parametrize("edit, words", [
    (lambda o: o["source"].update(input_shape=[1, 3, 2048, 2048]), "input shape"),
    (lambda o: o.update(ratio=1e7), "ratio"),
    (lambda o: o.update(ratio=1e300), "ratio"),
    (lambda o: o.update(ratio=3.0), "map must list"),  # a ratio that its maps contradict
])
def test_verify_checks_the_plans_sizes_first(small, tmp_path, edit, words):
    d, _, weights = small
    bad = forge(d / "t.safetensors", tmp_path / "t.safetensors", edit)
    t0 = time.perf_counter()
    line = exits_2(*run_limited(["verify", MODEL, bad, "--weights", weights, "--device", "cpu"]))
    assert words in line and time.perf_counter() - t0 < 20


def test_verify_checks_memory_for_the_input_shape_it_is_given(small):
    d, _, weights = small
    line = exits_2(*run_limited(["verify", MODEL, d / "t.safetensors", "--weights", weights,
                                 "--input-shape", "1,3,4096,4096"]))
    assert "--input-shape" in line and "--force" not in line


# -- 9. files that are not what they claim ------------------------------------------------------------
def test_inspect_of_a_torch_save_file_says_what_it_is(small, tmp_path):
    _, model, _ = small
    torch.save(model.state_dict(), tmp_path / "w.pt")
    line = exits_2(*run_limited(["inspect", tmp_path / "w.pt"]))
    assert "not a safetensors file" in line and "zip" in line


@pytest.mark.parametrize("cut", [1, 100])
def test_a_truncated_teacher_is_one_line_not_a_bus_error(small, tmp_path, cut):
    """Files are read, not mapped: a file cut short (even while it is read) is a clear error."""
    d, _, _ = small
    data = (d / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-cut])
    line = exits_2(*run_limited(["extract", tmp_path / "t.safetensors", "-o", tmp_path / "s.safetensors"]))
    assert "truncated" in line
    assert not (tmp_path / "s.safetensors").exists()


def test_reading_matches_safetensors_itself(small):
    from safetensors.torch import load_file

    d, _, _ = small
    ours, theirs = gio.read_tensors(str(d / "t.safetensors")), load_file(str(d / "t.safetensors"))
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


# -- a verify that looks inside: a zero head proves nothing ---------------------------------------------
class ZeroHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def zero_head():
    m = random_init(ZeroHead())
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    return m


def test_a_zero_head_model_verifies_inside(tmp_path):
    m = zero_head()
    res = api.expand(m, (2, 3, 6, 6), 2.0)
    rep = verify(m, res.plan, res.tensors, (2, 3, 6, 6), device="cpu")
    assert rep.passed and rep.constant_output
    assert all(c.nodes and c.nodes >= 6 for c in rep.inside)


@pytest.mark.parametrize("row", [1, 8 + 1])  # the canonical copy, or the second copy of channel 1
def test_a_tampered_inner_weight_of_a_zero_head_model_fails_and_is_named(row):
    m = zero_head()
    res = api.expand(m, (2, 3, 6, 6), 2.0)
    tensors = dict(res.tensors)
    w = tensors["body.3.weight"].clone()
    w[row] += 0.5
    tensors["body.3.weight"] = w
    rep = verify(m, res.plan, tensors, (2, 3, 6, 6), device="cpu")
    assert all(c.passed for c in rep.checks)  # the outputs are all zeros either way: vacuous
    assert not rep.passed and rep.constant_output
    assert rep.divergence["node"] == "body_3"


def test_cli_says_when_the_output_ignores_the_input(tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("zero_head_models")
    mod.make = zero_head
    monkeypatch.setitem(sys.modules, "zero_head_models", mod)
    r = gpd("expand", "zero_head_models:make", "--input-shape", "2,3,6,6", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    r = gpd("verify", "zero_head_models:make", tmp_path / "t.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "does not depend on its input" in r.output and "nodes" in r.output


def test_model_args_in_a_plan_are_checked_before_the_model_is_allocated(small, tmp_path):
    """A recorded width of 6000 built a 2.4 GB student before failing: now refused from a meta-device build."""
    d, _, weights = small
    bad = forge(d / "t.safetensors", tmp_path / "t.safetensors", lambda o: o["source"].update(model_args={"width": 6000}))
    t0 = time.perf_counter()
    line = exits_2(*run_limited(["verify", bad, "--device", "cpu"], memory=256 << 20))
    assert "not made from" in line and "6000" in line and time.perf_counter() - t0 < 20


def test_running_out_of_memory_is_exit_2_not_a_bug(small, tmp_path, monkeypatch):
    d, _, _ = small

    def boom(path):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 268435456 bytes.\nmore lines")

    monkeypatch.setattr(api, "extract", boom)
    r = gpd("extract", d / "t.safetensors", "-o", tmp_path / "s.safetensors")
    line = exits_2(r.exit_code, r.output)
    assert line.startswith("error: out of memory") and "--ratio" in line


# -- plan format versions ------------------------------------------------------------------------------
DATA = os.path.join(os.path.dirname(__file__), "data")


def test_a_version_1_teacher_still_extracts_bit_for_bit(tmp_path):
    """tests/data/teacher_v1.safetensors: a trained teacher (branches, ratio 1.5) written by plan format v1,
    and the student that version extracted from it."""
    r = gpd("extract", os.path.join(DATA, "teacher_v1.safetensors"), "-o", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.output
    ours, then = gio.read_tensors(str(tmp_path / "s.safetensors")), gio.read_tensors(os.path.join(DATA, "student_v1.safetensors"))
    assert list(ours) == list(then) and all(torch.equal(ours[k], then[k]) for k in then)
    meta, _ = gio.read_header(os.path.join(DATA, "teacher_v1.safetensors"))
    assert json.loads(meta[gio.PLAN_KEY])["version"] == 1


def test_a_version_1_teacher_verifies_from_its_plan_alone():
    r = gpd("verify", os.path.join(DATA, "teacher_v1.safetensors"), "--trained", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]


def test_new_teachers_are_version_3(small):
    d, _, _ = small
    meta, _ = gio.read_header(str(d / "t.safetensors"))
    plan = json.loads(meta[gio.PLAN_KEY])
    assert plan["version"] == 3
    assert plan["source"]["capture"] == "fx" and plan["source"]["inputs"] == [{"shape": plan["source"]["input_shape"]}]
